"""SMAX through JaxMARL (kpg[smax]) and the authors' recurrent K-MAPPO (configs/smax_authors.toml).

The adapter on a small map, each piece of the preset's update against a hand computation, a
2-update run of the preset through ``kpg train`` and the exact resume of an interrupted run.
The first test of a session compiles the map's step (seconds to a minute; cached on disk after).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributions import Categorical
from torch.func import functional_call

pytest.importorskip("jaxmarl", reason="SMAX needs the smax extra: pip install 'kpg[smax]'")

from kpg.algos.mappo_recurrent import (  # noqa: E402
    FlaxGRUCell,
    RecurrentAgentNet,
    RecurrentMAPPOTrainer,
    anneal_factor,
    value_loss,
)
from kpg.app.checkpoint import load_checkpoint  # noqa: E402
from kpg.app.cli import _from_dict, _read_config_file  # noqa: E402
from kpg.app.train import TrainConfig, train  # noqa: E402
from kpg.envs.smax import SMAXPool  # noqa: E402

PRESET = Path(__file__).resolve().parent.parent / "configs" / "smax_authors.toml"
MAP, COPIES, ROLLOUT = "3m", 4, 16


def preset(**changes) -> TrainConfig:
    config = _from_dict(TrainConfig, _read_config_file(PRESET))
    mappo = dataclasses.replace(config.mappo, rollout=ROLLOUT, **changes.pop("mappo", {}))
    return dataclasses.replace(
        config, env=f"smax:{MAP}", copies=COPIES, mappo=mappo, progress=False, tensorboard=False, **changes
    )


@pytest.fixture(scope="module")
def pool():
    return SMAXPool(MAP, COPIES, seed=3)


# ---- the adapter ---------------------------------------------------------------------------------


def test_pool_shapes_masks_and_world_state(pool):
    n, actions = pool.spaces.num_agents, pool.spaces.action_size
    assert n == 3 and pool.spaces.discrete
    assert pool.obs.shape == (COPIES, n, pool.spaces.obs_size) and pool.obs.dtype == torch.float32
    assert pool.avail.shape == (COPIES, n, actions) and pool.avail.dtype == torch.bool
    # SMAX's world state, one per copy (the critic adds the agent id), as the authors' wrapper reads it.
    env_state = pool._env_state
    import jax

    world = jax.vmap(pool.env.get_world_state)(env_state)
    assert pool.state.shape == (COPIES, pool.spaces.state_size)
    torch.testing.assert_close(pool.state, torch.as_tensor(jax.numpy.asarray(world)).float())
    # Every living unit can stop and move; attacks only on enemies in range (none at the start of 3m).
    assert pool.avail[..., :5].all()
    expected = jax.vmap(pool.env.get_avail_actions)(env_state)
    for i, name in enumerate(pool.agent_names):
        assert torch.equal(pool.avail[:, i], torch.as_tensor(jax.numpy.asarray(expected[name])) > 0)


def test_a_run_saved_on_other_ranks_says_to_resume_on_as_many(pool):
    from kpg.app.resume import resharded_pool_state

    states = [pool.state_dict(), pool.state_dict()]
    with pytest.raises(ValueError, match="resumes on the number of ranks it was saved on \\(2\\), not 1"):
        resharded_pool_state(states, pool, rank=0, world_size=1)


def test_pool_steps_copies_resets_finished_ones_and_reports_wins(pool):
    """Stopping forever loses every episode of 3m at the time limit or to the enemy; the copies that
    finish are reset (fresh observations), the others go on."""
    stop = torch.full((COPIES, 3), 4)
    finished, steps = [], 0
    while len(finished) < COPIES and steps < 400:
        result = pool.step(stop)
        steps += 1
        assert result.reward.shape == (COPIES, 3) and result.done.shape == (COPIES, 3)
        for c in result.episode_done.nonzero().flatten().tolist():
            assert result.done[c].all()  # the copy's episode ended for every agent
            assert pool.avail[c, :, :5].all()  # reset: everybody alive again
        finished += result.finished
    assert len(finished) >= COPIES
    assert all(e["won"] == 0.0 and e["length"] > 1 for e in finished)
    # A win pays the bonus of 1 at the last step: attack whatever can be attacked, else move right.
    wins = 0
    for _ in range(600):
        attack = torch.where(pool.avail[..., 5:].any(-1), 5 + pool.avail[..., 5:].float().argmax(-1), 1)
        wins += sum(e["won"] for e in pool.step(attack).finished)
    assert wins > 0


def test_smax_without_the_extra_names_it():
    code = (
        "import sys; sys.modules['jaxmarl'] = None\n"
        "from kpg.envs import make_pool\n"
        "try:\n    make_pool('smax:3m', 2, 0)\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'kpg[smax]'" in out


# ---- the preset's pieces by hand -------------------------------------------------------------------


def test_recurrent_net_is_dense_gru_dense_with_agent_id_and_resets():
    torch.manual_seed(0)
    net = RecurrentAgentNet(6, 3, (8, 5, 7), 4, "relu", 0.01)
    x, h0 = torch.randn(4, 2, 3, 6), torch.randn(2, 3, 5)
    resets = torch.zeros(4, 2, 3)
    resets[2, 1, 0] = 1.0
    out, last = net(x, resets, h0)
    ids = torch.eye(3).expand(4, 2, 3, 3)
    embedded = torch.relu(net.embed(torch.cat([x, ids], -1)))
    h, states = h0, []
    for t in range(4):
        h = net.gru(embedded[t].flatten(0, 1), (h * (1 - resets[t])[..., None]).flatten(0, 1)).view(2, 3, 5)
        states.append(h)
    expected = net.out(torch.relu(net.dense(torch.stack(states))))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(last, h)
    # A state shared by the agents (the critic's world state) is the same as each agent seeing it with its id.
    shared = torch.randn(4, 2, 6)
    torch.testing.assert_close(net(shared, resets, h0)[0], net(shared[:, :, None].expand(4, 2, 3, 6), resets, h0)[0])


def test_value_loss_clipped_by_hand():
    values, old, targets = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.5, 0.1, 2.0]), torch.tensor([2.0, -1.0, 1.0])
    # unclipped errors 1, 1, 1; clipped predictions 0.7, 0.0 (moved -0.1 within 0.2), 2.0 -> errors 1.69, 1, 1
    assert value_loss(values, old, targets, 0.2).item() == pytest.approx(0.5 * (1.69 + 1 + 1) / 3)
    assert value_loss(values, old, targets, None).item() == pytest.approx(0.5 * 3 / 3)


# The test wraps KPGOptimizer.step after the schedulers wrapped it; they warn, and count as before.
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_lr_anneals_once_per_update_and_per_kpg_step():
    assert [anneal_factor(c, 4, 10) for c in (0, 3, 4, 39, 40)] == [1.0, 1.0, 0.9, pytest.approx(0.1), 0.0]
    config = preset(mappo={"epochs": 2, "minibatches": 2, "lr_anneal_steps": None}, k=2, steps=3 * COPIES * ROLLOUT)
    trainer = _trainer(config)
    seen = []
    step = trainer.actor_optimizer.step

    def recording_step(closure):
        seen.append((trainer.actor_optimizer.param_groups[0]["lr"], trainer.critic_optimizer.param_groups[0]["lr"]))
        return step(closure)

    trainer.actor_optimizer.step = recording_step
    for _ in range(2):
        trainer.iteration()
    # 3 updates in the run: lr 0.004 for update 1's four KPG steps, 0.004 * 2/3 for update 2's.
    assert seen == [(0.004, 0.004)] * 4 + [(pytest.approx(0.004 * 2 / 3), pytest.approx(0.004 * 2 / 3))] * 4
    # The schedule's count advanced once per KPG step (k=2 levels, one commit each), as the Adam step count.
    assert trainer.schedulers[0].last_epoch == 8
    assert trainer.actor_optimizer.state_dict()["state"][0]["step"].item() == 8


def _lrs_of_updates(trainer: RecurrentMAPPOTrainer, updates: int) -> list[float]:
    """The actor's lr at the start of each of the next ``updates`` updates (the lr is constant within one)."""
    lrs = []
    for _ in range(updates):
        lrs.append(trainer.actor_optimizer.param_groups[0]["lr"])
        trainer.iteration()
    return lrs


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_lr_anneal_steps_sets_the_horizon_whatever_the_runs_length_and_across_a_resume():
    """--mappo.lr-anneal-steps: the lr falls by 1/horizon-updates per update (the authors' 10M steps
    over a shorter run), whatever --steps is, and a resume under a different --steps continues it."""
    per_update = COPIES * ROLLOUT
    horizon = 10 * per_update  # 10 updates
    config = preset(k=2, mappo={"epochs": 1, "minibatches": 1, "lr_anneal_steps": horizon}, steps=3 * per_update)
    whole = _trainer(config)
    expected = [0.004 * (1 - u / 10) for u in range(3)]
    assert _lrs_of_updates(whole, 3) == pytest.approx(expected)
    assert whole.anneal_updates == 10

    first = _trainer(dataclasses.replace(config, steps=per_update))
    assert _lrs_of_updates(first, 1) == pytest.approx(expected[:1])
    resumed = _trainer(dataclasses.replace(config, steps=5 * per_update))  # resumed with a longer --steps
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    assert _lrs_of_updates(resumed, 2) == pytest.approx(expected[1:])
    assert resumed.schedulers[0].last_epoch == whole.schedulers[0].last_epoch == 3

    # Without an explicit horizon the anneal follows --steps; a resume under another --steps is refused.
    by_steps = preset(k=1, mappo={"epochs": 1, "minibatches": 1, "lr_anneal_steps": None}, steps=per_update)
    saved = _trainer(by_steps).state_dict()
    longer = _trainer(dataclasses.replace(by_steps, steps=4 * per_update))
    with pytest.raises(ValueError, match="anneals its lr over 1 updates, this one over 4"):
        longer.load_state_dict(saved)
    with pytest.raises(ValueError, match="--mappo.lr-anneal-steps 10 needs --mappo.lr-anneal"):
        _trainer(preset(mappo={"lr_anneal": True, "lr_anneal_steps": 10}))


