"""The environment pool, K-MAPPO's pieces, `kpg train` (logs, checkpoints, exact resume), the
command line and `kpg compare`, on simple_spread and on a toy environment with uneven agents."""

import csv
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kpg.algos.common import AgentActors, PolicyHead, ReturnNormalizer, generalized_advantages
from kpg.algos.mappo import MAPPOConfig, MAPPOTrainer
from kpg.anticipation import AUDIT_METRICS
from kpg.app.checkpoint import load_checkpoint, save_checkpoint
from kpg.app.cli import COMMANDS
from kpg.app.cli import main as cli_main
from kpg.app.compare import CompareConfig, compare, mean_and_halfwidth
from kpg.app.resume import RunFolderError
from kpg.app.train import TrainConfig, train
from kpg.envs import EnvPool, make_env_factory
from kpg.options import OptionError

TOY = "helpers:uneven_agents"
SMALL_MAPPO = MAPPOConfig(rollout=25, epochs=2, minibatches=2, hidden=(16,))


def small_config(tmp_path: Path, **changes) -> TrainConfig:
    base = TrainConfig(
        steps=200,
        copies=4,
        logdir=tmp_path,
        progress=False,
        tensorboard=False,
        eval_episodes=2,
        checkpoint_every=1,
        mappo=SMALL_MAPPO,
    )
    return dataclasses.replace(base, **changes)


# ---- environment pool -----------------------------------------------------------------------


def test_pool_pads_masks_and_reports_episode_ends():
    pool = EnvPool(make_env_factory(TOY), copies=2, seed=0)
    spaces = pool.spaces
    assert spaces.names == ["short", "long"] and spaces.obs_sizes == [3, 5] and spaces.action_sizes == [2, 4]
    np.testing.assert_array_equal(spaces.action_mask(), [[1, 1, 0, 0], [1, 1, 1, 1]])
    assert pool.obs.shape == (2, 2, 5) and (pool.obs[:, 0, 3:] == 0).all()
    # step 1: both act; step 2: short is terminated; steps 3-4: long alone; step 4: time limit
    first = pool.step(np.array([[0, 0], [1, 1]]))
    np.testing.assert_array_equal(first.reward, [[1, 1], [0, 0]])
    np.testing.assert_array_equal(first.alive, [[1, 1], [1, 1]])
    second = pool.step(np.array([[1, 1], [1, 1]]))
    np.testing.assert_array_equal(second.done, [[1, 0], [1, 0]])
    np.testing.assert_array_equal(second.terminated, [[1, 0], [1, 0]])
    np.testing.assert_array_equal(second.alive, [[0, 1], [0, 1]])
    assert (second.obs[:, 0] == 0).all()
    third = pool.step(np.array([[0, 2], [0, 2]]))
    np.testing.assert_array_equal(third.reward, [[0, 1], [0, 1]])
    fourth = pool.step(np.array([[0, 3], [0, 0]]))
    np.testing.assert_array_equal(fourth.done, [[0, 1], [0, 1]])
    np.testing.assert_array_equal(fourth.terminated, [[0, 0], [0, 0]])
    # A time limit: long's final observation and the final state are kept for bootstrapping, before the reset.
    np.testing.assert_array_equal(fourth.next_present, [[0, 1], [0, 1]])
    assert (fourth.next_obs[:, 1, -1] == 1.0).all() and (fourth.next_state[:, -1] == 1.0).all()  # time 4 of 4
    assert not fourth.next_obs[:, 0].any() and (fourth.state[:, -1] == 0.0).all()  # the new episode's time 0
    assert [e["length"] for e in fourth.finished] == [4, 4]
    # Copy 0 matched every target: the return sums, per step, the mean reward of the agents that acted.
    # Copy 1 matched both targets at step 2 and long's at step 3.
    assert [e["return"] for e in fourth.finished] == pytest.approx([4.0, 2.0])
    np.testing.assert_array_equal(fourth.alive, [[1, 1], [1, 1]])  # both copies reset


