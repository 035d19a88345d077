"""VMAS through ``kpg train --env vmas:SCENARIO`` (kpg[vmas]): the adapter's shapes, the end and reset
of copies' episodes, the tensor rollout of K-MAPPO, a short run per scenario family and the message
without the extra."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from kpg.algos import FACMACConfig, MADDPGConfig
from kpg.algos.mappo import MAPPOConfig
from kpg.app.train import TrainConfig, build_trainer, train
from kpg.envs import make_pool

needs_vmas = pytest.mark.skipif(
    importlib.util.find_spec("vmas") is None, reason="VMAS needs the vmas extra: pip install 'kpg[vmas]'"
)
COPIES = 6


def test_without_the_extra_the_error_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "vmas", None)  # import vmas now fails, as where it is not installed
    monkeypatch.delitem(sys.modules, "kpg.envs.vmas", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'kpg\[vmas\]'"):
        make_pool("vmas:navigation", 2, seed=0)
    monkeypatch.delitem(sys.modules, "kpg.envs.vmas", raising=False)


@needs_vmas
def test_pool_shapes_continuous_and_discrete():
    from kpg.envs.vmas import VMASPool

    pool = VMASPool("navigation", COPIES, seed=0, agents=3)
    n, spaces = 3, pool.spaces
    assert spaces.num_agents == n and not spaces.discrete and spaces.action_size == 2
    assert pool.obs.shape == (COPIES, n, spaces.obs_size) and pool.obs.dtype == torch.float32
    assert pool.state.shape == (COPIES, spaces.state_size) == (COPIES, n * spaces.obs_size)
    torch.testing.assert_close(pool.state, pool.obs.flatten(1))
    step = pool.step(torch.zeros(COPIES, n, 2))
    assert step.obs.shape == pool.obs.shape and step.reward.shape == step.done.shape == (COPIES, n)
    assert step.alive.shape == (COPIES, n) and bool((step.alive == 1).all())
    # VMAS's discrete actions: each axis's force -, 0 or +, 3 x 3 of them.
    discrete = VMASPool("simple_spread", COPIES, seed=0, agents=4, continuous=False)
    assert discrete.spaces.discrete and discrete.spaces.action_size == 9 and discrete.obs.shape[:2] == (COPIES, 4)
    assert discrete.step(torch.zeros(COPIES, 4, dtype=torch.long)).reward.shape == (COPIES, 4)
    with pytest.raises(ValueError, match=r"expected \(6, 4\)"):
        discrete.step(torch.zeros(COPIES, 3, dtype=torch.long))


@needs_vmas
def test_bad_scenario_and_options_are_named():
    from kpg.envs.vmas import VMASPool

    with pytest.raises(ValueError, match="unknown VMAS scenario 'navigatoin'.*vmas:navigation"):
        VMASPool("navigatoin", 2, seed=0)
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        VMASPool("navigation", 2, seed=0, max_steps=0)
    with pytest.raises(ValueError, match="copies must be >= 1"):
        VMASPool("navigation", 0, seed=0)


@needs_vmas
def test_time_limit_ends_every_copy_and_resets_them_in_one_call():
    from kpg.envs.vmas import VMASPool

    pool = VMASPool("navigation", COPIES, seed=1, agents=2, max_steps=3)
    resets_before = pool.resets
    for t in range(3):
        step = pool.step(torch.zeros(COPIES, 2, 2))
        assert bool((step.done == (1.0 if t == 2 else 0.0)).all())
    # Ended by the time limit, not by the task: the trainer bootstraps the final state's value.
    assert bool((step.terminated == 0).all()) and len(step.finished) == COPIES
    assert all(e["length"] == 3 for e in step.finished)
    assert pool.resets == resets_before + 1  # one reset call for all copies
    assert not torch.equal(step.final_obs, step.obs)  # new episodes: agents and goals placed anew
    torch.testing.assert_close(step.final_state, step.final_obs.flatten(1))
    assert pool.at_episode_start


@needs_vmas
def test_ended_copies_reset_alone_and_the_others_go_on():
    from kpg.envs.vmas import VMASPool

    pool = VMASPool("navigation", COPIES, seed=2, agents=2, max_steps=50)
    step = pool.step(torch.ones(COPIES, 2, 2))
    before = step.obs
    ended = torch.tensor([1, 4])
    after = pool._reset(ended, before)
    kept = torch.tensor([0, 2, 3, 5])
    torch.testing.assert_close(after[kept], before[kept])
    assert not torch.equal(after[ended], before[ended])
    assert pool.env.steps[ended].eq(0).all() and pool.env.steps[kept].eq(1).all()
    assert pool.resets == 2  # one per ended copy
    # The reset copies' observations are those of their new world.
    fresh = torch.stack(pool.env.get_from_scenario(True, False, False, False)[0], dim=1)
    torch.testing.assert_close(after, fresh)


@needs_vmas
def test_navigation_spawning_area_grows_with_the_agents():
    from kpg.envs.vmas import VMASPool, scenario_options

    assert scenario_options("navigation", 4, {})["world_spawning_x"] == 1.0
    assert scenario_options("navigation", 256, {})["world_spawning_y"] == 8.0
    assert scenario_options("navigation", 64, {"world_spawning_x": 2})["world_spawning_x"] == 2
    assert "world_spawning_x" not in scenario_options("balance", 64, {})
    # 48 agents did not get past spawning with the default square (half-width 1); here it is 3.5.
    pool = VMASPool("navigation", 4, seed=0, agents=48)
    assert pool.obs.shape[:2] == (4, 48)


def vmas_config(scenario: str, tmp_path, **changes) -> TrainConfig:
    mappo = MAPPOConfig(rollout=5, epochs=2, minibatches=2, hidden=(16, 16))
    settings = dict(
        env=f"vmas:{scenario}",
        agents=3,
        copies=8,
        steps=80,
        logdir=tmp_path,
        eval_episodes=2,
        env_options={"max_steps": "7"},
        progress=False,
        tensorboard=False,
        mappo=mappo,
    )
    return TrainConfig(**{**settings, **changes})


@needs_vmas
def test_the_rollout_stays_tensors(tmp_path):
    config = vmas_config("navigation", tmp_path, env_options={"max_steps": "4"})
    pool, trainer = build_trainer(config)
    batch, episodes = trainer._collect()
    rows, n = 5 * 8, 3
    assert batch["obs"].shape == (rows, n, pool.spaces.obs_size) and batch["actions"].shape == (rows, n, 2)
    assert all(isinstance(value, torch.Tensor) for value in batch.values())
    assert batch["state"].data_ptr() == batch["obs"].data_ptr()  # the critic's input is a view, not a copy
    assert len(episodes) == 8  # every copy ended once (step 4 of 5)


def _collect_with_values_of_two(config: TrainConfig):
    """One rollout of ``config``'s MAPPO trainer with the critic's value fixed at 2 everywhere (3
    agents): the trainer, its batch and every step the pool returned."""
    pool, trainer = build_trainer(config)
    trainer.returns.denormalize = lambda values: values
    trainer._values = lambda state: torch.full((state.shape[0], 3), 2.0)
    seen, step = [], pool.step
    pool.step = lambda actions: seen.append(step(actions)) or seen[-1]
    batch, _ = trainer._collect()
    return trainer, batch, seen


@needs_vmas
def test_the_time_limit_bootstraps_the_value_of_the_state_it_cut_off(tmp_path):
    """With V = 2 everywhere, GAE over the rewards seen, where step 4's reward gains gamma * 2 (the time
    limit cut an episode that would have gone on) and the recursion stops after it."""
    config = vmas_config("navigation", tmp_path, env_options={"max_steps": "4"})
    trainer, batch, seen = _collect_with_values_of_two(config)
    n, gamma, lam = 3, trainer.config.gamma, trainer.config.gae_lambda
    rewards = torch.stack([s.reward for s in seen])
    dones = torch.stack([s.done for s in seen])
    assert dones[3].eq(1).all() and dones[[0, 1, 2, 4]].eq(0).all()
    expected = torch.zeros(5, 8, n)
    running = torch.zeros(8, n)
    for t in reversed(range(5)):
        reward = rewards[t] + (gamma * 2.0 if t == 3 else 0.0)
        next_value = 0.0 if t == 3 else 2.0
        running = reward + gamma * next_value - 2.0 + (0.0 if t == 3 else gamma * lam * running)
        expected[t] = running
    torch.testing.assert_close(batch["advantages"].view(5, 8, n), expected)
    torch.testing.assert_close(batch["targets"].view(5, 8, n), expected + 2.0)


@needs_vmas
@pytest.mark.parametrize("scenario", ["navigation", "balance", "transport", "simple_spread"])
def test_kpg_train_runs_each_scenario_family(tmp_path, scenario):
    summary = train(vmas_config(scenario, tmp_path))
    assert summary["env_steps"] == 80 and summary["agents"] == 3 and summary["updates"] == 2
    assert len(summary["actor_level_seconds"]) == 2  # k=2
    assert summary["recent_return"] is not None and torch.isfinite(torch.tensor(summary["eval_return"]))
    run = json.loads((tmp_path / f"mappo-vmas_{scenario}-k2-s0" / "summary.json").read_text())
    assert run["env"] == f"vmas:{scenario}"


@needs_vmas
def test_resume_continues_a_vmas_run(tmp_path):
    config = vmas_config("navigation", tmp_path, eval_episodes=0)
    train(config)
    summary = train(dataclasses.replace(config, steps=160, resume=True))
    assert summary["env_steps"] == 160 and summary["updates"] == 4


@needs_vmas
def test_a_run_saved_on_two_ranks_resumes_on_one():
    """torchrun with another number of ranks: the pool takes the totals of all ranks' states; each
    rank's reset counter carries over, and the copies must add up."""
    from kpg.app.resume import resharded_pool_state
    from kpg.envs.vmas import VMASPool

    saved = []
    for rank in range(2):
        pool = VMASPool("navigation", 2, seed=rank, agents=2, max_steps=2)
        for _ in range(5):
            pool.step(torch.zeros(2, 2, 2))
        saved.append(pool.state_dict())
    assert saved[0]["resets"] > 0
    single = VMASPool("navigation", 4, seed=0, agents=2, max_steps=2)
    state = resharded_pool_state(saved, single, rank=0, world_size=1)
    assert state == {"scenario": "navigation", "copies": 4, "seed": 0, "resets": saved[0]["resets"]}
    single.load_state_dict(state)
    assert single.at_episode_start and single.step(torch.zeros(4, 2, 2)).reward.shape == (4, 2)
    with pytest.raises(ValueError, match="with 4 copies in all, this run 'navigation' with 6; resume with the same"):
        resharded_pool_state(saved, VMASPool("navigation", 6, seed=0, agents=2), rank=0, world_size=1)


