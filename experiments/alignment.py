"""The pre-registered runs of docs/results/preregistration.md: does the discriminator align the
student's distribution, or only regularise it?

Arms (each trained from the same store on every seed):

* ``trained``: the default ``toy`` config (regressions + both adversarial terms), 250 steps (the demo's);
* ``frozen``: the same, with the discriminator's heads frozen at their initialisation
  (``model.disc_frozen=true``): the same terms and student updates, no discriminator learning;
* ``gan_only``: the shipped adversarial-only config, ``toy_gan_only``, for its own length.

Every run is scored unpaired with ``twostep eval`` at 1,000 prompts of the pre-registered eval seed,
against two independent 8-step references (the teacher-side sets are made once and cached). Each
run's record goes to ``--records`` as ``ARM-seedS.json``; the report (``--records``/report.md) gives
every arm on every seed, the paired differences ``trained − frozen`` with 95% t intervals, and the
adversarial-only criteria per seed. Finished runs are read back, not redone.

    python experiments/alignment.py --store out/demo/store --arms trained frozen
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from toyruns import run_one, t_interval

from twostep.common.logs import configure_logging

# The pre-registration (docs/results/preregistration.md): arms, seeds, eval seed, references.
# arm: (config, overrides, training steps: None = the config's own length)
ARMS: dict[str, tuple[str, list[str], int | None]] = {
    "trained": ("toy", [], 250),
    "frozen": ("toy", ["model.disc_frozen=true"], 250),
    "gan_only": ("toy_gan_only", [], None),
}
SEEDS = [7101, 7102, 7103, 7104, 7105]
EVAL_SEED = 20261206
REFERENCES = 2


def record(m: dict) -> dict:
    """The figures a run is judged on, from its eval metrics."""
    s, n = m["student2"], m["naive2"]
    gaps = [r["gap_closed"] for r in m["references"]]
    return {"arm": m["run"]["name"], "seed": m["run"]["seed"], "steps": m["run"]["steps"],
            "train_seconds": m["run"].get("train_seconds"), "eval_seed": m["seed"], "n": m["n"],
            "gap_closed": gaps, "gap_closed_mean": round(statistics.mean(gaps), 4),
            "fd_to_reference": [r["fd"]["student2"] for r in m["references"]],
            "omitted_tv": s["omitted_tv"]["mean"], "all_named_right": s["accuracy"]["all"],
            "recall": s["recall"], "precision": s["precision"], "paired_fd_to_teacher8": s["paired_fd_to_teacher8"],
            "naive2": {"fd_to_reference": [r["fd"]["naive2"] for r in m["references"]],
                       "omitted_tv": n["omitted_tv"]["mean"], "all_named_right": n["accuracy"]["all"],
                       "recall": n["recall"]},
            "teacher8": {"fd_to_reference": [r["fd"]["teacher8"] for r in m["references"]],
                         "omitted_tv": m["teacher8"]["omitted_tv"]["mean"],
                         "all_named_right": m["teacher8"]["accuracy"]["all"], "recall": m["teacher8"]["recall"]},
            "diagnostics": m["run"]["diagnostics"]}


def report(recs: dict[str, list[dict]]) -> str:
    lines = ["| arm | seed | steps | gap closed (ref 1 / ref 2) | FD to reference (1 / 2) | omitted-attribute TV | "
             "all named right | recall | D held-out AUC (last) | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, rs in recs.items():
        for r in rs:
            auc = r["diagnostics"].get("disc/heldout_auc")
            lines.append(f"| {arm} | {r['seed']} | {r['steps']} | {r['gap_closed'][0]:.3f} / {r['gap_closed'][1]:.3f} | "
                         f"{r['fd_to_reference'][0]:.1f} / {r['fd_to_reference'][1]:.1f} | {r['omitted_tv']:.3f} | "
                         f"{r['all_named_right']:.3f} | {r['recall']:.3f} | {'—' if auc is None else f'{auc:.3f}'} | "
                         f"{r['train_seconds'] or '—'} |")
    any_rec = next(r for rs in recs.values() for r in rs)
    for label, key in (("teacher, 8 steps", "teacher8"), ("teacher, naive 2 steps", "naive2")):
        t = any_rec[key]
        lines.append(f"| *{label}* | | | | {t['fd_to_reference'][0]:.1f} / {t['fd_to_reference'][1]:.1f} | "
                     f"{t['omitted_tv']:.3f} | {t['all_named_right']:.3f} | {t['recall']:.3f} | | |")
    out = ["\n".join(lines)]
    if "trained" in recs and "frozen" in recs:
        frozen = {r["seed"]: r for r in recs["frozen"]}
        pairs = [(r, frozen[r["seed"]]) for r in recs["trained"] if r["seed"] in frozen]
        rows = ["| metric | trained − frozen, paired by seed (95% t interval) | seeds | interval excludes 0 |",
                "|---|---|---|---|"]
        for key in ("gap_closed_mean", "omitted_tv", "all_named_right", "recall"):
            if len(pairs) < 2:
                break
            mean, hw = t_interval([a[key] - b[key] for a, b in pairs])
            rows.append(f"| {key.replace('_', ' ')} | {mean:+.4f} ± {hw:.4f} | {len(pairs)} | "
                        f"{'yes' if abs(mean) > hw else 'no'} |")
        out.append("\n".join(rows))
    if "gan_only" in recs:
        rows = ["| seed | gap closed ≥ 0.6 (both refs) | omitted TV ≤ 0.14 | all named right > naive | recall ≥ naive | "
                "all four |", "|---|---|---|---|---|---|"]
        for r in recs["gan_only"]:
            c = [min(r["gap_closed"]) >= 0.6, r["omitted_tv"] <= 0.14,
                 r["all_named_right"] > r["naive2"]["all_named_right"], r["recall"] >= r["naive2"]["recall"]]
            rows.append(f"| {r['seed']} | " + " | ".join("yes" if x else "no" for x in c) +
                        f" | {'yes' if all(c) else 'no'} |")
        out.append("\n".join(rows))
    return "\n\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="the demo store (twostep demo's out/demo/store)")
    ap.add_argument("--out", default="runs/alignment", help="training runs and the eval cache")
    ap.add_argument("--records", default="docs/results/alignment", help="per-seed JSON records and report.md")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=SEEDS, help="default: the pre-registered seeds")
    ap.add_argument("--eval-samples", type=int, default=1000, help="eval prompts (default: 1000)")
    args = ap.parse_args(argv)
    configure_logging(quiet=True)
    out, recs_dir = Path(args.out), Path(args.records)
    recs_dir.mkdir(parents=True, exist_ok=True)
    recs = on_disk(recs_dir, args.seeds)
    for seed in args.seeds:
        for arm in args.arms:
            config, overrides, steps = ARMS[arm]
            m = run_one(arm, config, overrides, seed, args.store, steps, args.eval_samples, out,
                        eval_seed=EVAL_SEED, references=REFERENCES)
            r = record(m)
            (recs_dir / f"{arm}-seed{seed}.json").write_text(json.dumps(r, indent=1))
            recs = on_disk(recs_dir, args.seeds)
            (recs_dir / "report.md").write_text(report(recs))
            print(f"{arm} seed {seed}: gap closed {r['gap_closed']}, omitted TV {r['omitted_tv']:.3f}", flush=True)
    print(report(recs))
    return 0


def on_disk(recs_dir: Path, seeds: list[int]) -> dict[str, list[dict]]:
    """Every arm's records of ``seeds`` in the records folder (runs of earlier invocations included)."""
    recs: dict[str, list[dict]] = {}
    for arm in ARMS:
        for seed in seeds:
            path = recs_dir / f"{arm}-seed{seed}.json"
            if path.exists():
                recs.setdefault(arm, []).append(json.loads(path.read_text()))
    return recs


if __name__ == "__main__":
    raise SystemExit(main())
