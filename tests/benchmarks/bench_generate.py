"""Benchmark: generation throughput: the job with 1 and 2 workers vs a bare loop (toy teacher, CPU).

The bare loop calls the same teacher with the same batch size in one process with one torch
thread (no encoding, no tar, no Ray); the job's workers get one CPU and one torch thread each.

Each configuration runs ``twostep generate`` end to end on a fresh local Ray cluster with exactly as
many CPUs as workers (so one torch thread per worker), A B A B; reported: steady-state committed
images/s (medians; first commit to last, so teacher loading is excluded), the 2-vs-1 ratio, the
same including start-up, and the CPU seconds Ray's own processes (raylet, GCS, agents) used.

    python tests/benchmarks/bench_generate.py [--rows 96] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import psutil


def ray_system_cpu() -> float:
    """CPU seconds of Ray's system processes (raylet, gcs_server, agents) on this machine."""
    total = 0.0
    for p in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(k in cmd for k in ("raylet", "gcs_server", "dashboard", "runtime_env", "log_monitor")):
            t = p.info["cpu_times"]
            total += t.user + t.system
    return total


def run_once(manifest: str, workers: int, rows: int, tmp: Path) -> dict:
    import ray

    from twostep.pipeline.job import GenerateConfig, run_generation

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp / f"store-{workers}-{time.time_ns()}"
        cfg = GenerateConfig(manifest=manifest, out=str(out), shard_size=8, batch_size=8,
                             num_workers=workers, image_format="webp")
        t0, c0 = time.perf_counter(), ray_system_cpu()
        index = run_generation(cfg)
        seconds = time.perf_counter() - t0
        # Steady state, without actor start-up and teacher loading: images committed after the
        # first commit, over the time from the first commit to the last.
        stats = sorted((json.loads(p.read_text()) for p in (out / "shards").glob("*.json")),
                       key=lambda s: s["committed_at"])
        span = stats[-1]["committed_at"] - stats[0]["committed_at"]
        steady = sum(s["samples"] for s in stats[1:]) / span
        return {"images_per_s": round(steady, 3), "wall_s": round(seconds, 1),
                "images_per_s_incl_startup": round(index["samples"] / seconds, 3),
                "ray_system_cpu_s": round(ray_system_cpu() - c0, 2)}
    finally:
        ray.shutdown()


def bare_loop(manifest: str, batch: int) -> dict:
    """The same teacher called in a plain loop in this process, one thread, same batches."""
    import pyarrow.parquet as pq
    import torch

    from twostep.teacher.core import Teacher

    torch.set_num_threads(1)
    rows = pq.read_table(manifest).to_pylist()
    teacher = Teacher.load("toy", device="cpu")
    teacher.generate([rows[0]["prompt"]], [rows[0]["seed"]], 64, 64)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch):
        b = rows[i:i + batch]
        teacher.generate([r["prompt"] for r in b], [r["seed"] for r in b], 64, 64)
    return {"images_per_s": round(len(rows) / (time.perf_counter() - t0), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=96, help="manifest rows per run")
    ap.add_argument("--repeats", type=int, default=2, help="A/B repetitions")
    args = ap.parse_args()
    from twostep.toy.world import build_toy_manifest

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_toy_manifest(args.rows, tmp / "toy.parquet", seed=1)
        res: dict[int, list[dict]] = {0: [], 1: [], 2: []}  # 0 = the bare loop
        for _ in range(args.repeats):
            res[0].append(bare_loop(str(tmp / "toy.parquet"), 8))
            for w in (1, 2):
                res[w].append(run_once(str(tmp / "toy.parquet"), w, args.rows, tmp))
        med = {w: {k: round(statistics.median(r[k] for r in v), 3) for k in v[0]} for w, v in res.items()}
        print(json.dumps({"bare_loop": med[0], "one_worker": med[1], "two_workers": med[2],
                          "ratio_one_worker_over_bare": round(med[1]["images_per_s"] / med[0]["images_per_s"], 2),
                          "ratio_two_over_one": round(med[2]["images_per_s"] / med[1]["images_per_s"], 2),
                          "runs": res}, indent=1))


if __name__ == "__main__":
    main()
