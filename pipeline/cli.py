"""``twostep generate`` and ``twostep verify``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass

from twostep.common.config_flags import add_dataclass_flags, config_from_args

from .config import DEFAULT_SAMPLE, GENERATE_FLAGS, GenerateConfig, VerifyConfig
from .layout import INDEX, SHARDS


def add_parsers(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="teacher generation: manifest → WebDataset shard store (Ray job)",
                       description="Generate teacher samples for every manifest row into a shard store, on a "
                                   "local or existing Ray cluster. Idempotent and resumable: rerunning the same "
                                   "command does only the shards not committed yet.")
    add_dataclass_flags(g, GenerateCommand, GENERATE_COMMAND)
    g.set_defaults(func=_generate)

    v = sub.add_parser("verify", help="check a shard store; optionally regenerate samples and compare",
                       description=f"Check a store against {INDEX} and its manifest, and report what is "
                                   f"missing or corrupt, each problem named by shard. Always: one listing of "
                                   f"{SHARDS}/ (every shard present with its recorded size and commit marker, "
                                   f"samples + failures = its rows). By default also reads {DEFAULT_SAMPLE} random shards "
                                   "in full (every shard of a smaller store): sha256, the shard parser, keys "
                                   "= manifest rows. --fast reads no shard; --full reads them all.")
    reads = ["fast", "full"]
    add_dataclass_flags(v, VerifyConfig, ["store"], flags=VERIFY_FLAGS)
    add_dataclass_flags(v.add_mutually_exclusive_group(), VerifyConfig, reads)
    add_dataclass_flags(v, VerifyConfig, [f.name for f in dataclasses.fields(VerifyConfig)
                                          if f.name not in (*reads, "store")])
    v.set_defaults(func=_verify)


@dataclass(kw_only=True)
class GenerateCommand(GenerateConfig):
    """``twostep generate``'s flags: the job's settings, and what the command does with them."""

    dry_run: bool = False
    """Check the flags and print the resolved settings as JSON, then exit; reads no file, starts no Ray."""


GENERATE_COMMAND = (*GENERATE_FLAGS, "dry_run")
VERIFY_FLAGS = {"store": "STORE"}
"""``twostep verify STORE``: the store is a positional argument."""


def _named(flag: str, check, *args) -> None:
    """Run ``check(*args)``; its error message (which starts with the path) gets the flag in front."""
    from twostep.common.errors import reworded

    try:
        check(*args)
    except (OSError, ValueError) as e:
        raise reworded(e, f"{flag} {e}") from None


def _local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _check_generate(args: GenerateConfig) -> None:
    """What can be checked on this machine before Ray starts or the store is touched."""
    from twostep.prompts.manifest import check_manifest
    from twostep.teacher.core import check_teacher_spec

    if "://" not in args.manifest:  # a URL is fetched (and its errors named) by the job
        _named("--manifest", check_manifest, args.manifest)
    check_teacher_spec(args.teacher, "--teacher")
    out = args.out.removeprefix("file://")
    if _local(args.out) and os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out {args.out}: a file, not a store folder")


def _generate(args: argparse.Namespace) -> int:
    from .job import run_generation

    # Bad values (ValueError) and a store that cannot be used (StoreError): twostep.cli prints them.
    command = config_from_args(GenerateCommand, args)
    cfg = GenerateConfig(**{f.name: getattr(command, f.name) for f in dataclasses.fields(GenerateConfig)})
    if command.dry_run:
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        return 0
    _check_generate(cfg)
    index = run_generation(cfg)
    print(f"{index['status']}: {index['samples']} samples in {index['committed_shards']}/{index['num_shards']} shards, "
          f"{index['failed_samples']} failed samples, {index['seconds']:.0f}s; store: {cfg.out}")
    return 0 if index["status"] == "complete" else 1


def _check_index_readable(url: str, storage_options: dict | None) -> None:
    """A folder (or bucket prefix) holding a readable index.json, or an error that names it."""
    from .store import Store

    path = url.removeprefix("file://")
    if _local(url) and not os.path.isdir(path):
        raise (NotADirectoryError(f"store {url}: a file, not a store folder") if os.path.exists(path)
               else FileNotFoundError(f"store {url}: no such folder"))
    store = Store(url, storage_options)
    if not store.exists(INDEX):
        raise FileNotFoundError(f"store {url}: not a twostep store (no {INDEX}; a generation job that "
                                "never got going leaves none)")
    try:
        store.read_index()
    except ValueError as e:
        raise ValueError(f"store {url}: {INDEX} is not JSON ({e})") from None


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify

    cfg = config_from_args(VerifyConfig, args, VERIFY_FLAGS)
    _check_index_readable(cfg.store, cfg.storage_options or None)
    report = verify(cfg, progress=not cfg.json)
    if cfg.json:
        print(json.dumps(report, indent=1))
        return 0 if report["ok"] else 1
    if "mode" not in report:  # no index or no manifest: nothing was checked
        print("PROBLEMS: the store cannot be checked")
    else:
        read = f"read {report['checked']} of {report['checked_of']} shards"
        if report["mode"] == "fast":
            read += " (fast check: the listing only)"
        else:
            read += " in full"
            if report["mode"] == "sample" and report["checked"] < report["checked_of"]:
                read += f" (random, --seed {report['seed']})"
        print(f"{'OK' if report['ok'] else 'PROBLEMS'}: {report['shards']} shards, {report['samples']} samples; "
              + read)
    for p in report["problems"]:
        print("  " + p)
    if "regenerate" in report:
        r = report["regenerate"]
        print(f"  regenerated {len(r['samples'])} samples: "
              + ("identical latents" if r["identical"] else f"max |difference| {r['max_abs_diff']:.3g}")
              + ("" if r["same_software"] else " (recorded with other software versions)")
              + ("" if r["sampler_hash_matches"] else "; SAMPLER SETTINGS DIFFER"))
    return 0 if report["ok"] else 1
