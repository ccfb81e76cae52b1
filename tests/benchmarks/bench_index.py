"""Benchmark: the generation driver's index at a million simulated shards (docs/generation.md,
"The driver at a million shards").

Commits are simulated: the driver's index writer (``pipeline.job._IndexWriter``) is given a
million shards' stats one at a time, as the dispatch loop gives them, and its ``maybe_write`` is
called after every 64 (a burst of finished tasks), writing to a local store folder. Measured:

- memory the writer holds for the entries (tracemalloc, which numpy reports to), against the
  same stats held as the dicts the tasks return (what the driver kept before);
- the dispatch thread's time in each ``maybe_write`` call;
- a rewrite of every part on the background thread while the main thread waits, as the dispatch
  loop does between results: its seconds, and the longest gap a 1 ms ticker thread sees meanwhile
  (how long the writer holds the GIL at a stretch: what a result arriving then waits);
- the bytes and seconds of the last in-progress write, against serialising every entry into one
  ``index.json`` (the version 1 index) once.

    python tests/benchmarks/bench_index.py                 # 1,000,000 shards, about 2 minutes
    python tests/benchmarks/bench_index.py --shards 100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent


def stats_of(i: int) -> dict:
    """A task's stats as ShardWorker returns them (one sample failure every 100 shards)."""
    fails = [{"prompt_id": f"p{i}-0", "row": i * 256, "reason": "ValueError: bad"}] if i % 100 == 0 else []
    return {"shard": i, "url": f"shards/{i:06d}.tar", "samples": 256 - len(fails), "failures": fails,
            "rows": 256, "worker": "node-17:123456", "seconds": 312.5, "fingerprint": "0123456789abcdef",
            "bytes": 402_653_184 + i, "sha256": f"{i:064x}", "committed_at": 1.796e9 + i}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=1_000_000, help="simulated shards (default 1,000,000)")
    ap.add_argument("--burst", type=int, default=64, help="stats given between maybe_write calls (default 64)")
    ap.add_argument("--out", default=str(HERE / "results_index.json"), help="results JSON")
    args = ap.parse_args(argv)
    from twostep.pipeline.job import GenerateConfig, _IndexWriter
    from twostep.pipeline.store import Store

    n = args.shards
    tmp = Path(tempfile.mkdtemp(prefix="bench-index-"))
    store = Store(str(tmp / "store"))
    cfg = GenerateConfig(manifest="-", out=str(tmp))

    # memory held: the compact records against the dicts of stats
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    writer = _IndexWriter(store, "fp", {"shard_size": 256}, n, {"teacher": "sim"}, {}, cfg)
    for i in range(n):
        writer.records.add(stats_of(i))
    held = tracemalloc.get_traced_memory()[0] - base
    writer = None
    base = tracemalloc.get_traced_memory()[0]
    as_dicts = {i: stats_of(i) for i in range(n)}
    held_dicts = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    t0 = time.perf_counter()
    whole = json.dumps({"shards": [{k: s[k] for k in ("url", "samples", "sha256", "bytes", "shard", "failures")}
                                   for s in as_dicts.values()]}, separators=(",", ":"))
    whole_s = time.perf_counter() - t0
    del as_dicts

    # the dispatch thread: add in bursts, maybe_write after each
    writer = _IndexWriter(store, "fp", {"shard_size": 256}, n, {"teacher": "sim"}, {}, cfg)
    calls, writes, t_all = [], 0, time.perf_counter()
    for i in range(n):
        writer.add(stats_of(i))
        if (i + 1) % args.burst == 0:
            before = writer.last
            t = time.perf_counter()
            writer.maybe_write(time.perf_counter() - t_all)
            calls.append(time.perf_counter() - t)
            writes += writer.last != before
    writer.flush()
    # every part rewritten on the background thread while this one waits, a ticker beside it
    gaps, stop = [], threading.Event()

    def ticker():
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = threading.Thread(target=ticker, daemon=True)
    tick.start()
    time.sleep(0.05)
    writer.dirty = set(range(-(-n // 4096)))
    t = time.perf_counter()
    writer.write(1.0, wait=False)
    while not writer._pending.done():
        time.sleep(0.005)
    full_rewrite_s = time.perf_counter() - t
    writer.flush()
    stop.set()
    tick.join()
    parts = sorted((tmp / "store" / "index").glob("*.json"))
    calls_ms = sorted(c * 1000 for c in calls)
    res = {
        "date": time.strftime("%Y-%m-%d"), "command": shlex.join(["python", *sys.argv]), "python": platform.python_version(),
        "cores": os.cpu_count(), "shards": n,
        "held_mb": round(held / 1e6, 1), "held_as_stats_dicts_mb": round(held_dicts / 1e6, 1),
        "held_ratio": round(held / held_dicts, 4),
        "maybe_write_calls": len(calls), "index_writes": writes,
        "maybe_write_ms": {"max": round(calls_ms[-1], 2), "p99": round(calls_ms[int(0.99 * len(calls_ms))], 3),
                           "median": round(statistics.median(calls_ms), 4)},
        "full_rewrite_s": round(full_rewrite_s, 3),
        "ticker_gap_ms_during_full_rewrite": {"max": round(max(gaps) * 1000, 2),
                                              "p99": round(sorted(gaps)[int(0.99 * len(gaps))] * 1000, 2)},
        "index_parts": len(parts),
        "head_bytes": (tmp / "store" / "index.json").stat().st_size,
        "part_bytes_max": max(p.stat().st_size for p in parts),
        "whole_index_json_bytes": len(whole), "whole_index_json_serialise_s": round(whole_s, 3),
    }
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
