"""Toy-world evaluation of a 2-step student against its 8-step teacher and the teacher's naive 2 steps.

    twostep eval --student RUN_DIR/student [--teacher toy] [-n 500] [--out DIR]

Same prompts and the same initial noise for all three (each sample's seed on a CPU generator, as
the store has it). Reported, on the attributes each caption names: the checker's accuracy and
all-correct rate; the Fréchet distance in the checker's feature space to ground-truth renders; the
floor (two teacher 8-step sets with different seeds); and the gap closed (GUIDE §4):
``1 − (FD(student) − floor) / (FD(naive 2) − floor)``, FDs taken to the teacher's 8-step set.
Writes ``metrics.json``, ``report.md``, ``metrics.png`` (a plot) and ``grid.png`` (rows: teacher
8 steps, student 2 steps, teacher naive 2 steps).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from twostep.pipeline.metrics import frechet_distance
from twostep.pipeline.teacher import Teacher
from twostep.pipeline.toy.checker import load_checker
from twostep.pipeline.toy.evaluate import grid, manifest_rows, sample_set
from twostep.pipeline.toy.render import render_batch
from twostep.prompts.manifest import derive_seed
from twostep.prompts.toy import ATTRIBUTES, sample_scene, sample_toy_prompts
from twostep.trainer.export import load_student

log = logging.getLogger("twostep.eval")


@torch.no_grad()
def student_images(student_dir: str, teacher: Teacher, prompts: list[str], seeds: list[int], size: int,
                   batch: int) -> tuple[np.ndarray, float]:
    """The student's 2-step images (uint8) from the same per-seed noise as the teacher's; and seconds."""
    pipe = load_student(student_dir, device=teacher.device, dtype=teacher.dtype)
    pipe.set_progress_bar_config(disable=True)
    out = []
    t0 = time.perf_counter()
    for i in tqdm(range(0, len(prompts), batch), desc="student 2 steps"):
        noise = teacher.make_noise(seeds[i:i + batch], teacher.latent_shape(size, size)).to(teacher.device)
        lat = pipe(prompt=prompts[i:i + batch], latents=noise, height=size, width=size, output_type="latent").images
        out.append(teacher.decode(lat))
    return np.concatenate(out), time.perf_counter() - t0


def gap_closed(fd_student: float, fd_naive: float, floor: float) -> float | None:
    """1 − (FD(student) − floor) / (FD(naive 2) − floor); 1 = as close as the teacher to itself."""
    return None if fd_naive <= floor else 1.0 - (fd_student - floor) / (fd_naive - floor)


def evaluate(student_dir: str, teacher: Teacher, n: int = 500, seed: int = 20261122, batch: int = 100,
             size: int = 64, manifest: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    if manifest:
        rows, seeds = manifest_rows(manifest, n)
    else:
        rows = list(sample_toy_prompts(n, seed))
        seeds = [derive_seed(seed, f"eval-{i}") for i in range(n)]
    n = len(rows)
    prompts = [r["prompt"] for r in rows]
    named = [{k: v for k, v in r.items() if k != "prompt"} for r in rows]
    checker = load_checker()
    images, seconds = {}, {}
    t0 = time.perf_counter()
    images["teacher8"] = sample_set(teacher, prompts, seeds, size, batch, "teacher 8 steps")
    seconds["teacher8"] = time.perf_counter() - t0
    images["student2"], seconds["student2"] = student_images(student_dir, teacher, prompts, seeds, size, batch)
    naive = Teacher(teacher.pipe, teacher.name, device=teacher.device, num_steps=2)
    t0 = time.perf_counter()
    images["naive2"] = sample_set(naive, prompts, seeds, size, batch, "teacher naive 2 steps")
    seconds["naive2"] = time.perf_counter() - t0
    other = [derive_seed(seed + 1, f"floor-{i}") for i in range(n)]
    floor_set = sample_set(teacher, prompts, other, size, batch, "teacher 8 steps, other seeds")
    rng = np.random.default_rng(seed + 1)  # the same render set as the teacher's own evaluation
    truth = render_batch([sample_scene(rng) for _ in range(n)], size)
    f_truth = checker.features(truth)
    feats = {k: checker.features(v) for k, v in images.items()}
    f_floor = checker.features(floor_set)
    floor = frechet_distance(f_floor, feats["teacher8"])
    metrics: dict = {"n": n, "seed": seed, "manifest": manifest, "teacher": teacher.name, "student": student_dir,
                     "fd_floor_teacher8_vs_teacher8": round(floor, 3)}
    for k in images:
        metrics[k] = {"accuracy": checker.score(images[k], named),
                      "fd_to_renders": round(frechet_distance(feats[k], f_truth), 3),
                      "fd_to_teacher8": round(frechet_distance(feats[k], feats["teacher8"]), 3) if k != "teacher8" else 0.0,
                      "seconds": round(seconds[k], 1)}
    metrics["gap_closed"] = gap_closed(metrics["student2"]["fd_to_teacher8"], metrics["naive2"]["fd_to_teacher8"], floor)
    return metrics, images


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a 2-step student against its 8-step teacher (toy world)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(p)
    p.set_defaults(func=run)


def _arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--student", required=True, help="an exported student folder (RUN_DIR/student)")
    ap.add_argument("--teacher", default="toy", help="its teacher: toy or a pipeline folder (default: toy)")
    ap.add_argument("-n", "--num-samples", type=int, default=500, help="eval prompts (default: 500)")
    ap.add_argument("--seed", type=int, default=20261122, help="seed of the eval prompts, noise and render set")
    ap.add_argument("--manifest", default=None, help="take prompts and seeds from the first N rows of a toy manifest")
    ap.add_argument("--batch-size", type=int, default=100, help="samples per call")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--out", default="out/eval", help="folder for metrics.json and grid.png (default: out/eval)")


ROWS = (("teacher8", "teacher, 8 steps"), ("student2", "student, 2 steps"), ("naive2", "teacher, naive 2 steps"))


def write_report(metrics: dict, images: dict[str, np.ndarray], out: Path) -> Path:
    """metrics.json, grid.png (rows as :data:`ROWS`), metrics.png (a bar plot) and report.md; returns the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    k = min(12, metrics["n"])
    grid([images[name][:k] for name, _ in ROWS]).save(out / "grid.png")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    labels = [label for _, label in ROWS]
    axes[0].bar(labels, [metrics[n]["accuracy"]["all"] for n, _ in ROWS], color=["#555", "#2a7", "#c84"])
    axes[0].set_title("all named attributes right")
    axes[1].bar(labels, [metrics[n]["fd_to_teacher8"] for n, _ in ROWS], color=["#555", "#2a7", "#c84"])
    axes[1].axhline(metrics["fd_floor_teacher8_vs_teacher8"], ls="--", c="k", lw=1, label="floor")
    axes[1].set_title("FD to teacher 8 steps (lower is closer)")
    axes[1].legend()
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=120)
    plt.close(fig)
    lines = [f"# twostep eval: {metrics['student']}", "",
             f"{metrics['n']} toy prompts (seed {metrics['seed']}), teacher `{metrics['teacher']}`; the same noise for "
             "all three rows. Accuracy over the attributes each caption names; FD in the toy checker's features.", "",
             "| | all named right | " + " | ".join(ATTRIBUTES) + " | FD to renders | FD to teacher-8 | s |",
             "|---|---|" + "---|" * len(ATTRIBUTES) + "---|---|---|"]
    for name, label in ROWS:
        m, a = metrics[name], metrics[name]["accuracy"]
        cells = " | ".join("—" if a[x] is None else f"{a[x]:.3f}" for x in ATTRIBUTES)
        lines.append(f"| {label} | {a['all']:.3f} | {cells} | {m['fd_to_renders']:.1f} | {m['fd_to_teacher8']:.1f} "
                     f"| {m['seconds']} |")
    gap = metrics["gap_closed"]
    lines += ["", f"Floor (teacher 8 steps vs itself, other seeds): {metrics['fd_floor_teacher8_vs_teacher8']:.2f}. "
              f"Gap closed: {'n/a' if gap is None else f'{gap:.3f}'}.", "",
              "![metrics](metrics.png)", "", "Rows: " + ", ".join(label for _, label in ROWS) + ".", "",
              "![grid](grid.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def run(args: argparse.Namespace) -> int:
    teacher = Teacher.load(args.teacher, device=args.device)
    metrics, images = evaluate(args.student, teacher, args.num_samples, args.seed, args.batch_size,
                               manifest=args.manifest)
    out = Path(args.out)
    report = write_report(metrics, images, out)
    for name, label in ROWS:
        m = metrics[name]
        print(f"{label:24s} all named attributes right {m['accuracy']['all']:.3f}  FD to renders "
              f"{m['fd_to_renders']:8.2f}  FD to teacher-8 {m['fd_to_teacher8']:8.2f}")
    print(f"floor (teacher-8 vs teacher-8, other seeds) {metrics['fd_floor_teacher8_vs_teacher8']:.2f}; "
          f"gap closed {metrics['gap_closed']}; wrote {report}, {out / 'metrics.json'}, {out / 'grid.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(ap)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
