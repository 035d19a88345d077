"""Inputs kpg refuses before anything is written (issue 25, items 9-13): crafted checkpoint headers
and aliasing tensor entries, a FIFO at checkpoint.pt, a checkpoint that does not fit the run it
resumes (the run folder stays byte-identical), a new run into a folder that holds one, and every
option and config value out of type or range (one line, exit status 2, no run folder left)."""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch

from kpg.algos import MAPPOConfig
from kpg.app.checkpoint import MAGIC, CheckpointError, load_checkpoint, save_checkpoint
from kpg.app.cli import main as cli_main
from kpg.app.resume import RunFolderError
from kpg.app.train import TrainConfig, train


def write_crafted(path: Path, header: bytes | dict, data: bytes = b"") -> None:
    """A file in kpg's format with a valid checksum around any header and data section."""
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = MAGIC + header_bytes + b"\n" + data
    path.write_bytes(body + b"sha256:" + hashlib.sha256(body).hexdigest().encode() + b"\n")


def one_tensor(shape, size: int, offset: int = 0, data_bytes: int = 0, dtype: str = "float32") -> dict:
    return {
        "tensors": [{"dtype": dtype, "shape": shape, "offset": offset, "bytes": size}],
        "data_bytes": data_bytes,
        "payload": {"items": [["x", {"tensor": 0}]]},
    }


# ---- item 9: tensor entries in order, as views of one buffer ------------------------------------


def test_aliasing_tensor_entries_are_refused(tmp_path):
    mebibyte = 1 << 20
    entry = {"dtype": "float32", "shape": [mebibyte // 4], "offset": 0, "bytes": mebibyte}
    header = {
        "tensors": [entry] * 1000,  # every entry names the same megabyte: 1000x the file once read
        "data_bytes": mebibyte,
        "payload": {"items": [[f"t{i}", {"tensor": i}] for i in range(1000)]},
    }
    write_crafted(tmp_path / "alias.pt", header, bytes(mebibyte))
    with pytest.raises(CheckpointError, match=r"alias\.pt cannot be read: tensor entry 1 starts at byte 0 .* not at"):
        load_checkpoint(tmp_path / "alias.pt")


def test_a_checkpoints_tensors_are_views_of_one_buffer(tmp_path):
    first, second = torch.arange(6, dtype=torch.float64), torch.arange(4, dtype=torch.float64).reshape(2, 2)
    save_checkpoint(tmp_path / "c.pt", {"a": first, "b": second})
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded["a"], first) and torch.equal(loaded["b"], second)
    # b's bytes follow a's in the one buffer holding the file, not in a copy of their own.
    assert loaded["b"].data_ptr() - loaded["a"].data_ptr() == first.numel() * first.element_size()


# ---- item 10: malformed headers are a one-line CheckpointError ----------------------------------

MALFORMED = {
    "nested 100 000 deep": (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "payload nested 100 000 deep": (
        b'{"tensors": [], "data_bytes": 0, "payload": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "nested too deeply",
    ),
    "element count overflows int64": (one_tensor([2**40, 2**40], 0), "does not fit"),
    "element count overflows with a zero size": (one_tensor([0, 2**64], 0), "shape no tensor can have"),
    "negative size": (one_tensor([1], -4), "integers >= 0"),
    "negative dimension": (one_tensor([-1, -4], 16), "integers >= 0"),
    "boolean dimension": (one_tensor([True], 4), "integers >= 0"),
    "float offset": (one_tensor([1], 4, offset=0.5), "integers >= 0"),
    "65 dimensions": (one_tensor([1] * 65, 4), "shape no tensor can have"),
    "a header that is a list": ([], "not a table"),
    "a tensor entry that is a string": (
        {"tensors": ["x"], "data_bytes": 0, "payload": {"items": []}},
        "tensor entry 0",
    ),
    "a reference to tensor -1": (
        {"tensors": [], "data_bytes": 0, "payload": {"items": [["x", {"tensor": -1}]]}},
        "refers to tensor -1",
    ),
}


@pytest.mark.parametrize("header, message", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_headers_are_a_one_line_checkpoint_error(tmp_path, header, message):
    path = tmp_path / "bad.pt"
    write_crafted(path, header)
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value) and len(str(error.value)) < 600


def small_run(tmp_path: Path, **changes) -> TrainConfig:
    config = TrainConfig(
        steps=50,
        copies=2,
        logdir=tmp_path,
        name="run",
        progress=False,
        tensorboard=True,
        eval_episodes=0,
        checkpoint_every=1,
        mappo=MAPPOConfig(rollout=25, epochs=1, minibatches=1, hidden=(8,)),
    )
    return dataclasses.replace(config, **changes)


def cli_args(config: TrainConfig) -> list[str]:
    return ["train", "--logdir", str(config.logdir), "--name", config.run_name, "--steps", str(config.steps)]


def test_kpg_train_resume_prints_the_one_line_refusal_of_a_malformed_header(tmp_path):
    config = small_run(tmp_path)
    config.run_dir.mkdir()
    write_crafted(config.run_dir / "checkpoint.pt", b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*cli_args(config), "--resume"])
    message = str(exit_info.value.code)
    assert message.startswith("kpg train: checkpoint ") and "nested too deeply" in message and "\n" not in message


def test_a_fifo_at_checkpoint_pt_is_refused_without_blocking(tmp_path):
    path = tmp_path / "checkpoint.pt"
    os.mkfifo(path)
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(_refusal(path)), daemon=True)
    reader.start()
    reader.join(timeout=20)
    assert outcome and "is not a regular file" in outcome[0]