@needs_vmas
def test_recurrent_mappo_is_refused_with_the_reason(tmp_path):
    recurrent = dataclasses.replace(MAPPOConfig(), recurrent=True)
    with pytest.raises(ValueError, match="without --mappo.recurrent .*--algo maddpg or --algo facmac"):
        build_trainer(vmas_config("navigation", tmp_path, mappo=recurrent))


# ---- K-MADDPG and K-FACMAC: the off-policy trainers step VMAS's tensors ----------------------------------

OFF_POLICY_CONFIGS = {"maddpg": MADDPGConfig, "facmac": FACMACConfig}


def off_policy_config(algo: str, scenario: str, tmp_path, trainer_options=(), **changes) -> TrainConfig:
    """200 steps of 8 copies: five iterations of 5 steps, the first two with random actions, then two
    gradient steps after each from the second on (learning_starts)."""
    options = dict(
        buffer_size=1_000, batch_size=32, rollout=5, updates_per_iteration=2, learning_starts=80, hidden=(16,)
    )
    if algo == "facmac":
        options.update(mixer_embed=4, hypernet_embed=8)
    options.update(trainer_options)
    settings = dict(algo=algo, steps=200, **{algo: OFF_POLICY_CONFIGS[algo](**options)})
    return vmas_config(scenario, tmp_path, **{**settings, **changes})


