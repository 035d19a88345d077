"""kpg on torch.distributed, with 2 and 3 gloo processes on this machine: data-parallel steps equal
one process's steps on the concatenated batch, agent-sharded steps equal unsharded ones, failures
on one rank stop every rank with a clear error, K-MAPPO trains under data parallelism and resumes
on another number of ranks, and K-MADDPG's and K-FACMAC's data-parallel gradient steps equal one
process's on the concatenated minibatch, and K-FACMAC trains and resumes on 2 ranks exactly as an
uninterrupted run.

Each launch starts its ranks once (forked from a server that has imported torch and kpg) and runs a
list of scenarios in every rank; a rank writes each scenario's findings (or its traceback) to a
JSON file, and the tests below read them. Collectives time out after PROCESS_GROUP_TIMEOUT and a
launch after LAUNCH_TIMEOUT, so a broken exchange fails a test instead of hanging it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributions import Categorical

import kpg
from kpg.distributed import agent_range

PROCESS_GROUP_TIMEOUT = timedelta(seconds=20)
LAUNCH_TIMEOUT = 60.0
F64_TOLERANCE = 1e-12
NUM_AGENTS, OBS, ACTIONS, SAMPLES_PER_RANK = 5, 4, 3, 6


# ---- launching ranks --------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, workdir: str, scenarios: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world, timeout=PROCESS_GROUP_TIMEOUT
    )
    findings: dict[str, object] = {}
    out = Path(workdir) / f"rank{rank}.json"
    for name in scenarios:
        try:
            findings[name] = SCENARIOS[name](rank, world, Path(workdir))
        except Exception:
            findings[name] = {"traceback": traceback.format_exc()}
        out.write_text(json.dumps(findings))
    if dist.is_initialized():  # a scenario that broke the group has destroyed it already
        dist.destroy_process_group()


def launch(world: int, scenarios: list[str], workdir: Path) -> dict[int, dict]:
    """Runs ``scenarios`` in ``world`` gloo ranks; returns each rank's findings by scenario name."""
    workdir.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "kpg", "kpg.app.train", __name__])
    ranks = [context.Process(target=_rank_main, args=(r, world, str(workdir), scenarios)) for r in range(world)]
    for process in ranks:
        process.start()
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    for process in ranks:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, process in enumerate(ranks) if process.is_alive()]
    for r in hung:
        ranks[r].kill()
    assert not hung, f"ranks {hung} did not finish within {LAUNCH_TIMEOUT} s"
    findings = {}
    for r in range(world):
        path = workdir / f"rank{r}.json"
        findings[r] = json.loads(path.read_text()) if path.exists() else {}
    return findings


def result(findings: dict[int, dict], rank: int, scenario: str) -> dict:
    found = findings[rank].get(scenario)
    assert found is not None, f"rank {rank} reported nothing for {scenario}"
    assert "traceback" not in found, f"rank {rank}, {scenario}:\n{found['traceback']}"
    return found


# ---- the problem every scenario steps ------------------------------------------------------------------


def _policies(seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(OBS, 8), nn.Tanh(), nn.Linear(8, ACTIONS)).double() for _ in range(NUM_AGENTS)]


def _batch(world: int, step: int) -> dict[str, torch.Tensor]:
    """The whole batch of a step, [agents, world * SAMPLES_PER_RANK, ...]; rank r's share is its r-th block."""
    generator = torch.Generator().manual_seed(100 + step)
    samples = world * SAMPLES_PER_RANK
    return {
        "obs": torch.randn(NUM_AGENTS, samples, OBS, generator=generator, dtype=torch.float64),
        "actions": torch.randint(0, ACTIONS, (NUM_AGENTS, samples), generator=generator),
        "old_log_prob": -torch.rand(NUM_AGENTS, samples, generator=generator, dtype=torch.float64) - 0.8,
        "advantages": torch.randn(NUM_AGENTS, samples, generator=generator, dtype=torch.float64),
    }


