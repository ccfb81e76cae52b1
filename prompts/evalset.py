"""The prompts an evaluation samples: the first rows of a manifest, or fresh toy prompts.

Shared by ``twostep eval`` (student against teacher) and ``twostep.toy.evaluate`` (the toy
teacher's quality bar), so both read manifests, seeds and sizes the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from twostep.toy.world import ATTRIBUTES, sample_toy_prompts

from .manifest import derive_seed, parquet_metadata


@dataclass
class EvalPrompts:
    prompts: list[str]
    seeds: list[int]
    height: int
    width: int
    named: list[dict] | None = None
    """Toy world: the attributes each caption names (``None`` = left out); ``None`` elsewhere."""


def eval_prompts(path: str | None, n: int, seed: int, size: tuple[int, int] | None = None) -> EvalPrompts:
    """The first ``n`` rows of a manifest (any ``twostep prompts`` manifest; toy ones also give the
    named attributes), or ``n`` fresh toy prompts with seeds derived from ``seed``. ``size``
    (height, width) overrides the manifest's; without it the rows must share one size."""
    if path is None:
        rows = list(sample_toy_prompts(n, seed))
        h, w = size or (64, 64)
        return EvalPrompts([r["prompt"] for r in rows], [derive_seed(seed, f"eval-{i}") for i in range(n)], h, w,
                           [{a: r[a] for a in ATTRIBUTES} for r in rows])
    import pyarrow.parquet as pq

    names = set(parquet_metadata(path).schema.to_arrow_schema().names)
    missing = {"prompt", "seed"} - names
    if missing:
        raise ValueError(f"{path}: not a twostep manifest, missing column(s) {sorted(missing)}")
    toy = set(ATTRIBUTES) <= names
    cols = ["prompt", "seed"] + [c for c in ("height", "width") if c in names] + (list(ATTRIBUTES) if toy else [])
    rows = pq.read_table(path, columns=cols).slice(0, n).to_pylist()
    if not rows:
        raise ValueError(f"{path}: no rows")
    if size is None:
        sizes = {(r.get("height") or 64, r.get("width") or 64) for r in rows}
        if len(sizes) > 1:
            raise ValueError(f"{path}: the first {len(rows)} rows have several sizes {sorted(sizes)}; "
                             "pass --size HxW to sample them all at one size")
        size = sizes.pop()
    return EvalPrompts([r["prompt"] for r in rows], [int(r["seed"]) for r in rows], size[0], size[1],
                       [{a: r[a] for a in ATTRIBUTES} for r in rows] if toy else None)