def _refusal(path: Path) -> str:
    try:
        load_checkpoint(path)
    except CheckpointError as error:
        return str(error)
    return "read"


# ---- item 11: a refused resume leaves the run folder byte-identical -----------------------------


def _negative_adam_step(state):
    for entry in state["trainer"]["critic_optimizer"]["state"].values():
        entry["step"] = torch.tensor(-1.0)


def _shape_mismatch(state):
    name = next(iter(state["trainer"]["actor"]))
    state["trainer"]["actor"][name] = torch.zeros(3, 3, 3)


def _nan_weights(state):
    name = next(iter(state["trainer"]["actor"]))
    state["trainer"]["actor"][name] = torch.full_like(state["trainer"]["actor"][name], float("nan"))


def _without_pool(state):
    del state["pool"]
    for rank in state["ranks"]:
        del rank["pool"]


def _metrics_bytes(value):
    return lambda state: state.update(metrics_bytes=value)


BAD_CHECKPOINTS = {
    "missing pool": (_without_pool, "'pool'"),
    "missing trainer key": (lambda state: state["trainer"].pop("critic"), "lacks 'critic'"),
    "shape mismatch": (_shape_mismatch, "size mismatch"),
    "NaN weights": (_nan_weights, "NaN or infinite"),
    "Adam step -1": (_negative_adam_step, r"\['step'\] is negative"),
    "metrics_bytes 10**12": (_metrics_bytes(10**12), r"metrics_bytes is 1000000000000, not an integer in \[0, "),
    "metrics_bytes -5": (_metrics_bytes(-5), r"metrics_bytes is -5"),
}


