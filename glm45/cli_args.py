"""Command-line flags generated from configuration dataclasses: one flag per field, one help convention.

    @dataclass
    class EngineConfig:
        max_num_seqs: int = arg(64, "sequences in one batch")     # → --max-num-seqs N

Each field becomes `--kebab-case-name`, typed from its annotation (`int | None`, `list[str] | None`, a
`dict` taken as JSON, booleans as `--flag/--no-flag`), with its help text from the field's metadata (`arg`
puts it there). `dataclass_from_args` builds the dataclass back from the parsed flags, optionally on top of a
JSON file of the same settings (flags that differ from their defaults win).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any


def arg(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its flag's help text (`factory` for mutable defaults)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help})


def json_object(text: str) -> dict[str, Any]:
    """argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _flag_type(annotation: Any) -> tuple[Any, bool]:
    """(scalar type, is a list) of a field annotation such as `int | None` or `list[str] | None`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One `--kebab-case` flag per field of `cls` (in an argument group named after it)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind, is_list = _flag_type(hints[f.name])
        default = _default(f)
        help_text = f.metadata.get("help", "")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif typing.get_origin(kind) is dict or kind is dict:
            group.add_argument(flag, type=json_object, default=default, metavar="JSON", help=help_text)
        else:
            group.add_argument(flag, type=kind, default=default, nargs="+" if is_list else None,
                               help=f"{help_text} (default: {default})")


def dataclass_from_args(cls: type, args: argparse.Namespace, config_file: str | None = None, **overrides: Any):
    """Build `cls` from parsed flags, on top of a JSON `config_file` of its fields when given (there, only
    flags that differ from their defaults override the file), then `overrides`."""
    values: dict[str, Any] = {}
    if config_file:
        try:
            raw = json.loads(Path(config_file).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read the settings file {config_file}: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{config_file} must hold a JSON object of settings")
        unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{config_file}: unknown settings {unknown}")
        values.update(raw)
    for f in dataclasses.fields(cls):
        if not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if f.name not in values or value != _default(f):
            values[f.name] = value
    values.update(overrides)
    return cls(**values)
