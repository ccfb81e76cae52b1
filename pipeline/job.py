"""The generation job (Ray driver): manifest → shard store, resumable, with retries.

The unit of work is a shard (a fixed row range of the manifest). The driver takes the store's
lease, checks that an existing store was made with the same manifest, teacher and sampler, then
hands uncommitted shards to ``ShardWorker`` actors. A task that raises is retried up to
``max_shard_retries`` times, on another actor; an actor that dies (killed, OOM, preempted) is
replaced by a new one and its shard is put back in the queue (``ray.util.ActorPool`` does neither:
ray #50313). What else goes wrong on a fleet, and what the driver does (docs/generation.md,
Faults): actors that do not start in ``startup_timeout`` are replaced and then left out; an actor
that fails several shards while others succeed is replaced without those failures counting
against the shards; a shard past its deadline has its actor killed and is requeued; a run of
failed uploads stops the job; and a driver that cannot renew its lease stops writing.

Start-up costs a few requests whatever the store's size: the committed shards come from one listing
of ``shards/`` plus the last ``index.json``, and only stats the index lacks are read (concurrently).
The driver keeps the stats its tasks return, rewrites ``index.json`` at intervals while it runs,
and at the end writes ``index.json``, ``failed.parquet`` and the dataset card from them, with no
second pass over the store; a driver that died leaves a store the next run completes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import queue as stdqueue
import statistics
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from twostep.prompts.manifest import read_meta
from twostep.teacher.core import check_teacher_spec

from .config import GenerateConfig, WorkerConfig
from .layout import (
    CARD,
    FAILED,
    INDEX,
    INDEX_PART,
    INDEX_PART_SHARDS,
    MANIFEST,
    STORE_FORMAT,
    index_head,
    index_part,
    num_shards,
    shard_pattern,
)
from .shardformat import members_text
from .store import Store, StoreError, UploadError
from .worker import ShardWorker

log = logging.getLogger("twostep.generate")


def fingerprint(manifest_hash: str, cfg: GenerateConfig, facts: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """What makes two runs write the same store; its hash goes into every shard's stats."""
    ident = {"format": STORE_FORMAT, "manifest_hash": manifest_hash, "shard_size": cfg.shard_size,
             "teacher": facts["teacher"], "revision": facts["revision"], "weights": facts.get("weights"),
             "dtype": facts["dtype"], "device": facts["device"], "sampler_hash": facts["sampler_hash"],
             "image_format": cfg.image_format, "save": sorted(cfg.save)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16], ident


def run_generation(cfg: GenerateConfig, worker_cls: type[ShardWorker] = ShardWorker) -> dict[str, Any]:
    """Run the job; returns the summary written into index.json. ``cfg.manifest`` is a local path or
    a URL (``s3://…``, ``gs://…``, ``https://…``; fetched with fsspec and ``cfg.storage_options``).

    ``worker_cls``: the actor class, :class:`ShardWorker` or a subclass of it (the fault tests pass
    one whose process dies mid-shard)."""
    check_teacher_spec(cfg.teacher, "--teacher")  # before Ray starts or the store is touched
    t0 = time.time()
    if "://" not in cfg.manifest:
        return _run(cfg, t0, cfg.manifest, worker_cls)
    # a manifest in a bucket (the usual case on a cluster): the driver works on a local copy
    with tempfile.TemporaryDirectory(prefix="twostep-manifest-") as tmp:
        local = os.path.join(tmp, MANIFEST)
        log.info("fetching the manifest %s", cfg.manifest)
        try:
            fsspec.core.url_to_fs(cfg.manifest, **cfg.storage_options)[0].get(cfg.manifest, local)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--manifest {cfg.manifest}: not found") from e
        return _run(dataclasses.replace(cfg, manifest=local), t0, cfg.manifest, worker_cls)


