"""kpg: K-Level Policy Gradients for cooperative multi-agent reinforcement learning.

``KPGOptimizer`` turns a multi-agent actor update into a K-level update (each agent's gradient
taken against the other agents' anticipated policies) with fused multi-agent optimizer kernels;
``kpg.nn`` holds agent-batched layers that evaluate every agent's network in one call.
"""

from kpg import nn
from kpg.couplings import joint_inputs, joint_ratio_loss
from kpg.optim import KPGContext, KPGOptimizer, KPGStats, KSchedule

__all__ = ["KPGContext", "KPGOptimizer", "KPGStats", "KSchedule", "joint_inputs", "joint_ratio_loss", "nn"]
