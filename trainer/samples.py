"""Sample grids during training: teacher 8 steps, student 2 steps (EMA), teacher naive 2 steps.

Fixed prompts and seeds (``sample_prompts`` or the first batch's first 8 prompts, remembered in
``RUN_DIR/samples/prompts.json`` so a resumed run draws the same ones). The teacher rows are
computed once; each call adds ``samples/step-XXXXXXXX.png`` and logs it to TensorBoard.
"""

from __future__ import annotations

import json
import logging
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from twostep.pipeline.teacher import Teacher, transformer_velocity
from twostep.pipeline.toy.evaluate import grid

from .pipeline_twostep import two_step

log = logging.getLogger(__name__)


class SampleGrid:
    def __init__(self, parts, n: int = 8):
        self.p = parts
        self.dir = Path(parts.run_dir) / "samples"
        self.dir.mkdir(parents=True, exist_ok=True)
        saved = self.dir / "prompts.json"
        self.prompts: list[str] = list(parts.cfg.sample_prompts) or (
            json.loads(saved.read_text())["prompts"] if saved.exists() else [])
        self.n = n
        self.size: tuple[int, int] | None = None
        self._teacher_rows: list[np.ndarray] | None = None

    def remember(self, batch: dict) -> None:
        """Take the image size (and, without configured prompts, the prompts) from the first batch."""
        if self.size is None:
            f = self.p.teacher.vae_scale_factor
            self.size = (batch["latent"].shape[-2] * f, batch["latent"].shape[-1] * f)
        if not self.prompts:
            self.prompts = list(batch["prompt"][:self.n])
            (self.dir / "prompts.json").write_text(json.dumps({"prompts": self.prompts}, indent=1))

    @torch.no_grad()
    def save(self, step: int) -> Path | None:
        if self.size is None or not self.prompts:
            return None
        teacher: Teacher = self.p.teacher
        seeds = [self.p.cfg.sample_seed + i for i in range(len(self.prompts))]
        h, w = self.size
        if self._teacher_rows is None:
            eight = teacher.generate(self.prompts, seeds, h, w).images
            naive = teacher.with_sampler(num_steps=2)
            self._teacher_rows = [eight, naive.generate(self.prompts, seeds, h, w).images]
        student = self.p.accelerator.unwrap_model(self.p.student)
        noise = teacher.make_noise(seeds, teacher.latent_shape(h, w)).to(teacher.device)
        caps = teacher.encode_prompts(self.prompts)
        with self.p.ema.applied(student) if self.p.ema is not None else nullcontext(), self.p.accelerator.autocast():
            _, _, x0 = two_step(lambda x, s: transformer_velocity(student.step_model(1), x, s, caps),
                                lambda x, s: transformer_velocity(student.step_model(2), x, s, caps),
                                noise, student.sigma_mid)
        rows = [self._teacher_rows[0], teacher.decode(x0.float()), self._teacher_rows[1]]
        image = grid(rows, scale=1)
        path = self.dir / f"step-{step:08d}.png"
        image.save(path)
        picture = np.asarray(image)
        for tracker in self.p.accelerator.trackers:
            if getattr(tracker, "name", "") == "tensorboard":
                tracker.writer.add_image("samples/teacher8_student2_naive2", picture, step, dataformats="HWC")
        log.info("samples (rows: teacher 8 steps, student 2 steps, teacher naive 2 steps): %s", path)
        return path