def test_pool_resumes_episode_seeds():
    pool = EnvPool(make_env_factory("simple_spread", agents=2), copies=2, seed=3)
    for _ in range(25):
        pool.step(np.zeros((2, 2), dtype=np.int64))
    assert pool.at_episode_start
    state, obs = pool.state_dict(), pool.obs.copy()
    other = EnvPool(make_env_factory("simple_spread", agents=2), copies=2, seed=99)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.obs, obs)
    with pytest.raises(ValueError, match="saved pool had 2 environment copies, this one has 3"):
        EnvPool(make_env_factory("simple_spread", agents=2), copies=3, seed=0).load_state_dict(state)


def test_unknown_environment_names_the_forms():
    with pytest.raises(ValueError, match="unknown environment 'spread'; use simple_spread, mpe2:SCENARIO"):
        make_env_factory("spread")


# ---- MAPPO pieces ---------------------------------------------------------------------------


def test_gae_by_hand():
    rewards = torch.tensor([[1.0], [0.0], [2.0]])
    values = torch.tensor([[0.5], [0.25], [1.0], [4.0]])
    dones = torch.tensor([[0.0], [1.0], [0.0]])
    gamma, lam = 0.9, 0.8
    # t=2: 2 + 0.9*4 - 1 = 4.6; t=1 (done): 0 - 0.25 = -0.25; t=0: 1 + 0.9*0.25 - 0.5 + 0.72*(-0.25)
    expected = torch.tensor([[1 + 0.9 * 0.25 - 0.5 + 0.72 * -0.25], [-0.25], [4.6]])
    torch.testing.assert_close(generalized_advantages(rewards, values, dones, gamma, lam), expected)


def test_policy_head_masks_missing_actions():
    head = PolicyHead(True, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]))
    dist = head.distribution(torch.zeros(2, 4, 3))
    torch.testing.assert_close(dist.probs[0, 0], torch.tensor([0.5, 0.5, 0.0]))
    torch.testing.assert_close(head.entropy(dist)[0], torch.full((4,), math.log(2)))
    continuous = PolicyHead(False, torch.tensor([[1.0, 0.0]]))
    dist = continuous.distribution(torch.zeros(1, 1, 2), torch.zeros(1, 2))
    log_prob = continuous.log_prob(dist, torch.tensor([[[0.0, 123.0]]]))  # the missing dimension does not count
    torch.testing.assert_close(log_prob, torch.tensor([[-0.5 * math.log(2 * math.pi)]]))


def test_return_normalizer_round_trip_and_moments():
    normalizer = ReturnNormalizer(2, beta=0.5)
    values = torch.tensor([[1.0, 10.0], [3.0, 30.0]])
    normalizer.update(values, torch.ones_like(values))
    torch.testing.assert_close(normalizer.denormalize(normalizer.normalize(values)), values)
    torch.testing.assert_close(normalizer.normalize(torch.tensor([[2.0, 20.0]])), torch.zeros(1, 2), atol=1e-6, rtol=0)


def test_mappo_k1_actor_step_is_plain_ppo_with_adam():
    """With k=1 the actor update equals a hand-written PPO minibatch step with torch.optim.Adam."""
    pool = EnvPool(make_env_factory("simple_spread", agents=2), copies=2, seed=0)
    config = dataclasses.replace(SMALL_MAPPO, epochs=1, minibatches=1, entropy_coef=0.01, max_grad_norm=1e9)
    trainer = MAPPOTrainer(pool, config, k=1, k_until=None, device="cpu", seed=0)
    batch, _ = trainer._collect()
    shadow = [p.detach().clone().requires_grad_() for p in trainer.actor.parameters()]
    adam = torch.optim.Adam(shadow, lr=config.lr, eps=1e-5)
    alive = batch["alive"]
    adv = (batch["advantages"] - batch["advantages"].mean()) / (batch["advantages"].std(unbiased=False) + 1e-8)
    obs = batch["obs"].transpose(0, 1)
    inputs = torch.cat([obs, torch.eye(2)[:, None, :].expand(2, obs.shape[1], 2)], dim=-1)
    weights = shadow
    x = inputs
    for i in range(0, len(weights) - 2, 2):
        x = torch.tanh(x @ weights[i].T + weights[i + 1])
    logits = x @ weights[-2].T + weights[-1]
    dist = torch.distributions.Categorical(logits=logits)
    ratio = (dist.log_prob(batch["actions"].T) - batch["old_log_prob"].T).exp()
    a = adv.T
    surrogate = torch.min(ratio * a, ratio.clamp(1 - config.clip_eps, 1 + config.clip_eps) * a).mean(1)
    loss = (-surrogate - config.entropy_coef * dist.entropy().mean(1)).sum()
    loss.backward()
    adam.step()
    assert (alive == 1).all()
    trainer._update(batch)
    for mine, expected in zip(trainer.actor.parameters(), shadow):
        torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("continuous", [False, True], ids=["discrete", "continuous"])
