"""Image grids during training: teacher 8 steps, student 2 steps (EMA), teacher naive 2 steps.

Fixed prompts and seeds (``sample_prompts`` or the first batch's first 8 prompts, remembered in
``RUN_DIR/samples/prompts.json`` so a resumed run draws the same ones). The teacher rows are
computed once; each call adds ``samples/step-XXXXXXXX.png`` and logs it to TensorBoard.
(``twostep sample``, the command that draws images from an exported student, is :mod:`.sample`.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from twostep.common.images import grid
from twostep.teacher.core import Teacher

from .checkpoint import EMA
from .student import TwoStepStudent

log = logging.getLogger(__name__)


class TrainingGrid:
    """The grid of one run, drawn on the main process.

    Args:
        run_dir: the run directory; pictures go to ``run_dir/samples``.
        teacher: the frozen teacher (its rows, the noise, the caption features, the VAE decoder).
        student: the unwrapped student module (its two step models).
        sigma_mid: the student's boundary, the run's one value (the one the student was built with).
        accelerator: the run's ``accelerate.Accelerator``, for ``autocast`` and the TensorBoard tracker.
        ema: the student's EMA, applied while the student row is drawn; None draws the raw weights.
        prompts: configured prompts (``sample_prompts``); empty = the first batch's first ``n``.
        seed: image ``i`` starts from the noise of seed ``seed + i`` (``sample_seed``).
        n: prompts taken from the first batch when none are configured.
    """

    def __init__(self, run_dir: str | Path, teacher: Teacher, student: TwoStepStudent, sigma_mid: float,
                 accelerator: Any, ema: EMA | None = None, prompts: Sequence[str] = (), seed: int = 0, n: int = 8):
        self.teacher, self.student, self.accelerator, self.ema = teacher, student, accelerator, ema
        self.sigma_mid = sigma_mid
        self.seed, self.n = seed, n
        self.dir = Path(run_dir) / "samples"
        self.dir.mkdir(parents=True, exist_ok=True)
        saved = self.dir / "prompts.json"
        self.prompts: list[str] = list(prompts) or (
            json.loads(saved.read_text())["prompts"] if saved.exists() else [])
        self.size: tuple[int, int] | None = None
        self._teacher_rows: list[np.ndarray] | None = None

    def remember(self, batch: dict) -> None:
        """Take the image size (and, without configured prompts, the prompts) from the first batch."""
        if self.size is None:
            f = self.teacher.vae_scale_factor
            self.size = (batch["latent"].shape[-2] * f, batch["latent"].shape[-1] * f)
        if not self.prompts:
            self.prompts = list(batch["prompt"][:self.n])
            (self.dir / "prompts.json").write_text(json.dumps({"prompts": self.prompts}, indent=1))

    @torch.no_grad()
    def save(self, step: int) -> Path | None:
        """Draw the grid for ``step`` into ``samples/step-XXXXXXXX.png``; None before :meth:`remember`."""
        if self.size is None or not self.prompts:
            return None
        teacher, student = self.teacher, self.student
        seeds = [self.seed + i for i in range(len(self.prompts))]
        h, w = self.size
        if self._teacher_rows is None:
            eight = teacher.generate(self.prompts, seeds, h, w).images
            naive = teacher.with_sampler(num_steps=2)
            self._teacher_rows = [eight, naive.generate(self.prompts, seeds, h, w).images]
        noise = teacher.make_noise(seeds, teacher.latent_shape(h, w)).to(teacher.device)
        caps = teacher.encode_prompts(self.prompts)
        with self.ema.applied(student) if self.ema is not None else nullcontext(), self.accelerator.autocast():
            _, _, x0 = student(noise, caps)
        rows = [self._teacher_rows[0], teacher.decode(x0.float()), self._teacher_rows[1]]
        image = grid(rows, scale=1)
        path = self.dir / f"step-{step:08d}.png"
        image.save(path)
        picture = np.asarray(image)
        for tracker in self.accelerator.trackers:
            if getattr(tracker, "name", "") == "tensorboard":
                tracker.writer.add_image("samples/teacher8_student2_naive2", picture, step, dataformats="HWC")
        log.info("samples (rows: teacher 8 steps, student 2 steps, teacher naive 2 steps): %s", path)
        return path
