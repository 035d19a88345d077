"""The trainers: K-MAPPO, K-MADDPG, K-FACMAC, and the registry ``kpg train --algo`` picks from.

A trainer is built as ``Trainer(pool, config, k, k_until, device, seed)`` and offers
``iteration() -> metrics``, ``act(obs, deterministic)``, ``env_steps``, ``updates``, ``clock``
(a :class:`~kpg.algos.common.WallClock`), ``actor_optimizer`` (the :class:`kpg.KPGOptimizer`),
``actor_level_seconds()``, ``state_dict()`` and ``load_state_dict()``; ``METRICS`` names the
metrics ``iteration`` may report, and ``RANK_STATE`` the entries of ``state_dict()`` that are each
data-parallel rank's own (checkpointed per rank).
"""

from kpg.algos.facmac import FACMACConfig, FACMACTrainer
from kpg.algos.maddpg import MADDPGConfig, MADDPGTrainer
from kpg.algos.mappo import MAPPOConfig, MAPPOTrainer

ALGORITHMS = {"mappo": MAPPOTrainer, "maddpg": MADDPGTrainer, "facmac": FACMACTrainer}

__all__ = [
    "ALGORITHMS",
    "FACMACConfig",
    "FACMACTrainer",
    "MADDPGConfig",
    "MADDPGTrainer",
    "MAPPOConfig",
    "MAPPOTrainer",
]
