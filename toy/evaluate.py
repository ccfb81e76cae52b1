"""Measure the toy teacher against the quality bar (docs/toy_world.md, "Quality").

    python -m twostep.toy.evaluate [--teacher toy] [-n 500] [--out docs/results/toy_teacher]

On ``n`` toy eval prompts (fixed seed, disjoint from training's), the teacher samples at 8 steps
and naively at 2 steps from the same noise. Reported: the checker's accuracy on the attributes each
caption names (all-correct rate included), and the Fréchet distance in the checker's feature space
from each sample set to ``n`` ground-truth renders of random scenes. Writes ``metrics.json`` and
``grid.png`` (row pairs: 8 steps above, naive 2 steps below, same prompt and seed).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from twostep.common.images import grid
from twostep.common.logs import configure_logging
from twostep.eval.metrics import frechet_distance
from twostep.prompts.evalset import eval_prompts
from twostep.teacher.core import Teacher
from twostep.toy.world import sample_scene

from .checker import load_checker
from .render import render_batch

log = logging.getLogger("twostep.toy.evaluate")


def sample_set(teacher: Teacher, prompts: list[str], seeds: list[int], size: int, batch: int, desc: str) -> np.ndarray:
    out = []
    for i in tqdm(range(0, len(prompts), batch), desc=desc):
        out.append(teacher.generate(prompts[i:i + batch], seeds[i:i + batch], size, size).images)
    return np.concatenate(out)


def evaluate_teacher(teacher: Teacher, n: int = 500, seed: int = 20261122, batch: int = 100,
                     size: int = 64, manifest: str | None = None) -> tuple[dict, np.ndarray, np.ndarray, list[dict]]:
    ep = eval_prompts(manifest, n, seed, (size, size))
    if ep.named is None:
        raise ValueError(f"{manifest}: not a toy manifest (twostep prompts toy): no attribute columns to score")
    prompts, seeds, named, n = ep.prompts, ep.seeds, ep.named, len(ep.prompts)
    rows = [{"prompt": p, **d} for p, d in zip(prompts, named)]
    checker = load_checker()
    t0 = time.perf_counter()
    img8 = sample_set(teacher, prompts, seeds, size, batch, "teacher 8 steps")
    t8 = time.perf_counter() - t0
    two = teacher.with_sampler(num_steps=2)
    t0 = time.perf_counter()
    img2 = sample_set(two, prompts, seeds, size, batch, "teacher naive 2 steps")
    t2 = time.perf_counter() - t0
    rng = np.random.default_rng(seed + 1)
    truth = render_batch([sample_scene(rng) for _ in range(n)], size)
    f_truth, f8, f2 = (checker.features(x) for x in (truth, img8, img2))
    fd8, fd2 = frechet_distance(f8, f_truth), frechet_distance(f2, f_truth)
    rng = np.random.default_rng(seed + 2)
    truth2 = render_batch([sample_scene(rng) for _ in range(n)], size)
    metrics = {
        "n": n, "seed": seed, "manifest": manifest, "teacher": teacher.name, "sampler_hash": teacher.sampler.hash,
        "steps8": {"accuracy": checker.score(img8, named), "fd_to_renders": round(fd8, 3),
                   "seconds": round(t8, 1)},
        "naive2": {"accuracy": checker.score(img2, named), "fd_to_renders": round(fd2, 3),
                   "seconds": round(t2, 1)},
        "fd_ratio_naive2_over_8": round(fd2 / fd8, 2) if fd8 > 0 else None,
        "fd_renders_vs_renders": round(frechet_distance(checker.features(truth2), f_truth), 3),
        "device": teacher.device.type,
    }
    return metrics, img8, img2, rows


def add_teacher_args(ap: argparse.ArgumentParser, n: int, what: str, seed: int, out: str) -> None:
    """The flags the toy-teacher measurement commands share."""
    ap.add_argument("--teacher", default="toy", help="teacher: toy or a pipeline folder (default: toy)")
    ap.add_argument("-n", "--num-samples", type=int, default=n, help=f"{what} (default: {n})")
    ap.add_argument("--seed", type=int, default=seed, help=f"seed of the {what}, captions and noise (default: {seed})")
    ap.add_argument("--batch-size", type=int, default=100, help="samples per teacher call (default: 100)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--out", default=out, help=f"output folder (default: {out})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_teacher_args(ap, n=500, what="eval prompts", seed=20261122, out="docs/results/toy_teacher")
    ap.add_argument("--manifest", default=None,
                    help="take prompts, named attributes and seeds from the first N rows of a toy manifest "
                         "(twostep prompts toy) instead of sampling them")
    ap.add_argument("--record", action="store_true",
                    help="also write the metrics as final_metrics into the teacher folder's training_record.json "
                         "(what the shipped teacher's record holds)")
    args = ap.parse_args(argv)
    configure_logging()
    teacher = Teacher.load(args.teacher, device=args.device)
    metrics, img8, img2, _ = evaluate_teacher(teacher, args.num_samples, args.seed, args.batch_size,
                                              manifest=args.manifest)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if args.record:
        from twostep.teacher.core import TOY_TEACHER_DIR

        path = (TOY_TEACHER_DIR if args.teacher == "toy" else Path(args.teacher)) / "training_record.json"
        record = json.loads(path.read_text())
        record["final_metrics"] = metrics
        path.write_text(json.dumps(record, indent=1))
        log.info("final_metrics written to %s", path)
    k = 12
    grid([img8[:k], img2[:k], img8[k:2 * k], img2[k:2 * k]]).save(out / "grid.png")
    a8, a2 = metrics["steps8"]["accuracy"], metrics["naive2"]["accuracy"]
    print(f"8 steps:       all named attributes right {a8['all']:.3f}  FD to renders {metrics['steps8']['fd_to_renders']}")
    print(f"naive 2 steps: all named attributes right {a2['all']:.3f}  FD to renders {metrics['naive2']['fd_to_renders']}")
    print(f"FD ratio (2 / 8): {metrics['fd_ratio_naive2_over_8']}; wrote {out / 'metrics.json'} and {out / 'grid.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
