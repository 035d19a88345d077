"""Test problems shared by the pytest suites and scripts/cuda_checks.py, which runs on a lent GPU
machine without pytest or the trainers' dependencies: this module needs torch and kpg only. It holds
the one table of optimizer cases (OPTIMIZER_INFOS)."""

import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import kpg
import kpg.nn as knn
from kpg import _ops as ops

# ---- the optimizers: one entry each, read by every suite -------------------------------------------
#
# In the spirit of torch's OptimizerInfo (torch/testing/_internal/common_optimizers.py): each
# optimizer kpg offers is described once, by its torch.optim class, constructor configurations with
# a description (every constructor argument torch offers, alone or combined), group edits, a state
# dict to carry, a drawn hyperparameter domain for the fuzzers, and error inputs with the expected
# message. The kernel cases, the torch.optim parity cases, the brute-force cases, the drop-in cases
# and the fuzzers' domains all come from here, so a new optimizer is tested everywhere by its entry.
# Hyperparameters use torch.optim's constructor names (``betas``, not ``beta1``).

# torch.optim arguments that choose an implementation, not a hyperparameter: kpg has one fused path,
# so it refuses them as constructor arguments (a loaded torch.optim state dict may carry them).
IMPLEMENTATION_ARGUMENTS = ("foreach", "fused", "capturable", "differentiable")


@dataclass(frozen=True)
class Config:
    """One constructor configuration; ``desc`` is the case id, unique across the table."""

    desc: str
    hyper: dict[str, Any]
    levels: bool = False  # also a multi-level case: the brute-force KPG at k = 2, 3; batched = per agent


@dataclass(frozen=True)
class Edit:
    """A group key edited mid-run (for one agent), from an optimizer built with ``hyper``."""

    key: str
    value: Any
    hyper: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorInput:
    """Constructor arguments KPGOptimizer refuses, the exception and a regex of its message;
    ``torch_too``: torch.optim refuses them with a message the same regex matches."""

    desc: str
    hyper: dict[str, Any]
    error: type[Exception]
    match: str
    torch_too: bool = True


# A fuzz domain draws one configuration: ``choose(values)`` picks one of ``values`` (hypothesis's
# sampled_from in the suites; this module needs torch and kpg only), ``dtype`` is the parameters'.
Fuzz = Callable[[Callable[[list], Any], torch.dtype], dict[str, Any]]


@dataclass(frozen=True)
class OptimizerInfo:
    name: str  # KPGOptimizer(optimizer=name)
    torch_class: type[torch.optim.Optimizer]
    configs: tuple[Config, ...]
    edits: tuple[Edit, ...]
    state_dict_hyper: tuple[dict[str, Any], ...]  # settings a state dict carries mid-run
    fuzz: Fuzz
    error_inputs: tuple[ErrorInput, ...] = ()
    # CPU and CUDA kernels agree bit for bit: the coefficients use no pow(), whose CUDA and glibc
    # results may differ in the last place.
    bitwise_across_devices: bool = True

    @property
    def kernel(self) -> str:
        """The kernel family (csrc/kpg/optimizers.h) of this optimizer: ``adam`` for AdamW."""
        return ops.OPTIMIZERS[self.name].kernel.name

    @property
    def multi_level_configs(self) -> tuple[Config, ...]:
        return tuple(config for config in self.configs if config.levels)

    def all_error_inputs(self) -> tuple[ErrorInput, ...]:
        """The entry's error inputs and, for every implementation argument torch's class takes,
        that KPGOptimizer refuses it (torch accepts it)."""
        taken = inspect.signature(self.torch_class).parameters
        refused = tuple(
            ErrorInput(
                f"{argument}-refused",
                {argument: True},
                TypeError,
                rf"unknown hyperparameter\(s\) {argument} for optimizer '{self.name}'",
                torch_too=False,
            )
            for argument in IMPLEMENTATION_ARGUMENTS
            if argument in taken
        )
        return self.error_inputs + refused

    def torch_optimizer(self, params, lr, **hyper) -> torch.optim.Optimizer:
        """torch.optim's optimizer on its single-tensor path, the one the kernels mirror operation by
        operation: ``foreach=False``, and ``fused=False`` wherever the class takes ``fused`` (SGD,
        Adam, AdamW, Adagrad)."""
        taken = inspect.signature(self.torch_class).parameters
        single_tensor = {"foreach": False} | ({"fused": False} if "fused" in taken else {})
        return self.torch_class(params, lr=lr, **single_tensor, **hyper)


