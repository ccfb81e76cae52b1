"""Command-line flags built from a config dataclass: help from the field docstrings, defaults from the fields."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from twostep.common.config_flags import (
    FieldError,
    add_dataclass_flags,
    config_from_args,
    field_docs,
    flag_errors,
)


@dataclass
class _Base:
    size: int = 3
    """Side in pixels (50% of the usual)."""


@dataclass
class _Config(_Base):
    out: str = ""
    """Output folder; empty = none."""
    widths: tuple[int, ...] = (16, 32)
    """Block widths."""
    rate: float = 0.5
    """Learning rate."""
    mode: str = field(default="a", metadata={"choices": ("a", "b")})
    """Which mode."""
    fast: bool = False
    """Go fast."""
    undocumented: int = 1


def test_field_docs_reads_the_string_under_each_field_including_bases():
    docs = field_docs(_Config)
    assert docs["size"] == "Side in pixels (50% of the usual)." and docs["widths"] == "Block widths."
    assert "undocumented" not in docs


def test_flags_take_help_default_and_type_from_the_fields():
    ap = argparse.ArgumentParser()
    actions = add_dataclass_flags(ap, _Config, ["size", "out", "widths", "rate", "mode", "fast"],
                                  flags={"rate": "--lr"}, variants={"small": _Config(size=1)})
    text = " ".join(ap.format_help().split())
    assert "Side in pixels (50% of the usual). (default: 3; small: 1)" in text
    assert "Block widths. (default: 16,32)" in text and "--lr RATE Learning rate. (default: 0.5)" in text
    assert "Output folder; empty = none." in text and "(default: )" not in text
    args = ap.parse_args([])
    assert (args.size, args.out, args.widths, args.rate, args.mode, args.fast) == (3, "", (16, 32), 0.5, "a", False)
    args = ap.parse_args(["--widths", "8,8,4", "--lr", "1e-3", "--mode", "b", "--fast"])
    assert (args.widths, args.rate, args.mode, args.fast) == ((8, 8, 4), 1e-3, "b", True)
    assert actions["rate"].option_strings == ["--lr"]
    with pytest.raises(SystemExit):
        ap.parse_args(["--mode", "c"])
    with pytest.raises(SystemExit):
        ap.parse_args(["--widths", "8,x"])


def test_override_flags_stay_out_of_the_namespace_unless_given():
    ap = argparse.ArgumentParser()
    add_dataclass_flags(ap, _Config, ["size", "rate"], overrides=True)
    assert vars(ap.parse_args([])) == {}
    assert vars(ap.parse_args(["--rate", "2"])) == {"rate": 2.0}
    assert "(default: 0.5)" in ap.format_help()


def test_a_field_without_a_docstring_or_default_is_handled():
    with pytest.raises(ValueError, match="undocumented"):
        add_dataclass_flags(argparse.ArgumentParser(), _Config, ["undocumented"])

    @dataclass
    class Needs:
        out: str
        """Where to write."""

    ap = argparse.ArgumentParser()
    add_dataclass_flags(ap, Needs)
    assert "(default" not in ap.format_help()
    with pytest.raises(SystemExit):
        ap.parse_args([])
    assert ap.parse_args(["--out", "x"]).out == "x"


def _size(text: str) -> tuple[int, int]:
    h, _, w = text.partition("x")
    return int(h), int(w or h)


@dataclass
class _Command:
    data: str
    """Input folder."""
    size: tuple[int, int] | None = field(default=None, metadata={"parse": _size, "metavar": "H[xW]"})
    """Image size; default: the input's."""
    device: str | None = None
    """Torch device; default: cuda if available."""
    count: int = 5
    """How many."""
    prompt: list[str] = field(default_factory=list, metadata={"metavar": "TEXT"})
    """A prompt; repeat the flag for several."""
    overrides: list[str] = field(default_factory=list)
    """Config overrides."""

    def __post_init__(self):
        if self.count < 1:
            raise FieldError("count", f"must be ≥ 1 (or give {{data}} less), not {self.count}")


