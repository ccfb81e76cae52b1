"""The sample sets that ``twostep eval`` scores (docs/evaluation.md, "What is sampled"): the samplers,
their timing and the cache of the teacher-side sets."""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from twostep.prompts.manifest import derive_seed
from twostep.teacher.core import Teacher

ROWS = (("teacher8", "teacher, 8 steps"), ("student2", "student, 2 steps"), ("naive2", "teacher, naive 2 steps"))
"""The three sets, in report order: ``(key, label)``."""

Sampler = Callable[[list[str], list[int]], np.ndarray]
"""``(prompts, seeds) → images`` (uint8, N×H×W×3)."""


def teacher_sampler(teacher: Teacher, h: int, w: int) -> Sampler:
    return lambda prompts, seeds: teacher.generate(prompts, seeds, h, w).images


def exported_student_sampler(student_dir: str, teacher: Teacher, h: int, w: int) -> Sampler:
    """The exported student, from the same per-seed noise as the teacher's, decoded by its VAE."""
    from twostep.trainer.export import open_student

    student = open_student(student_dir, device=teacher.device, dtype=teacher.dtype)

    @torch.no_grad()
    def sample(prompts: list[str], seeds: list[int]) -> np.ndarray:
        noise = teacher.make_noise(seeds, teacher.latent_shape(h, w)).to(teacher.device)
        return teacher.decode(student.latents(prompts, noise))

    return sample


def resolve_student(path: str) -> str:
    """A run folder (holding ``student/``) or the exported student folder itself."""
    p = Path(path)
    if (p / "student" / "model_index.json").is_file():
        return str(p / "student")
    if not (p / "model_index.json").is_file():
        raise FileNotFoundError(f"--student {path}: neither an exported student (model_index.json) nor a run "
                                "folder with student/")
    return str(p)


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


def reference_seeds(seed: int, n: int, k: int) -> list[int]:
    """Seeds of the k-th 8-step reference set: independent of the eval seeds and of each other."""
    return [derive_seed(seed + 1, f"floor-{i}" if k == 0 else f"reference{k}-{i}") for i in range(n)]


def diversity_seeds(seed: int, prompts: int, seeds: int) -> list[int]:
    """Seeds of the per-prompt diversity sets: ``seeds`` for each of ``prompts`` prompts, prompt-major."""
    return [derive_seed(seed + 2, f"diversity-{i}-{j}") for i in range(prompts) for j in range(seeds)]


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


class SampleSets:
    """The three samplers of :data:`ROWS` at one size, batch size and device. :meth:`draw` samples one
    of them, timed; the teacher-side sets go through the ``cache`` folder (:func:`cached_run`)."""

    def __init__(self, teacher: Teacher, naive: Teacher, student: Sampler, h: int, w: int, batch: int,
                 cache: str | Path | None = None):
        self.samplers = {"teacher8": teacher_sampler(teacher, h, w), "student2": student,
                         "naive2": teacher_sampler(naive, h, w)}
        self.ident = {"teacher8": teacher.describe(), "naive2": naive.describe()}
        self.h, self.w, self.batch, self.cache, self.device = h, w, batch, cache, teacher.device

    def draw(self, key: str, label: str, prompts: list[str], seeds: list[int]) -> tuple[np.ndarray, dict]:
        """Set ``key``'s images for ``prompts``/``seeds`` and their timing (``label`` names the progress bar)."""
        def go():
            return run_timed(self.samplers[key], prompts, seeds, self.batch, self.device, label)
        if key == "student2":
            return go()
        return cached_run(self.cache, {"set": self.ident[key], "prompts": prompts, "seeds": seeds,
                                       "size": [self.h, self.w], "batch": self.batch}, go)
