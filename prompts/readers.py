"""Readers: turn every supported input into a stream of rows.

Supported inputs: ``.txt`` (one prompt a line), ``.csv``, ``.tsv``, ``.jsonl`` (gzip variants of
all four: ``.txt.gz``…), ``.parquet``, a local Hugging Face dataset directory (``save_to_disk``
output or a folder of data files) and a hub dataset name (``hf:NAME`` or ``owner/name``).

Each reader yields :class:`Row` objects. A row that cannot be parsed is yielded with ``error``
set, so the caller decides between skipping and failing; a problem with the whole input (empty
file, missing column, truncated gzip) raises :class:`InputError`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import os
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

TEXT_COLUMN_CANDIDATES = ("prompt", "text", "caption")
_BATCH = 8192
_TEXT_KINDS = ("txt", "csv", "tsv", "jsonl")


@dataclass
class Row:
    """One input row. ``row`` is 1-based: the line for text formats, the record for tables."""

    source: str
    row: int
    fields: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class InputError(ValueError):
    """A problem with a whole input (or with reading past ``row``)."""

    def __init__(self, source: str, reason: str, row: int = 0):
        where = f"{source}:{row}" if row else source
        super().__init__(f"{where}: {reason}")
        self.source, self.row, self.reason = source, row, reason


def bundled_path(name: str) -> Path:
    """Path of a prompt set shipped with twostep (``bundled:general``)."""
    path = Path(__file__).parent / "data" / f"{name}.csv"
    if not path.exists():
        have = sorted(p.stem for p in path.parent.glob("*.csv"))
        raise InputError(f"bundled:{name}", f"no such bundled prompt set; available: {have}")
    return path


def resolve(spec: str) -> str:
    """Expand ``bundled:NAME`` to its file; other specs are returned as they are."""
    return str(bundled_path(spec.removeprefix("bundled:"))) if spec.startswith("bundled:") else spec


def input_kind(spec: str) -> str:
    """Classify an input spec: 'txt', 'csv', 'tsv', 'jsonl', 'parquet', 'hf_dir' or 'hf_hub'."""
    if spec.startswith("hf:"):
        return "hf_hub"
    path = Path(spec)
    if path.is_dir():
        return "hf_dir"
    name = path.name.lower()
    name = name.removesuffix(".gz")
    for kind in (*_TEXT_KINDS, "parquet"):
        if name.endswith("." + kind):
            if kind == "parquet" and spec.lower().endswith(".gz"):
                break
            if not path.exists():
                raise InputError(spec, "file not found")
            return kind
    if path.exists():
        raise InputError(spec, "unknown file type: expected .txt, .csv, .tsv, .jsonl (optionally .gz), "
                         ".parquet or a dataset directory")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return "hf_hub"
    raise InputError(spec, "not found (neither a file, a directory nor a hub dataset name)")


def iter_rows(spec: str, text_column: str | None = None, hf_split: str = "train") -> Iterator[Row]:
    """Yield the rows of one input, with the prompt under ``fields['prompt']``."""
    spec = resolve(spec)
    kind = input_kind(spec)
    if kind in _TEXT_KINDS:
        yield from _iter_text_file(spec, kind, text_column)
    elif kind == "parquet":
        yield from _iter_parquet(spec, text_column)
    else:
        yield from _iter_hf(spec, kind, text_column, hf_split)


# --- text formats ------------------------------------------------------------------------------


def _open_binary(spec: str) -> BinaryIO:
    if spec.lower().endswith(".gz"):
        return gzip.open(spec, "rb")  # type: ignore[return-value]
    return open(spec, "rb")


def _iter_text_file(spec: str, kind: str, text_column: str | None) -> Iterator[Row]:
    last = 0
    any_row = False
    try:
        with _open_binary(spec) as raw:
            # surrogateescape keeps undecodable bytes visible, so one bad line is rejected
            # instead of the whole file.
            stream = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
            reader = {"txt": _txt_rows, "jsonl": _jsonl_rows}.get(kind, _csv_rows)
            for row in reader(spec, stream, kind, text_column):
                last = row.row
                any_row = True
                yield row
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise InputError(spec, f"truncated or corrupt gzip after line {last}: {e}", last + 1) from e
    if not any_row:
        raise InputError(spec, "file is empty (no rows)")


def _txt_rows(spec: str, stream: io.TextIOBase, kind: str, text_column: str | None) -> Iterator[Row]:
    if text_column not in (None, "prompt", "text"):
        raise InputError(spec, f"--text-column {text_column!r} does not apply to a .txt file")
    for i, line in enumerate(stream, 1):
        yield Row(spec, i, {"prompt": line.rstrip("\r\n")})


def _jsonl_rows(spec: str, stream: io.TextIOBase, kind: str, text_column: str | None) -> Iterator[Row]:
    for i, line in enumerate(stream, 1):
        if not line.strip():
            yield Row(spec, i, error="empty line")
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield Row(spec, i, error=f"invalid JSON: {e}")
            continue
        if not isinstance(obj, dict):
            yield Row(spec, i, error=f"expected a JSON object, got {type(obj).__name__}")
            continue
        col = text_column or next((c for c in TEXT_COLUMN_CANDIDATES if c in obj), None)
        if col is None or col not in obj:
            want = repr(text_column) if text_column else " or ".join(map(repr, TEXT_COLUMN_CANDIDATES))
            yield Row(spec, i, error=f"missing field {want}")
            continue
        yield Row(spec, i, _rename(spec, obj, col))


def _csv_rows(spec: str, stream: io.TextIOBase, kind: str, text_column: str | None) -> Iterator[Row]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(stream, delimiter="\t" if kind == "tsv" else ",")
    header = reader.fieldnames
    if header is None:
        return
    col = _pick_column(spec, list(header), text_column)
    while True:
        try:
            rec = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield Row(spec, reader.line_num, error=f"malformed {kind.upper()} row: {e}")
            continue
        if None in rec:  # more fields than the header names
            yield Row(spec, reader.line_num, error=f"row has {len(header) + len(rec[None])} fields, "
                      f"header has {len(header)}")
            continue
        yield Row(spec, reader.line_num, _rename(spec, rec, col))


# --- tables -----------------------------------------------------------------------------------


def _iter_parquet(spec: str, text_column: str | None) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(spec)
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(spec, f"not a readable parquet file: {e}") from e
    schema = pf.schema_arrow
    col = _pick_column(spec, schema.names, text_column)
    typ = schema.field(col).type
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise InputError(spec, f"column {col!r} has type {typ}, expected a string column")
    if pf.metadata.num_rows == 0:
        raise InputError(spec, "file is empty (no rows)")
    n = 0
    for batch in pf.iter_batches(batch_size=_BATCH):
        for rec in batch.to_pylist():
            n += 1
            yield Row(spec, n, _rename(spec, rec, col))


def _iter_hf(spec: str, kind: str, text_column: str | None, split: str) -> Iterator[Row]:
    import datasets

    name = spec.removeprefix("hf:")
    try:
        if kind == "hf_dir" and any((Path(spec) / f).exists()
                                    for f in ("state.json", "dataset_dict.json", "dataset_info.json")):
            ds = datasets.load_from_disk(spec)
        else:
            ds = datasets.load_dataset(name, split=split, streaming=kind == "hf_hub")
    except FileNotFoundError as e:
        raise InputError(spec, f"cannot load Hugging Face dataset: {e}") from e
    except Exception as e:  # datasets raises many types (hub unreachable, no data files, …)
        raise InputError(spec, f"cannot load Hugging Face dataset: {type(e).__name__}: {e}") from e
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in ds:
            raise InputError(spec, f"split {split!r} not found; available: {sorted(ds)} (use --hf-split)")
        ds = ds[split]
    features = ds.features
    if features is not None:  # media columns (images, audio) are not prompt metadata: leave them out
        media = [c for c, f in features.items() if isinstance(f, (datasets.Image, datasets.Audio))]
        if media:
            log.warning("%s: leaving out media columns %s", spec, media)
            ds = ds.remove_columns(media)
            features = ds.features
        col = _pick_column(spec, list(features), text_column)
        feat = features[col]
        if not (isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string")):
            raise InputError(spec, f"column {col!r} has type {feat}, expected a string column")
    n = 0
    for rec in ds:
        if features is None:
            col = _pick_column(spec, list(rec), text_column)
        n += 1
        yield Row(spec, n, _rename(spec, rec, col))
    if n == 0:
        raise InputError(spec, "dataset is empty (no rows)")


# --- helpers ----------------------------------------------------------------------------------


def _pick_column(spec: str, names: list[str], text_column: str | None) -> str:
    if text_column is not None:
        if text_column not in names:
            raise InputError(spec, f"missing column {text_column!r}; columns are {names}")
        return text_column
    for cand in TEXT_COLUMN_CANDIDATES:
        if cand in names:
            return cand
    raise InputError(spec, f"no prompt column: expected one of {list(TEXT_COLUMN_CANDIDATES)} "
                     f"or --text-column; columns are {names}")


def _rename(spec: str, rec: dict[str, Any], col: str) -> dict[str, Any]:
    """Put the text column under 'prompt'; other columns stay as they are."""
    if col == "prompt":
        return dict(rec)
    if "prompt" in rec:
        raise InputError(spec, f"has both 'prompt' and the text column {col!r}; rename one")
    out = {k: v for k, v in rec.items() if k != col}
    out["prompt"] = rec[col]
    return out


def display_name(spec: str) -> str:
    """The machine-independent name recorded in the ``source`` column (no directories)."""
    if spec.startswith("bundled:"):
        return spec
    if spec.startswith("hf:") or not os.path.exists(spec):
        return spec.removeprefix("hf:")
    return os.path.basename(os.path.normpath(spec))
