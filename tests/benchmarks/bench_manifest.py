"""Benchmark: building a manifest from 1,000,000 prompts in bounded memory.

Runs each build in a fresh process and reads that process's peak RSS. Compares
``twostep prompts build`` with a naive in-memory baseline (all rows as Python dicts, de-duplicated
with a dict, one ``pa.Table`` written at once) on the same input, in the same run, A B A B, and
reports medians and ratios. Also builds at a quarter of the size to show how memory grows per row.

    python tests/benchmarks/bench_manifest.py [--rows 1000000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
mode, src, out = sys.argv[1:4]
t0 = time.perf_counter()
if mode == "twostep":
    from twostep.prompts import BuildOptions, build_manifest
    import logging; logging.disable(logging.INFO)
    s = build_manifest([src], out, BuildOptions())
    rows = s.rows
else:  # naive: everything in memory at once
    import hashlib, unicodedata, re
    import pyarrow as pa, pyarrow.parquet as pq
    seen = {}
    with open(src, encoding="utf-8") as f:
        for line in f:
            t = re.sub(r"\s+", " ", unicodedata.normalize("NFC", line)).strip()
            if t and t not in seen:
                pid = hashlib.sha256(t.encode()).hexdigest()[:16]
                seen[t] = {"prompt_id": pid, "prompt": t,
                           "seed": int.from_bytes(hashlib.sha256(f"0/{pid}".encode()).digest()[:8], "big") >> 1}
    table = pa.Table.from_pylist(list(seen.values()))
    pq.write_table(table, out, compression="zstd")
    rows = table.num_rows
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"rows": rows, "seconds": time.perf_counter() - t0, "peak_mb": peak_mb}))
"""

WORDS = ["red", "green", "blue", "cyan", "magenta", "yellow", "orange", "purple", "circle", "square", "triangle", "small", "large", "top", "bottom", "left", "right", "centre", "background", "cat", "dog", "house", "tree", "river", "mountain", "city", "night", "day", "painting", "photo", "sketch", "render", "bright", "dark", "soft", "sharp"]


def make_input(path: Path, rows: int) -> None:
    """Unique synthetic prompts of 8–20 words, plus 2% exact duplicates."""
    import random

    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            if i and i % 50 == 0:
                f.write(f"prompt {i - 1}\n")
                continue
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20)))
            f.write(f"prompt {i} {words}\n")


def run(mode: str, src: Path, out: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out)],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="prompts in the large input")
    ap.add_argument("--repeats", type=int, default=2, help="A/B repetitions (medians are reported)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results: dict[str, list[dict]] = {}
        for rows in (args.rows // 4, args.rows):
            src = tmp / f"p{rows}.txt"
            make_input(src, rows)
            for _ in range(args.repeats):
                for mode in ("twostep", "naive"):
                    results.setdefault(f"{mode}@{rows}", []).append(run(mode, src, tmp / f"{mode}.parquet"))
        summary = {k: {"rows_out": v[0]["rows"],
                       "seconds": round(statistics.median(r["seconds"] for r in v), 2),
                       "peak_mb": round(statistics.median(r["peak_mb"] for r in v), 1)} for k, v in results.items()}
        big, small = args.rows, args.rows // 4
        ours, naive = summary[f"twostep@{big}"], summary[f"naive@{big}"]
        summary["ratio_time_twostep_over_naive"] = round(ours["seconds"] / naive["seconds"], 2)
        summary["ratio_peak_twostep_over_naive"] = round(ours["peak_mb"] / naive["peak_mb"], 2)
        for mode in ("twostep", "naive"):
            grow = summary[f"{mode}@{big}"]["peak_mb"] - summary[f"{mode}@{small}"]["peak_mb"]
            summary[f"{mode}_bytes_per_extra_row"] = round(grow * 2**20 / (big - small), 1)
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