def test_mappo_batched_actors_equal_per_agent_actors(float64, continuous, device):
    """Per-agent actors as one kpg.nn batched network (one forward for all agents, one fused KPG
    pass) train exactly like one module per agent: same initialization, rollouts, losses and
    updates over three K2-MAPPO iterations."""
    trainers, metrics = {}, {}
    for batch_actors in (False, True):
        pool = EnvPool(make_env_factory("simple_spread", agents=3, continuous=continuous), copies=2, seed=0)
        config = dataclasses.replace(SMALL_MAPPO, share_actor=False, batch_actors=batch_actors)
        trainers[batch_actors] = trainer = MAPPOTrainer(pool, config, k=2, k_until=None, device=str(device), seed=0)
        metrics[batch_actors] = [trainer.iteration() for _ in range(3)]
    per_agent, batched = trainers[False], trainers[True]
    assert per_agent.actor.layout == "per_agent" and batched.actor.layout == "batched"
    assert batched.actor_optimizer.arena.is_batched and batched.actor_optimizer.num_agents == 3
    for expected, actual in zip(metrics[False], metrics[True]):
        assert expected.keys() == actual.keys()
        for name in expected:
            assert actual[name] == pytest.approx(expected[name], rel=1e-9, abs=1e-12), name
    torch.manual_seed(0)  # the trainers' seed: the actors are the first thing they build
    initial = AgentActors(
        "per_agent",
        3,
        per_agent.pool.spaces.obs_size,
        per_agent.pool.spaces.action_size,
        SMALL_MAPPO.hidden,
        SMALL_MAPPO.activation,
        0.01,
    ).to(device)
    moved = 0.0
    for start, expected, actual in zip(
        initial, per_agent.actor.per_agent_networks(), batched.actor.per_agent_networks()
    ):
        for p0, p, q in zip(start.parameters(), expected.parameters(), actual.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12)
            moved = max(moved, (p - p0).abs().max().item())
    assert moved > 1e-3  # the actors trained, so equal parameters are not the initial ones
    if continuous:
        torch.testing.assert_close(batched.log_std[0], torch.stack(list(per_agent.log_std)), rtol=1e-9, atol=1e-12)
    for p, q in zip(per_agent.critic.parameters(), batched.critic.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12)


# ---- training runs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        dict(k=1),
        dict(k=2),
        dict(k=3, mappo=dataclasses.replace(SMALL_MAPPO, share_actor=False)),
        dict(k=2, env_options={"continuous": "true"}),
        dict(k=2, env=TOY, agents=None),
        dict(
            k=2,
            env=TOY,
            agents=None,
            env_options={"continuous": "true"},
            mappo=dataclasses.replace(SMALL_MAPPO, share_actor=False),
        ),
        dict(k=2, k_until=100),
    ],
    ids=[
        "k1",
        "k2",
        "k3-per-agent-actors",
        "k2-continuous",
        "k2-uneven-agents",
        "k2-uneven-continuous-per-agent",
        "k-schedule",
    ],
)
def test_smoke_run_writes_logs_checkpoint_and_summary(tmp_path, monkeypatch, changes):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    config = small_config(tmp_path, **changes)
    summary = train(config)
    run_dir = config.run_dir
    assert summary["env_steps"] == 200 and summary["updates"] == 2
    assert math.isfinite(summary["eval_return"]) and math.isfinite(summary["recent_return"])
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("env_steps,updates,wall_seconds")
    assert len(summary["actor_level_seconds"]) == config.k
    assert set(json.loads((run_dir / "summary.json").read_text())) >= {"eval_return", "seconds", "actor_level_seconds"}
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert state["trainer"]["env_steps"] == 200
    if config.k_until is not None:  # 100 environment steps are the first update: k=2 there, then k=1
        ks = [row["k"] for row in csv.DictReader(rows)]
        assert (
            ks == ["2", "1"]
            and state["trainer"]["k_schedule"]["steps_done"] == 2 * SMALL_MAPPO.epochs * SMALL_MAPPO.minibatches
        )


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    whole = train(small_config(tmp_path, steps=400, name="whole"))
    train(small_config(tmp_path, steps=200, name="split"))
    resumed = train(small_config(tmp_path, steps=400, name="split", resume=True))
    assert resumed["env_steps"] == whole["env_steps"] == 400
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["trainer"]
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")["trainer"]
    for part in ("actor", "critic"):
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), f"{part}.{name} differs after resume"
    assert len((tmp_path / "split" / "metrics.csv").read_text().splitlines()) == 5  # header + 4 updates


