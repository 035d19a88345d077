"""``kpg train``: one training run of a trainer on an environment, with a progress bar, CSV and
TensorBoard logs, atomic checksummed checkpoints, ``--resume``, evaluation and a final summary.

A run writes into ``<logdir>/<name>/``: ``config.json``, ``metrics.csv`` (one row per update),
TensorBoard events, ``checkpoint.pt`` (every ``checkpoint_every`` updates and at the end or on
Ctrl-C) and ``summary.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from kpg.algos import ALGORITHMS, FACMACConfig, MADDPGConfig, MAPPOConfig
from kpg.algos.replay import without_rows
from kpg.algos.run_context import RunContext
from kpg.checkpoint import CheckpointError, load_checkpoint, numpy_state_as_data, numpy_state_from_data, save_checkpoint
from kpg.envs import SMAX_PREFIX, VMAS_PREFIX, EnvPool, make_env_factory, make_pool
from kpg.options import MissingCheckpointError, RunFolderError, check_options, require, require_ranges

RECENT_EPISODES = 20


@dataclass
class TrainConfig:
    """One training run. Flags override the config file (``--config``), which overrides these defaults."""

    algo: Literal["mappo", "maddpg", "facmac"] = "mappo"
    # simple_spread, mpe2:SCENARIO, mamujoco:SCENARIO-CONF, magent2:TASK, smax:MAP (kpg[smax]),
    # vmas:SCENARIO (kpg[vmas]), module:callable
    env: str = "simple_spread"
    agents: int | None = 3  # number of agents, for environments that take one (simple_spread, vmas:SCENARIO)
    env_options: dict[str, str] = field(default_factory=dict)  # extra keyword arguments of the environment
    k: int = 2  # KPG levels of the actor update; 1 is the plain algorithm
    k_until: int | None = None  # environment steps after which k drops to 1
    # the actor's KPGOptimizer anticipation: exact levels, or "momentum" (k <= 2: level 1 predicted from each
    # agent's last two updates, one closure evaluation per step; docs/algorithm.md)
    anticipation: Literal["exact", "momentum"] = "exact"
    anticipation_reset: bool = False  # MAPPO, momentum: forget the updates at every new rollout
    seed: int = 0  # seeds the environments, the networks and action sampling (0 to 2**32 - 1)
    steps: int = 100_000  # environment steps (summed over copies)
    copies: int = 8  # environment copies stepped together
    device: str = "cpu"  # cpu, cuda (under torchrun: each rank's GPU) or cuda:INDEX
    threads: int = 1  # torch CPU threads; 1 lets several runs share the cores
    logdir: Path = Path("runs")  # the folder that holds run folders
    name: str | None = None  # run folder under logdir; default ALGO-ENV-kK-sSEED
    checkpoint_every: int = 100  # updates between checkpoints (0: only at the end)
    checkpoint_replay: bool = (
        True  # off-policy: keep the replay buffer in checkpoints (off: smaller files, a resume refills it)
    )
    resume: bool = False  # continue from <logdir>/<name>/checkpoint.pt
    # start over in a run folder that holds a run: its checkpoint, logs and summary are deleted first
    overwrite: bool = False
    eval_episodes: int = 10  # greedy-policy episodes at the end (0: none)
    tensorboard: bool = True  # write TensorBoard events beside metrics.csv
    progress: bool = True  # show a progress bar
    dist_timeout: float = 300.0  # under torchrun: seconds a rank waits for the others before stopping with an error
    mappo: MAPPOConfig = field(default_factory=MAPPOConfig)
    maddpg: MADDPGConfig = field(default_factory=MADDPGConfig)
    facmac: FACMACConfig = field(default_factory=FACMACConfig)

    def validate(self) -> None:
        """Raises :class:`kpg.options.OptionError` for a value out of range (types: kpg.options.check_options)."""
        require_ranges(
            self,
            "",
            {
                **dict.fromkeys(("agents", "k", "steps", "copies", "threads"), (1, None, False)),
                **dict.fromkeys(("k_until", "checkpoint_every", "eval_episodes"), (0, None, False)),
                "seed": (0, 2**32 - 1, False),  # numpy's global seed takes 32 bits
                "dist_timeout": (0, None, True),
            },
        )
        require(self, "", "device", _device_problem(self.device) is None, _device_problem(self.device) or "")
        for folder in (self.logdir, *self.logdir.parents):
            require(self, "", "logdir", not folder.exists() or folder.is_dir(), f"a folder; {folder} is a file")
        require(
            self, "", "name", not self.run_dir.exists() or self.run_dir.is_dir(), f"a folder; {self.run_dir} is a file"
        )
        require(self, "", "resume", not (self.resume and self.overwrite), "--resume or --overwrite, not both")

    @property
    def run_name(self) -> str:
        # A momentum run gets its own folder, so that kpg compare never reuses an exact run's results.
        anticipation = "" if self.anticipation == "exact" else f"-{self.anticipation}"
        return self.name or f"{self.algo}-{self.env.replace(':', '_')}-k{self.k}{anticipation}-s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return self.logdir / self.run_name

    def env_options_parsed(self) -> dict[str, Any]:
        options: dict[str, Any] = {key: _parse_scalar(value) for key, value in self.env_options.items()}
        if self.agents is not None and (self.env == "simple_spread" or self.env.startswith(VMAS_PREFIX)):
            options.setdefault("agents", self.agents)
        return options

    def env_factory(self):
        if self.env.startswith((SMAX_PREFIX, VMAS_PREFIX)):
            raise ValueError(
                f"{self.env} is a vectorized environment without a PettingZoo factory; build it with make_pool"
            )
        return make_env_factory(self.env, **self.env_options_parsed())

    def make_pool(self, copies: int, seed: int, device: str | None = None):
        """``copies`` copies of the environment (an EnvPool, a SMAXPool for smax:MAP, or a VMASPool for
        vmas:SCENARIO, whose tensors live on ``device``, default ``self.device``)."""
        options = self.env_options_parsed()
        if self.env.startswith(VMAS_PREFIX):
            options.setdefault("device", device or self.device)
        return make_pool(self.env, copies, seed, **options)


def _device_problem(device: str) -> str | None:
    """Why this process cannot train on ``device``, or None where it can."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        return "a torch device: cpu, cuda or cuda:INDEX"
    if parsed.type == "cpu":
        return None
    if parsed.type != "cuda":
        return "cpu, cuda or cuda:INDEX"
    if not torch.cuda.is_available():
        built = "this torch build has no CUDA" if torch.version.cuda is None else "torch finds no CUDA GPU"
        return f"cpu ({built})"
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        return f"cpu or cuda:0 to cuda:{torch.cuda.device_count() - 1}"
    return None


