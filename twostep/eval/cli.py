"""Score a 2-step student against its 8-step teacher and the teacher's naive 2 steps.

    twostep eval --student RUN_DIR/student [--teacher toy] [--prompts MANIFEST] [-n 500] [--out DIR]
    twostep eval --student RUN/student --teacher Tongyi-MAI/Z-Image-Turbo --prompts eval.parquet \\
        --clip-model hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K

Three sample sets from the same prompts and the same initial noise (each sample's seed on a CPU
generator, as the store has it): (a) the teacher at 8 steps, (b) the student at 2 steps, (c) the
teacher sampled naively at 2 steps; and an 8-step *reference* from other seeds. Every set is scored
unpaired, against the reference (docs/evaluation.md):
  - Fréchet distance (FD) in a feature space: the toy checker's features for the toy world, open_clip
    image features (``--clip-model``) or DINOv2 CLS features (``--dino-model``) otherwise; gap closed
    ``1 − (FD(student) − FD(teacher 8)) / (FD(naive 2) − FD(teacher 8))``, 1 = as close to the reference
    as the teacher itself; ``--references 2`` repeats it against a second reference (the spread is the
    figure's noise);
  - the paired FD to the same-noise 8-step set, a second column: how closely a set follows the
    teacher's own noise-to-image map (a regression student can beat the teacher here, so it is not
    a quality score);
  - precision and recall (k-NN manifolds, k=3) in the same features: recall falls when a student
    collapses onto fewer modes, which FD can miss;
  - per-prompt diversity: several seeds for each of a few prompts, mean pairwise distance in the
    features and in pixels;
  - toy world: the checker's accuracy on the attributes each caption names, and for every attribute
    a caption leaves out the total variation between the set's distribution of it and the
    reference's; FD to ground-truth renders;
  - CLIP score (open_clip, when ``--clip-model`` is given);
  - latency per batch call and images/s, same batch size and device for all three.
Writes ``metrics.json``, ``report.md``, ``report.html``, ``metrics.png`` (a plot) and ``grid.png``
(rows: teacher 8 steps, student 2 steps, teacher naive 2 steps) to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from twostep.common.config_flags import add_dataclass_flags, config_from_args, flag_errors
from twostep.eval.config import EvalConfig
from twostep.eval.report import set_lines, summary_line, write_report
from twostep.eval.scores import evaluate

FLAGS = {"prompts": ("--prompts", "--manifest"), "num_samples": ("-n", "--num-samples")}
"""Flags that are not ``--field-name``."""


def add_parser(sub) -> None:
    """Register ``twostep eval``: a flag for every ``EvalConfig`` field (``--student`` is required)."""
    p = sub.add_parser("eval", help="score a 2-step student against its 8-step teacher and naive 2 steps",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(p, EvalConfig, flags=FLAGS)["student"].required = True
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Flags → ``EvalConfig`` → :func:`evaluate` → the report in ``--out``. Bad input raises (an
    OSError or a ValueError naming the flag); ``twostep.cli.main`` prints it as one line."""
    cfg = config_from_args(EvalConfig, args, FLAGS)
    with flag_errors(FLAGS):
        metrics, images = evaluate(cfg)
    out = Path(cfg.out)
    report = write_report(metrics, images, out)
    for line in set_lines(metrics):
        print(line)
    print(summary_line(metrics))
    print(f"wrote {report}, {out / 'report.html'}, {out / 'metrics.json'}, {out / 'grid.png'}")
    return 0
