"""Tiny random-weight pipeline folders of every supported family, built locally from diffusers' and
transformers' own classes (nothing is downloaded).

They exercise every code path (generate, train, export, eval, sample) on a CPU in seconds; their
images are noise, since the weights are random. The toy world's words get one token each, so toy
prompts stay short::

    python -m twostep.teacher.random_pipelines --family wan --out tiny-wan
    twostep generate --teacher tiny-wan --manifest toy.parquet --out store
"""

from __future__ import annotations

import argparse
import importlib
import logging
from typing import Any

from .families import FAMILIES

BUILDERS = {"z-image": "random_zimage", "lumina2": "random_lumina2", "flux2-klein": "random_flux2",
            "wan": "random_wan"}
"""Family name → the module (in this package) whose ``build_pipeline`` makes its tiny pipeline."""

log = logging.getLogger(__name__)


def build_pipeline(family: str, *, words: tuple[str, ...] | None = None, seed: int = 0, **sizes: Any) -> Any:
    """A tiny random ``family`` pipeline (not saved). ``words`` get one token each; default: the toy
    world's vocabulary."""
    if family not in BUILDERS:
        raise ValueError(f"family {family!r}: expected one of {', '.join(BUILDERS)}")
    if words is None:
        from twostep.toy.world import TOY_WORDS

        words = tuple(TOY_WORDS)
    module = importlib.import_module(f"{__package__}.{BUILDERS[family]}")
    return module.build_pipeline(words=words, seed=seed, **sizes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write a tiny random-weight pipeline folder of one family "
                                             "(for trying twostep on a CPU; its images are noise).")
    ap.add_argument("--family", required=True, choices=list(FAMILIES), help="the pipeline family")
    ap.add_argument("--out", required=True, help="the folder to write (a diffusers pipeline folder)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pipe = build_pipeline(args.family, seed=args.seed)
    pipe.save_pretrained(args.out)
    log.info("wrote a tiny random %s pipeline (%s) to %s", args.family, type(pipe).__name__, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