def _share(batch: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    rows = slice(rank * SAMPLES_PER_RANK, (rank + 1) * SAMPLES_PER_RANK)
    return {name: value[:, rows] for name, value in batch.items()}


def _log_probs(policies, obs, actions, agents) -> torch.Tensor:
    return torch.stack([Categorical(logits=policies[a](obs[a])).log_prob(actions[a]) for a in agents])


def _joint_ratio_closure(policies, batch, gather=None):
    """K-MAPPO's closure over per-agent policies, written once for every mode: ``policies`` holds the
    agents of ``ctx.agents`` (indexed globally); the others' anticipated log-probabilities come
    from ``ctx.gather_agents`` (or ``gather(ctx)`` where a test exchanges parameters instead)."""

    def closure(ctx):
        agents = ctx.agents
        own = _log_probs(policies, batch["obs"], batch["actions"], agents)
        anticipated = None
        if ctx.level > 1:
            with ctx.anticipated():
                anticipated = (
                    gather(ctx)
                    if gather
                    else ctx.gather_agents(_log_probs(policies, batch["obs"], batch["actions"], agents))
                )
        log_prob = (batch["old_log_prob"] if anticipated is None else anticipated).clone()
        log_prob[agents.start : agents.stop] = own
        loss = kpg.joint_ratio_loss(
            log_prob, batch["old_log_prob"], batch["advantages"], anticipated, level=ctx.level, clip_eps=0.2
        ).loss
        return loss[agents.start : agents.stop]

    return closure


def _max_difference(a, b) -> float:
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b))


OPTIMIZER_CASES = [
    dict(k=2, optimizer="adam", lr=0.05, max_grad_norm=0.3),
    dict(k=3, optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True),
    dict(k=2, optimizer="rmsprop", lr=0.01, centered=True, max_grad_norm=[0.2, None, 0.5, 1.0, None]),
]


# ---- scenarios (run in every rank) --------------------------------------------------------------------


def data_parallel_parity(rank, world, workdir):
    """Per case: 3 steps data-parallel on this rank's share vs one process on the whole batch."""
    differences = []
    for case in OPTIMIZER_CASES:
        distributed, single = _policies(), _policies()
        group_opt = kpg.KPGOptimizer(distributed, process_group=dist.group.WORLD, verify_replicas=True, **case)
        single_opt = kpg.KPGOptimizer(single, **case)
        for step in range(3):
            batch = _batch(world, step)
            group_opt.step(_joint_ratio_closure(distributed, _share(batch, rank)))
            single_opt.step(_joint_ratio_closure(single, batch))
        params = [p for m in distributed for p in m.parameters()]
        reference = [p for m in single for p in m.parameters()]
        states = [t for p in params for t in group_opt.state[p].values()]
        reference_states = [t for p in reference for t in single_opt.state[p].values()]
        differences.append(
            {
                "case": case["optimizer"],
                "parameters": _max_difference(params, reference),
                "state": _max_difference(states, reference_states),
                "moved": _max_difference(params, [p for m in _policies() for p in m.parameters()]),
            }
        )
    return {"differences": differences}


def data_parallel_reached_on_one_rank(rank, world, workdir):
    """A head only rank 0's loss reaches: its averaged gradient is every rank's, so every rank steps
    it and the replicas stay equal (verify_replicas checks after every step)."""
    torch.manual_seed(0)
    body, head, other = nn.Linear(2, 2).double(), nn.Linear(2, 1).double(), nn.Linear(2, 1).double()
    agents = [[*body.parameters(), *head.parameters()], list(other.parameters())]
    opt = kpg.KPGOptimizer(agents, k=2, optimizer="adam", process_group=dist.group.WORLD, verify_replicas=True)
    x = torch.full((3, 2), float(rank + 1), dtype=torch.float64)
    before = head.weight.detach().clone()

    def closure(ctx):
        hidden = torch.tanh(body(x))
        own = head(hidden).square().mean() if rank == 0 else hidden.square().mean()
        return torch.stack([own, other(x).square().mean()])

    for _ in range(2):
        opt.step(closure)
    return {"head_moved": float((head.weight.detach() - before).abs().max())}


