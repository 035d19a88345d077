"""examples/kmappo_vmas.py: K-MAPPO on VMAS in one file, on kpg's public API. It must keep learning:
a short navigation run (30 000 frames) raises the agents' episode return well above where it starts,
at k=1 (MAPPO) and at k=2."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from helpers import loaded_module

pytest.importorskip("vmas", reason="the example needs VMAS: pip install 'kpg[vmas]'")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "kmappo_vmas.py"


@pytest.fixture(scope="module")
def example():
    with loaded_module(EXAMPLE, "kmappo_vmas") as module:
        yield module


@pytest.mark.parametrize("k", [1, 2])
def test_learns_navigation_in_a_short_run(example, k):
    log = example.train(example.Settings(k=k, iterations=5, seed=0))
    returns = [row["episode_return"] for row in log]
    assert all(math.isfinite(value) for value in returns), returns
    # Random actions score about -1.4 per agent and episode here; the policy must gain most of that back.
    assert returns[0] < -1.0, returns
    assert sum(returns[-2:]) / 2 > returns[0] + 0.7, returns
    assert all(0.0 <= row["clip_fraction"] <= 1.0 for row in log)


def test_settings_come_from_the_command_line(example):
    settings = example.parse_settings(["--k", "1", "--iterations", "3", "--others", "geometric", "--lr", "1e-3"])
    assert (settings.k, settings.iterations, settings.others, settings.lr) == (1, 3, "geometric", 1e-3)
