"""Bad input to the public entry points: a clear Python exception, no crash, no hang, nothing
changed. The ops' argument table lives in test_ops.py and the optimizer's in test_optim_errors.py;
this file covers memory that is freed, shared or rebound behind kpg's back, odd hyperparameters and
state dicts, environments that break their own spaces, and damaged checkpoints."""

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from cases import UPDATE_CASES
from torch import nn

import kpg
from kpg import _ops as ops
from kpg.app.checkpoint import load_checkpoint, save_checkpoint
from kpg.envs import EnvPool

from helpers import Arena, rows

SIZES = [3, 0, 17, 5]
F64 = torch.float64


def _commit_call(case: str, dtype=torch.float32):
    kind, hyper = UPDATE_CASES[case]
    arena = Arena(kind, SIZES, dtype, seed=3).warm_up(kind, hyper)
    return ops.UPDATE_OPS[(kind, True)], {**arena.commit_args(), **rows(kind, hyper, arena.step)}


def _norms_call():
    arena = Arena("sgd", SIZES, torch.float32, seed=4)
    a = len(SIZES)
    return ops.agent_grad_norms, dict(
        grad=arena.grad,
        chunks=arena.chunks,
        agent_chunks=arena.agent_chunks,
        chunk_sq=torch.zeros(arena.chunks.shape[0], dtype=F64),
        max_norm=torch.full((a,), 0.5, dtype=F64),
        norm=torch.zeros(a, dtype=F64),
        grad_scale=torch.zeros(a, dtype=F64),
        nonfinite=torch.zeros(a, dtype=torch.uint8),
    )


