"""What the test modules share, so that no test module imports another: tolerances and comparisons,
the torch.optim builder the parity tests compare with, the brute-force KPG, the kernel test problems, drawn
hyperparameters, a GIL probe and tiny PettingZoo environments (``helpers:uneven_agents`` as an
``--env``)."""

import contextlib
import copy
import importlib.util
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from cases import OPTIMIZER_INFO, OPTIMIZER_INFOS
from gymnasium import spaces
from hypothesis import strategies as st
from pettingzoo import ParallelEnv
from torch import nn
from torch.func import functional_call

import kpg
from kpg import _C, reference
from kpg import _ops as ops

# ---- devices -------------------------------------------------------------------------------------


def _cuda_skip_reason() -> str | None:
    """Why CUDA tests cannot run here, or None where they can."""
    if not _C.build_info()["cuda"]:
        return "this kpg build has no CUDA kernels (built without nvcc)"
    if not torch.cuda.is_available():
        return "no CUDA device: torch.cuda.is_available() is False"
    return None


CUDA_SKIP_REASON = _cuda_skip_reason()


# ---- tolerances and comparisons ----------------------------------------------------------------

# Relative tolerance of every comparison with a reference (kernels, KPGOptimizer, kpg.nn, torch.optim),
# measured against the tensor's scale. The kernels and torch round the same operations in the same
# order; they differ only where one side fuses a multiply-add, about one unit in the last place of a
# term. The one table for all suites: a test that needs more states why next to its own bound.
RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = ""):
    """|actual - expected| <= rtol * (|expected| + max|expected|) elementwise; NaN must match NaN."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    nan_actual, nan_expected = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_actual, nan_expected), f"{what}: NaN positions differ"
    finite = torch.isfinite(expected) & ~nan_actual
    assert torch.equal(actual[~finite & ~nan_actual], expected[~finite & ~nan_expected]), f"{what}: inf differ"
    a, e = actual[finite].double(), expected[finite].double()
    if e.numel() == 0:
        return
    scale = e.abs().max()
    error = (a - e).abs()
    bound = rtol * (e.abs() + scale)
    worst = (error / bound.clamp_min(torch.finfo(torch.float64).tiny)).max().item()
    assert bool((error <= bound).all()), f"{what}: error {error.max().item():.3e} exceeds rtol {rtol} ({worst:.2f}x)"


def assert_as_accurate_as(actual, baseline, truth, rtol: float, what: str = ""):
    """Low-precision ``actual`` is no further from the float64 ``truth`` than twice the low-precision
    ``baseline`` (the reference, or torch.optim) is, plus rtol of the tensor's scale.

    Both sides round the same operations; ill-conditioned elements (centered RMSprop's variance near
    zero) amplify one rounding difference far past any fixed tolerance, for torch as for us.
    """
    nan_actual, nan_truth = torch.isnan(actual), torch.isnan(truth)
    assert torch.equal(nan_actual, nan_truth), f"{what}: NaN positions differ"
    finite = torch.isfinite(truth)
    assert torch.equal(actual[~finite & ~nan_truth].double(), truth[~finite & ~nan_truth]), f"{what}: inf differ"
    a, b, t = actual[finite].double(), baseline[finite].double(), truth[finite]
    if t.numel() == 0:
        return
    baseline_error = (b - t).abs().max()
    error = (a - t).abs()
    bound = rtol * (t.abs() + t.abs().max()) + 2 * baseline_error
    assert bool((error <= bound).all()), (
        f"{what}: error {error.max().item():.3e} against float64 exceeds rtol {rtol} of scale plus twice the "
        f"baseline's error {baseline_error.item():.3e}"
    )


# ---- the torch.optim references -------------------------------------------------------------------


def torch_optimizer(name, params, lr, **hyper):
    """torch.optim's optimizer ``name`` on its single-tensor path (cases.OptimizerInfo.torch_optimizer),
    the one the kernels mirror operation by operation. ``hyper`` takes torch.optim's names or the
    kernels' (``beta1``, ``beta2``)."""
    hyper = dict(hyper)
    if "beta1" in hyper:
        hyper["betas"] = (hyper.pop("beta1"), hyper.pop("beta2"))
    return OPTIMIZER_INFO[name].torch_optimizer(params, lr, **hyper)


def _copied_state(state) -> dict:
    return {p: {key: v.clone() if torch.is_tensor(v) else v for key, v in entry.items()} for p, entry in state.items()}


