"""K-MAPPO as a BenchMARL algorithm: BenchMARL's MAPPO whose actor takes K-level steps.

The loss is BenchMARL's own (TorchRL's ``ClipPPOLoss``, built by :class:`benchmarl.algorithms.Mappo`).
From level 2 the stored log-probabilities the loss divides by are replaced by
``old_i - sum_{j != i} (log pi_j^(l-1) - old_j)``: the loss's ratio becomes agent i's joint ratio
``r_i * prod_{j != i} r_j^(l-1)``, clipped as a whole (``kpg.joint_ratio_loss``'s ``joint_clip``
form), with the gradient only through agent i's own term. The actor's ``KPGOptimizer`` and the
closure that runs the loss once per level are :class:`kpg.benchmarl.Experiment`'s.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass
from pathlib import Path

import torch
from benchmarl.algorithms import Mappo, MappoConfig
from tensordict import TensorDictBase

from kpg.couplings import OTHERS_MODES
from kpg.optim import KPGContext

CONFIG_DIR = Path(__file__).resolve().parent / "conf"


class KMappo(Mappo):
    """BenchMARL's MAPPO with the actor stepped by ``KPGOptimizer(k)``: ``k=1`` is MAPPO.

    Args (beyond :class:`benchmarl.algorithms.Mappo`'s):
        k (int): the number of levels, 1 or more.
        others (str): ``"product"`` (the authors' joint ratio: the other agents' anticipated ratios
            multiplied) or ``"geometric"`` (their geometric mean, which keeps the joint ratio inside
            the clip range with many agents; docs/benchmarl.md).
    """

    def __init__(self, k: int, others: str, **kwargs):
        from kpg.benchmarl.experiment import Experiment

        experiment = kwargs.get("experiment")
        if not isinstance(experiment, Experiment):
            raise TypeError(
                f"kmappo steps its actor with KPGOptimizer through kpg.benchmarl.Experiment, but the experiment is a "
                f"{type(experiment).__module__}.{type(experiment).__qualname__}, which would step it with Adam: use "
                "`from kpg.benchmarl import Experiment` (or `python -m kpg.benchmarl.run algorithm=kmappo ...`; to "
                "resume, `experiment.restore_file=PATH`)"
            )
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"kmappo's k must be an integer >= 1 (1 is MAPPO), got {k!r}")
        if others not in OTHERS_MODES:
            raise ValueError(f"kmappo's others must be one of {OTHERS_MODES}, got {others!r}")
        super().__init__(**kwargs)
        self.k = k
        self.others = others

    def joint_ratio_batch(self, group: str, batch: TensorDictBase, ctx: KPGContext) -> TensorDictBase:
        """``batch`` (a shallow copy) whose stored log-probabilities make the loss's ratio the joint
        ratio at level ``ctx.level``: the other agents' log-ratios come from their level l-1
        parameters (``ctx.anticipated()``), without gradient."""
        loss = self.get_loss_and_updater(group)[0]
        key = loss.tensor_keys.sample_log_prob
        old = batch.get(key)
        num_agents = len(self.group_map[group])
        if old.shape[-1] != num_agents:
            raise ValueError(
                f"kmappo expects the stored log-probabilities {key} of group {group!r} to end in its {num_agents} "
                f"agents, got shape {tuple(old.shape)}"
            )
        with torch.no_grad(), ctx.anticipated():
            # The loss's own log-probability (the same distribution and action keys), at level l-1.
            anticipated, _, _ = loss._get_cur_log_prob(batch)
        log_ratio = anticipated - old
        others = log_ratio.sum(dim=-1, keepdim=True) - log_ratio
        if self.others == "geometric" and num_agents > 1:
            others = others / (num_agents - 1)
        joint = batch.clone(False)
        joint.set(key, old - others)
        return joint


@dataclass
class KMappoConfig(MappoConfig):
    """Configuration of :class:`KMappo`: :class:`benchmarl.algorithms.MappoConfig`'s fields plus
    ``k`` and ``others``. ``KMappoConfig.get_from_yaml()`` reads kpg's ``kmappo.yaml`` (MAPPO's
    defaults, k=2)."""

    k: int = MISSING
    others: str = MISSING

    @staticmethod
    def associated_class():
        return KMappo

    @classmethod
    def get_from_yaml(cls, path: str | None = None) -> KMappoConfig:
        return super().get_from_yaml(str(CONFIG_DIR / "algorithm" / "kmappo.yaml") if path is None else path)
