"""Benchmark (CPU): the trainer at Z-Image's full width on this machine's CPU, a proxy of the GPU
run (docs/scaling.md, "A CPU proxy at full width").

A random Z-Image transformer at full width (dim 3840, 30 heads) but one main block and no refiner
blocks (``--layers``, ``--refiners``), a tiny text encoder and VAE, 64² images, batch 1, fp32. The
shipped full-size configs (``zimage_turbo_8gpu``, ``zimage_turbo_lora``) run through the real
``twostep train`` command, each run in its own process whose peak resident memory is read at its
end:

1. ``full``: 2 steps of the two full-parameter students with a checkpoint (AdamW ``--adamw``);
2. ``resume``: the same command to 3 steps, resumed from that checkpoint, with the export; the
   exported student is loaded with ``TwoStepZImagePipeline`` and sampled;
3. ``lora``: 2 steps of the LoRA students (rank ``--lora-rank``) with a checkpoint and the export;
4. ``adamw_*``: 1 step without a checkpoint per AdamW implementation, for their peak memory.

Each peak is compared with the model state computed from the parameter counts as the table of
docs/scaling.md counts it (full students: fp32 weights, gradients, AdamW m and v, EMA, 20 bytes a
parameter each; the frozen teacher, text encoder and VAE at 4 bytes here, fp32 on a CPU), above the
resident memory of a process that has imported the same libraries.

    python tests/benchmarks/bench_fullwidth_cpu.py                      # about 5 minutes, ~12 GB
    python tests/benchmarks/bench_fullwidth_cpu.py --layers 2 --runs full,resume
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gpu_common as gc
import torch

HERE = Path(__file__).resolve().parent
GB = 1e9
RUNS = ("full", "resume", "lora", "adamw")
# Runs a twostep command in this process and prints its peak resident memory: VmHWM, the high-water
# mark of this process's own memory since its exec (ru_maxrss would also count the pages of the
# parent it was forked from). Linux only.
HWM = "print('PEAK_RSS_KIB ' + [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0])\n"
PEAK = "import sys\nfrom twostep.cli import main\nrc = main(sys.argv[1:])\n" + HWM + "sys.exit(rc)\n"
BASELINE = ("import diffusers, transformers, accelerate, peft  # noqa: F401\n"
            "import twostep.trainer.loop  # noqa: F401\n" + HWM)


def run(code: str, argv: list[str], cwd: Path, timeout: float) -> dict:
    """``code`` in a fresh interpreter; its exit status, seconds, peak resident GB and output."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                       env={**os.environ, "PYTHONSAFEPATH": "1"})
    text = p.stdout + p.stderr
    peak = [ln.split()[1] for ln in text.splitlines() if ln.startswith("PEAK_RSS_KIB ")]
    return {"rc": p.returncode, "seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_gb": round(int(peak[-1]) * 1024 / GB, 2) if peak else None, "_text": text}


def param_counts(pipe) -> dict[str, int]:
    return {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in ("transformer", "text_encoder", "vae")}


