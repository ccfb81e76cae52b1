"""Benchmark: does the generation worker keep its teacher busy while samples encode?

A simulated GPU teacher: ``generate`` sleeps a set time per batch (the GIL released, as during GPU
work) and returns Z-Image-sized outputs (latent, mid and noise of 16×128×128, a 1024² RGB image) to
encode as the real worker does (lossless WebP, npy, json, tar, a local store). The worker runs two
shards at a time, as its Ray actor does (``max_concurrency=2``).

For each shard size (1, 2 and 16 batches per shard) it reports the worker's images/s against

* the teacher-alone rate (batch size / sleep), and
* the encode-alone capacity (samples encoded per second by the worker's encode pool, nothing else running),

and their ratio to min(teacher-alone, encode-alone): the goal is ≥ 0.97 at every shard size. The
same figures for the worker as it was before (the teacher held until the shard's encodes finish,
one encode thread) are measured in the same run, A B A B, medians.

    python tests/benchmarks/bench_worker_overlap.py [--sleep 1.3] [--batch 4] [--images 48] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch


def synthetic_image(size: int, seed: int = 0) -> np.ndarray:
    """An image with smooth gradients, edges and some texture: lossless WebP works about as hard on it
    as on a generated photo (pure noise would be slower, a flat image much faster)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([128 + 100 * np.sin(6 * x + 3 * y), 128 + 100 * np.cos(5 * y - 2 * x), 255 * x * y], -1)
    for _ in range(12):  # discs of flat colour
        (cx, cy), r = rng.uniform(0, size, 2), rng.uniform(size / 20, size / 6)
        img[(x * size - cx) ** 2 + (y * size - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)  # sensor-like grain
    return np.clip(img, 0, 255).astype(np.uint8)


class SleepTeacher:
    """Stands in for a GPU teacher: ``seconds`` per batch of sleep, Z-Image-sized outputs."""

    name, default_size = "sleep", 1024

    def __init__(self, seconds: float, size: int = 1024, latent: tuple[int, int, int] = (16, 128, 128)):
        self.seconds, self.image = seconds, synthetic_image(size)
        self.array = torch.randn(latent, generator=torch.Generator().manual_seed(0))

    def describe(self) -> dict:
        return {"teacher": self.name, "revision": None, "sampler_hash": "sleep", "dtype": "float32",
                "device": "cuda-simulated"}

    def generate(self, prompts, seeds, h, w, decode=True, negative_prompts=None):
        time.sleep(self.seconds)
        n = len(prompts)
        arrays = torch.stack([self.array] * n)
        return SimpleNamespace(noise=arrays, mid=arrays, latent=arrays,
                               images=np.stack([self.image] * n) if decode else None)


def _old_worker_cls():
    """The worker as it was: the teacher held until the shard's encodes finish."""
    from twostep.pipeline.shardformat import tar_bytes
    from twostep.pipeline.worker import ShardWorker

    class HeldWorker(ShardWorker):
        def run(self, shard: int, fingerprint: str) -> dict:
            t0 = time.perf_counter()
            with self._teacher_lock:
                pending, failures, nrows = self._generate_shard(shard)
                samples = [f.result() for f in pending]
            stats = {"samples": len(samples), "failures": failures, "rows": nrows, "worker": self.name,
                     "seconds": round(time.perf_counter() - t0, 3), "fingerprint": fingerprint}
            return self.store.commit_shard(shard, tar_bytes(samples), stats)

    return HeldWorker


def worker_rate(cls, teacher: SleepTeacher, manifest: str, tmp: Path, shard_size: int, batch: int,
                images: int, encode_threads: int) -> float:
    """Committed images/s of ``images // shard_size`` shards, two in flight, from the first batch to the last
    commit."""
    from twostep.pipeline.worker import WorkerConfig

    store = tmp / f"store-{time.time_ns()}"
    worker = cls(WorkerConfig(store_url=str(store), manifest=manifest, shard_size=shard_size, batch_size=batch,
                              image_format="webp", save=("mid", "noise"), encode_threads=encode_threads),
                 teacher=teacher)
    shards = list(range(images // shard_size))
    worker.rows(0)  # open the manifest outside the timing
    lock, todo, committed = threading.Lock(), iter(shards), []

    def slot():
        while True:
            with lock:
                shard = next(todo, None)
            if shard is None:
                return
            committed.append(worker.run(shard, "bench")["samples"])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=slot) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if sum(committed) != len(shards) * shard_size:
        raise RuntimeError(f"committed {sum(committed)} samples, expected {len(shards) * shard_size}")
    return sum(committed) / seconds


def encode_rate(teacher: SleepTeacher, manifest: str, tmp: Path, n: int, encode_threads: int) -> float:
    """Samples/s the worker's encode pool alone can turn into tar members."""
    from twostep.pipeline.worker import ShardWorker, WorkerConfig

    worker = ShardWorker(WorkerConfig(store_url=str(tmp / "enc"), manifest=manifest, image_format="webp",
                                      save=("mid", "noise")), teacher=teacher)
    rows = worker.rows(0)[:1] * n
    out = teacher.generate(["x"] * 1, [0], 1024, 1024)
    args = (out.noise[0], out.mid[0], out.latent[0], out.images[0], 0.1, 1024, 1024)
    with ThreadPoolExecutor(encode_threads) as pool:
        t0 = time.perf_counter()
        list(pool.map(lambda r: worker._encode(r, *args), rows))
        return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sleep", type=float, default=1.3, help="simulated GPU seconds per batch (default: 1.3)")
    ap.add_argument("--batch", type=int, default=4, help="samples per teacher call (default: 4)")
    ap.add_argument("--images", type=int, default=64, help="images per measurement (default: 64)")
    ap.add_argument("--repeats", type=int, default=2, help="A B A B repeats (default: 2)")
    ap.add_argument("--encode-threads", type=int, default=0,
                    help="the new worker's encode pool (default: 0, its default for this machine)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    from twostep.pipeline.worker import ShardWorker, encode_threads
    from twostep.toy.world import build_toy_manifest

    threads = encode_threads(args.encode_threads)
    teacher = SleepTeacher(args.sleep)
    result = {"sleep_s_per_batch": args.sleep, "batch": args.batch, "encode_threads": threads,
              "torch_threads": torch.get_num_threads(), "images": args.images, "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = str(tmp / "m.parquet")
        build_toy_manifest(max(args.images, 16 * args.batch), manifest)  # rows for the largest shard
        teacher_alone = args.batch / args.sleep
        enc = statistics.median(encode_rate(teacher, manifest, tmp, 16, threads) for _ in range(args.repeats))
        enc1 = statistics.median(encode_rate(teacher, manifest, tmp, 16, 1) for _ in range(args.repeats))
        result.update(teacher_alone=round(teacher_alone, 3), encode_alone=round(enc, 3), encode_alone_1thread=round(enc1, 3))
        print(f"teacher alone {teacher_alone:.2f} images/s; encode alone {enc:.2f} images/s with {threads} threads "
              f"({enc1:.2f} with 1)", flush=True)
        for per_shard in (1, 2, 16):
            size = per_shard * args.batch
            n = max(size, args.images // size * size)
            new, old = [], []
            for _ in range(args.repeats):
                new.append(worker_rate(ShardWorker, teacher, manifest, tmp, size, args.batch, n, threads))
                old.append(worker_rate(_old_worker_cls(), teacher, manifest, tmp, size, args.batch, n, 1))
            new_m, old_m = statistics.median(new), statistics.median(old)
            row = {"batches_per_shard": per_shard, "images": n, "worker": round(new_m, 3), "before": round(old_m, 3),
                   "worker_vs_bound": round(new_m / min(teacher_alone, enc), 3),
                   "before_vs_its_bound": round(old_m / min(teacher_alone, enc1), 3),
                   "runs": {"worker": [round(x, 3) for x in new], "before": [round(x, 3) for x in old]}}
            result["sizes"][per_shard] = row
            print(f"{per_shard:2d} batches/shard: worker {new_m:.2f} images/s = {row['worker_vs_bound']:.3f} × "
                  f"min(teacher, encode); before {old_m:.2f} = {row['before_vs_its_bound']:.3f} × its bound", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
