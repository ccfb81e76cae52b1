"""The trainer's streaming shard reader: rank/worker split, deterministic order, exact resume.

Reads the generation job's WebDataset shards from any fsspec URL, parsed and validated by
:func:`twostep.pipeline.shardformat.iter_samples` (the format is defined there and in docs/store.md;
``twostep verify`` uses the same parser). Each (rank, loader worker) owns a fixed
slice of a per-epoch shard permutation and reads one whole shard at a time, shuffling only within
it: there is no cross-shard shuffle buffer, so a worker's position is three integers
(epoch, index into its shard list, offset into the shard's permuted order) and resuming from it
is exact (docs/design.md, "Exact resume"). Streams are endless (step-based training): each
worker starts its next epoch by itself, so ranks may see different sample counts without waiting
for each other.

A held-out slice (``heldout_fraction``) is chosen by a hash of each sample's key, so every rank,
loader worker and epoch excludes the same samples and the slice is the same in every run on the
store; :func:`read_heldout` reads it for the discriminator's held-out diagnostics.

``StreamLoader`` wraps a torch ``DataLoader``; it records each logical worker's position from the
batches it has handed out, and on resume rotates DataLoader workers so that the logical worker due
next delivers first (the DataLoader hands out batches round-robin from worker 0).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from twostep.pipeline.layout import INDEX, index_entries, read_index
from twostep.pipeline.shardformat import Sample, ShardFormatError, iter_samples
from twostep.teacher.core import noise_fingerprint, seed_noise

log = logging.getLogger(__name__)

STATE_VERSION = 1
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class ShardInfo:
    """One shard: where it is and, when a store's index.json says so, its sample count and sha256."""

    url: str
    """Absolute fsspec URL or local path."""
    nsamples: int | None = None
    sha256: str | None = None


# --- finding shards -------------------------------------------------------------------------------

def resolve_shards(spec: str | list[str], storage_options: dict | None = None) -> tuple[list[ShardInfo], dict]:
    """Shards named by ``spec``, plus the store's index.json (``{}`` when spec is not one store).

    ``spec``: a store (folder or fsspec URL holding ``index.json``, or that file's URL); or shard
    URLs as a list, a comma-separated string, a brace pattern ``dir/{000000..000009}.tar``, or a
    glob. Raises ``FileNotFoundError`` naming the spec when nothing is found.
    """
    items = list(spec) if isinstance(spec, (list, tuple)) else _split_commas(str(spec))
    if not items:
        raise FileNotFoundError(f"no shards: the shard spec {spec!r} is empty")
    shards: list[ShardInfo] = []
    index: dict = {}
    for item in items:
        found, idx = _resolve_one(item.strip(), storage_options or {})
        shards += found
        index = idx if len(items) == 1 else {}
    return shards, index


def _split_commas(spec: str) -> list[str]:
    """Split at commas outside braces (``{a,b}`` is a brace alternative, not two specs)."""
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in [*parts, cur] if p.strip()]


def _resolve_one(item: str, so: dict) -> tuple[list[ShardInfo], dict]:
    if "{" in item:
        from braceexpand import braceexpand

        urls = list(braceexpand(item))
        fs, path = fsspec.core.url_to_fs(urls[0], **so)
        if not fs.exists(path):  # one existence check: a HEAD per shard on a bucket would be slow
            raise FileNotFoundError(f"no shards found for {item!r}: its first expansion {urls[0]} does not exist")
        return [ShardInfo(u) for u in urls], {}
    root = item[: -len(INDEX)].rstrip("/") if item.endswith(INDEX) else item.rstrip("/")
    fs, path = fsspec.core.url_to_fs(root or ".", **so)
    if fs.exists(f"{path}/{INDEX}"):
        return _store_shards(root, fs, path)
    if any(c in item for c in "*?["):
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
        hits = sorted(p for p in fs.glob(path) if p.endswith(_TAR_SUFFIXES))
        if not hits:
            raise FileNotFoundError(f"no shards (*.tar) match the glob {item!r}")
        return [ShardInfo(p if local else fs.unstrip_protocol(p)) for p in hits], {}
    if fs.isfile(path):
        return [ShardInfo(item)], {}
    raise FileNotFoundError(f"no shards found for {item!r}: not a store (no {INDEX} there), "
                            "not a shard file, and no glob or {a..b} pattern")