def test_resume_without_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*nothing-here/checkpoint.pt"):
        train(small_config(tmp_path, name="nothing-here", resume=True))


def test_damaged_checkpoints_are_detected(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"x": torch.arange(1000)})
    assert torch.equal(load_checkpoint(path)["x"], torch.arange(1000))
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"c\.pt (is corrupt|cannot be read)"):
        load_checkpoint(path)
    path.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ValueError, match=r"c\.pt cannot be read"):
        load_checkpoint(path)


# ---- command line and compare ------------------------------------------------------------------


def test_cli_config_file_sets_defaults_and_flags_override(tmp_path, capsys):
    config_file = tmp_path / "run.toml"
    config_file.write_text(
        f'steps = 100\ncopies = 2\nk = 1\nlogdir = "{tmp_path}"\nname = "from-file"\ntensorboard = false\n'
        "eval_episodes = 0\nprogress = false\n[mappo]\nrollout = 25\nhidden = [8]\nepochs = 1\n"
    )
    cli_main(["train", "--config", str(config_file), "--k", "2"])
    saved = json.loads((tmp_path / "from-file" / "config.json").read_text())
    assert saved["k"] == 2 and saved["steps"] == 100 and saved["mappo"]["hidden"] == [8]
    bad = tmp_path / "bad.json"
    bad.write_text('{"stepz": 3}')
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--config", str(bad)])
    assert exit_info.value.code == 2 and "bad.json: stepz 3: unknown option" in capsys.readouterr().err


