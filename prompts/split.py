"""``twostep prompts split``: a deterministic train/eval split of a manifest by prompt_id.

A row goes to eval when a hash of its prompt_id (variant suffix removed, so all variants of a
prompt land on the same side) falls below the fraction. The decision depends on the id alone:
adding rows to a manifest never moves existing rows between splits.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .manifest import FORMAT_VERSION, ManifestWriter, iter_batches, read_meta


@dataclass
class SplitSummary:
    train: str
    eval: str
    train_rows: int
    eval_rows: int
    train_hash: str
    eval_hash: str


def group_key(prompt_id: str, per_prompt: int) -> str:
    """The id shared by all variants of one prompt."""
    return prompt_id.rsplit("-", 1)[0] if per_prompt > 1 else prompt_id


def in_eval(prompt_id: str, fraction: float, salt: str = "", per_prompt: int = 1) -> bool:
    """Whether a prompt_id belongs to the eval split."""
    digest = hashlib.sha256(f"{salt}/{group_key(prompt_id, per_prompt)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_manifest(path: str | os.PathLike, fraction: float, out_dir: str | os.PathLike | None = None,
                   salt: str = "") -> SplitSummary:
    """Write ``<stem>.train.parquet`` and ``<stem>.eval.parquet`` (each a manifest with its own hash)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in (0, 1), not {fraction}")
    path = Path(path)
    parent_hash, build = read_meta(path)
    per_prompt = int(build.get("options", {}).get("per_prompt", 1))
    stem = path.name.removesuffix(".parquet")
    out = Path(out_dir) if out_dir else path.parent
    schema = pq.read_schema(path).remove_metadata()
    writers = {name: ManifestWriter(out / f"{stem}.{name}.parquet", schema) for name in ("train", "eval")}
    try:
        for batch in iter_batches(path):
            ids = batch.column("prompt_id").to_pylist()
            mask = pa.array([in_eval(i, fraction, salt, per_prompt) for i in ids])
            writers["eval"].write(batch.filter(mask))
            writers["train"].write(batch.filter(pc.invert(mask)))
        record = {"format": FORMAT_VERSION, "split_of": parent_hash, "eval_fraction": fraction, "salt": salt,
                  "options": build.get("options", {})}
        hashes = {name: w.close({**record, "split": name}) for name, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return SplitSummary(
        train=str(writers["train"].path), eval=str(writers["eval"].path),
        train_rows=writers["train"].rows, eval_rows=writers["eval"].rows,
        train_hash=hashes["train"], eval_hash=hashes["eval"],
    )
