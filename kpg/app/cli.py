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

from kpg.app.checkpoint import CheckpointError, ConvertConfig, convert_command
from kpg.app.compare import CompareConfig, compare
from kpg.app.extras import require_extra
from kpg.app.games import GamesConfig, games_command
from kpg.app.train import TrainConfig, train
from kpg.options import OptionError, Refusal, check_options

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


def _from_dict(cls: type, values: dict[str, Any], where: str = "config", prefix: str = ""):
    """An instance of dataclass ``cls`` from a nested dict (the config file ``where``); unknown keys,
    values of the wrong type and values out of range are an error naming the key."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise OptionError(
            f"{where}: {prefix}{unknown[0]}", values[unknown[0]], f"unknown option; known: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise OptionError(f"{where}: {prefix}{name}", value, f"expected a table ([{prefix}{name}]) of options")
            kwargs[name] = _from_dict(hint, value, where, f"{prefix}{name}.")
        elif (hint is Path or hint == Path | None) and isinstance(value, str):
            kwargs[name] = Path(value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    config = cls(**kwargs)
    if not prefix:
        try:
            check_options(config)
        except OptionError as error:
            key = error.option.removeprefix("--").replace("-", "_")  # the key as the file spells it
            raise OptionError(f"{where}: {key}", error.value, error.allowed) from None
    return config


def _pop_config_flag(argv: list[str]) -> tuple[Path | None, list[str]]:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1]), argv[:i] + argv[i + 2 :]
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1]), argv[:i] + argv[i + 1 :]
    return None, argv


def _description(config_class: type) -> str:
    """The command's help text: its config's docstring as plain text, and what --config does."""
    text = " ".join((config_class.__doc__ or "").replace("``", "").split())
    return text if "--config" in text else f"{text} --config FILE (TOML or JSON) sets the options' defaults."


USAGE = """usage: kpg COMMAND [--config FILE] [options]

commands:
  train               train one run (MAPPO, MADDPG or FACMAC with KPG's k levels) on one environment
  compare             train several k values and seeds and compare them (table, curves, wall-clock)
  games               KPG on normal-form games: every game x optimizer x k over a learning-rate sweep
  convert-checkpoint  rewrite a checkpoint of kpg's earlier pickle format in today's format

kpg COMMAND --help lists a command's options; --config FILE (TOML or JSON) sets their defaults."""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(USAGE)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nkpg: unknown command {argv[0]!r}", file=sys.stderr)
        raise SystemExit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    command, rest = argv[0], argv[1:]
    require_extra("train", f"kpg {command}")
    import tyro  # the train extra, checked just above

    config_class, run = COMMANDS[command]
    config_path, rest = _pop_config_flag(rest)
    try:
        default = _from_dict(config_class, _read_config_file(config_path), str(config_path)) if config_path else None
        # Required options (convert-checkpoint's PATH) are positional; train and compare have none.
        config = tyro.cli(
            config_class,
            args=rest,
            default=default,
            prog=f"kpg {command}",
            config=(tyro.conf.PositionalRequiredArgs,),
            description=_description(config_class),
        )
        check_options(config)
        run(config)
    except Refusal as error:  # a bad option: nothing was written
        print(f"kpg {command}: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except CheckpointError as error:  # a file kpg refuses to read: the message says why and what to do
        raise SystemExit(f"kpg {command}: {error}") from None


if __name__ == "__main__":
    main()