def saved_state(opt: torch.optim.Optimizer) -> dict:
    """A copy of ``opt``'s per-parameter state, for :func:`restore_state`."""
    return _copied_state(opt.state)


def restore_state(opt: torch.optim.Optimizer, saved: dict) -> None:
    """Puts a copy of ``saved`` back as ``opt``'s state, tensors in the dtypes they had: torch.optim's
    load_state_dict would cast state other than ``step`` to the parameter's dtype (NAdam's float32
    ``mu_product`` would turn float64), which is a rule of loading, not part of undoing a step."""
    opt.state.clear()
    opt.state.update(_copied_state(saved))


# ---- the brute-force KPG (plain PyTorch) ----------------------------------------------------------

BATCH = 6


class Game:
    """A cooperative continuous game: agent j's policy maps its observation to an action; agent i's
    loss is minus a fixed centralized critic of the joint action in which slot i is its own."""

    def __init__(self, num_agents, dtype, heterogeneous, shared, seed, device="cpu"):
        g = torch.Generator().manual_seed(seed)
        self.num_agents, self.shared = num_agents, shared
        self.obs_dims = [3 + (a % 3 if heterogeneous else 0) for a in range(num_agents)]
        self.act_dims = [2 + (a % 2 if heterogeneous else 0) for a in range(num_agents)]
        torch.manual_seed(seed)
        if shared:
            self.obs_dims = [self.obs_dims[0]] * num_agents
            self.act_dims = [self.act_dims[0]] * num_agents
            self.models = [
                nn.Sequential(nn.Linear(self.obs_dims[0] + num_agents, 8), nn.Tanh(), nn.Linear(8, self.act_dims[0]))
            ]
        else:
            self.models = [
                nn.Sequential(nn.Linear(o, 5 + a % 4), nn.Tanh(), nn.Linear(5 + a % 4, d))
                for a, (o, d) in enumerate(zip(self.obs_dims, self.act_dims))
            ]
        self.models = [m.to(device, dtype) for m in self.models]
        self.observations = [torch.randn(BATCH, o, dtype=dtype, generator=g).to(device) for o in self.obs_dims]
        joint = sum(self.act_dims)
        self.critic = nn.Sequential(nn.Linear(joint, 16), nn.Tanh(), nn.Linear(16, num_agents)).to(device, dtype)
        for p in self.critic.parameters():
            p.requires_grad_(False)

    def policy_input(self, agent):
        obs = self.observations[agent]
        if not self.shared:
            return obs
        one_hot = torch.zeros(BATCH, self.num_agents, dtype=obs.dtype, device=obs.device)
        one_hot[:, agent] = 1
        return torch.cat([obs, one_hot], dim=1)

    def actions(self, params=None):
        """Every agent's action; params: per optimizer-agent parameter dicts, or None for the modules."""
        out = []
        for a in range(self.num_agents):
            m = 0 if self.shared else a
            x = self.policy_input(a)
            out.append(self.models[m](x) if params is None else functional_call(self.models[m], params[m], (x,)))
        return out

    def agent_losses(self, joint):
        """joint: [agents, batch, sum of action sizes]; agent i's loss reads critic head i."""
        q = self.critic(joint)  # [agents, batch, agents]
        return -torch.stack([q[i, :, i].mean() for i in range(self.num_agents)])

    def closure_with_context(self, ctx):
        own = self.actions()
        with ctx.anticipated():
            anticipated = self.actions()
        return self.agent_losses(kpg.joint_inputs(own, anticipated))

    def closure_without_context(self):
        actions = self.actions()
        joint = torch.cat(actions, dim=-1).expand(self.num_agents, BATCH, -1)
        return self.agent_losses(joint)

    def brute_force_loss(self, segment, own, anticipated):
        """The loss of optimizer agent `segment` with its own parameters and the others' anticipated."""
        if self.shared:
            own_actions = self.actions([own])
            anticipated_actions = [a.detach() for a in self.actions([anticipated[0]])]
            return self.agent_losses(kpg.joint_inputs(own_actions, anticipated_actions)).sum()
        params = [own if j == segment else anticipated[j] for j in range(self.num_agents)]
        joint = torch.cat(self.actions(params), dim=-1).expand(self.num_agents, BATCH, -1)
        return self.agent_losses(joint)[segment]


