"""``twostep verify``: check a store against its index and manifest, optionally regenerate samples.

Three modes (docs/generation.md, ``twostep verify``):

- **fast** (``full=False``): one listing of ``shards/`` plus ``index.json`` and the manifest's
  footer. Every shard of the plan must be in the index, its tar listed with the size the index
  records, its stats file listed, and its samples plus recorded failures must be the shard's row
  count. Reads no shard: a few requests whatever the store's size. It proves the store is complete
  as the index describes it and that no tar was truncated or replaced by one of another size; not
  that the bytes are right.
- **sample** (the default): the fast checks, then ``sample`` random shards (``DEFAULT_SAMPLE``;
  ``seed`` picks them) read in full as below: every shard of a store that has no more.
- **full** (``full=True``): the fast checks, then every shard read in full: the sha256 the index
  records, a good shard as :mod:`.shardformat` defines it (the trainer reads shards with the same
  parser, so a shard that passes here is one it reads), and exactly the keys of its manifest rows
  minus the failures its stats list.

A shard's manifest rows come from the row groups that hold them, never the whole ``prompt_id``
column (:class:`ManifestKeys`). Shards are read in parallel with a bounded number in flight: threads
in this process, or Ray tasks on a cluster when ``ray_address`` (or ``RAY_ADDRESS``) is set.

With ``regenerate=K``, K random samples are generated again with the recorded teacher and sampler
and their latents compared with the stored ones (stored as float16).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import queue
import random
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from .config import DEFAULT_SAMPLE, VerifyConfig
from .layout import INDEX, MANIFEST, SHARD_TAR, num_shards, rows_of
from .shardformat import ShardFormatError, iter_samples
from .store import Store

RAY_WINDOW = (64, 4096)
"""Ray tasks in flight: twice the cluster's CPUs, within these bounds."""


def verify_store(url: str, storage_options: dict | None = None, *, full: bool | None = None,
                 progress: bool = False, **settings: Any) -> dict[str, Any]:
    """Return a report: ok, problems, shards, samples, mode (fast, sample or full), checked (shards
    read in full) of checked_of (the index's shards), and regeneration differences.

    ``full=False`` is the fast mode (no ``sample`` then); ``full=True`` reads every shard, or
    ``sample`` random ones when given; ``full=None`` (the default) reads ``sample`` random shards,
    ``DEFAULT_SAMPLE`` unless given. ``settings``: the other :class:`.config.VerifyConfig` fields
    (``sample``, ``seed``, ``threads``, ``regenerate``, …; ``sample="all"`` reads every shard,
    ``seed`` picks the shards and the samples ``regenerate`` draws)."""
    cfg = VerifyConfig(store=url, storage_options=storage_options or {}, fast=full is False, full=bool(full),
                       **settings)
    return verify(cfg, progress=progress)


def verify(cfg: VerifyConfig, progress: bool = False) -> dict[str, Any]:
    """:func:`verify_store` with its settings in ``cfg``."""
    url, storage_options, sample, seed, regenerate = (cfg.store, cfg.storage_options or None, cfg.sample, cfg.seed,
                                                      cfg.regenerate)
    full = False if cfg.fast else True if cfg.full else None
    if sample == "all":
        full, sample = True, None
    mode = "fast" if full is False else "full" if full and sample is None else "sample"
    bound = DEFAULT_SAMPLE if full is None and sample is None else sample
    store = Store(url, storage_options)
    index = store.read_index()
    if index is None:
        return {"ok": False, "problems": [f"{url}: no {INDEX} (not a twostep store, or never finished)"]}
    if not store.exists(MANIFEST):
        return {"ok": False, "problems": [f"{url}: no {MANIFEST} (the job copies it in first)"]}
    n = index["identity"]["shard_size"]
    with store.fs.open(store.path(MANIFEST), "rb") as f:
        rows = pq.read_metadata(f).num_rows
    plan = num_shards(rows, n)
    listed = {s["shard"]: s for s in store.index_entries(index)}
    bad = _fast_checks(store, listed, plan, rows, n)
    problems = list(bad.values())
    report: dict[str, Any] = {"shards": len(listed), "samples": sum(s["samples"] for s in listed.values()),
                              "mode": mode, "checked": 0, "checked_of": len(listed)}
    if mode == "sample":
        report.update(sample=bound, seed=seed)
    checked: dict[int, list[str]] = {}  # shard → its keys, kept for --regenerate only
    if mode != "fast":
        shards = sorted(i for i in listed if i < plan and i not in bad)  # a bad size needs no sha256
        if bound is not None and bound < len(shards):
            shards = sorted(random.Random(seed).sample(shards, bound))
        with store.fs.open(store.path(MANIFEST), "rb") as f:
            keys_of = ManifestKeys(pq.ParquetFile(f), n)
            jobs = ((i, listed[i], keys_of(i)) for i in shards)  # read as the window moves on
            for i, found, keys in _run_checks(store, jobs, len(shards), cfg.threads, cfg.ray_address, progress):
                problems += found
                if keys is not None and regenerate:
                    checked[i] = keys
        report["checked"] = len(shards)
    report.update(ok=not problems, problems=sorted(problems))
    if regenerate:
        if not checked:  # fast mode: read the keys of a few random shards
            picks = random.Random(seed).sample(sorted(listed), min(regenerate, len(listed)))
            checked = {i: [s.key for s in iter_samples(store.read_bytes(SHARD_TAR.format(i)))] for i in picks}
        report["regenerate"] = _regenerate(store, index, checked, regenerate, seed, cfg.device, cfg.teacher)
        report["ok"] = report["ok"] and report["regenerate"]["sampler_hash_matches"]
    return report