def _config_as_data(config: TrainConfig) -> dict[str, Any]:
    """The run's options as JSON data (paths as strings), for config.json and checkpoints."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def _parse_scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ---- stopping, random streams ------------------------------------------------------------------------


class StopRequests:
    """Ctrl-C (SIGINT) or SIGTERM asks a run to stop after its current update, so that the final
    checkpoint holds a consistent state; a second one stops at once (the last checkpoint stands).
    Under torchrun, which passes the signal it gets on to every rank once, the ranks agree to stop
    after the same update. Handlers are installed only in the main thread, the one Python delivers
    signals to."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}

    def _handle(self, number, frame) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(number).name
        print(
            f"\n{self.requested}: stopping after this update and writing a checkpoint; press Ctrl-C again to stop at "
            "once (the last checkpoint stands)",
            file=sys.stderr,
            flush=True,
        )

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}


def _rng_states() -> dict[str, Any]:
    """The global generators' states as checkpoint data (tensors, numbers, tuples)."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": numpy_state_as_data(np.random.get_state(legacy=False)),
        "python": random.getstate(),
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(numpy_state_from_data(states["numpy"]))
    random.setstate(states["python"])


# ---- the run ---------------------------------------------------------------------------------------


class MetricsLog:
    """metrics.csv (fixed columns, empty where a metric is absent) and TensorBoard scalars."""

    BASE = (
        "env_steps",
        "updates",
        "wall_seconds",
        "fps",
        "episode_return",
        "recent_return",
        "episode_length",
        "seconds_environment",
        "seconds_critic",
        "seconds_actor",
    )

    def __init__(self, run_dir: Path, metric_names: tuple[str, ...], tensorboard: bool, append: bool):
        self.columns = self.BASE + tuple(name for name in metric_names if name not in self.BASE)
        path = run_dir / "metrics.csv"
        exists = append and path.exists()
        # Open for the run's whole life (closed by close()), so no context manager.
        self._file = open(path, "a" if exists else "w", newline="")  # noqa: SIM115
        self._writer = csv.DictWriter(self._file, fieldnames=self.columns, extrasaction="ignore")
        if not exists:
            self._writer.writeheader()
        self._tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(run_dir))

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow(row)
        self._file.flush()
        if self._tensorboard is not None:
            for name, value in row.items():
                if name != "env_steps" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(name, value, row["env_steps"])

    def size(self) -> int:
        """Bytes of metrics.csv written so far; a resume cuts the file back to a checkpoint's size."""
        return self._file.tell()

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def truncate_tensorboard_events(run_dir: Path, last_step: int) -> int:
    """Drops the TensorBoard events past ``last_step`` (environment steps) from the run's event
    files, as a resume cuts metrics.csv back to its checkpoint: the updates after it are logged
    again. Read and written with tensorboard's own record reader and writer (a record cut off by
    a killed run is dropped too). Returns the number of events dropped."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    dropped = 0
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        records = list(RawEventFileLoader(str(path)).Load())
        kept = [record for record in records if Event.FromString(record).step <= last_step]
        if len(kept) == len(records) and path.stat().st_size == sum(len(r) + 16 for r in records):
            continue
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "wb") as file:
            writer = RecordWriter(file)
            for record in kept:
                writer.write(record)
            writer.flush()
        os.replace(temporary, path)
        dropped += len(records) - len(kept)
    return dropped


def build_trainer(config: TrainConfig, run: RunContext | None = None):
    """The environment pool and trainer of this rank (``run``: its place under torchrun; one process without)."""
    run = run or RunContext(None)
    torch.set_num_threads(config.threads)
    random.seed(config.seed)
    np.random.seed(config.seed)
    trainer_class, extra = _trainer_class(config)
    pool = config.make_pool(run.local_copies(config.copies), run.rank_seed(config.seed), run.device(config.device))
    distributed = {"process_group": run.group} if run.distributed else {}
    if config.anticipation != "exact":
        extra["anticipation"] = config.anticipation
    if config.anticipation_reset:
        if config.algo != "mappo" or config.anticipation != "momentum":
            raise ValueError(
                "--anticipation-reset forgets the momentum history at every new rollout: it needs --algo mappo and "
                "--anticipation momentum"
            )
        extra["anticipation_reset"] = True
    trainer = trainer_class(
        pool,
        getattr(config, config.algo),
        config.k,
        config.k_until,
        run.device(config.device),
        config.seed,
        **distributed,
        **extra,
    )
    run.seed_rank_streams(config.seed)
    return pool, trainer


# MAPPOConfig's options that only MAPPOTrainer and VectorizedMAPPOTrainer read.
MAPPO_FEED_FORWARD_OPTIONS = (
    "action_scale",
    "scale_bias",
    "scale_min",
    "squash",
    "init",
    "actor_output_gain",
    "adam_eps",
    "normalize_advantages",
    "bootstrap_time_limit",
    "shared_value",
)


def _trainer_class(config: TrainConfig) -> tuple[type, dict[str, Any]]:
    """The trainer class and its extra arguments: the recurrent MAPPO trainer (SMAX), the tensor-rollout
    one (VMAS) or ALGORITHMS' (whose off-policy trainers step VMAS's tensors themselves)."""
    vmas = config.env.startswith(VMAS_PREFIX)
    recurrent = config.algo == "mappo" and config.mappo.recurrent
    if vmas and recurrent:
        raise ValueError(
            f"{config.env}: VMAS environments train with --algo mappo without --mappo.recurrent (the tensor "
            "rollout of kpg.algos.mappo_vectorized), --algo maddpg or --algo facmac"
        )
    if recurrent:
        defaults, options = MAPPOConfig(), config.mappo
        feed_forward_only = [
            name for name in MAPPO_FEED_FORWARD_OPTIONS if getattr(options, name) != getattr(defaults, name)
        ]
        if feed_forward_only:
            raise ValueError(
                f"--mappo.{feed_forward_only[0].replace('_', '-')} is an option of the feed-forward MAPPO trainers; "
                "leave it at its default with --mappo.recurrent"
            )
        from kpg.algos.mappo_recurrent import RecurrentMAPPOTrainer

        return RecurrentMAPPOTrainer, {"total_steps": config.steps}
    if config.env.startswith(SMAX_PREFIX):
        raise ValueError(
            f"{config.env}: SMAX needs its available-action masks, which the recurrent MAPPO trainer applies: "
            "--algo mappo --mappo.recurrent, or --config configs/smax_authors.toml"
        )
    if config.algo == "mappo":
        defaults, options = MAPPOConfig(), config.mappo
        recurrent_only = [
            name
            for name in (
                "lr_anneal",
                "lr_anneal_steps",
                "gru",
                "value_clip",
                "advantage_norm",
                "actor_loss_mean",
            )
            if getattr(options, name) != getattr(defaults, name)
        ]
        if recurrent_only:
            raise ValueError(
                f"--mappo.{recurrent_only[0].replace('_', '-')} is an option of the recurrent trainer; "
                "add --mappo.recurrent (SMAX) or leave it at its default"
            )
    if vmas and config.algo == "mappo":
        from kpg.algos.mappo_vectorized import VectorizedMAPPOTrainer

        return VectorizedMAPPOTrainer, {}
    return ALGORITHMS[config.algo], {}


# What kpg writes in a run folder; --overwrite deletes these and nothing else.
RUN_FILES = ("config.json", "metrics.csv", "checkpoint.pt", "checkpoint.pt.tmp", "summary.json")
EVENT_FILES = "events.out.tfevents.*"


def run_files(run_dir: Path) -> list[Path]:
    """The files of a run in ``run_dir`` (empty where it holds none or does not exist)."""
    if not run_dir.is_dir():
        return []
    return [path for name in RUN_FILES if (path := run_dir / name).exists() or path.is_symlink()] + sorted(
        run_dir.glob(EVENT_FILES)
    )


def _check_run_folder(config: TrainConfig) -> dict[str, Any] | None:
    """Everything the run folder must allow before a byte of it changes: a fresh run needs a folder
    without a run (or --overwrite); --resume needs a checkpoint that reads and fits the folder's
    metrics.csv. Returns the checkpoint's payload for --resume."""
    run_dir = config.run_dir
    if not config.resume:
        existing = run_files(run_dir)
        if existing and not config.overwrite:
            raise RunFolderError(
                f"{run_dir} already holds a run ({', '.join(path.name for path in existing[:4])}"
                f"{', ...' if len(existing) > 4 else ''}); continue it with --resume, start over with --overwrite "
                "(deletes its checkpoint, logs and summary), or pick another --name or --logdir"
            )
        return None
    checkpoint_path = run_dir / "checkpoint.pt"
    if not (checkpoint_path.exists() or checkpoint_path.is_symlink()):
        raise MissingCheckpointError(f"--resume: no checkpoint at {checkpoint_path}; check --logdir and --name")
    state = load_checkpoint(checkpoint_path)
    _check_payload(state, run_dir, checkpoint_path)
    return state


