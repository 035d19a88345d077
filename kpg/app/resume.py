"""Resuming a run, in one place: the checks a run folder and (``--resume``) its checkpoint pass
before a byte of the folder changes, what a checkpoint holds besides the file format
(:mod:`kpg.app.checkpoint`), and loading it into every rank's trainer, environment copies and
random streams, on as many ranks as wrote it or on another number.

A checkpoint's payload: ``config`` (the run's options), ``trainer`` (rank 0's ``state_dict()``),
``ranks`` (each rank's ``pool``, ``rng`` and own ``trainer`` entries, ``trainer.RANK_STATE``),
``pool`` and ``rng`` (rank 0's, for checkpoints of one rank), ``wall_seconds``, ``cpu_seconds``,
``seconds`` (per phase), ``recent`` (the last episode returns) and ``metrics_bytes`` (metrics.csv's
size when it was written).
"""

from __future__ import annotations

import os
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kpg.algos.replay import without_rows
from kpg.app.checkpoint import CheckpointError, load_checkpoint, numpy_state_as_data, numpy_state_from_data
from kpg.app.run_context import RunContext
from kpg.options import Refusal

CHECKPOINT = "checkpoint.pt"


class RunFolderError(Refusal, FileExistsError):
    """A run folder that does not allow what was asked (a new run into a folder that holds one)."""


class MissingCheckpointError(Refusal, FileNotFoundError):
    """--resume without a checkpoint to resume from."""


RECENT_ITERATIONS = 20  # the recent return averages the last this many iterations' episode returns


@dataclass
class RunTotals:
    """What a run has added up across its resumes: wall-clock and CPU seconds before this process
    started, seconds per phase, and the last episode returns."""

    wall_before: float = 0.0
    cpu_before: float = 0.0
    seconds: dict[str, float] = field(default_factory=lambda: {"environment": 0.0, "critic": 0.0, "actor": 0.0})
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_ITERATIONS))
    # This process's start; CPU time of this process measures a run's cost even when other jobs share the cores.
    started: float = field(default_factory=time.perf_counter)
    cpu_started: float = field(default_factory=time.process_time)

    @classmethod
    def resumed(cls, state: dict[str, Any] | None) -> RunTotals:
        """The totals of checkpoint ``state`` (fresh ones for None: a new run)."""
        if state is None:
            return cls()
        return cls(
            state["wall_seconds"],
            state.get("cpu_seconds", 0.0),
            state["seconds"],
            deque(state["recent"], maxlen=RECENT_ITERATIONS),
        )

    def restart_clocks(self) -> None:
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    def cpu_seconds(self) -> float:
        return self.cpu_before + time.process_time() - self.cpu_started

    def recent_return(self) -> float | None:
        return float(np.mean(self.recent)) if self.recent else None


def checkpoint_payload(
    trainer,
    pool,
    run: RunContext,
    config_data: dict[str, Any],
    totals: RunTotals,
    metrics_bytes: int | None,
    keep_replay: bool,
) -> dict[str, Any] | None:
    """The checkpoint of this moment (between two iterations) on rank 0, None on the others: every
    rank's environment seeds, random streams and own trainer state (an off-policy trainer's replay
    rows) are gathered, so that a resume on as many ranks continues every rank exactly.
    ``keep_replay`` off: the replay buffers are saved without their rows (a resume refills them)."""
    trainer_state = trainer.state_dict()
    if not keep_replay and "replay" in trainer_state:
        trainer_state["replay"] = without_rows(trainer_state["replay"])
    own = {key: trainer_state[key] for key in trainer.RANK_STATE}
    ranks = run.gather_to_writer({"pool": pool.state_dict(), "rng": rng_states(), "trainer": own})
    if not run.is_writer:
        return None
    return {
        "config": config_data,
        "trainer": trainer_state,
        "pool": ranks[0]["pool"],
        "rng": ranks[0]["rng"],
        "ranks": ranks,
        "wall_seconds": totals.wall_seconds(),
        "cpu_seconds": totals.cpu_seconds(),
        "seconds": totals.seconds,
        "recent": list(totals.recent),
        "metrics_bytes": metrics_bytes,
    }


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


def check_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Everything the run folder must allow before a byte of it changes: a fresh run needs a folder
    without a run (or --overwrite); --resume needs a checkpoint that reads and fits the folder's
    metrics.csv. Returns the checkpoint's payload for --resume."""
    if not resume:
        existing = run_files(run_dir)
        if existing and not overwrite:
            raise RunFolderError(
                f"{run_dir} already holds a run ({', '.join(path.name for path in existing[:4])}"
                f"{', ...' if len(existing) > 4 else ''}); continue it with --resume, start over with --overwrite "
                "(deletes its checkpoint, logs and summary), or pick another --name or --logdir"
            )
        return None
    checkpoint_path = run_dir / CHECKPOINT
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


def load_resumed_state(trainer, pool, state: dict[str, Any], run: RunContext, checkpoint_path: Path) -> None:
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
        pool.load_state_dict(resharded_pool_state([r["pool"] for r in rank_states], pool, run.rank, run.world_size))
        if run.rank < len(rank_states):  # a rank new to the run keeps the streams seed_rank_streams gave it
            set_rng_states(rank_states[run.rank]["rng"])
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


def resharded_pool_state(
    pool_states: Sequence[dict[str, Any]], pool: Any, rank: int, world_size: int
) -> dict[str, Any]:
    """The state ``pool`` (rank ``rank``'s environment copies) loads from the pool states of a run on
    ``len(pool_states)`` ranks: the same rank's state when the count is unchanged, else what the
    pool makes of all ranks' states (``pool.resharded_state``)."""
    if len(pool_states) == world_size:
        return pool_states[rank]
    return pool.resharded_state(pool_states, rank, world_size)


def rng_states() -> dict[str, Any]:
    """The global generators' states as checkpoint data (tensors, numbers, tuples)."""
    return {
        "torch": torch.get_rng_state(),
        "numpy": numpy_state_as_data(np.random.get_state(legacy=False)),
        "python": random.getstate(),
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Sets the global generators to ``states`` (as :func:`rng_states` gave them)."""
    torch.set_rng_state(states["torch"])
    np.random.set_state(numpy_state_from_data(states["numpy"]))
    random.setstate(states["python"])


def rewind_run_folder(run_dir: Path, state: dict[str, Any], tensorboard: bool) -> None:
    """Cuts metrics.csv and (``tensorboard``) the event files back to the checkpoint ``state``: the
    updates logged after it (a run killed before its next checkpoint) are logged again."""
    metrics = run_dir / "metrics.csv"
    if state.get("metrics_bytes") is not None and metrics.exists():
        os.truncate(metrics, state["metrics_bytes"])
    if tensorboard:
        truncate_tensorboard_events(run_dir, state["trainer"]["env_steps"])


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
