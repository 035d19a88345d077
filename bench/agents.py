"""Agents benchmark: what does one MAPPO actor update cost from 8 to 2048 agents, plain, as naive K = 2
research code, and with kpg (agent-batched networks, fused optimizer) at k = 1 and k = 2?

Every agent has its own policy, an MLP 16 -> 64 -> 64 -> 5 logits with tanh, and a minibatch of 256
samples; the loss is K-MAPPO's clipped joint-ratio surrogate (kpg.couplings.joint_ratio_loss, the
others' ratios as a geometric mean, as docs/algorithm.md advises for many agents), optimizer Adam,
float32, on CUDA where a GPU is present and on the CPU otherwise (--device). For each agent count it
times one actor update with each of these, side by side (call by call, in turn, round after round:
time_side_by_side; kpg's two with the matmul reference, then torch's two: TIMING_GROUPS), with
glibc's malloc thresholds fixed so that taking turns does not make the steps page-fault memory
that a training process would keep (pin_malloc_thresholds):

    torch_k1   plain PyTorch: one nn.Sequential per agent, evaluated agent by agent, and
               torch.optim.Adam(foreach=True); the level-1 (MAPPO) loss, one backward, one step
    naive_k2   K = 2 as research code writes it: per-agent modules as above; deep-copy the optimizer
               state and the networks, take the level-1 step, deep-copy the stepped networks as the
               anticipated policies, restore the base networks and optimizer state, then the
               level-2 loss (own policy at base, others' ratios from the copies) and the final step
    kpg_k1     kpg.nn.AgentMLP (all agents in one batched module) and kpg.KPGOptimizer(k=1)
    kpg_k2     the same with k=2; the own-policy forward is computed once (ctx.at_base) and reused
               at level 2, where only the anticipated forward is new
    kpg_mk2    k=2 with anticipation="momentum": no level 1; the others' level-1 parameters are
               predicted from their last two committed updates (kpg.anticipation), so the step is
               one closure evaluation (own and anticipated forward), one backward and one commit

FLOP model (matmuls only, per sample): forward 2 * sum(in * out) over the three layers, backward
the weight gradients (the same again) and the input gradients of layers 2 and 3 (no gradient flows
into the observations): 10880 + 10880 + 8832 = 30592 FLOPs. kpg_k1's model FLOP rate is that over
its time, reported as a fraction of the matmul rate measured in the same run: torch.bmm over the
same shapes (the three forward products and five backward products of every agent at once, outputs
preallocated), so the fraction is the share of the update that runs at matmul speed.

Memory: each (method, agents) case also runs in a subprocess of its own (malloc as it comes), which
reports its peak resident set (VmHWM, reset after setup) minus its resident set after importing
torch and creating the shared rollout tensors: the models, optimizer state, copies and autograd
activations of three updates. It is the process's memory as the kernel sees it, not a tensor-level
count, and moves between runs with the moments glibc gives memory back (kpg_k1 at 2048 agents: 661
to 910 MiB in six runs on one machine). On CUDA it is torch.cuda.max_memory_allocated above the
allocation after setup.

The step profile (step_profile) counts, with torch.profiler, the work of one kpg k=2 step at
--launch-agents agent counts (8, 512 and 4096 on CUDA): CUDA kernels and copies launched per step on
CUDA, calls of kpg's ops per step on both devices; neither may grow with the agent count. On CUDA it
also times a step captured with KPGOptimizer.capture_step against the same step run eagerly, side
by side, at CAPTURE_AGENTS agents.

Run ``python bench/agents.py`` (several minutes on two cores), ``--quick`` for a smoke run on tiny
cases, ``--json PATH`` for machine-readable results. The per-update targets are judged on the CPU,
the step profile's on every device; a missed target is reported, not an error.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from optimizer import CONTENDED_CORES, OtherProcessesCPU, judged, machine_metadata  # noqa: E402

import kpg  # noqa: E402

OBSERVATION_SIZE = 16
HIDDEN_SIZES = (64, 64)
ACTIONS = 5
BATCH = 256
LEARNING_RATE = 1e-4  # small enough that hundreds of timed updates keep the ratios near 1
CLIP_EPS = 0.2
OTHERS = "geometric"

FULL_AGENTS = (8, 64, 512, 2048)
QUICK_AGENTS = (4, 16)
QUICK_MIN_RUN_TIME = 0.01
QUICK_MAX_RUN_TIME = 0.1
MEMORY_STEPS = 3
# kpg k2's time per agent is compared with its time at this agent count, timed side by side in every case.
PER_AGENT_REFERENCE = 512
REFERENCE_STEP = f"kpg_k2_{PER_AGENT_REFERENCE}_agents"
# Each group is timed side by side (time_side_by_side), one group after the other: kpg's steps with
# the references its targets divide by, then the per-agent torch modules. Timed in one group, the
# second's garbage (deep copies of thousands of modules) left the allocator in a state that slowed
# the kpg steps after it: kpg k2 at 2048 agents took 515 ms there against 440 ms without them.
TIMING_GROUPS = (("kpg_k1", "kpg_k2", "kpg_mk2", "bmm", REFERENCE_STEP), ("torch_k1", "naive_k2"))
# Side-by-side timing (time_side_by_side): rounds, fewest calls per step, accepted spread.
ROUNDS = 4
MIN_CALLS = 4
SPREAD_THRESHOLD = 0.1

METHODS = ("torch_k1", "naive_k2", "kpg_k1", "kpg_k2", "kpg_mk2")

LAYER_SHAPES = tuple(zip((OBSERVATION_SIZE, *HIDDEN_SIZES), (*HIDDEN_SIZES, ACTIONS)))
FORWARD_FLOPS = sum(2 * i * o for i, o in LAYER_SHAPES)
BACKWARD_FLOPS = FORWARD_FLOPS + sum(2 * i * o for i, o in LAYER_SHAPES[1:])
FLOPS_PER_SAMPLE = FORWARD_FLOPS + BACKWARD_FLOPS


@dataclass(frozen=True)
class Target:
    ratio: str
    limit: float
    at_least: bool  # True: value >= limit passes; False: value <= limit passes
    agents: tuple[int, ...]  # the agent counts of FULL_AGENTS it is judged at


# The goals, judged only on FULL_AGENTS. The per-agent growth allows 5 %, the spread of
# repeated runs on this machine.
TARGETS = (
    Target("k2_speedup_over_naive", 4.0, True, (512,)),
    Target("kpg_k2_over_k1", 2.3, False, FULL_AGENTS),
    Target("kpg_k1_fraction_of_matmul_rate", 0.40, True, (512, 2048)),
    Target("kpg_k2_time_per_agent_vs_512", 1.05, False, (2048,)),
    # Issue 28: momentum k=2 pays one extra forward of the others' terms over k=1.
    Target("kpg_momentum_k2_over_k1", 1.35, False, FULL_AGENTS),
)


LAUNCH_AGENTS = {"cuda": (8, 512, 4096), "cpu": ()}
QUICK_LAUNCH_AGENTS = (2, 8)
PROFILED_STEPS = 3
CAPTURE_AGENTS = 512


# ---------------------------------------------------------------------------------------------
# The rollout and the loss, shared by every method
# ---------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    observations: torch.Tensor  # [agents, batch, observation size]
    actions: torch.Tensor  # [agents, batch]
    old_log_prob: torch.Tensor  # [agents, batch]
    advantages: torch.Tensor  # [agents, batch]

    @property
    def agents(self) -> int:
        return self.actions.shape[0]

    @property
    def device(self) -> torch.device:
        return self.actions.device


def make_rollout(agents: int, device: torch.device, seed: int = 0) -> Rollout:
    """The same values on every device: drawn on the CPU, then moved."""
    generator = torch.Generator().manual_seed(seed)
    observations = torch.randn(agents, BATCH, OBSERVATION_SIZE, generator=generator)
    actions = torch.randint(ACTIONS, (agents, BATCH), generator=generator)
    # Ratios start near 1, as in the first epoch of PPO: the rollout policy is about the initial one.
    with torch.no_grad():
        old_log_prob = log_probs(initial_actor(agents, torch.device("cpu"))(observations), actions)
    old_log_prob += 0.01 * torch.randn(agents, BATCH, generator=generator)
    advantages = torch.randn(agents, BATCH, generator=generator)
    return Rollout(*(t.to(device) for t in (observations, actions, old_log_prob, advantages)))


def initial_actor(agents: int, device: torch.device) -> kpg.nn.AgentMLP:
    """Every method starts from these weights (per-agent modules are its unstacked copies)."""
    torch.manual_seed(1)
    return kpg.nn.AgentMLP(agents, OBSERVATION_SIZE, ACTIONS, HIDDEN_SIZES, activation="tanh").to(device)


def log_probs(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    # Categorical(logits=...).log_prob's formula, without the distribution object; log_softmax
    # over 5 logits costs twice as much.
    return logits.gather(-1, actions.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def agent_losses(
    rollout: Rollout, log_prob: torch.Tensor, anticipated_log_prob: torch.Tensor | None, level: int
) -> torch.Tensor:
    return kpg.joint_ratio_loss(
        log_prob,
        rollout.old_log_prob,
        rollout.advantages,
        anticipated_log_prob,
        level=level,
        clip_eps=CLIP_EPS,
        others=OTHERS,
    ).loss


def per_agent_log_probs(models: list[nn.Module], rollout: Rollout) -> torch.Tensor:
    logits = torch.stack([model(rollout.observations[a]) for a, model in enumerate(models)])
    return log_probs(logits, rollout.actions)


# ---------------------------------------------------------------------------------------------
# What gets timed. Each builder makes one method's models and optimizer for one agent count and
# returns the zero-argument update to time.
# ---------------------------------------------------------------------------------------------


def build_torch_k1(rollout: Rollout) -> Callable[[], object]:
    models = kpg.nn.unstack(initial_actor(rollout.agents, rollout.device))
    optimizer = torch.optim.Adam([p for m in models for p in m.parameters()], lr=LEARNING_RATE, foreach=True)

    def update() -> None:
        optimizer.zero_grad()
        agent_losses(rollout, per_agent_log_probs(models, rollout), None, level=1).sum().backward()
        optimizer.step()

    return update


def build_naive_k2(rollout: Rollout) -> Callable[[], object]:
    models = kpg.nn.unstack(initial_actor(rollout.agents, rollout.device))
    optimizer = torch.optim.Adam([p for m in models for p in m.parameters()], lr=LEARNING_RATE, foreach=True)

    def update() -> None:
        base_state = copy.deepcopy(optimizer.state_dict())
        base_models = copy.deepcopy(models)
        optimizer.zero_grad()  # level 1: plain MAPPO
        agent_losses(rollout, per_agent_log_probs(models, rollout), None, level=1).sum().backward()
        optimizer.step()
        anticipated = copy.deepcopy(models)  # the level-1 policies
        for model, base in zip(models, base_models):  # every level restarts from the base ...
            model.load_state_dict(base.state_dict())
        optimizer.load_state_dict(base_state)  # ... and the base optimizer state
        optimizer.zero_grad()  # level 2: own policy at base, the others at level 1
        own = per_agent_log_probs(models, rollout)
        with torch.no_grad():
            anticipated_log_prob = per_agent_log_probs(anticipated, rollout)
        agent_losses(rollout, own, anticipated_log_prob, level=2).sum().backward()
        optimizer.step()

    return update


def kpg_actor_step(
    rollout: Rollout, k: int, **options
) -> tuple[kpg.KPGOptimizer, Callable[[kpg.KPGContext], torch.Tensor]]:
    """kpg's optimizer over a fresh agent-batched actor, and the closure of one actor update."""
    actor = initial_actor(rollout.agents, rollout.device)
    optimizer = kpg.KPGOptimizer(actor, k=k, optimizer="adam", lr=LEARNING_RATE, **options)

    def closure(ctx: kpg.KPGContext) -> torch.Tensor:
        log_prob = ctx.at_base(lambda: log_probs(actor(rollout.observations), rollout.actions))
        anticipated_log_prob = None
        if ctx.level > 1:
            with ctx.anticipated():
                anticipated_log_prob = log_probs(actor(rollout.observations), rollout.actions)
        return agent_losses(rollout, log_prob, anticipated_log_prob, ctx.level)

    return optimizer, closure


