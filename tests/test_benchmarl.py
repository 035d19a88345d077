"""kpg.benchmarl (kpg[benchmarl]): K-MAPPO inside BenchMARL. At k=1 it is BenchMARL's MAPPO step for
step (the same frames, losses and parameters); at k=2 one minibatch step equals a brute-force K-level
step built from kpg.joint_ratio_loss and torch.optim.Adam; a run resumed from a checkpoint takes the
same steps as the run that wrote it. VMAS navigation with 3 agents, 2 copies x 10 steps per batch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

pytest.importorskip("benchmarl", reason="kpg.benchmarl needs the benchmarl extra: pip install 'kpg[benchmarl]'")
pytest.importorskip("vmas", reason="the BenchMARL tests run VMAS tasks: pip install 'kpg[benchmarl]'")

from benchmarl.algorithms import MappoConfig  # noqa: E402
from benchmarl.environments import VmasTask  # noqa: E402
from benchmarl.experiment import Callback, ExperimentConfig  # noqa: E402
from benchmarl.experiment import Experiment as BenchMARLExperiment  # noqa: E402
from benchmarl.models import MlpConfig  # noqa: E402

import kpg  # noqa: E402
from kpg.benchmarl import Experiment, KMappoConfig  # noqa: E402

from helpers import loaded_module  # noqa: E402

# BenchMARL 1.5.2 builds torchrl 0.11's deprecated SyncDataCollector (its name for Collector).
pytestmark = pytest.mark.filterwarnings("ignore:SyncDataCollector has been deprecated:DeprecationWarning")

GROUP = "agents"
AGENTS = 3
FRAME_KEYS = ((GROUP, "observation"), (GROUP, "action"), (GROUP, "log_prob"), ("next", GROUP, "reward"))


class Recorder(Callback):
    """Every collected batch and every iteration's training losses."""

    def __init__(self):
        super().__init__()
        self.batches, self.training = [], []

    def on_batch_collected(self, batch):
        self.batches.append(batch.clone())

    def on_train_end(self, training_td, group):
        self.training.append(training_td.clone())


def experiment_config(tmp_path, **changes) -> ExperimentConfig:
    config = ExperimentConfig.get_from_yaml()
    tmp_path.mkdir(parents=True, exist_ok=True)
    tiny = dict(
        on_policy_collected_frames_per_batch=20,
        on_policy_n_envs_per_worker=2,
        on_policy_n_minibatch_iters=2,
        on_policy_minibatch_size=10,
        max_n_frames=40,
        loggers=[],
        create_json=False,
        evaluation=False,
        render=False,
        save_folder=str(tmp_path),
    )
    for name, value in {**tiny, **changes}.items():
        setattr(config, name, value)
    return config


def build(experiment_class, algorithm_config, tmp_path, seed=0, callbacks=(), **changes):
    task = VmasTask.NAVIGATION.get_from_yaml()
    task.config.update(max_steps=10, n_agents=AGENTS)
    model = MlpConfig(num_cells=[16, 16], layer_class=torch.nn.Linear, activation_class=torch.nn.Tanh)
    return experiment_class(
        task=task,
        algorithm_config=algorithm_config,
        model_config=model,
        critic_model_config=dataclasses.replace(model),
        seed=seed,
        config=experiment_config(tmp_path, **changes),
        callbacks=list(callbacks),
    )


def kmappo(k: int, **changes) -> KMappoConfig:
    return dataclasses.replace(KMappoConfig.get_from_yaml(), k=k, **changes)


def parameters(experiment) -> dict[str, torch.Tensor]:
    loss = experiment.losses[GROUP]
    return {
        **{f"actor {n}": p.detach().clone() for n, p in loss.actor_network_params.flatten_keys().items()},
        **{f"critic {n}": p.detach().clone() for n, p in loss.critic_network_params.flatten_keys().items()},
    }