def brute_force_step(game, optimizers, k, max_norms):
    """One KPG step of ``game`` by brute force: every agent's gradient at the mixed point, one
    torch.optim optimizer per agent stepped from the base parameters, its state restored below level k."""
    models = game.models
    base = [{n: p.detach().clone() for n, p in m.named_parameters()} for m in models]
    anticipated = base
    for level in range(1, k + 1):
        new = []
        for i, (model, opt) in enumerate(zip(models, optimizers)):
            own = {n: t.clone().requires_grad_() for n, t in base[i].items()}
            loss = game.brute_force_loss(i, own, anticipated)
            # A parameter the loss does not reach gets no gradient (None): torch.optim leaves it as it is.
            grads = torch.autograd.grad(loss, list(own.values()), allow_unused=True)
            saved = saved_state(opt)
            with torch.no_grad():
                for p, b, g in zip(model.parameters(), base[i].values(), grads):
                    p.copy_(b)
                    p.grad = None if g is None else g.clone()
            if max_norms is not None:
                torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norms[i], foreach=False)
            opt.step()
            new.append({n: p.detach().clone() for n, p in model.named_parameters()})
            if level < k:
                restore_state(opt, saved)
        anticipated = new


# ---- kernel test problems --------------------------------------------------------------------------


def rows(kind: str, hyper: dict, num_agents) -> dict[str, torch.Tensor]:
    """The ``hyper`` argument of a kpg update op: ``hyper`` (a dict of one family's
    hyperparameters) as every agent's row; ``num_agents`` an int (rows on the CPU) or the op's step
    tensor (rows on its device)."""
    if isinstance(num_agents, int):
        return {"hyper": ops.hyper_rows(kind, hyper, num_agents)}
    return {"hyper": ops.hyper_rows(kind, hyper, num_agents.numel(), device=num_agents.device)}


def no_live(num_agents: int, device="cpu") -> torch.Tensor:
    """A ``live`` table in which no state tensor holds values yet."""
    return torch.zeros(num_agents, ops.MAX_STATES, dtype=torch.uint8, device=device)


