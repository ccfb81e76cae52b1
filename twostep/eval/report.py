"""The report of a ``twostep eval`` run (docs/evaluation.md, "Outputs"): ``metrics.json``,
``report.md``, ``report.html``, ``metrics.png`` (a plot) and ``grid.png``, and the lines the
command prints."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from twostep.common.images import grid
from twostep.eval.samples import ROWS
from twostep.toy.world import ATTRIBUTES


def table(metrics: dict) -> tuple[list[str], list[list[str]]]:
    """The report's table: header and one row per sample set (shared by Markdown and HTML)."""
    toy = "accuracy" in metrics["teacher8"]
    clip = "clip_score" in metrics["teacher8"]
    div = metrics.get("diversity")
    head = ["", "FD to reference", "paired FD to teacher-8", "precision", "recall"]
    if div:
        head += ["diversity (features)", "diversity (pixels)"]
    if toy:
        head += ["all named right", *ATTRIBUTES, "omitted-attribute TV", "FD to renders"]
    if clip:
        head += ["CLIP score"]
    head += ["s / batch", "images/s"]
    rows = []
    for key, label in ROWS:
        m = metrics[key]
        paired = "—" if m["paired_fd_to_teacher8"] is None else f"{m['paired_fd_to_teacher8']:.2f}"
        r = [label, f"{m['fd_to_reference']:.2f}", paired, f"{m['precision']:.3f}", f"{m['recall']:.3f}"]
        if div:
            r += [f"{m['diversity']['features']:.3f}", f"{m['diversity']['pixels_rms']:.4f}"]
        if toy:
            a = m["accuracy"]
            tv = m["omitted_tv"]["mean"]
            r += [f"{a['all']:.3f}", *("—" if a[x] is None else f"{a[x]:.3f}" for x in ATTRIBUTES),
                  "—" if tv is None else f"{tv:.3f}", f"{m['fd_to_renders']:.1f}"]
        if clip:
            r += [f"{m['clip_score']:.2f}"]
        r += [f"{m['latency_s_per_batch']:.3f}", f"{m['images_per_s']:.2f}"]
        rows.append(r)
    return head, rows


def _notes(metrics: dict) -> list[str]:
    gap = metrics["gap_closed"]
    feats = {"toy": "the toy checker's penultimate features", "clip": f"open_clip image features ({metrics['clip_model']})",
             "dino": f"DINOv2 CLS features ({metrics['dino_model']})"}[metrics["features"]]
    notes = [f"{metrics['n']} prompts at {metrics['height']}×{metrics['width']} on {metrics['device']}, teacher "
             f"`{metrics['teacher']}`, student `{metrics['student']}`; the same noise for all three sets.",
             f"FD, precision and recall in {feats}, unpaired: against a reference set of the teacher at 8 steps "
             "from other seeds. Paired FD: against the teacher's 8-step set from the same noise (how closely the "
             "set follows the teacher's trajectory; not a quality score).",
             f"Gap closed (unpaired): {_fmt(gap)}"
             + (f" (per reference: {', '.join(_fmt(r['gap_closed']) for r in metrics['references'])}; "
                f"spread {metrics['gap_closed_spread']:.3f})" if "gap_closed_spread" in metrics else "")
             + f". Paired gap closed: {_fmt(metrics['paired_gap_closed'])}."]
    if metrics.get("diversity"):
        d = metrics["diversity"]
        notes.append(f"Diversity: mean pairwise distance between {d['seeds']} seeds of each of {d['prompts']} "
                     "prompts (features; pixels as RMS difference in [0, 1]).")
    if "accuracy" in metrics["teacher8"]:
        notes.append("Accuracy over the attributes each caption names. Omitted-attribute TV: for each attribute "
                     "a caption leaves out, total variation between the set's distribution of it (as the checker "
                     "reads it) and the teacher's, averaged over attributes; per attribute in metrics.json.")
    notes.append("Timing: median seconds per batch call after one warm-up call, and images/s, same batch size.")
    return notes


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def write_report(metrics: dict, images: dict[str, np.ndarray], out: Path) -> Path:
    """metrics.json, grid.png (rows as :data:`ROWS`), metrics.png, report.md and report.html;
    returns the Markdown report's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    k = min(12, metrics["n"])
    grid([images[name][:k] for name, _ in ROWS]).save(out / "grid.png")
    toy = "accuracy" in metrics["teacher8"]
    panels = [("FD to the 8-step reference (lower is closer)", "fd_to_reference"), ("recall vs the reference", "recall"),
              ("images / s", "images_per_s")]
    if toy:
        panels.insert(0, ("all named attributes right", None))
    elif "clip_score" in metrics["teacher8"]:
        panels.insert(0, ("CLIP score", "clip_score"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2))
    labels = [label.replace(", ", "\n") for _, label in ROWS]
    for ax, (title, key) in zip(axes, panels):
        vals = [metrics[n]["accuracy"]["all"] if key is None else metrics[n][key] for n, _ in ROWS]
        ax.bar(labels, vals, color=["#555", "#2a7", "#c84"])
        if key == "fd_to_reference":
            ax.axhline(metrics["teacher8"]["fd_to_reference"], ls="--", c="k", lw=1, label="teacher 8 steps")
            ax.legend()
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=120)
    plt.close(fig)
    head, rows = table(metrics)
    notes = _notes(metrics)
    md = [f"# twostep eval: {metrics['student']}", "", *notes, "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", "![metrics](metrics.png)", "", "Rows: " + "; ".join(label for _, label in ROWS) + ".", "",
           "![grid](grid.png)", ""]
    (out / "report.md").write_text("\n".join(md))
    e = html.escape
    page = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>twostep eval: {e(metrics['student'])}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px;text-align:right}td:first-child{text-align:left}"
            "</style></head><body>", f"<h1>twostep eval</h1><p><code>{e(metrics['student'])}</code></p>",
            *(f"<p>{e(x)}</p>" for x in notes), "<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>",
            *("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows), "</table>",
            "<p><img src='metrics.png' alt='metrics'></p>",
            "<p>Rows: " + e("; ".join(label for _, label in ROWS)) + ".</p><p><img src='grid.png' alt='grid'></p>",
            "</body></html>"]
    (out / "report.html").write_text("\n".join(page))
    return out / "report.md"


def summary_line(metrics: dict) -> str:
    """``gap closed 0.95 (unpaired; per reference …); paired 1.40``: the headline, as the CLIs print it."""
    refs = metrics["references"]
    per = f"; per reference {', '.join(_fmt(r['gap_closed']) for r in refs)}" if len(refs) > 1 else ""
    return (f"gap closed {_fmt(metrics['gap_closed'])} (unpaired, against an 8-step reference from other seeds"
            f"{per}); paired gap closed {_fmt(metrics['paired_gap_closed'])} (trajectory following)")


def set_lines(metrics: dict) -> list[str]:
    """One line per sample set: the headline scores and images/s, as ``twostep eval`` prints them."""
    lines = []
    for name, label in ROWS:
        m = metrics[name]
        acc = f"all named right {m['accuracy']['all']:.3f}  " if "accuracy" in m else ""
        cs = f"CLIP score {m['clip_score']:.2f}  " if "clip_score" in m else ""
        lines.append(f"{label:24s} {acc}{cs}FD to reference {m['fd_to_reference']:8.2f}  recall {m['recall']:.3f}  "
                     f"{m['images_per_s']:.2f} images/s")
    return lines