def _store_shards(root: str, fs: Any, path: str) -> tuple[list[ShardInfo], dict]:
    """A store's shards from its index.json (``path``: the store's path on ``fs``); relative shard
    urls are joined to the store's URL."""

    def read_bytes(rel: str) -> bytes:
        return fs.cat_file(f"{path}/{rel}")

    index = read_index(read_bytes)
    entries = index_entries(read_bytes, index)
    if not entries:
        raise FileNotFoundError(f"store {root!r} lists no committed shards in {INDEX} (status "
                                f"{index.get('status')!r}); finish the generation job first")
    if index.get("status") not in (None, "complete"):
        log.warning("store %s is %s: %d shards missing", root, index.get("status"),
                    len(index.get("missing_shards") or []))
    shards = []
    for e in entries:
        url = e["url"] if "://" in e["url"] or e["url"].startswith("/") else f"{root}/{e['url']}"
        shards.append(ShardInfo(url, e.get("samples", e.get("nsamples")), e.get("sha256")))
    return shards, index


# --- reading one shard ----------------------------------------------------------------------------

class CorruptShard(Exception):
    """A shard cannot be used (missing, sha256 or sample count differs from index.json, or it breaks
    the store format); the message says why."""


def _fetch(url: str, so: dict, attempts: int = 3) -> bytes:
    """Whole shard bytes. A missing file is corrupt data; other I/O errors are retried, then raised,
    because skipping a shard on a transient network error would make resume inexact."""
    for attempt in range(attempts):
        try:
            with fsspec.open(url, "rb", **so) as f:
                return f.read()
        except FileNotFoundError as e:
            raise CorruptShard(f"missing ({e})") from e
        except OSError as e:
            if attempt == attempts - 1:
                raise
            log.warning("reading %s failed (%s); retrying", url, e)
            time.sleep(2**attempt)
    raise AssertionError("unreachable")


def read_shard(info: ShardInfo, storage_options: dict | None = None, load_mid: bool = True) -> list[Sample]:
    """All samples of one shard, in tar order; raises :class:`CorruptShard` with a reason if unusable.

    The whole shard is validated before any sample is used, so a corrupt shard is skipped whole.
    ``load_mid=False`` drops the mid arrays (they are still checked: every reader refuses the same shards).
    """
    data = _fetch(info.url, storage_options or {})
    if info.sha256 and hashlib.sha256(data).hexdigest() != info.sha256:
        raise CorruptShard(f"sha256 differs from {INDEX} (corrupt, truncated or replaced)")
    try:
        samples = list(iter_samples(data))
    except ShardFormatError as e:
        raise CorruptShard(str(e)) from e
    if not load_mid:
        samples = [dataclasses.replace(s, mid=None) for s in samples]
    if info.nsamples is not None and len(samples) != info.nsamples:
        raise CorruptShard(f"{len(samples)} samples, {INDEX} says {info.nsamples}")
    return samples


def heldout_score(key: str) -> float:
    """A sample's place in [0, 1) by a hash of its key: the sample is held out when it is below the
    held-out fraction (stable across runs, ranks, workers and versions)."""
    return int.from_bytes(hashlib.blake2b(f"heldout:{key}".encode(), digest_size=8).digest(), "big") / 2**64


def read_heldout(shards: list[ShardInfo], fraction: float, limit: int,
                 storage_options: dict | None = None) -> dict[str, Any] | None:
    """The held-out samples (``heldout_score(key) < fraction``) of the first shards that hold them, in
    store order, at most ``limit``, collated into one batch; None when there are none. Reads shards only
    until ``limit`` samples are found (a bounded read on a large store); corrupt shards are skipped."""
    if fraction <= 0 or limit <= 0:
        return None
    stream = ShardStream(shards, shuffle=False, storage_options=storage_options)
    found: list[dict[str, Any]] = []
    for sid, info in enumerate(shards):
        samples = stream._load(sid) or []
        found += [stream._finish(smp, info.url) for smp in samples if heldout_score(smp.key) < fraction]
        if len(found) >= limit:
            break
    if not found:
        return None
    batch = collate_samples([{**x, "_pos": None} for x in found[:limit]])
    batch.pop("_pos")
    return batch