@needs_vmas
@pytest.mark.parametrize("algo", ["maddpg", "facmac"])
def test_off_policy_trainers_build_on_vmas_pools(tmp_path, algo):
    pool, trainer = build_trainer(off_policy_config(algo, "navigation", tmp_path))
    assert type(trainer).__name__ == {"maddpg": "MADDPGTrainer", "facmac": "FACMACTrainer"}[algo]
    assert trainer.tensor_pool and trainer.pool is pool
    actions = trainer.act(pool.obs)
    assert isinstance(actions, torch.Tensor) and actions.shape == (8, 3, 2)
    assert bool((actions.abs() <= 1.0).all())  # navigation's forces span [-1, 1]


@needs_vmas
def test_off_policy_replay_keeps_the_final_observation_at_the_time_limit(tmp_path):
    """Step 4 of 5 reaches the time limit: its row's next observation is the episode's last one, not the
    reset's, and it is not terminal; the next row starts the new episode."""
    config = off_policy_config(
        "maddpg", "navigation", tmp_path, env_options={"max_steps": "4"}, trainer_options={"learning_starts": 1_000}
    )
    pool, trainer = build_trainer(config)
    sent, seen, step = [], [], pool.step
    pool.step = lambda actions: sent.append(actions) or seen.append(step(actions)) or seen[-1]
    trainer._collect()
    assert all(isinstance(actions, torch.Tensor) for actions in sent)  # no trip through NumPy
    rows = {name: value[:40].view(5, 8, *value.shape[1:]) for name, value in trainer.buffer.storage.items()}
    assert len(trainer.buffer) == 40
    cut = seen[3]
    assert cut.done.eq(1).all() and cut.terminated.eq(0).all()
    torch.testing.assert_close(rows["next_obs"][3], cut.final_obs)
    assert rows["terminated"][3].eq(0).all() and rows["next_present"][3].eq(1).all()  # the target bootstraps
    torch.testing.assert_close(rows["obs"][4], cut.obs)  # the new episode's first observation
    assert not torch.equal(rows["obs"][4], rows["next_obs"][3])
    torch.testing.assert_close(rows["next_obs"][:3], rows["obs"][1:4])  # mid-episode: the next row's
    torch.testing.assert_close(rows["reward"], torch.stack([s.reward for s in seen]))
    low, high = trainer.action_bounds
    torch.testing.assert_close(torch.stack(sent), low + (rows["actions"] + 1.0) * 0.5 * (high - low))
    # The state is every agent's observation: stored once, read as a view of the sampled observations.
    assert "state" not in rows and "next_state" not in rows
    batch = trainer.sample(16)
    assert batch["state"].data_ptr() == batch["obs"].data_ptr()
    torch.testing.assert_close(batch["next_state"], batch["next_obs"].flatten(1))


