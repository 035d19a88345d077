"""Reading a file never runs code: kpg's checkpoints hold data only and are read without pickle; a
crafted pickle (bare, in torch's zip format, or inside the envelope of kpg's earlier format with a
valid checksum) is refused through the Python API, `kpg train --resume` and `kpg convert-checkpoint`,
and the marker file its code would write never appears. Every checkpoint the trainers write round-trips
exactly and resumes a run exactly; checkpoints of the earlier format convert and resume. Config
files read on Python 3.10 (tomli in place of tomllib)."""

import dataclasses
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kpg.algos import FACMACConfig, MADDPGConfig, MAPPOConfig
from kpg.app.checkpoint import MAGIC, CheckpointError, convert_checkpoint, load_checkpoint, save_checkpoint
from kpg.app.cli import main as cli_main
from kpg.app.train import TrainConfig, train

SMALL = {
    "mappo": dict(mappo=MAPPOConfig(rollout=25, epochs=1, minibatches=2, hidden=(8,)), k_until=100),
    "maddpg": dict(
        maddpg=MADDPGConfig(
            buffer_size=300, batch_size=8, rollout=25, updates_per_iteration=2, learning_starts=50, hidden=(8,)
        )
    ),
    "facmac": dict(
        facmac=FACMACConfig(
            buffer_size=300,
            batch_size=8,
            rollout=25,
            updates_per_iteration=2,
            learning_starts=50,
            hidden=(8,),
            mixer_embed=4,
            hypernet_embed=6,
        )
    ),
}


def run_config(logdir: Path, algo: str, name: str, **changes) -> TrainConfig:
    base = TrainConfig(
        algo=algo,
        steps=200,
        copies=2,
        logdir=logdir,
        name=name,
        progress=False,
        tensorboard=False,
        eval_episodes=0,
        checkpoint_every=1,
        **SMALL[algo],
    )
    return dataclasses.replace(base, **changes)


def assert_same(expected, actual, where="payload"):
    assert type(expected) is type(actual), f"{where}: {type(expected)} != {type(actual)}"
    if isinstance(expected, torch.Tensor):
        assert expected.dtype == actual.dtype and expected.shape == actual.shape, where
        assert torch.equal(expected, actual) or (expected.isnan() == actual.isnan()).all(), f"{where} differs"
    elif isinstance(expected, dict):
        assert list(expected) == list(actual), f"{where}: keys differ"
        for key in expected:
            assert_same(expected[key], actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(expected) == len(actual), f"{where}: lengths differ"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_same(e, a, f"{where}[{i}]")
    elif isinstance(expected, float) and expected != expected:
        assert actual != actual, where
    else:
        assert expected == actual, f"{where}: {expected!r} != {actual!r}"


# ---- the format -------------------------------------------------------------------------------------


def test_every_kind_of_data_round_trips_exactly(tmp_path):
    module_state = torch.nn.Linear(3, 2).state_dict()
    payload = {
        "module": module_state,
        "tuple": (1, 2.5, "x", None, True),
        "int_keys": {0: {"step": torch.tensor(3.0)}, 7: []},
        "floats": [float("nan"), float("inf"), -0.0, 1e-310, 0.1],
        "big": 2**127 + 12345,
        "dtypes": [
            torch.arange(6, dtype=dtype).reshape(2, 3)
            for dtype in (
                torch.uint8,
                torch.int8,
                torch.int16,
                torch.int32,
                torch.int64,
                torch.float16,
                torch.bfloat16,
                torch.float32,
                torch.float64,
            )
        ],
        "bool": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4),
        "view": torch.arange(20.0).reshape(4, 5)[:, 1::2],
        "complex": torch.tensor([1 + 2j], dtype=torch.complex64),
    }
    save_checkpoint(tmp_path / "c.pt", payload)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert_same(payload, loaded)
    assert loaded["module"]._metadata == module_state._metadata  # a module's version metadata survives
    assert (tmp_path / "c.pt").read_bytes().startswith(MAGIC)


@pytest.mark.parametrize(
    "value, named",
    [
        (np.zeros(3), "numpy.ndarray"),
        (np.int64(3), "numpy.int64"),
        (Path("runs"), "PosixPath"),
        (torch.float32, "torch.dtype"),
        ({1.5: 2}, "key 1.5"),
        (lambda: 0, "function"),
    ],
)
def test_saving_anything_but_plain_data_is_refused_before_writing(tmp_path, value, named):
    with pytest.raises(TypeError, match=rf"payload\['trainer'\]\['x'\].*{named}|{named}.*payload\['trainer'\]"):
        save_checkpoint(tmp_path / "c.pt", {"trainer": {"x": value}})
    assert not (tmp_path / "c.pt").exists() and not (tmp_path / "c.pt.tmp").exists()


# ---- crafted files ----------------------------------------------------------------------------------