def computed_gb(counts: dict[str, int], lora_params: int | None = None) -> dict[str, float]:
    """Model state as docs/scaling.md's table counts it, with every frozen part at fp32 (a CPU)."""
    n = counts["transformer"]
    frozen = 4 * (n + counts["text_encoder"] + counts["vae"])
    # full: two students' weights, gradients, AdamW m and v, EMA; LoRA: two fp32 frozen bases (here),
    # the adapters with theirs
    students = 2 * 20 * n if lora_params is None else 2 * 4 * n + 20 * lora_params
    return {"students": round(students / GB, 3), "frozen": round(frozen / GB, 3),
            "state": round((students + frozen) / GB, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=3840, help="transformer width (default 3840, Z-Image's)")
    ap.add_argument("--heads", type=int, default=30, help="attention heads (default 30, Z-Image's)")
    ap.add_argument("--layers", type=int, default=1, help="main transformer blocks (default 1)")
    ap.add_argument("--refiners", type=int, default=0, help="noise and caption refiner blocks each (default 0)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (default 64: 256 image tokens)")
    ap.add_argument("--lora-rank", type=int, default=64, help="rank of the LoRA run (default 64, the shipped config's)")
    ap.add_argument("--adamw", default="foreach,fused",
                    help="AdamW implementations of the full and adamw runs, comma-separated; the first is the "
                         "full run's (default foreach,fused)")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"which runs, comma-separated (default {','.join(RUNS)})")
    ap.add_argument("--timeout-s", type=float, default=900, help="limit of each training process (default 900)")
    ap.add_argument("--workdir", default=None, help="folder for the teacher, store and runs (default: a new temp folder)")
    ap.add_argument("--out", default=str(HERE / "results_fullwidth_cpu.json"), help="results JSON")
    args = ap.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        ap.error(f"--runs: unknown {bad}; choose from {list(RUNS)}")
    adamw = [x for x in args.adamw.split(",") if x]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="fullwidth-"))
    root.mkdir(parents=True, exist_ok=True)

    from bench_train_gpu import make_store

    from twostep.teacher.core import Teacher

    cfg = gc.arch_config("tiny", args.layers, args.dim, args.heads)
    cfg["transformer"]["n_refiner_layers"] = args.refiners
    t0 = time.perf_counter()
    pipe = gc.build_pipeline(cfg, torch.device("cpu"), torch.float32, args.size)
    counts = param_counts(pipe)
    pipe.save_pretrained(root / "teacher")
    store = make_store(Teacher(pipe, "fullwidth-cpu", device=torch.device("cpu")), root, 4, args.size)
    del pipe
    built_s = time.perf_counter() - t0
    print(f"built and saved the teacher ({counts['transformer'] / 1e6:.0f}M transformer parameters) and a "
          f"store of 4 samples in {built_s:.0f} s: {root}", flush=True)

    res: dict = {"device": f"cpu ({os.cpu_count()} cores)", "torch": torch.__version__,
                 "python": platform.python_version(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                 "command": shlex.join(["python", *sys.argv]),
                 "transformer": {k: cfg["transformer"][k] for k in ("dim", "n_heads", "n_layers", "n_refiner_layers")},
                 "size": args.size, "params": counts, "build_s": round(built_s, 1), "runs": {}}
    out = Path(args.out)

    def save() -> None:
        out.write_text(json.dumps(res, indent=1, default=str))

    base = run(BASELINE, [], root, 300)
    res["baseline_rss_gb"] = base["peak_rss_gb"]
    flags = ["train", "--teacher", str(root / "teacher"), "--data", store]
    over = ["data.batch_size=1", "data.num_workers=0", "data.heldout_fraction=0", "log_with=none", "sample_every=0",
            "mixed_precision='no'", "model.disc_layers=[]"]

    def record(name: str, r: dict, computed: dict, **extra) -> None:
        above = None if r["peak_rss_gb"] is None else round(r["peak_rss_gb"] - base["peak_rss_gb"], 2)
        res["runs"][name] = {k: v for k, v in r.items() if k != "_text"} | {
            "peak_above_baseline_gb": above, "computed": computed,
            "peak_over_computed_state": None if above is None else round(above / computed["state"], 3), **extra}
        if r["rc"] != 0:
            res["runs"][name]["tail"] = r["_text"][-3000:]
        print(f"{name}: exit {r['rc']} in {r['seconds']} s, peak {r['peak_rss_gb']} GB "
              f"({above} above the baseline; computed state {computed['state']} GB)", flush=True)
        save()

    full = computed_gb(counts)
    run_dir = root / "run"
    if "full" in runs or "resume" in runs:
        r = run(PEAK, [*flags, "--config", "zimage_turbo_8gpu", "--out", str(run_dir), *over, "max_steps=2",
                       "checkpoint_every=2", "export=false", f"optim.adamw={adamw[0]}"], root, args.timeout_s)
        ckpt = run_dir / "checkpoints" / "step-00000002"
        record("full", r, full, adamw=adamw[0], checkpoint=(ckpt / "progress.json").exists(),
               checkpoint_gb=round(sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / GB, 2)
               if ckpt.exists() else None)
    if "resume" in runs:
        r = run(PEAK, [*flags, "--config", "zimage_turbo_8gpu", "--out", str(run_dir), *over, "max_steps=3",
                       "checkpoint_every=2", "export=true", f"optim.adamw={adamw[0]}"], root, args.timeout_s)
        result = run_dir / "result.json"
        extra = {"resumed": "resumed from" in r["_text"] and "step-00000002" in r["_text"],
                 "final_step": json.loads(result.read_text())["step"] if result.exists() else None,
                 "exported": (run_dir / "student" / "model_index.json").exists()}
        if extra["exported"]:
            from twostep.trainer.pipeline_twostep import TwoStepZImagePipeline

            student = TwoStepZImagePipeline.from_pretrained(str(run_dir / "student"))
            lat = student(["a red cube"], height=args.size, width=args.size, output_type="latent").images
            extra["export_sample_finite"] = bool(torch.isfinite(lat).all())
            del student
        record("resume", r, full, **extra)
    if "lora" in runs:
        lora_dir = root / "run-lora"
        r = run(PEAK, [*flags, "--config", "zimage_turbo_lora", "--out", str(lora_dir), *over, "max_steps=2",
                       "checkpoint_every=2", "export=true", f"model.lora_rank={args.lora_rank}"], root, args.timeout_s)
        lora = [ln for ln in r["_text"].splitlines() if "trainable parameters" in ln]
        trainable = None
        if lora:  # "student: two parameter sets, 0.04M trainable parameters (LoRA rank 4)"
            trainable = int(float(lora[-1].split(" trainable")[0].split()[-1].rstrip("M")) * 1e6)
        record("lora", r, computed_gb(counts, trainable or 0), trainable_params=trainable,
               checkpoint=(lora_dir / "checkpoints" / "step-00000002" / "progress.json").exists(),
               exported=(lora_dir / "student" / "model_index.json").exists())
    if "adamw" in runs:
        for impl in adamw:
            r = run(PEAK, [*flags, "--config", "zimage_turbo_8gpu", "--out", str(root / f"run-{impl}"), *over,
                           "max_steps=1", "checkpoint_every=1000", "export=false", f"optim.adamw={impl}"], root, args.timeout_s)
            record(f"adamw_{impl}", r, full, adamw=impl)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    save()
    failed = [k for k, v in res["runs"].items() if v["rc"] != 0]
    print(f"results: {out}" + (f"; FAILED: {failed}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