def build_kpg(k: int, **options) -> Callable[[Rollout], Callable[[], object]]:
    def build(rollout: Rollout) -> Callable[[], object]:
        optimizer, closure = kpg_actor_step(rollout, k, **options)
        return lambda: optimizer.step(closure)

    return build


BUILDERS: dict[str, Callable[[Rollout], Callable[[], object]]] = {
    "torch_k1": build_torch_k1,
    "naive_k2": build_naive_k2,
    "kpg_k1": build_kpg(1),
    "kpg_k2": build_kpg(2),
    "kpg_mk2": build_kpg(2, anticipation="momentum"),
}
assert tuple(BUILDERS) == METHODS


def build_matmuls(agents: int, device: torch.device) -> Callable[[], object]:
    """The MLP's forward and backward matrix products for every agent, as bare torch.bmm calls."""
    products = []
    on = dict(device=device)
    for layer, (i, o) in enumerate(LAYER_SHAPES):
        x, weight, grad_out = (
            torch.randn(agents, BATCH, i, **on),
            torch.randn(agents, o, i, **on),
            torch.randn(agents, BATCH, o, **on),
        )
        products.append((x, weight.transpose(1, 2), torch.empty(agents, BATCH, o, **on)))  # forward
        products.append((grad_out.transpose(1, 2), x, torch.empty(agents, o, i, **on)))  # weight gradient
        if layer > 0:
            products.append((grad_out, weight, torch.empty(agents, BATCH, i, **on)))  # input gradient

    def run() -> None:
        for a, b, out in products:
            torch.bmm(a, b, out=out)

    return run


