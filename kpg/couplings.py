"""Where the other agents' anticipated policies enter the usual multi-agent losses.

Both helpers follow docs/algorithm.md: agent i's own outputs come from its base parameters (with
gradient), the other agents' from level l-1 (computed inside ``ctx.anticipated()``, no gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

OTHERS_MODES = ("product", "geometric")
FORMS = ("joint_clip", "weighted")


def joint_inputs(own: Tensor | Sequence[Tensor], anticipated: Tensor | Sequence[Tensor], agent_dim: int = 0) -> Tensor:
    """For every agent i, the joint input in which slot i is agent i's own output and every other
    slot the anticipated output: what a centralized critic (MADDPG) or a mixer (FACMAC) sees when
    agent i is updated.

    ``own`` and ``anticipated`` are tensors of one shape whose dimension ``agent_dim`` indexes the
    A agents; the result has shape ``[A, *shape]`` and ``result[i]`` is ``anticipated`` with
    index i along ``agent_dim`` taken from ``own``. Or they are sequences of A tensors
    ``[..., F_j]`` (agents whose outputs differ in size), concatenated along the last dimension;
    the result is ``[A, ..., sum_j F_j]``. Gradient flows only into ``own``, once per agent.
    """
    if not isinstance(own, Tensor):
        own, anticipated = list(own), list(anticipated)
        if len(own) != len(anticipated):
            raise ValueError(f"joint_inputs got {len(own)} own outputs and {len(anticipated)} anticipated ones")
        own_cat, anticipated_cat = torch.cat(own, dim=-1), torch.cat(anticipated, dim=-1)
        own_slot = _own_slots([o.shape[-1] for o in own], own_cat.device)
        own_slot = own_slot.view(len(own), *([1] * (own_cat.dim() - 1)), own_cat.shape[-1])
        return torch.where(own_slot, own_cat.unsqueeze(0), anticipated_cat.detach().unsqueeze(0))
    if own.shape != anticipated.shape:
        raise ValueError(
            f"joint_inputs: own {tuple(own.shape)} and anticipated {tuple(anticipated.shape)} differ in shape"
        )
    agent_dim = agent_dim % own.dim()
    num_agents = own.shape[agent_dim]
    eye = torch.eye(num_agents, dtype=torch.bool, device=own.device)
    shape = [num_agents] + [1] * own.dim()
    shape[agent_dim + 1] = num_agents
    return torch.where(eye.view(shape), own.unsqueeze(0), anticipated.detach().unsqueeze(0))


def _own_slots(widths: list[int], device: torch.device) -> Tensor:
    """``[A, sum(widths)]`` bool: row i is true on agent i's slots. Built from the identity by shape
    operations only: no host data reaches the device, so the step neither synchronizes nor leaves
    a CUDA graph's capture."""
    eye = torch.eye(len(widths), dtype=torch.bool, device=device)
    if len(set(widths)) == 1:
        return eye.unsqueeze(-1).expand(-1, -1, widths[0]).reshape(len(widths), -1)
    return torch.cat([eye[:, j : j + 1].expand(-1, width) for j, width in enumerate(widths)], dim=1)


class JointRatioLoss(NamedTuple):
    loss: Tensor  # [agents]: each agent's negative clipped surrogate
    clip_fraction: Tensor  # [agents]: share of valid samples whose ratio left [1 - eps, 1 + eps]


def joint_ratio_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    anticipated_log_prob: Tensor | None,
    level: int,
    clip_eps: float = 0.2,
    others: str = "product",
    form: str = "joint_clip",
    mask: Tensor | None = None,
) -> JointRatioLoss:
    """K-MAPPO's per-agent clipped surrogate with the joint ratio, in O(agents).

    Shapes ``[agents, batch]``: ``log_prob`` (own, base parameters, with gradient),
    ``old_log_prob`` (the rollout policy's stored log-probabilities), ``anticipated_log_prob``
    (computed inside ``ctx.anticipated()``; unused at level 1, may be None there) and ``mask``
    (1 for valid samples, e.g. alive agents). ``advantages`` is ``[agents, batch]`` or ``[batch]``.

    Level 1 is plain MAPPO: ``rho_i = r_i``. From level 2, ``rho_i = r_i * prod_{j != i} r_j^(l-1)``
    with ``r = exp(log_prob - old_log_prob)``; the others' factor comes from the summed anticipated
    log-ratios minus agent i's own, and is a constant. ``others="geometric"`` takes the geometric
    mean of the others' ratios instead of their product (their summed log-ratio over N-1), which
    keeps the joint ratio inside the clip range with many agents. ``form="joint_clip"`` clips the
    joint ratio (the authors' K-MAPPO); ``form="weighted"`` clips only r_i and multiplies the
    clipped surrogate by the others' factor.
    """
    if others not in OTHERS_MODES:
        raise ValueError(f"others must be one of {OTHERS_MODES}, got {others!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if log_prob.dim() != 2 or old_log_prob.shape != log_prob.shape:
        raise ValueError(
            f"log_prob and old_log_prob must both be [agents, batch], got {tuple(log_prob.shape)} and "
            f"{tuple(old_log_prob.shape)}"
        )
    # Masked samples are selected away (torch.where), never multiplied by zero: a padded or dead
    # agent's log-probability may be inf or NaN, and NaN * 0 is NaN.
    valid = torch.ones_like(log_prob) if mask is None else mask.to(log_prob.dtype)
    keep = valid != 0
    old_log_prob = old_log_prob.detach()
    own_log_ratio = torch.where(keep, log_prob - old_log_prob, 0.0)
    others_log_ratio = torch.zeros_like(own_log_ratio)
    if level >= 2 and log_prob.shape[0] > 1:
        if anticipated_log_prob is None or anticipated_log_prob.shape != log_prob.shape:
            raise ValueError(
                f"level {level} needs anticipated_log_prob of shape {tuple(log_prob.shape)}, computed inside "
                "ctx.anticipated()"
            )
        anticipated_log_ratio = torch.where(keep, (anticipated_log_prob - old_log_prob).detach(), 0.0)
        others_log_ratio = anticipated_log_ratio.sum(dim=0, keepdim=True) - anticipated_log_ratio
        if others == "geometric":
            others_alive = (valid.sum(dim=0, keepdim=True) - valid).clamp_min(1.0)
            others_log_ratio = others_log_ratio / others_alive
    advantages = advantages.expand_as(log_prob) if advantages.dim() == 1 else advantages
    if form == "joint_clip":
        ratio = torch.exp(own_log_ratio + others_log_ratio)
        surrogate = torch.min(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    else:
        ratio = torch.exp(own_log_ratio)
        clipped = torch.min(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
        surrogate = torch.exp(others_log_ratio) * clipped
    count = valid.sum(dim=1).clamp_min(1.0)
    loss = -torch.where(keep, surrogate * valid, 0.0).sum(dim=1) / count
    clipped_share = (
        torch.where(keep, ((ratio.detach() - 1).abs() > clip_eps).to(valid.dtype) * valid, 0.0).sum(dim=1) / count
    )
    return JointRatioLoss(loss, clipped_share)
