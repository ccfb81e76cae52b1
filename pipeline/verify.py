"""``twostep verify``: check a store against its index and manifest, optionally regenerate samples.

Two modes (docs/generation.md, ``twostep verify``):

- **fast**: one listing of ``shards/`` plus ``index.json`` and the manifest's footer. Every shard of
  the plan must be in the index, its tar listed with the size the index records, its stats file
  listed, and its samples plus recorded failures must be the shard's row count. Reads no shard: a
  few requests whatever the store's size. It proves the store is complete as the index describes it
  and that no tar was truncated or replaced by one of another size; not that the bytes are right.
- **full**: the fast checks, then every shard's bytes (or ``sample`` random shards'): the sha256
  the index records, a good shard as :mod:`.shardformat` defines it (the trainer reads shards with
  the same parser, so a shard that passes here is one it reads), and exactly the keys of its
  manifest rows minus the failures its stats list. Shards are checked in parallel: threads in this
  process, or Ray tasks on a cluster when ``ray_address`` (or ``RAY_ADDRESS``) is set.

With ``regenerate=K``, K random samples are generated again with the recorded teacher and sampler
and their latents compared with the stored ones (stored as float16).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from .shardformat import SHARD_TAR, ShardFormatError, iter_samples
from .store import Store


def verify_store(url: str, storage_options: dict | None = None, regenerate: int = 0, seed: int = 0,
                 device: str | None = None, teacher: str | None = None, *, full: bool = True,
                 sample: int | None = None, threads: int = 16, ray_address: str | None = None,
                 progress: bool = False) -> dict[str, Any]:
    """Return a report: ok, problems, shards, samples, mode, checked (shards whose bytes were read),
    and regeneration differences. ``full=False`` is the fast mode; ``sample`` limits the full
    check to that many random shards (``seed`` picks them)."""
    store = Store(url, storage_options)
    index = store.read_json("index.json")
    if index is None:
        return {"ok": False, "problems": [f"{url}: no index.json (not a twostep store, or never finished)"]}
    n = index["identity"]["shard_size"]
    with store.fs.open(store.path("manifest.parquet"), "rb") as f:
        rows = pq.read_metadata(f).num_rows
    plan = math.ceil(rows / n)
    listed = {s["shard"]: s for s in index["shards"]}
    bad = _fast_checks(store, listed, plan, rows, n)
    problems = list(bad.values())
    report: dict[str, Any] = {"shards": len(listed), "samples": sum(s["samples"] for s in listed.values()),
                              "mode": "full" if full else "fast", "checked": 0}
    checked: dict[int, list[str]] = {}  # shard → its keys (samples are re-read for --regenerate)
    if full:
        shards = sorted(i for i in listed if i < plan and i not in bad)  # a bad size needs no sha256
        if sample is not None and sample < len(shards):
            shards = sorted(random.Random(seed).sample(shards, sample))
        with store.fs.open(store.path("manifest.parquet"), "rb") as f:
            ids = pq.read_table(f, columns=["prompt_id"]).column("prompt_id").to_pylist()
        jobs = [(i, listed[i], ids[i * n:(i + 1) * n]) for i in shards]
        for i, found, keys in _run_checks(store, jobs, threads, ray_address, progress):
            problems += found
            if keys is not None:
                checked[i] = keys
        report["checked"] = len(jobs)
    report.update(ok=not problems, problems=sorted(problems))
    if regenerate:
        if not checked:  # fast mode: read the keys of a few random shards
            picks = random.Random(seed).sample(sorted(listed), min(regenerate, len(listed)))
            checked = {i: [s.key for s in iter_samples(store.read_bytes(SHARD_TAR.format(i)))] for i in picks}
        report["regenerate"] = _regenerate(store, index, checked, regenerate, seed, device, teacher)
        report["ok"] = report["ok"] and report["regenerate"]["sampler_hash_matches"]
    return report


def _fast_checks(store: Store, listed: dict[int, dict], plan: int, rows: int, n: int) -> dict[int, str]:
    """Presence, sizes and sample counts from one listing of ``shards/`` plus the index: shard → problem."""
    listing = store.list_shards()
    problems = {}
    for i in range(plan):
        rel = SHARD_TAR.format(i)
        entry, sizes = listed.get(i), listing.get(i, {})
        if entry is None:
            problems[i] = f"{rel}: missing from index.json"
        elif "tar" not in sizes:
            problems[i] = f"{rel}: missing"
        elif sizes["tar"] != entry["bytes"]:
            problems[i] = f"{rel}: {sizes['tar']} bytes, index says {entry['bytes']}"
        elif "json" not in sizes:
            problems[i] = f"{rel}: its stats file (the commit marker) is missing"
        elif "failures" in entry and entry["samples"] + len(entry["failures"]) != min(n, rows - i * n):
            problems[i] = (f"{rel}: {entry['samples']} samples and {len(entry['failures'])} failures in "
                           f"index.json, the shard has {min(n, rows - i * n)} manifest rows")
    return problems


def check_shard(store_url: str, storage_options: dict | None, shard: int, entry: dict,
                manifest_keys: list[str]) -> tuple[int, list[str], list[str] | None]:
    """Read one shard and check its sha256, format and keys: (shard, problems, its keys or None)."""
    store = Store(store_url, storage_options)
    rel = SHARD_TAR.format(shard)
    try:
        data = store.read_bytes(rel)
    except FileNotFoundError:
        return shard, [f"{rel}: missing"], None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return shard, [f"{rel}: sha256 differs from index.json (corrupt or replaced)"], None
    try:
        keys = [s.key for s in iter_samples(data)]
    except ShardFormatError as e:
        return shard, [f"{rel}: {e}"], None
    failures = entry.get("failures")
    if failures is None:  # an index written before entries carried failures
        failures = (store.shard_stats(shard) or {}).get("failures", [])
    failed = {f["prompt_id"] for f in failures}
    want = [k for k in manifest_keys if k not in failed]
    problems = []
    if len(keys) != entry["samples"]:
        problems.append(f"{rel}: {len(keys)} samples, index says {entry['samples']}")
    if sorted(keys) != sorted(want):
        extra, lost = sorted(set(keys) - set(want)), sorted(set(want) - set(keys))
        problems.append(f"{rel}: keys differ from the manifest rows (extra {extra[:5]}, missing {lost[:5]})")
    return shard, problems, keys


def _run_checks(store: Store, jobs: list[tuple[int, dict, list[str]]], threads: int, ray_address: str | None,
                progress: bool):
    """Yield :func:`check_shard` results as they finish: Ray tasks on a cluster, else threads."""
    url, opts = store.url, store.storage_options
    bar = tqdm(total=len(jobs), desc="verify", unit="shard", disable=not progress)
    address = ray_address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            import ray

            if not ray.is_initialized():
                ray.init(address=address, log_to_driver=False)
            task = ray.remote(num_cpus=1)(check_shard)
            pending = [task.remote(url, opts, i, entry, keys) for i, entry, keys in jobs]
            while pending:
                done, pending = ray.wait(pending, num_returns=min(len(pending), 64), timeout=1.0)
                for result in ray.get(done):
                    bar.update(1)
                    yield result
            return
        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="verify") as pool:
            futures = [pool.submit(check_shard, url, opts, i, entry, keys) for i, entry, keys in jobs]
            for fut in as_completed(futures):
                bar.update(1)
                yield fut.result()
    finally:
        bar.close()


def _regenerate(store: Store, index: dict, checked: dict, k: int, seed: int, device: str | None,
                teacher_spec: str | None) -> dict[str, Any]:
    from .teacher import Teacher, noise_fingerprint

    facts = index["teacher"]
    s = facts["sampler"]
    spec = teacher_spec or (facts["teacher"] if facts["revision"] is None else f"{facts['teacher']}@{facts['revision']}")
    teacher = Teacher.load(spec, device=device, num_steps=s["num_steps"], guidance_scale=s["guidance_scale"],
                           mid_sigma=s["mid_sigma"], max_sequence_length=s["max_sequence_length"])
    pool = [(i, key) for i in sorted(checked) for key in sorted(checked[i])]
    picks = random.Random(seed).sample(pool, min(k, len(pool)))
    wanted = {i for i, _ in picks}
    samples = {(i, s.key): s for i in sorted(wanted)
               for s in iter_samples(store.read_bytes(SHARD_TAR.format(i)))}
    diffs = []
    for i, key in picks:
        sample = samples[i, key]
        meta = sample.meta
        stored = sample.latent.astype(np.float32)
        out = teacher.generate([sample.prompt], [meta["seed"]], meta["height"], meta["width"], decode=False,
                               negative_prompts=[meta.get("negative_prompt") or ""])
        fresh = out.latent[0].numpy().astype(np.float16).astype(np.float32)
        diffs.append({"key": key, "max_abs_diff": float(np.abs(fresh - stored).max()),
                      "noise_matches": meta.get("noise_sha256") == noise_fingerprint(out.noise[0])})
    worst = max(d["max_abs_diff"] for d in diffs)
    return {"samples": diffs, "identical": worst == 0.0, "max_abs_diff": worst,
            "sampler_hash_matches": teacher.sampler.hash == facts["sampler_hash"],
            "same_software": teacher.describe()["versions"] == facts["versions"]}