# ---------------------------------------------------------------------------------------------
# Measurement and report
# ---------------------------------------------------------------------------------------------


# glibc's mallopt parameters (malloc.h) and the largest mmap threshold it takes on 64-bit machines.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MAX_MMAP_THRESHOLD = 32 << 20


def pin_malloc_thresholds() -> bool:
    """Fixes glibc malloc's thresholds in this process: blocks below 32 MiB come from the heap, and
    memory freed at its top stays there instead of going back to the kernel. Returns whether the C
    library took them (False off glibc).

    A training process repeats one update, and after two of them glibc serves it from memory it
    already holds (kpg k2 at 2048 agents, alone: at most 6 page faults per step from its third step
    on). This script times several configurations in turn in one process, and glibc's trimming then
    hands back what one of them freed, for the next to fault in again: kpg k2 at 2048 agents timed in turn with
    the 512-agent
    case faulted 48 pages per agent and step and took 241 us per agent (512 agents: 208) with the
    default thresholds, against 4.4 faults and 196 us (512 agents: 201) with these. The thresholds
    apply to every method alike; ``--default-malloc`` leaves them as they are.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MAX_MMAP_THRESHOLD)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: Python starts a
    subprocess with vfork, so the child's ru_maxrss starts at the parent's peak (seen here: a
    9 MiB child reported the 810 MiB of its parent)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


def reset_peak_resident_bytes() -> None:
    """Starts VmHWM again from the current resident set (Linux's clear_refs), so that the peaks of
    importing torch do not count."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def memory_of_case(method: str, agents: int, device: torch.device) -> dict:
    """Runs in a fresh process: peak memory of MEMORY_STEPS updates above the baseline, the resident
    set on the CPU, torch's allocated device memory on CUDA."""
    rollout = make_rollout(agents, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        baseline = resident_bytes()
        reset_peak_resident_bytes()
    update = BUILDERS[method](rollout)
    for _ in range(MEMORY_STEPS):
        update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_resident_bytes()
    return {"peak_bytes_above_baseline": max(0, peak - baseline), "baseline_bytes": baseline}


def measure_memory(method: str, agents: int, device: torch.device) -> dict:
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "--memory-of",
            method,
            str(agents),
            "--device",
            device.type,
            "--threads",
            str(torch.get_num_threads()),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


@dataclass
class Timing:
    """Per-call seconds of one step, gathered over the rounds of :func:`time_side_by_side`."""

    times: list[float]
    other_processes_seconds: float | None = None  # their CPU time while this step was timed (None off Linux)
    wall_seconds: float = 0.0

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def iqr(self) -> float:
        if len(self.times) < 2:
            return 0.0
        quartiles = statistics.quantiles(self.times, n=4, method="inclusive")
        return quartiles[2] - quartiles[0]

    @property
    def other_cores(self) -> float | None:
        if self.other_processes_seconds is None:
            return None
        return max(0.0, self.other_processes_seconds / self.wall_seconds)

    def settled(self, min_run_time: float, max_run_time: float) -> bool:
        spent = sum(self.times)
        if spent >= max_run_time:
            return True
        rounds_done = len(self.times) >= MIN_CALLS and spent >= min_run_time
        return rounds_done and self.iqr <= SPREAD_THRESHOLD * self.median


def time_side_by_side(
    steps: dict[str, Callable[[], object]],
    min_run_time: float,
    max_run_time: float,
    synchronize: Callable[[], object] = lambda: None,
) -> dict[str, Timing]:
    """Times every step call by call, visiting the steps in turn, round after round.

    The targets are ratios between these steps, so a change in the machine's speed while a case
    runs (clock, the VM's neighbours, other processes) must hit all of them alike: timing one step
    to the end before starting the next let such drifts land on one side of a ratio (kpg k2 / k1 at
    512 agents measured 2.03 to 2.37 in four such runs on one machine). Each round gives every step
    one untimed call (the step before left the caches and the allocator's free lists in its own
    state), then a slice of timed calls: at least one, and ``min_run_time / ROUNDS`` seconds. A step
    is done once it has ``min_run_time`` seconds of calls, at least MIN_CALLS of them and an
    interquartile range within SPREAD_THRESHOLD of the median, or ``max_run_time`` seconds of calls;
    the others go on in rounds without it. ``synchronize`` waits for the device (CUDA) before each
    reading of the clock.
    """
    timings = {name: Timing([]) for name in steps}
    slice_seconds = min_run_time / ROUNDS
    while not all(t.settled(min_run_time, max_run_time) for t in timings.values()):
        for name, step in steps.items():
            timing = timings[name]
            if timing.settled(min_run_time, max_run_time):
                continue
            step()
            gc.collect()
            synchronize()
            gc.disable()  # a collection inside a call would be charged to whichever step it fell in
            try:
                with OtherProcessesCPU() as others:
                    slice_start = time.perf_counter()
                    while True:  # at least one call per slice
                        start = time.perf_counter()
                        step()
                        synchronize()
                        end = time.perf_counter()
                        timing.times.append(end - start)
                        if end - slice_start >= slice_seconds:
                            break
            finally:
                gc.enable()
            timing.wall_seconds += end - slice_start
            if others.seconds is not None:
                timing.other_processes_seconds = (timing.other_processes_seconds or 0.0) + others.seconds
    return timings


def run_case(agents: int, device: torch.device, min_run_time: float, max_run_time: float, memory: bool) -> dict:
    rollout = make_rollout(agents, device)
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    timings = {}
    for group in TIMING_GROUPS:
        steps = {name: BUILDERS[name](rollout) for name in group if name in BUILDERS}
        if "bmm" in group:
            steps["bmm"] = build_matmuls(agents, device)
        if REFERENCE_STEP in group and agents != PER_AGENT_REFERENCE:
            steps[REFERENCE_STEP] = BUILDERS["kpg_k2"](make_rollout(PER_AGENT_REFERENCE, device))
        timings.update(time_side_by_side(steps, min_run_time, max_run_time, synchronize))
        del steps
        gc.collect()
    flops = FLOPS_PER_SAMPLE * BATCH * agents
    matmul_rate = flops / timings["bmm"].median
    memory_bytes = {}
    for method in METHODS:
        line = f"  {method:<10} {timings[method].median * 1e3:10.2f} ms"
        if memory:
            memory_bytes[method] = measure_memory(method, agents, device)
            peak = memory_bytes[method].get("peak_bytes_above_baseline")
            line += f"  {'?' if peak is None else f'{peak / 2**20:.0f}'} MiB"
        print(line, file=sys.stderr)
    print(f"  {'bmm':<10} {timings['bmm'].median * 1e3:10.2f} ms  {matmul_rate / 1e9:.1f} GFLOP/s", file=sys.stderr)
    if REFERENCE_STEP in timings:
        print(
            f"  kpg_k2 at {PER_AGENT_REFERENCE} agents {timings[REFERENCE_STEP].median * 1e3:.2f} ms", file=sys.stderr
        )
    return {
        "agents": agents,
        "seconds": {method: timings[method].median for method in METHODS},
        "iqr_seconds": {method: timings[method].iqr for method in METHODS},
        "samples": {method: len(timings[method].times) for method in METHODS},
        "other_processes_cores": {name: timing.other_cores for name, timing in timings.items()},
        "memory": memory_bytes,
        "model_flops": flops,
        "matmul_seconds": timings["bmm"].median,
        "matmul_flops_per_second": matmul_rate,
        "kpg_k1_flops_per_second": flops / timings["kpg_k1"].median,
        "reference_kpg_k2_seconds": timings["kpg_k2" if agents == PER_AGENT_REFERENCE else REFERENCE_STEP].median,
    }


def step_work(agents: int, device: torch.device) -> dict:
    """What one kpg k=2 step launches, counted by torch.profiler over PROFILED_STEPS steps after two
    warm-up steps: device operations (kernels, copies, memsets) and kernels on CUDA, calls of kpg's
    ops (kpg::*) on both devices."""
    optimizer, closure = kpg_actor_step(make_rollout(agents, device), k=2)
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        optimizer.step(closure)
    synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(PROFILED_STEPS):
            optimizer.step(closure)
        synchronize()
    events = profile.events()
    on_device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    kernels = [e for e in on_device if not e.name.startswith(("Memcpy", "Memset"))]
    return {
        "agents": agents,
        "kpg_op_calls_per_step": sum(e.name.startswith("kpg::") for e in events) / PROFILED_STEPS,
        "device_operations_per_step": len(on_device) / PROFILED_STEPS if device.type == "cuda" else None,
        "kernels_per_step": len(kernels) / PROFILED_STEPS if device.type == "cuda" else None,
        "kpg_kernels_per_step": (
            sum("kpg" in e.name for e in kernels) / PROFILED_STEPS if device.type == "cuda" else None
        ),
    }


def captured_vs_eager(agents: int, device: torch.device, min_run_time: float, max_run_time: float) -> dict:
    """A kpg k=2 step replayed from a CUDA graph (KPGOptimizer.capture_step) against the same step
    run eagerly, timed side by side on one optimizer."""
    optimizer, closure = kpg_actor_step(make_rollout(agents, device), k=2, nonfinite="skip")
    replay = optimizer.capture_step(closure)
    timings = time_side_by_side(
        {"eager": lambda: optimizer.step(closure), "captured": replay},
        min_run_time,
        max_run_time,
        lambda: torch.cuda.synchronize(device),
    )
    seconds = {name: timing.median for name, timing in timings.items()}
    return {"agents": agents, "seconds": seconds, "eager_over_captured": seconds["eager"] / seconds["captured"]}


def step_profile(
    launch_agents: tuple[int, ...], device: torch.device, min_run_time: float, max_run_time: float
) -> dict:
    work = []
    for agents in launch_agents:
        print(f"profiling a kpg k=2 step at {agents} agents on {device} ...", file=sys.stderr)
        work.append(step_work(agents, device))
    counted = "kernels_per_step" if device.type == "cuda" else "kpg_op_calls_per_step"
    counts = [w[counted] for w in work]
    targets = []
    if len(counts) > 1:
        targets.append(
            {
                "ratio": f"{counted}_most_over_fewest",
                "limit": 1.0,
                "at_least": False,
                "value": max(counts) / min(counts) if min(counts) else None,
                "passed": min(counts) > 0 and max(counts) == min(counts),
            }
        )
    captured = None
    if device.type == "cuda":
        print(f"timing a captured kpg k=2 step at {CAPTURE_AGENTS} agents ...", file=sys.stderr)
        captured = captured_vs_eager(CAPTURE_AGENTS, device, min_run_time, max_run_time)
    return {"work": work, "captured": captured, "targets": targets}


def print_step_profile(profile: dict) -> None:
    print("\none kpg k=2 step (torch.profiler): agents, kpg op calls, device operations, kernels, kpg kernels")
    for w in profile["work"]:
        cells = [
            w["kpg_op_calls_per_step"],
            w["device_operations_per_step"],
            w["kernels_per_step"],
            w["kpg_kernels_per_step"],
        ]
        print(f"{w['agents']:>6}  " + "  ".join(f"{'-' if c is None else f'{c:g}':>8}" for c in cells))
    if profile["captured"] is not None:
        c = profile["captured"]
        print(
            f"captured step at {c['agents']} agents: eager {c['seconds']['eager'] * 1e3:.3f} ms, captured "
            f"{c['seconds']['captured'] * 1e3:.3f} ms, eager/captured {c['eager_over_captured']:.2f}"
        )
    for result in profile["targets"]:
        value = "n/a" if result["value"] is None else f"{result['value']:.2f}"
        print(
            f"target {result['ratio']} <= {result['limit']:g} (constant in the agent count): {value}  "
            f"{'PASS' if result['passed'] else 'MISS'}"
        )


def add_ratios(cases: list[dict]) -> None:
    for case in cases:
        s = case["seconds"]
        case["ratios"] = {
            "k2_speedup_over_naive": s["naive_k2"] / s["kpg_k2"],
            "k1_speedup_over_torch": s["torch_k1"] / s["kpg_k1"],
            "kpg_k2_over_k1": s["kpg_k2"] / s["kpg_k1"],
            "kpg_momentum_k2_over_k1": s["kpg_mk2"] / s["kpg_k1"],
            "kpg_momentum_k2_over_k2": s["kpg_mk2"] / s["kpg_k2"],
            "kpg_k1_fraction_of_matmul_rate": case["kpg_k1_flops_per_second"] / case["matmul_flops_per_second"],
            "kpg_k2_time_per_agent_vs_512": (s["kpg_k2"] / case["agents"])
            / (case["reference_kpg_k2_seconds"] / PER_AGENT_REFERENCE),
        }


def judge_targets(case: dict) -> list[dict]:
    results = []
    for target in TARGETS:
        if case["agents"] not in target.agents:
            continue
        results.append(judged(target, case["ratios"][target.ratio]))
    return results


def contended_methods(case: dict) -> list[str]:
    return [m for m, cores in case["other_processes_cores"].items() if cores is not None and cores > CONTENDED_CORES]


def print_report(cases: list[dict], device: torch.device) -> None:
    print(
        f"\none actor update, ms (median); MLP {OBSERVATION_SIZE}-{'-'.join(map(str, HIDDEN_SIZES))}-{ACTIONS} tanh, "
        f"batch {BATCH} per agent, Adam, float32, {device}, {torch.get_num_threads()} threads"
    )
    header = (
        f"{'agents':>6}  " + "  ".join(f"{m:>9}" for m in METHODS) + f"  {'naive/k2':>8}  {'k2/k1':>6}  {'mk2/k1':>6}  "
        f"{'mk2/k2':>6}  "
        f"{'k1 GFLOP/s':>10}  {'bmm GFLOP/s':>11}  {'k1/bmm':>6}  {'k2 us/agent':>11}  {'others':>6}"
    )
    print(header)
    for case in cases:
        s, r = case["seconds"], case["ratios"]
        busiest = max((c for c in case["other_processes_cores"].values() if c is not None), default=None)
        print(
            f"{case['agents']:>6}  "
            + "  ".join(f"{s[m] * 1e3:9.2f}" for m in METHODS)
            + f"  {r['k2_speedup_over_naive']:8.2f}  {r['kpg_k2_over_k1']:6.2f}  {r['kpg_momentum_k2_over_k1']:6.2f}  "
            f"{r['kpg_momentum_k2_over_k2']:6.2f}  "
            f"{case['kpg_k1_flops_per_second'] / 1e9:10.1f}  {case['matmul_flops_per_second'] / 1e9:11.1f}  "
            f"{r['kpg_k1_fraction_of_matmul_rate']:6.2f}  {s['kpg_k2'] / case['agents'] * 1e6:11.1f}  "
            f"{'-' if busiest is None else f'{busiest:.2f}':>6}"
        )
    if any(case["memory"] for case in cases):
        print("\npeak resident memory above baseline, MiB (one process per case)")
        print(f"{'agents':>6}  " + "  ".join(f"{m:>9}" for m in METHODS))
        for case in cases:
            cells = []
            for method in METHODS:
                peak = case["memory"].get(method, {}).get("peak_bytes_above_baseline")
                cells.append(f"{'?' if peak is None else f'{peak / 2**20:.0f}':>9}")
            print(f"{case['agents']:>6}  " + "  ".join(cells))
    print()
    for case in cases:
        for result in case["targets"]:
            value = "n/a" if result["value"] is None else f"{result['value']:.2f}"
            relation = ">=" if result["at_least"] else "<="
            verdict = "PASS" if result["passed"] else "MISS"
            print(
                f"target {result['ratio']} {relation} {result['limit']:g} at {case['agents']} agents: "
                f"{value}  {verdict}"
            )
        contended = contended_methods(case)
        if contended:
            print(
                f"WARNING: other processes kept more than {CONTENDED_CORES} cores busy while timing "
                f"{', '.join(contended)} "
                f"at {case['agents']} agents; these numbers are contended, rerun on an idle machine"
            )
    print("\nothers: the most cores other processes kept busy while one of the row's steps was timed (from /proc/stat)")


def metadata(args: argparse.Namespace, device: torch.device) -> dict:
    return {
        "question": "one MAPPO actor update at 8..2048 agents: plain torch, naive K=2, kpg k=1 and k=2",
        "model": {
            "observation_size": OBSERVATION_SIZE,
            "hidden_sizes": HIDDEN_SIZES,
            "actions": ACTIONS,
            "activation": "tanh",
            "batch_per_agent": BATCH,
            "optimizer": "adam",
            "lr": LEARNING_RATE,
            "others": OTHERS,
            "dtype": "float32",
            "device": str(device),
        },
        "cuda_device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "malloc_thresholds_pinned": args.malloc_thresholds_pinned,
        "flops_per_sample": {"forward": FORWARD_FLOPS, "backward": BACKWARD_FLOPS},
        "memory": (
            f"peak {'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'RSS (VmHWM, reset after setup)'} "
            f"minus the same after setup, in a subprocess per case, {MEMORY_STEPS} updates"
        ),
        "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        **machine_metadata(args),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--agents",
        nargs="+",
        type=int,
        metavar="N",
        help="agent counts (default: " + " ".join(map(str, FULL_AGENTS)) + ")",
    )
    parser.add_argument(
        "--min-run-time",
        type=float,
        default=1.0,
        help="least seconds of timed runs per method and agent count (default: 1)",
    )
    parser.add_argument(
        "--max-run-time",
        type=float,
        default=10.0,
        help="most seconds of timed runs per method and agent count while the spread stays above "
        "10%% of the median (default: 10)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        help="device to time on (default: cuda when available, else cpu); the targets are judged on the CPU",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc thresholds as they are (see pin_malloc_thresholds)",
    )
    parser.add_argument("--threads", type=int, help="torch (and kpg) threads (default: torch's, one per core)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: agents {' '.join(map(str, QUICK_AGENTS))}, "
        f"{QUICK_MIN_RUN_TIME}-{QUICK_MAX_RUN_TIME} s per measurement",
    )
    parser.add_argument(
        "--launch-agents",
        nargs="*",
        type=int,
        metavar="N",
        help="agent counts of the step profile (default: 8 512 4096 on CUDA, none on the CPU; "
        f"{' '.join(map(str, QUICK_LAUNCH_AGENTS))} with --quick)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--memory-of", nargs=2, metavar=("METHOD", "AGENTS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads needs at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.memory_of:
        method, agents = args.memory_of
        print(json.dumps(memory_of_case(method, int(agents), device)))
        return []
    args.malloc_thresholds_pinned = not args.default_malloc and pin_malloc_thresholds()
    if args.quick:
        args.min_run_time, args.max_run_time = QUICK_MIN_RUN_TIME, QUICK_MAX_RUN_TIME
    agent_counts = args.agents or (QUICK_AGENTS if args.quick else FULL_AGENTS)
    if min(agent_counts) < 1:
        parser.error(f"--agents needs counts >= 1, got {agent_counts}")

    cases = []
    for agents in agent_counts:
        print(f"timing {agents} agents on {device} ...", file=sys.stderr)
        cases.append(run_case(agents, device, args.min_run_time, args.max_run_time, memory=not args.no_memory))
    add_ratios(cases)
    for case in cases:
        case["targets"] = judge_targets(case) if case["agents"] in FULL_AGENTS and device.type == "cpu" else []
        case["contended"] = contended_methods(case)
    print_report(cases, device)
    if device.type != "cpu":
        print(f"no targets judged: they are set for the CPU, these figures are {device}'s")
    elif not any(case["targets"] for case in cases):
        print("no targets judged: they apply to the agent counts " + ", ".join(map(str, FULL_AGENTS)))
    launch_agents = args.launch_agents
    if launch_agents is None:
        launch_agents = QUICK_LAUNCH_AGENTS if args.quick else LAUNCH_AGENTS[device.type]
    profile = step_profile(tuple(launch_agents), device, args.min_run_time, args.max_run_time)
    print_step_profile(profile)
    if args.json:
        directory = os.path.dirname(args.json)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(args.json, "w") as file:
            json.dump({"meta": metadata(args, device), "cases": cases, "step_profile": profile}, file, indent=2)
        print(f"\nwrote {args.json}")
    return cases


if __name__ == "__main__":
    main()
