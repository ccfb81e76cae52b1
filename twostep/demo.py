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
from dataclasses import dataclass
from pathlib import Path

from twostep.common.config_flags import add_dataclass_flags, at_least, config_from_args

log = logging.getLogger("twostep.demo")


@dataclass
class DemoConfig:
    """The demo's sizes; each field is a flag of ``twostep demo``."""

    out: str = "out/demo"
    """Folder for every output."""
    prompts: int = 1024
    """Toy prompts to generate and train on."""
    steps: int = 250
    """Training steps of the toy config."""
    eval_samples: int = 200
    """Eval prompts."""
    num_workers: int = 2
    """Generation workers on the local Ray cluster."""
    teacher: str = "toy"
    """Teacher: toy (the shipped toy teacher), or a pipeline folder or hub id of any supported family
    (docs/families.md)."""
    seed: int = 0
    """Seed of the prompts and the training run."""

    def __post_init__(self) -> None:
        at_least(self, 1, "prompts", "steps", "eval_samples", "num_workers")


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="toy prompts → teacher generation → training → eval, in one command",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(p, DemoConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_demo(config_from_args(DemoConfig, args))


def run_demo(cfg: DemoConfig) -> int:
    """Every stage of the demo, each resuming where a previous run stopped; prints the summary."""
    from twostep.pipeline.job import GenerateConfig, run_generation
    from twostep.teacher.core import Teacher
    from twostep.toy.world import build_toy_manifest
    from twostep.trainer.config import load_config
    from twostep.trainer.loop import train

    from .eval import ROWS, evaluate, summary_line, write_report

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    t0 = time.perf_counter()
    manifest = out / "train.parquet"
    if not manifest.exists():
        build_toy_manifest(cfg.prompts, manifest, seed=cfg.seed)
    log.info("[1/4] %d toy prompts: %s", cfg.prompts, manifest)
    times["prompts"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    store = out / "store"
    shard = max(1, min(256, cfg.prompts // (2 * cfg.num_workers)))  # ≥ 2 shards per worker
    index = run_generation(GenerateConfig(manifest=str(manifest), out=str(store), teacher=cfg.teacher,
                                          shard_size=shard, num_workers=cfg.num_workers))
    log.info("[2/4] teacher samples (8 steps): %s (%d samples)", store, index["samples"])
    times["generation"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    run_dir = out / "run"
    log_every = min(10, max(1, cfg.steps))
    heldout_every = log_every * max(1, cfg.steps // (5 * log_every))  # five held-out checks
    train_cfg = load_config("toy", [f"data.data={store}", f"model.teacher={cfg.teacher}",
                                    f"max_steps={cfg.steps}",
                                    f"seed={cfg.seed}", f"checkpoint_every={max(1, cfg.steps // 4)}",
                                    f"sample_every={max(1, cfg.steps // 2)}", f"log_every={log_every}",
                                    f"heldout_every={heldout_every}",
                                    # the toy config's hooked layers are the toy teacher's; other teachers
                                    # get 3 evenly spaced blocks of their own
                                    *([] if cfg.teacher == "toy" else ["model.disc_layers=[]"])])
    train(train_cfg, run_dir)
    log.info("[3/4] student: %s (TensorBoard logs and sample grids in %s)", run_dir / "student", run_dir)
    times["training"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    teacher = Teacher.load(cfg.teacher)
    # the teacher's sets are cached beside the report: a second run samples only the student
    metrics, images = evaluate(teacher=teacher, student=str(run_dir / "student"), num_samples=cfg.eval_samples,
                               cache=str(out / "eval" / "cache"))
    report = write_report(metrics, images, out / "eval")
    times["eval"] = time.perf_counter() - t0
    metrics["demo_seconds"] = {k: round(v, 1) for k, v in times.items()}
    (out / "eval" / "metrics.json").write_text(json.dumps(metrics, indent=1))
    log.info("[4/4] eval report: %s", report)

    total = sum(times.values())
    print(f"\ntwostep demo: done in {total / 60:.1f} min "
          f"({', '.join(f'{k} {v / 60:.1f}' for k, v in times.items())} min)")
    for name, label in ROWS:
        m = metrics[name]
        print(f"  {label:24s} all named attributes right {m['accuracy']['all']:.3f}   FD to reference "
              f"{m['fd_to_reference']:7.2f}   recall {m['recall']:.3f}   {m['images_per_s']:6.2f} images/s")
    print(f"  {summary_line(metrics)}")
    print(f"outputs: manifest {manifest}; store {store}; run {run_dir}; student {run_dir / 'student'}; "
          f"report {report}")
    return 0