def _order(n: int, *key: int) -> list[int]:
    """A permutation of range(n) from integer keys. Hash-based rather than a library RNG, whose
    streams may change between versions: resuming after an upgrade keeps the same order."""
    tag = ":".join(map(str, key))
    return sorted(range(n), key=lambda i: hashlib.blake2b(f"{tag}:{i}".encode(), digest_size=8).digest())


# --- the stream -------------------------------------------------------------------------------------

def _start() -> dict[str, int]:
    return {"epoch": 0, "index": 0, "offset": 0, "corrupt": 0}


def _fresh(num_workers: int) -> dict[str, Any]:
    return {"next_worker": 0, "corrupt_base": 0, "workers": [_start() for _ in range(num_workers)]}


def _reconcile(saved: dict, identity: dict, num_workers: int | None) -> dict:
    """The saved position if it was taken with this identity (exact resume), else an approximate one:
    every worker starts the lowest saved epoch from its beginning, with a warning."""
    if "workers" not in saved:
        raise ValueError("not a data-loader state (no 'workers' entry)")
    want = {**identity, "version": STATE_VERSION}
    have = {k: saved.get(k) for k in want}
    if num_workers is not None:
        want["num_workers"], have["num_workers"] = num_workers, len(saved["workers"])
    diff = sorted(k for k in want if have[k] != want[k])
    n = num_workers or len(saved["workers"])
    if not diff:
        return {k: copy.deepcopy(saved[k]) for k in ("next_worker", "corrupt_base", "workers")}
    epoch = min(w["epoch"] for w in saved["workers"]) if saved["workers"] else 0
    log.warning("data state was saved with other settings (%s differ: saved %s, now %s); resuming "
                "approximately from the start of epoch %d", ", ".join(diff),
                {k: have[k] for k in diff}, {k: want[k] for k in diff}, epoch)
    corrupt = saved.get("corrupt_base", 0) + sum(w.get("corrupt", 0) for w in saved["workers"])
    return {"next_worker": 0, "corrupt_base": corrupt,
            "workers": [{**_start(), "epoch": epoch} for _ in range(n)]}