@pytest.mark.parametrize("share_policy_params", [True, False], ids=["shared", "per_agent"])
def test_k1_equals_benchmarl_mappo_step_for_step(tmp_path, share_policy_params):
    runs = {}
    for name, experiment_class, algorithm in (
        ("mappo", BenchMARLExperiment, MappoConfig.get_from_yaml()),
        ("kmappo", Experiment, kmappo(k=1)),
    ):
        recorder = Recorder()
        experiment = build(
            experiment_class,
            algorithm,
            tmp_path / name,
            callbacks=[recorder],
            share_policy_params=share_policy_params,
        )
        experiment.run()
        runs[name] = recorder, parameters(experiment)
    (mappo, mappo_params), (ours, our_params) = runs["mappo"], runs["kmappo"]
    assert len(mappo.batches) == len(ours.batches) == 2 and len(mappo.training) == len(ours.training) == 2
    tolerance = dict(rtol=1e-5, atol=1e-6)
    for iteration, (expected, got) in enumerate(zip(mappo.batches, ours.batches)):
        for key in FRAME_KEYS:
            torch.testing.assert_close(got[key], expected[key], **tolerance, msg=f"iteration {iteration} {key}")
    for iteration, (expected, got) in enumerate(zip(mappo.training, ours.training)):
        assert set(got.keys()) == set(expected.keys())
        for key in expected.keys():  # noqa: SIM118 (iterating a TensorDict unbinds its batch)
            torch.testing.assert_close(got[key], expected[key], **tolerance, msg=f"iteration {iteration} {key}")
    assert mappo_params.keys() == our_params.keys()
    for name, value in mappo_params.items():
        torch.testing.assert_close(our_params[name], value, **tolerance, msg=name)
    # Two iterations of training moved the actor (the comparison is not between two untrained runs).
    untrained = build(Experiment, kmappo(k=1), tmp_path / "untrained", share_policy_params=share_policy_params)
    assert any(not torch.equal(untrained_value, our_params[n]) for n, untrained_value in parameters(untrained).items())


def first_minibatch(experiment):
    """One collected batch processed as BenchMARL's loop does (GAE), in the group's buffer, and a
    fixed minibatch of it that every later ``sample()`` returns."""
    batch = next(iter(experiment.collector))
    group_batch = experiment.algorithm.process_batch(GROUP, batch.exclude(*experiment._get_excluded_keys(GROUP)))
    buffer = experiment.replay_buffers[GROUP]
    buffer.extend(group_batch.reshape(-1))
    minibatch = buffer.sample()
    buffer.sample = lambda: minibatch.clone()
    return minibatch


def brute_force_actor_step(experiment, minibatch, k: int) -> list[torch.Tensor]:
    """The actor's parameters after one K-level step on ``minibatch`` by brute force: for every
    level and agent i, the gradient of agent i's joint-ratio surrogate (kpg.joint_ratio_loss, share
    1/agents of the mean loss) with agent i at the base parameters and every other agent at level
    l-1; clipped per agent (experiment.clip_grad_val) and stepped by a fresh torch.optim.Adam from
    the base (the experiment's optimizer has no state yet)."""
    config, loss = experiment.config, experiment.losses[GROUP]
    params = loss.actor_network_params.detach().clone()
    names = list(params.keys(include_nested=True, leaves_only=True))
    base = [params.get(n).clone() for n in names]
    shared = config.share_policy_params
    action = minibatch.get((GROUP, "action"))
    old = minibatch.get((GROUP, "log_prob")).T  # [agents, batch]
    advantages = minibatch.get((GROUP, "advantage")).squeeze(-1).T

    def log_prob(values):
        td = params.clone()  # keeps the per-agent parameters' batch size, which the agents' vmap needs
        for n, v in zip(names, values):
            td.set(n, v)
        with td.to_module(loss.actor_network):
            return loss.actor_network.get_dist(minibatch).log_prob(action).T

    def clip(grads, agent=None):
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]))
        scale = torch.clamp(config.clip_grad_val / (norm + 1e-6), max=1.0).to(grads[0].dtype)
        return [g * scale for g in grads]

    def adam(grads):
        values = [b.clone().requires_grad_(True) for b in base]
        for v, g in zip(values, grads):
            v.grad = g.clone()
        torch.optim.Adam(values, lr=config.lr, eps=config.adam_eps, foreach=False).step()
        return [v.detach() for v in values]

    anticipated = base
    for level in range(1, k + 1):
        anticipated_log_prob = log_prob(anticipated).detach()
        if shared:
            own = [b.clone().requires_grad_(True) for b in base]
            surrogate = kpg.joint_ratio_loss(log_prob(own), old, advantages, anticipated_log_prob, level).loss.mean()
            grads = clip(torch.autograd.grad(surrogate, own))
        else:
            grads = [torch.zeros_like(b) for b in base]
            for i in range(AGENTS):
                own = [b[i].clone().requires_grad_(True) for b in base]
                mixed = [torch.cat([a[:i], o.unsqueeze(0), a[i + 1 :]]) for a, o in zip(anticipated, own)]
                joint = kpg.joint_ratio_loss(log_prob(mixed), old, advantages, anticipated_log_prob, level)
                for g, agent_grad in zip(grads, clip(torch.autograd.grad(joint.loss[i] / AGENTS, own))):
                    g[i] = agent_grad
        anticipated = adam(grads)
    return anticipated