def _refuse(checkpoint_path: Path, problem: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {checkpoint_path} does not fit this run: {problem}; nothing in {checkpoint_path.parent} was "
        "changed (restore the checkpoint, or start over with --overwrite)"
    )


def _check_payload(state: dict[str, Any], run_dir: Path, checkpoint_path: Path) -> None:
    """The parts of a checkpoint a resume uses besides the trainer's state, checked for kind and range."""
    missing = [key for key in ("trainer", "wall_seconds", "seconds", "recent") if key not in state]
    if "ranks" not in state:
        missing += [key for key in ("pool", "rng") if key not in state]
    if missing:
        raise _refuse(checkpoint_path, f"it lacks {', '.join(map(repr, missing))}")
    ranks = state.get("ranks", [state])
    if (
        not isinstance(ranks, list)
        or not ranks
        or not all(isinstance(r, dict) and {"pool", "rng"} <= set(r) for r in ranks)
    ):
        raise _refuse(checkpoint_path, "'ranks' is not a list of every rank's 'pool' and 'rng'")
    if not isinstance(state["trainer"], dict):
        raise _refuse(checkpoint_path, f"'trainer' is a {type(state['trainer']).__name__}, not a table")
    for key in ("env_steps", "updates"):
        value = state["trainer"].get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _refuse(checkpoint_path, f"trainer {key} is {value!r}, not an integer >= 0")
    for key in ("wall_seconds", "cpu_seconds"):
        value = state.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise _refuse(checkpoint_path, f"{key} is {value!r}, not a finite number >= 0")
    if not isinstance(state["seconds"], dict) or not isinstance(state["recent"], list):
        raise _refuse(checkpoint_path, "'seconds' is not a table or 'recent' is not a list")
    metrics = run_dir / "metrics.csv"
    metrics_bytes = state.get("metrics_bytes")
    if metrics_bytes is not None and metrics.exists():
        size = metrics.stat().st_size
        if isinstance(metrics_bytes, bool) or not isinstance(metrics_bytes, int) or not 0 <= metrics_bytes <= size:
            raise _refuse(
                checkpoint_path,
                f"metrics_bytes is {metrics_bytes!r}, not an integer in [0, {size}] (metrics.csv's size)",
            )
    _check_values(state["trainer"], "trainer", checkpoint_path)


