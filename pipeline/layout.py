"""The shard store's layout: its file names, the shard plan, and the ``index.json`` schema (both
versions). Every module that names a store file takes the name from here; what a shard's tar holds is
:mod:`.shardformat`'s. docs/store.md describes both for users.

Store layout, under any fsspec URL (local folder, ``s3://``, ``gs://``)::

    shards/000042.tar     WebDataset shard: manifest rows [42·N, 43·N), minus failed samples
    shards/000042.json    its stats, written after the tar: the shard's commit marker
    index.json            the dataset's facts, counts and status, and which index parts exist
    index/00000.json      index part 0: the entries of the committed shards among [0, 4096)
    manifest.parquet      the manifest the store was made from
    failed.parquet        rows whose generation failed, with reasons (for a rerun)
    README.md             dataset card
    lease.json            held by the one driver writing the store
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

STORE_FORMAT = 1
"""Goes into every run's settings fingerprint: a store of another format is never resumed."""

INDEX = "index.json"
MANIFEST = "manifest.parquet"
FAILED = "failed.parquet"
CARD = "README.md"
LEASE = "lease.json"
SHARDS = "shards"
SHARD_TAR = SHARDS + "/{:06d}.tar"
SHARD_STATS = SHARDS + "/{:06d}.json"
INDEX_PARTS = "index"
INDEX_PART = INDEX_PARTS + "/{:05d}.json"
INDEX_PART_SHARDS = 4096
"""Shards per index part: part k holds the entries of shards [k·4096, (k+1)·4096) that are committed."""
STORE_FILES = (SHARDS, INDEX_PARTS, INDEX, MANIFEST, FAILED, CARD)
"""What ``--overwrite`` removes: everything but the lease."""
LEASE_TMP_PREFIX = ".lease."
"""The lease's own temporary and lock files (``.lease.<hex>.tmp``, ``.lease.lock``) start with this."""

INDEX_VERSION = 2
"""``index.json`` version 2 keeps the shard entries in parts (:data:`INDEX_PART`), so that a rewrite
while the job runs costs the parts that changed, not the whole store; version 1 (no
``index_version``) lists them inline under ``shards`` and is still read (docs/store.md)."""
INDEX_ENTRY = ("url", "samples", "sha256", "bytes", "shard", "failures")
"""What ``index.json`` keeps of each committed shard's stats: enough for a rerun to trust the entry
without reading the stats file, and for ``failed.parquet``."""

_SHARD_FILE = re.compile(r"(\d+)\.(tar|json)")


# --- the shard plan: shard i holds manifest rows [i·N, (i+1)·N) -----------------------------------

def num_shards(rows: int, shard_size: int) -> int:
    """Shards of a manifest of ``rows`` rows."""
    return math.ceil(rows / shard_size)


def rows_of(shard: int, shard_size: int, rows: int | None = None) -> range:
    """The manifest rows of ``shard``; ``rows`` (the manifest's length) cuts the last shard short."""
    start = shard * shard_size
    stop = start + shard_size
    return range(start, stop if rows is None else max(start, min(stop, rows)))


def shard_file(rel: str) -> tuple[int, str] | None:
    """``(shard, "tar" | "json")`` when ``rel`` (relative to the store) is a shard's tar or stats file
    as the writer names it (``shards/000042.tar``, not ``shards/42.tar``); else None."""
    m = _SHARD_FILE.fullmatch(rel.removeprefix(SHARDS + "/"))
    if not m:
        return None
    i = int(m[1])
    return (i, m[2]) if rel == (SHARD_TAR if m[2] == "tar" else SHARD_STATS).format(i) else None


def shard_pattern(count: int) -> str:
    """The brace pattern of shards ``[0, count)``: ``shards/{000000..000041}.tar``."""
    return SHARD_TAR.replace("{:06d}", "{{{:06d}..{:06d}}}").format(0, count - 1)


# --- index.json -----------------------------------------------------------------------------------

def index_head(*, fingerprint: str, identity: dict, num_shards: int, committed: int, samples: int,
               teacher: dict, seconds: float, parts: list[int], missing: list[int] | None = None,
               failed_shards: dict[int, str] | None = None, failed_samples: int = 0) -> dict[str, Any]:
    """``index.json`` (version :data:`INDEX_VERSION`): ``in progress`` while ``missing`` is None, else
    the final head (``complete`` when no shard is missing)."""
    head = {"index_version": INDEX_VERSION, "fingerprint": fingerprint, "identity": identity,
            "num_shards": num_shards, "committed_shards": committed, "samples": samples, "teacher": teacher,
            "seconds": round(seconds, 1),
            "index_parts": {"shards_per_part": INDEX_PART_SHARDS, "parts": parts}}
    if missing is None:
        head["status"] = "in progress"
    else:
        head.update(status="complete" if not missing else "incomplete", missing_shards=missing,
                    failed_shards={str(k): v for k, v in (failed_shards or {}).items()},
                    failed_samples=failed_samples)
    return head


def index_part(lo: int, present, samples, nbytes, sha, failures: dict) -> bytes:
    """An index part's file: the JSON list of the entries (:data:`INDEX_ENTRY`, keys sorted) of the
    shards ``lo + i`` where ``present[i]``, made from arrays (samples, bytes, (n, 32) uint8 sha256;
    ``failures``: shard → its failures, for those with any) with one string a shard (3 ms for 4,096
    shards; building dicts for ``json.dumps`` took three times as long and held the GIL for
    stretches of 100 ms)."""
    import numpy as np

    idx = np.flatnonzero(present)
    hexes = sha[idx].tobytes().hex()
    items = [f'{{"bytes":{b},"failures":{json.dumps(failures[s]) if s in failures else "[]"},"samples":{n},'
             f'"sha256":"{hexes[64 * k:64 * k + 64]}","shard":{s},"url":"{SHARD_TAR.format(s)}"}}'
             for k, (s, n, b) in enumerate(zip((lo + idx).tolist(), samples[idx].tolist(), nbytes[idx].tolist()))]
    return ("[" + ",".join(items) + "]").encode()


def read_index(read_bytes: Callable[[str], bytes]) -> dict[str, Any]:
    """The store's ``index.json`` (either version); ``read_bytes`` reads a store file by its relative
    name. FileNotFoundError when there is none, ValueError when it is not JSON."""
    return json.loads(read_bytes(INDEX))


def index_entries(read_bytes: Callable[[str], bytes], index: dict[str, Any]) -> list[dict[str, Any]]:
    """The shard entries of an ``index.json`` of either version, in shard order. ``read_bytes``
    reads a store file by its relative name (``index/00000.json``)."""
    if "index_version" not in index:  # version 1: inline
        return sorted(index.get("shards") or [], key=lambda e: e["shard"])
    if index["index_version"] > INDEX_VERSION:
        raise ValueError(f"{INDEX} version {index['index_version']}: this twostep reads up to {INDEX_VERSION}; "
                         "upgrade twostep")
    out: list[dict[str, Any]] = []
    for k in index["index_parts"]["parts"]:
        out += json.loads(read_bytes(INDEX_PART.format(k)))
    return out
