"""``kpg train``: one training run of a trainer on an environment, with a progress bar, CSV and
TensorBoard logs, atomic checksummed checkpoints, ``--resume``, evaluation and a final summary.
This module holds the run's options (:class:`TrainConfig`) and puts the run together: the trainer
(:func:`build_trainer`), the run loop (:mod:`kpg.app.loop`), resume (:mod:`kpg.app.resume`) and
the ranks under torchrun (:mod:`kpg.app.run_context`).

A run writes into ``<logdir>/<name>/``: ``config.json``, ``metrics.csv`` (one row per update),
TensorBoard events, ``checkpoint.pt`` (every ``checkpoint_every`` updates and at the end or on
Ctrl-C) and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from kpg.algos import FACMACConfig, MADDPGConfig, MAPPOConfig, choose_trainer
from kpg.app.loop import MetricsLog, TrainingLoop
from kpg.app.resume import CHECKPOINT, RunTotals, check_run_folder, load_resumed_state, rewind_run_folder, run_files
from kpg.app.run_context import RunContext
from kpg.envs import SMAX_PREFIX, VMAS_PREFIX, EnvPool, make_env_factory, make_pool
from kpg.options import check_options, require, require_ranges


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
    # MAPPO, momentum: also compute the exact level-1 step at every actor step (its price: exact k=2's) and log
    # how far the prediction is from it (metrics.csv's audit_* columns, docs/algorithm.md)
    anticipation_audit: bool = False
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


def build_trainer(config: TrainConfig, run: RunContext | None = None):
    """The environment pool and trainer of this rank (``run``: its place under torchrun; one process without)."""
    run = run or RunContext(None)
    torch.set_num_threads(config.threads)
    random.seed(config.seed)
    np.random.seed(config.seed)
    trainer_class, extra = choose_trainer(config.algo, config.env, config.mappo, config.steps)
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
    if config.anticipation_audit:
        if config.algo != "mappo" or config.anticipation != "momentum":
            raise ValueError(
                "--anticipation-audit measures the momentum prediction against the exact level-1 step: it needs "
                "--algo mappo and --anticipation momentum"
            )
        extra["anticipation_audit"] = True
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
    run_dir = config.run_dir
    # Nothing in the run folder changes until the options, the folder and (--resume) the whole
    # checkpoint have been checked against this run. Rank 0 reads the checkpoint and hands it to
    # the others: no shared file system needed.
    state = run.on_writer(lambda: check_run_folder(run_dir, config.resume, config.overwrite))
    pool, trainer = build_trainer(config, run)
    if config.resume:
        try:
            if run.is_writer:
                MetricsLog.check_resumable(run_dir, trainer.METRICS)
            load_resumed_state(trainer, pool, state, run, run_dir / CHECKPOINT)
        except BaseException:
            pool.close()
            raise
    log = _open_run_folder(config, trainer, state) if run.is_writer else None
    loop = TrainingLoop(config, _config_as_data(config), run, trainer, pool, log, RunTotals.resumed(state))
    interrupted = loop.run_to_end()
    summary = loop.summary(interrupted)
    if run.is_writer:
        # The recurrent trainer has no separate greedy evaluation: its win rate comes from the training episodes.
        if config.eval_episodes and not interrupted and hasattr(trainer, "act"):
            summary["eval_return"] = evaluate(trainer, config, config.eval_episodes)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if interrupted:
        raise KeyboardInterrupt
    return summary


def _open_run_folder(config: TrainConfig, trainer, state: dict[str, Any] | None) -> MetricsLog:
    """Rank 0's first writes, once every check passed: --overwrite's deletions, config.json, a
    resumed run's logs cut back to its checkpoint; returns the metrics log."""
    run_dir = config.run_dir
    if config.overwrite:
        for path in run_files(run_dir):
            path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(_config_as_data(config), indent=2))
    if config.resume:
        rewind_run_folder(run_dir, state, config.tensorboard)
    return MetricsLog(run_dir, trainer.METRICS, config.tensorboard, append=config.resume)
