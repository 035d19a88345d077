"""Faults during training: a run killed with SIGKILL at random moments, stopped with Ctrl-C or
broken by an error mid-update resumes from its last checkpoint and ends exactly where an
uninterrupted run ends; checkpoints are written atomically; Ctrl-C under torchrun writes a final
checkpoint all ranks agree on; a resume cuts TensorBoard's events back to the checkpoint.

A run here is `kpg train` on simple_spread with a small MAPPO (one update per 25-step episode, so
every checkpoint falls on an episode boundary, where resuming is exact) and a checkpoint after
every update. KPG_FAULT_KILLS sets how many SIGKILLs the kill test survives (default 2).
"""

import csv
import dataclasses
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kpg.algos.mappo import MAPPOConfig
from kpg.app.checkpoint import load_checkpoint, save_checkpoint
from kpg.app.train import TrainConfig, train

KILLS = int(os.environ.get("KPG_FAULT_KILLS", "2"))
STEPS = 100 * max(6, 2 * KILLS)  # updates of 4 copies x 25 steps, enough for every kill to land mid-run
SMALL_MAPPO = MAPPOConfig(rollout=25, epochs=2, minibatches=2, hidden=(16,))
TIMING_COLUMNS = {"wall_seconds", "fps", "seconds_environment", "seconds_critic", "seconds_actor"}
CLI_FLAGS = [
    "--steps",
    str(STEPS),
    "--copies",
    "4",
    "--mappo.epochs",
    "2",
    "--mappo.minibatches",
    "2",
    "--mappo.hidden",
    "16",
    "--checkpoint-every",
    "1",
    "--no-progress",
    "--no-tensorboard",
    "--eval-episodes",
    "0",
    "--threads",
    "1",
]


def config(logdir: Path, name: str, **changes) -> TrainConfig:
    base = TrainConfig(
        steps=STEPS,
        copies=4,
        logdir=logdir,
        name=name,
        progress=False,
        tensorboard=False,
        eval_episodes=0,
        checkpoint_every=1,
        mappo=SMALL_MAPPO,
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    logdir = tmp_path_factory.mktemp("uninterrupted")
    train(config(logdir, "whole"))
    return logdir / "whole"


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as file:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(file)]


def assert_same_state(expected, actual, where="trainer"):
    if isinstance(expected, torch.Tensor):
        assert torch.equal(expected, actual), f"{where} differs"
    elif isinstance(expected, np.ndarray):
        assert np.array_equal(expected, actual), f"{where} differs"
    elif isinstance(expected, dict):
        assert expected.keys() == actual.keys(), f"{where}: keys differ"
        for key in expected:
            assert_same_state(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), f"{where}: lengths differ"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_same_state(e, a, f"{where}[{i}]")
    else:
        assert expected == actual, f"{where}: {expected!r} != {actual!r}"


def assert_same_run(expected_dir: Path, actual_dir: Path):
    expected, actual = load_checkpoint(expected_dir / "checkpoint.pt"), load_checkpoint(actual_dir / "checkpoint.pt")
    assert actual["trainer"]["env_steps"] == STEPS
    assert_same_state(expected["trainer"], actual["trainer"])
    assert_same_state(expected["rng"], actual["rng"], "rng")
    assert_same_state(expected["pool"], actual["pool"], "pool")
    assert metric_rows(actual_dir) == metric_rows(expected_dir), "metrics.csv differs (rows lost or repeated)"


