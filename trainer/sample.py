"""``twostep sample``: images from an exported 2-step student (either export layout).

Image ``i`` uses seed ``--seed + i`` on its own CPU generator, so an image depends on its prompt, seed
and size only, never on the batch it ran in or the device (the noise equals the shard store's
``seed_noise(seed)``, so a student image and the teacher's stored sample for the same seed start
from the same noise).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from twostep.common.config_flags import FieldError, add_dataclass_flags, at_least, config_from_args

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class SampleConfig:
    """What ``twostep sample`` draws; each field is a flag."""

    student: str = field(metadata={"metavar": "DIR"})
    """Exported student folder (contains model_index.json and twostep_student.json)."""
    prompt: list[str] = field(default_factory=list, metadata={"metavar": "TEXT"})
    """A prompt; repeat the flag for several (they come before --prompts-file's)."""
    prompts_file: str | None = field(default=None, metadata={"metavar": "PATH"})
    """Text file with one prompt per line (UTF-8; blank lines are skipped)."""
    seed: int = 0
    """Seed of the first image; image i uses SEED+i."""
    height: int | None = None
    """Image height in pixels (a multiple of 2x the VAE factor, 16 for Z-Image); default: the VAE
    config's sample_size, else 1024."""
    width: int | None = None
    """Image width in pixels; default as --height."""
    out: str = field(default="samples", metadata={"metavar": "PATH"})
    """A .png file (one prompt only) or a folder, which gets NNNN-seedS.png per image and samples.jsonl
    (file, prompt, seed, height, width)."""
    batch_size: int = 4
    """Images per pipeline call (affects speed and memory only, not the images)."""
    device: str | None = None
    """Torch device, e.g. cuda, cuda:1, cpu; default: cuda if available, else cpu."""
    dtype: str | None = field(default=None, metadata={"choices": tuple(sorted(DTYPES))})
    """Weights dtype; default: bf16 on CUDA, fp32 on CPU."""

    def __post_init__(self) -> None:
        at_least(self, 1, "batch_size")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise FieldError("dtype", f"must be one of {', '.join(sorted(DTYPES))}, not {self.dtype!r}")


FLAGS = {"out": ("-o", "--out")}
"""Flags that are not ``--field-name``."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``sample`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "sample",
        help="generate images with an exported 2-step student",
        description="Generate images with an exported 2-step student (a folder written by "
                    "twostep.trainer.export.export_student, either layout): 2 transformer calls per image, "
                    "no guidance. Image i uses seed SEED+i on its own CPU generator, so it does not depend "
                    "on the batch size or the device.",
    )
    add_dataclass_flags(p, SampleConfig, flags=FLAGS)
    p.set_defaults(func=main)
    return p


def _read_prompts(cfg: SampleConfig) -> list[str]:
    prompts = list(cfg.prompt or [])
    if cfg.prompts_file:
        try:
            with open(cfg.prompts_file, encoding="utf-8-sig") as f:
                prompts += [line.rstrip("\r\n") for line in f if line.strip()]
        except FileNotFoundError:
            raise FileNotFoundError(f"--prompts-file {cfg.prompts_file}: no such file") from None
        except IsADirectoryError:
            raise IsADirectoryError(f"--prompts-file {cfg.prompts_file}: a folder, not a text file") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompts-file {cfg.prompts_file}: not UTF-8 text ({e.reason} at byte "
                             f"{e.start})") from None
    return prompts


def _check_student(path: str) -> None:
    """An exported student folder, or an error naming ``--student`` (before any weights load)."""
    if not os.path.isdir(path):
        raise (NotADirectoryError(f"--student {path}: a file, not an exported student folder")
               if os.path.exists(path) else FileNotFoundError(f"--student {path}: no such folder"))
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"--student {path}: not an exported student (no model_index.json); "
                                "twostep train writes one to RUN_DIR/student")


def main(args: argparse.Namespace) -> int:
    """Flags → ``SampleConfig`` → the images. Bad input raises OSError or ValueError naming the flag;
    ``twostep.cli`` prints it as one line."""
    return sample(config_from_args(SampleConfig, args, FLAGS))


def sample(cfg: SampleConfig) -> int:
    """Draw ``cfg``'s images and write them (and samples.jsonl for a folder)."""
    from PIL import Image

    from .export import open_student

    _check_student(cfg.student)
    prompts = _read_prompts(cfg)
    if not prompts:
        raise ValueError("no prompts: give --prompt or --prompts-file (an empty file has none)")
    out = Path(cfg.out)
    single_file = out.suffix.lower() == ".png"
    if single_file and len(prompts) != 1:
        raise ValueError(f"--out {out} is a .png file but there are {len(prompts)} prompts; give a folder")
    if not single_file and out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: a file, not a folder (a single image needs a .png name)")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[cfg.dtype] if cfg.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    student = open_student(cfg.student, device=device, dtype=dtype)
    height = cfg.height or student.default_size
    width = cfg.width or student.default_size
    multiple = student.family.size_multiple
    if height % multiple or width % multiple:
        raise ValueError(f"--height and --width must be multiples of {multiple}, got {height}×{width}")
    log.info("sampling %d image(s) of %d×%d from the %s student %s on %s (%s), σ = %s", len(prompts), height,
             width, student.family.name, cfg.student, device, str(dtype).removeprefix("torch."), student.sigmas)

    if not single_file:
        out.mkdir(parents=True, exist_ok=True)
    elif out.parent != Path():
        out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start:start + cfg.batch_size]
        seeds = [cfg.seed + start + j for j in range(len(batch))]
        images = [Image.fromarray(a) for a in student.images(batch, seeds, height, width)]
        for j, (prompt, seed, image) in enumerate(zip(batch, seeds, images)):
            path = out if single_file else out / f"{start + j:04d}-seed{seed}.png"
            image.save(path)
            records.append({"file": path.name, "prompt": prompt, "seed": seed, "height": height, "width": width})
    if single_file:
        log.info("wrote %s", out)
    else:
        with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        log.info("wrote %d image(s) and samples.jsonl to %s", len(records), os.path.abspath(out))
    return 0
