"""The manifest: ids, seeds, the content hash, and reading/writing manifest parquet files.

A manifest is a parquet file with one row per sample to generate:

``prompt_id``  stable id (sha256 of the normalised text, 16 hex digits, ``-k`` per variant)
``prompt``     normalised text
``seed``       int64, from the global seed and the prompt_id (or carried by the input)
optional ``height``, ``width``, ``negative_prompt``, ``source`` and the input's extra columns.

Row order matters (shard ``i`` = rows ``[i·N, (i+1)·N)``), so the manifest hash covers the
column names and every row, in order. It is stored in the parquet footer under
``twostep.manifest_hash`` with the build record under ``twostep.build``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

HASH_KEY = b"twostep.manifest_hash"
BUILD_KEY = b"twostep.build"
FORMAT_VERSION = 1
CORE_COLUMNS = ("prompt_id", "prompt", "seed")
OPTIONAL_COLUMNS = {
    "height": pa.int32(),
    "width": pa.int32(),
    "negative_prompt": pa.string(),
    "source": pa.string(),
}
BATCH_ROWS = 8192


def text_id(text: str) -> str:
    """The stable id of a normalised prompt: 16 hex digits of its sha256 (64 bits)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def hash64(text: str) -> int:
    """A 64-bit content hash (first 8 bytes of sha256), for de-duplication in numpy arrays."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def derive_seed(global_seed: int, prompt_id: str) -> int:
    """Per-row seed in [0, 2**63): a function of the global seed and the prompt_id only."""
    digest = hashlib.sha256(f"{global_seed}/{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def variant_id(base: str, k: int, per_prompt: int) -> str:
    """Id of variant ``k`` of a prompt; with one variant the base id itself."""
    return base if per_prompt == 1 else f"{base}-{k}"


class ManifestHasher:
    """Streaming sha256 over the canonical content: column names, then each row as JSON."""

    def __init__(self, columns: Iterable[str]):
        self._h = hashlib.sha256()
        self._h.update(json.dumps({"twostep_manifest": FORMAT_VERSION, "columns": list(columns)}).encode())

    def update(self, batch: pa.RecordBatch | pa.Table) -> None:
        cols = [c.to_pylist() for c in batch.columns]
        dumps = json.dumps
        for row in zip(*cols):
            self._h.update(b"\n")
            self._h.update(dumps(row, ensure_ascii=False, separators=(",", ":"), default=str).encode())

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def compute_hash(path: str | os.PathLike) -> str:
    """Recompute a manifest's content hash from its rows."""
    pf = pq.ParquetFile(path)
    hasher = ManifestHasher(pf.schema_arrow.names)
    for batch in pf.iter_batches(batch_size=BATCH_ROWS):
        hasher.update(batch)
    return hasher.hexdigest()


def parquet_metadata(path: str | os.PathLike) -> pq.FileMetaData:
    """The footer of a parquet file; a missing, unreadable or non-parquet file raises an error that
    names it (pyarrow's own messages do not name the file for a file that is not parquet)."""
    try:
        return pq.read_metadata(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (pa.ArrowException, OSError) as e:  # a folder, a text file, a truncated file, no permission
        kind = "a folder, not a parquet file" if os.path.isdir(path) else f"not a readable parquet file ({e})"
        raise ValueError(f"{path}: {kind}") from None


def check_manifest(path: str | os.PathLike) -> None:
    """Raise an error naming ``path`` unless it is a readable parquet file with the core columns."""
    names = parquet_metadata(path).schema.to_arrow_schema().names
    missing = [c for c in CORE_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{path}: not a twostep manifest (no column {', '.join(missing)}); make one with "
                         "twostep prompts build or twostep prompts toy")


def read_meta(path: str | os.PathLike) -> tuple[str | None, dict[str, Any]]:
    """The stored manifest hash and build record of a manifest parquet file."""
    meta = parquet_metadata(path).metadata or {}
    digest = meta.get(HASH_KEY)
    build = json.loads(meta[BUILD_KEY]) if BUILD_KEY in meta else {}
    return (digest.decode() if digest else None), build


def iter_batches(path: str | os.PathLike, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream a manifest in record batches (bounded memory)."""
    yield from pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns)


class ManifestWriter:
    """Write a manifest atomically: batches go to a temporary file, hashed as they pass; on
    :meth:`close` the hash and build record go into the footer and the file is moved in place."""

    def __init__(self, path: str | os.PathLike, schema: pa.Schema):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._writer = pq.ParquetWriter(self._tmp, schema, compression="zstd")
        self._hasher = ManifestHasher(schema.names)
        self.schema = schema
        self.rows = 0

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if batch.num_rows:
            self._hasher.update(batch)
            self._writer.write(batch)
            self.rows += batch.num_rows

    def close(self, build: dict[str, Any]) -> str:
        """Finish the file; returns the manifest hash."""
        digest = self._hasher.hexdigest()
        self._writer.add_key_value_metadata(
            {HASH_KEY: digest.encode(), BUILD_KEY: json.dumps(build, sort_keys=True).encode()}
        )
        self._writer.close()
        os.replace(self._tmp, self.path)
        return digest

    def abort(self) -> None:
        self._writer.close()
        self._tmp.unlink(missing_ok=True)
