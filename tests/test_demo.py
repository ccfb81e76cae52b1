"""twostep demo wired end to end at a tiny size: toy prompts → local Ray generation → training → eval."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_runs_every_stage_and_reports(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "twostep.cli", "demo", "--out", str(out), "--prompts", "16", "--steps", "2",
           "--eval-samples", "8", "--num-workers", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    index = json.loads((out / "store" / "index.json").read_text())
    assert index["status"] == "complete" and index["samples"] == 16
    assert json.loads((out / "run" / "result.json").read_text())["step"] == 2
    assert (out / "run" / "student" / "model_index.json").exists()
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["n"] == 8 and set(metrics["demo_seconds"]) == {"prompts", "generation", "training", "eval"}
    report = (out / "eval" / "report.md").read_text()
    assert "student, 2 steps" in report and (out / "eval" / "grid.png").exists() and (out / "eval" / "metrics.png").exists()
    assert "twostep demo: done in" in done.stdout and "gap closed" in done.stdout and "unpaired" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("outputs:")  # the summary is what a user sees last
    logged = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged and all("disc/batch_accuracy" in r for r in logged)
    assert "disc/heldout_auc" in logged[-1]  # the held-out check ran at the last step
    # Running it again resumes: the store's shards are skipped, training is already at its last step.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "0 to do" in again.stderr or "2 committed already" in again.stderr
    # ... and the eval reads the teacher's sets from its cache: the same scores
    assert json.loads((out / "eval" / "metrics.json").read_text())["gap_closed"] == metrics["gap_closed"]