def _run(cfg: GenerateConfig, t0: float, source: str, worker_cls: type[ShardWorker]) -> dict[str, Any]:
    """The job on a local manifest file; ``source`` is what the user named, for messages."""
    import ray

    ours = not ray.is_initialized()  # a cluster this job starts, it stops: its workers and their output end here
    manifest_hash, _ = read_meta(cfg.manifest)
    if not manifest_hash:
        raise StoreError(f"{source}: no manifest hash in its footer; build it with twostep prompts "
                         "build")
    rows = pq.read_metadata(cfg.manifest).num_rows
    shards = num_shards(rows, cfg.shard_size)
    store = Store(cfg.out, cfg.storage_options or None)
    owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    store.acquire_lease(owner, cfg.lease_ttl)
    keeper = _LeaseKeeper(store, owner, ttl=cfg.lease_ttl)
    actors = None
    try:
        if cfg.overwrite:
            store.remove_all()
        cleaned = store.clean_incomplete()  # what dead writers left: no live writer holds the lease
        if any(cleaned.values()):
            log.info("removed %d temporary files and aborted %d incomplete uploads left by earlier writers",
                     cleaned["tmp_files"], cleaned["multipart_uploads"])
        _copy_manifest(store, cfg, manifest_hash)
        _init_ray(ray, cfg)
        actors = _Actors(ray, cfg, store, worker_cls)
        facts = actors.start(guard=keeper.check)
        fp, ident = fingerprint(manifest_hash, cfg, facts)
        old = _index_of_these_settings(store, fp, ident, cfg)
        # One listing plus the last index, not two round trips per shard (docs/store.md, Commit marker).
        old_entries = store.index_entries(old) if old else []
        committed = {i: s for i, s in store.committed_shards(fp, old, entries=old_entries).items() if i < shards}
        # parts are rewritten only where the old index lacks shards (or was of the inline version)
        known = {e["shard"] for e in old_entries} if old and old.get("index_version") else set()
        index = _IndexWriter(store, fp, ident, shards, facts, committed, cfg, guard=keeper.check, known=known)
        del committed  # the writer keeps the entries compact
        if old is None:  # records the settings at once, for a rerun after a crash
            index.write(time.time() - t0)
        todo = np.flatnonzero(~index.records.present).tolist()
        log.info("%d shards of %d rows; %d committed already, %d to do; store %s",
                 shards, cfg.shard_size, shards - len(todo), len(todo), cfg.out)
        failed_shards = _dispatch(actors, todo, cfg, keeper, fp, index, t0)
        keeper.check()
        summary = write_index(store, fp, ident, shards, facts, time.time() - t0, failed_shards, writer=index)
    finally:
        if actors is not None:
            actors.kill_all()
        keeper.stop()
        store.release_lease(owner)
        if ours and ray.is_initialized():
            ray.shutdown()
    return summary


class _LeaseKeeper(threading.Thread):
    """Renews the store's lease every ``ttl / 5`` from the moment it is taken (teacher loading and
    index writing included). A renewal that fails (a 503, a timeout, S3's 409) is retried with
    back-off. :meth:`check` raises once another driver took the lease, or once the lease may have
    expired because no renewal got through: the driver then stops dispatching and writes nothing
    more (docs/generation.md, Faults)."""

    def __init__(self, store: Store, owner: str, ttl: float = 300.0, every: float | None = None):
        super().__init__(daemon=True, name="lease")
        self.store, self.owner, self.ttl = store, owner, ttl
        self.every = ttl / 5 if every is None else every
        self.lost: str | None = None
        self.error: str | None = None  # the last renewal error
        # Valid until this monotonic time: the lease's ttl from just before the last successful write
        # of it, less a margin for clocks and the time a write takes.
        self.valid_until = time.monotonic() + 0.9 * ttl
        self._halt = threading.Event()
        self.start()

    def run(self) -> None:
        wait = self.every
        while not self._halt.wait(wait):
            t = time.monotonic()
            try:
                self.lost = self.store.renew_lease(self.owner, self.ttl)
            except Exception as e:  # any failure to renew is retried, then fences
                self.error = f"{type(e).__name__}: {str(e)[:300]}"
                log.warning("renewing the lease of %s failed (%s); retrying", self.store.url, self.error)
                wait = min(self.every, max(0.5, (self.valid_until - time.monotonic()) / 4))
                continue
            if self.lost is not None:
                return
            self.valid_until, self.error, wait = t + 0.9 * self.ttl, None, self.every

    def check(self) -> None:
        if self.lost is not None:
            raise StoreError(f"{self.store.url}: the lease was taken by {self.lost}; stopping so two drivers "
                             "do not write one store")
        if time.monotonic() >= self.valid_until:
            raise StoreError(f"{self.store.url}: the lease could not be renewed before it expired (last error: "
                             f"{self.error}); stopping, and writing nothing more to the store")

    def stop(self) -> None:
        self._halt.set()