def _invalid(name: str, value: Any, message: str, hyper: dict | None = None) -> ErrorInput:
    return ErrorInput(f"{name}-{value}", {**(hyper or {}), name: value}, ValueError, message)


def _betas_errors() -> tuple[ErrorInput, ...]:
    return (
        ErrorInput("beta1-one", {"betas": (1.0, 0.999)}, ValueError, re.escape("Invalid beta parameter at index 0")),
        ErrorInput(
            "beta2-negative", {"betas": (0.9, -0.1)}, ValueError, re.escape("Invalid beta parameter at index 1")
        ),
        _invalid("eps", -1.0, "Invalid (eps|epsilon) value"),
        _invalid("weight_decay", -0.1, "Invalid weight_decay value"),
    )


def _sgd_fuzz(choose, dtype):
    momentum = choose([0.0, 0.5, 0.99])
    dampening = choose([0.0, 0.3, 1.0])
    # torch.optim.SGD accepts nesterov only with momentum > 0 and zero dampening.
    nesterov = choose([False, True]) if momentum > 0 and dampening == 0 else False
    return dict(
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=choose([0.0, 1e-4, 0.1, 1.0]),
        maximize=choose([False, True]),
    )


def _adam_fuzz(choose, dtype):
    return dict(
        betas=(choose([0.0, 0.5, 0.9, 0.999999]), choose([0.0, 0.9, 0.999, 0.999999])),
        eps=choose([1e-12, 1e-8, 1e-3]),
        weight_decay=choose([0.0, 1e-4, 0.1, 1.0]),
        amsgrad=choose([False, True]),
        maximize=choose([False, True]),
        decoupled_weight_decay=choose([False, True]),
    )


def _adamw_fuzz(choose, dtype):
    hyper = _adam_fuzz(choose, dtype)
    del hyper["decoupled_weight_decay"]  # AdamW's is always on
    return hyper


def _rmsprop_fuzz(choose, dtype):
    centered = choose([False, True])
    # Centered with alpha 0 estimates the variance of one sample: g*g - g*g, zero up to rounding.
    # torch's addcmul fuses it into an FMA on AVX2 and takes the square root of -1 ulp (NaN) for
    # about half the elements; the kernels get an exact 0. Neither is wrong; no tolerance fits.
    alphas = [0.5, 0.99] if centered else [0.0, 0.5, 0.99]
    # RMSprop has no bias correction: its first steps are lr * g / sqrt((1 - alpha) g^2), which
    # multiplies one float32 rounding difference (torch fuses addcmul into an FMA, the kernels
    # may not) by lr / sqrt(1 - alpha), 300 at alpha 0.999999 and lr 0.3: no float32 tolerance
    # separates that from a bug. Near-1 alphas are drawn in float64, checked to rounding.
    if dtype == torch.float64:
        alphas.append(0.999999)
    return dict(
        alpha=choose(alphas),
        eps=choose([1e-12, 1e-8, 1e-3]),
        weight_decay=choose([0.0, 1e-4, 0.1, 1.0]),
        momentum=choose([0.0, 0.5, 0.99]),
        centered=centered,
        maximize=choose([False, True]),
    )


def _adagrad_fuzz(choose, dtype):
    return dict(
        lr_decay=choose([0.0, 0.1, 10.0]),
        weight_decay=choose([0.0, 1e-4, 0.1, 1.0]),
        initial_accumulator_value=choose([0.0, 0.1, 2.0]),
        eps=choose([1e-12, 1e-8, 1e-3]),
        maximize=choose([False, True]),
    )


def _nadam_fuzz(choose, dtype):
    return dict(
        betas=(choose([0.0, 0.5, 0.9, 0.999999]), choose([0.0, 0.9, 0.999, 0.999999])),
        eps=choose([1e-12, 1e-8, 1e-3]),
        weight_decay=choose([0.0, 1e-4, 0.1, 1.0]),
        momentum_decay=choose([0.0, 4e-3, 0.5, 10.0]),
        decoupled_weight_decay=choose([False, True]),
        maximize=choose([False, True]),
    )


def _radam_fuzz(choose, dtype):
    return dict(
        # The variance is tractable (rho_t > 5: the rectified step) from the sixth step on where
        # beta2 >= 0.9 and never where beta2 <= 2/3: both branches are drawn.
        betas=(choose([0.0, 0.5, 0.9, 0.999999]), choose([0.0, 0.5, 0.9, 0.999])),
        eps=choose([1e-12, 1e-8, 1e-3]),
        weight_decay=choose([0.0, 1e-4, 0.1, 1.0]),
        decoupled_weight_decay=choose([False, True]),
        maximize=choose([False, True]),
    )


