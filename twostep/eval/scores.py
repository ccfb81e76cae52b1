"""Scores of the sample sets (docs/evaluation.md, "Metrics"): unpaired FD, precision and recall against
8-step references, the gap closed, paired FD, per-prompt diversity, CLIP score and the toy world's
attribute scores; :func:`evaluate` samples the sets and computes them all. The metric functions and
feature models are in ``twostep.eval.metrics``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from twostep.common.config_flags import FieldError
from twostep.eval.config import EvalConfig
from twostep.eval.metrics import (
    ClipModel,
    DinoModel,
    frechet_distance,
    mean_pairwise_distance,
    precision_recall,
    total_variation,
)
from twostep.eval.samples import (
    ROWS,
    Sampler,
    SampleSets,
    diversity_seeds,
    exported_student_sampler,
    reference_seeds,
    resolve_student,
)
from twostep.prompts.evalset import eval_prompts
from twostep.teacher.core import Teacher
from twostep.toy.world import ATTRIBUTES, CLASSES, sample_scene


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


def unpaired_scores(ref: np.ndarray, sets: dict[str, np.ndarray]) -> dict:
    """FD, precision and recall of each feature set against the reference features ``ref``, and the
    gap closed by ``student2`` between ``naive2`` (0) and ``teacher8`` (1)."""
    fd = {k: frechet_distance(f, ref) for k, f in sets.items()}
    pr = {k: precision_recall(ref, f) for k, f in sets.items()}
    gap = (gap_closed(fd["student2"], fd["naive2"], fd["teacher8"])
           if {"student2", "naive2", "teacher8"} <= set(fd) else None)
    return {"fd": fd, "precision": {k: v[0] for k, v in pr.items()}, "recall": {k: v[1] for k, v in pr.items()},
            "gap_closed": gap}


def diversity(sets: SampleSets, featurize: Callable[[np.ndarray], np.ndarray], prompts: list[str], seed: int,
              m: int, k: int) -> dict[str, dict]:
    """Per-prompt diversity of each set: ``k`` seeds for each of ``prompts[:m]``, mean pairwise distance
    in the features and as RMS pixel difference in [0, 1]."""
    d_prompts = [p for p in prompts[:m] for _ in range(k)]
    d_seeds = diversity_seeds(seed, m, k)
    div = {}
    for key, label in ROWS:
        imgs, _ = sets.draw(key, f"{label}, diversity", d_prompts, d_seeds)
        pix = imgs.reshape(m, k, -1).astype(np.float64) / 255.0
        div[key] = {"features": round(mean_pairwise_distance(featurize(imgs).reshape(m, k, -1)), 4),
                    "pixels_rms": round(mean_pairwise_distance(pix) / np.sqrt(pix.shape[-1]), 4)}
    return div


def _feature_space(features: str, toy_prompts: bool, clip: bool, dino: bool) -> str:
    """``features`` with auto resolved, given whether the prompts are toy prompts and whether a CLIP and
    a DINOv2 model are given; a FieldError where the space has no model."""
    if features == "auto":
        features = "toy" if toy_prompts else "dino" if dino and not clip else "clip"
    if features == "clip" and not clip:
        raise FieldError("clip_model", "is needed for FD outside the toy world: a feature model (e.g. "
                         "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K or a local open_clip folder), or "
                         "{dino_model} (e.g. facebook/dinov2-large or a local folder)")
    if features == "dino" and not dino:
        raise FieldError("dino_model", "is needed for {features} dino (e.g. facebook/dinov2-large or a local folder)")
    return features


def evaluate(config: EvalConfig | None = None, /, *, teacher: Teacher | None = None, clip: ClipModel | None = None,
             dino: DinoModel | None = None, student_sampler: Sampler | None = None,
             **fields: Any) -> tuple[dict, dict[str, np.ndarray]]:
    """Sample the sets and compute every metric; returns ``(metrics, images)``.

    ``config``, with ``fields`` (``EvalConfig`` field values) in place of its own: what to score and
    how. Every set is scored *unpaired*, against an 8-step reference drawn from other seeds
    (docs/evaluation.md): the teacher's own 8-step set is then no longer identical to what it is
    compared with, and nothing can beat it in expectation. ``references`` > 1 scores against that
    many independent references and reports the gap closed of each (its spread is the noise of the
    figure). The paired FD to the same-noise 8-step set is kept as a second, named column: how
    closely a set follows the teacher's own trajectory.

    Loaded here unless given: ``teacher`` (from ``teacher`` and ``device``), ``clip`` (from
    ``clip_model``), ``dino`` (from ``dino_model``), after the prompts and the feature space are
    checked. ``student_sampler``: a sampler used in place of
    the exported student at ``student`` (tests, baselines). ``cache``: a folder that keeps the
    teacher-side sets between calls (``twostep.eval.samples.cached_run``)."""
    cfg = dataclasses.replace(config, **fields) if config is not None else EvalConfig(**fields)
    student_dir = cfg.student
    if student_sampler is None:
        if student_dir is None:
            raise FieldError("student", "is needed: an exported student folder or a run folder")
        student_dir = resolve_student(student_dir)
    seed = cfg.seed
    ep = eval_prompts(cfg.prompts, cfg.num_samples, seed, cfg.size)
    n, h, w = len(ep.prompts), ep.height, ep.width
    features = _feature_space(cfg.features, ep.named is not None, clip is not None or bool(cfg.clip_model),
                              dino is not None or bool(cfg.dino_model))
    if teacher is None:
        teacher = Teacher.load(cfg.teacher, device=cfg.device)
    if clip is None and cfg.clip_model:
        clip = ClipModel(cfg.clip_model, cfg.clip_pretrained, device=str(teacher.device))
    if dino is None and cfg.dino_model:
        dino = DinoModel(cfg.dino_model, device=str(teacher.device))
    checker = None
    if features == "toy" or ep.named is not None:
        from twostep.toy.checker import load_checker

        checker = load_checker()
    featurize = {"toy": checker, "clip": clip, "dino": dino}[features].features
    naive = teacher.with_sampler(num_steps=2)
    student = student_sampler or exported_student_sampler(student_dir, teacher, h, w)
    sets = SampleSets(teacher, naive, student, h, w, cfg.batch_size, cfg.cache)

    images, timing = {}, {}
    for key, label in ROWS:
        images[key], timing[key] = sets.draw(key, label, ep.prompts, ep.seeds)
    ref_images = [sets.draw("teacher8", f"teacher 8 steps, reference {k + 1} (other seeds)", ep.prompts,
                            reference_seeds(seed, n, k))[0] for k in range(cfg.references)]
    feats = {k: featurize(v) for k, v in images.items()}
    ref_feats = [featurize(r) for r in ref_images]
    scores = [unpaired_scores(r, feats) for r in ref_feats]

    m, k = min(cfg.diversity_prompts, n), cfg.diversity_seeds
    div = diversity(sets, featurize, ep.prompts, seed, m, k) if m and k >= 2 else None

    sc = scores[0]
    paired = {key: frechet_distance(feats[key], feats["teacher8"]) for key in ("student2", "naive2")}
    metrics: dict = {"n": n, "seed": seed, "prompts": cfg.prompts, "height": h, "width": w, "teacher": teacher.name,
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
