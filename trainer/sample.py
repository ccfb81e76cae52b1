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
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``sample`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "sample",
        help="generate images with an exported 2-step student",
        description="Generate images with an exported 2-step student (a folder written by "
                    "twostep.trainer.export.export_student, either layout): 2 transformer calls per image, "
                    "no guidance. Image i uses seed SEED+i on its own CPU generator, so it does not depend "
                    "on the batch size or the device.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--student", required=True, metavar="DIR",
                   help="exported student folder (contains model_index.json and twostep_student.json)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                   help="a prompt; repeat the flag for several (they come before --prompts-file's)")
    p.add_argument("--prompts-file", metavar="PATH",
                   help="text file with one prompt per line (UTF-8; blank lines are skipped)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the first image; image i uses SEED+i")
    p.add_argument("--height", type=int, default=None,
                   help="image height in pixels (a multiple of 2x the VAE factor, 16 for Z-Image); "
                        "default: the VAE config's sample_size, else 1024")
    p.add_argument("--width", type=int, default=None,
                   help="image width in pixels; default as --height")
    p.add_argument("-o", "--out", default="samples", metavar="PATH",
                   help="a .png file (one prompt only) or a folder, which gets NNNN-seedS.png per image "
                        "and samples.jsonl (file, prompt, seed, height, width)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="images per pipeline call (affects speed and memory only, not the images)")
    p.add_argument("--device", default=None,
                   help="torch device, e.g. cuda, cuda:1, cpu; default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights dtype; default: bf16 on CUDA, fp32 on CPU")
    p.set_defaults(func=main)
    return p


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8-sig") as f:
                prompts += [line.rstrip("\r\n") for line in f if line.strip()]
        except FileNotFoundError:
            raise FileNotFoundError(f"--prompts-file {args.prompts_file}: no such file") from None
        except IsADirectoryError:
            raise IsADirectoryError(f"--prompts-file {args.prompts_file}: a folder, not a text file") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompts-file {args.prompts_file}: not UTF-8 text ({e.reason} at byte "
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
    from .export import load_student

    # Bad input raises OSError or ValueError naming the flag; twostep.cli prints it as one line.
    _check_student(args.student)
    prompts = _read_prompts(args)
    if not prompts:
        raise ValueError("no prompts: give --prompt or --prompts-file (an empty file has none)")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    out = Path(args.out)
    single_file = out.suffix.lower() == ".png"
    if single_file and len(prompts) != 1:
        raise ValueError(f"--out {out} is a .png file but there are {len(prompts)} prompts; give a folder")
    if not single_file and out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out}: a file, not a folder (a single image needs a .png name)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    pipe = load_student(args.student, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    height = args.height or pipe.default_size
    width = args.width or pipe.default_size
    multiple = pipe.vae_scale_factor * 2
    if height % multiple or width % multiple:
        raise ValueError(f"--height and --width must be multiples of {multiple}, got {height}×{width}")
    log.info("sampling %d image(s) of %d×%d from %s on %s (%s), σ = %s", len(prompts), height, width,
             args.student, device, str(dtype).removeprefix("torch."), pipe.sigmas)

    if not single_file:
        out.mkdir(parents=True, exist_ok=True)
    elif out.parent != Path():
        out.parent.mkdir(parents=True, exist_ok=True)
    records = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        seeds = [args.seed + start + j for j in range(len(batch))]
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        images = pipe(prompt=batch, height=height, width=width, generator=gens, output_type="pil").images
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