def test_flax_gru_cell_has_flax_biases_and_steps_as_the_formula():
    """flax's GRUCell: input biases for r, z and n, a hidden bias for n only (torch's cell has two
    full bias vectors); one step against the formula written out."""
    torch.manual_seed(0)
    net = RecurrentAgentNet(6, 3, (8, 5, 7), 4, "relu", 0.01, gru="flax")
    shapes = {name: tuple(p.shape) for name, p in net.gru.named_parameters()}
    assert shapes == {"weight_ih": (15, 8), "weight_hh": (15, 5), "bias_ih": (15,), "bias_hn": (5,)}
    assert not net.gru.bias_ih.any() and not net.gru.bias_hn.any()  # zero at the start, as flax's
    with torch.no_grad():
        for p in net.gru.parameters():
            p.normal_()
    x, h = torch.randn(2, 8), torch.randn(2, 5)
    (w_ir, w_iz, w_in), (w_hr, w_hz, w_hn) = net.gru.weight_ih.chunk(3), net.gru.weight_hh.chunk(3)
    b_ir, b_iz, b_in = net.gru.bias_ih.chunk(3)
    r = torch.sigmoid(x @ w_ir.T + b_ir + h @ w_hr.T)
    z = torch.sigmoid(x @ w_iz.T + b_iz + h @ w_hz.T)
    n = torch.tanh(x @ w_in.T + b_in + r * (h @ w_hn.T + net.gru.bias_hn))
    torch.testing.assert_close(net.gru(x, h), (1 - z) * n + z * h)
    # Through the whole net: gradients reach every one of the cell's parameters.
    out, _ = net(torch.randn(4, 2, 3, 6), torch.zeros(4, 2, 3), torch.zeros(2, 3, 5))
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.gru.parameters())