class Arena:
    """Flat buffers of one test problem, created twice from one seed for the two implementations."""

    def __init__(self, kind, sizes, dtype, seed, warm_steps=2, nonfinite=None, device="cpu", start_step=0):
        g = torch.Generator().manual_seed(seed)
        self.offsets = [0]
        for s in sizes:
            self.offsets.append(self.offsets[-1] + s)
        n, a = self.offsets[-1], len(sizes)
        self.chunks, self.agent_chunks = ops.chunk_table(self.offsets, device)
        self.param = torch.randn(n, dtype=dtype, generator=g)
        self.grad = torch.randn(n, dtype=dtype, generator=g)
        self.states = {name: torch.zeros(n, dtype=dtype) for name in ops.KERNELS[kind].state_names}
        # Scalar state in torch.optim's default scalar dtype (NAdam's float32 mu_product).
        self.scalars = {name: torch.full((a,), initial) for name, initial in ops.KERNELS[kind].scalar_states}
        # Steps taken before the warm-up (its state starts from zeros all the same): a later step
        # reaches what only later steps do (RAdam's rectified step, from the sixth on).
        self.step = torch.full((a,), float(start_step), dtype=torch.float64)
        self.live = no_live(a)
        self.lr = torch.rand(a, dtype=torch.float64, generator=g) * 0.1
        self.grad_scale = torch.rand(a, dtype=torch.float64, generator=g) + 0.25
        self.skip = (torch.rand(a, generator=g) < 0.2).to(torch.uint8)
        self.warm_grads = [torch.randn(n, dtype=dtype, generator=g) for _ in range(warm_steps)]
        if nonfinite is not None and n > 0:
            for value, index in zip(nonfinite, (0, n // 2, n - 1)):
                self.grad[index] = value
        # Drawn on the CPU from the seed, so every device sees the same values.
        for name in ("param", "grad", "step", "live", "lr", "grad_scale", "skip"):
            setattr(self, name, getattr(self, name).to(device))
        self.states = {name: state.to(device) for name, state in self.states.items()}
        self.scalars = {name: scalar.to(device) for name, scalar in self.scalars.items()}
        self.warm_grads = [warm.to(device) for warm in self.warm_grads]

    def warm_up(self, kind, hyper):
        """A few reference commits so the state holds realistic values (centered RMSprop needs it)."""
        grad = self.grad
        for warm in self.warm_grads:
            self.grad = warm
            reference.UPDATE_OPS[(kind, True)](**self.commit_args(), **rows(kind, hyper, self.step))
        self.grad = grad
        return self

    def commit_args(self, skip=True):
        return dict(
            param=self.param,
            grad=self.grad,
            **self.states,
            **self.scalars,
            step=self.step,
            live=self.live,
            lr=self.lr,
            grad_scale=self.grad_scale,
            skip=self.skip if skip else None,
            chunks=self.chunks,
        )

    def anticipate_args(self, anticipated):
        args = self.commit_args()
        return dict(param=args.pop("param"), grad=args.pop("grad"), anticipated=anticipated, **args)

    def tensors(self):
        return {"param": self.param, **self.states, **self.scalars, "step": self.step}

    def upcast(self):
        """A float64 copy holding exactly this arena's values: the inputs of the float64 truth."""
        copied = copy.deepcopy(self)
        for name in ("param", "grad"):
            setattr(copied, name, getattr(self, name).double())
        copied.states = {name: s.double() for name, s in self.states.items()}
        return copied


def agent_grad_norms_of_kernel_and_reference(
    arena, max_norm, chunks=None, agent_chunks=None
) -> list[dict[str, torch.Tensor]]:
    """The outputs of ops.agent_grad_norms and of its reference on ``arena``'s gradients (outputs
    start at values neither writes), after checking that they agree; over ``chunks`` and
    ``agent_chunks`` where given, else the arena's."""
    if chunks is None:
        chunks, agent_chunks = arena.chunks, arena.agent_chunks
    agents = agent_chunks.shape[0] - 1
    outputs = []
    device = arena.grad.device
    for impl in (ops.agent_grad_norms, reference.agent_grad_norms):
        out = dict(
            chunk_sq=torch.full((chunks.shape[0],), -1.0, dtype=torch.float64, device=device),
            norm=torch.full((agents,), -1.0, dtype=torch.float64, device=device),
            grad_scale=torch.full((agents,), -1.0, dtype=torch.float64, device=device),
            nonfinite=torch.full((agents,), 7, dtype=torch.uint8, device=device),
        )
        impl(
            arena.grad,
            chunks,
            agent_chunks,
            out["chunk_sq"],
            max_norm,
            out["norm"],
            out["grad_scale"],
            out["nonfinite"],
        )
        outputs.append(out)
    for name in outputs[0]:
        assert_close_to_scale(outputs[0][name].double(), outputs[1][name].double(), 1e-13, what=name)
    return outputs


# ---- drawn hyperparameters (hypothesis) -----------------------------------------------------------


@st.composite
def drawn_hyper(draw, name: str, dtype: torch.dtype = torch.float64, row_names: bool = False):
    """Hyperparameters of optimizer ``name`` from its fuzz domain in the table (tests/cases.py); with
    ``row_names`` in the kernels' names (``beta1``, ``beta2``), for hyper_rows and the references."""
    hyper = OPTIMIZER_INFO[name].fuzz(lambda values: draw(st.sampled_from(values)), dtype)
    if row_names and "betas" in hyper:
        hyper["beta1"], hyper["beta2"] = hyper.pop("betas")
    return hyper


# Per kernel family: the drawn hyperparameters of the optimizer of the same name (AdamW is Adam's).
HYPER = {info.kernel: drawn_hyper(info.name, row_names=True) for info in OPTIMIZER_INFOS if info.name == info.kernel}


# ---- threads ----------------------------------------------------------------------------------------


def python_thread_progress(call, calls: int = 3) -> list[int]:
    """How often a counting Python thread advanced during each of ``calls`` calls of ``call``.

    The thread gives the GIL back at every iteration (time.sleep(0)), so it cannot hold it while the
    main thread runs Python; unless ``call`` releases the GIL it advances at most once or twice per
    call (a switch interval of 5 ms against well under 1 ms of Python in an op)."""
    count, stop, running = 0, threading.Event(), threading.Event()

    def counter():
        nonlocal count
        running.set()
        while not stop.is_set():
            count += 1
            time.sleep(0)

    thread = threading.Thread(target=counter)
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.005)
    during = []
    try:
        thread.start()
        running.wait()
        for _ in range(calls):
            before = count
            call()
            during.append(count - before)
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old_interval)
    return during


# ---- tiny PettingZoo environments for the trainer tests -----------------------------------------


