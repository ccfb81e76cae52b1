"""twostep eval on the toy world: a "student" that is the teacher's own transformer in both steps
must score exactly like the teacher's naive 2 steps (gap closed 0)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from twostep.eval import gap_closed


def test_gap_closed_formula():
    assert gap_closed(100.0, 100.0, 10.0) == 0.0
    assert gap_closed(10.0, 100.0, 10.0) == 1.0
    assert gap_closed(55.0, 100.0, 10.0) == pytest.approx(0.5)
    assert gap_closed(5.0, 5.0, 10.0) is None  # no gap to close


def test_naive_student_scores_like_the_naive_teacher(tmp_path):
    from twostep.pipeline.teacher import Teacher
    from twostep.trainer.export import export_student

    teacher = Teacher.load("toy", device="cpu")
    export_student(tmp_path / "naive", teacher.pipe, teacher.transformer, teacher.transformer)
    out = subprocess.run([sys.executable, "-m", "twostep.cli", "eval", "--student", str(tmp_path / "naive"),
                          "-n", "16", "--batch-size", "16", "--device", "cpu", "--out", str(tmp_path / "eval")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["n"] == 16 and (tmp_path / "eval" / "grid.png").exists()
    assert m["student2"]["accuracy"] == m["naive2"]["accuracy"]
    assert np.isclose(m["student2"]["fd_to_teacher8"], m["naive2"]["fd_to_teacher8"], rtol=1e-3)
    assert m["gap_closed"] is None or abs(m["gap_closed"]) < 1e-3
    assert "gap closed" in out.stdout
