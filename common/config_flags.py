"""Command-line flags from a config dataclass, so that ``--help`` cannot drift from the code.

A config dataclass documents each field with a docstring right under it (the convention of
``trainer/config.py``). ``add_dataclass_flags`` gives each chosen field a flag whose help text is that
docstring and whose shown default is the field's default:

    add_dataclass_flags(parser, ToyTeacherConfig, ["steps", "lr"], overrides=True,
                        variants={"--preset cpu": ToyTeacherConfig.preset("cpu")})
    # --steps STEPS   Transformer training steps. (default: 12000; --preset cpu: 100000)

A config's own checks raise :class:`FieldError`, which names the field; ``config_from_args`` and
``flag_errors`` put the flag in its place when the values came from the command line.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import re
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` for the fields of dataclass ``cls`` (and of its dataclass bases) that have
    a string literal right under them, read from the class source with ``ast``."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in itertools.pairwise(body):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def field_default(f: dataclasses.Field) -> Any:
    """The field's default (a ``default_factory`` is called), or ``dataclasses.MISSING``."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def format_value(value: Any) -> str:
    """A value as it is typed on the command line: sequences comma-separated."""
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def _comma_list(item: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        return tuple(item(v) for v in text.split(","))

    parse.__name__ = f"comma-separated {item.__name__}s"  # argparse names it in "invalid ... value" errors
    return parse


def _optional(hint: Any) -> Any:
    """``T`` for ``T | None`` (or ``Optional[T]``), else ``None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return args[0]
    return None


def _parser_for(hint: Any, name: str) -> Callable[[str], Any]:
    if hint in (int, float, str):
        return hint
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[0] in (int, float, str):
        return _comma_list(typing.get_args(hint)[0])
    raise TypeError(f"{name}: no command-line parser for the type {hint!r}")


def option_strings(name: str, flags: Mapping[str, str | Sequence[str]] | None = None) -> tuple[str, ...]:
    """The option strings of field ``name``: ``flags[name]`` (one string or several), else ``--name-with-dashes``."""
    given = (flags or {}).get(name, "--" + name.replace("_", "-"))
    return (given,) if isinstance(given, str) else tuple(given)


def flag_name(name: str, flags: Mapping[str, str | Sequence[str]] | None = None) -> str:
    """The flag that messages use for field ``name``: its first ``--long`` option string (or its only one)."""
    strings = option_strings(name, flags)
    return next((s for s in strings if s.startswith("--")), strings[0])


def add_dataclass_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                        names: Iterable[str] | None = None, *,
                        flags: Mapping[str, str | Sequence[str]] | None = None,
                        overrides: bool = False,
                        variants: Mapping[str, Any] | None = None) -> dict[str, argparse.Action]:
    """Add a flag for each field in ``names`` (default: every field) of dataclass ``cls`` to ``parser``.

    The flag is ``--field-name`` unless ``flags`` names another (or several: ``("-n", "--num-samples")``;
    a name without a leading ``-`` makes a positional argument); its value is stored under the field's
    name. Help = the field's docstring + ``(default: …)`` (none shown for "", None or []); a
    field without a docstring is an error. ``overrides``: flags not given stay out of the parsed
    namespace (they override values that come from elsewhere, e.g. a preset), so the field default
    is shown but not set. ``variants`` ``{label: instance}`` adds ``; label: value`` to the help where
    an instance's value differs from the default. Field metadata ``choices`` limits the values.
    ``bool`` fields become switches (``--x``; ``--x/--no-x`` when the default is true); ``tuple``
    fields take comma-separated values; ``list`` fields repeat the flag (a positional one takes any
    number of values, at least one when it has no default); ``T | None`` fields parse as ``T``, and a default of None is not shown. Field
    metadata ``parse`` (a function of the flag's text) replaces the parser of the type, ``metavar``
    names the value in the help. Returns ``{field: argparse action}``.
    """
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    actions = {}
    for name in names if names is not None else fields:
        f, strings = fields[name], option_strings(name, flags)
        flag = flag_name(name, flags)
        if name not in docs:
            raise ValueError(f"{cls.__name__}.{name} has no docstring to use as the help of {flag}")
        default = field_default(f)
        text = docs[name].replace("``", "").replace("%", "%%")  # argparse %-formats help texts
        if default is not dataclasses.MISSING and default not in ("", None, []):
            notes = [format_value(default)] + [f"{label}: {format_value(getattr(v, name))}"
                                               for label, v in (variants or {}).items()
                                               if getattr(v, name) != default]
            text += f" (default: {'; '.join(notes)})"
        positional = not strings[0].startswith("-")
        kwargs: dict[str, Any] = {"help": text} if positional else {"dest": name, "help": text}
        if default is dataclasses.MISSING:
            if not positional:
                kwargs["required"] = True
        else:
            kwargs["default"] = argparse.SUPPRESS if overrides else default
        hint = _optional(hints[name]) or hints[name]
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default is True else "store_true"
        else:
            if typing.get_origin(hint) is list:
                item = typing.get_args(hint)[0]
                if positional:  # without a default, one or more
                    kwargs["nargs"] = "+" if default is dataclasses.MISSING else "*"
                else:
                    kwargs["action"] = "append"
                hint = item
            kwargs["type"] = f.metadata.get("parse") or _parser_for(hint, name)
            if typing.get_origin(hint) is tuple and "parse" not in f.metadata:
                kwargs["metavar"] = f"{typing.get_args(hint)[0].__name__.upper()},..."
            if "metavar" in f.metadata:
                kwargs["metavar"] = f.metadata["metavar"]
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        if positional:
            kwargs.setdefault("metavar", strings[0])
            actions[name] = parser.add_argument(name, **kwargs)
        else:
            actions[name] = parser.add_argument(*strings, **kwargs)
    return actions


class FieldError(ValueError):
    """A bad value of config field ``field``; the message is ``<field> <reason>``.

    ``reason`` may name other fields as ``{name}``; ``str()`` spells every name as the field
    (``references must be ≥ 1, not 0``) until ``flag_errors`` respells it as the flag
    (``--references must be ≥ 1, not 0``)."""

    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason
        super().__init__(self.spelled(lambda name: name))

    def spelled(self, spell: Callable[[str], str]) -> str:
        """The message with each field name spelled by ``spell``."""
        return f"{spell(self.field)} " + re.sub(r"\{(\w+)\}", lambda m: spell(m.group(1)), self.reason)


def at_least(cfg: Any, least: int | float, *names: str, strict: bool = False) -> None:
    """A :class:`FieldError` for the first of ``names`` whose value in ``cfg`` is below ``least`` (with
    ``strict``: not above it): ``<field> must be ≥ 1, not 0``. None values (unset optionals) pass."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and (value <= least if strict else value < least):
            raise FieldError(name, f"must be {'>' if strict else '≥'} {least:g}, not {value}")


@contextmanager
def flag_errors(flags: Mapping[str, str | Sequence[str]] | None = None) -> Iterator[None]:
    """Within the block, a :class:`FieldError` names flags (as ``add_dataclass_flags`` makes them from
    ``flags``) in place of fields; the error and its traceback are otherwise the same."""
    try:
        yield
    except FieldError as e:
        e.args = (e.spelled(lambda name: flag_name(name, flags)),)
        raise


def config_from_args(cls: type, args: argparse.Namespace,
                     flags: Mapping[str, str | Sequence[str]] | None = None, **values: Any) -> Any:
    """``cls`` built from the fields that ``args`` holds (and ``values``, which win); a
    :class:`FieldError` from its checks names the flag (``flag_errors``)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    with flag_errors(flags):
        return cls(**{**given, **values})