def _init_ray(ray, cfg: GenerateConfig) -> None:
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    # The workers' output (teacher loading bars, their log lines) and Ray's INFO lines reach this
    # terminal only when the libraries log at INFO (twostep -v); a failing shard's error comes back
    # as its exception either way, and the workers' logs stay in Ray's session folder.
    verbose = logging.getLogger().isEnabledFor(logging.INFO)
    logs = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    if address:
        ray.init(address=address, **logs)
    else:  # the embedded default: a local cluster sized to this machine
        ray.init(include_dashboard=False, **logs)


class _Actors:
    """The worker actors, with their CPU/GPU shares and torch thread counts, one per slot. An actor's
    identity is its slot and the slot's generation (bumped at each replacement). A slot whose actors
    keep failing to start or to finish a shard is left out (:attr:`down`)."""

    def __init__(self, ray, cfg: GenerateConfig, store: Store, worker_cls: type[ShardWorker]):
        self.ray, self.cfg = ray, cfg
        cpus = ray.cluster_resources().get("CPU", 1)
        if not cfg.gpus_per_worker and cpus < cfg.num_workers:
            raise ValueError(f"--num-workers {cfg.num_workers} needs at least as many CPUs; the Ray cluster has "
                             f"{cpus:g}")
        self.cpus = 1 if cfg.gpus_per_worker else max(1, int(cpus // cfg.num_workers))
        # Workers read the store's copy of the manifest, which every node of a cluster can reach.
        self.wcfg = WorkerConfig(**cfg.shard_settings(), store_url=store.url_of(""), manifest=store.url_of(MANIFEST),
                                 threads=0 if cfg.gpus_per_worker else self.cpus)
        remote = ray.remote(worker_cls).options(num_cpus=self.cpus, num_gpus=cfg.gpus_per_worker,
                                                max_restarts=0, max_task_retries=0, max_concurrency=2)
        self.remote = remote
        self.handles = [remote.remote(self.wcfg) for _ in range(cfg.num_workers)]
        self.gen = [0] * cfg.num_workers
        self.strikes = [0] * cfg.num_workers  # replacements in a row without a shard done
        self.down: dict[int, str] = {}  # slot → why it was left out

    def actor_id(self, k: int) -> tuple[int, int]:
        return k, self.gen[k]

    def start(self, guard: Callable[[], None] = lambda: None) -> dict[str, Any]:
        """Wait up to ``startup_timeout`` for every actor to load its teacher and describe itself.
        One that fails is replaced (``max_actor_restarts`` times a slot); one still not up at the
        deadline, or out of replacements, is left out. Returns the teacher's facts; raises when no
        actor came up, or when they disagree on the sampler. ``guard`` (the lease check) is called at
        least once a second while it waits: a driver that lost its lease stops during start-up too."""
        ray, n = self.ray, len(self.handles)
        deadline = time.monotonic() + self.cfg.startup_timeout
        pending = {h.describe.remote(): k for k, h in enumerate(self.handles)}
        facts: dict[int, dict[str, Any]] = {}
        while pending and time.monotonic() < deadline:
            guard()
            done, _ = ray.wait(list(pending), num_returns=1, timeout=min(1.0, max(0.0, deadline - time.monotonic())))
            if not done:
                continue
            k = pending.pop(done[0])
            try:
                facts[k] = ray.get(done[0])
            except Exception as e:  # the constructor raised, or the actor died or could not be placed
                reason = f"{type(e).__name__}: {_last_line(e)}"
                if self.replace(k, reason):
                    pending[self.handles[k].describe.remote()] = k
        for k in pending.values():  # still loading at the deadline (a node without its GPU, say)
            self._leave_out(k, f"not started after {self.cfg.startup_timeout:g} s")
        if not facts:
            raise StoreError("no worker started: " + "; ".join(f"worker {k}: {why}" for k, why in sorted(self.down.items())))
        if self.down:
            log.warning("%d of %d workers did not start and are left out (%s); running with %d", len(self.down), n,
                        "; ".join(f"worker {k}: {why}" for k, why in sorted(self.down.items())), len(facts))
        first = facts[min(facts)]
        for f in facts.values():
            if f["sampler_hash"] != first["sampler_hash"]:
                raise StoreError("workers disagree on the sampler settings; check the teacher folder on every node")
        self.strikes = [0] * n  # start-up replacements do not count against the job's
        return first

    def replace(self, k: int, reason: str) -> bool:
        """A new actor in slot k (the old one is killed: it may only be unreachable, not dead); False,
        and the slot left out, once it has been replaced ``max_actor_restarts`` times in a row
        without a shard done."""
        self.ray.kill(self.handles[k], no_restart=True)
        self.strikes[k] += 1
        if self.strikes[k] > self.cfg.max_actor_restarts:
            self._leave_out(k, f"replaced {self.cfg.max_actor_restarts} times in a row; last: {reason}")
            return False
        log.warning("worker %d: %s; replacing it", k, reason)
        self.gen[k] += 1
        self.handles[k] = self.remote.remote(self.wcfg)
        return True

    def _leave_out(self, k: int, why: str) -> None:
        self.ray.kill(self.handles[k], no_restart=True)
        self.down[k] = why
        log.warning("worker %d left out: %s", k, why)

    def kill_all(self) -> None:
        """End every actor now, whatever it is doing: when the job ends, and above all when it stops on
        an error (a lost lease), so that no shard is written after the driver has stopped and no
        actor outlives the job on a cluster that does."""
        for h in self.handles:
            self.ray.kill(h, no_restart=True)


def _last_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return (lines[-1] if lines else repr(e))[:400]


ROW_GROUP_ROWS = 16_384
"""Rows a manifest row group may hold in the store's copy (after re-chunking a manifest written with
larger ones): each worker decodes the row groups that hold its shard's rows."""


def _copy_manifest(store: Store, cfg: GenerateConfig, manifest_hash: str) -> None:
    """Put the manifest into the store, or check that the copy there is the same manifest. A
    manifest whose row groups are over 4 × :data:`ROW_GROUP_ROWS` rows (one huge group, say: every
    shard would decode all of it) is re-chunked into groups of whole shards, about that size; the
    rows, their order and the footer's hash stay as they are."""
    if store.exists(MANIFEST):
        with store.fs.open(store.path(MANIFEST), "rb") as f:
            stored = (pq.read_metadata(f).metadata or {}).get(b"twostep.manifest_hash", b"").decode()
        if stored == manifest_hash:
            return
        raise StoreError(f"{cfg.out} holds another manifest (hash {stored[:12]}…, yours {manifest_hash[:12]}…); "
                         "use another --out, or --overwrite to replace it")
    meta = pq.read_metadata(cfg.manifest)
    largest = max((meta.row_group(i).num_rows for i in range(meta.num_row_groups)), default=0)
    if largest <= 4 * ROW_GROUP_ROWS:
        store.put_file(MANIFEST, cfg.manifest)
        return
    size = cfg.shard_size * max(1, ROW_GROUP_ROWS // cfg.shard_size)
    log.info("the manifest has row groups of up to %d rows; the store's copy is re-chunked into groups of %d "
             "(whole shards), so each worker decodes only those that hold its rows", largest, size)
    with tempfile.TemporaryDirectory(prefix="twostep-manifest-") as tmp:
        out = os.path.join(tmp, MANIFEST)
        source = pq.ParquetFile(cfg.manifest)
        with pq.ParquetWriter(out, source.schema_arrow, compression="zstd") as writer:
            for batch in source.iter_batches(batch_size=size):
                writer.write_table(pa.Table.from_batches([batch]), row_group_size=size)
            writer.add_key_value_metadata({k: v for k, v in (meta.metadata or {}).items() if k.startswith(b"twostep.")})
        store.put_file(MANIFEST, out)


def _index_of_these_settings(store: Store, fp: str, ident: dict, cfg: GenerateConfig) -> dict[str, Any] | None:
    """The store's index.json (None when there is none), after checking that it records these
    settings (fingerprint ``fp``): a store made with others is refused."""
    index = store.read_index()
    if index and index.get("fingerprint") != fp:
        old = index.get("identity", {})
        diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
        raise StoreError(f"{cfg.out} was made with other settings ({', '.join(diff)} differ); "
                         "use another --out, or --overwrite to replace it")
    return index


class _Records:
    """The committed shards' index entries (:data:`INDEX_ENTRY`), compact: a few numpy arrays indexed
    by shard (49 bytes a shard; 49 MB at a million) and the recorded sample failures of the shards
    that have any."""

    def __init__(self, num_shards: int, stats: dict[int, dict[str, Any]] | None = None):
        self.present = np.zeros(num_shards, bool)
        self.samples = np.zeros(num_shards, np.int32)
        self.nbytes = np.zeros(num_shards, np.int64)
        self.sha = np.zeros((num_shards, 32), np.uint8)
        self.failures: dict[int, list[dict[str, Any]]] = {}
        for st in (stats or {}).values():
            self.add(st)

    def add(self, stats: dict[str, Any]) -> int:
        i = stats["shard"]
        self.present[i], self.samples[i], self.nbytes[i] = True, stats["samples"], stats["bytes"]
        self.sha[i] = np.frombuffer(bytes.fromhex(stats["sha256"]), np.uint8)
        if stats["failures"]:
            self.failures[i] = list(stats["failures"])
        else:
            self.failures.pop(i, None)
        return i

    def __len__(self) -> int:
        return int(self.present.sum())

    def total_samples(self) -> int:
        return int(self.samples[self.present].sum())

    def parts(self) -> list[int]:
        """The index parts that hold a committed shard."""
        return np.unique(np.flatnonzero(self.present) // INDEX_PART_SHARDS).tolist()

    def snapshot(self, parts: set[int]) -> dict[int, tuple]:
        """Copies of these parts' records (a few arrays' slices): what :func:`.layout.index_part` turns into
        each part's file, on another thread, while this one goes on adding."""
        fails: dict[int, dict] = {k: {} for k in parts}
        for i, f in self.failures.items():  # one pass, whatever the parts
            if i // INDEX_PART_SHARDS in fails:
                fails[i // INDEX_PART_SHARDS][i] = f
        out = {}
        for k in sorted(parts):
            lo, hi = k * INDEX_PART_SHARDS, min(len(self.present), (k + 1) * INDEX_PART_SHARDS)
            out[k] = (lo, self.present[lo:hi].copy(), self.samples[lo:hi].copy(), self.nbytes[lo:hi].copy(),
                      self.sha[lo:hi].copy(), fails[k])
        return out


class _IndexWriter:
    """The committed shards' entries as the driver learns them (start-up scan, then each task's
    result), and ``index.json`` written from them every ``index_every_shards`` new shards or
    ``index_every_s`` seconds, so a driver killed mid-job leaves an index the next run starts from.

    The entries are kept compact (:class:`_Records`), and ``index.json`` holds them in parts of
    4,096 shards: a write uploads only the parts with new shards, plus the small head, on a
    background thread, so the dispatch loop only gathers those parts' entries and a write's cost
    does not grow with the store. Both intervals still stretch as the store grows (at least a
    twentieth of the committed shards between writes, and 100 times the last write's duration).
    Every write is fenced by ``guard`` (the lease)."""

    def __init__(self, store: Store, fp: str, ident: dict, num_shards: int, facts: dict,
                 stats: dict[int, dict[str, Any]], cfg: GenerateConfig, guard=lambda: None,
                 known: set[int] | None = None):
        self.store, self.fp, self.ident, self.num_shards, self.facts = store, fp, ident, num_shards, facts
        self.guard = guard  # raises unless the lease is known to be held: every write is fenced by it
        self.records = _Records(num_shards, stats)
        # parts to upload: those with shards the store's index.json does not hold already (``known``)
        self.dirty = {i // INDEX_PART_SHARDS for i in stats if known is None or i not in known}
        self.every_shards, self.every_s = cfg.index_every_shards, cfg.index_every_s
        self.new, self.last, self.took = 0, time.monotonic(), 0.0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="index")
        self._pending: Future | None = None

    def add(self, stats: dict[str, Any]) -> None:
        self.dirty.add(self.records.add(stats) // INDEX_PART_SHARDS)
        self.new += 1

    def maybe_write(self, seconds: float) -> None:
        if self._pending is not None:
            if not self._pending.done():
                return  # the last write is still uploading: its parts stay dirty for the next
            self._finish()
        if not self.new:
            return
        if (self.new >= max(self.every_shards, len(self.records) // 20)
                or time.monotonic() - self.last >= max(self.every_s, 100 * self.took)):
            self.write(seconds, wait=False)

    def write(self, seconds: float, wait: bool = True, **final: Any) -> dict[str, Any]:
        """Upload the changed parts and then the head: ``in progress``, or at the end the final head
        (``final``: :func:`.layout.index_head`'s ``missing``, ``failed_shards`` and ``failed_samples``).
        ``wait``: return after the upload; else it runs on the background thread (its failure is
        raised at the next call)."""
        if self._pending is not None:
            self._finish()
        parts = self.records.snapshot(self.dirty)  # their files are made on the background thread
        self.dirty = set()
        head = index_head(fingerprint=self.fp, identity=self.ident, num_shards=self.num_shards,
                          committed=len(self.records), samples=self.records.total_samples(), teacher=self.facts,
                          seconds=seconds, parts=self.records.parts(), **final)
        self.new, self.last = 0, time.monotonic()
        self._pending = self._pool.submit(self._upload, parts, head)
        if wait:
            self._finish()
        return head

    def _upload(self, parts: dict[int, tuple], head: dict[str, Any]) -> None:
        t0 = time.monotonic()
        for k, snapshot in parts.items():
            self.guard()
            self.store.put_bytes(INDEX_PART.format(k), index_part(*snapshot))
        self.guard()
        self.store.put_json(INDEX, head, indent=None)
        self.took = time.monotonic() - t0

    def flush(self) -> None:
        """Wait for a write in flight (raising its error)."""
        if self._pending is not None:
            self._finish()

    def _finish(self) -> None:
        pending, self._pending = self._pending, None
        try:
            pending.result()
        except Exception:
            self.dirty |= set(range(math.ceil(self.num_shards / INDEX_PART_SHARDS)))  # rewrite all next time
            raise


def _dispatch(actors: _Actors, todo: list[int], cfg: GenerateConfig, keeper: _LeaseKeeper, fp: str,
              index: _IndexWriter, t_job: float) -> dict[int, str]:
    """Run shards on the actors until all are committed or out of retries; each committed shard's
    stats go to ``index`` (which writes index.json at intervals). Faults (docs/generation.md, Faults):

    - a failed shard is retried on an actor it has not failed on, and is the shard's fault (given
      up after ``max_shard_retries`` retries) only after failing on several;
    - an actor that fails ``actor_fail_limit`` distinct shards while other actors succeed is
      replaced, and those failures are not counted against the shards;
    - a shard past its deadline (:func:`_shard_deadline`) has its actor killed and replaced and is
      requeued;
    - ``max_upload_failures`` failed uploads in a row stop the job with the upload's error;
    - nothing is dispatched or written once the lease is not known to be held.
    """
    from ray.exceptions import RayActorError, RayError, RayTaskError

    queue, attempts, failed = deque(todo), dict.fromkeys(todo, 0), {}
    reasons: dict[int, str] = {}
    tried: dict[int, set] = {}  # shard → the actors it failed on
    actor_failed: dict[tuple[int, int], set[int]] = {}  # actor → the shards it failed
    succeeded: set[tuple[int, int]] = set()  # actors that committed a shard
    durations: list[float] = []
    upload_failures = 0
    inflight: dict[Any, tuple[int, int, Any, tuple[int, int], float]] = {}  # future → slot, shard, handle, actor, start
    # Two slots per actor: shard k+1 generates while shard k uploads (the worker serialises generation).
    idle = deque([k for _ in range(2) for k in range(len(actors.handles)) if k not in actors.down])
    # Each task's completion puts its future on ``finished`` (a callback), so the loop's cost per
    # shard does not grow with the tasks in flight as ray.wait over all of them does.
    finished: stdqueue.SimpleQueue = stdqueue.SimpleQueue()
    samples = failures = 0
    t0 = time.time()
    bar = tqdm(total=len(todo), desc="shards", unit="shard")

    def retry(shard: int, reason: str, actor: tuple[int, int] | None) -> None:
        reasons[shard] = reason
        if actor is not None:
            tried.setdefault(shard, set()).add(actor)
        _retry(shard, attempts, cfg, queue, failed, reason)

    while queue or inflight:
        keeper.check()
        waiting = []
        live = {actors.actor_id(k) for k in range(len(actors.handles)) if k not in actors.down}
        while queue and idle:
            k = idle.popleft()
            if k in actors.down:
                continue
            actor = actors.actor_id(k)
            shard = _pick(queue, tried, actor, live)
            if shard is None:  # every queued shard near the front failed on this actor already
                waiting.append(k)
                continue
            handle = actors.handles[k]
            # A retried shard may have been committed by an attempt whose result was lost: the worker
            # checks first and never writes it again.
            retried = {"check_committed": True} if attempts[shard] > 0 or shard in tried else {}
            fut = handle.run.remote(shard, fp, **retried).future()
            inflight[fut] = (k, shard, handle, actor, time.monotonic())
            fut.add_done_callback(finished.put)
        idle.extend(waiting)
        if not inflight and len(actors.down) == len(actors.handles):
            raise StoreError("every worker is left out: " + "; ".join(
                f"worker {k}: {why}" for k, why in sorted(actors.down.items())))
        limit = _shard_deadline(cfg, durations)
        first_due = min(start for *_, start in inflight.values()) + limit
        done = []
        with contextlib.suppress(stdqueue.Empty):
            done.append(finished.get(timeout=min(5.0, max(0.05, first_due - time.monotonic()))))
            while True:  # and whatever else has finished meanwhile: one pass over a fleet's burst
                done.append(finished.get_nowait())
        for fut in done:
            if fut not in inflight:  # a task of an actor already killed for a deadline
                continue
            k, shard, handle, actor, _ = inflight.pop(fut)
            current = handle is actors.handles[k]
            try:
                stats = fut.result()
                index.add(stats)
                samples += stats["samples"]
                failures += len(stats["failures"])
                upload_failures = 0
                succeeded.add(actor)
                actor_failed.pop(actor, None)  # a failure streak ends with a shard done
                if current:
                    actors.strikes[k] = 0
                if not stats.get("reused"):
                    durations.append(float(stats.get("seconds", 0.0)))
                bar.update(1)
            except RayActorError as e:  # the process died: start a new actor, put the shard back
                log.warning("worker %d died on shard %d (%s); requeueing it", k, shard, type(e).__name__)
                retry(shard, f"worker died: {type(e).__name__}", None)
                if current:  # its other in-flight shard fails too: replace once
                    actors.replace(k, f"died on shard {shard}")
            except RayTaskError as e:
                reason = _last_line(e)
                if isinstance(getattr(e, "cause", None), UploadError) or isinstance(e, UploadError):
                    upload_failures += 1
                    if upload_failures >= cfg.max_upload_failures:
                        raise StoreError(f"{upload_failures} shard uploads in a row failed, none succeeded between "
                                         f"them; stopping rather than generate the rest for nothing. Last: "
                                         f"{reason}") from e
                log.warning("shard %d failed on worker %d: %s", shard, k, reason[:300])
                actor_failed.setdefault(actor, set()).add(shard)
                retry(shard, reason[:500], actor)
            except RayError as e:  # lost objects, unserialisable errors, system errors: retry the shard
                log.warning("shard %d: %s", shard, e)
                retry(shard, f"{type(e).__name__}: {str(e)[:400]}", actor)
            idle.append(k)
        _blame(actors, actor_failed, succeeded, attempts, failed, queue, cfg)
        now = time.monotonic()
        for fut, (k, shard, handle, actor, start) in list(inflight.items()):
            if now - start > limit and handle is actors.handles[k]:
                log.warning("shard %d passed its %.0f s deadline on worker %d; killing the worker and requeueing",
                            shard, limit, k)
                inflight.pop(fut)
                retry(shard, f"timed out after {limit:.0f} s", actor)
                actors.replace(k, f"shard {shard} passed its {limit:.0f} s deadline")
                idle.append(k)
        if done:  # drawn at tqdm's own pace (refresh=False), not once a shard
            rate = samples / max(time.time() - t0, 1e-9)
            bar.set_postfix(img_s=f"{rate:.2f}", failed_samples=failures, failed_shards=len(failed), refresh=False)
        index.maybe_write(time.time() - t_job)  # fenced by the lease (guard); the loop's top checks it too
    bar.close()
    return failed


def _blame(actors: _Actors, actor_failed: dict, succeeded: set, attempts: dict, failed: dict, queue: deque,
           cfg: GenerateConfig) -> None:
    """Replace each actor that failed ``actor_fail_limit`` distinct shards in a row while another
    actor has committed one: the actor is at fault, not the shards, so their attempts there are
    given back (a shard given up on because of it goes back in the queue)."""
    for k in range(len(actors.handles)):
        actor = actors.actor_id(k)
        shards = actor_failed.get(actor, set())
        if k in actors.down or len(shards) < cfg.actor_fail_limit or not succeeded - {actor}:
            continue
        for s in shards:
            attempts[s] = max(0, attempts[s] - 1)
            if s in failed and attempts[s] <= cfg.max_shard_retries:
                del failed[s]
                queue.append(s)
        del actor_failed[actor]
        actors.replace(k, f"failed {len(shards)} shards in a row while other workers succeed")


def _pick(queue: deque, tried: dict[int, set], actor: tuple[int, int], live: set, scan: int = 64) -> int | None:
    """The first shard near the front of ``queue`` (removed from it) that has not failed on
    ``actor``, or has failed on every live actor (then any may retry it); None if there is none."""
    for j, shard in enumerate(queue):
        if j >= scan:
            return None
        failed_on = tried.get(shard, ())
        if actor not in failed_on or live <= failed_on:
            del queue[j]
            return shard
    return None


def _shard_deadline(cfg: GenerateConfig, durations: list[float]) -> float:
    """``shard_timeout``, or 10 times the median shard time so far, at least 60 s; 1800 s before a
    shard has ended (a first shard includes warm-up)."""
    if cfg.shard_timeout is not None:
        return cfg.shard_timeout
    if not durations:
        return 1800.0
    return max(60.0, 10 * statistics.median(durations[-1000:]))


def _retry(shard: int, attempts: dict, cfg: GenerateConfig, queue: deque, failed: dict, reason: str) -> None:
    attempts[shard] += 1
    if attempts[shard] > cfg.max_shard_retries:
        failed[shard] = reason
        log.error("shard %d gave up after %d attempts: %s", shard, attempts[shard], reason)
    else:
        queue.append(shard)


def write_index(store: Store, fp: str, ident: dict, num_shards: int, facts: dict, seconds: float,
                failed_shards: dict[int, str], writer: _IndexWriter | None = None) -> dict[str, Any]:
    """index.json (with its parts), failed.parquet and README.md from the committed shards: those
    ``writer`` (the job's index writer) holds, or when None, what :meth:`Store.committed_shards` finds."""
    if writer is None:
        old = store.read_index()
        found = store.committed_shards(fp, old)
        writer = _IndexWriter(store, fp, ident, num_shards, facts, {i: s for i, s in found.items() if i < num_shards},
                              GenerateConfig(manifest="-", out=store.url))  # known=None: every part written
    records = writer.records
    missing = np.flatnonzero(~records.present).tolist()
    failed_rows = [{**f, "shard": i} for i in sorted(records.failures) for f in records.failures[i]]
    index = writer.write(seconds, wait=True, missing=missing, failed_shards=failed_shards,
                         failed_samples=len(failed_rows))
    table = pa.Table.from_pylist(failed_rows, schema=pa.schema(
        [("prompt_id", pa.string()), ("row", pa.int64()), ("reason", pa.string()), ("shard", pa.int64())]))
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    store.put_bytes(FAILED, buf.getvalue().to_pybytes())
    store.put_bytes(CARD, _card(index).encode())
    return index


def _card(index: dict) -> str:
    ident, t = index["identity"], index["teacher"]
    return f"""# twostep teacher samples

Generated by `twostep generate` from a prompt manifest (`{MANIFEST}`, hash `{ident['manifest_hash']}`).

- teacher: `{t['teacher']}` (revision {t['revision']}), {t['sampler']['num_steps']} steps, guidance {t['sampler']['guidance_scale']}, sigmas {t['sampler']['sigmas']}, sampler hash `{t['sampler_hash']}`
- {index['samples']} samples in {index['committed_shards']} of {index['num_shards']} shards ({ident['shard_size']} rows each); {index['failed_samples']} failed samples (`{FAILED}`); status: {index['status']}
- members per sample: {members_text(ident['save'], ident['image_format'], t['sampler']['mid_sigma'])}
- versions: {json.dumps(t['versions'])}; dtype {t['dtype']} on {t['device']}

Read it with `webdataset.WebDataset("{shard_pattern(index['num_shards'])}")`,
`datasets.load_dataset("webdataset", data_files=...)` or `ray.data.read_webdataset`.
Check it with `twostep verify STORE`.
"""