@needs_vmas
def test_off_policy_replay_stores_a_task_end_as_terminal(tmp_path):
    """Copies 1 and 4 end by the task at the second step: their rows are terminal, without a next
    observation to act on, and only those copies start again."""
    pool, trainer = build_trainer(
        off_policy_config("facmac", "navigation", tmp_path, trainer_options={"rollout": 2, "learning_starts": 1_000})
    )
    ended = torch.zeros(8, dtype=torch.bool)
    ended[[1, 4]] = True
    calls = iter([torch.zeros(8, dtype=torch.bool), ended])
    pool.env.scenario.done = lambda: next(calls)
    resets_before = pool.resets
    episodes = trainer._collect()
    rows = {name: value[8:16] for name, value in trainer.buffer.storage.items()}  # the second step
    assert rows["terminated"][:, 0].tolist() == ended.float().tolist()
    assert rows["next_present"][:, 0].tolist() == (~ended).float().tolist()
    assert len(episodes) == 2 and pool.resets == resets_before + 2
    assert rows["terminated"].sum() == 2 * 3 and trainer.buffer.storage["terminated"][:8].sum() == 0


@needs_vmas
@pytest.mark.parametrize(
    ("algo", "scenario", "env_options"),
    [
        ("maddpg", "navigation", {}),
        ("facmac", "navigation", {}),
        # VMAS's discrete actions go through the straight-through Gumbel-softmax, as PettingZoo's do.
        ("maddpg", "simple_spread", {"continuous": "false"}),
        ("facmac", "balance", {}),
    ],
)
def test_off_policy_kpg_train_on_vmas(tmp_path, algo, scenario, env_options):
    config = off_policy_config(algo, scenario, tmp_path, env_options={"max_steps": "7", **env_options})
    summary = train(config)
    assert summary["env_steps"] == 200 and summary["agents"] == 3 and summary["updates"] == 5
    assert len(summary["actor_level_seconds"]) == 2  # k=2
    assert summary["recent_return"] is not None and torch.isfinite(torch.tensor(summary["eval_return"]))
    rows = list(csv.DictReader((tmp_path / summary["run"] / "metrics.csv").read_text().splitlines()))
    assert [int(float(row["gradient_steps"])) for row in rows] == [0, 2, 4, 6, 8]
    assert all(math.isfinite(float(rows[-1][name])) for name in ("critic_loss", "actor_loss", "q_mean"))


