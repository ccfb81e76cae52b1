"""The generation worker: holds one teacher and turns a shard number into a committed shard.

Plain Python (tested without Ray); the job wraps it in a Ray actor that runs two shards at once
(``max_concurrency=2``). The teacher never waits on I/O: within a shard, encoding (npy, image,
json) runs on a background thread while the teacher generates the next batch; across shards, a
lock lets one shard generate while the previous one builds its tar, uploads it and writes its
stats (the commit marker). No sample bytes go through the driver.

A worker never holds the manifest: for each shard it reads only the parquet row groups that hold
the shard's rows (:func:`read_rows`; ``twostep prompts`` writes row groups of 8,192 rows), so its
memory does not grow with the manifest and a bucket manifest is read in ranges, not downloaded.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from twostep.teacher.core import Teacher, noise_fingerprint

from .config import WorkerConfig
from .layout import rows_of
from .shardformat import encode_sample, tar_bytes
from .store import Store, UploadError

log = logging.getLogger(__name__)


class ShardWorker:
    """Loads the teacher once; :meth:`run` generates and commits one shard."""

    def __init__(self, cfg: WorkerConfig, teacher: Teacher | None = None):
        """``teacher``: an already loaded one (in-process use, benchmarks); default: load ``cfg.teacher``."""
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.store = Store(cfg.store_url, cfg.storage_options or None)
        self.teacher = teacher or Teacher.load(cfg.teacher, device=cfg.device, **cfg.sampler_overrides)
        self._manifest: pq.ParquetFile | None = None  # opened at the first shard (footer only)
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.facts = self.teacher.describe()
        self._pool = ThreadPoolExecutor(max_workers=encode_threads(cfg.encode_threads), thread_name_prefix="encode")
        self._teacher_lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        return {**self.facts, "worker": self.name}

    def run(self, shard: int, fingerprint: str, check_committed: bool = False) -> dict[str, Any]:
        """Generate manifest rows ``[shard·N, (shard+1)·N)`` and commit them; returns the stats.

        ``fingerprint`` (the job's settings hash) goes into the stats, so a rerun recognises the shard.
        ``check_committed`` (the driver sets it on a retried shard, whose earlier attempt may have
        committed before its result was lost): a shard already committed with this fingerprint is
        returned as it is, never generated or written again.
        """
        if check_committed:
            stats = self.store.committed(shard, fingerprint)
            if stats is not None:
                return {**stats, "reused": True}
        t0 = time.perf_counter()
        # One shard generates at a time. The teacher is released as soon as the shard's last batch is
        # generated: its encodes drain, and the tar is packed and uploaded, while the actor's other
        # shard in flight has the teacher.
        with self._teacher_lock:
            pending, failures, nrows = self._generate_shard(shard)
        samples = [f.result() for f in pending]
        tar = tar_bytes(samples)
        stats = {"samples": len(samples), "failures": failures, "rows": nrows, "worker": self.name,
                 "seconds": round(time.perf_counter() - t0, 3), "fingerprint": fingerprint}
        try:
            return self.store.commit_shard(shard, tar, stats)
        except Exception as e:  # the driver's circuit breaker counts these (docs/generation.md, Faults)
            raise UploadError(f"shard {shard}: writing to {self.cfg.store_url} failed: {type(e).__name__}: {e}") from e

    def rows(self, shard: int) -> list[dict[str, Any]]:
        """The shard's manifest rows, read from the row groups that hold them."""
        if self._manifest is None:
            # 1 MiB blocks: a row group or two per read, not s3fs's default 50 MiB read-ahead. Passed
            # to fs.open: fsspec.open would hand it to the filesystem's constructor (s3fs refuses it).
            fs, path = fsspec.core.url_to_fs(self.cfg.manifest, **(self.cfg.storage_options or {}))
            f = fs.open(path, "rb", block_size=2**20)
            self._manifest = pq.ParquetFile(f)
        rows = rows_of(shard, self.cfg.shard_size)
        return read_rows(self._manifest, rows.start, len(rows)).to_pylist()

    def _generate_shard(self, shard: int) -> tuple[list[Future], list[dict[str, Any]], int]:
        """Generate the shard's rows; returns the samples' encode futures in manifest order, the failed
        rows and the row count. Encoding runs on the pool and is not waited for here."""
        first = rows_of(shard, self.cfg.shard_size).start
        rows = self.rows(shard)
        default = self.teacher.default_size
        order = sorted(range(len(rows)), key=lambda i: (rows[i].get("height") or default,
                                                        rows[i].get("width") or default, i))
        encoded: dict[int, Future] = {}
        failures: list[dict[str, Any]] = []
        for group in _batches(order, rows, default, self.cfg.batch_size):
            for i, result in self._generate(rows, group, default):
                if isinstance(result, Exception):
                    if self.cfg.on_sample_error == "fail":
                        raise RuntimeError(f"shard {shard}: sample {rows[i]['prompt_id']} failed: {result!r}") from result
                    failures.append({"prompt_id": rows[i]["prompt_id"], "row": first + i,
                                     "reason": f"{type(result).__name__}: {result}"})
                else:
                    encoded[i] = self._pool.submit(self._encode, rows[i], *result)
        return [encoded[i] for i in sorted(encoded)], failures, len(rows)  # manifest order

    def _generate(self, rows: list[dict], idx: list[int], default: int):
        """Yield (row index, (noise, mid, latent, image, seconds) or the exception) for one batch.

        A batch that raises is retried one sample at a time, so one bad sample fails alone.
        """
        h, w = rows[idx[0]].get("height") or default, rows[idx[0]].get("width") or default
        if "mid" in self.cfg.save and self.teacher.mid_index_at(h, w) is None:
            t = self.teacher
            reason = ValueError(f"no mid state at {h}×{w}: σ_mid={t.sampler.sigma_mid:g} is not a step of this "
                                f"{t.family.name} teacher's {t.sampler.num_steps}-step grid at that size "
                                f"({[round(s, 4) for s in t.sigmas_at(h, w)]}; a scheduler that shifts by "
                                "resolution moves it): generate that size without --save mid, or at the teacher's "
                                f"default size, {t.default_size}×{t.default_size}")
            for i in idx:
                yield i, reason
            return
        try:
            t0 = time.perf_counter()
            out = self.teacher.generate([rows[i]["prompt"] for i in idx], [rows[i]["seed"] for i in idx], h, w,
                                        decode=self.cfg.image_format != "none",
                                        negative_prompts=[rows[i].get("negative_prompt") or "" for i in idx])
            per = (time.perf_counter() - t0) / len(idx)
            for k, i in enumerate(idx):
                yield i, (out.noise[k], None if out.mid is None else out.mid[k], out.latent[k],
                          None if out.images is None else out.images[k], per, h, w)
        except Exception as e:  # isolate the failing sample(s)
            if len(idx) == 1:
                yield idx[0], e
                return
            log.warning("batch of %d failed (%s); retrying one sample at a time", len(idx), e)
            alone = [r for i in idx for r in self._generate(rows, [i], default)]
            if all(isinstance(r, Exception) for _, r in alone):
                # Every sample fails alone too: the teacher or device is broken, not a sample.
                # Fail the shard (it is retried, on a fresh actor if this one dies) rather than
                # committing it with every row marked failed.
                raise RuntimeError(f"every sample of a batch failed; first error: {e!r}") from e
            yield from alone

    def _encode(self, row: dict, noise: torch.Tensor, mid: torch.Tensor | None, latent: torch.Tensor,
                image: np.ndarray | None, seconds: float, h: int, w: int) -> dict[str, Any]:
        """One sample's tar members (all bytes), in the store format (docs/store.md)."""
        meta = {"prompt_id": row["prompt_id"], "seed": int(row["seed"]), "height": h, "width": w,
                "noise_sha256": noise_fingerprint(noise), "seconds": round(seconds, 4),
                **self.facts}
        for k, v in row.items():
            if k not in ("prompt", "prompt_id", "seed", "height", "width"):
                meta.setdefault(k, v)
        save = self.cfg.save
        return encode_sample(row["prompt_id"], row["prompt"], meta, latent.numpy(),
                             mid=mid.numpy() if "mid" in save and mid is not None else None,
                             noise=noise.numpy() if "noise" in save else None,
                             image=image, image_format=self.cfg.image_format)


def encode_threads(requested: int) -> int:
    """The encode pool's size: ``requested``, or (0) the CPUs this process may run on, at most 8."""
    if requested > 0:
        return requested
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def read_rows(pf: pq.ParquetFile, start: int, n: int) -> pa.Table:
    """Rows ``[start, start + n)`` of a parquet file, reading only the row groups that hold them
    (memory: those groups, not the file)."""
    md = pf.metadata
    groups, offset, first = [], 0, 0
    for g in range(md.num_row_groups):
        size = md.row_group(g).num_rows
        if offset < start + n and offset + size > start:
            if not groups:
                first = offset
            groups.append(g)
        offset += size
    if not groups:
        return pf.schema_arrow.empty_table()
    return pf.read_row_groups(groups).slice(start - first, n)


def _batches(order: list[int], rows: list[dict], default: int, size: int):
    """Consecutive runs of ``order`` with one (height, width), at most ``size`` long."""
    batch: list[int] = []
    key = None
    for i in order:
        k = (rows[i].get("height") or default, rows[i].get("width") or default)
        if batch and (k != key or len(batch) == size):
            yield batch
            batch = []
        batch.append(i)
        key = k
    if batch:
        yield batch
