"""The procedural "shapes" toy world: attribute space, scenes, captions and toy manifests.

A scene is one coloured shape in a cell of a 3×3 grid on a plain background. Five attributes
are *named* (shape, colour, size, position, background); captions leave each one out with
probability ``omit_prob``, and every image also carries unnamed continuous variation (jitter
inside the cell, size inside its class, a small rotation), so an image is not a function of its caption
and a few-step sampler has modes to average (docs/toy_world.md, "Why captions leave attributes
out"). Rendering lives in ``twostep.toy.render``; this module is pure Python + numpy so
the prompts stage can build toy manifests without the pipeline.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from twostep.prompts.build import BuildSummary
from twostep.prompts.manifest import BATCH_ROWS, FORMAT_VERSION, ManifestWriter, derive_seed
from twostep.prompts.normalize import InvalidPrompt, check_size

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# RGB values picked so every object colour is ≥ 110 away (Euclidean RGB) from every background
# and ≥ 85 from every other object colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (245, 215, 30),
    "purple": (140, 50, 210),
    "orange": (250, 130, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "pink": (255, 185, 210),
}
SIZES: tuple[str, ...] = ("small", "large")
# Row-major 3×3 grid: POSITIONS[3 * row + col].
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position", "background")
CLASSES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES,
    "position": POSITIONS, "background": tuple(BACKGROUNDS),
}

# Geometry in pixels of a 64×64 image (the renderer scales it with the image side).
RADIUS: dict[str, float] = {"small": 6.5, "large": 10.0}
"""Base object radius per size class; ``scale`` multiplies it. Before the toy teacher of 2026-12-02
small was 5 and large 8.75: a small square 8–10 px wide then had too few pixels of corner for a
4× VAE to keep (its reconstructions read as squares 51% of the time, large squares 96%)."""
SCALE_RANGE = (0.9, 1.1)
"""``scale`` range: small spans 5.85–7.15 px, large 9–11 px, a clear gap between classes."""
JITTER = 3.0
"""Default ± jitter of the object centre inside its cell."""
ROTATION = 10.0
"""Default ± rotation in degrees of squares and triangles around upright. Not more: rotation is
unnamed, so a sampler that cannot resolve it draws the average over it, and the average of a
square over a full turn is a disc, that of a triangle a rounded blob. Measured with the checker on
renders averaged over 24 rotations spanning the range: over 360° squares read as circles 100/100
and triangles as triangles 5/100 (the first toy teachers drew exactly that); over ±10° squares
99/100 and triangles 100/100 (over ±20°: squares 35/100)."""
OMIT_PROB = 0.35


@dataclass(frozen=True)
class ToyScene:
    """One toy image: five named attributes plus unnamed continuous variation."""

    shape: str
    colour: str
    size: str
    position: str
    background: str
    dx: float = 0.0
    """Horizontal offset of the object centre from its cell centre, in pixels at 64×64."""
    dy: float = 0.0
    """Vertical offset (down is positive), in pixels at 64×64."""
    scale: float = 1.0
    """Size within the size class: multiplies ``RADIUS[size]``; see ``SCALE_RANGE``."""
    rotation: float = 0.0
    """Degrees, counter-clockwise (square and triangle; 0 for circles)."""

    def __post_init__(self) -> None:
        for name in ATTRIBUTES:
            if getattr(self, name) not in CLASSES[name]:
                raise ValueError(f"{name} must be one of {CLASSES[name]}, not {getattr(self, name)!r}")

    def named(self) -> dict[str, str]:
        """The five named attributes."""
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (floats as Python floats)."""
        return {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ToyScene:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing floats take defaults."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def _pick(u: float, options: tuple[str, ...] | list[str]) -> str:
    """The option a uniform draw ``u`` in [0, 1) selects."""
    return options[min(int(u * len(options)), len(options) - 1)]


def sample_scene(rng: np.random.Generator, *, jitter: float = JITTER, rotation: float = ROTATION) -> ToyScene:
    """A uniformly random scene: centre jitter within ± ``jitter`` px, rotation within ± ``rotation``
    degrees (squares and triangles). Draws exactly 9 uniforms whatever the options (one vectorised
    call: per-scalar numpy draws cost ~2 µs each), so streams of scenes stay aligned."""
    u = rng.random(9)
    named = {name: _pick(u[i], CLASSES[name]) for i, name in enumerate(ATTRIBUTES)}
    lo, hi = SCALE_RANGE
    angle = (2 * u[8] - 1) * rotation if named["shape"] != "circle" else 0.0
    return ToyScene(**named, dx=float((2 * u[5] - 1) * jitter), dy=float((2 * u[6] - 1) * jitter),
                    scale=float(lo + (hi - lo) * u[7]), rotation=float(angle))


# --- captions -------------------------------------------------------------------------------
# Prepositions that read naturally before "the <position>".
_POS_PREPS: dict[str, tuple[str, ...]] = {
    "top": ("at the", "near the"), "bottom": ("at the", "near the"),
    "left": ("on the", "near the"), "right": ("on the", "near the"),
}
_CORNER_PREPS = ("in the", "at the", "near the")
_BG_PHRASES = ("on a {} background", "against a {} background")
_FILLER_NOUNS = ("shape", "object")
# Templates over three parts: n = noun phrase, p = position phrase, b = background phrase.
# A leading part followed by "," is a prefix; an omitted part vanishes with its comma.
_TEMPLATES: tuple[tuple[str, ...], ...] = (
    ("n", "p", "b"), ("n", "b", "p"), ("b,", "n", "p"), ("p,", "n", "b"),
    ("there is", "n", "p", "b"), ("a picture of", "n", "p", "b"),
)
_FIXED_WORDS = "a an the in at near on against background something and there is picture of"


def _article(next_word: str) -> str:
    return "an" if next_word[0] in "aeiou" else "a"


def _noun_phrase(named: dict[str, str | None], u: np.ndarray) -> str:
    """E.g. "a small red circle", "an orange shape", "something small and green", "something"."""
    adjs = [w for w in (named["size"], named["colour"]) if w]
    if named["shape"] is None and u[0] < 0.5:
        return "something " + " and ".join(adjs) if adjs else "something"
    words = [*adjs, named["shape"] or _pick(u[1], _FILLER_NOUNS)]
    return f"{_article(words[0])} {' '.join(words)}"


def caption(scene: ToyScene, rng: np.random.Generator, omit_prob: float = OMIT_PROB) -> tuple[str, dict]:
    """A varied English caption of ``scene``; each attribute is left out with ``omit_prob``.

    Returns ``(text, named)`` where ``named`` maps each attribute to its value, or ``None`` where
    the caption leaves it out. Text is lower case; the only punctuation is a comma after a prefix.
    """
    u = rng.random(10)  # 5 omissions, template, 2 for the noun phrase, preposition, background phrase
    named = {a: (getattr(scene, a) if u[i] >= omit_prob else None) for i, a in enumerate(ATTRIBUTES)}
    template = _TEMPLATES[min(int(u[5] * len(_TEMPLATES)), len(_TEMPLATES) - 1)]
    parts: dict[str, str | None] = {"n": _noun_phrase(named, u[6:8]), "p": None, "b": None}
    if named["position"]:
        pos = named["position"]
        parts["p"] = f"{_pick(u[8], _POS_PREPS.get(pos, _CORNER_PREPS))} {pos}"
    if named["background"]:
        parts["b"] = _pick(u[9], _BG_PHRASES).format(named["background"])
    out: list[str] = []
    for slot in template:
        key = slot.rstrip(",")
        if key not in parts:  # literal words
            out.append(slot)
        elif parts[key]:
            out.append(parts[key] + ("," if slot.endswith(",") else ""))
    return " ".join(out), named


def toy_tokens(text: str) -> list[str]:
    """Split a toy caption into words, the comma being a word of its own."""
    return text.replace(",", " , ").split()


def _all_words() -> tuple[str, ...]:
    words = set(_FIXED_WORDS.split()) | {","} | set(_FILLER_NOUNS)
    for phrases in (*_POS_PREPS.values(), _CORNER_PREPS, _BG_PHRASES):
        words.update(w for p in phrases for w in p.format("").split())
    for t in _TEMPLATES:
        words.update(w for slot in t if slot.rstrip(",") not in ("n", "p", "b") for w in slot.split())
    for values in CLASSES.values():
        words.update(w for v in values for w in v.split())
    return tuple(sorted(words))


TOY_WORDS: tuple[str, ...] = _all_words()
"""Every token (see :func:`toy_tokens`) a toy caption can contain, sorted; includes ","."""


# --- toy manifests --------------------------------------------------------------------------
def sample_toy_prompts(n: int, seed: int, omit_prob: float = OMIT_PROB) -> Iterator[dict[str, Any]]:
    """``n`` rows ``{prompt, shape, colour, size, position, background}`` (``None`` = not named).

    Deterministic in ``(n, seed)``; the first ``k`` rows do not depend on ``n``.
    """
    rng = np.random.default_rng(seed)
    for _ in range(n):
        text, named = caption(sample_scene(rng), rng, omit_prob)
        yield {"prompt": text, **named}


def toy_manifest_schema() -> pa.Schema:
    """Columns of a toy manifest: the core manifest columns, then one string per attribute."""
    return pa.schema(
        [pa.field("prompt_id", pa.string(), False), pa.field("prompt", pa.string(), False),
         pa.field("seed", pa.int64(), False), pa.field("height", pa.int32()), pa.field("width", pa.int32()),
         pa.field("source", pa.string())]
        + [pa.field(a, pa.string()) for a in ATTRIBUTES]
    )


def build_toy_manifest(n: int, output: str | os.PathLike, seed: int = 0, height: int = 64, width: int = 64,
                       omit_prob: float = OMIT_PROB) -> BuildSummary:
    """Write a manifest of ``n`` toy captions (ids ``toy-<seed>-<i>``) with their named attributes.

    Streams in batches of ``BATCH_ROWS`` rows, so memory does not grow with ``n``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, not {n}")
    for name, side in (("height", height), ("width", width)):
        try:
            check_size(name, side)
        except InvalidPrompt as e:
            raise ValueError(str(e)) from None
    t0 = time.perf_counter()
    output = Path(output)
    schema = toy_manifest_schema()
    writer = ManifestWriter(output, schema)
    try:
        buf: list[dict[str, Any]] = []
        for i, row in enumerate(sample_toy_prompts(n, seed, omit_prob)):
            pid = f"toy-{seed}-{i:07d}"
            buf.append({"prompt_id": pid, "seed": derive_seed(seed, pid), "height": height, "width": width,
                        "source": "toy", **row})
            if len(buf) == BATCH_ROWS:
                writer.write(pa.RecordBatch.from_pylist(buf, schema=schema))
                buf = []
        writer.write(pa.RecordBatch.from_pylist(buf, schema=schema))
        build = {"format": FORMAT_VERSION, "toy": {"n": n, "seed": seed, "omit_prob": omit_prob},
                 "prompts": n, "rows_read": n, "rejected": 0, "duplicates": 0}
        digest = writer.close(build)
    except BaseException:
        writer.abort()
        raise
    return BuildSummary(manifest=str(output), manifest_hash=digest, rows_read=n, prompts=n, rows=writer.rows,
                        inputs=[{"source": "toy", "rows": n, "valid": n}],
                        seconds=round(time.perf_counter() - t0, 3))
