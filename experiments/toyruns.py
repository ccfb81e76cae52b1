"""Train-and-score runs on the toy world, shared by the ablation and the adversarial search.

A run trains one config (bundled name or path, plus ``key=value`` overrides) from a teacher store for
a number of steps with one seed, exports the student, and scores it with ``twostep eval`` on the same
prompts as every other run (unpaired: against an 8-step reference from other seeds; the teacher-side
sets are cached in ``OUT/eval-cache`` and made once). Finished runs are read back, not redone, so a
command that was stopped resumes by running it again. Each run's record adds the discriminator's
diagnostics, averaged over the run's last five logged steps.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

_TEACHER = {}


def _teacher():
    from twostep.teacher.core import Teacher

    if "toy" not in _TEACHER:
        _TEACHER["toy"] = Teacher.load("toy", device="cpu")
    return _TEACHER["toy"]


def diagnostics(run: Path, last: int = 5) -> dict:
    """Mean of the last ``last`` logged values of the discriminator's diagnostics and gradient shares."""
    from twostep.trainer.report import read_metrics

    rows = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").exists() else []
    keys = sorted({k for r in rows for k in r if k.startswith(("disc/", "grad_share/", "grad_norm/"))})
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if k in r][-last:]
        if vals:
            out[k] = round(statistics.mean(vals), 4)
    return out


def run_one(name: str, config: str, overrides: list[str], seed: int, store: str, steps: int | None, n_eval: int,
            out: Path, extra: list[str] = (), eval_seed: int = 20261122, references: int = 1) -> dict:
    """Train ``config`` + ``overrides`` for ``steps`` steps (None: the config's own length) with ``seed``
    and score it on ``n_eval`` prompts drawn with ``eval_seed``, against ``references`` 8-step references."""
    import time

    from twostep.eval import evaluate, write_report
    from twostep.trainer.config import load_config
    from twostep.trainer.loop import train

    run = out / f"{name}-seed{seed}"
    done = run / "eval" / "metrics.json"
    if done.exists():
        return json.loads(done.read_text())
    length = [f"max_steps={steps}"] if steps else []
    cfg = load_config(config, [f"data.data={store}", *length, f"seed={seed}", "sample_every=0", *extra, *overrides])
    cfg.checkpoint_every = max(1, cfg.max_steps // 2)
    train_seconds = None
    if not (run / "result.json").exists():  # trained and exported already: only score it
        t0 = time.perf_counter()
        train(cfg, run)
        train_seconds = round(time.perf_counter() - t0, 1)
    metrics, images = evaluate(teacher=_teacher(), student=str(run / "student"), num_samples=n_eval, seed=eval_seed,
                               references=references, cache=str(out / "eval-cache"))
    metrics["run"] = {"name": name, "config": config, "overrides": list(overrides), "steps": cfg.max_steps,
                      "seed": seed, "diagnostics": diagnostics(run), "train_seconds": train_seconds}
    write_report(metrics, images, run / "eval")
    return metrics


# Two-sided 95% t quantiles by degrees of freedom.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def t_interval(d: list[float]) -> tuple[float, float]:
    """Mean of paired differences and the half-width of its 95% t interval (infinite for one pair)."""
    mean = statistics.mean(d)
    return mean, (T95.get(len(d) - 1, 1.96) * statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("inf"))


def spread(xs: list[float]) -> dict:
    return {"mean": round(statistics.mean(xs), 4), "sd": round(statistics.stdev(xs), 4) if len(xs) > 1 else 0.0,
            "min": round(min(xs), 4), "max": round(max(xs), 4), "n": len(xs)}


def summarise(results: dict[str, list[dict]]) -> dict:
    """Per variant, over its seeds: mean, sd, min and max of each headline figure."""
    def row(ms: list[dict]) -> dict:
        s = [m["student2"] for m in ms]
        r = {"gap_closed": spread([m["gap_closed"] for m in ms]),
             "fd_to_reference": spread([x["fd_to_reference"] for x in s]),
             "paired_fd_to_teacher8": spread([x["paired_fd_to_teacher8"] for x in s]),
             "all_named_right": spread([x["accuracy"]["all"] for x in s]),
             "recall": spread([x["recall"] for x in s]),
             "precision": spread([x["precision"] for x in s]),
             "omitted_tv": spread([x["omitted_tv"]["mean"] for x in s]),
             "seeds": [m["run"]["seed"] for m in ms]}
        acc = [m["run"]["diagnostics"].get("disc/heldout_accuracy", m["run"]["diagnostics"].get("disc/batch_accuracy"))
               for m in ms]
        if all(a is not None for a in acc):
            r["disc_heldout_accuracy"] = spread(acc)
        return r

    return {v: row(ms) for v, ms in results.items() if ms}


def reference_row(ms: list[dict]) -> dict:
    """The teacher's 8 steps and naive 2 steps on the same prompts (identical in every run)."""
    m = ms[0]
    return {k: {"fd_to_reference": m[k]["fd_to_reference"], "all_named_right": m[k]["accuracy"]["all"],
                "recall": m[k]["recall"], "omitted_tv": m[k]["omitted_tv"]["mean"]} for k in ("teacher8", "naive2")}


def table(summary: dict, refs: dict | None = None) -> str:
    """Markdown: one row per variant, mean ± sd (min–max) over seeds."""
    def fmt(d: dict, p: int = 3) -> str:
        return f"{d['mean']:.{p}f} ± {d['sd']:.{p}f} ({d['min']:.{p}f}–{d['max']:.{p}f})"

    lines = ["| variant | gap closed | FD to reference | all named right | recall | omitted-attribute TV | "
             "paired FD to teacher-8 | D held-out accuracy | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for v, s in summary.items():
        acc = fmt(s["disc_heldout_accuracy"], 2) if "disc_heldout_accuracy" in s else "—"
        lines.append(f"| {v} | {fmt(s['gap_closed'])} | {fmt(s['fd_to_reference'], 1)} | {fmt(s['all_named_right'])} "
                     f"| {fmt(s['recall'])} | {fmt(s['omitted_tv'])} | {fmt(s['paired_fd_to_teacher8'], 1)} | {acc} "
                     f"| {len(s['seeds'])} |")
    if refs:
        for k, label in (("teacher8", "teacher, 8 steps"), ("naive2", "teacher, naive 2 steps")):
            r = refs[k]
            lines.append(f"| *{label}* | {1.0 if k == 'teacher8' else 0.0:.3f} | {r['fd_to_reference']:.1f} | "
                         f"{r['all_named_right']:.3f} | {r['recall']:.3f} | {r['omitted_tv']:.3f} | — | — | — |")
    return "\n".join(lines)