@needs_vmas
@pytest.mark.parametrize("checkpoint_replay", [True, False])
def test_off_policy_resume_continues_a_vmas_run(tmp_path, checkpoint_replay):
    """The replay rows come back with the checkpoint (or, without them, the buffer refills); the episodes
    start afresh (VMAS cannot save a world), so the resumed run does not repeat the first one exactly."""
    config = off_policy_config("maddpg", "navigation", tmp_path, eval_episodes=0, checkpoint_replay=checkpoint_replay)
    train(dataclasses.replace(config, steps=120))
    summary = train(dataclasses.replace(config, resume=True))
    assert summary["env_steps"] == 200 and summary["updates"] == 5
    rows = list(csv.DictReader((tmp_path / summary["run"] / "metrics.csv").read_text().splitlines()))
    assert [int(float(row["env_steps"])) for row in rows] == [40, 80, 120, 160, 200]
    assert [int(float(row["gradient_steps"])) for row in rows] == [0, 2, 4, 6, 8]
    sizes = [int(float(row["buffer_size"])) for row in rows]
    assert sizes == ([40, 80, 120, 160, 200] if checkpoint_replay else [40, 80, 120, 40, 80])


BENCHMARL_PRESET = Path(__file__).resolve().parent.parent / "configs" / "vmas_benchmarl.toml"


def test_benchmarl_preset_loads_with_benchmarls_mappo():
    from kpg.app.cli import _from_dict, _read_config_file
    from kpg.app.compare import CompareConfig

    compare = _from_dict(CompareConfig, _read_config_file(BENCHMARL_PRESET))
    train, mappo = compare.train, compare.train.mappo
    assert compare.ks == (1, 2) and compare.seeds == (0, 1, 2)
    assert (train.env, train.agents, train.steps) == ("vmas:navigation", 3, 300_000)
    assert (mappo.action_scale, mappo.squash, mappo.init) == ("state", True, "torch")
    assert not mappo.normalize_advantages and not mappo.normalize_returns and mappo.entropy_coef == 0


LIGHT_PRESET = BENCHMARL_PRESET.with_name("vmas_kpg.toml")


def test_light_preset_keeps_every_mappo_value_but_the_rollout_at_kpgs_default():
    """configs/vmas_kpg.toml says it is kpg's defaults on BenchMARL's tasks: only the rollout (60 copies x 100 steps
    = BenchMARL's 6000 frames per iteration) and the run's own keys differ."""
    from kpg.app.cli import _from_dict, _read_config_file
    from kpg.app.compare import CompareConfig

    preset = _from_dict(CompareConfig, _read_config_file(LIGHT_PRESET)).train
    default = type(preset)()
    assert dataclasses.replace(preset.mappo, rollout=default.mappo.rollout) == default.mappo
    assert preset.copies * preset.mappo.rollout == 6000 and (preset.env, preset.agents) == ("vmas:navigation", 3)
    changed = {f.name for f in dataclasses.fields(preset) if getattr(preset, f.name) != getattr(default, f.name)}
    assert changed == {"env", "copies", "steps", "eval_episodes", "checkpoint_every", "progress", "mappo"}


def _benchmarl_config(relative: str) -> dict:
    yaml = pytest.importorskip("yaml")
    spec = importlib.util.find_spec("benchmarl")
    if spec is None:
        pytest.skip("BenchMARL's config files come with the benchmarl extra: pip install 'kpg[benchmarl]'")
    return yaml.safe_load((Path(spec.submodule_search_locations[0]) / "conf" / relative).read_text())