def test_python_dash_m_kpg_prints_usage():
    result = subprocess.run([sys.executable, "-m", "kpg"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout.startswith("usage: kpg COMMAND")
    assert all(f"\n  {command} " in result.stdout for command in COMMANDS)


def test_compare_writes_table_plot_and_json(tmp_path):
    config = CompareConfig(
        ks=(1, 2),
        seeds=(0, 1),
        workers=1,
        out=tmp_path / "cmp",
        train=small_config(tmp_path, eval_episodes=0, checkpoint_every=0),
    )
    results = compare(config)
    assert set(results["by_k"]) == {1, 2}
    assert len(results["by_k"][2]["actor_level_seconds"]) == 2
    assert (tmp_path / "cmp" / "curves.png").stat().st_size > 10_000
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert "| 1 | 2 |" in table and "| 2 | 2 |" in table
    again = compare(config)  # finished runs are reused, not run again
    assert again["by_k"][1]["final_return"] == results["by_k"][1]["final_return"]


def test_compare_takes_the_final_return_from_each_iterations_return(tmp_path):
    """The final return averages every row's episode_return in the last 10 % of the run, not the recent return (a
    mean of the last 20 iterations, which lags a rising curve: here it stays at 0 while the return climbs), nor a
    few points of the interpolated curve."""
    config = CompareConfig(
        ks=(1,), seeds=(0,), workers=1, out=tmp_path / "cmp", train=small_config(tmp_path, steps=1000)
    )
    run_dir = dataclasses.replace(config.train, k=1, seed=0, logdir=config.out / "runs").run_dir
    run_dir.mkdir(parents=True)
    rows = [{"env_steps": s, "episode_return": s / 100, "recent_return": 0.0} for s in range(50, 1001, 50)]
    with open(run_dir / "metrics.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {"seed": 0, "agents": 3, "env_steps": 1000, "interrupted": False, "eval_return": None}
    summary |= {"wall_seconds": 1.0, "cpu_seconds": 1.0, "seconds": {}, "actor_level_seconds": [1.0]}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    results = compare(config)
    # The rows in the last 10 % of the steps, at 950 and 1000: 9.5 and 10.0
    assert results["by_k"][1]["final_return"] == pytest.approx(9.75)


def test_confidence_halfwidth_by_hand():
    mean, halfwidth = mean_and_halfwidth(np.array([1.0, 2.0, 3.0]))
    assert mean == 2.0 and halfwidth == pytest.approx(4.303 * 1.0 / math.sqrt(3))


def test_momentum_resume_continues_exactly_and_carries_the_history(tmp_path):
    momentum = dict(anticipation="momentum", anticipation_reset=False)
    whole = train(small_config(tmp_path, steps=400, name="whole", **momentum))
    train(small_config(tmp_path, steps=200, name="split", **momentum))
    resumed = train(small_config(tmp_path, steps=400, name="split", resume=True, **momentum))
    assert resumed["env_steps"] == whole["env_steps"] == 400
    a = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")["trainer"]
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")["trainer"]
    for name, value in a["actor"].items():
        assert torch.equal(value, b["actor"][name]), f"actor.{name} differs after a momentum resume"
    history = a["actor_optimizer"]["kpg"]["anticipation"]
    assert history["mode"] == "momentum" and history["latest_update"].abs().sum() > 0
    assert small_config(tmp_path, **momentum).run_name == "mappo-simple_spread-k2-momentum-s0"


def test_compare_puts_exact_and_momentum_side_by_side(tmp_path):
    config = CompareConfig(
        ks=(1, 2),
        seeds=(0,),
        anticipations=("exact", "momentum"),
        workers=1,
        out=tmp_path / "cmp",
        train=small_config(tmp_path, eval_episodes=0, checkpoint_every=0, anticipation_audit=True),
    )
    results = compare(config)
    assert list(results["by_k"]) == [1, 2, "2-momentum"]
    momentum = results["by_k"]["2-momentum"]
    assert (momentum["k"], momentum["anticipation"]) == (2, "momentum")
    table = (tmp_path / "cmp" / "results.md").read_text()
    assert "| 2 momentum | 1 |" in table and "| 2 | 1 |" in table
    runs = tmp_path / "cmp" / "runs"
    # The audit goes to the momentum run only; exact runs refuse it.
    with open(runs / "mappo-simple_spread-k2-momentum-s0" / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    assert all(rows[-1][column] != "" for column in ("audit_gate", "audit_relative_error", "audit_norm_ratio"))
    with open(runs / "mappo-simple_spread-k2-s0" / "metrics.csv") as file:
        assert "audit_gate" not in next(csv.reader(file))


def test_compare_refuses_momentum_beyond_k2():
    with pytest.raises(OptionError, match="k of 1 or 2 with --anticipations momentum"):
        CompareConfig(ks=(1, 3), anticipations=("exact", "momentum")).validate()


def test_mappo_metrics_carry_the_momentum_audit(tmp_path):
    config = small_config(tmp_path, anticipation="momentum", anticipation_audit=True, steps=400)
    train(config)
    with open(config.run_dir / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    for column in AUDIT_METRICS:
        values = [float(row[column]) for row in rows if row[column] != ""]
        assert values and all(math.isfinite(v) for v in values), column
    assert max(float(row["audit_gate"]) for row in rows) > 0, "the gate opens once two updates are committed"
    # A resume without the audit would append rows under the audit's column names: refused.
    with pytest.raises(RunFolderError, match="adds the audit_\\* columns"):
        train(dataclasses.replace(config, steps=600, resume=True, anticipation_audit=False))
    with pytest.raises(ValueError, match="--anticipation-audit .* needs --algo mappo and --anticipation momentum"):
        train(small_config(tmp_path, name="exact", anticipation_audit=True))