def _hashes(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


def test_a_refused_resume_leaves_the_run_folder_byte_identical(tmp_path):
    config = small_run(tmp_path)
    train(config)
    good = tmp_path / "good.pt"
    shutil.copy(config.run_dir / "checkpoint.pt", good)
    for label, (damage, message) in BAD_CHECKPOINTS.items():
        state = load_checkpoint(good)
        damage(state)
        save_checkpoint(config.run_dir / "checkpoint.pt", state)
        before = _hashes(config.run_dir)
        with pytest.raises(CheckpointError, match=message):
            train(dataclasses.replace(config, steps=100, resume=True))
        assert _hashes(config.run_dir) == before, label


# ---- item 12: a new run into a folder that holds one -------------------------------------------


def test_a_new_run_refuses_a_folder_that_holds_one_and_overwrite_starts_clean(tmp_path):
    config = small_run(tmp_path)
    train(config)
    before = _hashes(config.run_dir)
    with pytest.raises(RunFolderError, match=r"already holds a run .* --resume, start over with --overwrite"):
        train(dataclasses.replace(config, seed=1))
    assert _hashes(config.run_dir) == before
    (config.run_dir / "notes.txt").write_text("mine")
    train(dataclasses.replace(config, seed=1, steps=100, overwrite=True))
    events = sorted(config.run_dir.glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].name not in before  # the old run's events are gone
    assert len((config.run_dir / "metrics.csv").read_text().splitlines()) == 1 + 2  # header + this run's updates
    assert json.loads((config.run_dir / "config.json").read_text())["seed"] == 1
    assert (config.run_dir / "notes.txt").read_text() == "mine"  # only the run's own files are deleted


# ---- item 13: every option and config value, one line, status 2, nothing written ---------------

BASE = ["--steps", "50", "--copies", "2", "--eval-episodes", "0", "--no-progress", "--no-tensorboard"]
REFUSED_OPTIONS = [
    (["--steps", "-5"], r"--steps -5: expected an integer >= 1"),
    (["--steps", "0"], r"--steps 0: expected an integer >= 1"),
    (["--k-until", "-5"], r"--k-until -5: expected an integer >= 0"),
    (["--checkpoint-every", "-1"], r"--checkpoint-every -1: expected an integer >= 0"),
    (["--agents", "0"], r"--agents 0: expected an integer >= 1"),
    (["--k", "0"], r"--k 0: expected an integer >= 1"),
    (["--mappo.epochs", "0"], r"--mappo.epochs 0: expected an integer >= 1"),
    (["--mappo.minibatches", "0"], r"--mappo.minibatches 0: expected an integer >= 1"),
    (["--mappo.rollout", "0"], r"--mappo.rollout 0: expected an integer >= 1"),
    (["--mappo.lr", "nan"], r"--mappo.lr nan: expected a finite number"),
    (["--mappo.gamma", "1.5"], r"--mappo.gamma 1.5: expected a number in \[0, 1\]"),
    (["--maddpg.tau", "0"], r"--maddpg.tau 0.0: expected a number in \(0, 1\]"),
    (["--eval-episodes", "-1"], r"--eval-episodes -1: expected an integer >= 0"),
    (["--threads", "0"], r"--threads 0: expected an integer >= 1"),
    (["--seed", "-1"], r"--seed -1: expected an integer in \[0, 4294967295\]"),
    (["--env", "os:getcwd"], r"--env 'os:getcwd': expected module:callable .* it returned a str"),
    (["--env", "no_such_module_kpg:make"], r"--env 'no_such_module_kpg:make': .*No module named"),
    (["--logdir", "{file}"], r"--logdir .*: expected a folder; .* is a file"),
    (["--resume", "--overwrite"], r"--resume True: expected --resume or --overwrite, not both"),
    (["--config", "{config}steps = 'abc'"], r"run.toml: steps 'abc': expected an integer, got a str"),
    (["--config", "{config}steps = [1, 2]"], r"run.toml: steps \(1, 2\): expected an integer, got a tuple"),
    (["--config", "{config}mappo = 3"], r"run.toml: mappo 3: expected a table \(\[mappo\]\) of options"),
    (["--config", "{config}[mappo]\nepochs = 0"], r"run.toml: mappo.epochs 0: expected an integer >= 1"),
    (["--config", "{config}stepz = 3"], r"run.toml: stepz 3: unknown option"),
    pytest.param(
        ["--device", "cuda"],
        r"--device 'cuda': expected cpu \(",
        marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),
    ),
]


@pytest.mark.parametrize("argv, message", REFUSED_OPTIONS)
def test_a_bad_option_is_one_line_status_2_and_writes_nothing(tmp_path, capsys, argv, message):
    logdir = tmp_path / "runs"
    (tmp_path / "a-file").write_text("")
    argv = [arg.replace("{file}", str(tmp_path / "a-file")) for arg in argv]
    if argv[-1].startswith("{config}"):
        (tmp_path / "run.toml").write_text(argv[-1].removeprefix("{config}") + "\n")
        argv[-1] = str(tmp_path / "run.toml")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--logdir", str(logdir), *BASE, *argv])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in error, error
    assert error.startswith("kpg train: ") and re.search(message, error), error
    assert not logdir.exists()