def test_benchmarl_preset_takes_its_values_from_benchmarls_own_files():
    """Every value the preset names against BenchMARL's files, read from those files. BenchMARL's on-policy loop
    (Experiment._collection_loop) runs on_policy_n_minibatch_iters passes, each of frames / minibatch_size
    minibatches drawn without replacement: 45 epochs of 15 minibatches, not 45 minibatches in all."""
    from kpg.app.cli import _from_dict, _read_config_file
    from kpg.app.compare import CompareConfig

    experiment = _benchmarl_config("experiment/base_experiment.yaml")
    algorithm = _benchmarl_config("algorithm/mappo.yaml")
    layers = _benchmarl_config("model/layers/mlp.yaml")
    task = _benchmarl_config("task/vmas/navigation.yaml")
    train = _from_dict(CompareConfig, _read_config_file(BENCHMARL_PRESET)).train
    mappo = train.mappo
    frames = experiment["on_policy_collected_frames_per_batch"]
    assert train.copies * mappo.rollout == frames
    assert mappo.minibatches == frames // experiment["on_policy_minibatch_size"]
    assert mappo.epochs == experiment["on_policy_n_minibatch_iters"]
    assert mappo.lr == mappo.critic_lr == experiment["lr"] and mappo.adam_eps == experiment["adam_eps"]
    assert experiment["clip_grad_norm"] and mappo.max_grad_norm == experiment["clip_grad_val"]
    assert mappo.gamma == experiment["gamma"] and mappo.share_actor == experiment["share_policy_params"]
    assert (mappo.gae_lambda, mappo.clip_eps, mappo.entropy_coef) == (
        algorithm["lmbda"],
        algorithm["clip_epsilon"],
        algorithm["entropy_coef"],
    )
    assert mappo.squash == algorithm["use_tanh_normal"] and mappo.shared_value == algorithm["share_param_critic"]
    assert algorithm["scale_mapping"] == f"biased_softplus_{mappo.scale_bias}" and not algorithm["minibatch_advantage"]
    assert list(mappo.hidden) == layers["num_cells"] and layers["activation_class"] == "torch.nn.Tanh"
    assert (train.env, train.agents) == ("vmas:navigation", task["n_agents"]) and task["max_steps"] == 100


@needs_vmas
@pytest.mark.parametrize(
    "env, agents, env_options",
    [("vmas:navigation", 3, {"shared_rew": "false"}), ("vmas:balance", 4, {})],
    ids=["navigation", "balance"],
)
def test_benchmarl_preset_trains_two_updates(tmp_path, env, agents, env_options):
    from kpg.app.cli import _from_dict, _read_config_file
    from kpg.app.compare import CompareConfig

    preset = _from_dict(CompareConfig, _read_config_file(BENCHMARL_PRESET)).train
    config = dataclasses.replace(
        preset,
        env=env,
        agents=agents,
        env_options=env_options,
        copies=2,
        steps=400,
        logdir=tmp_path,
        eval_episodes=1,
        tensorboard=False,
        mappo=dataclasses.replace(preset.mappo, epochs=1),  # the preset's 45 passes take minutes here
    )
    summary = train(config)
    assert summary["updates"] == 2 and summary["env_steps"] == 400 and summary["agents"] == agents
    assert math.isfinite(summary["eval_return"])


@needs_vmas
def test_without_return_normalization_the_tensor_rollout_uses_raw_values(tmp_path):
    config = vmas_config("navigation", tmp_path, env_options={"max_steps": "4"})
    config = dataclasses.replace(config, mappo=dataclasses.replace(config.mappo, normalize_returns=False))
    pool, trainer = build_trainer(config)
    trainer._values = lambda state: torch.full((state.shape[0], 3), 2.0)
    batch, _ = trainer._collect()
    torch.testing.assert_close(batch["targets"] - batch["advantages"], torch.full_like(batch["targets"], 2.0))


@needs_vmas
def test_without_time_limit_bootstrap_the_time_limit_ends_the_episode_like_a_terminal_state(tmp_path):
    """bootstrap_time_limit off (BenchMARL's GAE through TorchRL's VmasEnv): with V = 2 everywhere, step 4's
    reward gains nothing at the time limit and the recursion still stops after it."""
    config = vmas_config("navigation", tmp_path, env_options={"max_steps": "4"})
    config = dataclasses.replace(config, mappo=dataclasses.replace(config.mappo, bootstrap_time_limit=False))
    trainer, batch, seen = _collect_with_values_of_two(config)
    n, gamma, lam = 3, trainer.config.gamma, trainer.config.gae_lambda
    rewards = torch.stack([s.reward for s in seen])
    expected = torch.zeros(5, 8, n)
    running = torch.zeros(8, n)
    for t in reversed(range(5)):
        next_value = 0.0 if t == 3 else 2.0
        running = rewards[t] + gamma * next_value - 2.0 + (0.0 if t == 3 else gamma * lam * running)
        expected[t] = running
    torch.testing.assert_close(batch["advantages"].view(5, 8, n), expected)
