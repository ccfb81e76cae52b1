"""The run's own record of its logged scalars, and the plots of the adversarial diagnostics.

``RUN_DIR/metrics.jsonl`` holds one JSON object per log step (``{"step": 10, "loss/paired": …}``),
beside whatever tracker the run logs to (TensorBoard, W&B). A resumed run drops the rows past the
checkpoint it resumed from, so the file always describes one unbroken run. At the end of training
:func:`plot_run` draws ``RUN_DIR/report.png`` and writes ``RUN_DIR/report.md``: whether the
discriminator discriminates (held-out AUC and accuracy, the training batch's accuracy, logit gap) and
how hard each loss pulls on each of the student's parameter sets (gradient norms and each loss's share).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

PANELS = (
    ("discriminator held-out AUC (0.5 = chance)", "disc/heldout_auc"),
    ("discriminator accuracy, training batch (0.5 = chance)", "disc/batch_accuracy"),
    ("logit gap (real − fake)", "disc/logit_gap"),
    ("gradient norm on each parameter set", "grad_norm/"),
    ("share of the summed gradient norms on each set", "grad_share/"),
    ("losses", "loss/"),
)


class MetricsLog:
    """Append-only JSON-lines log of the scalars of each log step, truncated to ``start`` on resume."""

    def __init__(self, path: Path, start: int):
        self.path = Path(path)
        if self.path.exists():
            rows = read_metrics(self.path)
            kept = [r for r in rows if r["step"] <= start]
            if len(kept) != len(rows):
                self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def append(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **{k: v for k, v in metrics.items() if math.isfinite(v)}}) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a torn last line (a killed run) is ignored."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _series(rows: list[dict], prefix: str) -> dict[str, tuple[list[int], list[float]]]:
    """Every key starting with ``prefix`` (or equal to it, plus its ``_mid`` twin) → (steps, values)."""
    keys = sorted({k for r in rows for k in r if k != "step" and (k.startswith(prefix) if prefix.endswith("/")
                                                                     else k in (prefix, prefix + "_mid"))})
    return {k: ([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r]) for k in keys}


def plot_run(run_dir: str | Path) -> Path | None:
    """report.png and report.md from RUN_DIR/metrics.jsonl; None when there is nothing to plot."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    rows = read_metrics(path) if path.exists() else []
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, _series(rows, key)) for title, key in PANELS]
    panels = [(t, s) for t, s in panels if s]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for name, (steps, values) in series.items():
            ax.plot(steps, values, label=name.split("/", 1)[1] if "/" in name else name, lw=1.2)
        if "chance" in title:
            ax.axhline(0.5, ls="--", c="k", lw=0.8)
        if title.startswith("gradient norm") or title == "losses":
            ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(run_dir / "report.png", dpi=110)
    plt.close(fig)
    last = rows[-1]
    keys = [k for k in sorted(last) if k.split("/")[0] in ("disc", "grad_norm", "grad_share", "loss")]
    md = [f"# Training run {run_dir.name}", "",
          "Held-out AUC and accuracy: the discriminator on the store's held-out samples (never trained on) "
          "against the student's outputs from their noise. Batch accuracy: on each step's training batch before "
          "the heads' update. Gradient norms: of each loss on the step-1 and step-2 parameters "
          "(grad_norm/step1/…, grad_norm/step2/…; shared for one parameter set) and each loss's share of their sum "
          "on that set.", "", "![diagnostics](report.png)", "",
          f"Last logged step {last['step']}:", "", "| scalar | value |", "|---|---|",
          *(f"| {k} | {last[k]:.4g} |" for k in keys), ""]
    (run_dir / "report.md").write_text("\n".join(md))
    return run_dir / "report.png"
