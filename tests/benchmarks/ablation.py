"""The paper's ablation in miniature, on the toy world (README, "Ablation").

Variants, each trained from the same store with the same settings and seeds, then scored with
``twostep eval`` on the same prompts:

* ``full``: the toy config (teacher samples as the GAN's real data, decoupled steps, end to end,
  step-1 loss);
* ``real_renders``: ground-truth renders (a WebDataset of toy images with captions) as real data;
* ``shared``: one parameter set for both steps;
* ``detached``: the step-1 state detached (no end-to-end gradient);
* ``no_step1``: no explicit step-1 loss.

Reported per variant: mean and spread (min–max over seeds) of gap closed, FD to the teacher's
8 steps and all-correct rate; the table goes to ``OUT/ablation.md`` and ``OUT/ablation.json``,
one grid per variant beside it. Finished runs are skipped, so the command resumes.

    python tests/benchmarks/ablation.py --store runs/toy/store [--steps 150] [--seeds 0 1] [--eval-samples 200]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
from pathlib import Path

VARIANTS: dict[str, list[str]] = {
    "full": [],
    "real_renders": ["loss.real_source=external"],
    "shared": ["model.decoupled=false"],
    "detached": ["loss.e2e=false"],
    "no_step1": ["loss.step1_loss=none"],
}


def run_one(variant: str, seed: int, store: str, renders: str, steps: int, n_eval: int, out: Path,
            reeval: bool = False) -> dict:
    from twostep.eval import evaluate, write_report
    from twostep.pipeline.teacher import Teacher
    from twostep.trainer.config import load_config
    from twostep.trainer.loop import train

    run = out / f"{variant}-seed{seed}"
    done = run / "eval" / "metrics.json"
    if done.exists() and not (reeval and "recall" not in json.loads(done.read_text())["student2"]):
        return json.loads(done.read_text())
    cfg = load_config("toy", [f"data.data={store}", f"data.external={renders}", f"max_steps={steps}", f"seed={seed}",
                              f"checkpoint_every={max(1, steps // 3)}", "sample_every=0", *VARIANTS[variant]])
    if not (run / "result.json").exists():  # trained and exported already: only score it
        train(cfg, run)
    metrics, images = evaluate(str(run / "student"), Teacher.load("toy"), n_eval)
    write_report(metrics, images, run / "eval")
    return metrics


def summarise(results: dict[str, list[dict]]) -> dict:
    def spread(xs):
        return {"mean": round(statistics.mean(xs), 4), "min": round(min(xs), 4), "max": round(max(xs), 4)}

    def row(ms):
        r = {"gap_closed": spread([m["gap_closed"] for m in ms]),
             "fd_to_teacher8": spread([m["student2"]["fd_to_teacher8"] for m in ms]),
             "all_correct": spread([m["student2"]["accuracy"]["all"] for m in ms]),
             "naive2_fd_to_teacher8": spread([m["naive2"]["fd_to_teacher8"] for m in ms]),
             "seeds": len(ms)}
        if all("recall" in m["student2"] for m in ms):  # metrics of the current twostep eval
            r["recall"] = spread([m["student2"]["recall"] for m in ms])
            r["omitted_tv"] = spread([m["student2"]["omitted_tv"]["mean"] for m in ms])
        return r

    return {v: row(ms) for v, ms in results.items()}


def table(summary: dict) -> str:
    def fmt(d, p=3):
        return f"{d['mean']:.{p}f} ({d['min']:.{p}f}–{d['max']:.{p}f})"

    extra = all("recall" in s for s in summary.values())
    lines = ["| variant | gap closed | FD to teacher-8 | all named right | "
             + ("recall | omitted-attribute TV | " if extra else "") + "seeds |",
             "|---|---|---|---|" + ("---|---|" if extra else "") + "---|"]
    for v, s in summary.items():
        more = f"{fmt(s['recall'])} | {fmt(s['omitted_tv'])} | " if extra else ""
        lines.append(f"| {v} | {fmt(s['gap_closed'])} | {fmt(s['fd_to_teacher8'], 1)} | {fmt(s['all_correct'])} "
                     f"| {more}{s['seeds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="a toy teacher store (twostep generate)")
    ap.add_argument("--out", default="runs/ablation", help="runs and the table (default: runs/ablation)")
    ap.add_argument("--steps", type=int, default=150, help="training steps per run (default: 150)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds per variant (default: 0 1)")
    ap.add_argument("--eval-samples", type=int, default=200, help="eval prompts per run (default: 200)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--reeval", action="store_true",
                    help="re-score finished runs whose metrics predate recall and omitted-attribute TV")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    from twostep.pipeline.toy.render import write_render_shards

    renders = str(out / "renders" / "renders-*.tar")
    if not (out / "renders").exists():
        write_render_shards(out / "renders", n=2048, seed=7)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:  # seed-major: a partial run still covers every variant once
        for v in args.variants:
            results.setdefault(v, []).append(run_one(v, seed, args.store, renders, args.steps, args.eval_samples, out,
                                                   args.reeval))
            shutil.copy(out / f"{v}-seed{seed}" / "eval" / "grid.png", out / f"grid-{v}.png")
            summary = summarise(results)
            (out / "ablation.json").write_text(json.dumps({"args": vars(args), "summary": summary}, indent=1))
            (out / "ablation.md").write_text(table(summary) + "\n")
    print(table(summarise(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
