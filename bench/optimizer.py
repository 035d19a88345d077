"""Optimizer benchmark: how close to memory bandwidth is kpg's fused multi-agent Adam, and how much
faster is it than torch.optim.Adam and than a naive K = 2 KPG step built on torch.optim.Adam?

Adam is memory bound, so every method is judged against a measured copy of the same number of
float32 elements on the same device. For each case (agents, params_per_agent) it times, side by side:

    copy                dst.copy_(src) over one flat buffer of agents * params_per_agent elements
    torch_adam_foreach  torch.optim.Adam(foreach=True).step() on one tensor per agent
    torch_adam_fused    the same with fused=True (recorded as unavailable where torch refuses)
    torch_adam_fused_stacked  fused torch.optim.Adam on one tensor holding every agent's parameters:
                        torch's best case, which gives up per-agent learning rates and clipping
    kpg_commit          torch.ops.kpg.adam_commit over the parameter arena
    kpg_anticipate      torch.ops.kpg.adam_anticipate over the parameter arena
    naive_kpg_k2        K = 2 as research code writes it with torch.optim.Adam (foreach): deep-copy the
                        optimizer state and the parameters, step (level 1, anticipate), restore both
                        (load_state_dict, copy the parameters back), step again (level 2, commit)
    kpg_k2              K = 2 with kpg: one anticipate and one commit

Byte model, in float32 elements moved per parameter (x 4 bytes); GB/s = modeled bytes / median time:

    copy                 2   read src, write dst
    Adam step / commit   7   read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq
                             (torch's steps on per-agent and on stacked tensors alike)
    anticipate           5   read param, grad, exp_avg, exp_avg_sq; write the level's parameters
    K = 2                12  anticipate + commit (naive_kpg_k2 is charged the same useful work; the
                             copies it makes on top show up as a lower effective GB/s)

The model counts each byte the algorithm must read or write once. It ignores the read-for-ownership
that a CPU spends on a store into memory it has not read (copy's dst, anticipate's output), so on CPU
the copy reference reports less than the DRAM bandwidth it really uses and in-place kernels can come
close to or above it. Gradients are not recomputed between levels: only optimizer work is timed.

Run ``python bench/optimizer.py`` (a few minutes on two cores), ``--quick`` for a smoke run on tiny
cases, ``--json PATH`` for machine-readable results. A missed target is reported, not an error. The
targets differ by device (TARGETS): on CUDA, commit at 85 % of copy bandwidth, 5x torch's fused Adam
on 4096 per-agent tensors, and a K = 2 step within 1.8x one fused torch step on stacked tensors.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.utils.benchmark as benchmark

from kpg import _C
from kpg import _ops as ops
from kpg.arena import ParameterArena

DTYPE = torch.float32
LEARNING_RATE = 1e-3  # small enough that thousands of timed steps keep every value finite
BETAS = (0.9, 0.999)
EPS = 1e-8

FULL_CASES = ((8, 1048576), (512, 16384), (4096, 4096))
# Cache-resident sizes that only check the script runs end to end; their numbers mean nothing.
QUICK_CASES = ((4, 4096), (64, 256))
QUICK_MIN_RUN_TIME = 0.01
QUICK_MAX_RUN_TIME = 0.1

# Float32 elements each method must read or write per parameter (see the module docstring).
ELEMENTS_MOVED_PER_PARAM = {
    "copy": 2,
    "torch_adam_foreach": 7,
    "torch_adam_fused": 7,
    "torch_adam_fused_stacked": 7,
    "kpg_commit": 7,
    "kpg_anticipate": 5,
    "naive_kpg_k2": 12,
    "kpg_k2": 12,
}
METHODS = tuple(ELEMENTS_MOVED_PER_PARAM)


@dataclass(frozen=True)
class Target:
    ratio: str
    limit: float
    case: tuple[int, int] | None  # None: every case of FULL_CASES
    at_least: bool = True  # True: value >= limit passes; False: value <= limit passes


# The issues' goals per device. Judged only on FULL_CASES: smaller arenas fit in cache and say nothing.
TARGETS = {
    "cpu": (
        Target("commit_vs_torch_fused", 3.0, (4096, 4096)),
        Target("commit_vs_torch_fused", 1.0, (8, 1048576)),
        Target("k2_vs_naive", 5.0, (4096, 4096)),
        Target("commit_fraction_of_copy_bandwidth", 0.70, None),
    ),
    "cuda": (
        Target("commit_fraction_of_copy_bandwidth", 0.85, (4096, 4096)),
        Target("commit_fraction_of_copy_bandwidth", 0.85, (8, 1048576)),
        Target("commit_vs_torch_fused", 5.0, (4096, 4096)),
        Target("k2_over_torch_fused_stacked", 1.8, None, at_least=False),
    ),
}


# ---------------------------------------------------------------------------------------------
# What gets timed. Each builder allocates one method's buffers for one case and returns the
# zero-argument step to time; the buffers live only as long as that step, so one case's memory is
# freed before the next is built.
# ---------------------------------------------------------------------------------------------


def per_agent_parameters(agents: int, params_per_agent: int, device: str) -> list[torch.Tensor]:
    """One leaf tensor per agent with a gradient set, as torch.optim sees a multi-agent model."""
    params = []
    for _ in range(agents):
        p = torch.randn(params_per_agent, dtype=DTYPE, device=device, requires_grad=True)
        p.grad = torch.randn_like(p)
        params.append(p)
    return params


def torch_adam(params: list[torch.Tensor], **implementation) -> torch.optim.Adam:
    optimizer = torch.optim.Adam(params, lr=LEARNING_RATE, betas=BETAS, eps=EPS, **implementation)
    optimizer.step()  # creates the state lazily, outside the timed region
    return optimizer


def build_copy(agents: int, params_per_agent: int, device: str) -> Callable[[], object]:
    src = torch.randn(agents * params_per_agent, dtype=DTYPE, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touches dst's pages so that page faults stay out of the timing
    return lambda: dst.copy_(src)


def build_torch_adam(implementation: dict) -> Callable[[int, int, str], Callable[[], object]]:
    def build(agents: int, params_per_agent: int, device: str) -> Callable[[], object]:
        return torch_adam(per_agent_parameters(agents, params_per_agent, device), **implementation).step

    return build


def build_torch_adam_fused_stacked(agents: int, params_per_agent: int, device: str) -> Callable[[], object]:
    return torch_adam(per_agent_parameters(1, agents * params_per_agent, device), fused=True).step


def build_naive_kpg_k2(agents: int, params_per_agent: int, device: str) -> Callable[[], object]:
    params = per_agent_parameters(agents, params_per_agent, device)
    optimizer = torch_adam(params, foreach=True)

    def naive_k2_step() -> None:
        base_state = copy.deepcopy(optimizer.state_dict())
        base_params = [p.detach().clone() for p in params]
        optimizer.step()  # level 1: the anticipated parameters (their gradients would be taken here)
        optimizer.load_state_dict(base_state)  # every level restarts from the base state ...
        with torch.no_grad():
            for p, base in zip(params, base_params):  # ... and the base parameters
                p.copy_(base)
        optimizer.step()  # level 2: the commit

    return naive_k2_step


class KPGAdam:
    """The arena, Adam state and per-agent step counts the kpg kernels work on."""

    HYPER = dict(
        beta1=BETAS[0],
        beta2=BETAS[1],
        eps=EPS,
        weight_decay=0.0,
        amsgrad=False,
        maximize=False,
        decoupled_weight_decay=False,
    )

    def __init__(self, agents: int, params_per_agent: int, device: str):
        self.arena = ParameterArena(
            [[torch.nn.Parameter(torch.randn(params_per_agent, dtype=DTYPE, device=device))] for _ in range(agents)]
        )
        self.arena.grad.normal_()
        self.exp_avg = self.arena.new_buffer()
        self.exp_avg_sq = self.arena.new_buffer()
        self.anticipated = self.arena.new_buffer()
        self.step = torch.zeros(agents, dtype=torch.float64, device=device)
        self.lr = torch.full((agents,), LEARNING_RATE, dtype=torch.float64, device=device)
        self.live = torch.zeros(agents, ops.MAX_STATES, dtype=torch.uint8, device=device)
        self.hyper = ops.hyper_rows("adam", self.HYPER, agents, device=device)
        self.commit()  # the state after one step, as torch_adam leaves it

    def commit(self) -> None:
        ops.adam_commit(
            self.arena.param,
            self.arena.grad,
            self.exp_avg,
            self.exp_avg_sq,
            None,
            self.step,
            self.live,
            self.lr,
            self.hyper,
            None,
            None,
            self.arena.chunks,
        )

    def anticipate(self) -> None:
        ops.adam_anticipate(
            self.arena.param,
            self.arena.grad,
            self.anticipated,
            self.exp_avg,
            self.exp_avg_sq,
            None,
            self.step,
            self.live,
            self.lr,
            self.hyper,
            None,
            None,
            self.arena.chunks,
        )

    def k2(self) -> None:
        self.anticipate()  # level 1 (the level-2 gradients would be taken here)
        self.commit()  # level 2


BUILDERS: dict[str, Callable[[int, int, str], Callable[[], object]]] = {
    "copy": build_copy,
    "torch_adam_foreach": build_torch_adam(dict(foreach=True)),
    "torch_adam_fused": build_torch_adam(dict(fused=True)),
    "torch_adam_fused_stacked": build_torch_adam_fused_stacked,
    "kpg_commit": lambda *case: KPGAdam(*case).commit,
    "kpg_anticipate": lambda *case: KPGAdam(*case).anticipate,
    "naive_kpg_k2": build_naive_kpg_k2,
    "kpg_k2": lambda *case: KPGAdam(*case).k2,
}
assert tuple(BUILDERS) == METHODS


# ---------------------------------------------------------------------------------------------
# Measurement and report
# ---------------------------------------------------------------------------------------------

# Other processes' CPU use (in cores) above which a CPU measurement is flagged as contended. On a
# shared two-core machine a busy neighbour stalls OpenMP's spinning barriers (torch's copy and Adam)
# far more than kpg's sleeping thread pool, so contended ratios overstate kpg's lead.
CONTENDED_CORES = 0.25


def _machine_busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot, from /proc/stat (None off Linux)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle, iowait = fields[3], fields[4]
    return (sum(fields[:8]) - idle - iowait) / os.sysconf("SC_CLK_TCK")


class OtherProcessesCPU:
    """Measures the cores other processes kept busy during a ``with`` block (``cores``; None off Linux).

    ``seconds`` is their CPU time, unclipped: /proc/stat counts in clock ticks (10 ms), so a block
    much shorter than a tick reads a tick too many or too few, and only sums over many blocks are
    meaningful."""

    def __enter__(self) -> OtherProcessesCPU:
        self.cores = self.seconds = None
        self._start = (_machine_busy_seconds(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc_info) -> None:
        busy, own, wall = _machine_busy_seconds(), time.process_time(), time.perf_counter()
        if busy is not None and self._start[0] is not None:
            self.seconds = (busy - self._start[0]) - (own - self._start[1])
            self.cores = max(0.0, self.seconds / (wall - self._start[2]))


def measure(step: Callable[[], object], label: str, min_run_time: float, max_run_time: float) -> benchmark.Measurement:
    """Median time of ``step``: repeats until the interquartile range is within 10 % of the median
    (at least four samples and ``min_run_time`` seconds), or ``max_run_time`` seconds have passed."""
    timer = benchmark.Timer(
        stmt="step()",
        globals={"step": step},
        num_threads=torch.get_num_threads(),  # Timer defaults to one thread
        label="optimizer",
        description=label,
    )
    return timer.adaptive_autorange(threshold=0.1, min_run_time=min_run_time, max_run_time=max_run_time)


def run_case(agents: int, params_per_agent: int, device: str, min_run_time: float, max_run_time: float) -> dict:
    numel = agents * params_per_agent
    seconds, iqr_seconds, samples, gbps, other_cores, unavailable = {}, {}, {}, {}, {}, {}
    for method in METHODS:
        try:
            step = BUILDERS[method](agents, params_per_agent, device)
        except (RuntimeError, ValueError, TypeError) as error:  # e.g. fused Adam on an unsupported device
            unavailable[method] = f"{type(error).__name__}: {error}".splitlines()[0]
            print(f"  {method:<20} unavailable: {unavailable[method]}", file=sys.stderr)
            continue
        with OtherProcessesCPU() as others:
            measurement = measure(step, f"{method} {agents}x{params_per_agent} {device}", min_run_time, max_run_time)
        del step
        gc.collect()
        seconds[method] = measurement.median
        iqr_seconds[method] = measurement.iqr
        samples[method] = len(measurement.times)
        other_cores[method] = others.cores
        gbps[method] = ELEMENTS_MOVED_PER_PARAM[method] * DTYPE.itemsize * numel / measurement.median / 1e9
        print(f"  {method:<20} {measurement.median * 1e3:9.3f} ms  {gbps[method]:7.2f} GB/s", file=sys.stderr)
    return {
        "device": device,
        "dtype": str(DTYPE).removeprefix("torch."),
        "agents": agents,
        "params_per_agent": params_per_agent,
        "seconds": seconds,
        "iqr_seconds": iqr_seconds,
        "samples": samples,
        "gbps": gbps,
        "other_processes_cores": other_cores,
        "unavailable": unavailable,
        "ratios": ratios(seconds, gbps),
    }


def ratios(seconds: dict[str, float], gbps: dict[str, float]) -> dict[str, float | None]:
    def quotient(numerator: dict, a: str, denominator: dict, b: str) -> float | None:
        return numerator[a] / denominator[b] if a in numerator and b in denominator else None

    return {
        "commit_vs_torch_fused": quotient(seconds, "torch_adam_fused", seconds, "kpg_commit"),
        "commit_vs_torch_foreach": quotient(seconds, "torch_adam_foreach", seconds, "kpg_commit"),
        "commit_vs_torch_fused_stacked": quotient(seconds, "torch_adam_fused_stacked", seconds, "kpg_commit"),
        "k2_over_torch_fused_stacked": quotient(seconds, "kpg_k2", seconds, "torch_adam_fused_stacked"),
        "k2_vs_naive": quotient(seconds, "naive_kpg_k2", seconds, "kpg_k2"),
        "commit_fraction_of_copy_bandwidth": quotient(gbps, "kpg_commit", gbps, "copy"),
        "anticipate_fraction_of_copy_bandwidth": quotient(gbps, "kpg_anticipate", gbps, "copy"),
    }


def judged(target, value: float | None) -> dict:
    """One target's verdict on a measured ratio (None: not measured, a failure), as the JSON records it."""
    passed = value is not None and (value >= target.limit if target.at_least else value <= target.limit)
    return {"ratio": target.ratio, "limit": target.limit, "at_least": target.at_least, "value": value, "passed": passed}