def test_flax_gru_cell_equals_flax_linen_gru_cell():
    """The same weights in flax's own GRUCell (installed with JaxMARL) give the same step."""
    linen = pytest.importorskip("flax.linen")
    import jax.numpy as jnp
    import numpy as np

    torch.manual_seed(1)
    cell = FlaxGRUCell(6, 5)
    with torch.no_grad():
        for p in cell.parameters():
            p.normal_()
    x, h = torch.randn(3, 6), torch.randn(3, 5)
    as_numpy = lambda t: t.detach().numpy()  # noqa: E731
    params = {}
    for gate, w_i, w_h, b_i in zip("rzn", cell.weight_ih.chunk(3), cell.weight_hh.chunk(3), cell.bias_ih.chunk(3)):
        params[f"i{gate}"] = {"kernel": as_numpy(w_i).T, "bias": as_numpy(b_i)}
        params[f"h{gate}"] = {"kernel": as_numpy(w_h).T}
    params["hn"]["bias"] = as_numpy(cell.bias_hn)
    expected, _ = linen.GRUCell(features=5).apply({"params": params}, jnp.asarray(h.numpy()), jnp.asarray(x.numpy()))
    torch.testing.assert_close(cell(x, h), torch.from_numpy(np.array(expected)), atol=1e-6, rtol=1e-5)


