"""One team trained against an opponent policy (kpg.envs.TeamControl): on a toy two-team
environment, and MAgent2's battle through ``kpg train`` with batched per-agent actors."""

import math

import numpy as np
import pytest

from kpg.algos.mappo import MAPPOConfig
from kpg.app.train import TrainConfig, build_trainer, train
from kpg.envs import EnvPool, TeamControl, make_env_factory, random_opponent

from helpers import TwoTeams, opponent_plays_time


def test_team_control_exposes_one_team_and_plays_the_opponent():
    pool = EnvPool(lambda: TeamControl(TwoTeams(), "red", opponent_plays_time), copies=2, seed=0)
    assert pool.spaces.names == ["red_0", "red_1"] and pool.spaces.state_size == 6  # the state holds both teams
    first = pool.step(np.array([[1, 2], [0, 0]]))
    np.testing.assert_array_equal(first.reward, [[1, 2], [0, 0]])  # the opponent's reward is not the team's
    # blue_0 saw time 0 and played 0; every agent observes (its last action, time).
    np.testing.assert_array_equal(first.state[0], [1, 1, 2, 1, 0, 1])
    second = pool.step(np.array([[1, 1], [1, 1]]))
    np.testing.assert_array_equal(second.state[:, 4], [1, 1])  # blue_0 played its observed time, 1
    # red_1 is killed at step 2: done, not alive, no next observation; its teammate goes on.
    np.testing.assert_array_equal(second.terminated, [[0, 1], [0, 1]])
    np.testing.assert_array_equal(second.alive, [[1, 0], [1, 0]])
    np.testing.assert_array_equal(second.next_present, [[1, 0], [1, 0]])
    third = pool.step(np.array([[2, 2], [2, 2]]))
    np.testing.assert_array_equal(third.reward, [[2, 0], [2, 0]])  # the dead agent's action is not taken
    fourth = pool.step(np.array([[0, 0], [0, 0]]))
    assert [e["length"] for e in fourth.finished] == [4, 4]
    np.testing.assert_array_equal(fourth.alive, [[1, 1], [1, 1]])  # both copies reset


def test_team_control_defaults_to_the_first_team_and_names_the_teams():
    env = TeamControl(TwoTeams(), None, random_opponent)
    assert env.team == "red" and env.possible_agents == ["red_0", "red_1"]
    assert TeamControl(TwoTeams(), "blue", random_opponent).possible_agents == ["blue_0"]
    with pytest.raises(ValueError, match="no agent of team 'green'; the environment's teams are blue, red"):
        TeamControl(TwoTeams(), "green", random_opponent)


def test_random_opponent_is_seeded_by_the_episode():
    observations = {f"blue_{i}": np.zeros(2, np.float32) for i in range(50)}
    env = TwoTeams()
    draws = [random_opponent(observations, env, np.random.default_rng(seed)) for seed in (7, 7, 8)]
    assert draws[0] == draws[1] != draws[2] and set(draws[0].values()) == {0, 1, 2}


def test_unknown_opponent_names_the_choices():
    with pytest.raises(ValueError, match="unknown opponent 'scripted'; use random or module:callable"):
        make_env_factory("magent2:battle_v4", opponent="scripted")


def test_magent2_battle_trains_one_team_with_batched_actors(tmp_path):
    pytest.importorskip("magent2")
    factory = make_env_factory(
        "magent2:battle_v4", map_size=16, team="blue", opponent="helpers:opponent_plays_first_action"
    )
    pool = EnvPool(factory, copies=1, seed=0)
    assert pool.spaces.num_agents == 6 and all(name.startswith("blue_") for name in pool.spaces.names)
    assert pool.spaces.homogeneous and pool.spaces.obs_size == 13 * 13 * 5 and pool.spaces.state_size == 16 * 16 * 5
    step = pool.step(np.zeros((1, 6), dtype=np.int64))  # red plays the scripted opponent
    assert step.reward.shape == (1, 6) and step.alive.all() and len(pool.envs[0].env.agents) == 12
    mappo = MAPPOConfig(rollout=50, epochs=1, minibatches=2, hidden=(16,), share_actor=False, others="geometric")
    config = TrainConfig(
        env="magent2:battle_v4",
        agents=None,
        env_options={"map_size": "16", "max_cycles": "60"},
        k=2,
        steps=300,
        copies=2,
        logdir=tmp_path,
        progress=False,
        tensorboard=False,
        eval_episodes=1,
        checkpoint_every=0,
        mappo=mappo,
    )
    _, trainer = build_trainer(config)
    assert trainer.actor.layout == "batched" and trainer.actor_optimizer.arena.is_batched
    summary = train(config)
    assert summary["agents"] == 6 and summary["env_steps"] == 300 and len(summary["actor_level_seconds"]) == 2
    assert math.isfinite(summary["recent_return"]) and math.isfinite(summary["eval_return"])
