"""The ``serve`` and ``worker`` options, generated from :class:`server.settings.Settings` so they cannot drift.

One ``--kebab-case`` flag per field, its help from the field's description, its type (and choices) from the
field's annotation. Booleans are ``--x`` / ``--no-x`` (``--x true|false`` works too; ``--x auto`` for the
ones whose default decides by itself), lists are comma-separated or repeated (``--api-keys a,b`` or
``--api-key a --api-key b``), and ``model_paths`` is one ``KEY=PATH`` per flag. Only flags given on the
command line override the environment and the config file (every option defaults to "not given").
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from .cli import float_arg, int_arg
from .settings import ENV_PREFIX, Settings, cli_flag

# Names the command line had before the flags were generated; they keep working.
ALIASES: dict[str, tuple[str, ...]] = {"api_keys": ("--api-key",), "apps": ("--app",), "model_paths": ("--model-path",)}
# ``worker``: ``--port`` is its health port; the API's port and the process layout are serve's.
WORKER_SKIP = frozenset({"port", "devices", "workers"})
WORKER_ALIASES: dict[str, tuple[str, ...]] = {**ALIASES, "worker_port": ("--port",)}

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def add_settings_flags(
    parser: argparse.ArgumentParser,
    skip: frozenset[str] = frozenset(),
    aliases: dict[str, tuple[str, ...]] | None = None,
) -> None:
    """One flag per :class:`Settings` field (but ``skip``), each storing to the field's name."""
    aliases = ALIASES if aliases is None else aliases
    for name, info in Settings.model_fields.items():
        if name not in skip:
            _add_flag(parser, name, info, (cli_flag(name), *aliases.get(name, ())))


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command line gave (flags not given are absent, so they do not override)."""
    return {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}


def _add_flag(parser: argparse.ArgumentParser, name: str, info: FieldInfo, flags: tuple[str, ...]) -> None:
    annotation, optional = _unwrap_optional(info.annotation)
    help_text = _help(name, info)
    origin = typing.get_origin(annotation)
    if annotation is bool:
        parser.add_argument(*flags, dest=name, action=Switch, auto=optional, help=help_text)
    elif origin is Literal:
        choices = [str(c) for c in typing.get_args(annotation)]
        parser.add_argument(*flags, dest=name, choices=choices, help=help_text)
    elif origin is list:
        item = name.rsplit("_", 1)[-1].removesuffix("s").upper()
        parser.add_argument(*flags, dest=name, action=Items, metavar=f"{item}[,{item}...]", help=help_text)
    elif origin is dict:
        parser.add_argument(*flags, dest=name, action=Pairs, metavar="KEY=PATH", help=help_text)
    elif annotation in (int, float, str, Path):
        parser.add_argument(
            *flags, dest=name, type=_CONVERTERS[annotation], metavar=_metavar(name, annotation), help=help_text
        )
    else:  # a new kind of setting: teach this module its flag rather than leave it without one
        raise TypeError(f"setting {name}: no command-line flag for the type {info.annotation!r}")


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (it, False)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _help(name: str, info: FieldInfo) -> str:
    text = (info.description or "").rstrip()
    default = info.default
    if isinstance(default, bool):
        default = str(default).lower()
    shown = "" if default is PydanticUndefined or default is None else f"; default {default}"
    return f"{text} [{ENV_PREFIX}{name.upper()}{shown}]".replace("%", "%%")


def _metavar(name: str, annotation: Any) -> str:
    for suffix, metavar in (("_s", "SECONDS"), ("_ms", "MS"), ("_bytes", "BYTES"), ("_dir", "DIR")):
        if name.endswith(suffix):
            return metavar
    return {int: "N", float: "NUMBER", Path: "PATH"}.get(annotation, name.upper())


_CONVERTERS: dict[Any, Any] = {int: int_arg, float: float_arg, str: str, Path: Path}


class HelpFormatter(argparse.HelpFormatter):
    """Shows a boolean as ``--x [{true,false}], --no-x`` (the negation takes no value)."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if isinstance(action, Switch):
            first, *rest = action.option_strings
            return ", ".join([f"{first} [{action.metavar}]", *rest])
        return super()._format_action_invocation(action)


class Switch(argparse.Action):
    """``--x`` (true), ``--no-x`` (false), ``--x true|false``; with ``auto``, also ``--x auto`` (None)."""

    def __init__(self, option_strings: Sequence[str], dest: str, auto: bool = False, **kwargs: Any) -> None:
        self.auto = auto
        negated = [f"--no-{s[2:]}" for s in option_strings if s.startswith("--")]
        words = "true,false,auto" if auto else "true,false"
        super().__init__([*option_strings, *negated], dest, nargs="?", metavar=f"{{{words}}}", **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if option_string and option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value")
            setattr(namespace, self.dest, False)
            return
        setattr(namespace, self.dest, self._parse(parser, option_string, values))

    def _parse(self, parser: argparse.ArgumentParser, option: str | None, value: str | None) -> bool | None:
        word = "true" if value is None else value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        if word == "auto" and self.auto:
            return None
        parser.error(f"argument {option}: use {self.metavar.strip('{}').replace(',', ', ')}, not {value!r}")

    def format_usage(self) -> str:
        return self.option_strings[0]


class Items(argparse.Action):
    """A list setting: comma-separated, repeatable; the items of every use add up."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        given = [part.strip() for part in str(values).split(",") if part.strip()]
        if not given:  # e.g. --api-key "$KEY" with KEY unset: never read as "no keys, no authentication"
            parser.error(f"argument {option_string}: empty value (leave the option out for the default)")
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), *given])


class Pairs(argparse.Action):
    """``KEY=PATH``, repeatable, into one mapping."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        key, sep, value = str(values).partition("=")
        if not sep or not key or not value:
            parser.error(f"argument {option_string}: expected KEY=PATH, got {values!r}")
        pairs = dict(getattr(namespace, self.dest, None) or {})
        pairs[key] = value
        setattr(namespace, self.dest, pairs)
