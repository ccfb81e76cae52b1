"""``twostep demo``: the whole method on the embedded default, one command, a 2-core CPU, ≤ 20 minutes.

    toy manifest → generation job (local Ray, 2 workers) → trainer (toy config) → eval report

Time of the default preset on a 2-core machine (measured, docs/results/alignment.md): generation of
1,024 samples ≈ 0.5 min, training 250 steps of 16 ≈ 3.3 min, eval on 200 prompts ≈ 0.3 min, start-ups
included. Each stage resumes: running the command again skips finished work (the store's
committed shards, the trainer's checkpoints).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

log = logging.getLogger("twostep.demo")


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="toy prompts → teacher generation → training → eval, in one command",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/demo", help="folder for every output (default: out/demo)")
    p.add_argument("--prompts", type=int, default=1024, help="toy prompts to generate and train on (default: 1024)")
    p.add_argument("--steps", type=int, default=250, help="training steps of the toy config (default: 250)")
    p.add_argument("--eval-samples", type=int, default=200, help="eval prompts (default: 200)")
    p.add_argument("--num-workers", type=int, default=2, help="generation workers on the local Ray cluster (default: 2)")
    p.add_argument("--teacher", default="toy", help="teacher (default: the shipped toy teacher)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and the training run (default: 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from twostep.pipeline.job import GenerateConfig, run_generation
    from twostep.teacher.core import Teacher
    from twostep.toy.world import build_toy_manifest
    from twostep.trainer.config import load_config
    from twostep.trainer.loop import train

    from .eval import evaluate, summary_line, write_report

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    manifest = out / "train.parquet"
    if not manifest.exists():
        build_toy_manifest(args.prompts, manifest, seed=args.seed)
    log.info("[1/4] %d toy prompts: %s", args.prompts, manifest)
    times["prompts"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    store = out / "store"
    shard = max(1, min(256, args.prompts // (2 * args.num_workers)))  # ≥ 2 shards per worker
    index = run_generation(GenerateConfig(manifest=str(manifest), out=str(store), teacher=args.teacher,
                                          shard_size=shard, num_workers=args.num_workers))
    log.info("[2/4] teacher samples (8 steps): %s (%d samples)", store, index["samples"])
    times["generation"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    run_dir = out / "run"
    log_every = min(10, max(1, args.steps))
    heldout_every = log_every * max(1, args.steps // (5 * log_every))  # five held-out checks
    cfg = load_config("toy", [f"data.data={store}", f"model.teacher={args.teacher}", f"max_steps={args.steps}",
                              f"seed={args.seed}", f"checkpoint_every={max(1, args.steps // 4)}",
                              f"sample_every={max(1, args.steps // 2)}", f"log_every={log_every}",
                              f"heldout_every={heldout_every}"])
    train(cfg, run_dir)
    log.info("[3/4] student: %s (TensorBoard logs and sample grids in %s)", run_dir / "student", run_dir)
    times["training"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    teacher = Teacher.load(args.teacher)
    metrics, images = evaluate(str(run_dir / "student"), teacher, args.eval_samples)
    report = write_report(metrics, images, out / "eval")
    times["eval"] = time.perf_counter() - t0
    metrics["demo_seconds"] = {k: round(v, 1) for k, v in times.items()}
    (out / "eval" / "metrics.json").write_text(json.dumps(metrics, indent=1))
    log.info("[4/4] eval report: %s", report)

    total = sum(times.values())
    print(f"\ntwostep demo: done in {total / 60:.1f} min "
          f"({', '.join(f'{k} {v / 60:.1f}' for k, v in times.items())} min)")
    for name, label in (("teacher8", "teacher, 8 steps"), ("student2", "student, 2 steps"),
                        ("naive2", "teacher, naive 2 steps")):
        m = metrics[name]
        print(f"  {label:24s} all named attributes right {m['accuracy']['all']:.3f}   FD to reference "
              f"{m['fd_to_reference']:7.2f}   recall {m['recall']:.3f}   {m['images_per_s']:6.2f} images/s")
    print(f"  {summary_line(metrics)}")
    print(f"outputs: manifest {manifest}; store {store}; run {run_dir}; student {run_dir / 'student'}; "
          f"report {report}")
    return 0
