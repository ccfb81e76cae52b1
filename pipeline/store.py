"""The shard store's I/O: atomic writes, shard commits (tar, then its stats as the commit marker), the
index, and the writer's lease. What the files and shards hold is defined in :mod:`.shardformat`
(docs/store.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec

from .shardformat import SHARD_STATS, SHARD_TAR


class StoreError(RuntimeError):
    """The store cannot be used as asked (locked, made with other settings, corrupt)."""


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

    def put_json(self, rel: str, obj: Any) -> None:
        self.put_bytes(rel, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def put_file(self, rel: str, local_path: str) -> None:
        with open(local_path, "rb") as f:
            self.put_bytes(rel, f.read())

    def remove_all(self) -> None:
        """Delete everything the store holds (``--overwrite``)."""
        for rel in ("shards", "index.json", "manifest.parquet", "failed.parquet", "README.md"):
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

    def acquire_lease(self, owner: str, ttl: float = 300.0) -> None:
        """Take the writer's lease, or raise if another live driver holds it.

        ``owner`` is ``host:pid:nonce``. A lease from a process of this host that no longer runs
        is taken over at once; one from another host only once it expires (the holder renews it).
        """
        held = self.read_json("lease.json")
        now = time.time()
        if held and held.get("owner") != owner and held.get("expires", 0) > now and not _holder_gone(held["owner"]):
            raise StoreError(f"{self.url} is being written by {held['owner']} (lease until "
                             f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(held['expires']))}); "
                             "wait for it, or remove lease.json if that driver is gone")
        self.put_json("lease.json", {"owner": owner, "expires": now + ttl, "taken_at": now})
        if (self.read_json("lease.json") or {}).get("owner") != owner:
            raise StoreError(f"{self.url}: another driver took the lease at the same time")

    def renew_lease(self, owner: str, ttl: float = 300.0) -> None:
        self.put_json("lease.json", {"owner": owner, "expires": time.time() + ttl, "taken_at": time.time()})

    def release_lease(self, owner: str) -> None:
        held = self.read_json("lease.json")
        if held and held.get("owner") == owner:
            self.fs.rm(self.path("lease.json"))