def _freed(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor whose storage was released after it was made (as FSDP-style code does)."""
    alias = tensor.detach().clone()
    alias.untyped_storage().resize_(0)
    return alias


def _shrunk(tensor: torch.Tensor) -> torch.Tensor:
    alias = tensor.detach().clone()
    alias.untyped_storage().resize_(tensor.element_size())
    return alias


def _float64_step_inside_param(arguments):
    """step aliasing the first elements of a float64 param: the commit would write both."""
    param = arguments["param"]
    return {**arguments, "step": param[: arguments["step"].numel()]}


OP_CASES = [
    (
        "param-storage-freed",
        lambda: _commit_call("adam"),
        lambda a: {**a, "param": _freed(a["param"])},
        r"adam_commit: param needs \d+ bytes of storage but its storage holds 0: it was freed or resized",
    ),
    (
        "grad-storage-shrunk",
        lambda: _commit_call("sgd-momentum-dampening-wd"),
        lambda a: {**a, "grad": _shrunk(a["grad"])},
        r"sgd_commit: grad needs \d+ bytes of storage but its storage holds 4",
    ),
    (
        "state-storage-freed",
        lambda: _commit_call("rmsprop-centered-momentum-wd"),
        lambda a: {**a, "grad_avg": _freed(a["grad_avg"])},
        r"rmsprop_commit: grad_avg needs .* holds 0",
    ),
    (
        "step-storage-freed",
        lambda: _commit_call("adam"),
        lambda a: {**a, "step": _freed(a["step"])},
        r"adam_commit: step needs .* holds 0",
    ),
    (
        "chunks-storage-freed",
        lambda: _commit_call("adam"),
        lambda a: {**a, "chunks": _freed(a["chunks"])},
        r"adam_commit: chunks needs .* holds 0",
    ),
    (
        "step-aliases-param",
        lambda: _commit_call("adam", torch.float64),
        _float64_step_inside_param,
        r"adam_commit: param overlaps step in memory",
    ),
    (
        "lr-aliases-written-state",
        lambda: _commit_call("sgd-momentum-dampening-wd", torch.float64),
        lambda a: {**a, "lr": a["momentum_buffer"][: a["lr"].numel()]},
        r"sgd_commit: momentum_buffer overlaps lr in memory",
    ),
    (
        "step-on-another-device",
        lambda: _commit_call("adam"),
        lambda a: {**a, "step": a["step"].to("meta")},
        r"adam_commit: step is on the meta device, which holds no values to update",
    ),
    (
        "norms-norm-is-grad-scale",
        _norms_call,
        lambda a: {**a, "grad_scale": a["norm"]},
        r"agent_grad_norms: norm overlaps grad_scale in memory",
    ),
    (
        "norms-grad-storage-freed",
        _norms_call,
        lambda a: {**a, "grad": _freed(a["grad"])},
        r"agent_grad_norms: grad needs .* holds 0",
    ),
    # An expanded tensor has stride 0: read as a flat table it runs past its one-element storage.
    (
        "norms-agent-chunks-expanded",
        _norms_call,
        lambda a: {**a, "agent_chunks": torch.zeros(1, dtype=torch.int64).expand(len(SIZES) + 1)},
        r"agent_grad_norms: agent_chunks must be contiguous",
    ),
]


def _storage_bits(tensor):
    """Every byte of the tensor's storage; none for freed storage and meta tensors (no values)."""
    storage = tensor.untyped_storage()
    if tensor.device.type == "meta" or storage.nbytes() == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(storage).clone()


@pytest.mark.parametrize("call,breaks,match", [c[1:] for c in OP_CASES], ids=[c[0] for c in OP_CASES])
def test_ops_reject_freed_and_aliased_memory_without_touching_it(call, breaks, match):
    op, valid = call()
    bad = breaks(valid)
    before = {name: _storage_bits(t) for name, t in bad.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(ValueError, match=match):
        op(**bad)
    for name, bits in before.items():
        assert torch.equal(_storage_bits(bad[name]), bits), f"the failed call changed {name}"


@pytest.mark.parametrize("case", ["sgd-nesterov-maximize", "adam-l2-amsgrad-maximize", "rmsprop-centered-momentum-wd"])
def test_ops_on_zero_agents_do_nothing(case):
    kind, hyper = UPDATE_CASES[case]
    arena = Arena(kind, [], torch.float32, seed=0)
    ops.UPDATE_OPS[(kind, True)](**arena.commit_args(), **rows(kind, hyper, arena.step))
    ops.UPDATE_OPS[(kind, False)](**arena.anticipate_args(torch.empty(0)), **rows(kind, hyper, arena.step))
    assert arena.param.numel() == 0 and arena.step.numel() == 0


# ---- KPGOptimizer -----------------------------------------------------------------------------


class TwoAgents:
    def __init__(self, dtype=torch.float32):
        torch.manual_seed(0)
        self.models = [nn.Linear(3, 2).to(dtype), nn.Linear(3, 1).to(dtype)]
        self.x = torch.randn(5, 3, dtype=dtype)
        self.optimizer = kpg.KPGOptimizer(self.models, k=2, lr=0.1)
        self.optimizer.step(self.closure)

    def closure(self, ctx):
        own = [m(self.x) for m in self.models]
        with ctx.anticipated():
            other = [m(self.x) for m in self.models]
        return torch.stack([(own[0].sum(1) * other[1][:, 0]).mean(), (own[1][:, 0] - other[0].sum(1)).square().mean()])

    def snapshot(self):
        return copy.deepcopy(self.optimizer.state_dict()), self.optimizer.arena.param.clone()

    def assert_unchanged(self, before):
        state, param = before
        assert torch.equal(self.optimizer.arena.param, param), "the arena's parameters changed"
        for index, entry in state["state"].items():
            for name, value in entry.items():
                assert torch.equal(self.optimizer.state_dict()["state"][index][name], value), f"state {name} changed"


def _rebind(problem):
    problem.models[0].weight.data = torch.zeros(2, 3)


def _convert(problem):
    problem.models[1].double()


def _free(problem):
    problem.models[1].bias.untyped_storage().resize_(0)


@pytest.mark.parametrize(
    "tamper,owner",
    [
        (_rebind, "agent 0's parameter of shape \\(2, 3\\)"),
        (_convert, "agent 1's parameter of shape \\(1, 3\\)"),
        (_free, "agent 0's parameter of shape \\(2, 3\\)"),
    ],
    ids=["data-replaced", "module-converted-to-float64", "storage-freed"],
)
def test_step_refuses_parameters_detached_from_the_arena(tamper, owner):
    """Without the check a replaced .data trains a copy the optimizer never sees (silently wrong),
    and freed storage sends the kernels into released memory."""
    problem = TwoAgents()
    freed = tamper is _free
    before = None if freed else problem.snapshot()
    tamper(problem)
    with pytest.raises(RuntimeError, match=owner + " is no longer a view of the optimizer's arena"):
        problem.optimizer.step(problem.closure)
    if before is not None:
        problem.assert_unchanged(before)


def test_values_changed_in_place_are_trained():
    problem = TwoAgents()
    with torch.no_grad():
        problem.models[0].weight.copy_(torch.ones(2, 3))
    assert torch.equal(problem.optimizer.arena.param[:6], torch.ones(6))
    problem.optimizer.step(problem.closure)


CONSTRUCTION_ERRORS = [
    ("empty-parameter-lists", lambda: kpg.KPGOptimizer([[], []]), r"agent 0 has no trainable parameters"),
    (
        "module-without-parameters",
        lambda: kpg.KPGOptimizer([nn.Linear(2, 2), nn.Tanh()]),
        r"agent 1 has no trainable parameters",
    ),
    ("zero-agents-generator", lambda: kpg.KPGOptimizer(m for m in []), r"got no agents"),
    (
        "zero-agent-batched-model",
        lambda: kpg.KPGOptimizer([torch.zeros(0, 2, requires_grad=True)], agent_dim=0),
        r"agent dimension of size 0",
    ),
    (
        "weight-decay-inf",
        lambda: kpg.KPGOptimizer([nn.Linear(2, 2)], weight_decay=math.inf),
        r"Invalid weight_decay value: inf; it must be a finite",
    ),
    (
        "momentum-inf",
        lambda: kpg.KPGOptimizer([nn.Linear(2, 2)], optimizer="sgd", momentum=math.inf),
        r"Invalid momentum value: inf",
    ),
    (
        "dampening-nan",
        lambda: kpg.KPGOptimizer([nn.Linear(2, 2)], optimizer="sgd", dampening=math.nan),
        r"Invalid dampening value: nan",
    ),
    (
        "alpha-nan",
        lambda: kpg.KPGOptimizer([nn.Linear(2, 2)], optimizer="rmsprop", alpha=math.nan),
        r"Invalid alpha value: nan",
    ),
    ("eps-inf", lambda: kpg.KPGOptimizer([nn.Linear(2, 2)], eps=math.inf), r"Invalid eps value: inf"),
    ("lr-nan", lambda: kpg.KPGOptimizer([nn.Linear(2, 2)], lr=math.nan), r"Invalid learning rate nan for agent 0"),
    (
        "max-grad-norm-nan",
        lambda: kpg.KPGOptimizer([nn.Linear(2, 2)], max_grad_norm=math.nan),
        r"Invalid max_grad_norm nan",
    ),
]


@pytest.mark.parametrize("build,match", [c[1:] for c in CONSTRUCTION_ERRORS], ids=[c[0] for c in CONSTRUCTION_ERRORS])
def test_construction_rejects(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def _state_with(change):
    def breaks(problem):
        state = problem.optimizer.state_dict()
        change(state)
        return state

    return breaks


STATE_DICT_ERRORS = [
    ("not-a-dict", lambda problem: "checkpoint.pt", r"needs an optimizer state dict .* got str"),
    ("empty-dict", lambda problem: {}, r"needs an optimizer state dict .* got dict with keys \[\]"),
    (
        "model-state-dict",
        lambda problem: problem.models[0].state_dict(),
        r"got OrderedDict with keys \['bias', 'weight'\]",
    ),
    (
        "lr-nan",
        _state_with(lambda s: s["param_groups"][1].update(lr=math.nan)),
        r"Invalid learning rate nan for agent 1",
    ),
    (
        "moments-nan",
        _state_with(lambda s: s["state"][2]["exp_avg_sq"].fill_(math.nan)),
        r"'exp_avg_sq' of agent 1's parameter of shape \(1, 3\) holds inf or NaN",
    ),
    (
        "beta-one",
        _state_with(lambda s: s["param_groups"][1].update(betas=(0.9, 1.0))),
        r"Invalid beta parameter at index 1: 1.0 \(agent 1's betas\)",
    ),
]


@pytest.mark.parametrize("breaks,match", [c[1:] for c in STATE_DICT_ERRORS], ids=[c[0] for c in STATE_DICT_ERRORS])
def test_load_state_dict_rejects_without_changing_anything(breaks, match):
    problem = TwoAgents()
    bad = breaks(problem)
    before = problem.snapshot()
    groups = copy.deepcopy(problem.optimizer.param_groups)
    hyperparameters = dict(problem.optimizer.hyperparameters)
    with pytest.raises(ValueError, match=match):
        problem.optimizer.load_state_dict(bad)
    problem.assert_unchanged(before)
    assert [g["lr"] for g in problem.optimizer.param_groups] == [g["lr"] for g in groups]
    assert problem.optimizer.hyperparameters == hyperparameters


def test_nan_inputs_reach_no_parameter():
    """NaN in the data (not in the parameters) makes the losses NaN: the step is refused, the
    models keep their values, and the next step with clean data works."""
    problem = TwoAgents()
    before = problem.snapshot()
    clean = problem.x.clone()
    problem.x[2, 1] = math.nan
    with pytest.raises(FloatingPointError, match="agent 0's loss is not finite at level 1"):
        problem.optimizer.step(problem.closure)
    problem.assert_unchanged(before)
    problem.x = clean
    problem.optimizer.step(problem.closure)
    assert bool(torch.isfinite(problem.optimizer.arena.param).all())


# ---- environments ----------------------------------------------------------------------------


class MisbehavingEnv:
    """A PettingZoo Parallel environment whose observations break its observation space when told."""

    metadata = {"name": "misbehaving"}

    def __init__(self, bad_obs_at_step=None, bad_obs_at_reset=False):
        from gymnasium import spaces

        self.possible_agents = ["a_0", "a_1"]
        self.agents = list(self.possible_agents)
        self._obs_space, self._action_space = spaces.Box(-1, 1, (4,), np.float32), spaces.Discrete(3)
        self.bad_obs_at_step, self.bad_obs_at_reset, self.t = bad_obs_at_step, bad_obs_at_reset, 0

    def observation_space(self, agent):
        return self._obs_space

    def action_space(self, agent):
        return self._action_space

    def state(self):
        raise NotImplementedError

    def _observations(self, bad):
        return {a: np.zeros(5 if bad and a == "a_1" else 4, dtype=np.float32) for a in self.agents}

    def reset(self, seed=None, options=None):
        self.agents, self.t = list(self.possible_agents), 0
        return self._observations(self.bad_obs_at_reset and seed not in (None, 0)), {a: {} for a in self.agents}

    def step(self, actions):
        self.t += 1
        obs = self._observations(self.t == self.bad_obs_at_step)
        zeros = dict.fromkeys(self.agents, 0.0)
        return (
            obs,
            zeros,
            dict.fromkeys(self.agents, False),
            dict.fromkeys(self.agents, False),
            {a: {} for a in self.agents},
        )

    def close(self):
        pass


def test_observation_of_the_wrong_shape_names_the_agent():
    pool = EnvPool(lambda: MisbehavingEnv(bad_obs_at_step=2), copies=2, seed=0)
    pool.step(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(
        ValueError, match=r"agent 'a_1' got an observation of shape \(5,\) \(5 values\) but its observation space has 4"
    ):
        pool.step(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"agent 'a_1' got an observation of shape \(5,\)"):
        EnvPool(lambda: MisbehavingEnv(bad_obs_at_reset=True), copies=1, seed=3)


def test_actions_of_the_wrong_shape_are_refused_before_any_environment_steps():
    pool = EnvPool(lambda: MisbehavingEnv(), copies=2, seed=0)
    steps_before = [env.t for env in pool.envs]
    with pytest.raises(
        ValueError, match=r"EnvPool.step got actions of shape \(2, 3\); expected \(2, 2\) \(copies, agents\)"
    ):
        pool.step(np.zeros((2, 3), dtype=np.int64))
    assert [env.t for env in pool.envs] == steps_before


# ---- checkpoints -----------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    path = tmp_path / "run" / "checkpoint.pt"
    save_checkpoint(path, {"weights": torch.arange(5000.0), "step": 7})
    return path


def _damage(path: Path, edit) -> None:
    path.write_bytes(edit(bytearray(path.read_bytes())))


def _flip(offset_fraction):
    def edit(data):
        data[int(len(data) * offset_fraction)] ^= 0x01
        return bytes(data)

    return edit


DAMAGE = {
    "bit-flip-early": _flip(0.1),
    "bit-flip-middle": _flip(0.5),
    "bit-flip-late": _flip(0.9),
    "truncated-to-one-byte": lambda data: bytes(data[:1]),
    "truncated-to-half": lambda data: bytes(data[: len(data) // 2]),
    "last-byte-missing": lambda data: bytes(data[:-1]),
    "empty": lambda data: b"",
    "text": lambda data: b"not a checkpoint\n",
}


@pytest.mark.parametrize("edit", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_checkpoint_is_detected_and_named(checkpoint, edit):
    _damage(checkpoint, edit)
    with pytest.raises(
        ValueError, match=rf"checkpoint {checkpoint} (is corrupt|is damaged|cannot be read|is not a kpg)"
    ):
        load_checkpoint(checkpoint)


def test_checkpoint_of_another_format_is_refused(checkpoint):
    torch.save({"weights": torch.zeros(3)}, checkpoint)  # a pickle: kpg reads none (tests/test_checkpoints.py)
    with pytest.raises(ValueError, match=rf"checkpoint {checkpoint} is a pickle .*kpg does not read it"):
        load_checkpoint(checkpoint)


def test_resume_from_a_damaged_checkpoint_names_it_and_leaves_the_run_alone(checkpoint):
    from kpg.app.train import TrainConfig, train

    run_dir = checkpoint.parent
    (run_dir / "metrics.csv").write_text("env_steps,updates\n100,1\n")
    _damage(checkpoint, _flip(0.5))
    files_before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    config = TrainConfig(
        steps=200,
        copies=2,
        logdir=run_dir.parent,
        name="run",
        resume=True,
        progress=False,
        tensorboard=False,
        eval_episodes=0,
    )
    with pytest.raises(ValueError, match=rf"checkpoint {checkpoint} (is corrupt|cannot be read)"):
        train(config)
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == files_before


@pytest.mark.parametrize("option, value", [("lr_anneal_steps", 10_000_000), ("gru", "flax"), ("lr_anneal", True)])
def test_recurrent_trainer_options_without_it_are_refused(option, value):
    """The SMAX loop's options mean nothing to the feed-forward trainers: naming one there is an error, not a no-op."""
    import dataclasses

    from kpg.algos import MAPPOConfig, choose_trainer

    mappo = dataclasses.replace(MAPPOConfig(), **{option: value})
    flag = option.replace("_", "-")
    with pytest.raises(ValueError, match=f"--mappo.{flag} is an option of the recurrent trainer"):
        choose_trainer("mappo", "simple_spread", mappo, 1000)
