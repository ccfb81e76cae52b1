"""``twostep prompts …``: build, inspect and split prompt manifests."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, fields
from typing import Any

from twostep.common.config_flags import FieldError, add_dataclass_flags, at_least, config_from_args
from twostep.toy.world import OMIT_PROB

from .build import BuildOptions, build_manifest
from .manifest import check_manifest
from .report import format_report, inspect_manifest
from .split import split_manifest


@dataclass(kw_only=True)
class BuildConfig(BuildOptions):
    """``twostep prompts build``: the build options (recorded in the manifest's footer), plus its files."""

    inputs: list[str] = field(metadata={"metavar": "INPUT"})
    """.txt (one prompt a line), .csv, .tsv, .jsonl (each optionally .gz), .parquet, a local Hugging
    Face dataset directory, a hub dataset (hf:NAME or owner/name), or bundled:general (the prompt set
    shipped with twostep)."""
    output: str = field(metadata={"metavar": "MANIFEST.parquet"})
    """Manifest to write."""
    json: bool = False
    """Print the summary as JSON."""

    def options(self) -> BuildOptions:
        """The build options alone (what the footer records)."""
        return BuildOptions(**{f.name: getattr(self, f.name) for f in fields(BuildOptions)})


@dataclass(kw_only=True)
class InspectConfig:
    """``twostep prompts inspect``."""

    manifest: str
    """Manifest parquet to inspect."""
    json: bool = False
    """Print the report as JSON."""


@dataclass(kw_only=True)
class SplitConfig:
    """``twostep prompts split``."""

    manifest: str
    """Manifest parquet to split."""
    eval_fraction: float = field(metadata={"metavar": "F"})
    """Expected fraction of prompts in the eval split, in (0, 1)."""
    salt: str = ""
    """Changes which prompts go to eval (default: none)."""
    out_dir: str | None = None
    """Folder for the two files (default: beside MANIFEST)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.eval_fraction < 1.0:
            raise FieldError("eval_fraction", f"must be in (0, 1), not {self.eval_fraction}")


@dataclass(kw_only=True)
class ToyConfig:
    """``twostep prompts toy``."""

    num_prompts: int
    """Rows to write."""
    output: str = field(metadata={"metavar": "MANIFEST.parquet"})
    """Manifest to write."""
    seed: int = 0
    """Seed of the captions and row seeds."""
    size: int = 64
    """Image side recorded as height and width."""
    omit_prob: float = OMIT_PROB
    """Probability that a caption leaves each attribute out."""

    def __post_init__(self) -> None:
        at_least(self, 1, "num_prompts")


FLAGS = {
    "build": {"inputs": "INPUT", "output": ("-o", "--output")},
    "inspect": {"manifest": "MANIFEST"},
    "split": {"manifest": "MANIFEST", "out_dir": ("-o", "--out-dir")},
    "toy": {"num_prompts": ("-n", "--num-prompts"), "output": ("-o", "--output")},
}
"""Positional arguments and short aliases of each subcommand's fields (the rest are ``--field-name``)."""
CONFIGS = {"build": BuildConfig, "inspect": InspectConfig, "split": SplitConfig, "toy": ToyConfig}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prompts", help="build, inspect and split prompt manifests",
                       description="Prompt manifests: the list of (prompt_id, prompt, seed, …) rows that "
                                   "teacher generation turns into shards.")
    ps = p.add_subparsers(dest="prompts_cmd", required=True, metavar="{build,inspect,split,toy}",
                          help="what to do with manifests")

    b = ps.add_parser("build", help="build a manifest from prompt files or datasets",
                      description="Read prompts from files or datasets, normalise (NFC, whitespace, control "
                                  "characters), drop duplicates, assign stable ids and seeds, and write a "
                                  "manifest parquet whose content hash is printed and stored in its footer. "
                                  "Rejected rows go, with reasons, to <manifest>.rejects.jsonl.")
    add_dataclass_flags(b, BuildConfig, ["inputs", "output", "text_column", "seed", "per_prompt", "max_chars",
                                         "case_insensitive", "on_invalid", "hf_split", "height", "width", "json"],
                        flags=FLAGS["build"])
    b.set_defaults(func=_build)

    i = ps.add_parser("inspect", help="counts, length histogram, duplicates, rejects and hash of a manifest",
                      description="Show what a manifest holds and check its stored hash against its rows.")
    add_dataclass_flags(i, InspectConfig, flags=FLAGS["inspect"])
    i.set_defaults(func=_inspect)

    s = ps.add_parser("split", help="deterministic train/eval split by prompt_id",
                      description="Split a manifest into <stem>.train.parquet and <stem>.eval.parquet by a "
                                  "hash of each prompt_id (all variants of a prompt stay together).")
    add_dataclass_flags(s, SplitConfig, flags=FLAGS["split"])
    s.set_defaults(func=_split)

    t = ps.add_parser("toy", help="write a manifest of toy-world (shapes) captions",
                      description="Sample captions of the procedural shapes world (each attribute left out "
                                  "with probability --omit-prob) into a manifest; the attributes a caption "
                                  "names are kept as columns (shape, colour, size, position, background).")
    add_dataclass_flags(t, ToyConfig, flags=FLAGS["toy"])
    t.set_defaults(func=_toy)


def _config(args: argparse.Namespace) -> Any:
    """The subcommand's config from its flags; a bad value's error names the flag."""
    return config_from_args(CONFIGS[args.prompts_cmd], args, FLAGS[args.prompts_cmd])


def _toy(args: argparse.Namespace) -> int:
    from twostep.toy.world import build_toy_manifest

    cfg = _config(args)
    s = build_toy_manifest(cfg.num_prompts, cfg.output, seed=cfg.seed, height=cfg.size, width=cfg.size,
                           omit_prob=cfg.omit_prob)
    print(f"wrote {s.manifest}: {s.rows} toy prompts")
    print(f"manifest hash: {s.manifest_hash}")
    return 0


def _build(args: argparse.Namespace) -> int:
    cfg = _config(args)
    opts = cfg.options()
    s = build_manifest(cfg.inputs, cfg.output, opts)  # ManifestError, InputError: twostep.cli prints them
    if cfg.json:
        print(json.dumps(s.__dict__, indent=2))
        return 0
    print(f"wrote {s.manifest}: {s.rows} rows ({s.prompts} prompts × {opts.per_prompt}) "
          f"from {s.rows_read} rows read in {s.seconds:.1f}s")
    print(f"duplicates dropped: {s.duplicates}; rows rejected: {s.rejected}"
          + (f" (see {s.rejects_file})" if s.rejects_file else ""))
    print(f"manifest hash: {s.manifest_hash}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    cfg = _config(args)
    check_manifest(cfg.manifest)
    info = inspect_manifest(cfg.manifest)
    print(json.dumps(info, indent=2) if cfg.json else format_report(info))
    return 0 if info["hash_ok"] else 1


def _split(args: argparse.Namespace) -> int:
    cfg = _config(args)
    check_manifest(cfg.manifest)
    s = split_manifest(cfg.manifest, cfg.eval_fraction, cfg.out_dir, cfg.salt)
    print(f"train: {s.train} ({s.train_rows} rows, hash {s.train_hash})")
    print(f"eval:  {s.eval} ({s.eval_rows} rows, hash {s.eval_hash})")
    return 0
