"""Prompt text normalisation and validation.

Every prompt goes through :func:`normalize` before it gets an id, so the same text typed with
different whitespace, Unicode composition or stray control characters maps to one prompt.
"""

from __future__ import annotations

import re
import unicodedata

_WS = re.compile(r"\s+")
# Cc = C0/C1 control characters. Whitespace controls (\t, \n, \r, …) become spaces first.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Reading text with errors="surrogateescape" turns each undecodable byte into U+DC80..U+DCFF; other
# lone surrogates come from JSON escapes such as "\ud800". Neither can be written as UTF-8.
_BAD_UTF8 = re.compile(r"[\ud800-\udfff]")


class InvalidPrompt(ValueError):
    """A prompt that cannot go into a manifest; the message is the reason."""


def normalize(text: str) -> str:
    """NFC-normalise, drop control characters and collapse whitespace to single spaces."""
    text = unicodedata.normalize("NFC", text)
    text = _WS.sub(" ", text.replace("\x85", " "))
    return _CONTROL.sub("", text).strip()


def clean_prompt(raw: object, max_chars: int) -> str:
    """Validate one raw prompt value and return its normalised text.

    Raises :class:`InvalidPrompt` with a reason a user can act on.
    """
    if raw is None:
        raise InvalidPrompt("prompt is missing (null)")
    if not isinstance(raw, str):
        raise InvalidPrompt(f"prompt has type {type(raw).__name__}, expected a string")
    if _BAD_UTF8.search(raw):
        raise InvalidPrompt("invalid UTF-8 in prompt")
    if "\x00" in raw:
        raise InvalidPrompt("prompt contains a NUL byte")
    text = normalize(raw)
    if not text:
        raise InvalidPrompt("prompt is empty or whitespace only")
    if len(text) > max_chars:
        raise InvalidPrompt(f"prompt is {len(text)} characters, over --max-chars {max_chars}")
    return text


def check_optional_text(name: str, raw: object) -> str | None:
    """Validate an optional text field such as ``negative_prompt`` (None stays None)."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise InvalidPrompt(f"field {name!r} has type {type(raw).__name__}, expected a string")
    if _BAD_UTF8.search(raw) or "\x00" in raw:
        raise InvalidPrompt(f"field {name!r} contains invalid UTF-8 or a NUL byte")
    return normalize(raw)


def check_extra(name: str, value: object) -> None:
    """Extra columns are kept as they are, but their text must be valid UTF-8."""
    if isinstance(value, str) and _BAD_UTF8.search(value):
        raise InvalidPrompt(f"column {name!r} contains invalid UTF-8")


def check_size(name: str, raw: object) -> int | None:
    """Validate an image side (``height``/``width``): a positive multiple of 16, or empty.

    Z-Image latents are 8× down and the transformer patches 2×2, so sides are multiples of 16.
    Strings of digits (CSV, TSV) are accepted.
    """
    if raw is None or raw == "":
        return None
    if isinstance(raw, bool):
        raise InvalidPrompt(f"field {name!r} is a boolean, expected an integer")
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if isinstance(raw, str) and raw.strip().isdecimal():
        raw = int(raw.strip())
    if not isinstance(raw, int):
        raise InvalidPrompt(f"field {name!r} is {raw!r}, expected an integer")
    if raw <= 0 or raw % 16:
        raise InvalidPrompt(f"field {name!r} is {raw}, expected a positive multiple of 16")
    return raw


def check_seed(raw: object) -> int | None:
    """Validate a seed carried by the input: an integer in [0, 2**63)."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, str) and raw.strip().isdecimal():
        raw = int(raw.strip())
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < 2**63:
        raise InvalidPrompt(f"field 'seed' is {raw!r}, expected an integer in [0, 2**63)")
    return raw


_ID_OK = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_prompt_id(raw: object) -> str | None:
    """Validate a ``prompt_id`` carried by the input.

    Ids become WebDataset keys and file names: letters, digits, ``_`` and ``-`` only (a dot
    would split the key), at most 128 characters.
    """
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raw = str(raw)
    if len(raw) > 128 or not _ID_OK.fullmatch(raw):
        raise InvalidPrompt(
            f"field 'prompt_id' is {raw!r}: use at most 128 letters, digits, '_' or '-' (no dots)"
        )
    return raw
