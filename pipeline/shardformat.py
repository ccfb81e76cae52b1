"""The shard format: what a shard's tar holds, the one definition that the writer, the trainer's
reader, ``twostep verify`` and the dataset card share. docs/store.md describes it for users; this
docstring is the contract. Where the shards and the other store files go is :mod:`.layout`'s.

Shards are plain tars readable by ``webdataset``, ``datasets`` and ``ray.data``. Each sample is a
run of adjacent members named ``<key>.<suffix>``:

==============  ========  ====================================================================
suffix          presence  content
==============  ========  ====================================================================
``txt``         always    the prompt, UTF-8
``json``        always    an object: ``prompt_id`` (= the key), integer ``seed``, ``height`` and
                          ``width``; the writer adds ``noise_sha256``, timings, teacher facts and
                          the manifest's extra columns
``latent.npy``  always    float16 (C, h, w): the teacher's final latent (σ = 0)
``mid.npy``     optional  float16 (C, h, w): the state at σ = mid_sigma
``noise.npy``   optional  float32 (C, h, w): the initial noise at σ = 1 (else regenerated from
                          ``seed`` and checked against ``noise_sha256``)
``webp`` |      optional  at most one: the decoded image (webp and png lossless, jpg quality 95)
``jpg`` |
``png``
==============  ========  ====================================================================

Keys are the manifest's ``prompt_id``: one or more ASCII letters, digits, ``_`` or ``-``. A dot
would move the split between key and suffix (WebDataset splits a member name at its first dot), and
a slash would put the member in a folder. Arrays are ``.npy`` files written and read with
``allow_pickle=False``, so an object array is refused. Writing is deterministic: members of a sample
in name order, mtime 0, owner ``twostep``, so the same samples give the same bytes.

A shard is *good* when :func:`iter_samples` reads it without :class:`ShardFormatError`: a
readable tar of regular files only, each named ``<key>.<suffix>`` with a valid key and a suffix from
the table; one key's members adjacent and none repeated; every sample with ``txt``, ``json`` and
``latent.npy``, a json object as above, arrays of the listed dtypes and one (C, h, w) shape, and
an image whose bytes start with its format's signature. ``twostep verify`` and the trainer both
read shards with it, so they accept and refuse the same shards.
"""

from __future__ import annotations

import io
import json
import lzma
import re
import tarfile
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

ARRAYS = {"latent": np.dtype(np.float16), "mid": np.dtype(np.float16), "noise": np.dtype(np.float32)}
"""Array name → dtype; the member is ``<name>.npy``."""
OPTIONAL_ARRAYS = ("mid", "noise")
"""What ``twostep generate --save`` may add."""
IMAGE_FORMATS = ("webp", "jpg", "png")
REQUIRED = ("txt", "json", "latent.npy")
MEMBERS = (*REQUIRED, *(f"{a}.npy" for a in OPTIONAL_ARRAYS), *IMAGE_FORMATS)
META_INTS = ("seed", "height", "width")
"""json fields that every sample carries as integers (besides ``prompt_id``)."""

_KEY = re.compile(r"[A-Za-z0-9_\-]+")
_SIGNATURES = {"png": (0, b"\x89PNG\r\n\x1a\n"), "jpg": (0, b"\xff\xd8\xff"), "webp": (8, b"WEBP")}


class ShardFormatError(Exception):
    """A shard breaks the format; the message names the member or sample and the reason. Not a
    ValueError, so that the ValueErrors of json, UTF-8 and npy parsing, which become one, never
    re-wrap it."""


@dataclass(frozen=True)
class Sample:
    """One validated sample of a shard (arrays as stored: float16 latent and mid, float32 noise)."""

    key: str
    prompt: str
    meta: dict[str, Any]
    latent: np.ndarray
    mid: np.ndarray | None = None
    noise: np.ndarray | None = None
    image: bytes | None = None
    """The encoded image bytes, not decoded."""
    image_format: str | None = None

    @property
    def seed(self) -> int:
        return int(self.meta["seed"])