def data_parallel_shared_network(rank, world, workdir):
    """One network shared by all agents (agent ids appended), data parallel vs one process."""

    def shared_model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(OBS + NUM_AGENTS, 8), nn.Tanh(), nn.Linear(8, ACTIONS)).double()

    def closure_for(model, batch):
        ids = torch.eye(NUM_AGENTS, dtype=torch.float64)[:, None, :].expand(-1, batch["obs"].shape[1], -1)
        inputs = torch.cat([batch["obs"], ids], dim=-1)

        def closure(ctx):
            own = Categorical(logits=model(inputs)).log_prob(batch["actions"])
            anticipated = None
            if ctx.level > 1:
                with ctx.anticipated():
                    anticipated = Categorical(logits=model(inputs)).log_prob(batch["actions"])
            return kpg.joint_ratio_loss(
                own, batch["old_log_prob"], batch["advantages"], anticipated, level=ctx.level, clip_eps=0.2
            ).loss

        return closure

    distributed, single = shared_model(), shared_model()
    group_opt = kpg.KPGOptimizer(
        distributed, k=2, lr=0.05, num_agents=NUM_AGENTS, max_grad_norm=0.5, process_group=dist.group.WORLD
    )
    single_opt = kpg.KPGOptimizer(single, k=2, lr=0.05, num_agents=NUM_AGENTS, max_grad_norm=0.5)
    for step in range(3):
        batch = _batch(world, step)
        group_opt.step(closure_for(distributed, _share(batch, rank)))
        single_opt.step(closure_for(single, batch))
    return {"parameters": _max_difference(list(distributed.parameters()), list(single.parameters()))}


def agent_sharded_outputs(rank, world, workdir):
    """Each rank owns agent_range(5) and exchanges anticipated log-probabilities; vs unsharded."""
    differences = []
    batch = _batch(1, 0)
    mine = agent_range(NUM_AGENTS, dist.group.WORLD)
    for case in OPTIMIZER_CASES:
        norms = case.get("max_grad_norm")
        own_norms = norms[mine.start : mine.stop] if isinstance(norms, list) else norms
        sharded_policies, whole = _policies(), _policies()
        sharded = kpg.KPGOptimizer(
            [sharded_policies[a] for a in mine],
            process_group=dist.group.WORLD,
            parallel="agents",
            **{**case, "max_grad_norm": own_norms},
        )
        reference = kpg.KPGOptimizer(whole, **case)
        for _ in range(3):
            sharded.step(_joint_ratio_closure(sharded_policies, batch))
            reference.step(_joint_ratio_closure(whole, batch))
        ours = [p for a in mine for p in sharded_policies[a].parameters()]
        theirs = [p for a in mine for p in whole[a].parameters()]
        differences.append({"case": case["optimizer"], "parameters": _max_difference(ours, theirs)})
    return {"agents": [mine.start, mine.stop], "differences": differences}


def agent_sharded_parameters(rank, world, workdir):
    """An agent-batched actor sharded by agents, exchanging level parameters: every rank evaluates
    all agents at level l-1 through a meta-device model of all agents; vs the unsharded actor."""
    batch = _batch(1, 0)
    mine = agent_range(NUM_AGENTS, dist.group.WORLD)
    torch.manual_seed(2)
    whole = kpg.nn.AgentMLP(NUM_AGENTS, OBS, ACTIONS, hidden_sizes=(8,)).double()
    local = kpg.nn.AgentMLP(len(mine), OBS, ACTIONS, hidden_sizes=(8,)).double()
    with torch.no_grad():
        for ours, theirs in zip(local.parameters(), whole.parameters()):
            ours.copy_(theirs[mine.start : mine.stop])
    skeleton = kpg.nn.AgentMLP(NUM_AGENTS, OBS, ACTIONS, hidden_sizes=(8,), device="meta", dtype=torch.float64)

    def closure_for(model):
        def closure(ctx):
            agents = ctx.agents
            obs, actions, old = batch["obs"], batch["actions"], batch["old_log_prob"]
            own = Categorical(logits=model(obs[agents.start : agents.stop])).log_prob(
                actions[agents.start : agents.stop]
            )
            anticipated = None
            if ctx.level > 1:
                with ctx.anticipated():
                    logits = torch.func.functional_call(skeleton, ctx.gather_anticipated_parameters(model), (obs,))
                    anticipated = Categorical(logits=logits).log_prob(actions)
            log_prob = (old if anticipated is None else anticipated).clone()
            log_prob[agents.start : agents.stop] = own
            loss = kpg.joint_ratio_loss(log_prob, old, batch["advantages"], anticipated, level=ctx.level).loss
            return loss[agents.start : agents.stop]

        return closure

    sharded = kpg.KPGOptimizer(
        local, k=2, lr=0.05, max_grad_norm=0.3, process_group=dist.group.WORLD, parallel="agents"
    )
    reference = kpg.KPGOptimizer(whole, k=2, lr=0.05, max_grad_norm=0.3)
    for _ in range(3):
        sharded.step(closure_for(local))
        reference.step(closure_for(whole))
    theirs = [p[mine.start : mine.stop] for p in whole.parameters()]
    return {"parameters": _max_difference(list(local.parameters()), theirs)}


