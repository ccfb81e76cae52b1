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
(rows: teacher 8 steps, student 2 steps, teacher naive 2 steps).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from twostep.common.images import grid
from twostep.eval.metrics import (
    ClipModel,
    DinoModel,
    frechet_distance,
    mean_pairwise_distance,
    precision_recall,
    total_variation,
)
from twostep.prompts.evalset import eval_prompts
from twostep.prompts.manifest import derive_seed
from twostep.teacher.core import Teacher
from twostep.toy.world import ATTRIBUTES, CLASSES, sample_scene

log = logging.getLogger("twostep.eval")

ROWS = (("teacher8", "teacher, 8 steps"), ("student2", "student, 2 steps"), ("naive2", "teacher, naive 2 steps"))
Sampler = Callable[[list[str], list[int]], np.ndarray]


def teacher_sampler(teacher: Teacher, h: int, w: int) -> Sampler:
    return lambda prompts, seeds: teacher.generate(prompts, seeds, h, w).images


def student_sampler(student_dir: str, teacher: Teacher, h: int, w: int) -> Sampler:
    """The exported student, from the same per-seed noise as the teacher's, decoded by its VAE."""
    from twostep.trainer.export import load_student

    pipe = load_student(student_dir, device=teacher.device, dtype=teacher.dtype)
    pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def sample(prompts: list[str], seeds: list[int]) -> np.ndarray:
        noise = teacher.make_noise(seeds, teacher.latent_shape(h, w)).to(teacher.device)
        lat = pipe(prompt=prompts, latents=noise, height=h, width=w, output_type="latent").images
        return teacher.decode(lat)

    return sample


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_timed(fn: Sampler, prompts: list[str], seeds: list[int], batch: int, device: torch.device,
              desc: str) -> tuple[np.ndarray, dict]:
    """All images, and timing: one warm-up call first (not counted), then every batch call timed."""
    fn(prompts[:min(batch, 2)], seeds[:min(batch, 2)])
    out, calls = [], []
    for i in tqdm(range(0, len(prompts), batch), desc=desc):
        _sync(device)
        t0 = time.perf_counter()
        out.append(fn(prompts[i:i + batch], seeds[i:i + batch]))
        _sync(device)
        calls.append(time.perf_counter() - t0)
    n = len(prompts)
    return np.concatenate(out), {"seconds": round(sum(calls), 2), "batch_size": batch,
                                 "latency_s_per_batch": round(statistics.median(calls), 4),
                                 "seconds_per_image": round(sum(calls) / n, 5),
                                 "images_per_s": round(n / sum(calls), 3)}


def gap_closed(fd_student: float, fd_naive: float, floor: float) -> float | None:
    """1 − (FD(student) − floor) / (FD(naive 2) − floor), with ``floor`` = FD(teacher 8 steps): 1 = as
    close to the reference as the teacher itself, 0 = no better than the teacher's naive 2 steps."""
    return None if fd_naive <= floor else 1.0 - (fd_student - floor) / (fd_naive - floor)


def omitted_tv(pred: list[dict], ref: list[dict], named: list[dict]) -> dict[str, float | None]:
    """For each attribute, over the prompts whose caption leaves it out: total variation between the
    distribution of the predicted value in ``pred`` and in ``ref`` (the 8-step reference set)."""
    out: dict[str, float | None] = {}
    for a in ATTRIBUTES:
        rows = [i for i, d in enumerate(named) if d.get(a) is None]
        if not rows:
            out[a] = None
            continue
        hist = [np.array([sum(p[i][a] == c for i in rows) for c in CLASSES[a]], float) for p in (pred, ref)]
        out[a] = round(total_variation(*hist), 4)
    vals = [v for v in out.values() if v is not None]
    out["mean"] = round(float(np.mean(vals)), 4) if vals else None
    return out


def reference_seeds(seed: int, n: int, k: int) -> list[int]:
    """Seeds of the k-th 8-step reference set: independent of the eval seeds and of each other."""
    return [derive_seed(seed + 1, f"floor-{i}" if k == 0 else f"reference{k}-{i}") for i in range(n)]


def cached_run(cache: str | Path | None, key: dict, fn: Callable[[], tuple[np.ndarray, dict]]
               ) -> tuple[np.ndarray, dict]:
    """``fn()`` (images, timing), stored in ``cache`` as ``<sha256 of key>.npz`` and read from there
    next time. Only teacher-side sets are cached (the key names the teacher, its sampler and
    versions, the prompts, seeds and size), so several students score against one reference at
    the cost of one."""
    if cache is None:
        return fn()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]
    path = Path(cache) / f"{digest}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            return z["images"], json.loads(str(z["timing"]))
    images, timing = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, timing=np.array(json.dumps(timing)))
    os.replace(tmp, path)
    return images, timing


