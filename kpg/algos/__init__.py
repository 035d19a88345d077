"""The trainers: K-MAPPO, K-MADDPG, K-FACMAC, and :func:`choose_trainer`, the one place that picks
a trainer for an algorithm and an environment (``kpg train --algo``).

A trainer is built as ``Trainer(pool, config, k, k_until, device, seed)`` and offers
``iteration() -> metrics``, ``act(obs, deterministic)``, ``env_steps``, ``updates``, ``clock``
(a :class:`~kpg.algos.common.WallClock`), ``actor_optimizer`` (the :class:`kpg.KPGOptimizer`),
``actor_level_seconds()``, ``state_dict()`` and ``load_state_dict()``; ``METRICS`` names the
metrics ``iteration`` may report, and ``RANK_STATE`` the entries of ``state_dict()`` that are each
data-parallel rank's own (checkpointed per rank).
"""

from __future__ import annotations

from typing import Any

from kpg.algos.facmac import FACMACConfig, FACMACTrainer
from kpg.algos.maddpg import MADDPGConfig, MADDPGTrainer
from kpg.algos.mappo import MAPPOConfig, MAPPOTrainer
from kpg.algos.mappo_recurrent import RecurrentMAPPOTrainer
from kpg.algos.mappo_vectorized import VectorizedMAPPOTrainer
from kpg.envs import SMAX_PREFIX, VMAS_PREFIX

# Each algorithm's trainer on PettingZoo environments; choose_trainer picks MAPPO's other two.
ALGORITHMS = {"mappo": MAPPOTrainer, "maddpg": MADDPGTrainer, "facmac": FACMACTrainer}

# MAPPOConfig's options that only MAPPOTrainer and VectorizedMAPPOTrainer read.
MAPPO_FEED_FORWARD_OPTIONS = (
    "action_scale",
    "scale_bias",
    "scale_min",
    "squash",
    "init",
    "actor_output_gain",
    "adam_eps",
    "normalize_advantages",
    "bootstrap_time_limit",
    "shared_value",
)
# MAPPOConfig's options that only RecurrentMAPPOTrainer reads.
MAPPO_RECURRENT_OPTIONS = (
    "lr_anneal",
    "lr_anneal_steps",
    "gru",
    "value_clip",
    "advantage_norm",
    "actor_loss_mean",
)


def choose_trainer(algo: str, env: str, mappo: MAPPOConfig, steps: int) -> tuple[type, dict[str, Any]]:
    """The trainer class for ``algo`` on ``env`` and its arguments beyond the common ones: the
    recurrent MAPPO trainer (``mappo.recurrent``, SMAX; it anneals over the run's ``steps``), the
    tensor-rollout one (MAPPO on ``vmas:``), or :data:`ALGORITHMS`' (whose off-policy trainers step
    VMAS's tensors themselves). Options that the chosen trainer would ignore are refused."""
    if algo not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algo!r}; the trainers: {', '.join(ALGORITHMS)}")
    vmas = env.startswith(VMAS_PREFIX)
    recurrent = algo == "mappo" and mappo.recurrent
    if vmas and recurrent:
        raise ValueError(
            f"{env}: VMAS environments train with --algo mappo without --mappo.recurrent (the tensor "
            "rollout of kpg.algos.mappo_vectorized), --algo maddpg or --algo facmac"
        )
    defaults = MAPPOConfig()
    if recurrent:
        feed_forward_only = [
            name for name in MAPPO_FEED_FORWARD_OPTIONS if getattr(mappo, name) != getattr(defaults, name)
        ]
        if feed_forward_only:
            raise ValueError(
                f"--mappo.{feed_forward_only[0].replace('_', '-')} is an option of the feed-forward MAPPO trainers; "
                "leave it at its default with --mappo.recurrent"
            )
        return RecurrentMAPPOTrainer, {"total_steps": steps}
    if env.startswith(SMAX_PREFIX):
        raise ValueError(
            f"{env}: SMAX needs its available-action masks, which the recurrent MAPPO trainer applies: "
            "--algo mappo --mappo.recurrent, or --config configs/smax_authors.toml"
        )
    if algo == "mappo":
        recurrent_only = [name for name in MAPPO_RECURRENT_OPTIONS if getattr(mappo, name) != getattr(defaults, name)]
        if recurrent_only:
            raise ValueError(
                f"--mappo.{recurrent_only[0].replace('_', '-')} is an option of the recurrent trainer; "
                "add --mappo.recurrent (SMAX) or leave it at its default"
            )
        if vmas:
            return VectorizedMAPPOTrainer, {}
    return ALGORITHMS[algo], {}


__all__ = [
    "ALGORITHMS",
    "FACMACConfig",
    "FACMACTrainer",
    "MADDPGConfig",
    "MADDPGTrainer",
    "MAPPOConfig",
    "MAPPOTrainer",
    "RecurrentMAPPOTrainer",
    "VectorizedMAPPOTrainer",
    "choose_trainer",
]
