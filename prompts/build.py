"""``twostep prompts build``: inputs → manifest parquet, in bounded memory.

Two streaming passes over a temporary parquet file:

1. read every input, validate and normalise each row, write the survivors to the temporary
   file and keep two 64-bit hashes per row in numpy arrays (text key, prompt_id);
2. decide duplicates and reused ids from those arrays (vectorised), then stream the temporary
   file again into the manifest, expanding ``--per-prompt`` variants and deriving seeds.

Memory is the hash arrays (16 bytes a row) plus one batch. Every rejected row is written with
its reason to ``<manifest>.rejects.jsonl``; duplicates go there too, marked as such.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from twostep.common.config_flags import FieldError, at_least

from .manifest import (
    BATCH_ROWS,
    FORMAT_VERSION,
    OPTIONAL_COLUMNS,
    ManifestWriter,
    derive_seed,
    hash64,
    text_id,
    variant_id,
)
from .normalize import (
    InvalidPrompt,
    check_extra,
    check_optional_text,
    check_prompt_id,
    check_seed,
    check_size,
    clean_prompt,
)
from .readers import InputError, Row, display_name, input_kind, iter_rows, resolve

log = logging.getLogger(__name__)

_RESERVED = {"prompt", "negative_prompt", "height", "width", "seed", "prompt_id", "source"}
# Pass-1 scratch schema: validated fields plus where each row came from.
_SCRATCH = pa.schema([
    ("prompt", pa.string()), ("negative_prompt", pa.string()), ("height", pa.int32()),
    ("width", pa.int32()), ("seed", pa.int64()), ("prompt_id", pa.string()), ("source", pa.string()),
    ("extra", pa.string()), ("file", pa.string()), ("row", pa.int64()),
])


class ManifestError(ValueError):
    """Building stopped (``--on-invalid fail``, or nothing valid was left)."""


@dataclass
class BuildOptions:
    """Settings of one manifest build; recorded in the manifest's footer."""

    seed: int = 0
    """Global seed; each row's seed derives from it and the row's prompt_id."""
    per_prompt: int = field(default=1, metadata={"metavar": "K"})
    """Samples per unique prompt (variants get ids ``<id>-<k>`` and their own seeds)."""
    max_chars: int = 2000
    """Prompts longer than this (after normalisation) are rejected."""
    case_insensitive: bool = False
    """Treat prompts that differ only in letter case as duplicates."""
    on_invalid: str = field(default="skip", metadata={"choices": ("skip", "fail")})
    """skip: write bad rows with reasons to the rejects file and go on; fail: stop at the first bad row
    and write no manifest."""
    text_column: str | None = None
    """Column holding the prompt; default: the first of prompt, text, caption."""
    hf_split: str = "train"
    """Split to read from Hugging Face datasets."""
    height: int | None = None
    """Height for rows that give none (positive multiple of 16; default: the teacher's)."""
    width: int | None = None
    """Width for rows that give none (positive multiple of 16; default: the teacher's)."""

    def __post_init__(self) -> None:
        if self.on_invalid not in ("skip", "fail"):
            raise FieldError("on_invalid", f"must be 'skip' or 'fail', not {self.on_invalid!r}")
        at_least(self, 1, "per_prompt", "max_chars")
        for name in ("height", "width"):
            try:
                check_size(name, getattr(self, name))
            except InvalidPrompt as e:
                raise FieldError(name, str(e).removeprefix(f"field {name!r} ")) from None


@dataclass
class BuildSummary:
    """What a build did; printed by the CLI and stored in the manifest footer."""

    manifest: str
    manifest_hash: str = ""
    rows_read: int = 0
    rejected: int = 0
    duplicates: int = 0
    prompts: int = 0
    rows: int = 0
    rejects_file: str | None = None
    inputs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


class _Rejects:
    """Writes rejected rows, with reasons, as JSON lines beside the manifest (opened lazily)."""

    def __init__(self, path: Path, on_invalid: str):
        self.path, self.on_invalid = path, on_invalid
        self._f = None
        self.count = 0
        self.duplicates = 0

    def add(self, source: str, row: int, reason: str, prompt: Any = None, duplicate: bool = False) -> None:
        if not duplicate and self.on_invalid == "fail":
            where = f"{source}:{row}" if row else source
            raise ManifestError(f"{where}: {reason}")
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "w", encoding="utf-8")
        if isinstance(prompt, str):
            prompt = _readable(prompt)
        rec = {"source": source, "row": row, "reason": reason, "prompt": prompt}
        self._f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
        self.duplicates += duplicate
        self.count += not duplicate

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        elif self.path.exists():
            self.path.unlink()  # a stale file from an earlier build would mislead


