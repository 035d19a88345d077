"""K-MAPPO on tensor environments (VMAS): the rollout stays on the training device as tensors.

:class:`VectorizedMAPPOTrainer` is :class:`~kpg.algos.mappo.MAPPOTrainer` with a rollout that never
leaves torch: the pool (:class:`~kpg.envs.vmas.VMASPool`) takes and returns tensors for all copies
in one call per step, the rollout is written into preallocated [T, copies, agents, ...] buffers, the
critic's values are taken as the rollout goes (the critic does not change during it), and the
global state is a view of the observations (VMAS has none of its own: the critic reads every
agent's observation), so no state is stored. GAE, the update's minibatches, the KPG step with the
joint-ratio coupling and the critic's step are MAPPOTrainer's own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kpg.algos.common import generalized_advantages
from kpg.algos.mappo import MAPPOTrainer


class VectorizedMAPPOTrainer(MAPPOTrainer):
    """K-MAPPO whose pool steps tensors: ``pool.obs`` [copies, agents, obs_size], ``pool.state``
    [copies, agents * obs_size] (every agent's observation, as VMASPool's), ``pool.alive``, and
    ``pool.step(actions)`` with ``final_state`` (before any reset) in its result."""

    @torch.no_grad()
    def act(self, obs: Tensor, deterministic: bool = False) -> Tensor:
        """Actions for observations [copies, agents, obs_size], on the pool's device."""
        return self.act_tensor(obs, deterministic)

    @torch.no_grad()
    def _collect(self):
        c, pool, device, dtype = self.config, self.pool, self.device, self.dtype
        steps, copies, n = c.rollout, pool.copies, self.num_agents
        action_shape = (n,) if self.head.discrete else (n, pool.spaces.action_size)
        obs_buffer = torch.empty(steps, copies, n, pool.spaces.obs_size, dtype=dtype, device=device)
        actions = torch.empty(
            steps, copies, *action_shape, dtype=torch.long if self.head.discrete else dtype, device=device
        )
        old_log_prob = torch.empty(steps, copies, n, dtype=dtype, device=device)
        rewards = torch.empty(steps, copies, n, dtype=dtype, device=device)
        dones = torch.empty(steps, copies, n, dtype=dtype, device=device)
        alive = torch.empty(steps, copies, n, dtype=dtype, device=device)
        values = torch.empty(steps + 1, copies, n, dtype=dtype, device=device)
        episodes = []
        obs, state = pool.obs.to(device, dtype), pool.state.to(device, dtype)
        for t in range(steps):
            dist = self._distribution(obs.transpose(0, 1))
            action = dist.sample()
            obs_buffer[t], actions[t] = obs, action.transpose(0, 1)
            old_log_prob[t] = self.head.log_prob(dist, action).transpose(0, 1)
            values[t] = self._returns_of(self._values(state))
            alive[t] = pool.alive
            step = pool.step(self.head.env_actions(action).transpose(0, 1))
            rewards[t], dones[t] = step.reward, step.done
            # A time limit is not a terminal state: the value of the state it cut off is added to the last reward.
            cut_off = step.done * (1.0 - step.terminated)
            cut_copies = cut_off.any(1).nonzero().flatten()
            if len(cut_copies) and c.bootstrap_time_limit:
                final_values = self._returns_of(self._values(step.final_state[cut_copies].to(device, dtype)))
                rewards[t, cut_copies] += c.gamma * final_values * cut_off[cut_copies]
            episodes += step.finished
            obs, state = step.obs.to(device, dtype), step.state.to(device, dtype)
        values[steps] = self._returns_of(self._values(state))
        self.env_steps += steps * self.copies_per_iteration
        advantages = generalized_advantages(rewards, values, dones, c.gamma, c.gae_lambda)
        obs_rows = obs_buffer.flatten(0, 1)
        batch = {
            "obs": obs_rows,  # [T * copies, agents, obs]
            "state": obs_rows.flatten(1),  # a view: every agent's observation
            "actions": actions.flatten(0, 1),
            "old_log_prob": old_log_prob.flatten(0, 1),
            "advantages": advantages.flatten(0, 1),
            "targets": (advantages + values[:-1]).flatten(0, 1),
            "alive": alive.flatten(0, 1),
        }
        return batch, episodes
