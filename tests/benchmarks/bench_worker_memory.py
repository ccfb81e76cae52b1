"""Benchmark: a generation worker's memory does not grow with the manifest.

Builds two manifests with ``twostep prompts build`` (1,000 and ``--rows`` prompts), then, each in a
fresh process, starts a real ``ShardWorker`` on the toy teacher against a local store and generates
and commits three shards spread over the manifest (first, middle, last). Reported per manifest: the
process's resident memory after the shards (VmRSS) and its peak (ru_maxrss). The baseline, in the
same run and the same processes, is what a worker that holds the manifest pays: the same worker
after ``pq.read_table`` of the whole manifest (what workers did before row-group reads). The figure
that matters is the growth from the small manifest to the large one: goal within 100 MB.

    python tests/benchmarks/bench_worker_memory.py [--rows 1000000] [--repeats 2]

Results: ``tests/benchmarks/results_worker_memory.json``; docs/generation.md.
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
import json, logging, resource, sys
logging.disable(logging.WARNING)
import torch
torch.set_num_threads(1)
import pyarrow.parquet as pq
from twostep.pipeline.worker import ShardWorker, WorkerConfig

mode, manifest, store, shard_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

cfg = WorkerConfig(store_url=store, manifest=manifest, teacher="toy", shard_size=shard_size, batch_size=shard_size,
                   image_format="png", threads=1)
worker = ShardWorker(cfg)
rows = pq.ParquetFile(manifest).metadata.num_rows
held = pq.read_table(manifest) if mode == "whole" else None  # the baseline: a worker that holds the manifest
last = (rows - 1) // shard_size
for shard in sorted({0, last // 2, last}):
    worker.run(shard, "bench")
print(json.dumps({"rows": rows, "rss_mb": rss_mb(),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "held_rows": None if held is None else held.num_rows}))
"""


def build(tmp: Path, rows: int) -> Path:
    """A manifest of ``rows`` unique prompts, written by the real builder (row groups of 8,192)."""
    from twostep.prompts import BuildOptions, build_manifest

    src = tmp / f"p{rows}.txt"
    with open(src, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(f"a red circle and a blue square, picture {i}\n")
    out = tmp / f"m{rows}.parquet"
    build_manifest([str(src)], out, BuildOptions())
    return out


def run(mode: str, manifest: Path, store: Path, shard_size: int) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, mode, str(manifest), str(store), str(shard_size)],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="prompts in the large manifest (default: 1,000,000)")
    ap.add_argument("--small", type=int, default=1_000, help="prompts in the small manifest (default: 1,000)")
    ap.add_argument("--shard-size", type=int, default=4, help="rows per shard (default: 4)")
    ap.add_argument("--repeats", type=int, default=2, help="repetitions, A B A B; medians are reported (default: 2)")
    ap.add_argument("--out", default=None, help="also write the summary to this JSON file")
    args = ap.parse_args(argv)
    import logging

    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifests = {n: build(tmp, n) for n in (args.small, args.rows)}
        results: dict[str, list[dict]] = {}
        for r in range(args.repeats):
            for n, manifest in manifests.items():
                for mode in ("rows", "whole"):
                    m = run(mode, manifest, tmp / f"store-{mode}-{n}-{r}", args.shard_size)
                    results.setdefault(f"{mode}@{n}", []).append(m)
    summary: dict = {k: {"rows": v[0]["rows"], "rss_mb": round(statistics.median(x["rss_mb"] for x in v), 1),
                         "peak_mb": round(statistics.median(x["peak_mb"] for x in v), 1)} for k, v in results.items()}
    for mode in ("rows", "whole"):
        big, small = summary[f"{mode}@{args.rows}"], summary[f"{mode}@{args.small}"]
        summary[f"{mode}_growth_rss_mb"] = round(big["rss_mb"] - small["rss_mb"], 1)
        summary[f"{mode}_growth_peak_mb"] = round(big["peak_mb"] - small["peak_mb"], 1)
    summary["goal_growth_mb"] = 100
    text = json.dumps(summary, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