# Optimizer state entries that are never negative (torch.optim's and kpg's names).
_NON_NEGATIVE = ("step", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "acc_delta", "updates", "env_steps")


def _check_values(node: Any, where: str, checkpoint_path: Path) -> None:
    """Every number in a trainer's state is finite, and the entries of :data:`_NON_NEGATIVE` are >= 0:
    a NaN weight or a negative step count would load and train on in silence."""
    if isinstance(node, dict):
        for key, value in node.items():
            inner = f"{where}[{key!r}]"
            _check_values(value, inner, checkpoint_path)
            if key in _NON_NEGATIVE and _negative(value):
                raise _refuse(checkpoint_path, f"{inner} is negative")
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _check_values(value, f"{where}[{i}]", checkpoint_path)
    elif isinstance(node, torch.Tensor):
        if (node.is_floating_point() or node.is_complex()) and not bool(torch.isfinite(node).all()):
            raise _refuse(checkpoint_path, f"{where} holds NaN or infinite values")
    elif isinstance(node, float) and node != node:
        raise _refuse(checkpoint_path, f"{where} is NaN")


def _negative(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return not value.is_complex() and value.numel() > 0 and bool((value < 0).any())
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0


def _load_resumed_state(trainer, pool, state: dict[str, Any], run: RunContext, checkpoint_path: Path) -> None:
    """Loads the checkpoint into this rank's trainer, pool and generators; a checkpoint that does
    not fit them (keys, shapes, kinds) is refused as a :class:`CheckpointError` naming what."""
    expected, found = set(trainer.state_dict()), set(state["trainer"])
    if expected != found:
        problem = "; ".join(
            part
            for part in (
                f"the trainer's state lacks {', '.join(map(repr, sorted(expected - found)))}"
                if expected - found
                else "",
                f"it holds {', '.join(map(repr, sorted(found - expected)))}, unknown to {type(trainer).__name__}"
                if found - expected
                else "",
            )
            if part
        )
        raise _refuse(checkpoint_path, problem)
    rank_states = state.get("ranks", [{"pool": state.get("pool"), "rng": state.get("rng")}])
    try:
        trainer.load_state_dict(_trainer_state_of_rank(trainer, state["trainer"], rank_states, run))
        pool.load_state_dict(run.resharded_pool_state([r["pool"] for r in rank_states], pool))
        if run.rank < len(rank_states):  # a rank new to the run keeps the streams seed_rank_streams gave it
            _set_rng_states(rank_states[run.rank]["rng"])
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as error:
        message = " ".join(str(error).split())  # torch's size-mismatch messages span lines
        raise _refuse(checkpoint_path, f"{type(error).__name__}: {message[:500]}") from None


def _trainer_state_of_rank(
    trainer, shared: dict[str, Any], rank_states: list[dict[str, Any]], run: RunContext
) -> dict[str, Any]:
    """The trainer state this rank loads: the state every rank shares (rank 0's) with this rank's
    own entries (``trainer.RANK_STATE``: an off-policy trainer's replay buffer and sampling
    streams) from the checkpoint on as many ranks; on another number of ranks its own entries stay
    fresh (an empty buffer, refilled like a checkpoint without replay, and this rank's new streams)."""
    own_keys = trainer.RANK_STATE
    if len(rank_states) == run.world_size:
        # Checkpoints written before ranks held their own trainer state keep rank 0's in the shared one.
        return {**shared, **rank_states[run.rank].get("trainer", {})}
    fresh = trainer.state_dict()
    return {**shared, **{key: fresh[key] for key in own_keys}}


def evaluate(trainer, config: TrainConfig, episodes: int) -> float:
    """Mean return of ``episodes`` episodes with the greedy policy, on fresh environment copies."""
    copies, seed = min(episodes, config.copies), 10_000 + config.seed
    vmas = config.env.startswith(VMAS_PREFIX)
    pool = config.make_pool(copies, seed) if vmas else EnvPool(config.env_factory(), copies, seed)
    returns: list[float] = []
    while len(returns) < episodes:
        returns += [e["return"] for e in pool.step(trainer.act(pool.obs, deterministic=True)).finished]
    pool.close()
    return float(np.mean(returns[:episodes]))


def train(config: TrainConfig) -> dict[str, Any]:
    """Runs (or resumes) one training run; returns its summary. Bad options raise
    :class:`~kpg.options.OptionError` and a checkpoint that does not fit :class:`CheckpointError`,
    before anything is written."""
    check_options(config)
    run = RunContext.from_environment(config.device, timedelta(seconds=config.dist_timeout))
    try:
        return _train(config, run)
    finally:
        run.close()


def _train(config: TrainConfig, run: RunContext) -> dict[str, Any]:
    from tqdm import tqdm

    run_dir = config.run_dir
    checkpoint_path = run_dir / "checkpoint.pt"
    # Nothing in the run folder changes until the options, the folder and (--resume) the whole
    # checkpoint have been checked against this run. Rank 0 reads the checkpoint and hands it to
    # the others: no shared file system needed.
    state = run.on_writer(lambda: _check_run_folder(config))
    pool, trainer = build_trainer(config, run)
    wall_before = cpu_before = 0.0
    seconds = {"environment": 0.0, "critic": 0.0, "actor": 0.0}
    recent: deque[float] = deque(maxlen=RECENT_EPISODES)
    if config.resume:
        try:
            _load_resumed_state(trainer, pool, state, run, checkpoint_path)
        except BaseException:
            pool.close()
            raise
        wall_before, seconds, recent = (
            state["wall_seconds"],
            state["seconds"],
            deque(state["recent"], maxlen=RECENT_EPISODES),
        )
        cpu_before = state.get("cpu_seconds", 0.0)
    log = None
    if run.is_writer:
        if config.overwrite:
            for path in run_files(run_dir):
                path.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(_config_as_data(config), indent=2))
        if config.resume and state.get("metrics_bytes") is not None and (run_dir / "metrics.csv").exists():
            # Rows logged after the checkpoint (a run killed before its next one) are logged again.
            os.truncate(run_dir / "metrics.csv", state["metrics_bytes"])
        if config.resume and config.tensorboard:
            truncate_tensorboard_events(run_dir, state["trainer"]["env_steps"])
        log = MetricsLog(run_dir, trainer.METRICS, config.tensorboard, append=config.resume)

    def checkpoint() -> None:
        trainer_state = trainer.state_dict()
        if not config.checkpoint_replay and "replay" in trainer_state:
            trainer_state["replay"] = without_rows(trainer_state["replay"])
        own = {key: trainer_state[key] for key in trainer.RANK_STATE}
        # Every rank's environment seeds, random streams and own trainer state (an off-policy
        # trainer's replay rows), so a resume on as many ranks continues every rank exactly.
        ranks = run.gather_to_writer({"pool": pool.state_dict(), "rng": _rng_states(), "trainer": own})
        if run.is_writer:
            save_checkpoint(
                checkpoint_path,
                {
                    "config": _config_as_data(config),
                    "trainer": trainer_state,
                    "pool": ranks[0]["pool"],
                    "rng": ranks[0]["rng"],
                    "ranks": ranks,
                    "wall_seconds": wall_before + time.perf_counter() - started,
                    "cpu_seconds": cpu_before + time.process_time() - cpu_started,
                    "seconds": seconds,
                    "recent": list(recent),
                    "metrics_bytes": log.size(),
                },
            )

    # CPU time of this process measures a run's cost even when other jobs share the cores.
    started, cpu_started = time.perf_counter(), time.process_time()
    bar = tqdm(
        total=config.steps,
        initial=min(trainer.env_steps, config.steps),
        unit="step",
        disable=not (config.progress and run.is_writer),
        desc=config.run_name,
        dynamic_ncols=True,
    )
    interrupted = cut_short = False
    # Between iterations the trainer, pool and generators agree, and a checkpoint resumes exactly;
    # a checkpoint of an iteration cut short by an error or a second Ctrl-C would not.
    between_iterations = True
    last_checkpoint = trainer.updates if config.resume else None
    # Every rank takes Ctrl-C and SIGTERM (torchrun passes its own on to every rank); under torchrun
    # the ranks agree after each update whether any was asked to stop, so that all stop after the
    # same update and meet in the final checkpoint.
    stop = StopRequests()
    try:
        while trainer.env_steps < config.steps:
            between_iterations = False
            steps_before = trainer.env_steps
            metrics = run.merge_metrics(trainer.iteration())
            for phase, value in trainer.clock.take().items():
                seconds[phase] = seconds.get(phase, 0.0) + value
            if "episode_return" in metrics:
                recent.append(metrics["episode_return"])
            wall = wall_before + time.perf_counter() - started
            row = {
                **metrics,
                "env_steps": trainer.env_steps,
                "updates": trainer.updates,
                "wall_seconds": wall,
                "fps": trainer.env_steps / max(wall, 1e-9),
                "recent_return": float(np.mean(recent)) if recent else None,
                **{f"seconds_{phase}": value for phase, value in seconds.items()},
            }
            if log is not None:
                log.write(row)
            bar.update(min(trainer.env_steps, config.steps) - min(steps_before, config.steps))
            if recent:
                bar.set_postfix(ret=f"{np.mean(recent):.2f}", fps=f"{row['fps']:.0f}", k=trainer.actor_optimizer.k)
            between_iterations = True
            if config.checkpoint_every and trainer.updates % config.checkpoint_every == 0:
                checkpoint()
                last_checkpoint = trainer.updates
            if any(run.gather(stop.requested is not None)):
                interrupted = True
                break
    except KeyboardInterrupt:
        interrupted = cut_short = True
    finally:
        stop.restore()
        bar.close()
        failed = cut_short or sys.exc_info()[1] is not None
        stands = f"the checkpoint of update {last_checkpoint}" if last_checkpoint is not None else "no checkpoint"
        cannot_meet = (
            f"rank {run.rank}: the ranks cannot meet to write a final checkpoint (a rank stopped at once or "
            f"failed); {stands} stands"
        )
        written = last_checkpoint == trainer.updates  # the periodic checkpoint of this very update
        if between_iterations and not written and not (run.distributed and failed):
            try:
                checkpoint()
            except Exception:
                if run.distributed:
                    print(cannot_meet, file=sys.stderr, flush=True)
                raise
        elif run.distributed and failed:
            # A rank stopped at once or by an error cannot meet the others in the checkpoint's gather.
            print(cannot_meet, file=sys.stderr, flush=True)
        if log is not None:
            log.close()
        pool.close()
    summary = {
        "run": config.run_name,
        "algo": config.algo,
        "env": config.env,
        "agents": trainer.num_agents,
        "k": config.k,
        "seed": config.seed,
        "env_steps": trainer.env_steps,
        "updates": trainer.updates,
        "wall_seconds": wall_before + time.perf_counter() - started,
        "cpu_seconds": cpu_before + time.process_time() - cpu_started,
        "seconds": seconds,
        "actor_level_seconds": trainer.actor_level_seconds(),
        "recent_return": float(np.mean(recent)) if recent else None,
        "interrupted": interrupted,
        # What ran it: torch, and the environment's packages where the pool names them (smax: JaxMARL, JAX).
        "versions": {"torch": torch.__version__, **getattr(pool, "versions", {})},
    }
    if run.is_writer:
        # The recurrent trainer has no separate greedy evaluation: its win rate comes from the training episodes.
        if config.eval_episodes and not interrupted and hasattr(trainer, "act"):
            summary["eval_return"] = evaluate(trainer, config, config.eval_episodes)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if interrupted:
        raise KeyboardInterrupt
    return summary