@pytest.mark.parametrize("share_policy_params", [True, False], ids=["shared", "per_agent"])
def test_k2_step_equals_brute_force_kpg(tmp_path, share_policy_params):
    # A large step (lr 0.5, Adam eps 1: each step about lr * g / (|g| + 1)) so that the level-1
    # policies differ enough from the base for level 2 to change the step.
    settings = dict(share_policy_params=share_policy_params, lr=0.5, adam_eps=1.0, clip_grad_val=0.05)
    steps = {}
    for k in (1, 2):
        experiment = build(Experiment, kmappo(k=k), tmp_path / f"k{k}", **settings)
        minibatch = first_minibatch(experiment)
        expected = brute_force_actor_step(experiment, minibatch, k)
        experiment._optimizer_loop(GROUP)
        actor = experiment.losses[GROUP].actor_network_params.flatten_keys()
        steps[k] = [p.detach().clone() for p in actor.values()]
        for name, got, want in zip(actor.keys(), steps[k], expected):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"k={k} {name}")
    assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(steps[1], steps[2]))


def test_a_resumed_run_steps_as_the_run_that_wrote_the_checkpoint(tmp_path):
    first = build(Experiment, kmappo(k=2), tmp_path, max_n_frames=20, checkpoint_at_end=True)
    first.run()
    (checkpoint,) = (first.folder_name / "checkpoints").glob("*.pt")
    resumed = build(Experiment, kmappo(k=2), tmp_path, max_n_frames=20, restore_file=str(checkpoint))
    assert resumed.n_iters_performed == first.n_iters_performed == 1
    minibatch = first.replay_buffers[GROUP].sample()
    for experiment in (first, resumed):
        experiment.replay_buffers[GROUP].sample = lambda: minibatch.clone()
        experiment._optimizer_loop(GROUP)
    for name, value in parameters(first).items():
        assert torch.equal(parameters(resumed)[name], value), name
    for name in ("loss_objective", "loss_critic"):
        saved, loaded = (e.optimizers[GROUP][name].state_dict()["state"] for e in (first, resumed))
        assert saved.keys() == loaded.keys()
        for index, state in saved.items():
            for key, value in state.items():
                assert torch.equal(torch.as_tensor(loaded[index][key]), torch.as_tensor(value)), (name, index, key)


def test_kmappo_refuses_benchmarls_experiment(tmp_path):
    with pytest.raises(TypeError, match="kpg.benchmarl.Experiment"):
        build(BenchMARLExperiment, kmappo(k=2), tmp_path)


def test_kmappo_refuses_a_bad_k_and_gradient_value_clipping(tmp_path):
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        build(Experiment, kmappo(k=0), tmp_path / "k0")
    with pytest.raises(ValueError, match="clips gradients by norm only"):
        build(Experiment, kmappo(k=2), tmp_path / "value", clip_grad_norm=False)


def test_speed_benchmark_changes_a_tasks_options_and_refuses_unknown_or_mistyped_ones():
    with loaded_module(Path(__file__).parents[1] / "bench" / "benchmarl_speed.py", "benchmarl_speed") as bench:
        task = bench.task("navigation", ["n_agents=16", "shared_rew=true", "lidar_range=1"])
        assert (task.config["n_agents"], task.config["shared_rew"], task.config["lidar_range"]) == (16, True, 1)
        assert VmasTask.NAVIGATION.get_from_yaml().config["n_agents"] == 3  # the task file itself is unchanged
        with pytest.raises(SystemExit, match="KEY one of vmas/navigation's options"):
            bench.task("navigation", ["agents=16"])
        with pytest.raises(SystemExit, match="n_agents takes int values"):
            bench.task("navigation", ["n_agents=sixteen"])