def failures_agree(rank, world, workdir):
    """A closure error, a non-finite loss and mismatched k on one rank: every rank raises, nothing
    changes anywhere, and the next step works."""
    policies = _policies()
    opt = kpg.KPGOptimizer(policies, k=2, lr=0.05, process_group=dist.group.WORLD, verify_replicas=True)
    batch = _share(_batch(world, 0), rank)
    good = _joint_ratio_closure(policies, batch)
    opt.step(good)
    before = [p.detach().clone() for m in policies for p in m.parameters()]
    state_before = [t.clone() for m in policies for p in m.parameters() for t in opt.state[p].values()]
    outcomes = {}

    def failing(ctx):
        if rank == world - 1 and ctx.level == 2:
            raise ValueError(f"boom on rank {rank}")
        return good(ctx)

    poisoned = dict(batch, advantages=batch["advantages"].clone())
    if rank == world - 1:
        poisoned["advantages"][2, 0] = math.nan
    for name, closure in [("error", failing), ("nonfinite", _joint_ratio_closure(policies, poisoned))]:
        try:
            opt.step(closure)
            outcomes[name] = "no error"
        except Exception as error:  # the finding is the error itself
            outcomes[name] = f"{type(error).__name__}: {error}"
    opt.k = 3 if rank == 0 else 2
    try:
        opt.step(good)
        outcomes["k"] = "no error"
    except Exception as error:
        outcomes["k"] = f"{type(error).__name__}: {error}"
    opt.k = 2
    unchanged = _max_difference(before, [p for m in policies for p in m.parameters()]) == 0.0
    state_unchanged = (
        _max_difference(state_before, [t for m in policies for p in m.parameters() for t in opt.state[p].values()])
        == 0.0
    )
    opt.step(good)  # the group still works, and verify_replicas checks the ranks agree
    return {**outcomes, "unchanged": unchanged, "state_unchanged": state_unchanged}


def sharded_nonfinite_agrees(rank, world, workdir):
    """Agent sharding: a non-finite loss of the last rank's agent is raised on every rank, by its global index."""
    mine = agent_range(NUM_AGENTS, dist.group.WORLD)
    policies = _policies()
    opt = kpg.KPGOptimizer([policies[a] for a in mine], k=2, lr=0.05, process_group=dist.group.WORLD, parallel="agents")
    batch = _batch(1, 0)
    batch["advantages"][NUM_AGENTS - 1, 0] = math.nan
    try:
        opt.step(_joint_ratio_closure(policies, batch))
        return {"error": "no error"}
    except FloatingPointError as error:
        return {"error": str(error)}


def replicas_disagree(rank, world, workdir):
    policies = _policies()
    if rank == 1:
        with torch.no_grad():
            policies[3][0].bias[2] += 1e-3
    try:
        kpg.KPGOptimizer(policies, process_group=dist.group.WORLD)
        return {"error": "no error"}
    except ValueError as error:
        return {"error": str(error)}


def rank_crashes(rank, world, workdir):
    """The last rank dies at level 2; the others must stop with a clear error, long before the timeout."""
    policies = _policies()
    opt = kpg.KPGOptimizer(policies, k=2, lr=0.05, process_group=dist.group.WORLD)
    good = _joint_ratio_closure(policies, _share(_batch(world, 0), rank))

    def crashing(ctx):
        if rank == world - 1 and ctx.level == 2:
            os._exit(3)
        return good(ctx)

    started = time.monotonic()
    try:
        opt.step(crashing)
        return {"error": "no error"}
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}", "seconds": time.monotonic() - started}


