"""Where does a toy teacher lose an attribute? Measured on ground-truth scenes.

    python -m twostep.toy.diagnose [--teacher toy] [-n 300] [--out runs/diagnose]

For ``n`` random scenes, each with a caption that names every attribute:

1. **VAE round trip**: the checker on ``decode(encode(render))``, the ceiling the latent space allows.
2. **Denoising from the truth**: the render's latent is noised to the teacher's ``i``-th noise level
   σ_i (fresh noise) and the teacher runs the rest of its own schedule from there. ``i = 0`` (σ = 1)
   is plain generation. An attribute that is right from σ_i but wrong from σ_{i-1} is decided by the
   model between those two levels; one that is wrong even from a small σ is lost by the denoiser
   itself.

Beside accuracy, ``shape_confidence`` is the checker's mean top shape probability: high on wrong
shapes means crisp but wrong shapes, low means blobs; ``shape_confusion`` counts, for the VAE round
trip and for plain generation, which shape the checker reads for each named one (a teacher that
ignores the shape word draws the same mix for every row). Writes ``diagnose.json`` and prints both.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from twostep.common.logs import configure_logging
from twostep.prompts.manifest import derive_seed
from twostep.teacher.core import Teacher
from twostep.toy.world import ATTRIBUTES, SHAPES, caption, sample_scene

from .checker import load_checker
from .evaluate import add_teacher_args
from .render import render_batch

log = logging.getLogger("twostep.toy.diagnose")


def _row(checker, images: np.ndarray, named: list[dict]) -> tuple[dict, list[dict]]:
    """The row's accuracies and shape confidence, and the checker's predictions (one checker pass)."""
    probs = checker.probs(images)
    pred = checker.names(probs)
    acc = checker.accuracy(pred, named)
    row = {a: round(acc[a], 4) for a in ATTRIBUTES}
    row["all"] = round(acc["all"], 4)
    row["shape_confidence"] = round(float(probs["shape"].max(1).mean()), 4)
    return row, pred


def shape_confusion(pred: list[dict], named: list[dict]) -> dict[str, dict[str, int]]:
    """``{named shape: {shape the checker reads: count}}`` from the checker's predictions."""
    return {s: {r: sum(1 for d, p in zip(named, pred) if d["shape"] == s and p["shape"] == r) for r in SHAPES}
            for s in SHAPES}


@torch.no_grad()
def diagnose(teacher: Teacher, n: int = 300, seed: int = 20261123, batch: int = 100, size: int = 64) -> dict:
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    truth = render_batch(scenes, size)
    prompts = [caption(sc, rng, omit_prob=0.0)[0] for sc in scenes]
    named = [{a: getattr(sc, a) for a in ATTRIBUTES} for sc in scenes]
    checker = load_checker()
    sig = teacher.sampler.sigmas
    shape = teacher.latent_shape(size, size)
    noise = teacher.make_noise([derive_seed(seed, f"diagnose-{i}") for i in range(n)], shape)
    z = torch.cat([teacher.encode_images(truth[i:i + batch]).cpu() for i in range(0, n, batch)])
    recon = np.concatenate([teacher.decode(z[i:i + batch]) for i in range(0, n, batch)])
    rows = {"renders": _row(checker, truth, named)[0]}
    rows["vae round trip"], pred = _row(checker, recon, named)
    confusion = {"vae round trip": shape_confusion(pred, named)}
    for start in tqdm(range(len(sig) - 1), desc="denoise from σ_i"):
        out = []
        for i in range(0, n, batch):
            caps = teacher.encode_prompts(prompts[i:i + batch])
            s0 = sig[start]
            x = ((1 - s0) * z[i:i + batch] + s0 * noise[i:i + batch]).to(teacher.device)
            for j in range(start, len(sig) - 1):
                x = x + (sig[j + 1] - sig[j]) * teacher.velocity(x, sig[j], caps)  # u = ε - x0
            out.append(teacher.decode(x))
        rows[f"from σ={sig[start]:.3f} ({len(sig) - 1 - start} steps)"], pred = _row(checker, np.concatenate(out),
                                                                                    named)
        if start == 0:
            confusion["plain generation"] = shape_confusion(pred, named)
    return {"teacher": teacher.name, "n": n, "seed": seed, "sigmas": [round(float(s), 4) for s in sig],
            "rows": rows, "shape_confusion": confusion}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_teacher_args(ap, n=300, what="ground-truth scenes", seed=20261123, out="runs/diagnose")
    args = ap.parse_args(argv)
    configure_logging()
    teacher = Teacher.load(args.teacher, device=args.device)
    result = diagnose(teacher, args.num_samples, args.seed, args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnose.json").write_text(json.dumps(result, indent=1))
    cols = [*ATTRIBUTES, "all", "shape_confidence"]
    print(f"{'':34s}" + "".join(f"{c[:10]:>11s}" for c in cols))
    for name, row in result["rows"].items():
        print(f"{name:34s}" + "".join(f"{row[c]:11.3f}" for c in cols))
    for name, table in result["shape_confusion"].items():
        print(f"\nshape named → read, {name}:" + "".join(f"{c:>10s}" for c in SHAPES))
        for named_shape, counts in table.items():
            print(f"{named_shape:>{len(name) + 23}s}" + "".join(f"{counts[c]:10d}" for c in SHAPES))
    print(f"wrote {out / 'diagnose.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