OPTIMIZER_INFOS: tuple[OptimizerInfo, ...] = (
    OptimizerInfo(
        "sgd",
        torch.optim.SGD,
        configs=(
            Config("sgd-defaults", {}),
            Config("sgd-plain", dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)),
            Config("sgd-momentum-dampening", dict(momentum=0.9, dampening=0.3)),
            Config("sgd-momentum-dampening-wd", dict(momentum=0.9, dampening=0.1, weight_decay=0.01)),
            Config("sgd-nesterov-maximize", dict(momentum=0.8, nesterov=True, maximize=True)),
            Config("sgd-nesterov-wd", dict(momentum=0.9, nesterov=True, weight_decay=0.01), levels=True),
            Config("sgd-dampening", dict(momentum=0.5, dampening=0.2), levels=True),
        ),
        edits=(
            Edit("lr", 0.2, dict(momentum=0.5)),
            Edit("momentum", 0.9),
            Edit("momentum", 0.95, dict(momentum=0.5)),
            Edit("dampening", 0.5, dict(momentum=0.5)),
            Edit("weight_decay", 0.3),
            Edit("nesterov", True, dict(momentum=0.5)),
            Edit("maximize", True),
        ),
        state_dict_hyper=(dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
        fuzz=_sgd_fuzz,
        error_inputs=(
            _invalid("momentum", -0.5, "Invalid momentum value"),
            _invalid("weight_decay", -0.1, "Invalid weight_decay value"),
            ErrorInput("nesterov-without-momentum", dict(nesterov=True), ValueError, "Nesterov momentum requires"),
        ),
    ),
    OptimizerInfo(
        "adam",
        torch.optim.Adam,
        configs=(
            Config("adam-defaults", {}),
            Config("adam", dict(betas=(0.9, 0.999), eps=1e-8)),
            Config("adam-betas-eps", dict(betas=(0.8, 0.99), eps=1e-6), levels=True),
            Config("adam-betas-eps-wd", dict(betas=(0.5, 0.9), eps=1e-3, weight_decay=0.1)),
            Config("adam-amsgrad-maximize", dict(amsgrad=True, maximize=True)),
            Config(
                "adam-l2-amsgrad-maximize",
                dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True),
            ),
            Config("adam-decoupled", dict(weight_decay=0.1, decoupled_weight_decay=True)),
            Config(
                "adam-decoupled-amsgrad-beta1-large-weight",
                dict(betas=(0.3, 0.9), eps=1e-5, weight_decay=0.05, amsgrad=True, decoupled_weight_decay=True),
            ),
        ),
        edits=(
            Edit("betas", (0.5, 0.9)),
            Edit("eps", 1e-2),
            Edit("weight_decay", 0.2),
            Edit("maximize", True),
            Edit("amsgrad", False, dict(amsgrad=True)),
            Edit("decoupled_weight_decay", True, dict(weight_decay=0.2)),
        ),
        state_dict_hyper=(dict(amsgrad=True, betas=(0.5, 0.9)),),
        fuzz=_adam_fuzz,
        error_inputs=_betas_errors(),
        bitwise_across_devices=False,
    ),
    OptimizerInfo(
        "adamw",
        torch.optim.AdamW,
        configs=(
            Config("adamw-defaults", {}),
            Config("adamw", dict(weight_decay=0.01)),
            Config("adamw-amsgrad-wd", dict(weight_decay=0.3, amsgrad=True, betas=(0.8, 0.95))),
            Config("adamw-amsgrad", dict(weight_decay=0.05, amsgrad=True), levels=True),
        ),
        edits=(Edit("weight_decay", 0.5),),
        state_dict_hyper=(dict(amsgrad=True, weight_decay=0.1),),
        fuzz=_adamw_fuzz,
        error_inputs=_betas_errors(),
        bitwise_across_devices=False,
    ),
    OptimizerInfo(
        "rmsprop",
        torch.optim.RMSprop,
        configs=(
            Config("rmsprop-defaults", {}),
            Config("rmsprop-alpha-eps-wd", dict(alpha=0.9, eps=1e-4, weight_decay=0.05)),
            Config("rmsprop-centered-momentum-maximize", dict(centered=True, momentum=0.7, maximize=True)),
            Config(
                "rmsprop-centered-momentum-wd",
                dict(alpha=0.9, eps=1e-6, weight_decay=0.01, momentum=0.5, centered=True),
                levels=True,
            ),
            Config("rmsprop-alpha-small-maximize", dict(alpha=0.3, momentum=0.9, centered=True, maximize=True)),
        ),
        edits=(
            Edit("alpha", 0.5),
            Edit("eps", 1e-2),
            Edit("weight_decay", 0.1),
            Edit("momentum", 0.9, dict(momentum=0.5)),
            Edit("centered", False, dict(centered=True)),
            Edit("maximize", True),
        ),
        state_dict_hyper=(dict(centered=True), dict(centered=True, momentum=0.5, alpha=0.9)),
        fuzz=_rmsprop_fuzz,
        error_inputs=(
            _invalid("alpha", -0.5, "Invalid alpha value"),
            _invalid("momentum", -0.5, "Invalid momentum value"),
            _invalid("eps", -1.0, "Invalid (eps|epsilon) value"),
        ),
    ),
    OptimizerInfo(
        "adagrad",
        torch.optim.Adagrad,
        configs=(
            Config("adagrad-defaults", {}),
            Config("adagrad-all", dict(lr_decay=0.1, weight_decay=0.05, initial_accumulator_value=0.3, eps=1e-6)),
            Config("adagrad-maximize", dict(maximize=True)),
            Config(
                "adagrad-decay-wd-maximize",
                dict(lr_decay=0.1, weight_decay=0.05, initial_accumulator_value=0.5, eps=1e-6, maximize=True),
                levels=True,
            ),
        ),
        edits=(
            Edit("lr_decay", 0.5),
            Edit("weight_decay", 0.2),
            Edit("eps", 1e-2),
            Edit("maximize", True),
            Edit("initial_accumulator_value", 5.0),
        ),
        state_dict_hyper=(dict(lr_decay=0.01, initial_accumulator_value=0.2),),
        fuzz=_adagrad_fuzz,
        error_inputs=(
            _invalid("lr_decay", -0.1, "Invalid lr_decay value"),
            _invalid("initial_accumulator_value", -0.1, "Invalid initial_accumulator_value value"),
        ),
    ),
    OptimizerInfo(
        "nadam",
        torch.optim.NAdam,
        configs=(
            Config("nadam-defaults", {}),
            Config("nadam-betas-eps-momentum-decay", dict(betas=(0.8, 0.99), eps=1e-6, momentum_decay=0.01)),
            Config("nadam-l2-maximize", dict(weight_decay=0.1, maximize=True), levels=True),
            Config("nadam-decoupled", dict(weight_decay=0.1, decoupled_weight_decay=True, momentum_decay=0.5)),
            Config("nadam-beta1-zero-beta2-zero", dict(betas=(0.0, 0.0), momentum_decay=0.0)),
        ),
        edits=(
            Edit("betas", (0.5, 0.9)),
            Edit("eps", 1e-2),
            Edit("weight_decay", 0.2),
            Edit("momentum_decay", 0.1),
            Edit("decoupled_weight_decay", True, dict(weight_decay=0.2)),
            Edit("maximize", True),
        ),
        state_dict_hyper=(dict(betas=(0.5, 0.9), momentum_decay=0.01),),
        fuzz=_nadam_fuzz,
        error_inputs=(*_betas_errors(), _invalid("momentum_decay", -0.1, "Invalid momentum_decay value")),
        bitwise_across_devices=False,
    ),
    OptimizerInfo(
        "radam",
        torch.optim.RAdam,
        configs=(
            Config("radam-defaults", {}),
            # beta2 0.9 and 0.999: the variance is tractable (rho_t > 5, the rectified step) from the
            # sixth step on; beta2 0.5: never (rho_inf = 3).
            Config("radam-betas-eps", dict(betas=(0.5, 0.9), eps=1e-6), levels=True),
            Config("radam-l2-maximize", dict(betas=(0.8, 0.5), weight_decay=0.1, maximize=True)),
            Config("radam-decoupled", dict(betas=(0.9, 0.9), weight_decay=0.1, decoupled_weight_decay=True)),
        ),
        edits=(
            Edit("betas", (0.5, 0.9)),
            Edit("eps", 1e-2),
            Edit("weight_decay", 0.2),
            Edit("decoupled_weight_decay", True, dict(weight_decay=0.2)),
            Edit("maximize", True),
        ),
        state_dict_hyper=(dict(betas=(0.8, 0.9), weight_decay=0.01),),
        fuzz=_radam_fuzz,
        error_inputs=_betas_errors(),
        bitwise_across_devices=False,
    ),
)