def _readable(text: str) -> str:
    """Undecodable input bytes (kept as surrogate escapes) shown as ``\\xNN``."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # lone surrogates from JSON escapes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def rejects_path(manifest: str | os.PathLike) -> Path:
    """Where the rejects of a manifest go: ``<stem>.rejects.jsonl`` beside it."""
    p = Path(manifest)
    return p.with_name(p.name.removesuffix(".parquet") + ".rejects.jsonl")


def _validate(row: Row, opts: BuildOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    f = row.fields
    out = {
        "prompt": clean_prompt(f.get("prompt"), opts.max_chars),
        "negative_prompt": check_optional_text("negative_prompt", f.get("negative_prompt")),
        "height": check_size("height", f.get("height")) or opts.height,
        "width": check_size("width", f.get("width")) or opts.width,
        "seed": check_seed(f.get("seed")),
        "prompt_id": check_prompt_id(f.get("prompt_id")),
        "source": check_optional_text("source", f.get("source")) or display_name(row.source),
    }
    extra = {k: v for k, v in f.items() if k not in _RESERVED and not k.startswith("__index_level")}
    for k, v in extra.items():
        check_extra(k, v)
    out["extra"] = json.dumps(extra, ensure_ascii=False, default=str) if extra else None
    return out, extra


class _Pass1:
    """Validated rows → scratch parquet, plus per-row hashes and extra-column types."""

    def __init__(self, scratch: Path, opts: BuildOptions, rejects: _Rejects):
        self.opts, self.rejects = opts, rejects
        self.writer = pq.ParquetWriter(scratch, _SCRATCH)
        self.buf: list[dict[str, Any]] = []
        self.text_keys: list[np.ndarray] = []
        self.id_keys: list[np.ndarray] = []
        self._tk: list[int] = []
        self._ik: list[int] = []
        self.extra_types: dict[str, set[str]] = {}
        self.seen_columns = {"height": False, "width": False, "negative_prompt": False}

    def add(self, row: Row, bar: tqdm) -> bool:
        bar.update(1)
        if row.error:
            self.rejects.add(row.source, row.row, row.error, row.fields.get("prompt"))
            return False
        try:
            rec, extra = _validate(row, self.opts)
        except InvalidPrompt as e:
            self.rejects.add(row.source, row.row, str(e), row.fields.get("prompt"))
            return False
        text = rec["prompt"]
        tid = text_id(text)
        self._tk.append(hash64(text.casefold()) if self.opts.case_insensitive else int(tid, 16))
        # ids given by the input and ids derived from text share one key space
        self._ik.append(hash64("id:" + (rec["prompt_id"] or tid)))
        for name in self.seen_columns:
            self.seen_columns[name] |= rec[name] is not None
        for k, v in extra.items():
            self.extra_types.setdefault(k, set()).add(type(v).__name__)
        rec["file"], rec["row"] = row.source, row.row
        self.buf.append(rec)
        if len(self.buf) >= BATCH_ROWS:
            self.flush()
        return True

    def flush(self) -> None:
        if self.buf:
            self.writer.write_batch(pa.RecordBatch.from_pylist(self.buf, schema=_SCRATCH))
            self.text_keys.append(np.array(self._tk, dtype=np.uint64))
            self.id_keys.append(np.array(self._ik, dtype=np.uint64))
            self.buf, self._tk, self._ik = [], [], []

    def close(self) -> tuple[np.ndarray, np.ndarray]:
        self.flush()
        self.writer.close()
        empty = np.zeros(0, dtype=np.uint64)
        return np.concatenate(self.text_keys or [empty]), np.concatenate(self.id_keys or [empty])


def _first_occurrence(keys: np.ndarray) -> np.ndarray:
    """Boolean mask: True where a key is seen for the first time (order preserved)."""
    mask = np.zeros(len(keys), dtype=bool)
    mask[np.unique(keys, return_index=True)[1]] = True
    return mask


def _extra_schema(types: dict[str, set[str]]) -> list[tuple[str, pa.DataType, bool]]:
    """Arrow type per extra column: scalars keep their type, anything mixed or nested → JSON text."""
    out = []
    for name, seen in types.items():
        seen = seen - {"NoneType"}
        if seen <= {"bool"} and seen:
            out.append((name, pa.bool_(), False))
        elif seen <= {"int"} and seen:
            out.append((name, pa.int64(), False))
        elif seen <= {"int", "float"} and seen:
            out.append((name, pa.float64(), False))
        elif seen <= {"str"}:
            out.append((name, pa.string(), False))
        else:
            out.append((name, pa.string(), True))  # stored as JSON text
    return out


def build_manifest(inputs: list[str], output: str | os.PathLike, opts: BuildOptions) -> BuildSummary:
    """Build a manifest from ``inputs``; see the module docstring. Raises :class:`ManifestError`."""
    t0 = time.perf_counter()
    for spec in inputs:  # a mistyped path is a usage error: fail before reading anything
        input_kind(resolve(spec))
    output = Path(output)
    summary = BuildSummary(manifest=str(output))
    rejects = _Rejects(rejects_path(output), opts.on_invalid)
    with tempfile.TemporaryDirectory(prefix="twostep-build-", dir=output.parent if output.parent.exists()
                                     else None) as tmp:
        scratch = Path(tmp) / "pass1.parquet"
        try:
            p1 = _read_inputs(inputs, opts, rejects, scratch, summary)
            text_keys, id_keys = p1.close()
            _write_manifest(scratch, output, opts, rejects, summary, p1, text_keys, id_keys)
        except BaseException:
            rejects.close()
            raise
    rejects.close()
    summary.rejected, summary.duplicates = rejects.count, rejects.duplicates
    summary.rejects_file = str(rejects.path) if rejects.path.exists() else None
    summary.seconds = round(time.perf_counter() - t0, 3)
    return summary


def _read_inputs(inputs: list[str], opts: BuildOptions, rejects: _Rejects, scratch: Path,
                 summary: BuildSummary) -> _Pass1:
    p1 = _Pass1(scratch, opts, rejects)
    with tqdm(desc="reading prompts", unit=" rows", mininterval=1.0) as bar:
        for spec in inputs:
            read = kept = 0
            rows: Iterator[Row] = iter_rows(spec, opts.text_column, opts.hf_split)
            try:
                for row in rows:
                    read += 1
                    kept += p1.add(row, bar)
            except InputError as e:
                rejects.add(e.source, e.row, e.reason)
                log.warning("%s", e)
            summary.inputs.append({"source": display_name(spec), "rows": read, "valid": kept})
            summary.rows_read += read
            log.info("read %s: %d rows, %d valid", spec, read, kept)
    return p1


def _write_manifest(scratch: Path, output: Path, opts: BuildOptions, rejects: _Rejects,
                    summary: BuildSummary, p1: _Pass1, text_keys: np.ndarray, id_keys: np.ndarray) -> None:
    keep = _first_occurrence(text_keys)
    # Among distinct texts, a repeated prompt_id means one id names two different prompts.
    kept_idx = np.flatnonzero(keep)
    reused = np.zeros(len(keep), dtype=bool)
    reused[kept_idx[~_first_occurrence(id_keys[kept_idx])]] = True
    if not (keep & ~reused).any():
        raise ManifestError("no valid prompts in the inputs" +
                            (f"; see {rejects.path} for the rejected rows" if rejects.count else ""))

    extras = _extra_schema(p1.extra_types)
    fields = [pa.field("prompt_id", pa.string(), False), pa.field("prompt", pa.string(), False),
              pa.field("seed", pa.int64(), False)]
    fields += [pa.field(n, OPTIONAL_COLUMNS[n]) for n, seen in p1.seen_columns.items() if seen]
    fields.append(pa.field("source", pa.string()))
    fields += [pa.field(n, t) for n, t, _ in extras]
    schema = pa.schema(fields)
    as_json = {n for n, _, j in extras if j}

    writer = ManifestWriter(output, schema)
    try:
        i = 0
        prompts = 0
        for batch in pq.ParquetFile(scratch).iter_batches(batch_size=BATCH_ROWS):
            out: list[dict[str, Any]] = []
            for rec in batch.to_pylist():
                if not keep[i]:
                    rejects.add(rec["file"], rec["row"], "duplicate of an earlier prompt", rec["prompt"],
                                duplicate=True)
                elif reused[i]:
                    rejects.add(rec["file"], rec["row"],
                                f"prompt_id {rec['prompt_id']!r} reused with different text", rec["prompt"])
                else:
                    prompts += 1
                    out.extend(_expand(rec, opts, as_json))
                i += 1
            writer.write(pa.RecordBatch.from_pylist(out, schema=schema))
        build = {
            "format": FORMAT_VERSION, "options": asdict(opts), "inputs": summary.inputs,
            "rows_read": summary.rows_read, "rejected": rejects.count, "duplicates": rejects.duplicates,
            "prompts": prompts,
        }
        summary.manifest_hash = writer.close(build)
        summary.prompts, summary.rows = prompts, writer.rows
    except BaseException:
        writer.abort()
        raise


def _expand(rec: dict[str, Any], opts: BuildOptions, as_json: set[str]) -> Iterator[dict[str, Any]]:
    """The manifest rows of one unique prompt: ``per_prompt`` variants with their seeds."""
    base = rec["prompt_id"] or text_id(rec["prompt"])
    extra = json.loads(rec["extra"]) if rec["extra"] else {}
    for k in as_json:
        if k in extra and extra[k] is not None:
            extra[k] = json.dumps(extra[k], ensure_ascii=False, sort_keys=True, default=str)
    for k in range(opts.per_prompt):
        pid = variant_id(base, k, opts.per_prompt)
        if rec["seed"] is None:
            seed = derive_seed(opts.seed, pid)
        else:
            seed = rec["seed"] if opts.per_prompt == 1 else derive_seed(rec["seed"], pid)
        yield {**extra, "prompt_id": pid, "prompt": rec["prompt"], "seed": seed,
               "height": rec["height"], "width": rec["width"],
               "negative_prompt": rec["negative_prompt"], "source": rec["source"]}