def test_actor_without_agent_id_reads_the_observation_alone():
    torch.manual_seed(0)
    net = RecurrentAgentNet(6, 3, (8, 5, 7), 4, "relu", 0.01, agent_id=False)
    assert net.embed.in_features == 6
    x = torch.randn(4, 2, 6)
    same = x[:, :, None].expand(4, 2, 3, 6)  # every agent sees the same observation: the same outputs
    out, _ = net(same, torch.zeros(4, 2, 3), torch.zeros(2, 3, 5))
    torch.testing.assert_close(out[:, :, 0], out[:, :, 1])
    torch.testing.assert_close(out[:, :, 0], out[:, :, 2])
    trainer = _trainer(preset(k=1, steps=COPIES * ROLLOUT))  # the preset: the authors' actor without the id
    assert trainer.actor.embed.in_features == trainer.pool.spaces.obs_size
    assert trainer.critic.embed.in_features == trainer.pool.spaces.state_size + 3  # the critic keeps it
    assert isinstance(trainer.actor.gru, FlaxGRUCell) and isinstance(trainer.critic.gru, FlaxGRUCell)


def _trainer(config: TrainConfig, seed: int = 0) -> RecurrentMAPPOTrainer:
    pool = SMAXPool(MAP, config.copies, seed)
    return RecurrentMAPPOTrainer(pool, config.mappo, config.k, None, "cpu", seed, total_steps=config.steps)


def _adam_first_step(params: dict, grads: dict, lr: float, max_norm: float) -> dict:
    """Global-norm clipping, then Adam's first step from a fresh state (eps 1e-5): the update is
    lr * g / (|g| + eps) with g the clipped gradient."""
    norm = torch.sqrt(sum(g.square().sum() for g in grads.values()))
    scale = min(1.0, max_norm / (norm.item() + 1e-6))
    return {name: p - lr * (grads[name] * scale) / ((grads[name] * scale).abs() + 1e-5) for name, p in params.items()}


