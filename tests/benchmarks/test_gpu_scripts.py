"""The GPU script (tests/benchmarks/gpu_truth.py) run end to end on the CPU with the tiny
architecture, as its one command and as the GPU machine runs it: the project from its wheel
installed into a target folder on PYTHONPATH (no editable install), from the repository root, the
FSDP section under ``accelerate launch``, and the packages the GPU machine lacks made
unimportable. The preflight passes; both results files come out with every section in order, 8
transformer calls on every path, outputs equal to the plain loop's, the worker variants, the
student pipeline, a training sweep smallest first, slope, LoRA step, the AdamW comparison and a
checkpoint-resume-export run; infra/capacity.py turns those files into its table; and under a
short deadline every section is done or recorded as skipped for time (docs/gpu.md)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Importable here but not on the GPU machine (docs/gpu.md, "What the machine has"): the script
# must run without them. diffusers, webdataset and braceexpand travel there as wheels.
ABSENT_ON_GPU_MACHINE = ("ray", "datasets", "open_clip", "s3fs", "torchdata", "moto")
# ... and the project is not installed there, editable or otherwise: it comes from a wheel in a
# --target folder on PYTHONPATH. The editable install's finder is removed so that only that folder
# (or, wrongly, a twostep/ folder of the current directory) can answer.
BLOCKER = f"""
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT_ON_GPU_MACHINE!r}:
            raise ImportError(f"{{name}} is not installed on the GPU machine")
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.meta_path.insert(0, _Absent())
"""
IGNORED = shutil.ignore_patterns(".git", ".venv", "runs", "out", "build", "*.egg-info", "__pycache__", ".whl")


@pytest.fixture(scope="module")
def device_env(tmp_path_factory) -> dict[str, str]:
    """The GPU machine's environment: the project's wheel (built from a copy of this tree)
    installed with ``pip install --target``, that folder and the blocker on PYTHONPATH."""
    tmp = tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, tmp / "src", ignore=IGNORED)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "whl"), str(tmp / "src")], check=True, capture_output=True, timeout=300)
    wheels = list((tmp / "whl").glob("twostep-*.whl"))
    assert len(wheels) == 1, wheels
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(tmp / "site"), str(wheels[0])], check=True, capture_output=True, timeout=300)
    (tmp / "block").mkdir()
    (tmp / "block" / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": f"{tmp / 'block'}{os.pathsep}{tmp / 'site'}", "SITE": str(tmp / "site")}


def test_the_repository_root_shadows_the_installed_package_under_dash_m(device_env):
    """Why the FSDP section runs elsewhere: ``python -m`` from the repository root imports the
    root's partial twostep/ folder, which lacks the subpackages; from another folder (or with
    PYTHONSAFEPATH) the wheel's package answers."""
    probe = [sys.executable, "-m", "twostep.cli", "train", "--help"]
    shadowed = subprocess.run(probe, capture_output=True, text=True, timeout=120, cwd=ROOT, env=device_env)
    assert shadowed.returncode != 0 and "No module named 'twostep." in shadowed.stderr
    safe = subprocess.run(probe, capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**device_env, "PYTHONSAFEPATH": "1"})
    assert safe.returncode == 0 and "usage" in safe.stdout, safe.stderr[-2000:]


@pytest.fixture(scope="module")
def truth(tmp_path_factory, device_env) -> Path:
    out = tmp_path_factory.mktemp("truth")
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "benchmarks" / "gpu_truth.py"), "--tiny", "--out-dir", str(out),
                        "--train-args", "--fsdp-launcher accelerate"],
                       capture_output=True, text=True, timeout=1800, env=device_env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return out


@pytest.mark.slow
def test_preflight_passes_with_the_project_from_the_target_folder(truth, device_env):
    p = json.loads((truth / "preflight.json").read_text())
    assert p["ok"] and p["failed"] == {} and set(p["check_s"]) == {"imports", "device", "cli", "diffusers"}
    assert p["imports"]["twostep.pipeline.worker"]["file"].startswith(device_env["SITE"])
    assert p["device"]["cuda"] is False and p["cli"] == {"--help": "ok", "train --help": "ok"}
    assert "[preflight] passed" in (truth / "gpu_truth.log").read_text()


