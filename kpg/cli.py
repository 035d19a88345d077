"""The ``kpg`` command (also ``python -m kpg``): ``kpg train``, ``kpg compare`` and ``kpg games``, and
``kpg convert-checkpoint PATH`` for checkpoints of kpg's earlier pickle format (docs/reliability.md).

Every option is a flag (``kpg train --help``); ``--config FILE`` (TOML or JSON, keys as the flags'
names with underscores, sections for nested options such as ``[mappo]``) sets the defaults the
flags then override.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

from kpg.checkpoint import CheckpointError, ConvertConfig, convert_command
from kpg.compare import CompareConfig, compare
from kpg.extras import require_extra
from kpg.games import GamesConfig, games_command
from kpg.train import TrainConfig, train

COMMANDS = {
    "train": (TrainConfig, train),
    "compare": (CompareConfig, compare),
    "games": (GamesConfig, games_command),
    "convert-checkpoint": (ConvertConfig, convert_command),
}


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise SystemExit(f"--config: {path} does not exist")
    if path.suffix not in (".json", ".toml"):
        raise SystemExit(f"--config: {path} must be a .toml or .json file")
    try:
        values = json.loads(path.read_text()) if path.suffix == ".json" else _toml().loads(path.read_text())
    except ValueError as error:  # json.JSONDecodeError and tomllib.TOMLDecodeError both are
        raise SystemExit(f"--config: {path} is not valid {path.suffix[1:].upper()}: {error}") from None
    if not isinstance(values, dict):
        raise SystemExit(f"--config: {path} must hold a table of options, not a {type(values).__name__}")
    return values


def _toml():
    """The standard library's TOML reader (Python 3.11+), or tomli, the same reader for Python 3.10."""
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    return tomllib


def _from_dict(cls: type, values: dict[str, Any], where: str = "config"):
    """An instance of dataclass ``cls`` from a nested dict; unknown keys are an error."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise SystemExit(f"{where}: unknown option(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value, f"{where}.{name}")
        elif hint is Path or hint == Path | None:
            kwargs[name] = None if value is None else Path(value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _pop_config_flag(argv: list[str]) -> tuple[Path | None, list[str]]:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1]), argv[:i] + argv[i + 2 :]
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1]), argv[:i] + argv[i + 1 :]
    return None, argv


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print("usage: kpg {train,compare,games} [--config FILE] [options]   (kpg train --help for the options)")
        raise SystemExit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    command, rest = argv[0], argv[1:]
    require_extra("train", f"kpg {command}")
    import tyro  # the train extra, checked just above

    config_class, run = COMMANDS[command]
    config_path, rest = _pop_config_flag(rest)
    default = _from_dict(config_class, _read_config_file(config_path)) if config_path else None
    # Required options (convert-checkpoint's PATH) are positional; train and compare have none.
    config = tyro.cli(
        config_class,
        args=rest,
        default=default,
        prog=f"kpg {command}",
        config=(tyro.conf.PositionalRequiredArgs,),
        description=(config_class.__doc__ or "") + " --config FILE (TOML/JSON) sets defaults.",
    )
    try:
        run(config)
    except CheckpointError as error:  # a file kpg refuses to read: the message says why and what to do
        raise SystemExit(f"kpg {command}: {error}") from None


if __name__ == "__main__":
    main()