def _train_config(workdir: Path, **changes):
    from kpg.algos.mappo import MAPPOConfig
    from kpg.app.train import TrainConfig

    base = TrainConfig(
        steps=300,
        copies=6,
        logdir=workdir,
        name="mappo-dp",
        progress=False,
        tensorboard=False,
        eval_episodes=2,
        checkpoint_every=1,
        mappo=MAPPOConfig(rollout=25, epochs=2, minibatches=2, hidden=(16,)),
    )
    return dataclasses.replace(base, **changes)


def mappo_trains(rank, world, workdir):
    from kpg.app.train import train

    summary = train(_train_config(workdir.parent))
    return {"env_steps": summary["env_steps"], "updates": summary["updates"], "has_eval": "eval_return" in summary}


def mappo_resumes(rank, world, workdir):
    from kpg.app.train import train

    summary = train(_train_config(workdir.parent, steps=450, resume=True))
    return {"env_steps": summary["env_steps"], "updates": summary["updates"]}


OFF_POLICY_SAMPLES_PER_RANK = 4


def _off_policy_trainer(algo: str, group):
    from kpg.algos import FACMACConfig, FACMACTrainer, MADDPGConfig, MADDPGTrainer
    from kpg.envs import EnvPool, make_env_factory

    trainer_class, config_class = {"maddpg": (MADDPGTrainer, MADDPGConfig), "facmac": (FACMACTrainer, FACMACConfig)}[
        algo
    ]
    extra = dict(mixer_embed=4, hypernet_embed=6) if algo == "facmac" else {}
    config = config_class(batch_size=6 * OFF_POLICY_SAMPLES_PER_RANK, hidden=(8,), actor_regularization=0.1, **extra)
    pool = EnvPool(make_env_factory("simple_spread", agents=3), 1, seed=0)
    return trainer_class(pool, config, k=2, k_until=None, device="cpu", seed=0, process_group=group)


