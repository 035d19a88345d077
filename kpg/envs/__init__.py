"""Multi-agent environments for the trainers, several copies stepped together with every agent's
observations and actions in fixed-shape arrays.

- :mod:`kpg.envs.pettingzoo`: any PettingZoo Parallel environment (:class:`EnvPool`), the built-in
  task names (:func:`make_env_factory`);
- :mod:`kpg.envs.teams`: one team of a MAgent2 battle against an opponent policy (:class:`TeamControl`);
- :mod:`kpg.envs.smax`: JaxMARL's SMAX (StarCraft micromanagement in JAX; the ``kpg[smax]`` extra),
  all copies stepped in one compiled call (:class:`~kpg.envs.smax.SMAXPool`);
- :mod:`kpg.envs.vmas`: VMAS scenarios (the ``kpg[vmas]`` extra), all copies as torch tensors on the
  training device, stepped in one call (:class:`~kpg.envs.vmas.VMASPool`).

:func:`make_pool` builds the pool of any of them from its name (``smax:MAP``, ``vmas:SCENARIO`` or a PettingZoo name).
"""

from __future__ import annotations

from typing import Any

from kpg.envs.pettingzoo import AgentSpaces, EnvFactory, EnvPool, StepResult, make_env_factory
from kpg.envs.teams import OPPONENTS, OpponentPolicy, TeamControl, random_opponent

SMAX_PREFIX = "smax:"
VMAS_PREFIX = "vmas:"


def make_pool(name: str, copies: int, seed: int, **options: Any):
    """``copies`` copies of environment ``name`` with ``options``: a :class:`~kpg.envs.smax.SMAXPool`
    for ``smax:MAP``, else an :class:`EnvPool` of :func:`make_env_factory`'s environment."""
    if name.startswith(SMAX_PREFIX):
        from kpg.envs.smax import SMAXPool

        return SMAXPool(name[len(SMAX_PREFIX) :], copies, seed, **options)
    if name.startswith(VMAS_PREFIX):
        from kpg.envs.vmas import VMASPool

        return VMASPool(name[len(VMAS_PREFIX) :], copies, seed, **options)
    return EnvPool(make_env_factory(name, **options), copies, seed)


__all__ = [
    "OPPONENTS",
    "SMAX_PREFIX",
    "VMAS_PREFIX",
    "AgentSpaces",
    "EnvFactory",
    "EnvPool",
    "OpponentPolicy",
    "StepResult",
    "TeamControl",
    "make_env_factory",
    "make_pool",
    "random_opponent",
]
