"""The one log format of every twostep command and script, and how loud each logger is."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """twostep's INFO lines and everyone's warnings by default; ``verbose``: the libraries' INFO lines
    (accelerate's checkpoint messages, Ray's, which also makes the generation job forward its workers'
    output) and twostep's DEBUG lines; ``quiet``: warnings and errors only."""
    root_level = logging.INFO if verbose else logging.WARNING
    own_level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=root_level, format=LOG_FORMAT, datefmt=DATE_FORMAT)
    logging.getLogger().setLevel(root_level)  # basicConfig leaves the level alone when handlers exist
    logging.getLogger("twostep").setLevel(own_level)