class ShardStream(IterableDataset):
    """Endless samples of this rank's shards, split over the DataLoader's workers; resumable.

    Sample dicts: ``key``, ``prompt``, ``seed``, ``latent`` (float32 (C, h, w)), optional ``mid``,
    ``noise`` (float32 (C, h, w), read or regenerated from the seed and checked), and ``_pos``: the
    logical worker and its position *after* this sample.
    """

    def __init__(self, shards: list[ShardInfo], *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, storage_options: dict | None = None, load_mid: bool = True,
                 heldout_fraction: float = 0.0):
        if not shards:
            raise ValueError("ShardStream needs at least one shard")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.shards, self.seed, self.rank, self.world_size = list(shards), int(seed), rank, world_size
        self.shuffle, self.storage_options, self.load_mid = shuffle, storage_options or {}, load_mid
        self.heldout_fraction = float(heldout_fraction)
        self.check_split(1)
        self._resume: dict | None = None
        self._live: dict | None = None  # position when iterated in this process (no loader workers)
        self._bad: dict[str, str] = {}  # corrupt shards seen by this process: no re-download each epoch

    @property
    def shards_hash(self) -> str:
        """Identifies the shard list by names, sizes and sha256 (not the URL prefix: a moved store resumes)."""
        desc = [(s.url.rsplit("/", 1)[-1], s.nsamples, s.sha256) for s in self.shards]
        return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]

    def identity(self) -> dict[str, Any]:
        ident = {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                 "shards_hash": self.shards_hash}
        if self.heldout_fraction:  # absent when 0, so states saved before held-out slices resume exactly
            ident["heldout_fraction"] = self.heldout_fraction
        return ident

    def check_split(self, num_workers: int) -> None:
        """Raise if some (rank, loader worker) would get no shard."""
        if len(self.shards) < self.world_size * num_workers:
            raise ValueError(f"{len(self.shards)} shards cannot be split over {self.world_size} ranks × "
                             f"{num_workers} loader workers: ranks × loader workers must not exceed the "
                             "number of shards (use fewer loader workers or smaller shards)")

    def worker_shards(self, epoch: int, worker: int, num_workers: int) -> list[int]:
        """Indices into ``shards`` that logical ``worker`` of this rank reads in ``epoch``, in order."""
        n = len(self.shards)
        perm = _order(n, self.seed, epoch, 0) if self.shuffle else list(range(n))
        return perm[self.rank :: self.world_size][worker::num_workers]

    def state_dict(self) -> dict[str, Any]:
        """The loaded position, advanced by any iteration in this process (loader workers report
        theirs through :class:`StreamLoader`, which keeps the authoritative state)."""
        state = copy.deepcopy(self._resume) if self._resume else _fresh(1)
        if self._live is not None:
            state["workers"][0] = dict(self._live)
        return {"version": STATE_VERSION, **self.identity(), "num_workers": len(state["workers"]), **state}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` or ``StreamLoader.state_dict()``; call before iterating."""
        self._resume = _reconcile(state, self.identity(), None)
        self._live = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        dl_id, nw = (info.id, info.num_workers) if info else (0, 1)
        self.check_split(nw)
        state = self._resume or _fresh(nw)
        if len(state["workers"]) != nw:
            state = _reconcile({**self.identity(), "version": STATE_VERSION, **state}, self.identity(), nw)
        # Rotate: DataLoader worker 0 delivers the first batch, so it plays the logical worker due next.
        logical = (dl_id + state["next_worker"]) % nw
        for sample in self.worker_samples(logical, nw, state["workers"][logical]):
            if info is None:
                self._live = {k: v for k, v in sample["_pos"].items() if k != "worker"}
            yield sample

    def worker_samples(self, worker: int, num_workers: int, start: dict | None = None) -> Iterator[dict]:
        """Logical ``worker``'s endless samples from position ``start`` (default: the beginning)."""
        pos = {**_start(), **(start or {})}
        epoch, index, offset, corrupt = pos["epoch"], pos["index"], pos["offset"], pos["corrupt"]
        empty_epochs = 0
        while True:
            ids = self.worker_shards(epoch, worker, num_workers)
            yielded = False
            while index < len(ids):
                sid = ids[index]
                samples = self._load(sid)
                if samples is None:
                    corrupt += 1  # counted in the position, so a resumed run counts the same
                    samples = []
                order = list(_order(len(samples), self.seed, epoch, 1, sid) if self.shuffle else range(len(samples)))
                for j in range(offset, len(order)):
                    if self.heldout_fraction and heldout_score(samples[order[j]].key) < self.heldout_fraction:
                        continue  # held out: never streamed; positions still count it
                    after = (epoch, index, j + 1)
                    if j + 1 == len(order):  # normalise: point at the next shard (or epoch)
                        after = (epoch + 1, 0, 0) if index + 1 == len(ids) else (epoch, index + 1, 0)
                    yielded = True
                    yield {**self._finish(samples[order[j]], self.shards[sid].url),
                           "_pos": {"worker": worker, "epoch": after[0], "index": after[1],
                                    "offset": after[2], "corrupt": corrupt}}
                index, offset = index + 1, 0
            empty_epochs = 0 if yielded else empty_epochs + 1
            if empty_epochs > 1:  # a whole epoch of corrupt or empty shards: looping on would hang
                raise RuntimeError(f"rank {self.rank} loader worker {worker}: every one of its {len(ids)} "
                                   "shards is corrupt or empty")
            epoch, index, offset = epoch + 1, 0, 0

    def _load(self, sid: int) -> list[Sample] | None:
        """A shard's samples, or None (with a warning the first time) if it is corrupt."""
        info = self.shards[sid]
        if info.url in self._bad:
            return None
        try:
            return read_shard(info, self.storage_options, self.load_mid)
        except CorruptShard as e:
            log.warning("skipping corrupt shard %s: %s", info.url, e)
            self._bad[info.url] = str(e)
            return None

    def _finish(self, s: Sample, url: str) -> dict[str, Any]:
        """Tensors for one sample; the noise read from noise.npy or regenerated from the seed and checked."""
        latent = torch.from_numpy(s.latent.astype(np.float32))
        out = {"key": s.key, "prompt": s.prompt, "seed": s.seed, "latent": latent}
        if s.mid is not None:
            out["mid"] = torch.from_numpy(s.mid.astype(np.float32))
        if s.noise is not None:
            out["noise"] = torch.from_numpy(s.noise.astype(np.float32))
            return out
        noise = seed_noise(s.seed, tuple(latent.shape))
        recorded = s.meta.get("noise_sha256")
        if recorded and noise_fingerprint(noise) != recorded:
            raise RuntimeError(
                f"shard {url}, sample {s.key}: the noise regenerated from seed {s.seed} does not match "
                "the noise_sha256 recorded in its json. This torch build's CPU RNG stream differs from the one "
                f"that wrote the store (torch {torch.__version__} here), so teacher targets would not pair with "
                "their noise; regenerate the store with `--save noise` (or with the same torch version)")
        out["noise"] = noise
        return out


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack one worker's samples into a batch; ``_pos`` is the worker's position after the last one."""
    shapes = {tuple(s["latent"].shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"a batch mixes latent shapes {sorted(shapes)}: this reader needs one latent size per "
                         "store (no size bucketing)")
    batch: dict[str, Any] = {"prompt": [s["prompt"] for s in samples], "key": [s["key"] for s in samples],
                             "seed": torch.tensor([s["seed"] for s in samples], dtype=torch.long),
                             "latent": torch.stack([s["latent"] for s in samples]),
                             "noise": torch.stack([s["noise"] for s in samples])}
    if all("mid" in s for s in samples):
        batch["mid"] = torch.stack([s["mid"] for s in samples])
    batch["_pos"] = samples[-1]["_pos"]
    return batch


class StreamLoader:
    """Wraps a torch DataLoader over a ShardStream; iterating yields collated batches; tracks position.

    The position counts only batches handed out by ``__iter__`` (not those prefetched by workers).
    """

    def __init__(self, stream: ShardStream, batch_size: int, num_workers: int = 0, prefetch_factor: int = 2,
                 pin_memory: bool = False):
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, not {batch_size}, {num_workers}")
        self.stream, self.batch_size, self.num_workers = stream, batch_size, num_workers
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self._w = max(1, num_workers)  # logical workers: the main process counts as one
        stream.check_split(self._w)
        self._state = {"version": STATE_VERSION, **stream.identity(), "num_workers": self._w,
                       "batch_size": batch_size, "batches": 0, **_fresh(self._w)}
        self._warned_order = False

    @property
    def corrupt_shards(self) -> int:
        """Corrupt-shard skips so far (a shard skipped in two epochs counts twice)."""
        return self._state["corrupt_base"] + sum(w["corrupt"] for w in self._state["workers"])

    def state_dict(self) -> dict[str, Any]:
        """Exact position after the last batch handed out (JSON-serialisable)."""
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; call before iterating. Other settings resume approximately."""
        if state.get("batch_size") not in (None, self.batch_size):
            log.warning("data state was saved with batch_size %s, now %d: each worker resumes at its exact "
                        "sample, but batches are composed differently", state.get("batch_size"), self.batch_size)
        pos = _reconcile(state, self.stream.identity(), self._w)
        self._state.update(pos, batches=int(state.get("batches", 0)))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Endless batches, continuing from the current position (a new iteration does not restart)."""
        self.stream.load_state_dict(self._state)
        loader = DataLoader(self.stream, batch_size=self.batch_size, num_workers=self.num_workers,
                            collate_fn=collate_samples, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None)
        it = iter(loader)
        try:
            for batch in it:
                self._record(batch.pop("_pos"))
                yield batch
        finally:
            del it  # drop the last reference: the worker processes stop now, not at garbage collection

    def _record(self, pos: dict[str, int]) -> None:
        w = pos["worker"]
        if w != self._state["next_worker"] and not self._warned_order:
            self._warned_order = True  # round-robin broken (should not happen with endless workers)
            log.warning("batch came from loader worker %d, expected %d: resume may be approximate",
                        w, self._state["next_worker"])
        self._state["workers"][w] = {k: pos[k] for k in ("epoch", "index", "offset", "corrupt")}
        self._state["next_worker"] = (w + 1) % self._w
        self._state["batches"] += 1
