"""Errors a command shows as one line (bad input) rather than as a traceback (a bug)."""

from __future__ import annotations


def reworded(e: Exception, message: str) -> Exception:
    """A new error of ``e``'s broad kind (FileNotFoundError, NotADirectoryError, another OSError, or
    ValueError) with ``message``: for a command that puts the flag's name in front of a library's
    message (library error classes may not take a plain message)."""
    for kind in (FileNotFoundError, NotADirectoryError, IsADirectoryError, OSError):
        if isinstance(e, kind):
            return kind(message)
    return ValueError(message)