class RunsCode:
    """What a crafted checkpoint holds: unpickling it runs a shell command that writes a marker."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_files(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """Each kind of crafted checkpoint, as (file, the marker its code would write)."""
    files = {}

    def make(kind: str, write) -> None:
        marker = tmp_path / f"ran-{kind}"
        path = tmp_path / kind / "checkpoint.pt"
        path.parent.mkdir()
        write(path, {"trainer": RunsCode(marker)})
        files[kind] = (path, marker)

    make("bare-pickle", lambda path, evil: path.write_bytes(pickle.dumps(evil)))
    make("torch-zip", lambda path, evil: torch.save(evil, path))

    def enveloped(path, evil):  # kpg's earlier format, with a valid checksum
        buffer = io.BytesIO()
        torch.save(evil, buffer)
        data = buffer.getvalue()
        torch.save({"format": "kpg-checkpoint-1", "sha256": hashlib.sha256(data).hexdigest(), "payload": data}, path)

    make("enveloped", enveloped)
    return files


def test_crafted_pickles_run_no_code_through_the_python_api(tmp_path):
    for kind, (path, marker) in crafted_files(tmp_path).items():
        refused = rf"{path} is a pickle.*nothing in it was run.*kpg convert-checkpoint"
        with pytest.raises(CheckpointError, match=refused):
            load_checkpoint(path)
        with pytest.raises(CheckpointError, match="is a pickle"):
            train(run_config(tmp_path, "mappo", kind, resume=True))
        assert not marker.exists(), f"{kind}: the file's code ran"
        if kind != "enveloped":  # the envelope's payload is only named when converting (below)
            with pytest.raises(CheckpointError, match=r"is a pickle and imports (posix|nt)\.system"):
                load_checkpoint(path)


def test_crafted_pickles_run_no_code_through_kpg_train_resume(tmp_path):
    for kind, (path, marker) in crafted_files(tmp_path).items():
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "kpg",
                "train",
                "--logdir",
                str(tmp_path),
                "--name",
                kind,
                "--resume",
                "--steps",
                "100",
                "--copies",
                "2",
                "--no-progress",
                "--no-tensorboard",
                "--eval-episodes",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1 and f"checkpoint {path} is a pickle" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and not marker.exists(), f"{kind}: {result.stderr}"


def test_converting_a_crafted_legacy_checkpoint_is_refused_naming_what_it_holds(tmp_path):
    path, marker = crafted_files(tmp_path)["enveloped"]
    with pytest.raises(SystemExit, match=r"holds (posix|nt)\.system.*nothing in it was run.*--trust-pickle"):
        cli_main(["convert-checkpoint", str(path)])
    assert not marker.exists() and not path.with_name("checkpoint.pt.v1").exists()


def test_a_crafted_file_in_todays_format_is_refused_naming_what_it_holds(tmp_path):
    """A file in kpg's own format, with a valid checksum, whose header names a callable or an
    unknown dtype: the reader knows no such entries."""

    def write(path: Path, header: dict) -> None:
        body = MAGIC + json.dumps(header).encode() + b"\n"
        path.write_bytes(body + b"sha256:" + hashlib.sha256(body).hexdigest().encode() + b"\n")

    callable_entry = {"tensors": [], "data_bytes": 0, "payload": {"items": [["x", {"callable": "os.system"}]]}}
    write(tmp_path / "a.pt", callable_entry)
    with pytest.raises(CheckpointError, match=r"a\.pt cannot be read: payload\['x'\] is an entry of type 'callable'"):
        load_checkpoint(tmp_path / "a.pt")
    object_tensor = {
        "tensors": [{"dtype": "object", "shape": [1], "offset": 0, "bytes": 8}],
        "data_bytes": 0,
        "payload": {"items": [["x", {"tensor": 0}]]},
    }
    write(tmp_path / "b.pt", object_tensor)
    with pytest.raises(CheckpointError, match=r"b\.pt cannot be read: it holds a tensor of dtype 'object'"):
        load_checkpoint(tmp_path / "b.pt")
    overlong = {
        "tensors": [{"dtype": "float32", "shape": [1000], "offset": 0, "bytes": 4000}],
        "data_bytes": 0,
        "payload": {"items": [["x", {"tensor": 0}]]},
    }
    write(tmp_path / "c.pt", overlong)
    with pytest.raises(CheckpointError, match=r"c\.pt cannot be read: a tensor entry does not fit"):
        load_checkpoint(tmp_path / "c.pt")


# ---- what the trainers write --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "algo, replay", [("mappo", True), ("maddpg", True), ("maddpg", False), ("facmac", True), ("facmac", False)]
)
def test_every_trainers_checkpoint_round_trips_exactly(tmp_path, algo, replay):
    """What a run checkpoints (trainer, optimizers, replay, generators, KSchedule, every rank's
    streams) is plain data: loading it and saving it again gives the same payload."""
    train(run_config(tmp_path, algo, "run", steps=100, checkpoint_replay=replay))
    first = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    save_checkpoint(tmp_path / "again.pt", first)
    assert_same(first, load_checkpoint(tmp_path / "again.pt"))
    assert isinstance(first["rng"]["numpy"]["state"]["key"], torch.Tensor) and isinstance(first["rng"]["python"], tuple)
    if algo != "mappo":
        assert first["trainer"]["replay"]["size"] == (100 if replay else 0)


@pytest.mark.parametrize("algo", ["maddpg", "facmac"])
def test_off_policy_runs_resume_exactly_through_kpg_train(tmp_path, algo):
    """MAPPO's exact resume through train() is in test_train.py and test_faults.py; this is the same
    for the off-policy trainers (replay buffer, both generators, global streams)."""
    train(run_config(tmp_path, algo, "whole"))
    train(run_config(tmp_path, algo, "split", steps=100))
    train(run_config(tmp_path, algo, "split", resume=True))
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint.pt")
    split = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert split["trainer"]["env_steps"] == 200
    for part in ("trainer", "rng", "pool", "recent"):
        assert_same(whole[part], split[part], part)


def legacy_checkpoint(path: Path, payload: dict) -> None:
    """A checkpoint as kpg wrote them before (format kpg-checkpoint-1): a pickle holding the run's
    paths and numpy's global generator state as an array."""

    def legacy_rng(rng):
        state = rng["numpy"]
        numpy_state = (
            state["bit_generator"],
            state["state"]["key"].numpy().astype(np.uint32),
            state["state"]["pos"],
            state["has_gauss"],
            state["gauss"],
        )
        return {**rng, "numpy": numpy_state}

    payload = {
        **payload,
        "config": {**payload["config"], "logdir": Path(payload["config"]["logdir"])},
        "rng": legacy_rng(payload["rng"]),
        "ranks": [{**rank, "rng": legacy_rng(rank["rng"])} for rank in payload["ranks"]],
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    torch.save({"format": "kpg-checkpoint-1", "sha256": hashlib.sha256(data).hexdigest(), "payload": data}, path)


def test_a_checkpoint_of_the_earlier_format_is_refused_then_converts_and_resumes_exactly(tmp_path):
    train(run_config(tmp_path, "maddpg", "whole"))
    train(run_config(tmp_path, "maddpg", "old", steps=100))
    path = tmp_path / "old" / "checkpoint.pt"
    legacy_checkpoint(path, load_checkpoint(path))
    with pytest.raises(CheckpointError, match="kpg-checkpoint-1.*kpg convert-checkpoint"):
        train(run_config(tmp_path, "maddpg", "old", resume=True))
    cli_main(["convert-checkpoint", str(path)])
    assert path.with_name("checkpoint.pt.v1").exists()
    with pytest.raises(CheckpointError, match="already in format kpg-checkpoint-2"):
        convert_checkpoint(path)
    train(run_config(tmp_path, "maddpg", "old", resume=True))
    whole, resumed = load_checkpoint(tmp_path / "whole" / "checkpoint.pt"), load_checkpoint(path)
    for part in ("trainer", "rng", "pool"):
        assert_same(whole[part], resumed[part], part)


# ---- every other file kpg reads ------------------------------------------------------------------------


def test_toml_config_reads_without_tomllib_as_on_python_3_10(tmp_path, monkeypatch):
    """Python 3.10 has no tomllib; kpg then reads TOML with tomli (a dependency there)."""
    monkeypatch.setitem(sys.modules, "tomllib", None)  # import tomllib now fails as on 3.10
    config_file = tmp_path / "run.toml"
    config_file.write_text(
        f'steps = 50\ncopies = 2\nlogdir = "{tmp_path}"\nname = "toml"\ntensorboard = false\n'
        "eval_episodes = 0\nprogress = false\n[mappo]\nrollout = 25\nhidden = [8]\nepochs = 1\n"
    )
    cli_main(["train", "--config", str(config_file)])
    saved = json.loads((tmp_path / "toml" / "config.json").read_text())
    assert saved["steps"] == 50 and saved["mappo"]["hidden"] == [8]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("bad.toml", "steps = = 3", "is not valid TOML"),
        ("bad.json", "{steps: 3", "is not valid JSON"),
        ("list.json", "[1, 2]", "must hold a table of options, not a list"),
    ],
)
def test_a_config_file_that_does_not_parse_is_named(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(SystemExit, match=rf"--config: .*{name} {message}"):
        cli_main(["train", "--config", str(tmp_path / name)])


def test_compare_names_a_damaged_summary(tmp_path):
    from kpg.app.compare import CompareConfig, compare

    config = CompareConfig(ks=(1,), seeds=(0,), workers=1, out=tmp_path, train=run_config(tmp_path, "mappo", None))
    summary = tmp_path / "runs" / "mappo-simple_spread-k1-s0" / "summary.json"
    summary.parent.mkdir(parents=True)
    summary.write_text('{"run": ')
    with pytest.raises(ValueError, match=rf"{summary} is not valid JSON .*delete it to run mappo-simple_spread-k1-s0"):
        compare(config)