def _off_policy_minibatch(trainer, world: int, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The whole minibatch of a gradient step (rank r's share is its r-th block of rows) and its
    Gumbel noise [agents, rows, actions]; every agent acted, so equal shares weigh alike."""
    from kpg.algos.common import gumbel_noise
    from kpg.algos.replay import transition_fields

    generator = torch.Generator().manual_seed(200 + step)
    rows = world * OFF_POLICY_SAMPLES_PER_RANK
    spaces = trainer.spaces
    batch = {
        name: torch.randn((rows, *shape), generator=generator, dtype=dtype)
        for name, (shape, dtype) in transition_fields(spaces, torch.float64).items()
    }
    choices = torch.randint(0, spaces.action_size, (rows, spaces.num_agents), generator=generator)
    batch["actions"] = nn.functional.one_hot(choices, spaces.action_size).double()
    batch["alive"] = batch["next_present"] = torch.ones(rows, spaces.num_agents, dtype=torch.float64)
    batch["terminated"] = (batch["terminated"] > 1.0).double()
    noise = gumbel_noise((spaces.num_agents, rows, spaces.action_size), generator, "cpu", torch.float64)
    return batch, noise


def off_policy_step_parity(rank, world, workdir):
    """Per algorithm: 3 gradient steps data-parallel on this rank's rows vs one process on all rows."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        differences = {}
        for algo in ("maddpg", "facmac"):
            distributed, single = _off_policy_trainer(algo, dist.group.WORLD), _off_policy_trainer(algo, None)
            initial = [p.detach().clone() for p in distributed.actor.parameters()]
            rows = slice(rank * OFF_POLICY_SAMPLES_PER_RANK, (rank + 1) * OFF_POLICY_SAMPLES_PER_RANK)
            for step in range(3):
                batch, noise = _off_policy_minibatch(single, world, step)
                distributed.gradient_step({name: value[rows] for name, value in batch.items()}, noise[:, rows])
                single.gradient_step(batch, noise)
            modules = ("actor", "critic", "target_actor", "target_critic")
            differences[algo] = {
                **{
                    name: _max_difference(
                        list(getattr(distributed, name).parameters()), list(getattr(single, name).parameters())
                    )
                    for name in modules
                },
                "critic_optimizer": _max_difference(
                    [t for s in distributed.critic_optimizer.state.values() for t in s.values()],
                    [t for s in single.critic_optimizer.state.values() for t in s.values()],
                ),
                "actor_moved": _max_difference(list(distributed.actor.parameters()), initial),
            }
        return differences
    finally:
        torch.set_default_dtype(previous)


def _facmac_train_config(workdir: Path, **changes):
    from kpg.algos.facmac import FACMACConfig
    from kpg.app.train import TrainConfig

    facmac = FACMACConfig(
        buffer_size=400,
        batch_size=8,
        rollout=25,
        updates_per_iteration=2,
        learning_starts=50,
        hidden=(8,),
        mixer_embed=4,
        hypernet_embed=6,
    )
    base = TrainConfig(
        algo="facmac",
        steps=300,
        copies=2,
        logdir=workdir,
        name="facmac-dp",
        progress=False,
        tensorboard=False,
        eval_episodes=0,
        checkpoint_every=2,
        facmac=facmac,
    )
    return dataclasses.replace(base, **changes)


def facmac_trains(rank, world, workdir):
    from kpg.app.train import train

    summary = train(_facmac_train_config(workdir.parent))
    return {"env_steps": summary["env_steps"], "updates": summary["updates"]}


def facmac_resumes(rank, world, workdir):
    from kpg.app.train import train

    summary = train(_facmac_train_config(workdir.parent, steps=400, resume=True))
    return {"env_steps": summary["env_steps"], "updates": summary["updates"]}


def mappo_rank_stops_at_once(rank, world, workdir):
    """Rank 1 is stopped at once (a second Ctrl-C) inside its second update: no rank can meet the
    others for a final checkpoint, and each says so. Breaks the process group: run it last."""
    import contextlib
    import io

    from kpg.algos.mappo import MAPPOTrainer
    from kpg.app.train import train

    original, calls = MAPPOTrainer.iteration, []

    def stopped_in_second_iteration(self):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            raise KeyboardInterrupt
        return original(self)

    MAPPOTrainer.iteration = stopped_in_second_iteration
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            train(_train_config(workdir.parent, steps=900, name="mappo-stopped"))
        outcome = "finished"
    except BaseException as error:  # KeyboardInterrupt on rank 1, the lost collective on rank 0
        outcome = type(error).__name__
    finally:
        MAPPOTrainer.iteration = original
    return {"outcome": outcome, "stderr": stderr.getvalue()}


def facmac_uninterrupted(rank, world, workdir):
    from kpg.app.train import train

    summary = train(_facmac_train_config(workdir.parent, steps=400, name="facmac-whole"))
    return {"env_steps": summary["env_steps"], "updates": summary["updates"]}


SCENARIOS = {
    f.__name__: f
    for f in [
        data_parallel_parity,
        data_parallel_reached_on_one_rank,
        data_parallel_shared_network,
        agent_sharded_outputs,
        agent_sharded_parameters,
        failures_agree,
        sharded_nonfinite_agrees,
        replicas_disagree,
        rank_crashes,
        mappo_trains,
        mappo_resumes,
        off_policy_step_parity,
        facmac_trains,
        facmac_resumes,
        facmac_uninterrupted,
        mappo_rank_stops_at_once,
    ]
}


# ---- the tests -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    two = launch(
        2,
        [
            "data_parallel_parity",
            "data_parallel_shared_network",
            "data_parallel_reached_on_one_rank",
            "agent_sharded_outputs",
            "agent_sharded_parameters",
            "failures_agree",
            "sharded_nonfinite_agrees",
            "replicas_disagree",
            "mappo_trains",
            "mappo_rank_stops_at_once",
        ],
        root / "two",
    )
    three = launch(
        3,
        ["data_parallel_parity", "agent_sharded_outputs", "agent_sharded_parameters", "mappo_resumes", "rank_crashes"],
        root / "three",
    )
    off_policy = launch(
        2, ["off_policy_step_parity", "facmac_trains", "facmac_resumes", "facmac_uninterrupted"], root / "off_policy"
    )
    return {2: two, 3: three, "off_policy": off_policy, "root": root}


@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_steps_equal_one_process_on_the_whole_batch(runs, world):
    for rank in range(world):
        for found in result(runs[world], rank, "data_parallel_parity")["differences"]:
            assert found["moved"] > 1e-3, f"{found['case']}: the steps did not move the parameters"
            assert found["parameters"] <= F64_TOLERANCE, f"rank {rank}, {found}"
            assert found["state"] <= F64_TOLERANCE, f"rank {rank}, {found}"


def test_a_parameter_one_rank_reaches_is_stepped_on_every_rank(runs):
    moved = [result(runs[2], rank, "data_parallel_reached_on_one_rank")["head_moved"] for rank in range(2)]
    assert moved[0] == moved[1] > 0


def test_data_parallel_with_a_shared_network(runs):
    for rank in range(2):
        assert result(runs[2], rank, "data_parallel_shared_network")["parameters"] <= F64_TOLERANCE


@pytest.mark.parametrize("world", [2, 3])
def test_agent_sharded_steps_equal_unsharded_ones(runs, world):
    owned = []
    for rank in range(world):
        found = result(runs[world], rank, "agent_sharded_outputs")
        owned.append(found["agents"])
        for case in found["differences"]:
            assert case["parameters"] <= F64_TOLERANCE, f"rank {rank}, {case}"
        assert result(runs[world], rank, "agent_sharded_parameters")["parameters"] <= F64_TOLERANCE
    assert owned == ([[0, 3], [3, 5]] if world == 2 else [[0, 2], [2, 4], [4, 5]])


def test_a_failure_on_one_rank_is_raised_on_every_rank_and_changes_nothing(runs):
    failing = result(runs[2], 1, "failures_agree")
    other = result(runs[2], 0, "failures_agree")
    assert failing["error"] == "ValueError: boom on rank 1"
    assert other["error"].startswith(
        "RuntimeError: rank 1 failed at level 2 of the KPG step with ValueError: boom on rank 1"
    )
    for found in (failing, other):
        assert found["nonfinite"].startswith("FloatingPointError: agent 2's loss is not finite at level 1")
        assert "different k" in found["k"] and "rank 0: k=3" in found["k"]
        assert found["unchanged"] and found["state_unchanged"]


def test_agent_sharded_nonfinite_names_the_global_agent_on_every_rank(runs):
    for rank in range(2):
        assert result(runs[2], rank, "sharded_nonfinite_agrees")["error"].startswith(
            "agent 4's loss is not finite at level 1"
        )


def test_replicas_that_disagree_are_refused_on_every_rank(runs):
    for rank in range(2):
        error = result(runs[2], rank, "replicas_disagree")["error"]
        assert (
            "the agents' parameters differ across ranks (rank 1: 1 differing values" in error
            and "broadcast_parameters" in error
        )


def test_a_rank_that_dies_stops_the_others_quickly(runs):
    for rank in range(2):
        found = result(runs[3], rank, "rank_crashes")
        assert found["error"].startswith(f"CommunicationError: rank {rank}: "), found["error"]
        assert "another rank stopped" in found["error"]
        assert found["seconds"] < PROCESS_GROUP_TIMEOUT.total_seconds() / 2, found


def test_mappo_trains_data_parallel_and_resumes_on_another_number_of_ranks(runs):
    from kpg.app.checkpoint import load_checkpoint

    for rank in range(2):
        found = result(runs[2], rank, "mappo_trains")
        assert found["env_steps"] == 300 and found["updates"] == 2  # 6 copies x 25 steps per update, over 2 ranks
        assert found["has_eval"] == (rank == 0)
    for rank in range(3):
        assert result(runs[3], rank, "mappo_resumes") == {"env_steps": 450, "updates": 3}
    run_dir = runs["root"] / "mappo-dp"
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(rows) == 4  # header and 3 updates: written by rank 0 only, appended on resume
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert len(state["ranks"]) == 3 and state["trainer"]["env_steps"] == 450
    seeds = [s for r in state["ranks"] for s in r["pool"]["episode_seeds"]]
    assert len(seeds) == len(set(seeds)) == 6


def test_ranks_that_cannot_meet_for_a_final_checkpoint_say_so(runs):
    from kpg.app.checkpoint import load_checkpoint

    outcomes = {rank: result(runs[2], rank, "mappo_rank_stops_at_once") for rank in range(2)}
    assert outcomes[1]["outcome"] == "KeyboardInterrupt" and outcomes[0]["outcome"] == "CommunicationError", outcomes
    for rank, found in outcomes.items():
        assert (
            f"rank {rank}: the ranks cannot meet to write a final checkpoint (a rank stopped at once or failed); "
            "the checkpoint of update 1 stands"
        ) in found["stderr"], found
    assert load_checkpoint(runs["root"] / "mappo-stopped" / "checkpoint.pt")["trainer"]["updates"] == 1


@pytest.mark.parametrize("algo", ["maddpg", "facmac"])
def test_off_policy_data_parallel_steps_equal_one_process_on_the_whole_minibatch(runs, algo):
    for rank in range(2):
        found = result(runs["off_policy"], rank, "off_policy_step_parity")[algo]
        assert found["actor_moved"] > 1e-3, f"rank {rank}: the steps did not move the actors"
        for name in ("actor", "critic", "target_actor", "target_critic", "critic_optimizer"):
            assert found[name] <= F64_TOLERANCE, f"rank {rank}, {name}: {found}"


def test_facmac_trains_data_parallel_and_checkpoints_every_ranks_replay(runs):
    from kpg.app.checkpoint import load_checkpoint

    for rank in range(2):
        # 2 copies x 25 steps per update over 2 ranks; learning starts after the first update.
        assert result(runs["off_policy"], rank, "facmac_trains") == {"env_steps": 300, "updates": 6}
        assert result(runs["off_policy"], rank, "facmac_resumes") == {"env_steps": 400, "updates": 8}
    run_dir = runs["root"] / "facmac-dp"
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(rows) == 9  # header and 8 updates: written by rank 0 only, appended on resume
    header, last = rows[0].split(","), dict(zip(rows[0].split(","), rows[-1].split(",")))
    assert last["env_steps"] == "400" and math.isfinite(float(last["critic_loss"])) and "critic_loss" in header
    state = load_checkpoint(run_dir / "checkpoint.pt")
    replays = [r["trainer"]["replay"] for r in state["ranks"]]
    # Each rank's own transitions: 200 of the 400 environment steps, half the buffer of 400 rows.
    assert [replay["capacity"] for replay in replays] == [200, 200] and [replay["size"] for replay in replays] == [
        200,
        200,
    ]
    assert not torch.equal(replays[0]["storage"]["obs"], replays[1]["storage"]["obs"])
    assert torch.equal(state["trainer"]["replay"]["storage"]["obs"], replays[0]["storage"]["obs"])
    # Resumed on as many ranks, the run ends exactly where an uninterrupted one does, every rank's state included.
    assert result(runs["off_policy"], 0, "facmac_uninterrupted") == {"env_steps": 400, "updates": 8}
    whole = load_checkpoint(runs["root"] / "facmac-whole" / "checkpoint.pt")
    _assert_same_state(whole["trainer"], state["trainer"], "trainer")
    _assert_same_state(whole["ranks"], state["ranks"], "ranks")


def _assert_same_state(expected, actual, where):
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual), f"{where} differs"
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), f"{where}: keys differ"
        for key in expected:
            _assert_same_state(expected[key], actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), f"{where}: lengths differ"
        for i, (e, a) in enumerate(zip(expected, actual)):
            _assert_same_state(e, a, f"{where}[{i}]")
    else:
        assert expected == actual, f"{where}: {expected!r} != {actual!r}"


# ---- the process group a run initializes is gone before the interpreter shuts down ----------------------

_RANK_THAT_CLOSES_ITS_RUN = """
import gc, json, os
import torch
from kpg.app.run_context import RunContext

run = RunContext.from_environment("cpu")
# A trainer's first torch.optim optimizer, which imports torch.distributed.nn.
torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
run.close()
del run
gc.collect()
print(json.dumps(sorted(open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task"))))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="thread names are read from Linux's /proc")
def test_a_run_that_closes_stops_gloo_threads_before_interpreter_shutdown():
    """RunContext.close() frees the group it initialized, so gloo's worker threads are joined while
    the interpreter is whole; threads left running into interpreter shutdown aborted a finished rank
    ("terminate called without an active exception", exit code 1 from torchrun)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_THAT_CLOSES_ITS_RUN],
            env={
                **os.environ,
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": "2",
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    for rank, process in enumerate(ranks):
        stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT)
        assert process.returncode == 0, stderr
        threads = json.loads(stdout.strip().splitlines()[-1])
        assert not [name for name in threads if "gloo" in name], f"rank {rank} still runs {threads} after close()"
