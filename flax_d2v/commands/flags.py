"""Command-line flags generated from a recipe dataclass (`flax_d2v.train.recipes`): a setting is written once.

Each field becomes `--field-name` in the argument group of its section, with the field's type
(`bool` -> `--x/--no-x`, a `Literal` -> choices), its default (shown in the help) and the help of
its metadata. `--config FILE` is the run.json settings file of every training command (flags given
on the command line win over it); its older meaning, a model preset or config.json, still works
(`FinetuneConfig.from_settings` prints a note).

Defaults stay in the namespace (`args.min_seconds` is the recipe's value), and the flags actually
typed are recorded in `args._given`, so a settings file fills exactly the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from flax_d2v.train.recipes import Settings

GIVEN = "_given"


def _mark(namespace: argparse.Namespace, dest: str) -> None:
    given = getattr(namespace, GIVEN, None)
    if given is None:
        given = set()
        setattr(namespace, GIVEN, given)
    given.add(dest)


class _Store(argparse.Action):
    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        setattr(namespace, self.dest, values)
        _mark(namespace, self.dest)


class _Bool(argparse.BooleanOptionalAction):
    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        super().__call__(parser, namespace, values, option_string)
        _mark(namespace, self.dest)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _plain_type(annotation: Any) -> Any:
    """`int | None` -> int; `Literal[...] | None` -> the Literal."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def flag_spec(recipe: type[Settings], field: dataclasses.Field, annotation: Any) -> dict[str, Any]:
    """The `add_argument` keywords of one setting."""
    kind = _plain_type(annotation)
    help_text = field.metadata.get("help")
    default = field.default
    shown = recipe.default_note(field.name) if default is None else _shown(default)
    if shown is not None:  # "... (note)" -> "... (note; default X)"
        if not help_text:
            help_text = f"default {shown}"
        elif help_text.endswith(")"):
            help_text = f"{help_text[:-1]}; default {shown})"
        else:
            help_text = f"{help_text} (default {shown})"
    spec: dict[str, Any] = {"dest": field.name, "default": default, "help": help_text}
    if field.metadata.get("metavar"):
        spec["metavar"] = field.metadata["metavar"]
    if kind is bool:
        spec["action"] = _Bool
    else:
        spec["action"] = _Store
        if typing.get_origin(kind) is Literal:
            spec["choices"] = typing.get_args(kind)
        elif kind in (int, float):
            spec["type"] = kind
        elif kind is not str:
            raise TypeError(f"{field.name}: no flag for a setting of type {annotation!r}")
    return spec


def add_settings_arguments(parser: argparse.ArgumentParser, recipe: type[Settings]) -> dict[str, str]:
    """`--config` and one flag per field of `recipe`, grouped by section; returns {flag: field name}."""
    parser.add_argument(
        "--config",
        metavar="RUN.json",
        help="JSON file with any of these settings (keys: the flag names, with - or _); flags given here win",
    )
    hints = recipe.field_types()
    flags: dict[str, str] = {}
    for title, fields in recipe.sections():
        group = parser.add_argument_group(title)
        for field in fields:
            group.add_argument(flag_name(field.name), **flag_spec(recipe, field, hints[field.name]))
            flags[flag_name(field.name)] = field.name
    return flags


def settings_from_args(args: argparse.Namespace | Mapping[str, Any], recipe: type[Settings]) -> Any:
    """The validated recipe: its defaults < the `--config` file < the flags given on the command line.

    `args` is the namespace of `add_settings_arguments`' flags, or a mapping of settings (all of
    them given; a `config` entry is `--config`).
    """
    if isinstance(args, argparse.Namespace):
        given: dict[str, Any] = {name: getattr(args, name) for name in sorted(getattr(args, GIVEN, None) or ())}
        if getattr(args, "config", None):
            given["config"] = args.config
    else:
        given = {k: v for k, v in args.items() if not str(k).startswith("_") and k != "command"}
    return recipe.from_settings(given).validate()
