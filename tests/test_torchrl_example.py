"""examples/torchrl_mappo.py (kpg[torchrl]): TorchRL's multi-agent PPO loop on VMAS with the actor's
Adam swapped for KPGOptimizer. At k=1 it computes what the loop with torch.optim.Adam computes; at
k=2 the closure's anticipated policy is the level-1 one, and the run differs from k=1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import loaded_module

pytest.importorskip("torchrl", reason="the TorchRL example needs the torchrl extra: pip install 'kpg[torchrl]'")
pytest.importorskip("vmas", reason="the TorchRL example needs VMAS: pip install 'kpg[torchrl]'")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "torchrl_mappo.py"


@pytest.fixture(scope="module")
def example():
    with loaded_module(EXAMPLE, "torchrl_mappo") as module:
        yield module


def small(example, **changes):
    settings = dict(envs=4, max_steps=10, iterations=3, epochs=2, minibatch_size=20, cells=16)
    return example.Settings(**{**settings, **changes})


def test_k1_equals_the_loop_with_torch_adam(example):
    adam = example.train(small(example), k=None)
    kpg1 = example.train(small(example), k=1)
    for part in ("policy", "critic"):
        assert adam[part].keys() == kpg1[part].keys()
        for name, value in adam[part].items():
            torch.testing.assert_close(kpg1[part][name], value, rtol=1e-5, atol=1e-6, msg=f"{part} {name}")
    assert adam["rewards"] == pytest.approx(kpg1["rewards"], rel=1e-5, abs=1e-6)
    # The loop trains: three iterations of minibatch steps moved both networks.
    untrained = example.train(small(example, iterations=1, epochs=0), k=None)
    for part in ("policy", "critic"):
        assert any(not torch.equal(untrained[part][name], value) for name, value in adam[part].items())


def test_k2_anticipates_with_the_level_1_policy(example, monkeypatch):
    seen = []
    joint_key = example.anticipated_log_prob_key

    def recording(data, policy, ctx):
        action = data.get(("agents", "action"))
        with torch.no_grad():
            base = policy.get_dist(data).log_prob(action)
        with ctx.anticipated():
            anticipated = policy.get_dist(data).log_prob(action)
        seen.append((ctx.level, (anticipated - base).abs().max().item()))
        return joint_key(data, policy, ctx)

    monkeypatch.setattr(example, "anticipated_log_prob_key", recording)
    kpg2 = example.train(small(example, iterations=1), k=2)
    assert seen and all(level == 2 for level, _ in seen)
    # Inside ctx.anticipated() the MultiAgentMLP runs at the level-1 parameters, not the base ones.
    assert all(difference > 0 for _, difference in seen)
    monkeypatch.undo()
    kpg1 = example.train(small(example, iterations=1), k=1)
    assert any(not torch.equal(kpg1["policy"][name], value) for name, value in kpg2["policy"].items())
