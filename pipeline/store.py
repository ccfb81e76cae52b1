"""The shard store's I/O: atomic writes, shard commits (tar, then its stats as the commit marker), the
index, and the writer's lease. The files' names and the index schema are :mod:`.layout`'s, what a
shard holds :mod:`.shardformat`'s (docs/store.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import fsspec.asyn

from .layout import (
    INDEX_ENTRY,
    LEASE,
    LEASE_TMP_PREFIX,
    SHARD_STATS,
    SHARD_TAR,
    SHARDS,
    STORE_FILES,
    index_entries,
    read_index,
    shard_file,
)

_LEFTOVER_TMP = re.compile(rf"(?!{re.escape(LEASE_TMP_PREFIX)})\..+\.[0-9a-f]{{32}}\.tmp")
"""A temporary file of :meth:`Store.put_bytes` (``.<name>.<32 hex>.tmp``), not one of the lease's."""


class StoreError(RuntimeError):
    """The store cannot be used as asked (locked, made with other settings, corrupt)."""


class UploadError(StoreError):
    """Writing a shard to the store failed (credentials, a bucket policy, a full disk): the job's
    circuit breaker counts these (docs/generation.md, Faults)."""


def is_conflict(e: BaseException) -> bool:
    """An S3 409 (``ConditionalRequestConflict``: another conditional write to the same key was in
    flight), which S3 asks the client to retry."""
    cause = getattr(e, "__cause__", None)
    resp = getattr(cause, "response", None) or {}
    status = (resp.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    code = (resp.get("Error") or {}).get("Code")
    return status == 409 or code in ("ConditionalRequestConflict", "OperationAborted") \
        or "ConditionalRequestConflict" in str(e)


def _holder_gone(owner: str) -> bool:
    """True when ``owner`` (host:pid:nonce) is a process of this host that is not running."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != os.uname().nodename or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class Store:
    """A shard store at an fsspec URL."""

    url: str
    storage_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(self.storage_options or {}))
        self.root = self.root.rstrip("/")
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def url_of(self, rel: str) -> str:
        """Full URL of a store member, with its protocol (``s3://…``, ``file://…``)."""
        return self.fs.unstrip_protocol(self.path(rel))

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.read_bytes(rel))
        except FileNotFoundError:
            return None

    def read_index(self) -> dict[str, Any] | None:
        """The store's ``index.json`` (either version), or None when there is none."""
        try:
            return read_index(self.read_bytes)
        except FileNotFoundError:
            return None

    def index_entries(self, index: dict[str, Any]) -> list[dict[str, Any]]:
        """The shard entries of ``index`` (an ``index.json`` of either version), in shard order."""
        return index_entries(self.read_bytes, index)

    def put_bytes(self, rel: str, data: bytes) -> None:
        """Atomic write: a temporary name then a rename locally; one PUT (atomic) on object stores."""
        path = self.path(rel)
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        self.fs.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def put_json(self, rel: str, obj: Any, indent: int | None = 1) -> None:
        """``indent=None``: compact, for large files (json's C encoder; an indent takes the Python one)."""
        seps = (",", ":") if indent is None else None
        self.put_bytes(rel, json.dumps(obj, indent=indent, separators=seps, sort_keys=True, default=str).encode())

    def put_file(self, rel: str, local_path: str) -> None:
        with open(local_path, "rb") as f:
            self.put_bytes(rel, f.read())

    def clean_incomplete(self) -> dict[str, int]:
        """Remove what writers that died left half-done (call it holding the lease): local temporary
        files of :meth:`put_bytes` under ``shards/`` and beside the index, and on S3 the multipart
        uploads under the store's prefix that were never completed (a shard over s3fs's multipart
        threshold, 100 MiB by default, is uploaded in parts). Returns what was removed."""
        out = {"tmp_files": 0, "multipart_uploads": 0}
        if self.local:
            for folder in (self.root, self.path(SHARDS)):
                try:
                    names = os.listdir(folder)
                except FileNotFoundError:
                    continue
                for name in names:
                    if _LEFTOVER_TMP.fullmatch(name):
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(f"{folder}/{name}")
                            out["tmp_files"] += 1
            return out
        if self.lease_mode == "conditional-put":  # S3
            bucket, key, _ = self.fs.split_path(self.root)
            prefix = f"{key}/" if key else ""
            for upload in fsspec.asyn.sync(self.fs.loop, _multipart_uploads, self.fs, bucket, prefix):
                fsspec.asyn.sync(self.fs.loop, self.fs._call_s3, "abort_multipart_upload", Bucket=bucket,
                                 Key=upload["Key"], UploadId=upload["UploadId"])
                out["multipart_uploads"] += 1
        return out

    def remove_all(self) -> None:
        """Delete everything the store holds (``--overwrite``)."""
        for rel in STORE_FILES:
            if self.exists(rel):
                self.fs.rm(self.path(rel), recursive=True)

    # --- shards -------------------------------------------------------------------------------

    def commit_shard(self, shard: int, tar: bytes, stats: dict[str, Any]) -> dict[str, Any]:
        """Upload a shard's tar, then its stats (the commit marker). Returns the stats written."""
        stats = {**stats, "shard": shard, "url": SHARD_TAR.format(shard), "bytes": len(tar),
                 "sha256": hashlib.sha256(tar).hexdigest(), "committed_at": time.time()}
        self.put_bytes(SHARD_TAR.format(shard), tar)
        self.put_json(SHARD_STATS.format(shard), stats)
        return stats

    def shard_stats(self, shard: int) -> dict[str, Any] | None:
        return self.read_json(SHARD_STATS.format(shard))

    def list_shards(self) -> dict[int, dict[str, int]]:
        """One listing of ``shards/``: shard → sizes of its members present (``{"tar": n, "json": m}``).

        On an object store this is a paginated LIST (1,000 keys a request, sizes included) instead of
        two round trips per shard. Names that are not a shard's tar or stats (temporary files, other
        tools' files, sub-folders, ``42.tar`` for ``000042.tar``) are left out.
        """
        base = self.path(SHARDS)
        self.fs.invalidate_cache(base)  # a cached listing from an earlier run in this process is stale
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        out: dict[int, dict[str, int]] = {}
        for name, info in found.items():
            rel = name[len(self.root) + 1:] if name.startswith(self.root + "/") else ""
            found_file = shard_file(rel)
            if info.get("type") == "directory" or found_file is None:
                continue
            i, kind = found_file
            out.setdefault(i, {})[kind] = int(info["size"])
        return out

    def committed_shards(self, fingerprint: str, index: dict[str, Any] | None = None,
                         threads: int = 32, entries: list[dict[str, Any]] | None = None) -> dict[int, dict[str, Any]]:
        """Every committed shard's stats, from one listing plus ``index`` (the last ``index.json``;
        ``entries``: its shard entries when the caller has read them already).

        The commit rule of :meth:`committed`: the stats file is there, carries ``fingerprint``, and
        the tar has the size it records. A shard the index lists (same fingerprint, all of
        :data:`INDEX_ENTRY`) whose tar has that size in the listing and whose stats file is listed is
        taken from the index; the stats of other listed shards (e.g. committed by a driver that
        died before writing the index) are read, ``threads`` at a time.
        """
        listing = self.list_shards()
        known = {}
        if index and index.get("fingerprint") == fingerprint:
            if entries is None:
                entries = self.index_entries(index)
            known = {e["shard"]: e for e in entries if all(k in e for k in INDEX_ENTRY)}
        out: dict[int, dict[str, Any]] = {}
        unknown = []
        for i, sizes in sorted(listing.items()):
            if "tar" not in sizes or "json" not in sizes:
                continue
            entry = known.get(i)
            if entry is not None and entry["bytes"] == sizes["tar"]:
                out[i] = entry
            else:
                unknown.append(i)
        if unknown:
            with ThreadPoolExecutor(min(threads, len(unknown)), thread_name_prefix="stats") as pool:
                for i, stats in zip(unknown, pool.map(self._stats_or_none, unknown)):
                    if (stats is not None and stats.get("fingerprint") == fingerprint
                            and stats.get("bytes") == listing[i]["tar"]):
                        out[i] = stats
        self.fs.invalidate_cache(self.path(SHARDS))  # not kept: 1.4 GB at a million shards on s3fs
        return out

    def _stats_or_none(self, shard: int) -> dict[str, Any] | None:
        try:
            stats = self.shard_stats(shard)
        except ValueError:  # not JSON: not a commit marker
            return None
        return stats if isinstance(stats, dict) else None

    def committed(self, shard: int, fingerprint: str) -> dict[str, Any] | None:
        """The shard's stats if it is committed with these settings (and its tar is there)."""
        stats = self.shard_stats(shard)
        if stats is None or stats.get("fingerprint") != fingerprint:
            return None
        try:
            if self.fs.size(self.path(stats["url"])) != stats["bytes"]:
                return None
        except FileNotFoundError:
            return None
        return stats

    # --- lease ---------------------------------------------------------------------------------
    # Taking it is a compare-and-swap where the store offers one (docs/store.md, Commit marker,
    # index and lease): a local folder creates lease.json with a hard link of a finished file (as
    # O_EXCL, but never visible half-written) and replaces a stale one in one rename, under a lock
    # file, only if it is still the inode it read; S3 creates it with a PUT carrying
    # If-None-Match: * and replaces a stale one with If-Match on the ETag it read. Other stores
    # keep read-write-read.

    @property
    def lease_mode(self) -> str:
        """How the lease is taken here: ``link`` (local), ``conditional-put`` (S3) or ``read-write-read``."""
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return "link" if self.local else "conditional-put" if {"s3", "s3a"} & set(protocols) else "read-write-read"

    def acquire_lease(self, owner: str, ttl: float = 300.0) -> None:
        """Take the writer's lease, or raise if another live driver holds it.

        ``owner`` is ``host:pid:nonce``. A lease from a process of this host that no longer runs
        is taken over at once; one from another host only once it expires (the holder renews it).
        Of two drivers that start at once, exactly one gets it where :attr:`lease_mode` is not
        ``read-write-read``.
        """
        record = json.dumps({"owner": owner, "expires": time.time() + ttl, "taken_at": time.time()}).encode()
        conflicts = 0
        for _ in range(3):
            while True:  # S3's 409 on a conditional write: retried with back-off, then as one more try
                try:
                    held, version = self._read_lease()
                    swapped = self._try_lease(owner, held, version, record)
                    break
                except OSError as e:
                    conflicts += 1
                    if not is_conflict(e) or conflicts > 6:
                        raise
                    time.sleep(min(8.0, 0.25 * 2 ** conflicts))
            if swapped:
                return
        raise StoreError(f"{self.url}: another driver took the lease at the same time")

    def _try_lease(self, owner: str, held: dict | None, version: Any, record: bytes) -> bool:
        """Raise if a live driver holds the lease; else try to swap ``record`` in."""
        if held is not None and held.get("owner") != owner:
            expires = held.get("expires", 0)
            if expires > time.time() and not _holder_gone(str(held.get("owner"))):
                raise StoreError(f"{self.url} is being written by {held.get('owner')} (lease until "
                                 f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(expires))}); "
                                 f"wait for it, or remove {LEASE} if that driver is gone")
        return self._swap_lease(record, None if held is None else version)

    def _read_lease(self) -> tuple[dict[str, Any] | None, Any]:
        """(lease record or None, the version a swap compares against: inode, ETag or None)."""
        path = self.path(LEASE)
        if self.lease_mode == "link":
            try:
                with open(path, "rb") as f:
                    return json.loads(f.read()), os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                return None, None
        if self.lease_mode == "conditional-put":
            bucket, key, _ = self.fs.split_path(path)
            try:
                out = fsspec.asyn.sync(self.fs.loop, _get_with_etag, self.fs, bucket, key)
            except FileNotFoundError:
                return None, None
            return json.loads(out[0]), out[1]
        return self.read_json(LEASE), None

    def _swap_lease(self, record: bytes, version: Any) -> bool:
        """Write ``record`` as lease.json if it is still absent (``version`` None) or still the
        version read; False when another driver changed it first."""
        path = self.path(LEASE)
        mode = self.lease_mode
        if mode == "link":
            self.fs.makedirs(self.root, exist_ok=True)
            tmp = f"{self.root}/{LEASE_TMP_PREFIX}{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(record)
                f.flush()
                os.fsync(f.fileno())
            try:
                if version is None:
                    os.link(tmp, path)  # fails if it exists: an atomic create of a complete file
                    return True
                # A stale lease is replaced in one rename, so the name is never absent (a driver
                # reading "no lease" in that instant would create its own); the lock file makes
                # "still the inode that was read, then replace" one step among drivers.
                with open(f"{self.root}/{LEASE_TMP_PREFIX}lock", "a") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    try:
                        if os.stat(path).st_ino != version:
                            return False
                    except FileNotFoundError:
                        return False
                    os.replace(tmp, path)
                    return True
            except FileExistsError:
                return False
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
        if mode == "conditional-put":
            cond = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
            try:
                self.fs.pipe_file(path, record, **cond)
                return True
            except OSError as e:  # 412 Precondition Failed (s3fs: FileExistsError or EINVAL)
                if "pre-condition" in str(e).lower() or "precondition" in str(e).lower() \
                        or isinstance(e, FileExistsError):
                    return False
                raise
        self.put_bytes(LEASE, record)
        return (self.read_json(LEASE) or {}).get("owner") == json.loads(record)["owner"]

    def renew_lease(self, owner: str, ttl: float = 300.0) -> str | None:
        """Extend ``owner``'s lease if it still holds it, as the same compare-and-swap as taking it
        (a driver whose lease was taken over never overwrites the new holder's). Returns None when
        renewed, else who holds it now."""
        held, version = self._read_lease()
        holder = (held or {}).get("owner")
        if holder != owner:
            return holder or f"nobody ({LEASE} was removed)"
        record = json.dumps({"owner": owner, "expires": time.time() + ttl, "taken_at": held.get("taken_at")}).encode()
        if self._swap_lease(record, version):
            return None
        return (self._read_lease()[0] or {}).get("owner") or f"nobody ({LEASE} was removed)"

    def release_lease(self, owner: str) -> None:
        held = self.read_json(LEASE)
        if held and held.get("owner") == owner:
            self.fs.rm(self.path(LEASE))


async def _multipart_uploads(fs, bucket: str, prefix: str) -> list[dict[str, Any]]:
    """Every multipart upload in progress under ``prefix`` (paginated)."""
    out, kw = [], {"Bucket": bucket, "Prefix": prefix}
    while True:
        resp = await fs._call_s3("list_multipart_uploads", **kw)
        out += resp.get("Uploads", [])
        if not resp.get("IsTruncated"):
            return out
        kw.update(KeyMarker=resp["NextKeyMarker"], UploadIdMarker=resp["NextUploadIdMarker"])


async def _get_with_etag(fs, bucket: str, key: str) -> tuple[bytes, str]:
    """One GET of an S3 object: its bytes and the ETag they have (s3fs's cat gives no ETag)."""
    resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    async with resp["Body"] as body:
        return await body.read(), resp["ETag"]