def unpaired_scores(ref: np.ndarray, sets: dict[str, np.ndarray]) -> dict:
    """FD, precision and recall of each feature set against the reference features ``ref``, and the
    gap closed by ``student2`` between ``naive2`` (0) and ``teacher8`` (1)."""
    fd = {k: frechet_distance(f, ref) for k, f in sets.items()}
    pr = {k: precision_recall(ref, f) for k, f in sets.items()}
    gap = (gap_closed(fd["student2"], fd["naive2"], fd["teacher8"])
           if {"student2", "naive2", "teacher8"} <= set(fd) else None)
    return {"fd": fd, "precision": {k: v[0] for k, v in pr.items()}, "recall": {k: v[1] for k, v in pr.items()},
            "gap_closed": gap}


def evaluate(student_dir: str | None, teacher: Teacher, n: int = 500, seed: int = 20261122, batch: int = 100,
             prompts: str | None = None, size: tuple[int, int] | None = None, clip: ClipModel | None = None,
             features: str = "auto", diversity_prompts: int = 16, diversity_seeds: int = 4,
             dino: DinoModel | None = None, references: int = 1, cache: str | Path | None = None,
             student: Sampler | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Sample the sets and compute every metric; returns ``(metrics, images)``.

    Every set is scored *unpaired*, against an 8-step reference drawn from other seeds
    (docs/evaluation.md): the teacher's own 8-step set is then no longer identical to what it is
    compared with, and nothing can beat it in expectation. ``references`` > 1 scores against that
    many independent references and reports the gap closed of each (its spread is the noise of the
    figure). The paired FD to the same-noise 8-step set is kept as a second, named column: how
    closely a set follows the teacher's own trajectory.

    ``features``: toy (the checker's), clip (``clip``'s image embeddings), dino (``dino``'s CLS
    features) or auto: toy for toy prompts, else clip when ``clip`` is given, else dino.
    ``student``: a sampler used in place of the exported student at ``student_dir`` (tests, baselines).
    ``cache``: a folder that keeps the teacher-side sets between calls (:func:`cached_run`)."""
    ep = eval_prompts(prompts, n, seed, size)
    n, h, w = len(ep.prompts), ep.height, ep.width
    if features == "auto":
        features = "toy" if ep.named is not None else "dino" if dino is not None and clip is None else "clip"
    if features == "clip" and clip is None:
        raise ValueError("FD outside the toy world needs a feature model: pass --clip-model (e.g. "
                         "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K or a local open_clip folder) or --dino-model "
                         "(e.g. facebook/dinov2-large or a local folder)")
    if features == "dino" and dino is None:
        raise ValueError("--features dino needs --dino-model (e.g. facebook/dinov2-large or a local folder)")
    if references < 1:
        raise ValueError(f"references must be ≥ 1, not {references}")
    checker = None
    if features == "toy" or ep.named is not None:
        from twostep.toy.checker import load_checker

        checker = load_checker()
    featurize = {"toy": checker, "clip": clip, "dino": dino}[features].features
    naive = teacher.with_sampler(num_steps=2)
    samplers = {"teacher8": teacher_sampler(teacher, h, w),
                "student2": student or student_sampler(student_dir, teacher, h, w),
                "naive2": teacher_sampler(naive, h, w)}
    ident = {"teacher8": teacher.describe(), "naive2": naive.describe()}

    def sample(key: str, label: str, p: list[str], s: list[int]) -> tuple[np.ndarray, dict]:
        def go():
            return run_timed(samplers[key], p, s, batch, teacher.device, label)
        if key == "student2":
            return go()
        return cached_run(cache, {"set": ident[key], "prompts": p, "seeds": s, "size": [h, w], "batch": batch}, go)

    images, timing = {}, {}
    for key, label in ROWS:
        images[key], timing[key] = sample(key, label, ep.prompts, ep.seeds)
    ref_images = [sample("teacher8", f"teacher 8 steps, reference {k + 1} (other seeds)", ep.prompts,
                         reference_seeds(seed, n, k))[0] for k in range(references)]
    feats = {k: featurize(v) for k, v in images.items()}
    ref_feats = [featurize(r) for r in ref_images]
    scores = [unpaired_scores(r, feats) for r in ref_feats]

    # per-prompt diversity: K seeds for each of the first m prompts
    m, k = min(diversity_prompts, n), diversity_seeds
    div = None
    if m and k >= 2:
        d_prompts = [p for p in ep.prompts[:m] for _ in range(k)]
        d_seeds = [derive_seed(seed + 2, f"diversity-{i}-{j}") for i in range(m) for j in range(k)]
        div = {}
        for key, label in ROWS:
            imgs, _ = sample(key, f"{label}, diversity", d_prompts, d_seeds)
            pix = imgs.reshape(m, k, -1).astype(np.float64) / 255.0
            div[key] = {"features": round(mean_pairwise_distance(featurize(imgs).reshape(m, k, -1)), 4),
                        "pixels_rms": round(mean_pairwise_distance(pix) / np.sqrt(pix.shape[-1]), 4)}

    sc = scores[0]
    paired = {key: frechet_distance(feats[key], feats["teacher8"]) for key in ("student2", "naive2")}
    metrics: dict = {"n": n, "seed": seed, "prompts": prompts, "height": h, "width": w, "teacher": teacher.name,
                     "student": student_dir, "device": str(teacher.device), "features": features,
                     "clip_model": clip.spec if clip is not None else None,
                     "dino_model": dino.spec if dino is not None else None,
                     "gap_closed": _r(sc["gap_closed"]),
                     "references": [{"gap_closed": _r(s["gap_closed"]),
                                     "fd": {key: round(v, 3) for key, v in s["fd"].items()}} for s in scores],
                     "paired_gap_closed": _r(gap_closed(paired["student2"], paired["naive2"],
                                                        sc["fd"]["teacher8"])),
                     "diversity": {"prompts": m, "seeds": k} if div else None}
    gaps = [s["gap_closed"] for s in scores if s["gap_closed"] is not None]
    if len(gaps) > 1:
        metrics["gap_closed_spread"] = round(max(gaps) - min(gaps), 4)
    for key, _ in ROWS:
        metrics[key] = {"fd_to_reference": round(sc["fd"][key], 3),
                        "paired_fd_to_teacher8": round(paired[key], 3) if key in paired else None,
                        "precision": round(sc["precision"][key], 4), "recall": round(sc["recall"][key], 4),
                        **timing[key]}
        if div:
            metrics[key]["diversity"] = div[key]
        if clip is not None:
            metrics[key]["clip_score"] = round(clip.score(images[key], ep.prompts), 3)
    if ep.named is not None:  # toy world: named-attribute accuracy, omitted-attribute TV, FD to renders
        from twostep.toy.render import render_batch

        rng = np.random.default_rng(seed + 1)  # the same render set as the teacher's own evaluation
        f_truth = checker.features(render_batch([sample_scene(rng) for _ in range(n)], h))
        preds = {key: checker.predict(v) for key, v in images.items()}
        pred_ref = checker.predict(ref_images[0])
        for key, _ in ROWS:
            metrics[key]["accuracy"] = checker.accuracy(preds[key], ep.named)
            metrics[key]["omitted_tv"] = omitted_tv(preds[key], pred_ref, ep.named)
            f_key = feats[key] if features == "toy" else checker.features(images[key])
            metrics[key]["fd_to_renders"] = round(frechet_distance(f_key, f_truth), 3)
    return metrics, images


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


# --- report --------------------------------------------------------------------------------------


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


# --- CLI -----------------------------------------------------------------------------------------


def summary_line(metrics: dict) -> str:
    """``gap closed 0.95 (unpaired; per reference …); paired 1.40``: the headline, as the CLIs print it."""
    refs = metrics["references"]
    per = f"; per reference {', '.join(_fmt(r['gap_closed']) for r in refs)}" if len(refs) > 1 else ""
    return (f"gap closed {_fmt(metrics['gap_closed'])} (unpaired, against an 8-step reference from other seeds"
            f"{per}); paired gap closed {_fmt(metrics['paired_gap_closed'])} (trajectory following)")


def _size(text: str) -> tuple[int, int]:
    try:
        h, _, w = text.lower().partition("x")
        return int(h), int(w or h)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected H or HxW, not {text!r}") from e


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a 2-step student against its 8-step teacher and naive 2 steps",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(p)
    p.set_defaults(func=run)


def _arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--student", required=True, help="an exported student folder (RUN_DIR/student) or a run folder")
    ap.add_argument("--teacher", default="toy", help="its teacher: toy, a pipeline folder or a hub id (default: toy)")
    ap.add_argument("--prompts", "--manifest", dest="prompts", default=None, metavar="MANIFEST",
                    help="eval prompts and seeds: the first N rows of a manifest (twostep prompts build/toy; toy "
                         "manifests also give the named attributes); default: N fresh toy prompts")
    ap.add_argument("-n", "--num-samples", type=int, default=500, help="eval prompts (default: 500)")
    ap.add_argument("--seed", type=int, default=20261122,
                    help="seed of the toy prompts, the references' and diversity's noise, and the render set")
    ap.add_argument("--size", type=_size, default=None, metavar="H[xW]",
                    help="image size (default: the manifest's height/width; 64 for toy prompts)")
    ap.add_argument("--batch-size", type=int, default=100, help="samples per call, the same for all three sets")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--features", choices=("auto", "toy", "clip", "dino"), default="auto",
                    help="feature space of FD, precision/recall and diversity: toy checker, open_clip image "
                         "embeddings or DINOv2 CLS features (default: toy for toy prompts, else clip if "
                         "--clip-model is given, else dino)")
    ap.add_argument("--clip-model", default=None,
                    help="open_clip model for CLIP score and clip features: a name (ViT-B-32, with "
                         "--clip-pretrained), hf-hub:ORG/REPO, or a local folder with open_clip_config.json "
                         "and weights")
    ap.add_argument("--clip-pretrained", default=None,
                    help="with a model name: an open_clip pretrained tag or a local weights file")
    ap.add_argument("--dino-model", default=None,
                    help="DINOv2 model for --features dino (FD_DINOv2): a hub id such as facebook/dinov2-large or a "
                         "local folder with config.json, weights and preprocessor_config.json (transformers)")
    ap.add_argument("--diversity-prompts", type=int, default=16,
                    help="prompts sampled with several seeds for per-prompt diversity; 0 = skip (default: 16)")
    ap.add_argument("--diversity-seeds", type=int, default=4, help="seeds per diversity prompt (default: 4)")
    ap.add_argument("--references", type=int, default=1,
                    help="independent 8-step reference sets (other seeds) to score against; with 2 or more the "
                         "report gives the gap closed against each and their spread (default: 1)")
    ap.add_argument("--cache", default=None, metavar="DIR",
                    help="keep the teacher-side sample sets (8 steps, naive 2 steps, references) in DIR and reuse "
                         "them when the teacher, prompts, seeds and size match (scoring several students)")
    ap.add_argument("--out", default="out/eval", help="folder for the report, metrics and grids (default: out/eval)")


def resolve_student(path: str) -> str:
    """A run folder (holding ``student/``) or the exported student folder itself."""
    p = Path(path)
    if (p / "student" / "model_index.json").is_file():
        return str(p / "student")
    if not (p / "model_index.json").is_file():
        raise FileNotFoundError(f"--student {path}: neither an exported student (model_index.json) nor a run "
                                "folder with student/")
    return str(p)


def run(args: argparse.Namespace) -> int:
    try:
        student = resolve_student(args.student)
    except FileNotFoundError as e:
        log.error("%s", e)
        return 2
    teacher = Teacher.load(args.teacher, device=args.device)
    clip = (ClipModel(args.clip_model, args.clip_pretrained, device=str(teacher.device))
            if args.clip_model else None)
    dino = DinoModel(args.dino_model, device=str(teacher.device)) if args.dino_model else None
    try:
        metrics, images = evaluate(student, teacher, args.num_samples, args.seed, args.batch_size, args.prompts,
                                   args.size, clip, args.features, args.diversity_prompts, args.diversity_seeds,
                                   dino, args.references, args.cache)
    except ValueError as e:
        log.error("%s", e)
        return 2
    out = Path(args.out)
    report = write_report(metrics, images, out)
    for name, label in ROWS:
        m = metrics[name]
        acc = f"all named right {m['accuracy']['all']:.3f}  " if "accuracy" in m else ""
        cs = f"CLIP score {m['clip_score']:.2f}  " if "clip_score" in m else ""
        print(f"{label:24s} {acc}{cs}FD to reference {m['fd_to_reference']:8.2f}  recall {m['recall']:.3f}  "
              f"{m['images_per_s']:.2f} images/s")
    print(summary_line(metrics))
    print(f"wrote {report}, {out / 'report.html'}, {out / 'metrics.json'}, {out / 'grid.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(ap)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