class UnevenAgents(ParallelEnv):
    """Agent ``short`` (3 observations, 2 actions) is terminated after ``short_steps`` steps;
    ``long`` (5 observations, 4 actions) runs until the time limit ``max_steps`` (truncated).
    The reward of each agent is 1 when its action equals the step count modulo its action count;
    observations encode the step count, so the task is learnable."""

    metadata = {"name": "uneven_agents_v0"}

    def __init__(self, short_steps: int = 2, max_steps: int = 4, continuous: bool = False):
        self.possible_agents = ["short", "long"]
        self.short_steps, self.max_steps, self.continuous = short_steps, max_steps, continuous
        self._obs_sizes = {"short": 3, "long": 5}
        self._action_sizes = {"short": 2, "long": 4}
        self.agents: list[str] = []
        self.t = 0

    def observation_space(self, agent):
        return spaces.Box(-10.0, 10.0, (self._obs_sizes[agent],), np.float32)

    def action_space(self, agent):
        if self.continuous:
            return spaces.Box(-1.0, 1.0, (self._action_sizes[agent] // 2,), np.float32)
        return spaces.Discrete(self._action_sizes[agent])

    def _observe(self, agent):
        obs = np.zeros(self._obs_sizes[agent], dtype=np.float32)
        obs[self.t % self._obs_sizes[agent]] = 1.0
        obs[-1] = self.t / self.max_steps
        return obs

    def state(self):
        return np.concatenate([self._observe(a) for a in self.possible_agents])

    def reset(self, seed=None, options=None):
        self.t = 0
        self.agents = list(self.possible_agents)
        return {a: self._observe(a) for a in self.agents}, {a: {} for a in self.agents}

    def step(self, actions):
        rewards = {}
        for agent, action in actions.items():
            target = self.t % self._action_sizes[agent]
            if self.continuous:
                rewards[agent] = float(-np.abs(np.asarray(action) - target / self._action_sizes[agent]).sum())
            else:
                rewards[agent] = float(int(action) == target)
        self.t += 1
        terminations = {a: a == "short" and self.t >= self.short_steps for a in self.agents}
        truncations = {a: self.t >= self.max_steps and not terminations[a] for a in self.agents}
        observations = {a: self._observe(a) for a in self.agents}
        self.agents = [a for a in self.agents if not (terminations[a] or truncations[a])]
        return observations, rewards, terminations, truncations, {a: {} for a in observations}


def uneven_agents(**options):
    return UnevenAgents(**options)


class TwoTeams(ParallelEnv):
    """Team ``red`` (``red_0``, ``red_1``) against team ``blue`` (``blue_0``), 2 observations and 3
    actions each. ``red_1`` is killed at step ``red_1_dies``; the episode ends by the time limit
    ``max_steps``. Every agent observes (its own last action, time); the global state is every
    agent's observation, so what the opponent did shows in it."""

    metadata = {"name": "two_teams_v0"}

    def __init__(self, red_1_dies: int = 2, max_steps: int = 4):
        self.possible_agents = ["red_0", "red_1", "blue_0"]
        self.red_1_dies, self.max_steps = red_1_dies, max_steps
        self.agents: list[str] = []
        self.last_action = {}
        self.t = 0

    def observation_space(self, agent):
        return spaces.Box(-10.0, 10.0, (2,), np.float32)

    def action_space(self, agent):
        return spaces.Discrete(3)

    def _observe(self, agent):
        return np.array([self.last_action.get(agent, -1), self.t], dtype=np.float32)

    def state(self):
        return np.concatenate([self._observe(a) for a in self.possible_agents])

    def reset(self, seed=None, options=None):
        self.t, self.last_action = 0, {}
        self.agents = list(self.possible_agents)
        return {a: self._observe(a) for a in self.agents}, {a: {} for a in self.agents}

    def step(self, actions):
        missing = set(self.agents) - set(actions)
        if missing:
            raise ValueError(f"no action for {sorted(missing)}")
        self.last_action.update({agent: int(action) for agent, action in actions.items()})
        self.t += 1
        rewards = {a: float(actions[a]) for a in self.agents}
        terminations = {a: a == "red_1" and self.t >= self.red_1_dies for a in self.agents}
        truncations = {a: self.t >= self.max_steps and not terminations[a] for a in self.agents}
        observations = {a: self._observe(a) for a in self.agents}
        self.agents = [a for a in self.agents if not (terminations[a] or truncations[a])]
        return observations, rewards, terminations, truncations, {a: {} for a in observations}


def opponent_plays_time(observations, env, rng):
    """A scripted opponent: action = the time it observes, modulo 3."""
    return {name: int(obs[1]) % 3 for name, obs in observations.items()}


def opponent_plays_first_action(observations, env, rng):
    """A fixed opponent for any discrete environment: action 0 for everyone."""
    return dict.fromkeys(observations, 0)


@contextlib.contextmanager
def loaded_module(path: Path, name: str):
    """The Python file at ``path`` imported as module ``name``, registered in ``sys.modules`` while in
    use (dataclasses look their module up there) and removed after."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]