class ManifestKeys:
    """``keys(shard)``: the ``prompt_id`` of manifest rows ``[shard·n, (shard+1)·n)``, read from the row
    groups that hold them (the footer gives their row counts), never the whole column: gigabytes
    of strings at 100M rows (docs/generation.md, ``twostep verify``). Any order is right; with shards
    in ascending order (as verify asks) a row group shared by two shards is read once, and groups
    behind the current shard are dropped, so memory is a shard's groups whatever the manifest's length."""

    def __init__(self, pf: pq.ParquetFile, n: int) -> None:
        self.pf, self.n = pf, n
        md = pf.metadata
        self.starts = [0]  # first row of each group, then the row count
        for g in range(md.num_row_groups):
            self.starts.append(self.starts[-1] + md.row_group(g).num_rows)
        self.cache: dict[int, list[str]] = {}

    def __call__(self, shard: int) -> list[str]:
        rows = rows_of(shard, self.n, self.starts[-1])
        lo, hi = rows.start, rows.stop
        if lo >= hi:
            return []
        first = bisect.bisect_right(self.starts, lo) - 1
        groups = [g for g in range(first, bisect.bisect_left(self.starts, hi)) if self.starts[g + 1] > self.starts[g]]
        self.cache = {g: ids for g, ids in self.cache.items() if g >= first}
        missing = [g for g in groups if g not in self.cache]
        if missing:
            ids = self.pf.read_row_groups(missing, columns=["prompt_id"]).column("prompt_id").to_pylist()
            at = 0
            for g in missing:
                size = self.starts[g + 1] - self.starts[g]
                self.cache[g], at = ids[at:at + size], at + size
        out = [k for g in groups for k in self.cache[g]]
        return out[lo - self.starts[first]:hi - self.starts[first]]


def _fast_checks(store: Store, listed: dict[int, dict], plan: int, rows: int, n: int) -> dict[int, str]:
    """Presence, sizes and sample counts from one listing of ``shards/`` plus the index: shard → problem."""
    listing = store.list_shards()
    problems = {}
    for i in range(plan):
        rel, want = SHARD_TAR.format(i), len(rows_of(i, n, rows))
        entry, sizes = listed.get(i), listing.get(i, {})
        if entry is None:
            problems[i] = f"{rel}: missing from {INDEX}"
        elif "tar" not in sizes:
            problems[i] = f"{rel}: missing"
        elif sizes["tar"] != entry["bytes"]:
            problems[i] = f"{rel}: {sizes['tar']} bytes, index says {entry['bytes']}"
        elif "json" not in sizes:
            problems[i] = f"{rel}: its stats file (the commit marker) is missing"
        elif "failures" in entry and entry["samples"] + len(entry["failures"]) != want:
            problems[i] = (f"{rel}: {entry['samples']} samples and {len(entry['failures'])} failures in "
                           f"{INDEX}, the shard has {want} manifest rows")
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
        return shard, [f"{rel}: sha256 differs from {INDEX} (corrupt or replaced)"], None
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


def _run_checks(store: Store, jobs: Iterable[tuple[int, dict, list[str]]], total: int, threads: int,
                ray_address: str | None, progress: bool, window: int | None = None):
    """Yield :func:`check_shard` results as they finish: Ray tasks on a cluster, else threads. At most
    ``window`` checks are in flight (default: twice the threads, or twice the cluster's CPUs within
    ``RAY_WINDOW``); ``jobs`` is drawn as results come back, so its manifest rows are read as needed."""
    url, opts = store.url, store.storage_options
    bar = tqdm(total=total, desc="verify", unit="shard", disable=not progress)
    address = ray_address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            import ray

            if not ray.is_initialized():
                ray.init(address=address, log_to_driver=False)
            task = ray.remote(num_cpus=1)(check_shard)
            if window is None:
                cpus = int(ray.cluster_resources().get("CPU", 1))
                window = min(RAY_WINDOW[1], max(RAY_WINDOW[0], 2 * cpus))
            # The task's future gets its value (or its error), so each result costs the same whatever
            # the tasks in flight: no ray.wait over all of them.
            yield from _windowed(jobs, lambda job: task.remote(url, opts, *job).future(), window, bar)
            return
        with ThreadPoolExecutor(threads, thread_name_prefix="verify") as pool:
            yield from _windowed(jobs, lambda job: pool.submit(check_shard, url, opts, *job),
                                 window or 2 * threads, bar)
    finally:
        bar.close()


def _windowed(jobs: Iterable, submit: Callable[[Any], Future], window: int, bar) -> Iterator:
    """Results of ``submit(job)`` for every job as they finish, with at most ``window`` in flight: a
    finished one's callback puts it on a queue and the next job is submitted."""
    finished: queue.SimpleQueue[Future] = queue.SimpleQueue()
    todo, inflight = iter(jobs), 0
    while True:
        for job in todo:
            submit(job).add_done_callback(finished.put)
            inflight += 1
            if inflight >= window:
                break
        if not inflight:
            return
        fut = finished.get()
        inflight -= 1
        bar.update(1)
        yield fut.result()


def _regenerate(store: Store, index: dict, checked: dict, k: int, seed: int, device: str | None,
                teacher_spec: str | None) -> dict[str, Any]:
    from twostep.teacher.core import Teacher, noise_fingerprint

    facts = index["teacher"]
    s = facts["sampler"]
    spec = teacher_spec or (facts["teacher"] if facts["revision"] is None else f"{facts['teacher']}@{facts['revision']}")
    teacher = Teacher.load(spec, device=device, num_steps=s["num_steps"], guidance_scale=s["guidance_scale"],
                           sigma_mid=s["mid_sigma"], max_sequence_length=s["max_sequence_length"])
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
