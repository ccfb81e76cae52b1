"""``twostep prompts inspect``: what a manifest holds, and whether its hash still matches."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .manifest import ManifestHasher, iter_batches, read_meta

# Length histogram bin edges, in characters.
LENGTH_BINS = (0, 25, 50, 100, 200, 400, 800, 1600)


def inspect_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Counts, prompt-length histogram, build record and hash check of a manifest."""
    stored, build = read_meta(path)
    lengths: list[np.ndarray] = []
    sizes: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    names = pq.read_schema(path).names
    cols = [c for c in ("prompt", "height", "width", "source") if c in names]
    hasher = ManifestHasher(names)
    for batch in iter_batches(path):  # one pass: the hash check and the counts
        hasher.update(batch)
        lengths.append(pc.utf8_length(batch.column("prompt")).to_numpy())
        if "height" in cols and "width" in cols:
            for h, w in zip(batch.column("height").to_pylist(), batch.column("width").to_pylist()):
                sizes[f"{h}x{w}" if h and w else "default"] += 1
        if "source" in cols:
            sources.update(batch.column("source").to_pylist())
    actual = hasher.hexdigest()
    n = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int32)
    edges = [*LENGTH_BINS, max(int(n.max()) + 1 if len(n) else 1, LENGTH_BINS[-1] + 1)]
    counts, _ = np.histogram(n, bins=edges)
    return {
        "path": str(path),
        "rows": len(n),
        "prompts": build.get("prompts"),
        "rows_read": build.get("rows_read"),
        "duplicates_dropped": build.get("duplicates"),
        "rows_rejected": build.get("rejected"),
        "columns": names,
        "length": {
            "min": int(n.min()) if len(n) else 0,
            "median": float(np.median(n)) if len(n) else 0.0,
            "max": int(n.max()) if len(n) else 0,
            "histogram": [{"from": int(a), "to": int(b) - 1, "count": int(c)}
                          for a, b, c in zip(edges[:-1], edges[1:], counts)],
        },
        "sizes": dict(sizes.most_common()),
        "sources": dict(sources.most_common(10)),
        "manifest_hash": stored,
        "hash_ok": stored == actual,
        "options": build.get("options"),
    }


def format_report(info: dict[str, Any]) -> str:
    """Human-readable form of :func:`inspect_manifest`'s result."""
    lines = [
        f"manifest     {info['path']}",
        f"rows         {info['rows']}  (unique prompts: {info['prompts']}, rows read: {info['rows_read']})",
        f"duplicates   {info['duplicates_dropped']} dropped",
        f"rejected     {info['rows_rejected']} rows",
        f"columns      {', '.join(info['columns'])}",
        f"hash         {info['manifest_hash']}  ({'ok' if info['hash_ok'] else 'MISMATCH: content changed'})",
        f"length       min {info['length']['min']}, median {info['length']['median']:.0f}, "
        f"max {info['length']['max']} characters",
    ]
    peak = max((b["count"] for b in info["length"]["histogram"]), default=0) or 1
    for b in info["length"]["histogram"]:
        bar = "#" * round(40 * b["count"] / peak)
        lines.append(f"  {b['from']:>5}-{b['to']:<5} {b['count']:>9}  {bar}")
    if info["sizes"]:
        lines.append("sizes        " + ", ".join(f"{k}: {v}" for k, v in info["sizes"].items()))
    if info["sources"]:
        lines.append("sources      " + ", ".join(f"{k}: {v}" for k, v in info["sources"].items()))
    return "\n".join(lines)
