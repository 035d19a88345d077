"""A training run's place among the ranks under ``torchrun``: every rank question of ``kpg train``
(which rank writes, its environment copies, seeds and device, exchanging checkpoints and metrics)
is answered here; :mod:`kpg.distributed` holds the process group's set-up and the collectives."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from kpg.algos.common import rank_seed
from kpg.distributed import DEFAULT_TIMEOUT, collective, init_from_environment

__all__ = ["RunContext"]

T = TypeVar("T")


class RunContext:
    """A training run's place among the ranks under ``torchrun``: which environment copies, seeds and
    device this rank uses, which rank writes, and the exchanges of a run (rank 0's checkpoint handed
    to all, every rank's state gathered for a checkpoint, metrics merged into one row). Without a
    process group it is one rank and every method is the plain path."""

    def __init__(self, group: dist.ProcessGroup | None, owns_group: bool = False):
        self.group = group
        self.owns_group = owns_group
        self.rank = 0 if group is None else dist.get_rank(group)
        self.world_size = 1 if group is None else dist.get_world_size(group)

    @classmethod
    def from_environment(cls, device: str, timeout: timedelta = DEFAULT_TIMEOUT) -> RunContext:
        initialized_before = dist.is_available() and dist.is_initialized()
        group = init_from_environment(device, timeout)
        return cls(group, owns_group=group is not None and not initialized_before)

    def close(self) -> None:
        """Destroys the process group this run initialized (one the caller made stays theirs). The
        group is freed, and gloo's worker threads joined, once the last reference to it goes (this
        object's included); threads left running into interpreter shutdown can abort a finished rank
        ("terminate called without an active exception"): see init_from_environment."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def distributed(self) -> bool:
        return self.group is not None

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes logs, checkpoints and summaries; the others only train."""
        return self.rank == 0

    def device(self, device: str) -> str:
        """``cuda`` means this rank's GPU (``LOCAL_RANK``) under torchrun."""
        if self.distributed and device == "cuda":
            return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        return device

    def local_copies(self, copies: int) -> int:
        if copies % self.world_size:
            raise ValueError(
                f"--copies {copies} cannot be split evenly over {self.world_size} ranks; pass a multiple of "
                f"{self.world_size} (every rank steps the same number of environment copies)"
            )
        return copies // self.world_size

    def rank_seed(self, seed: int) -> int:
        """This rank's seed (:func:`kpg.algos.common.rank_seed`)."""
        return rank_seed(seed, self.rank)

    def seed_rank_streams(self, seed: int) -> None:
        """Gives ranks other than 0 their own torch, numpy and Python streams (action sampling), once
        the models have been built alike on every rank."""
        if self.rank:
            rank_seed = self.rank_seed(seed)
            torch.manual_seed(rank_seed)
            np.random.seed(rank_seed % 2**32)
            random.seed(rank_seed)

    def on_writer(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0, its result (or its exception) given to every rank."""
        if not self.distributed:
            return fn()
        box: list[Any] = [None]
        if self.is_writer:
            try:
                box[0] = ("result", fn())
            except Exception as error:  # every rank raises it, instead of the others waiting on rank 0
                box[0] = ("error", error)
        collective(
            lambda: dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group),
            self.group,
            "the broadcast from rank 0",
        )
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        collective(
            lambda: dist.all_gather_object(values, value, group=self.group), self.group, "the gather of rank states"
        )
        return values

    def gather_to_writer(self, value: T) -> list[T] | None:
        """Every rank's ``value`` in rank order on rank 0 (its own entry is ``value`` itself, not a
        copy), None on the others: for what only rank 0 writes, such as every rank's replay rows."""
        if not self.distributed:
            return [value]
        values: list[Any] | None = [None] * self.world_size if self.is_writer else None
        collective(
            lambda: dist.gather_object(value, values, dst=dist.get_global_rank(self.group, 0), group=self.group),
            self.group,
            "the gather of rank states to rank 0",
        )
        if values is not None:
            values[0] = value
        return values

    def merge_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """One row for all ranks: episode counts summed, episode returns and lengths averaged over
        episodes, everything else averaged over ranks."""
        if not self.distributed:
            return metrics
        everyone = self.gather(metrics)
        merged: dict[str, float] = {}
        episodes = [m.get("episodes", 0) for m in everyone]
        for name in dict.fromkeys(name for m in everyone for name in m):
            values = [m[name] for m in everyone if name in m]
            if name == "episodes":
                merged[name] = sum(values)
            elif name in ("episode_return", "episode_length"):
                weights = [n for m, n in zip(everyone, episodes) if name in m]
                merged[name] = float(np.average(values, weights=weights))
            elif all(isinstance(v, (int, float)) for v in values):
                merged[name] = float(np.mean(values)) if len(set(values)) > 1 else values[0]
        return merged
