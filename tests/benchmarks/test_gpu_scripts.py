"""The GPU script (tests/benchmarks/gpu_truth.py) run end to end on the CPU with the tiny
architecture, as its one command, with the packages the GPU machine lacks made unimportable: both
results files come out with every section, 8 transformer calls on every path, outputs equal to the
plain loop's, a training sweep, slope, LoRA step and a checkpoint-resume-export run; and
infra/capacity.py turns those files into its table (docs/gpu.md)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Importable here but not on the GPU machine (docs/gpu.md, "What the machine has"): the script
# must run without them. diffusers, webdataset and braceexpand travel there as wheels.
ABSENT_ON_GPU_MACHINE = ("ray", "datasets", "open_clip", "s3fs", "torchdata", "moto")
BLOCKER = f"""
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT_ON_GPU_MACHINE!r}:
            raise ImportError(f"{{name}} is not installed on the GPU machine")
sys.meta_path.insert(0, _Absent())
"""


@pytest.fixture(scope="module")
def truth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("truth")
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "benchmarks" / "gpu_truth.py"), "--tiny", "--out-dir", str(out)],
                       capture_output=True, text=True, timeout=1800, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return out


@pytest.mark.slow
def test_generation_results_have_every_section_and_eight_calls_per_path(truth):
    g = json.loads((truth / "results_generate_gpu.json").read_text())
    assert g["tiny"] and g["cpu_only"] and g["torch"] and g["device"].startswith("cpu")
    assert "gpu_truth.py --tiny" in g["command"] and "bench_generate_gpu.py" in g["part_command"]
    assert g["sections_done"] == ["outputs", "main", "profile", "transformer", "fastest", "compile", "sweep"]
    assert g["errors"] == {}
    assert g["transformer_calls_per_image"] == {"bare": 8, "teacher_path": 8, "worker": 8}
    assert g["outputs"]["ok"] and g["outputs"]["teacher_vs_bare_rel_rms"] <= g["tolerance_rel_rms"]
    assert g["median_bare"] > 0 and g["median_worker"] > 0
    assert g["ratio_worker_over_bare"] == pytest.approx(g["median_worker"] / g["median_bare"], rel=1e-3)
    # the profiled worker shard is one batch: its 8 transformer calls, one text encoding, one decode
    stages = g["profile"]["worker"]["ranges"]
    assert stages["teacher._guided_velocity"]["count"] == 8
    assert stages["teacher.encode_prompts"]["count"] == 1 and stages["teacher.decode"]["count"] == 1
    assert g["profile"]["bare"]["top_cpu"] and g["profile"]["bare"]["gpu_busy_s"] is None  # no GPU here
    assert (truth / "profile_generate.md").read_text().startswith("| operator |")
    assert all((truth / f"trace_generate_{p}.json.gz").stat().st_size > 0 for p in ("bare", "worker"))
    v = g["transformer"]["variants"]
    assert v["batched"]["s_per_call"] > 0 and v["stock"]["rel_rms_vs_batched"] <= g["tolerance_rel_rms"]
    assert "error" in v["sdpa_cudnn"]  # no cuDNN attention on a CPU: recorded, not fatal
    assert v["sdpa_flash"]["rel_rms_vs_batched"] <= g["tolerance_rel_rms"]
    comp = g["compile"]
    assert comp["ok"] and comp["rel_rms_vs_batched"] <= g["tolerance_rel_rms"] and comp["compile_s"] >= 0
    assert g["fastest"]["runs"]["default"]["rel_rms_vs_bare"] <= g["tolerance_rel_rms"]
    assert g["fastest_path"]["images_per_s"] > 0 and g["sweep"]["batches"]["4"]["s_per_call"] > 0


@pytest.mark.slow
def test_training_results_have_the_sweep_slope_lora_and_a_resumed_export(truth):
    t = json.loads((truth / "results_train_gpu.json").read_text())
    assert t["tiny"] and t["sections_done"] == ["sweep", "slope", "lora", "fsdp"] and t["errors"] == {}
    assert [(r["layers"], r["batch"]) for r in t["sweep"]] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all(r["step_s"] > 0 and r["skipped_steps"] == 0 for r in t["sweep"])
    # two students' trainable parameters grow with depth (the slope's premise)
    assert t["sweep"][2]["trainable_params"] > t["sweep"][0]["trainable_params"]
    for b in (1, 2):
        s = t["slope"][f"batch={b}"]
        assert s["from_layers"] == [1, 2] and "step_s_per_layer" in s and "peak_gib_per_layer" not in s  # no GPU
        if s["step_s_at_30"] > 0:  # CPU timings of a shared machine can slope either way
            assert s["fsdp8"]["images_per_s_per_node"] == pytest.approx(8 * b / s["step_s_at_30"], rel=1e-3)
        else:
            assert "fsdp8" not in s and "too noisy" in s["note"]
    assert t["lora"]["rank"] == 4 and t["lora"]["step_s"] > 0
    assert 0 < t["lora"]["trainable_params"] < t["sweep"][2]["trainable_params"]  # adapters only
    f = t["fsdp"]
    assert f["ok"] and f["checkpoint"] and f["resumed"] and f["final_step"] == 4 and f["export_sample_finite"]
    assert f["fsdp"] is False  # no FSDP on a CPU: the same command path, one process, unsharded


@pytest.mark.slow
def test_capacity_reads_both_results_files(truth, tiny_pipeline_dir):
    spec = importlib.util.spec_from_file_location("capacity", ROOT / "infra" / "capacity.py")
    cap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cap)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cap.main(["--pipeline", tiny_pipeline_dir, "--height", "64", "--width", "64", "--samples", "1000", "--json",
                  "--bench", str(truth / "results_generate_gpu.json"),
                  "--train-bench", str(truth / "results_train_gpu.json")])
    p = json.loads(buf.getvalue())
    g = json.loads((truth / "results_generate_gpu.json").read_text())
    assert p["measured"]["images_per_second"] == g["median_worker"]
    assert p["measured"]["gpu_hours"] == pytest.approx(1000 / g["median_worker"] / 3600)
    assert p["fastest"]["images_per_second"] == g["fastest_path"]["images_per_s"]
    rows = p["training"]["rows"]
    t = json.loads((truth / "results_train_gpu.json").read_text())
    usable = [b for b in (1, 2) if t["slope"][f"batch={b}"]["step_s_at_30"] > 0]  # see the training test
    assert [(r["kind"], r["batch_per_gpu"]) for r in rows] == [("full", b) for b in usable] + [("lora4", 1)]
    for r in rows[:-1]:
        assert r["images_per_s_per_node"] == pytest.approx(8 * r["batch_per_gpu"] / t["slope"][f"batch={r['batch_per_gpu']}"]["step_s_at_30"])
    assert rows[-1]["node_hours"] == pytest.approx(1000 / (8 / t["lora"]["step_s"]) / 3600)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cap.main(["--pipeline", tiny_pipeline_dir, "--height", "64", "--width", "64",
                  "--bench", str(truth / "results_generate_gpu.json"), "--train-bench", str(truth / "results_train_gpu.json")])
    table = buf.getvalue()
    assert "tiny CPU smoke run: not a capacity figure" in table and "samples/s per 8-GPU node" in table