def key_problem(key: object) -> str | None:
    """Why ``key`` cannot be a sample key, or None when it can."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        return f"key {key!r} is not one or more letters, digits, '_' or '-' (no dots, no slashes)"
    return None


# --- writing --------------------------------------------------------------------------------------

def npy_bytes(array: np.ndarray) -> bytes:
    """``.npy`` bytes of an array (never pickled)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def image_bytes(image: np.ndarray, fmt: str) -> bytes:
    """Encode a (H, W, 3) uint8 image; webp and png lossless, jpg at quality 95."""
    from PIL import Image

    buf = io.BytesIO()
    kw = {"webp": {"lossless": True}, "jpg": {"quality": 95}, "png": {"compress_level": 6}}[fmt]
    Image.fromarray(image).save(buf, format={"jpg": "JPEG"}.get(fmt, fmt.upper()), **kw)
    return buf.getvalue()


def encode_sample(key: str, prompt: str, meta: dict[str, Any], latent: np.ndarray, *,
                  mid: np.ndarray | None = None, noise: np.ndarray | None = None,
                  image: np.ndarray | None = None, image_format: str = "none") -> dict[str, Any]:
    """One sample as WebDataset members (``__key__`` plus suffix → bytes), arrays cast to their dtypes.

    ``image``: (H, W, 3) uint8, encoded as ``image_format`` (``none`` leaves it out).
    Raises ValueError for a bad key or a json that readers would refuse.
    """
    problem = key_problem(key)
    if problem:
        raise ValueError(problem)
    _check_meta(key, meta, ValueError)
    sample = {"__key__": key, "txt": prompt.encode(),
              "json": json.dumps(meta, sort_keys=True, default=str).encode()}
    for name, array in (("latent", latent), ("mid", mid), ("noise", noise)):
        if array is not None:
            sample[f"{name}.npy"] = npy_bytes(np.asarray(array).astype(ARRAYS[name]))
    if image is not None and image_format != "none":
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image format {image_format!r} is not one of {', '.join(IMAGE_FORMATS)}")
        sample[image_format] = image_bytes(image, image_format)
    return sample


def tar_bytes(samples: Iterable[dict[str, Any]]) -> bytes:
    """A WebDataset tar of encoded samples; fixed mtime and owner, so the same samples give the same bytes."""
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0.0, user="twostep", group="twostep") as w:
        for s in samples:
            w.write(s)
    return buf.getvalue()


def members_text(save: Iterable[str], image_format: str, sigma_mid: float) -> str:
    """The members of a store's samples in words (markdown), for the dataset card."""
    save = set(save)
    parts = ["`txt`", "`json`", f"`latent.npy` ({ARRAYS['latent'].name})"]
    if "mid" in save:
        parts.append(f"`mid.npy` (state at σ={sigma_mid}, {ARRAYS['mid'].name})")
    if "noise" in save:
        parts.append(f"`noise.npy` ({ARRAYS['noise'].name})")
    if image_format != "none":
        parts.append(f"`{image_format}`")
    return ", ".join(parts)


# --- reading --------------------------------------------------------------------------------------

def split_member(name: str) -> tuple[str, str]:
    """(key, suffix) of a member name, checked against the key rule and the member table."""
    key, dot, suffix = name.partition(".")
    problem = key_problem(key)
    if problem or not dot:
        raise ShardFormatError(f"member {name!r}: not <key>.<suffix> with a valid key "
                               f"({problem or 'no suffix'})")
    if suffix not in MEMBERS:
        raise ShardFormatError(f"member {name!r}: unknown suffix {suffix!r} (known: {', '.join(MEMBERS)}; "
                               "a key cannot contain dots)")
    return key, suffix


