"""``twostep generate`` and ``twostep verify``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os


def _json_arg(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


DEFAULT_SAMPLE = 32  # pipeline.verify.DEFAULT_SAMPLE, without importing it for --help (a test keeps them equal)


def _sample_arg(text: str) -> int | str:
    if text.strip().lower() == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of shards or 'all'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected at least 1 shard (--fast reads none)")
    return value


def add_parsers(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="teacher generation: manifest → WebDataset shard store (Ray job)",
                       description="Generate teacher samples for every manifest row into a shard store, on a "
                                   "local or existing Ray cluster. Idempotent and resumable: rerunning the same "
                                   "command does only the shards not committed yet.")
    g.add_argument("--manifest", required=True,
                   help="manifest parquet (twostep prompts build/toy): a local path or a URL (s3://…, gs://…, "
                        "https://…); the job copies it into the store")
    g.add_argument("--out", required=True, metavar="STORE",
                   help="store URL: a local folder, s3://bucket/prefix, gs://…")
    g.add_argument("--teacher", default="toy", help="toy, a local ZImagePipeline folder, or a hub id[@revision]")
    g.add_argument("--shard-size", type=int, default=256, help="manifest rows per shard (default: 256)")
    g.add_argument("--batch-size", type=int, default=16, help="samples per teacher call (default: 16)")
    g.add_argument("--num-workers", type=int, default=1, help="worker actors, each holding one teacher (default: 1)")
    g.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs per worker; 0 = CPU workers that split the cluster's CPUs (default: 0)")
    g.add_argument("--image-format", choices=("webp", "jpg", "png", "none"), default="webp",
                   help="image member per sample; none keeps latents only (default: webp, lossless)")
    g.add_argument("--save", default="mid", help="extra arrays per sample, comma-separated: mid, noise "
                   "(default: mid; '' for none)")
    g.add_argument("--encode-threads", type=int, default=0,
                   help="threads per worker that encode finished samples (image, arrays) while its teacher "
                        "generates; 0 = the CPUs the worker may run on, at most 8 (default: 0). On GPU nodes, "
                        "about the CPUs per GPU")
    g.add_argument("--ray-address", default=None,
                   help="existing Ray cluster (default: RAY_ADDRESS, else start a local one)")
    g.add_argument("--max-shard-retries", type=int, default=2,
                   help="retries of a failing shard, each on another worker (default: 2)")
    g.add_argument("--shard-timeout", type=float, default=None, metavar="SECONDS",
                   help="a shard still running this long has its worker killed and replaced and is requeued "
                        "(default: 10x the median shard time so far, at least 60 s; 1800 s before the first "
                        "shard ends)")
    g.add_argument("--startup-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="time the workers have to load their teacher; those not up by then are left out and the "
                        "job runs with the others (default: 1800)")
    g.add_argument("--on-sample-error", choices=("skip", "fail"), default="skip",
                   help="skip: record a failing sample in failed.parquet and commit the rest of its shard; "
                        "fail: fail the shard (default: skip)")
    g.add_argument("--storage-options", type=_json_arg, default={},
                   help="fsspec storage options as JSON, e.g. '{\"endpoint_url\": \"http://…\"}'")
    g.add_argument("--num-steps", type=int, default=None, help="override the teacher's steps (default: 8)")
    g.add_argument("--guidance-scale", type=float, default=None, help="override guidance (default: 0)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a store made with another manifest, teacher or sampler")
    g.add_argument("--dry-run", action="store_true",
                   help="check the flags and print the resolved settings as JSON, then exit; reads no file, "
                        "starts no Ray")
    g.set_defaults(func=_generate)

    v = sub.add_parser("verify", help="check a shard store; optionally regenerate samples and compare",
                       description="Check a store against index.json and its manifest, and report what is "
                                   "missing or corrupt, each problem named by shard. Always: one listing of "
                                   "shards/ (every shard present with its recorded size and commit marker, "
                                   f"samples + failures = its rows). By default also reads {DEFAULT_SAMPLE} random shards "
                                   "in full (every shard of a smaller store): sha256, the shard parser, keys "
                                   "= manifest rows. --fast reads no shard; --full reads them all.")
    v.add_argument("store", metavar="STORE", help="store URL")
    reads = v.add_mutually_exclusive_group()
    reads.add_argument("--fast", action="store_true",
                       help="only the listing check: read no shard (a few requests whatever the store's size)")
    reads.add_argument("--full", action="store_true",
                       help="read every shard in full: sha256, format (the trainer's parser) and keys "
                            "(same as --sample all; with --sample N, N random shards)")
    v.add_argument("--sample", type=_sample_arg, default=None, metavar="N|all",
                   help=f"read N random shards in full (--seed picks them), or all of them "
                        f"(default: {DEFAULT_SAMPLE}, every shard of a smaller store)")
    v.add_argument("--threads", type=int, default=16, help="shards read at once (default: 16)")
    v.add_argument("--ray-address", default=None,
                   help="read the shards as Ray tasks on this cluster (default: RAY_ADDRESS, else threads)")
    v.add_argument("--regenerate", type=int, default=0, metavar="K",
                   help="regenerate K random samples with the recorded teacher and compare latents")
    v.add_argument("--seed", type=int, default=0,
                   help="which shards --sample reads and which samples --regenerate picks (default: 0)")
    v.add_argument("--device", default=None, help="device for --regenerate (default: cuda if available)")
    v.add_argument("--teacher", default=None, help="where the recorded teacher is on this machine, for "
                   "--regenerate (default: the recorded id: toy, a folder path or a hub id)")
    v.add_argument("--storage-options", type=_json_arg, default={}, help="fsspec storage options as JSON")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.set_defaults(func=_verify)


def _named(flag: str, check, *args) -> None:
    """Run ``check(*args)``; its error message (which starts with the path) gets the flag in front."""
    from twostep.cli import reworded

    try:
        check(*args)
    except (OSError, ValueError) as e:
        raise reworded(e, f"{flag} {e}") from None


def _local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _check_generate(args: argparse.Namespace) -> None:
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
    from .job import GenerateConfig, run_generation

    overrides = {k: v for k, v in (("num_steps", args.num_steps), ("guidance_scale", args.guidance_scale))
                 if v is not None}
    # Bad values (ValueError) and a store that cannot be used (StoreError): twostep.cli prints them.
    cfg = GenerateConfig(manifest=args.manifest, out=args.out, teacher=args.teacher, shard_size=args.shard_size,
                         batch_size=args.batch_size, num_workers=args.num_workers,
                         gpus_per_worker=args.gpus_per_worker, image_format=args.image_format,
                         save=tuple(s for s in args.save.split(",") if s), ray_address=args.ray_address,
                         max_shard_retries=args.max_shard_retries, on_sample_error=args.on_sample_error,
                         overwrite=args.overwrite, storage_options=args.storage_options,
                         sampler_overrides=overrides, encode_threads=args.encode_threads,
                         shard_timeout=args.shard_timeout, startup_timeout=args.startup_timeout)
    if args.dry_run:
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        return 0
    _check_generate(args)
    index = run_generation(cfg)
    print(f"{index['status']}: {index['samples']} samples in {index['committed_shards']}/{index['num_shards']} shards, "
          f"{index['failed_samples']} failed samples, {index['seconds']:.0f}s; store: {args.out}")
    return 0 if index["status"] == "complete" else 1


def _check_store(url: str, storage_options: dict | None) -> None:
    """A folder (or bucket prefix) holding a readable index.json, or an error that names it."""
    from .store import Store

    path = url.removeprefix("file://")
    if _local(url) and not os.path.isdir(path):
        raise (NotADirectoryError(f"store {url}: a file, not a store folder") if os.path.exists(path)
               else FileNotFoundError(f"store {url}: no such folder"))
    store = Store(url, storage_options)
    if not store.exists("index.json"):
        raise FileNotFoundError(f"store {url}: not a twostep store (no index.json; a generation job that "
                                "never got going leaves none)")
    try:
        json.loads(store.read_bytes("index.json"))
    except ValueError as e:
        raise ValueError(f"store {url}: index.json is not JSON ({e})") from None


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify_store

    if args.fast and args.sample is not None:
        raise ValueError(f"--fast reads no shard; --sample {args.sample} reads some: give one of them")
    for flag, value, least in (("--threads", args.threads, 1), ("--regenerate", args.regenerate, 0)):
        if value < least:
            raise ValueError(f"{flag} {value}: must be >= {least}")
    _check_store(args.store, args.storage_options or None)
    # --full --sample N reads N random shards; --full alone reads every shard
    report = verify_store(args.store, args.storage_options or None, args.regenerate, args.seed, args.device,
                          args.teacher, full=False if args.fast else True if args.full else None,
                          sample=args.sample, threads=args.threads, ray_address=args.ray_address,
                          progress=not args.json)
    if args.json:
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
