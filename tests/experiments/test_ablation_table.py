"""The ablation's bookkeeping (experiments/ablation.py, toyruns.py) on made-up run records: the
overrides each variant trains with, the per-variant spread over seeds, and which differences from
``full`` it calls larger than the spread. No training here; the runs themselves are the benchmark."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import ablation
from toyruns import summarise


def _run(gap: float, seed: int) -> dict:
    s = {"fd_to_reference": 60 * (1 - gap) + 8, "paired_fd_to_teacher8": 5.0, "accuracy": {"all": 0.8},
         "recall": 0.95, "precision": 0.9, "omitted_tv": {"mean": 0.07}}
    return {"gap_closed": gap, "student2": s, "run": {"seed": seed, "diagnostics": {"disc/heldout_accuracy": 0.6}}}


def test_overrides_keep_parameters_equal_and_scale_each_configs_own_lr():
    config, ov = ablation.overrides("shared", 2, "R/*.tar", lr_scale=10)
    assert config == "toy" and "model.decoupled=false" in ov
    assert ov.index("model.lora_rank=4") > ov.index("model.lora_rank=2")  # the later override wins: 2R
    from twostep.trainer.config import load_config

    lrs = {v: next(x for x in ablation.overrides(v, 1, "R", 10)[1] if x.startswith("optim.lr="))
           for v in ("full", "adv_only")}
    assert float(lrs["full"].split("=")[1]) == pytest.approx(10 * load_config("toy").optim.lr)
    assert float(lrs["adv_only"].split("=")[1]) == pytest.approx(10 * load_config("toy_gan_only").optim.lr)
    assert not any(x.startswith("optim.lr=") for x in ablation.overrides("full", 1, "R")[1])


def test_differences_from_full_are_paired_by_seed_with_a_t_interval():
    # seeds differ by a shared offset; regress_only is 0.02 below full on every seed, shared is not
    results = {"full": [_run(0.95, 0), _run(0.98, 1), _run(0.92, 2)],
               "regress_only": [_run(0.93, 0), _run(0.961, 1), _run(0.899, 2)],
               "shared": [_run(0.97, 0), _run(0.96, 1), _run(0.92, 2)],
               "no_step1": [_run(0.80, 0)]}  # one seed: never called significant
    summary = summarise(results)
    assert summary["full"]["gap_closed"]["mean"] == pytest.approx(0.95)
    assert summary["full"]["gap_closed"]["sd"] == pytest.approx(0.03)
    # unpaired, regress_only's 0.02 would drown in the seeds' spread (sd 0.03); paired it does not
    rows = {r.split(" | ")[0].strip("| "): r.split(" | ") for r in ablation.differences(results).splitlines()[2:]}
    mean, hw = (float(x) for x in rows["regress_only"][2].split(" ± "))
    d = [-0.02, -0.019, -0.021]
    assert mean == pytest.approx(-0.020, abs=1e-3)
    assert hw == pytest.approx(4.303 * statistics.stdev(d) / 3**0.5, abs=1e-3)
    assert rows["regress_only"][4].startswith("yes")
    assert rows["shared"][4].startswith("no")  # +0.02, -0.02, 0.00
    assert rows["no_step1"][3] == "1" and rows["no_step1"][4].startswith("no")
    assert "full" not in rows
