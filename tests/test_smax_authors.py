"""SMAX on JaxMARL 0.0.7 with jax 0.6.0, the versions the authors ran (their environment_jax.yml).

They cannot share .venv (kpg[smax] pins jaxmarl 0.2.0 on jax 0.10.2), so these tests run in
.venv-smax-authors (``make setup-smax-authors``; ``make test`` runs them there) and skip elsewhere.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.smax_authors

pytest.importorskip("jaxmarl", reason="SMAX needs JaxMARL: make setup-smax-authors builds its 0.0.7 venv")
if importlib.metadata.version("jaxmarl") != "0.0.7":
    pytest.skip(
        f"JaxMARL {importlib.metadata.version('jaxmarl')} here; these tests are for 0.0.7, in .venv-smax-authors "
        "(make test-smax-authors)",
        allow_module_level=True,
    )

from kpg.app.cli import _from_dict, _read_config_file  # noqa: E402
from kpg.app.train import TrainConfig, train  # noqa: E402
from kpg.envs.smax import SMAXPool  # noqa: E402

PRESET = Path(__file__).resolve().parent.parent / "configs" / "smax_authors.toml"
AUTHORS_VERSIONS = {"jaxmarl": "0.0.7", "jax": "0.6.0", "jaxlib": "0.6.0"}


def test_pool_steps_on_jaxmarl_0_0_7_and_names_it():
    pool = SMAXPool("3m", 4, seed=0)
    assert pool.versions == AUTHORS_VERSIONS
    assert pool.obs.shape == (4, 3, pool.spaces.obs_size) and pool.avail.shape == (4, 3, pool.spaces.action_size)
    finished = []
    for _ in range(200):
        attack = torch.where(pool.avail[..., 5:].any(-1), 5 + pool.avail[..., 5:].float().argmax(-1), 1)
        finished += pool.step(attack).finished
        assert torch.isfinite(pool.obs).all() and torch.isfinite(pool.state).all()
    assert finished and all(e["length"] >= 1 for e in finished)


def test_preset_update_through_kpg_train_records_jaxmarl_0_0_7(tmp_path):
    config = _from_dict(TrainConfig, _read_config_file(PRESET))
    config = dataclasses.replace(
        config,
        env="smax:3m",
        copies=4,
        mappo=dataclasses.replace(config.mappo, rollout=16),
        steps=2 * 4 * 16,
        k=2,
        logdir=tmp_path,
        progress=False,
        tensorboard=False,
    )
    summary = train(config)
    assert summary["updates"] == 2
    assert {name: summary["versions"][name] for name in AUTHORS_VERSIONS} == AUTHORS_VERSIONS
    assert summary["versions"]["torch"] == torch.__version__
