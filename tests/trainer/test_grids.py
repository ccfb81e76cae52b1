"""The training grid on the shipped toy teacher: rows, prompts remembered across a resume, EMA applied."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from twostep.teacher.core import Teacher
from twostep.trainer.checkpoint import EMA
from twostep.trainer.grids import TrainingGrid
from twostep.trainer.student import TwoStepStudent

PROMPTS = ["a red circle", "a blue square on grey", "a small green triangle", "a yellow star, top left"]


@pytest.fixture(scope="module")
def parts():
    from accelerate import Accelerator

    teacher = Teacher.load("toy", device="cpu")
    student = TwoStepStudent(teacher.family, 0.75, decoupled=True)
    return teacher, student, Accelerator(cpu=True)


def _cells(path, rows: int, cols: int, side: int) -> np.ndarray:
    """(rows, cols, side, side, 3) images cut back out of a grid picture (2-px gutters, scale 1)."""
    a = np.asarray(Image.open(path).convert("RGB"))
    assert a.shape == (rows * (side + 2), cols * (side + 2), 3)
    return np.stack([np.stack([a[r * (side + 2):r * (side + 2) + side, c * (side + 2):c * (side + 2) + side]
                               for c in range(cols)]) for r in range(rows)])


def test_grid_rows_prompts_and_resume(parts, tmp_path):
    teacher, student, acc = parts
    g = TrainingGrid(tmp_path, teacher, student, 0.75, acc, seed=5, n=3)
    assert g.save(1) is None  # nothing to draw before the first batch
    c, h, w = teacher.latent_shape(64, 64)
    g.remember({"latent": torch.zeros(4, c, h, w), "prompt": PROMPTS})
    path = g.save(7)
    assert path == tmp_path / "samples" / "step-00000007.png"
    cells = _cells(path, 3, 3, 64)
    seeds = [5, 6, 7]
    np.testing.assert_array_equal(cells[0], teacher.generate(PROMPTS[:3], seeds, 64, 64).images)
    naive = teacher.with_sampler(num_steps=2).generate(PROMPTS[:3], seeds, 64, 64).images
    np.testing.assert_array_equal(cells[2], naive)
    assert json.loads((tmp_path / "samples" / "prompts.json").read_text())["prompts"] == PROMPTS[:3]

    # a resumed run with no configured prompts draws the remembered ones, not the new batch's
    again = TrainingGrid(tmp_path, teacher, student, 0.75, acc, seed=5, n=3)
    again.remember({"latent": torch.zeros(4, c, h, w), "prompt": PROMPTS[::-1]})
    assert again.prompts == PROMPTS[:3]
    np.testing.assert_array_equal(_cells(again.save(8), 3, 3, 64), cells)


def test_grid_draws_the_ema_weights_and_restores_the_raw_ones(parts, tmp_path):
    teacher, student, acc = parts
    c, h, w = teacher.latent_shape(64, 64)
    batch = {"latent": torch.zeros(2, c, h, w), "prompt": PROMPTS[:2]}
    raw = TrainingGrid(tmp_path / "raw", teacher, student, 0.75, acc, prompts=PROMPTS[:2])
    raw.remember(batch)
    ema = EMA(student, 0.99)
    for v in ema.shadow.values():  # EMA weights far from the raw ones
        v.mul_(0.5)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    smoothed = TrainingGrid(tmp_path / "ema", teacher, student, 0.75, acc, ema=ema, prompts=PROMPTS[:2])
    smoothed.remember(batch)
    a, b = _cells(raw.save(1), 3, 2, 64), _cells(smoothed.save(1), 3, 2, 64)
    np.testing.assert_array_equal(a[0], b[0])  # teacher rows do not depend on the student
    assert not np.array_equal(a[1], b[1])  # the student row was drawn with the EMA weights
    assert all(torch.equal(p, before[n]) for n, p in student.named_parameters())