def test_optional_list_positional_and_custom_parser_fields():
    ap = argparse.ArgumentParser()
    add_dataclass_flags(ap, _Command, flags={"count": ("-n", "--count"), "overrides": "KEY=VALUE"})
    text = " ".join(ap.format_help().split())
    assert "--size H[xW] Image size; default: the input's." in text and "(default: None)" not in text
    assert "--prompt TEXT A prompt; repeat the flag for several." in text and "(default: [])" not in text
    assert "-n COUNT, --count COUNT How many. (default: 5)" in text and "KEY=VALUE Config overrides." in text
    args = ap.parse_args(["--data", "d"])
    assert (args.size, args.device, args.count, args.prompt, args.overrides) == (None, None, 5, [], [])
    args = ap.parse_args(["--data", "d", "--size", "32x48", "-n", "2", "--prompt", "a", "--prompt", "b", "x=1", "y=2"])
    assert (args.size, args.count, args.prompt, args.overrides) == ((32, 48), 2, ["a", "b"], ["x=1", "y=2"])
    assert ap.parse_args(["--data", "d", "--size", "16"]).size == (16, 16)


def test_field_errors_name_the_field_and_on_the_command_line_the_flag():
    with pytest.raises(FieldError, match=r"^count must be ≥ 1 \(or give data less\), not 0$") as e:
        _Command("d", count=0)
    assert e.value.field == "count" and isinstance(e.value, ValueError)
    flags = {"count": ("-n", "--count")}
    ap = argparse.ArgumentParser()
    add_dataclass_flags(ap, _Command, flags=flags)
    with pytest.raises(FieldError, match=r"^--count must be ≥ 1 \(or give --data less\), not 0$"):
        config_from_args(_Command, ap.parse_args(["--data", "d", "-n", "0"]), flags)
    cfg = config_from_args(_Command, ap.parse_args(["--data", "d"]), flags, count=3)
    assert (cfg.data, cfg.count) == ("d", 3)
    with pytest.raises(FieldError, match="^--count must"), flag_errors(flags):
        _Command("d", count=-1)


def test_a_positional_list_without_a_default_needs_one_value():
    @dataclass(kw_only=True)
    class Build:
        inputs: list[str]
        """Input files."""
        names: list[str] = field(default_factory=list)
        """Names."""

    ap = argparse.ArgumentParser()
    add_dataclass_flags(ap, Build, flags={"inputs": "INPUT", "names": "NAME"})
    with pytest.raises(SystemExit):
        ap.parse_args([])
    assert ap.parse_args(["a", "b"]).inputs == ["a", "b"]


COMMAND_FLAGS = {
    "eval": ["--student", "--teacher", "--prompts", "--manifest", "-n", "--num-samples", "--seed", "--size",
             "--batch-size", "--device", "--features", "--clip-model", "--clip-pretrained", "--dino-model",
             "--diversity-prompts", "--diversity-seeds", "--references", "--cache", "--out"],
    "sample": ["--student", "--prompt", "--prompts-file", "--seed", "--height", "--width", "-o", "--out",
               "--batch-size", "--device", "--dtype"],
    "probe-disc": ["--config", "--data", "--out", "--steps", "--every", "--heldout-fraction", "KEY=VALUE"],
    "demo": ["--out", "--prompts", "--steps", "--eval-samples", "--num-workers", "--teacher", "--seed"],
}


@pytest.mark.parametrize("command", sorted(COMMAND_FLAGS))
def test_commands_built_from_configs_keep_every_flag_with_its_help(command):
    from twostep.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    helps = {s: a.help for a in parser._actions for s in (a.option_strings or [a.metavar])}
    for flag in COMMAND_FLAGS[command]:
        assert flag in helps and len(helps[flag]) > 10, (command, flag)