def judge_targets(case: dict) -> list[dict]:
    shape = (case["agents"], case["params_per_agent"])
    if shape not in FULL_CASES:
        return []
    results = []
    for target in TARGETS[case["device"]]:
        if target.case is not None and target.case != shape:
            continue
        results.append(judged(target, case["ratios"][target.ratio]))
    return results


def contended_methods(case: dict) -> list[str]:
    if case["device"] != "cpu":
        return []
    return [m for m, cores in case["other_processes_cores"].items() if cores is not None and cores > CONTENDED_CORES]


def print_report(cases: list[dict]) -> None:
    name_width = max(map(len, METHODS))
    for case in cases:
        print(
            f"\n{case['device']}  agents={case['agents']}  params_per_agent={case['params_per_agent']}  "
            f"({case['agents'] * case['params_per_agent'] / 1e6:.1f}M {case['dtype']} parameters)"
        )
        print(
            f"  {'method':<{name_width}}  {'median ms':>10}  {'IQR ms':>8}  {'GB/s':>7}  {'of copy':>7}  {'others':>6}"
        )
        copy_gbps = case["gbps"].get("copy")
        for method in METHODS:
            if method in case["unavailable"]:
                print(f"  {method:<{name_width}}  unavailable: {case['unavailable'][method]}")
                continue
            fraction = f"{case['gbps'][method] / copy_gbps:7.2f}" if copy_gbps else f"{'-':>7}"
            others = case["other_processes_cores"][method]
            print(
                f"  {method:<{name_width}}  {case['seconds'][method] * 1e3:10.3f}  "
                f"{case['iqr_seconds'][method] * 1e3:8.3f}  {case['gbps'][method]:7.2f}  {fraction}  "
                f"{'-' if others is None else f'{others:.2f}':>6}"
            )
        for name, value in case["ratios"].items():
            print(f"  {name:<38} {'n/a' if value is None else f'{value:.2f}'}")
        for result in case["targets"]:
            value = "n/a" if result["value"] is None else f"{result['value']:.2f}"
            verdict = "PASS" if result["passed"] else "MISS"
            relation = ">=" if result["at_least"] else "<="
            print(f"  target {result['ratio']} {relation} {result['limit']:g}: {value}  {verdict}")
        contended = contended_methods(case)
        if contended:
            print(
                f"  WARNING: other processes kept more than {CONTENDED_CORES} cores busy while timing "
                f"{', '.join(contended)}; these numbers are contended, rerun on an idle machine"
            )
    print("\nothers: cores other processes kept busy during the measurement (from /proc/stat)")