def iter_samples(data: bytes) -> Iterator[Sample]:
    """The validated samples of a shard's bytes (a tar, or a gzip/bz2/xz-compressed one), in tar order.

    Raises :class:`ShardFormatError` at the first problem; samples before it have been yielded, so
    callers that must not use part of a bad shard collect the whole list first.
    """
    seen: set[str] = set()
    key: str | None = None
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tf:
            for m in tf:
                if not m.isfile():
                    raise ShardFormatError(f"member {m.name!r} is not a regular file")
                k, suffix = split_member(m.name)
                if k != key:
                    if key is not None:
                        yield decode_sample(key, members)
                    if k in seen:
                        raise ShardFormatError(f"key {k} appears twice (its members are not adjacent)")
                    seen.add(k)
                    key, members = k, {}
                if suffix in members:
                    raise ShardFormatError(f"member {m.name} appears twice")
                members[suffix] = tf.extractfile(m).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
        raise ShardFormatError(f"not a readable tar: {type(e).__name__}: {e}") from e
    if key is not None:
        yield decode_sample(key, members)


def decode_sample(key: str, members: dict[str, bytes]) -> Sample:
    """One sample from its members (suffix → bytes); raises :class:`ShardFormatError`."""
    missing = [s for s in REQUIRED if s not in members]
    if missing:
        raise ShardFormatError(f"sample {key} has no {', '.join(missing)} member")
    images = [s for s in IMAGE_FORMATS if s in members]
    if len(images) > 1:
        raise ShardFormatError(f"sample {key} has {len(images)} images ({', '.join(images)}); at most one")
    prompt = _parse(key, "txt", lambda b: b.decode("utf-8"), members)
    meta = _parse(key, "json", json.loads, members)
    _check_meta(key, meta, ShardFormatError)
    arrays = {name: _parse(key, f"{name}.npy", _npy, members) for name in ARRAYS if f"{name}.npy" in members}
    latent = arrays["latent"]
    if latent.ndim != 3:
        raise ShardFormatError(f"sample {key}: latent.npy has shape {latent.shape}, not (C, h, w)")
    for name, a in arrays.items():
        if a.dtype != ARRAYS[name]:
            raise ShardFormatError(f"sample {key}: {name}.npy is {a.dtype}, not {ARRAYS[name]}")
        if a.shape != latent.shape:
            raise ShardFormatError(f"sample {key}: {name}.npy has shape {a.shape}, latent.npy {latent.shape}")
    fmt = images[0] if images else None
    if fmt is not None:
        at, magic = _SIGNATURES[fmt]
        if members[fmt][at:at + len(magic)] != magic:
            raise ShardFormatError(f"sample {key}: {fmt} member is not a {fmt} image")
    return Sample(key=key, prompt=prompt, meta=meta, latent=latent, mid=arrays.get("mid"),
                  noise=arrays.get("noise"), image=members[fmt] if fmt else None, image_format=fmt)


# numpy parses the .npy header with ast.literal_eval, whose AST builder keeps its recursion depth
# in interpreter-wide state: CPython 3.11 threads decoding at once (verify's thread pool) can fail
# with "SystemError: AST constructor recursion depth mismatch" (python/cpython#106905).
_NPY_HEADER_LOCK = threading.Lock()


def _npy(data: bytes) -> np.ndarray:
    """A ``.npy`` (not ``.npz``) array, refusing pickles."""
    f = io.BytesIO(data)
    np.lib.format.read_magic(f)  # a .npz or anything else is a ValueError here
    f.seek(0)
    with _NPY_HEADER_LOCK:
        return np.lib.format.read_array(f, allow_pickle=False)


def _parse(key: str, suffix: str, parse, members: dict[str, bytes]) -> Any:
    try:
        return parse(members[suffix])
    except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, npy header and pickle refusals
        raise ShardFormatError(f"sample {key}: {suffix}: {type(e).__name__}: {e}") from e


def _check_meta(key: str, meta: object, error: type[Exception]) -> None:
    if not isinstance(meta, dict):
        raise error(f"sample {key}: json is a {type(meta).__name__}, not an object")
    if meta.get("prompt_id") != key:
        raise error(f"sample {key}: json prompt_id is {meta.get('prompt_id')!r}, not the key")
    bad = [f for f in META_INTS if isinstance(meta.get(f), bool) or not isinstance(meta.get(f), int)]
    if bad:
        raise error(f"sample {key}: json has no integer {', '.join(bad)}")
