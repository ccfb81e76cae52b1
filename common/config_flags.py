"""Command-line flags from a config dataclass, so that ``--help`` cannot drift from the code.

A config dataclass documents each field with a docstring right under it (the convention of
``trainer/config.py``). ``add_dataclass_flags`` gives each chosen field a flag whose help text is that
docstring and whose shown default is the field's default:

    add_dataclass_flags(parser, ToyTeacherConfig, ["steps", "lr"], overrides=True,
                        variants={"--preset cpu": ToyTeacherConfig.preset("cpu")})
    # --steps STEPS   Transformer training steps. (default: 12000; --preset cpu: 100000)
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import textwrap
import typing
from collections.abc import Callable, Iterable, Mapping
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


def _parser_for(hint: Any, name: str) -> Callable[[str], Any]:
    if hint in (int, float, str):
        return hint
    if typing.get_origin(hint) is tuple and typing.get_args(hint)[0] in (int, float, str):
        return _comma_list(typing.get_args(hint)[0])
    raise TypeError(f"{name}: no command-line parser for the type {hint!r}")


def add_dataclass_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                        names: Iterable[str] | None = None, *, flags: Mapping[str, str] | None = None,
                        overrides: bool = False,
                        variants: Mapping[str, Any] | None = None) -> dict[str, argparse.Action]:
    """Add a flag for each field in ``names`` (default: every field) of dataclass ``cls`` to ``parser``.

    The flag is ``--field-name`` unless ``flags`` names another; its value is stored under the field's
    name. Help = the field's docstring + ``(default: …)`` (no default shown for an empty string); a
    field without a docstring is an error. ``overrides``: flags not given stay out of the parsed
    namespace (they override values that come from elsewhere, e.g. a preset), so the field default
    is shown but not set. ``variants`` ``{label: instance}`` adds ``; label: value`` to the help where
    an instance's value differs from the default. Field metadata ``choices`` limits the values.
    ``bool`` fields become switches (``--x``; ``--x/--no-x`` when the default is true); ``tuple``
    fields take comma-separated values. Returns ``{field: argparse action}``.
    """
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    actions = {}
    for name in names if names is not None else fields:
        f, flag = fields[name], (flags or {}).get(name, "--" + name.replace("_", "-"))
        if name not in docs:
            raise ValueError(f"{cls.__name__}.{name} has no docstring to use as the help of {flag}")
        default = field_default(f)
        text = docs[name].replace("``", "").replace("%", "%%")  # argparse %-formats help texts
        if default is not dataclasses.MISSING and default != "":
            notes = [format_value(default)] + [f"{label}: {format_value(getattr(v, name))}"
                                               for label, v in (variants or {}).items()
                                               if getattr(v, name) != default]
            text += f" (default: {'; '.join(notes)})"
        kwargs: dict[str, Any] = {"dest": name, "help": text}
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = argparse.SUPPRESS if overrides else default
        if hints[name] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default is True else "store_true"
        else:
            kwargs["type"] = _parser_for(hints[name], name)
            if typing.get_origin(hints[name]) is tuple:
                kwargs["metavar"] = f"{typing.get_args(hints[name])[0].__name__.upper()},..."
            if "choices" in f.metadata:
                kwargs["choices"] = f.metadata["choices"]
        actions[name] = parser.add_argument(flag, **kwargs)
    return actions