def metadata(args: argparse.Namespace, devices: list[str]) -> dict:
    return {
        "question": "fused multi-agent Adam (kpg) vs torch.optim.Adam and naive K=2 KPG, against copy bandwidth",
        "byte_model_elements_per_param": ELEMENTS_MOVED_PER_PARAM,
        "devices": devices,
        "cuda_device_name": torch.cuda.get_device_name() if "cuda" in devices else None,
        **machine_metadata(args),
    }


def machine_metadata(args: argparse.Namespace) -> dict:
    """What a benchmark's figures depend on besides its cases: versions, threads, machine, run options."""
    return {
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "kpg_threads": _C.get_num_threads(),
        "kpg_build_info": _C.build_info(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "min_run_time": args.min_run_time,
        "max_run_time": args.max_run_time,
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def parse_case(text: str) -> tuple[int, int]:
    try:
        agents, params_per_agent = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a case is AGENTSxPARAMS_PER_AGENT such as 4096x4096, got {text!r}") from None
    if agents < 1 or params_per_agent < 1:
        raise argparse.ArgumentTypeError(f"a case needs at least one agent and one parameter, got {text!r}")
    return agents, params_per_agent


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cases",
        nargs="+",
        type=parse_case,
        metavar="AxP",
        help="cases as AGENTSxPARAMS_PER_AGENT (default: " + " ".join(f"{a}x{p}" for a, p in FULL_CASES) + ")",
    )
    parser.add_argument(
        "--device",
        action="append",
        choices=("cpu", "cuda"),
        help="device to time on, repeatable (default: cpu, and cuda when available)",
    )
    parser.add_argument(
        "--min-run-time", type=float, default=0.5, help="least seconds of timed runs per method and case (default: 0.5)"
    )
    parser.add_argument(
        "--max-run-time",
        type=float,
        default=5.0,
        help="most seconds of timed runs per method and case while the spread stays above "
        "10%% of the median (default: 5)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: tiny cache-resident cases, {QUICK_MIN_RUN_TIME}-{QUICK_MAX_RUN_TIME} s per measurement",
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.quick:
        args.min_run_time, args.max_run_time = QUICK_MIN_RUN_TIME, QUICK_MAX_RUN_TIME
    cases = args.cases or (QUICK_CASES if args.quick else FULL_CASES)
    devices = args.device or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")

    torch.manual_seed(0)
    results = []
    for device in devices:
        for agents, params_per_agent in cases:
            print(f"timing {agents}x{params_per_agent} on {device} ...", file=sys.stderr)
            case = run_case(agents, params_per_agent, device, args.min_run_time, args.max_run_time)
            case["targets"] = judge_targets(case)
            case["contended"] = contended_methods(case)
            results.append(case)
    print_report(results)
    if not any(case["targets"] for case in results):
        print("\nno targets judged: they apply to the cases " + ", ".join(f"{a}x{p}" for a, p in FULL_CASES))
    if args.json:
        directory = os.path.dirname(args.json)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(args.json, "w") as file:
            json.dump({"meta": metadata(args, devices), "cases": results}, file, indent=2)
        print(f"\nwrote {args.json}")
    return results


if __name__ == "__main__":
    main()
