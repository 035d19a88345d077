"""JaxMARL's SMAX as the authors of K-MAPPO ran it, all copies stepped in one compiled call.

``SMAXPool(map_name, copies, seed)`` holds ``copies`` copies of ``HeuristicEnemySMAX`` (the
built-in heuristic enemy; by default ``see_enemy_actions``, ``walls_cause_death`` and
``attack_mode="closest"``, the authors' settings) and steps them with one ``jax.jit(jax.vmap(...))``
call that also resets finished copies, reads the next available-action masks and tracks episode
returns and wins. Everything the trainer needs from a step leaves JAX as one float32 array,
converted once and split into torch views, so no Python work is done per copy or per agent.

Threads: on a small CPU JAX and torch share the cores. Importing this module sets ``XLA_FLAGS`` to
run XLA's CPU operations on one thread (unless ``XLA_FLAGS`` is already set or JAX already
imported); torch's threads are ``kpg train --threads`` (default 1).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kpg.envs.pettingzoo import AgentSpaces

SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
if "jax" not in sys.modules:
    os.environ.setdefault("XLA_FLAGS", SINGLE_THREAD_XLA)

try:
    import jax
    import jax.numpy as jnp
    from jaxmarl.environments.smax import HeuristicEnemySMAX, map_name_to_scenario
except ImportError as error:
    raise ImportError(f"smax: environments need JaxMARL and JAX: pip install 'kpg[smax]' ({error})") from None

# The packages that ran the environment, for each run's summary.json: SMAX changed between JaxMARL
# releases (0.0.7, the authors', against 0.2.0, kpg[smax]'s), so a result names the one it ran on.
VERSIONS = {name: importlib.metadata.version(name) for name in ("jaxmarl", "jax", "jaxlib")}

# Compiling a map's step takes tens of seconds on a small CPU: keep the compiled code on disk for
# the next run and the resumes (JAX_COMPILATION_CACHE_DIR, or jax's config, chooses another place).
if jax.config.jax_compilation_cache_dir is None:
    jax.config.update(
        "jax_compilation_cache_dir",
        os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "kpg", "jax"),
    )

# The authors' HeuristicEnemySMAX settings (cheap-talk, config_ik2m_inner.yaml ENV_KWARGS).
AUTHORS_OPTIONS = {"see_enemy_actions": True, "walls_cause_death": True, "attack_mode": "closest"}


@dataclass
class SMAXStep:
    """One step of every copy; the pool's ``obs``, ``state`` and ``avail`` are already the next step's."""

    reward: torch.Tensor  # [copies, agents]
    done: torch.Tensor  # [copies, agents] float: the agent's episode ended (killed, or the copy's episode ended)
    episode_done: torch.Tensor  # [copies] float: the copy's episode ended at this step (it has been reset)
    won: torch.Tensor  # [copies] float: the episode that ended was won
    finished: list[dict[str, float]] = field(default_factory=list)  # {"return", "length", "won"} per ended episode


class SMAXPool:
    """``copies`` SMAX copies of map ``map_name`` (``3s_vs_5z``, ``2s3z``, ...) with ``options`` of
    ``HeuristicEnemySMAX`` over :data:`AUTHORS_OPTIONS`. Current ``obs`` [copies, agents, obs_size],
    ``state`` (SMAX's world state) [copies, state_size] and ``avail`` (available actions, bool)
    [copies, agents, actions] are torch tensors; ``step(actions)`` takes [copies, agents] indices."""

    def __init__(self, map_name: str, copies: int, seed: int, **options: Any):
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        try:
            scenario = map_name_to_scenario(map_name)
        except (KeyError, ValueError) as error:
            raise ValueError(f"unknown SMAX map {map_name!r} ({error}); e.g. smax:3s_vs_5z, smax:2s3z") from None
        self.env = HeuristicEnemySMAX(scenario=scenario, **{**AUTHORS_OPTIONS, **options})
        self.map_name, self.copies, self.seed = map_name, copies, seed
        self.versions = dict(VERSIONS)
        env = self.env
        self.agent_names = list(env.agents)
        n = len(self.agent_names)
        obs_size = int(env.observation_space(self.agent_names[0]).shape[0])
        actions = int(env.action_space(self.agent_names[0]).n)
        self._key = jax.random.PRNGKey(seed)
        self._key, reset_key = jax.random.split(self._key)
        obs, env_state = jax.vmap(env.reset)(jax.random.split(reset_key, copies))
        # Strongly typed, as the step returns it, so that the step compiles once and not again at the second call.
        self._env_state = jax.tree.map(lambda x: jnp.asarray(x, dtype=x.dtype), env_state)
        state_size = int(obs["world_state"].shape[-1])
        self.spaces = AgentSpaces(self.agent_names, [obs_size] * n, True, [actions] * n, None, None, state_size)
        self._episode = (jnp.zeros(copies), jnp.zeros(copies, dtype=jnp.int32))  # return and length so far
        self._sizes = [n * obs_size, state_size, n * actions, n, n, 1, 1, 1, 1]
        self._step = jax.jit(self._step_all)
        self._unpack(np.array(jax.jit(self._pack_reset)(obs, self._env_state)))

    # ---- the compiled step of all copies ---------------------------------------------------

    def _observe(self, obs: dict, env_state: Any) -> list[jax.Array]:
        avail = jax.vmap(self.env.get_avail_actions)(env_state)
        per_agent = lambda values: jnp.stack([values[a] for a in self.agent_names], axis=1)  # noqa: E731
        c = self.copies
        return [per_agent(obs).reshape(c, -1), obs["world_state"], per_agent(avail).reshape(c, -1)]

    def _pack_reset(self, obs: dict, env_state: Any) -> jax.Array:
        zeros = jnp.zeros((self.copies, sum(self._sizes[3:])))
        return jnp.concatenate([*self._observe(obs, env_state), zeros], axis=1).astype(jnp.float32)

    def _step_all(self, key, env_state, episode, actions):
        key, step_key = jax.random.split(key)
        env_actions = {name: actions[:, i] for i, name in enumerate(self.agent_names)}
        obs, env_state, reward, done, _ = jax.vmap(self.env.step)(
            jax.random.split(step_key, self.copies), env_state, env_actions
        )
        per_agent = lambda values: jnp.stack([values[a] for a in self.agent_names], axis=1)  # noqa: E731
        reward, episode_done = per_agent(reward), done["__all__"]
        # SMAX's team reward is every agent's; a won battle pays its bonus of 1 at the last step.
        episode_return, episode_length = episode[0] + reward[:, 0], episode[1] + 1
        won = episode_done & (reward[:, 0] >= 1.0)
        packed = jnp.concatenate(
            [
                *self._observe(obs, env_state),
                reward,
                per_agent(done),
                episode_done[:, None],
                won[:, None],
                episode_return[:, None],
                episode_length[:, None],
            ],
            axis=1,
        ).astype(jnp.float32)
        kept = (episode_return * ~episode_done, episode_length * ~episode_done)
        return key, env_state, kept, packed

    def _unpack(self, packed: np.ndarray) -> list[torch.Tensor]:
        parts = torch.from_numpy(packed).split(self._sizes, dim=1)  # a writable copy: np.array(jax array)
        c, n = self.copies, self.spaces.num_agents
        self.obs = parts[0].view(c, n, -1)
        self.state = parts[1]
        self.avail = parts[2].view(c, n, -1) > 0.5
        return list(parts[3:])

    def step(self, actions: torch.Tensor) -> SMAXStep:
        expected = (self.copies, self.spaces.num_agents)
        if tuple(actions.shape) != expected:
            raise ValueError(
                f"SMAXPool.step got actions of shape {tuple(actions.shape)}; expected {expected} (copies, agents)"
            )
        self._key, self._env_state, self._episode, packed = self._step(
            self._key, self._env_state, self._episode, jnp.asarray(actions.numpy(), dtype=jnp.int32)
        )
        reward, done, episode_done, won, episode_return, episode_length = self._unpack(np.array(packed))
        ended = episode_done[:, 0].nonzero().flatten().tolist()
        finished = [
            {"return": float(episode_return[c, 0]), "length": int(episode_length[c, 0]), "won": float(won[c, 0])}
            for c in ended
        ]
        return SMAXStep(reward, done, episode_done[:, 0], won[:, 0], finished)

    # ---- checkpoints: the whole JAX state, so a resume continues exactly ---------------------

    def state_dict(self) -> dict[str, Any]:
        # Each JAX leaf as its raw bytes with its numpy dtype and shape: checkpoints hold tensors and plain
        # data only (kpg.app.checkpoint), and torch has no tensor type for every JAX dtype (the key's uint32).
        leaves = []
        for leaf in jax.tree.leaves((self._key, self._env_state, self._episode)):
            array = np.ascontiguousarray(np.asarray(leaf))
            raw = torch.from_numpy(array.reshape(-1).view(np.uint8).copy())
            leaves.append({"dtype": array.dtype.str, "shape": list(array.shape), "bytes": raw})
        return {"map": self.map_name, "copies": self.copies, "seed": self.seed, "leaves": leaves}

    def resharded_state(self, pool_states: Sequence[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
        raise ValueError(
            f"a SMAX run resumes on the number of ranks it was saved on ({len(pool_states)}), not {world_size}: "
            "its copies' JAX states are not split between ranks; run torchrun with --nproc-per-node "
            f"{len(pool_states)}"
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("map") != self.map_name or state.get("copies") != self.copies:
            raise ValueError(
                f"the saved SMAX pool ran map {state.get('map')!r} with {state.get('copies')} copies, this one "
                f"{self.map_name!r} with {self.copies}; resume with the same --env and --copies"
            )
        structure = jax.tree.structure((self._key, self._env_state, self._episode))
        leaves = [
            jnp.asarray(leaf["bytes"].numpy().view(np.dtype(leaf["dtype"])).reshape(leaf["shape"]))
            for leaf in state["leaves"]
        ]
        self._key, self._env_state, self._episode = jax.tree.unflatten(structure, leaves)
        obs = jax.vmap(self.env.get_obs)(self._env_state)
        obs["world_state"] = jax.vmap(self.env.get_world_state)(self._env_state)
        self._unpack(np.array(jax.jit(self._pack_reset)(obs, self._env_state)))

    @property
    def at_episode_start(self) -> bool:
        return bool((self._episode[1] == 0).all())

    def close(self) -> None:
        pass
