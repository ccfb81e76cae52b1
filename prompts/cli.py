"""``twostep prompts …``: build, inspect and split prompt manifests."""

from __future__ import annotations

import argparse
import json

from .build import BuildOptions, build_manifest
from .manifest import check_manifest
from .report import format_report, inspect_manifest
from .split import split_manifest


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
    b.add_argument("inputs", nargs="+", metavar="INPUT",
                   help=".txt (one prompt a line), .csv, .tsv, .jsonl (each optionally .gz), .parquet, a "
                        "local Hugging Face dataset directory, a hub dataset (hf:NAME or owner/name), or "
                        "bundled:general (the prompt set shipped with twostep)")
    b.add_argument("-o", "--output", required=True, metavar="MANIFEST.parquet", help="manifest to write")
    b.add_argument("--text-column", default=None,
                   help="column holding the prompt (default: the first of prompt, text, caption)")
    b.add_argument("--seed", type=int, default=0, help="global seed; row seeds derive from it and the "
                   "prompt_id (default: 0)")
    b.add_argument("--per-prompt", type=int, default=1, metavar="K",
                   help="samples per unique prompt; variants get ids <id>-<k> and their own seeds (default: 1)")
    b.add_argument("--max-chars", type=int, default=2000,
                   help="reject prompts longer than this after normalisation (default: 2000)")
    b.add_argument("--case-insensitive", action="store_true",
                   help="treat prompts differing only in letter case as duplicates")
    b.add_argument("--on-invalid", choices=("skip", "fail"), default="skip",
                   help="skip: write bad rows with reasons to the rejects file and go on (default); "
                        "fail: stop at the first bad row and write no manifest")
    b.add_argument("--hf-split", default="train", help="split to read from Hugging Face datasets "
                   "(default: train)")
    b.add_argument("--height", type=int, default=None,
                   help="height for rows that give none (multiple of 16; default: the teacher's)")
    b.add_argument("--width", type=int, default=None,
                   help="width for rows that give none (multiple of 16; default: the teacher's)")
    b.add_argument("--json", action="store_true", help="print the summary as JSON")
    b.set_defaults(func=_build)

    i = ps.add_parser("inspect", help="counts, length histogram, duplicates, rejects and hash of a manifest",
                      description="Show what a manifest holds and check its stored hash against its rows.")
    i.add_argument("manifest", metavar="MANIFEST", help="manifest parquet to inspect")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(func=_inspect)

    s = ps.add_parser("split", help="deterministic train/eval split by prompt_id",
                      description="Split a manifest into <stem>.train.parquet and <stem>.eval.parquet by a "
                                  "hash of each prompt_id (all variants of a prompt stay together).")
    s.add_argument("manifest", metavar="MANIFEST", help="manifest parquet to split")
    s.add_argument("--eval-fraction", type=float, required=True, metavar="F",
                   help="expected fraction of prompts in the eval split, in (0, 1)")
    s.add_argument("--salt", default="", help="changes which prompts go to eval (default: none)")
    s.add_argument("-o", "--out-dir", default=None, help="folder for the two files (default: beside MANIFEST)")
    s.set_defaults(func=_split)

    t = ps.add_parser("toy", help="write a manifest of toy-world (shapes) captions",
                      description="Sample captions of the procedural shapes world (each attribute left out "
                                  "with probability --omit-prob) into a manifest; the attributes a caption "
                                  "names are kept as columns (shape, colour, size, position, background).")
    t.add_argument("-n", "--num-prompts", type=int, required=True, help="rows to write")
    t.add_argument("-o", "--output", required=True, metavar="MANIFEST.parquet", help="manifest to write")
    t.add_argument("--seed", type=int, default=0, help="seed of the captions and row seeds (default: 0)")
    t.add_argument("--size", type=int, default=64, help="image side recorded as height and width (default: 64)")
    t.add_argument("--omit-prob", type=float, default=0.35,
                   help="probability that a caption leaves each attribute out (default: 0.35)")
    t.set_defaults(func=_toy)


def _toy(args: argparse.Namespace) -> int:
    from twostep.toy.world import build_toy_manifest

    s = build_toy_manifest(args.num_prompts, args.output, seed=args.seed, height=args.size, width=args.size,
                           omit_prob=args.omit_prob)
    print(f"wrote {s.manifest}: {s.rows} toy prompts")
    print(f"manifest hash: {s.manifest_hash}")
    return 0


def _build(args: argparse.Namespace) -> int:
    opts = BuildOptions(seed=args.seed, per_prompt=args.per_prompt, max_chars=args.max_chars,
                        case_insensitive=args.case_insensitive, on_invalid=args.on_invalid,
                        text_column=args.text_column, hf_split=args.hf_split,
                        height=args.height, width=args.width)
    s = build_manifest(args.inputs, args.output, opts)  # ManifestError, InputError: twostep.cli prints them
    if args.json:
        print(json.dumps(s.__dict__, indent=2))
        return 0
    print(f"wrote {s.manifest}: {s.rows} rows ({s.prompts} prompts × {opts.per_prompt}) "
          f"from {s.rows_read} rows read in {s.seconds:.1f}s")
    print(f"duplicates dropped: {s.duplicates}; rows rejected: {s.rejected}"
          + (f" (see {s.rejects_file})" if s.rejects_file else ""))
    print(f"manifest hash: {s.manifest_hash}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    check_manifest(args.manifest)
    info = inspect_manifest(args.manifest)
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0 if info["hash_ok"] else 1


def _split(args: argparse.Namespace) -> int:
    check_manifest(args.manifest)
    s = split_manifest(args.manifest, args.eval_fraction, args.out_dir, args.salt)
    print(f"train: {s.train} ({s.train_rows} rows, hash {s.train_hash})")
    print(f"eval:  {s.eval} ({s.eval_rows} rows, hash {s.eval_hash})")
    return 0