OPTIMIZER_INFO = {info.name: info for info in OPTIMIZER_INFOS}
assert set(OPTIMIZER_INFO) == set(ops.OPTIMIZERS), "every optimizer kpg offers needs its entry here"
CONFIGS = {config.desc: (info, config) for info in OPTIMIZER_INFOS for config in info.configs}
assert len(CONFIGS) == sum(len(info.configs) for info in OPTIMIZER_INFOS), "config descriptions must be unique"

# Kernel cases: (kernel family, every hyperparameter of its row by group key) per configuration.
UPDATE_CASES = {
    desc: (info.kernel, {**ops.OPTIMIZERS[info.name].defaults, **config.hyper})
    for desc, (info, config) in CONFIGS.items()
}


class KMappoMinibatch:
    """An agent-batched policy trained by K-MAPPO's joint ratio plus a centralized critic term that
    reads joint_inputs in its tensor form and its list form; inputs live in static buffers."""

    def __init__(self, device, agents: int = 3, obs: int = 5, actions: int = 4, batch: int = 16):
        self.sizes = agents, obs, actions, batch
        torch.manual_seed(0)
        self.policy = knn.AgentMLP(agents, obs, actions, hidden_sizes=(8,), dtype=torch.float64).to(device)
        self.critic = nn.Sequential(nn.Linear(agents * actions, 8), nn.Tanh(), nn.Linear(8, agents)).double().to(device)
        self.critic.requires_grad_(False)
        self.obs = torch.zeros(agents, batch, obs, dtype=torch.float64, device=device)
        self.actions = torch.zeros(agents, batch, dtype=torch.int64, device=device)
        self.old_log_prob = torch.zeros(agents, batch, dtype=torch.float64, device=device)
        self.advantages = torch.zeros(agents, batch, dtype=torch.float64, device=device)

    def refill(self, minibatch):
        g = torch.Generator().manual_seed(100 + minibatch)
        self.obs.copy_(torch.randn(self.obs.shape, generator=g, dtype=torch.float64))
        self.actions.copy_(torch.randint(self.sizes[2], self.actions.shape, generator=g))
        self.old_log_prob.copy_(-torch.rand(self.old_log_prob.shape, generator=g, dtype=torch.float64) - 1)
        self.advantages.copy_(torch.randn(self.advantages.shape, generator=g, dtype=torch.float64))

    def log_prob(self, logits):
        return torch.log_softmax(logits, -1).gather(-1, self.actions.unsqueeze(-1)).squeeze(-1)

    def closure(self, ctx):
        own_logits = ctx.at_base(lambda: self.policy(self.obs))
        with ctx.anticipated():
            anticipated_logits = self.policy(self.obs)
        surrogate = kpg.joint_ratio_loss(
            self.log_prob(own_logits),
            self.old_log_prob,
            self.advantages,
            self.log_prob(anticipated_logits),
            level=ctx.level,
        ).loss
        own, anticipated = torch.tanh(own_logits), torch.tanh(anticipated_logits)
        stacked = kpg.joint_inputs(own, anticipated, agent_dim=0)  # [A, A, B, ACT]
        listed = kpg.joint_inputs(list(own.unbind(0)), list(anticipated.unbind(0)))  # [A, B, A * ACT]
        agents, _, actions, batch = self.sizes
        q_stacked = self.critic(stacked.permute(0, 2, 1, 3).reshape(agents, batch, agents * actions))
        q_listed = self.critic(listed)
        critic_term = q_stacked.diagonal(dim1=0, dim2=2).mean(0) + q_listed.diagonal(dim1=0, dim2=2).mean(0)
        return surrogate - 0.1 * critic_term

    def train(self, opt, schedule, steps: int, capture_from: int | None = None) -> list[torch.Tensor]:
        """The policy's parameters (on the CPU) after ``steps`` minibatch steps of ``opt``, one
        ``schedule`` step each; from minibatch ``capture_from`` on, replays of a captured step."""
        replay = None
        for minibatch in range(steps):
            self.refill(minibatch)
            if capture_from is None or minibatch < capture_from:
                opt.step(self.closure)
            elif replay is None:  # capture_step's warm-up step is a real step: this minibatch's
                replay = opt.capture_step(self.closure, warmup_steps=1)
            else:
                replay()
            schedule.step()
            opt.sync_hyperparameters()
        if self.obs.is_cuda:
            torch.cuda.synchronize()
        return [p.detach().cpu() for p in self.policy.parameters()]
