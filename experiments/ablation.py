"""The paper's ablation in miniature, on the toy world (docs/results/ablation.md).

Variants, each trained from the same store with the same settings and seeds, then scored unpaired on
the same prompts (docs/evaluation.md):

* ``full``: the toy config (teacher samples as the GAN's real data, decoupled steps, end to end,
  step-1 loss, plus the paired regression);
* ``regress_only``: the paired and step-1 regressions, no adversarial term;
* ``adv_only``: the adversarial terms alone (``toy_gan_only``);
* ``real_renders``: ground-truth renders (a WebDataset of toy images with captions) as real data;
* ``shared``: one parameter set for both steps, at equal trainable parameters when the students are
  LoRA adapters (``--lora-rank R``: decoupled rank R per step against shared rank 2R);
* ``detached``: the step-1 state detached (no end-to-end gradient);
* ``no_step1``: no explicit step-1 loss.

``--lora-rank R`` runs every variant as per-step LoRA adapters of rank R (a capacity-limited
student, where the regressions alone saturate less); 0 trains every weight. Reported per variant:
mean, sd and range over seeds of gap closed, FD to the 8-step reference, all named right, recall,
omitted-attribute TV and the paired FD; then, for gap closed, all named right, omitted-attribute TV
and FD, each variant minus ``full``, paired by seed, with its 95% t interval. The tables go to
``OUT/ablation.md``, the numbers to ``OUT/ablation.json``, one grid per variant beside them.
Finished runs are skipped, so the command resumes.

    python experiments/ablation.py --store out/demo/store --lora-rank 1 --lr-scale 10 [--steps 250] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from toyruns import reference_row, run_one, summarise, t_interval, table

from twostep.common.logs import configure_logging

# name: (config, overrides); "{r}" and "{r2}" are the LoRA rank and twice it
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "full": ("toy", []),
    "regress_only": ("toy", ["loss.adv_weight=0", "loss.step1_loss=regress"]),
    "adv_only": ("toy_gan_only", []),
    "real_renders": ("toy", ["loss.real_source=external"]),
    "shared": ("toy", ["model.decoupled=false", "model.lora_rank={r2}"]),
    "detached": ("toy", ["loss.e2e=false"]),
    "no_step1": ("toy", ["loss.step1_loss=none"]),
}


def overrides(variant: str, rank: int, renders: str, lr_scale: float = 1.0) -> tuple[str, list[str]]:
    config, extra = VARIANTS[variant]
    base = [f"model.lora_rank={rank}", f"data.external={renders}"]
    if lr_scale != 1.0:  # each config's own student learning rate, scaled
        from twostep.trainer.config import load_config

        base.append(f"optim.lr={load_config(config).optim.lr * lr_scale:g}")
    return config, base + [x.format(r=rank, r2=2 * rank) for x in extra]


# what removing each part tests, against ``full``
QUESTIONS = {
    "regress_only": "what the adversarial terms add to the regressions",
    "adv_only": "what the regressions add to the adversarial terms",
    "real_renders": "teacher samples vs ground-truth renders as the discriminator's real data (idea 1)",
    "shared": "decoupled per-step parameters vs one shared set of equal size (idea 2)",
    "detached": "end-to-end gradient through both steps vs detached steps (idea 3)",
    "no_step1": "the explicit step-1 loss",
}


METRICS = {  # name in the tables: how to read it from a run's eval metrics
    "gap_closed": lambda m: m["gap_closed"],
    "all_named_right": lambda m: m["student2"]["accuracy"]["all"],
    "omitted_tv": lambda m: m["student2"]["omitted_tv"]["mean"],
    "fd_to_reference": lambda m: m["student2"]["fd_to_reference"],
}


def differences(results: dict[str, list[dict]], key: str = "gap_closed") -> str:
    """Markdown: each variant's ``key`` minus ``full``'s, paired by seed (the same seed gives both
    runs the same data order, initial adapters and eval noise), with the 95% t interval of the mean
    difference; a difference whose interval excludes 0 is marked as exceeding the spread."""
    if "full" not in results:
        return ""
    get = METRICS[key]
    full = {m["run"]["seed"]: get(m) for m in results["full"]}
    lines = [f"| variant | question | Δ {key.replace('_', ' ')} vs full, paired by seed (95% CI) | seeds | "
             "exceeds the spread |", "|---|---|---|---|---|"]
    for v, ms in results.items():
        if v == "full":
            continue
        d = [get(m) - full[m["run"]["seed"]] for m in ms if m["run"]["seed"] in full]
        if not d:
            continue
        mean, hw = t_interval(d)
        verdict = "yes" if abs(mean) > hw else "no"
        lines.append(f"| {v} | {QUESTIONS.get(v, '')} | {mean:+.3f} ± {hw:.3f} | {len(d)} | {verdict} |")
    return "\n".join(lines)


def report(results: dict[str, list[dict]], summary: dict, refs: dict) -> str:
    """The ablation's Markdown: the per-variant table, then the paired differences of each metric."""
    return "\n\n".join([table(summary, refs)] + [differences(results, k) for k in METRICS])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="a toy teacher store (twostep generate, or twostep demo's)")
    ap.add_argument("--out", default="runs/ablation", help="runs and the table (default: runs/ablation)")
    ap.add_argument("--steps", type=int, default=250, help="training steps per run (default: 250)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds per variant (default: 0 1 2)")
    ap.add_argument("--eval-samples", type=int, default=1000, help="eval prompts per run (default: 1000)")
    ap.add_argument("--lora-rank", type=int, default=0,
                    help="per-step LoRA rank of every variant (shared: twice it); 0 = full weights (default: 0)")
    ap.add_argument("--lr-scale", type=float, default=1.0,
                    help="multiply every config's student learning rate (LoRA adapters usually want ~10x; default: 1)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    configure_logging(quiet=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    from twostep.toy.render import write_render_shards

    renders = str(out / "renders" / "renders-*.tar")
    if not (out / "renders").exists():
        write_render_shards(out / "renders", n=2048, seed=7)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:  # seed-major: a partial run still covers every variant once
        for v in args.variants:
            config, ov = overrides(v, args.lora_rank, renders, args.lr_scale)
            m = run_one(v, config, ov, seed, args.store, args.steps, args.eval_samples, out)
            results.setdefault(v, []).append(m)
            shutil.copy(out / f"{v}-seed{seed}" / "eval" / "grid.png", out / f"grid-{v}.png")
            summary = summarise(results)
            refs = reference_row(next(iter(results.values())))
            (out / "ablation.json").write_text(json.dumps({"args": vars(args), "summary": summary,
                                                           "reference": refs}, indent=1))
            (out / "ablation.md").write_text(report(results, summary, refs) + "\n")
            print(f"{v} seed {seed}: gap closed {m['gap_closed']}", flush=True)
    print(report(results, summarise(results), reference_row(next(iter(results.values())))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