def start(logdir: Path, name: str, resume: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", "kpg", "train", "--logdir", str(logdir), "--name", name, *CLI_FLAGS]
    return subprocess.Popen(
        command + (["--resume"] if resume else []), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def wait_for_progress(process: subprocess.Popen, metrics: Path, size_before: int, timeout: float = 120) -> bool:
    """True once the run logged a row past size_before; False if it finished first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and metrics.stat().st_size > size_before:
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.01)
    process.kill()
    raise AssertionError("the training process made no progress")


def test_sigkill_at_random_moments_resumes_identically(uninterrupted, tmp_path):
    """Each life of the run is killed at a random moment after it has logged an update: inside an
    update, inside a checkpoint write, or between them. The next life resumes from whatever
    checkpoint survived."""
    kills = KILLS
    chance = random.Random(7)
    run_dir, metrics = tmp_path / "killed", tmp_path / "killed" / "metrics.csv"
    survived = 0
    while True:
        resume = (run_dir / "checkpoint.pt").exists()
        process = start(tmp_path, "killed", resume)
        if survived == kills:
            _, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr
            break
        size_before = metrics.stat().st_size if metrics.exists() else 0
        if wait_for_progress(process, metrics, size_before):
            time.sleep(chance.uniform(0.0, 0.4))
        process.send_signal(signal.SIGKILL)
        process.communicate()  # waits and closes the stderr pipe (an open one is a ResourceWarning, an error here)
        if process.returncode == -signal.SIGKILL:
            survived += 1
        if (run_dir / "checkpoint.pt").exists() and load_checkpoint(run_dir / "checkpoint.pt")["trainer"][
            "env_steps"
        ] >= STEPS:
            pytest.fail("the run finished before it could be killed; make it longer")
    print(f"survived {survived} SIGKILLs")
    assert_same_run(uninterrupted, run_dir)


def test_ctrl_c_finishes_the_update_writes_a_checkpoint_and_resumes(uninterrupted, tmp_path):
    run_dir, metrics = tmp_path / "stopped", tmp_path / "stopped" / "metrics.csv"
    process = start(tmp_path, "stopped", resume=False)
    assert wait_for_progress(process, metrics, 0)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and "SIGINT: stopping after this update" in stderr
    state = load_checkpoint(run_dir / "checkpoint.pt")
    updates = state["trainer"]["updates"]
    assert 0 < updates < STEPS // 100
    assert len(metric_rows(run_dir)) == updates, "the checkpoint and metrics.csv disagree"
    train(config(tmp_path, "stopped", resume=True))
    assert_same_run(uninterrupted, run_dir)


def test_error_inside_an_update_keeps_the_last_consistent_checkpoint(uninterrupted, tmp_path, monkeypatch):
    """An update that fails after changing the trainer must not be checkpointed: the resume would
    start from half an update."""
    from kpg.algos.mappo import MAPPOTrainer

    original, calls = MAPPOTrainer.iteration, []

    def failing_third_iteration(self):
        metrics = original(self)
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return metrics

    monkeypatch.setattr(MAPPOTrainer, "iteration", failing_third_iteration)
    with pytest.raises(RuntimeError, match="disk full"):
        train(config(tmp_path, "failed"))
    assert load_checkpoint(tmp_path / "failed" / "checkpoint.pt")["trainer"]["updates"] == 2
    monkeypatch.setattr(MAPPOTrainer, "iteration", original)
    train(config(tmp_path, "failed", resume=True))
    assert_same_run(uninterrupted, tmp_path / "failed")


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.arange(10.0)})

    def crash(*args, **kwargs):
        raise OSError("killed during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="killed during rename"):
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(10)})
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["weights"], torch.arange(10.0))
    # A half-written temporary file from a killed writer is overwritten by the next checkpoint.
    (tmp_path / "checkpoint.pt.tmp").write_bytes(b"\x80\x02partial")
    save_checkpoint(path, {"step": 3})
    assert load_checkpoint(path)["step"] == 3 and not (tmp_path / "checkpoint.pt.tmp").exists()


@pytest.mark.parametrize("keep_replay", [True, False], ids=["with-replay", "without-replay"])
def test_off_policy_checkpoints_hold_the_replay_buffer_unless_told_not_to(tmp_path, keep_replay):
    from kpg.algos import MADDPGConfig

    maddpg = MADDPGConfig(
        buffer_size=500, batch_size=16, rollout=25, updates_per_iteration=1, learning_starts=50, hidden=(8,)
    )
    run = config(
        tmp_path, "offpolicy", algo="maddpg", steps=100, copies=2, maddpg=maddpg, checkpoint_replay=keep_replay
    )
    train(run)
    replay = load_checkpoint(tmp_path / "offpolicy" / "checkpoint.pt")["trainer"]["replay"]
    assert replay["size"] == (100 if keep_replay else 0)
    assert all(rows.shape[0] == replay["size"] for rows in replay["storage"].values())
    resumed = train(dataclasses.replace(run, steps=150, resume=True))
    assert resumed["env_steps"] == 150


def tensorboard_steps(run_dir: Path, tag: str = "updates") -> list[int]:
    """The steps of ``tag``'s scalars in every TensorBoard event file of the run, in file order."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [
        event.step
        for path in sorted(run_dir.glob("events.out.tfevents.*"))
        for event in EventFileLoader(str(path)).Load()
        if any(v.tag == tag for v in event.summary.value)
    ]


def test_a_resume_cuts_tensorboard_events_back_to_the_checkpoint(tmp_path, monkeypatch):
    """A run that logged an update past its last checkpoint (the checkpoint of update 2, the row
    of update 3, then an error in update 4, and a record half-written by a kill) resumes: the
    event files then hold every update once, as metrics.csv does."""
    from kpg.algos.mappo import MAPPOTrainer

    original, calls = MAPPOTrainer.iteration, []

    def failing_fourth_iteration(self):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("disk full")
        return original(self)

    monkeypatch.setattr(MAPPOTrainer, "iteration", failing_fourth_iteration)
    run = config(tmp_path, "events", steps=500, tensorboard=True, checkpoint_every=2)
    with pytest.raises(RuntimeError, match="disk full"):
        train(run)
    run_dir = tmp_path / "events"
    assert load_checkpoint(run_dir / "checkpoint.pt")["trainer"]["updates"] == 2
    assert tensorboard_steps(run_dir) == [100, 200, 300]
    (events,) = run_dir.glob("events.out.tfevents.*")
    with open(events, "ab") as file:
        file.write(b"\x2a\x00\x00\x00\x00\x00\x00\x00half a record")
    monkeypatch.setattr(MAPPOTrainer, "iteration", original)
    time.sleep(1.1)  # the resumed run's event file is named by the second it starts
    train(dataclasses.replace(run, resume=True))
    assert tensorboard_steps(run_dir) == [100, 200, 300, 400, 500]
    assert tensorboard_steps(run_dir, "episode_return") == sorted(set(tensorboard_steps(run_dir, "episode_return")))
    assert b"half a record" not in events.read_bytes()
    assert [int(row["env_steps"]) for row in metric_rows(run_dir)] == [100, 200, 300, 400, 500]


def test_ctrl_c_under_torchrun_writes_a_final_checkpoint_every_rank_agrees_on(tmp_path):
    """torchrun passes Ctrl-C on to every rank; the ranks stop after the same update and write one
    checkpoint together (periodic checkpoints are off, so it is the only one), which resumes."""
    flags = [flag if flag != str(STEPS) else "20000" for flag in CLI_FLAGS]
    flags[flags.index("--checkpoint-every") + 1] = "0"
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "kpg",
        "train",
        "--logdir",
        str(tmp_path),
        "--name",
        "dist",
        *flags,
    ]
    run_dir = tmp_path / "dist"
    process = subprocess.Popen(torchrun, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert wait_for_progress(process, run_dir / "metrics.csv", 0, timeout=180)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and stderr.count("SIGINT: stopping after this update") == 2, stderr
    assert "cannot meet" not in stderr, stderr
    state = load_checkpoint(run_dir / "checkpoint.pt")
    updates = state["trainer"]["updates"]
    assert len(state["ranks"]) == 2 and 0 < updates < 200
    assert len(metric_rows(run_dir)) == updates, "the checkpoint and metrics.csv disagree"
    flags[flags.index("--steps") + 1] = str(100 * (updates + 1))
    resumed = subprocess.run(
        torchrun[: torchrun.index("--name") + 2] + flags + ["--resume"], capture_output=True, text=True, timeout=180
    )
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(run_dir / "checkpoint.pt")["trainer"]["updates"] == updates + 1
    assert len(metric_rows(run_dir)) == updates + 1
