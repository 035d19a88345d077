"""The loop of one training run on one rank: an iteration of the trainer, a row of metrics, a
checkpoint every ``checkpoint_every`` updates, and stopping cleanly on Ctrl-C or SIGTERM with a
final checkpoint (what a checkpoint holds, and how a run resumes: :mod:`kpg.app.resume`).
"""

from __future__ import annotations

import csv
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kpg.app.checkpoint import save_checkpoint
from kpg.app.resume import CHECKPOINT, RunFolderError, RunTotals, checkpoint_payload
from kpg.app.run_context import RunContext

if TYPE_CHECKING:
    from kpg.app.train import TrainConfig


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
        self.columns = self.columns_of(metric_names)
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

    @classmethod
    def columns_of(cls, metric_names: tuple[str, ...]) -> tuple[str, ...]:
        return cls.BASE + tuple(name for name in metric_names if name not in cls.BASE)

    @classmethod
    def check_resumable(cls, run_dir: Path, metric_names: tuple[str, ...]) -> None:
        """Raises RunFolderError where the run folder's metrics.csv has other columns than this run
        logs (an option that adds columns, such as --anticipation-audit, changed): appended rows would
        sit under the wrong names."""
        path = run_dir / "metrics.csv"
        if not path.exists():
            return
        with open(path, newline="") as file:
            header = next(csv.reader(file), None)
        columns = cls.columns_of(metric_names)
        if header is not None and tuple(header) != columns:
            added = [c for c in columns if c not in header]
            dropped = [c for c in header if c not in columns]
            raise RunFolderError(
                f"{path} was written with other columns than this run logs (this run adds {added or 'none'} and "
                f"lacks {dropped or 'none'}); resume with the options the run started with (--anticipation-audit "
                "adds the audit_* columns), or start over with --overwrite"
            )

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


class TrainingLoop:
    """Runs ``trainer`` until ``config.steps`` environment steps, from a new run or a resumed one
    (``totals`` and the trainer as the checkpoint left them). ``log`` is rank 0's (None elsewhere);
    the loop closes it and ``pool`` when it ends."""

    def __init__(
        self,
        config: TrainConfig,
        config_data: dict[str, Any],
        run: RunContext,
        trainer,
        pool,
        log: MetricsLog | None,
        totals: RunTotals,
    ):
        self.config, self.config_data, self.run = config, config_data, run
        self.trainer, self.pool, self.log, self.totals = trainer, pool, log, totals
        # The update of the last checkpoint written (a resumed run's starts at its checkpoint).
        self.last_checkpoint = trainer.updates if config.resume else None

    def checkpoint(self) -> None:
        payload = checkpoint_payload(
            self.trainer,
            self.pool,
            self.run,
            self.config_data,
            self.totals,
            self.log.size() if self.log is not None else None,
            self.config.checkpoint_replay,
        )
        if payload is not None:
            save_checkpoint(self.config.run_dir / CHECKPOINT, payload)
        self.last_checkpoint = self.trainer.updates

    def iterate(self) -> dict[str, Any]:
        """One iteration of the trainer; returns its metrics.csv row (merged over the ranks)."""
        trainer, totals = self.trainer, self.totals
        metrics = self.run.merge_metrics(trainer.iteration())
        for phase, value in trainer.clock.take().items():
            totals.seconds[phase] = totals.seconds.get(phase, 0.0) + value
        if "episode_return" in metrics:
            totals.recent.append(metrics["episode_return"])
        wall = totals.wall_seconds()
        row = {
            **metrics,
            "env_steps": trainer.env_steps,
            "updates": trainer.updates,
            "wall_seconds": wall,
            "fps": trainer.env_steps / max(wall, 1e-9),
            "recent_return": totals.recent_return(),
            **{f"seconds_{phase}": value for phase, value in totals.seconds.items()},
        }
        if self.log is not None:
            self.log.write(row)
        return row

    def run_to_end(self) -> bool:
        """Iterates until the run's steps are done or a stop is requested; writes the final checkpoint
        and closes the log and the pool. Returns whether the run was interrupted; a second Ctrl-C
        (a KeyboardInterrupt) and errors propagate after the last checkpoint was left standing."""
        from tqdm import tqdm

        config, run, trainer = self.config, self.run, self.trainer
        self.totals.restart_clocks()
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
        # Every rank takes Ctrl-C and SIGTERM (torchrun passes its own on to every rank); under torchrun
        # the ranks agree after each update whether any was asked to stop, so that all stop after the
        # same update and meet in the final checkpoint.
        stop = StopRequests()
        try:
            while trainer.env_steps < config.steps:
                between_iterations = False
                steps_before = trainer.env_steps
                row = self.iterate()
                bar.update(min(trainer.env_steps, config.steps) - min(steps_before, config.steps))
                if self.totals.recent:
                    bar.set_postfix(
                        ret=f"{row['recent_return']:.2f}", fps=f"{row['fps']:.0f}", k=trainer.actor_optimizer.k
                    )
                between_iterations = True
                if config.checkpoint_every and trainer.updates % config.checkpoint_every == 0:
                    self.checkpoint()
                if any(run.gather(stop.requested is not None)):
                    interrupted = True
                    break
        except KeyboardInterrupt:
            interrupted = cut_short = True
        finally:
            stop.restore()
            bar.close()
            failed = cut_short or sys.exc_info()[1] is not None
            stands = (
                f"the checkpoint of update {self.last_checkpoint}"
                if self.last_checkpoint is not None
                else "no checkpoint"
            )
            cannot_meet = (
                f"rank {run.rank}: the ranks cannot meet to write a final checkpoint (a rank stopped at once or "
                f"failed); {stands} stands"
            )
            written = self.last_checkpoint == trainer.updates  # the periodic checkpoint of this very update
            try:
                if between_iterations and not written and not (run.distributed and failed):
                    try:
                        self.checkpoint()
                    except Exception:
                        if run.distributed:
                            print(cannot_meet, file=sys.stderr, flush=True)
                        raise
                elif run.distributed and failed:
                    # A rank stopped at once or by an error cannot meet the others in the checkpoint's gather.
                    print(cannot_meet, file=sys.stderr, flush=True)
            finally:
                if self.log is not None:
                    self.log.close()
                self.pool.close()
        return interrupted

    def summary(self, interrupted: bool) -> dict[str, Any]:
        """The run's summary.json (without the evaluation, which only rank 0 runs)."""
        config, trainer, totals = self.config, self.trainer, self.totals
        return {
            "run": config.run_name,
            "algo": config.algo,
            "env": config.env,
            "agents": trainer.num_agents,
            "k": config.k,
            "seed": config.seed,
            "env_steps": trainer.env_steps,
            "updates": trainer.updates,
            "wall_seconds": totals.wall_seconds(),
            "cpu_seconds": totals.cpu_seconds(),
            "seconds": totals.seconds,
            "actor_level_seconds": trainer.actor_level_seconds(),
            "recent_return": totals.recent_return(),
            "interrupted": interrupted,
            # What ran it: torch, and the environment's packages where the pool names them (smax: JaxMARL, JAX).
            "versions": {"torch": torch.__version__, **getattr(self.pool, "versions", {})},
        }
