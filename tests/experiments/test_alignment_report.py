"""The pre-registered alignment runs' bookkeeping (experiments/alignment.py) on made-up records:
trained − frozen paired by seed with its t interval, and the adversarial-only criteria per seed. No
training here; the runs themselves are the experiment."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import alignment


def _rec(arm: str, seed: int, gap: float, tv: float, named: float = 0.8, recall: float = 0.95) -> dict:
    side = {"fd_to_reference": [60.0, 61.0], "omitted_tv": 0.18, "all_named_right": 0.70, "recall": 0.94}
    return {"arm": arm, "seed": seed, "steps": 250, "train_seconds": 1.0, "gap_closed": [gap, gap + 0.01],
            "gap_closed_mean": gap + 0.005, "fd_to_reference": [9.0, 9.5], "omitted_tv": tv, "all_named_right": named,
            "recall": recall, "naive2": side, "teacher8": {**side, "fd_to_reference": [7.0, 7.1]},
            "diagnostics": {"disc/heldout_auc": 0.6}}


def _rows(text: str, header: str) -> dict[str, list[str]]:
    block = next(b for b in text.split("\n\n") if b.startswith(header))
    return {r.split(" | ")[0].strip("| "): [c.strip(" |") for c in r.split(" | ")] for r in block.splitlines()[2:]}


def test_trained_minus_frozen_is_paired_by_seed():
    # the seeds move both arms together; trained is 0.01 above frozen on every seed (±0.001)
    base = [0.90, 0.96, 0.93, 0.99, 0.91]
    recs = {"trained": [_rec("trained", s, g + 0.01 + 0.001 * (s % 2), 0.07) for s, g in enumerate(base)],
            "frozen": [_rec("frozen", s, g, 0.07 + 0.002 * (s % 2)) for s, g in enumerate(base)]}
    rows = _rows(alignment.report(recs), "| metric")
    mean, hw = (float(x) for x in rows["gap closed mean"][1].split(" ± "))
    assert mean == pytest.approx(0.0104, abs=1e-4) and hw < 0.002 and rows["gap closed mean"][3] == "yes"
    mean, hw = (float(x) for x in rows["omitted tv"][1].split(" ± "))
    assert mean == pytest.approx(-0.0008, abs=1e-4) and rows["omitted tv"][3] == "no"  # within its spread
    # a seed that only one arm has is left out of the pairs
    recs["trained"].append(_rec("trained", 99, 0.5, 0.2))
    assert _rows(alignment.report(recs), "| metric")["gap closed mean"][2] == "5"


def test_adversarial_only_criteria_per_seed():
    recs = {"gan_only": [_rec("gan_only", 1, 0.65, 0.12), _rec("gan_only", 2, 0.65, 0.15),
                         _rec("gan_only", 3, 0.59, 0.10), _rec("gan_only", 4, 0.7, 0.1, recall=0.9)]}
    rows = _rows(alignment.report(recs), "| seed")
    assert rows["1"][1:] == ["yes", "yes", "yes", "yes", "yes"]
    assert rows["2"][2] == "no" and rows["2"][5] == "no"       # omitted TV 0.15 > 0.14
    assert rows["3"][1] == "no"                                 # gap closed 0.59 on reference 1
    assert rows["4"][4] == "no" and rows["4"][5] == "no"        # recall below naive's
