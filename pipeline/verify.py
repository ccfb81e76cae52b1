"""``twostep verify``: check a store against its index and manifest, optionally regenerate samples.

Every shard of the plan must be present with the size, sha256 and sample count that ``index.json``
records, be a good shard as :mod:`.shardformat` defines it (the trainer reads shards with the same
parser, so a shard that passes here is one it reads), and hold exactly the keys of its manifest rows
minus the failures its stats list. With
``regenerate=K``, K random samples are generated again with the recorded teacher and sampler and
their latents compared with the stored ones (stored as float16).
"""

from __future__ import annotations

import hashlib
import math
import random
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from .shardformat import SHARD_TAR, ShardFormatError, iter_samples
from .store import Store


def verify_store(url: str, storage_options: dict | None = None, regenerate: int = 0, seed: int = 0,
                 device: str | None = None, teacher: str | None = None) -> dict[str, Any]:
    """Return a report: ok, per-problem lists, and regeneration differences."""
    store = Store(url, storage_options)
    index = store.read_json("index.json")
    if index is None:
        return {"ok": False, "problems": [f"{url}: no index.json (not a twostep store, or never finished)"]}
    ident = index["identity"]
    n = ident["shard_size"]
    with store.fs.open(store.path("manifest.parquet"), "rb") as f:
        ids = pq.read_table(f, columns=["prompt_id"]).column("prompt_id").to_pylist()
    problems: list[str] = []
    listed = {s["shard"]: s for s in index["shards"]}
    checked: dict[int, list[str]] = {}  # shard → its keys (samples are re-read for --regenerate)
    for i in range(math.ceil(len(ids) / n)):
        rel = SHARD_TAR.format(i)
        if i not in listed:
            problems.append(f"{rel}: missing from index.json")
            continue
        try:
            data = store.read_bytes(rel)
        except FileNotFoundError:
            problems.append(f"{rel}: missing")
            continue
        entry = listed[i]
        if len(data) != entry["bytes"]:
            problems.append(f"{rel}: {len(data)} bytes, index says {entry['bytes']}")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            problems.append(f"{rel}: sha256 differs from index.json (corrupt or replaced)")
            continue
        try:
            keys = [s.key for s in iter_samples(data)]
        except ShardFormatError as e:
            problems.append(f"{rel}: {e}")
            continue
        stats = store.shard_stats(i) or {}
        failed = {f["prompt_id"] for f in stats.get("failures", [])}
        want = [k for k in ids[i * n:(i + 1) * n] if k not in failed]
        if len(keys) != entry["samples"]:
            problems.append(f"{rel}: {len(keys)} samples, index says {entry['samples']}")
        if sorted(keys) != sorted(want):
            extra, lost = sorted(set(keys) - set(want)), sorted(set(want) - set(keys))
            problems.append(f"{rel}: keys differ from the manifest rows (extra {extra[:5]}, missing {lost[:5]})")
        checked[i] = keys
    report: dict[str, Any] = {"ok": not problems, "problems": problems, "shards": len(listed),
                              "samples": sum(len(s) for s in checked.values())}
    if regenerate and checked:
        report["regenerate"] = _regenerate(store, index, checked, regenerate, seed, device, teacher)
        report["ok"] = report["ok"] and report["regenerate"]["sampler_hash_matches"]
    return report


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