@pytest.mark.parametrize("k", [1, 2])
def test_first_minibatch_step_matches_the_authors_loss_by_hand(k):
    """One minibatch of the whole rollout: per-minibatch advantage normalization, one mean of the
    clipped surrogate over all agents' samples, the joint ratio inside the clip at level 2 (others at
    their level-1 parameters), global-norm clipping 0.5 and Adam (eps 1e-5) at the annealed lr, the
    clipped value loss with coefficient 0.5 for the critic."""
    config = preset(k=k, mappo={"epochs": 1, "minibatches": 1}, steps=4 * COPIES * ROLLOUT)
    trainer = _trainer(config)
    batch, _ = trainer._collect()
    actor, critic = copy.deepcopy(trainer.actor), copy.deepcopy(trainer.critic)
    trainer._update(batch)

    c = config.mappo
    adv = batch["advantages"]
    adv = (adv - adv.mean()) / (adv.std(correction=0) + 1e-8)
    old = batch["log_prob"]

    def log_prob(params):
        logits, _ = functional_call(actor, params, (batch["obs"], batch["resets"], batch["actor_hidden"]))
        logits = logits.masked_fill(~batch["avail"], torch.finfo(logits.dtype).min)
        return Categorical(logits=logits).log_prob(batch["actions"])  # [T, copies, agents]

    def surrogate_loss(params, others):
        ratio = torch.exp(log_prob(params) - old + others)
        return -torch.min(ratio * adv, ratio.clamp(1 - c.clip_eps, 1 + c.clip_eps) * adv).mean()

    def step(params, others):
        params = {n: p.detach().requires_grad_() for n, p in params.items()}
        grads = dict(zip(params, torch.autograd.grad(surrogate_loss(params, others), list(params.values()))))
        return _adam_first_step({n: p.detach() for n, p in params.items()}, grads, c.lr, c.max_grad_norm)

    base = dict(actor.named_parameters())
    expected = step(base, torch.zeros_like(old))
    if k == 2:
        with torch.no_grad():
            anticipated = log_prob(expected) - old
        others = anticipated.sum(-1, keepdim=True) - anticipated
        expected = step(base, others)
    for name, value in trainer.actor.named_parameters():
        torch.testing.assert_close(value.detach(), expected[name], atol=2e-6, rtol=1e-4, msg=name)

    critic_params = {n: p.detach().requires_grad_() for n, p in critic.named_parameters()}
    values, _ = functional_call(critic, critic_params, (batch["state"], batch["resets"], batch["critic_hidden"]))
    errors = torch.maximum(
        (values[..., 0] - batch["targets"]).square(),
        (batch["values"] + (values[..., 0] - batch["values"]).clamp(-0.2, 0.2) - batch["targets"]).square(),
    )
    loss = c.value_coef * 0.5 * errors.mean()
    grads = dict(zip(critic_params, torch.autograd.grad(loss, list(critic_params.values()))))
    expected = _adam_first_step({n: p.detach() for n, p in critic_params.items()}, grads, c.critic_lr, c.max_grad_norm)
    for name, value in trainer.critic.named_parameters():
        torch.testing.assert_close(value.detach(), expected[name], atol=2e-6, rtol=1e-4, msg=name)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_minibatches_are_whole_sequences_of_half_the_copies():
    config = preset(k=1, steps=COPIES * ROLLOUT)
    trainer = _trainer(config)
    seen = []
    trainer._actor_step = lambda mb, adv, fractions: (seen.append((mb, adv)), (0.0, 0.0))[1]
    batch, _ = trainer._collect()
    trainer._update(batch)
    assert len(seen) == 4  # 2 epochs x 2 minibatches
    for epoch in (seen[:2], seen[2:]):
        rows = []
        for mb, adv in epoch:
            assert mb["obs"].shape[:3] == (ROLLOUT, COPIES // 2, 3) and mb["actor_hidden"].shape[0] == COPIES // 2
            # normalized inside the minibatch
            assert adv.mean().item() == pytest.approx(0.0, abs=1e-5)
            assert adv.std(correction=0).item() == pytest.approx(1.0, abs=1e-4)
            rows += [
                next(c for c in range(COPIES) if torch.equal(batch["obs"][:, c], mb["obs"][:, j]))
                for j in range(COPIES // 2)
            ]
        assert sorted(rows) == list(range(COPIES))


def test_actor_loss_is_one_mean_over_all_agents_samples():
    """With the shared actor the closure's per-agent losses are summed into the gradient: "samples"
    divides them by the number of agents, "agents" keeps N times that gradient."""
    losses = {}
    for mean in ("samples", "agents"):
        trainer = _trainer(
            preset(k=1, mappo={"actor_loss_mean": mean, "epochs": 1, "minibatches": 1}, steps=COPIES * ROLLOUT)
        )
        batch, _ = trainer._collect()
        losses[mean] = trainer._actor_step(batch, batch["advantages"], {})[0]
    assert losses["agents"] == pytest.approx(3 * losses["samples"], rel=1e-5)


# ---- kpg train with the preset ----------------------------------------------------------------------


def test_preset_two_updates_through_kpg_train(tmp_path):
    config = preset(k=2, steps=2 * COPIES * ROLLOUT, logdir=tmp_path)
    summary = train(config)
    assert summary["updates"] == 2 and summary["env_steps"] == 2 * COPIES * ROLLOUT
    assert summary["versions"] == {
        "torch": torch.__version__,
        **{name: importlib.metadata.version(name) for name in ("jaxmarl", "jax", "jaxlib")},
    }
    assert len(summary["actor_level_seconds"]) == 2
    header = (config.run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "win_rate" in header and "clip_fraction_level2" in header


def test_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
    """SMAX's whole state (JAX key, environment states, episode sums) is checkpointed with the GRU
    states, so a run interrupted in its second update and resumed from the checkpoint of the first
    ends where the uninterrupted one does. (The lr decay depends on --steps: resume with the same.)"""
    whole = preset(k=2, steps=2 * COPIES * ROLLOUT, checkpoint_every=1, logdir=tmp_path / "whole")
    train(whole)
    cut = dataclasses.replace(whole, logdir=tmp_path / "cut")
    iteration = RecurrentMAPPOTrainer.iteration

    def interrupted_in_update_two(self):
        if self.updates == 1:
            raise KeyboardInterrupt
        return iteration(self)

    monkeypatch.setattr(RecurrentMAPPOTrainer, "iteration", interrupted_in_update_two)
    with pytest.raises(KeyboardInterrupt):
        train(cut)
    assert load_checkpoint(cut.run_dir / "checkpoint.pt")["trainer"]["updates"] == 1
    monkeypatch.setattr(RecurrentMAPPOTrainer, "iteration", iteration)
    train(dataclasses.replace(cut, resume=True))
    a = load_checkpoint(whole.run_dir / "checkpoint.pt")["trainer"]
    b = load_checkpoint(cut.run_dir / "checkpoint.pt")["trainer"]
    assert a["updates"] == b["updates"] == 2
    for part in ("actor", "critic"):
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), f"{part}.{name}"
    assert torch.equal(a["hidden"]["actor"], b["hidden"]["actor"])


def test_compare_preset_trains_the_authors_preset():
    from kpg.app.compare import CompareConfig

    compare = _from_dict(CompareConfig, _read_config_file(PRESET.parent / "smax_compare.toml"))
    authors = _from_dict(TrainConfig, _read_config_file(PRESET))
    assert dataclasses.replace(compare.train, progress=True) == authors
    assert compare.ks == (1, 2) and compare.seeds == (0, 1, 2) and compare.metric == "win_rate"


def test_compare_resumes_unfinished_runs_and_skips_finished_ones(tmp_path, monkeypatch):
    from kpg.app import compare as compare_module
    from kpg.app.compare import CompareConfig, compare

    config = CompareConfig(
        ks=(2,),
        seeds=(0,),
        workers=1,
        out=tmp_path,
        metric="win_rate",
        # --agents is the map's business (3m: 3); the results must say the map's count
        train=preset(steps=2 * COPIES * ROLLOUT, checkpoint_every=1, agents=7),
    )
    iteration, calls = RecurrentMAPPOTrainer.iteration, []

    def counted(self, stop_at=None):
        calls.append(self.updates)
        if stop_at is not None and self.updates == stop_at:
            raise KeyboardInterrupt
        return iteration(self)

    monkeypatch.setattr(RecurrentMAPPOTrainer, "iteration", lambda self: counted(self, stop_at=1))
    with pytest.raises(KeyboardInterrupt):
        compare(config)
    monkeypatch.setattr(RecurrentMAPPOTrainer, "iteration", lambda self: counted(self))
    calls.clear()
    results = compare(config)
    assert calls == [1]  # continued from the checkpoint of update 1, not started over
    assert results["metric"] == "win_rate" and (tmp_path / "curves.png").exists()
    assert results["agents"] == 3 and "smax:3m (3 agents)" in (tmp_path / "results.md").read_text()
    monkeypatch.setattr(compare_module, "train", lambda config: pytest.fail("a finished run was started again"))
    compare(config)