@pytest.mark.slow
def test_generation_results_have_every_section_and_eight_calls_per_path(truth):
    g = json.loads((truth / "results_generate_gpu.json").read_text())
    assert g["tiny"] and g["cpu_only"] and g["torch"] and g["device"].startswith("cpu")
    assert "gpu_truth.py --tiny" in g["command"] and "bench_generate_gpu.py" in g["part_command"]
    assert g["sections_done"] == ["outputs", "main", "transformer", "fastest", "student", "variants", "sweep", "profile",
                                  "compile"]
    assert g["errors"] == {}
    assert g["transformer_calls_per_image"] == {"bare": 8, "teacher_path": 8, "worker": 8}
    assert g["outputs"]["ok"] and g["outputs"]["teacher_vs_bare_rel_rms"] <= g["tolerance_rel_rms"]
    assert g["median_bare"] > 0 and g["median_worker"] > 0
    assert g["ratio_worker_over_bare"] == pytest.approx(g["median_worker"] / g["median_bare"], rel=1e-3)
    # shards of 2 batches; the loop and the worker A B B A, the two variants C D D C, fresh rows each
    assert g["batches_per_shard"] == 2 and g["main_order"] == ["bare", "worker", "worker", "bare"]
    assert g["variants_order"] == ["worker_images_off", "worker_held", "worker_held", "worker_images_off"]
    assert len(g["main"]["bare_images_per_s"]) == 2 and len(g["main"]["worker"]) == 2
    assert {k: len(v) for k, v in g["variants"]["runs"].items()} == {"worker_images_off": 2, "worker_held": 2}
    assert set(g["variants"]["transformer_calls_per_batch"].values()) == {8}
    for k, v in g["worker_variants"].items():
        assert v["ratio_over_bare"] == pytest.approx(v["median_images_per_s"] / g["median_bare"], rel=1e-3), k
        assert v["ratio_over_worker"] == pytest.approx(v["median_images_per_s"] / g["median_worker"], rel=1e-3), k
    s = g["student"]
    assert s["transformer_calls_per_batch"] == 2 and len(s["student_images_per_s"]) == 2 and s["goal"] == 3.8
    assert g["student_over_teacher8"] == s["ratio"] > 1  # 2 transformer calls against 8, even on a CPU
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
    assert t["tiny"] and t["sections_done"] == ["sweep", "slope", "fsdp", "lora", "adamw"] and t["errors"] == {}
    assert [(r["layers"], r["batch"]) for r in t["sweep"]] == [(1, 1), (2, 1), (1, 2), (2, 2)]  # smallest first
    assert all(r["step_s"] > 0 and r["skipped_steps"] == 0 for r in t["sweep"])
    # two students' trainable parameters grow with depth (the slope's premise)
    assert t["sweep"][1]["trainable_params"] > t["sweep"][0]["trainable_params"]
    for b in (1, 2):
        s = t["slope"][f"batch={b}"]
        assert s["from_layers"] == [1, 2] and "step_s_per_layer" in s and "peak_gib_per_layer" not in s  # no GPU
        if s["step_s_at_30"] > 0:  # CPU timings of a shared machine can slope either way
            assert s["fsdp8"]["images_per_s_per_node"] == pytest.approx(8 * b / s["step_s_at_30"], rel=1e-3)
        else:
            assert "fsdp8" not in s and "too noisy" in s["note"]
    assert t["lora"]["rank"] == 4 and t["lora"]["step_s"] > 0
    assert 0 < t["lora"]["trainable_params"] < t["sweep"][1]["trainable_params"]  # adapters only
    f = t["fsdp"]
    assert f["launcher"] == "accelerate" and f["first"]["rc"] == 0 and f["second"]["rc"] == 0
    assert f["ok"] and f["checkpoint"] and f["resumed"] and f["final_step"] == 4 and f["export_sample_finite"]
    assert f["fsdp"] is False  # no FSDP on a CPU: the same command path, one process, unsharded
    adam = t["adamw"]
    assert set(adam["runs"]) == {"fused", "foreach", "loop"} and all(r["step_s"] > 0 for r in adam["runs"].values())
    assert adam["fastest"] in adam["runs"] and (adam["layers"], adam["batch"]) == (1, 1)


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


@pytest.mark.slow
def test_one_deadline_bounds_the_whole_command_and_every_section_is_accounted_for(tmp_path):
    """Under a deadline too short for everything, the command ends in time, and every section is
    done, recorded as skipped for time, or skipped for a missing section it needs."""
    import time

    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "benchmarks" / "gpu_truth.py"), "--tiny", "--no-preflight",
                        "--deadline-s", "20", "--grace-s", "10", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    wall = time.monotonic() - t0
    assert r.returncode in (0, 1), r.stdout[-3000:] + r.stderr[-3000:]
    assert wall < 20 + 2 * 10 + 15  # the deadline, each part's grace, interpreter starts
    every = {"results_generate_gpu.json": ["outputs", "main", "transformer", "fastest", "student", "variants", "sweep",
                                           "profile", "compile"],
             "results_train_gpu.json": ["sweep", "slope", "fsdp", "lora", "adamw"]}
    for name, sections in every.items():
        d = json.loads((tmp_path / name).read_text())
        accounted = d["sections_done"] + d.get("skipped_for_time", []) + d.get("skipped", []) + list(d["errors"]) \
            + d.get("killed", {}).get("unfinished", [])
        assert sorted(accounted) == sorted(sections) == sorted(d["sections_planned"]), (name, accounted)
        assert d.get("skipped_for_time") or d.get("killed"), name  # too short for everything: the deadline acted
