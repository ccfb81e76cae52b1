"""``twostep eval``: score a 2-step student against its 8-step teacher and the teacher's naive 2 steps
(docs/evaluation.md).

    config.py   EvalConfig: what to score and how (one field per flag)
    samples.py  the sample sets: samplers, timing, the cache of teacher-side sets
    metrics.py  the metric functions and feature models (FD, precision/recall, TV, CLIP, DINOv2)
    scores.py   evaluate(): samples the sets and scores them
    report.py   metrics.json, report.md, report.html, metrics.png, grid.png
    cli.py      the command line: flags → EvalConfig → evaluate → report
"""

from twostep.eval.cli import add_parser, run
from twostep.eval.config import EvalConfig
from twostep.eval.report import set_lines, summary_line, table, write_report
from twostep.eval.samples import (
    ROWS,
    Sampler,
    SampleSets,
    cached_run,
    exported_student_sampler,
    reference_seeds,
    resolve_student,
    run_timed,
    teacher_sampler,
)
from twostep.eval.scores import evaluate, gap_closed, omitted_tv, unpaired_scores

__all__ = ["ROWS", "EvalConfig", "SampleSets", "Sampler", "add_parser", "cached_run", "evaluate",
           "exported_student_sampler", "gap_closed", "omitted_tv", "reference_seeds", "resolve_student", "run",
           "run_timed", "set_lines", "summary_line", "table", "teacher_sampler", "unpaired_scores", "write_report"]
