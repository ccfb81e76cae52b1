"""Benchmark: the exported 2-step student pipeline against the teacher's own 2-step path (toy teacher).

The student is the toy teacher exported in the two-transformer layout with its own transformer as
both ``transformer`` and ``transformer_2``, so both paths compute the same 2 steps (σ = 1 → 0.75 → 0)
on the same prompts and seeds: the exported folder loaded as a user loads it
(``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``, the folder's own
``pipeline_twostep.py`` and ``zimage_batched.py``) against ``Teacher.with_sampler(num_steps=2).generate``.
Each is timed on one batch, latents only (``output_type="latent"`` / ``decode=False``) and decoded to
images (``output_type="np"`` / ``decode=True``), after a warm-up call, in the order A B B A per repeat
(A = teacher, B = student); with ``--stock`` the same student forced onto the stock per-sample forward
(C, the exported pipeline as it was before it used the batched forward) joins as A B C C B A.
Reported: medians of images/s and the ratios to the teacher, plus the largest latent difference
between the paths (a check that they compute the same thing). Each timing is also counted per CPU
second of this process (all its threads): with ``--threads 1`` that figure hardly moves when other
processes share the cores, which the wall clock does (``cpu_share_min_median`` in the results shows
how much of its cores the process got).

    python tests/benchmarks/bench_student_pipeline.py [--batch 100] [--repeats 5] [--stock] [--device cpu]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def describe_device(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def git_state() -> dict:
    """The commit checked out and the tracked files that differ from it (``git status``)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=HERE, capture_output=True, text=True, check=True).stdout.rstrip("\n")

    try:
        changed = git("status", "--porcelain", "--untracked-files=no").splitlines()
        return {"commit": git("rev-parse", "--short", "HEAD"), "uncommitted": [ln[3:] for ln in changed]}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "uncommitted": None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=100, help="images per call, on both paths (default 100)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="A B B A rounds; each path is timed twice per round (default 5)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (default 64, the toy teacher's)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu); the dtype is the teacher's "
                    "default for it (bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--stock", action="store_true",
                    help="also time the student on the stock per-sample forward (order A B C C B A)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    ap.add_argument("--json", default=str(HERE / "results_student_pipeline.json"),
                    help="where to write the results (default tests/benchmarks/results_student_pipeline.json)")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-student-"))
    # The folder's pipeline code is copied here when loaded, not into the user's cache.
    os.environ["HF_MODULES_CACHE"] = str(tmp / "modules")

    import torch
    from diffusers import DiffusionPipeline

    from twostep.teacher.core import Teacher
    from twostep.toy.world import sample_toy_prompts
    from twostep.trainer.export import export_student

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    teacher = Teacher.load("toy", device=device)
    naive = teacher.with_sampler(num_steps=2)
    assert naive.sampler.sigmas == (1.0, 0.75, 0.0), naive.sampler.sigmas
    folder = export_student(tmp / "student", teacher.pipe, teacher.transformer, teacher.transformer)
    pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True, dtype=teacher.dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    module = sys.modules[type(pipe).__module__]
    supports_batched = module.supports_batched

    prompts = [r["prompt"] for r in sample_toy_prompts(args.batch, seed=0)]
    seeds = list(range(args.batch))
    h = w = args.size

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run_teacher(decode: bool):
        return naive.generate(prompts, seeds, h, w, decode=decode)

    def run_student(decode: bool):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]  # = seed_noise, per image
        return pipe(prompts, height=h, width=w, generator=gens, output_type="np" if decode else "latent").images

    def run_student_stock(decode: bool):
        module.supports_batched = lambda *a, **k: False
        try:
            return run_student(decode)
        finally:
            module.supports_batched = supports_batched

    cpu_shares: list[float] = []

    def timed(fn, decode: bool) -> tuple[float, float]:
        """images/s by the wall clock and per CPU second of this process (all its threads)."""
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        fn(decode)
        sync()
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        # CPU seconds per wall second and torch thread: near 1 when the cores were this process's
        # alone, lower when other processes took them (meaningful on CPU runs).
        cpu_shares.append(cpu / seconds / torch.get_num_threads())
        return args.batch / seconds, args.batch / cpu

    # Same computation on both paths, and the student on the batched forward.
    ref = run_teacher(False).latent
    batched = []
    real = module.batched_forward
    module.batched_forward = lambda model, *a, **k: batched.append(1) or real(model, *a, **k)
    got = run_student(False).cpu()
    module.batched_forward = real
    max_diff = float((got - ref).abs().max())
    fns = {"teacher": run_teacher, "student": run_student}
    if args.stock:
        fns["student_stock"] = run_student_stock
        max_diff_stock = float((run_student_stock(False).cpu() - ref).abs().max())
    for fn in fns.values():  # warm-up of the decode path
        fn(True)

    order = ["teacher", "student", "student", "teacher"]
    if args.stock:
        order = ["teacher", "student", "student_stock", "student_stock", "student", "teacher"]
    load_before = os.getloadavg()  # other processes on the machine would show here
    rates = {m: {n: [] for n in fns} for m in ("latent", "decoded")}  # wall clock
    cpu_rates = {m: {n: [] for n in fns} for m in ("latent", "decoded")}  # per CPU second
    for _ in range(args.repeats):
        for mode, decode in (("latent", False), ("decoded", True)):
            for name in order:
                wall, cpu = timed(fns[name], decode)
                rates[mode][name].append(round(wall, 2))
                cpu_rates[mode][name].append(round(cpu, 2))

    figures = {}
    for mode in rates:
        fig = figures[mode] = {}
        for unit, r in (("images_per_s", rates[mode]), ("images_per_cpu_s", cpu_rates[mode])):
            med = {n: statistics.median(v) for n, v in r.items()}
            fig.update({f"{n}_{unit}": round(v, 2) for n, v in med.items()})
            for n in med:
                if n != "teacher":
                    fig[f"ratio_{n}_over_teacher_{unit}"] = round(med[n] / med["teacher"], 3)
        fig["runs_images_per_s"], fig["runs_images_per_cpu_s"] = rates[mode], cpu_rates[mode]
    result = {
        "benchmark": "exported 2-step student pipeline vs the teacher's 2-step path, toy teacher",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        **git_state(),
        "device": describe_device(args.device),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "dtype": str(teacher.dtype).removeprefix("torch."),
        "batch": args.batch, "size": args.size, "repeats": args.repeats,
        "student_pipeline_module": type(pipe).__module__,
        "student_batched_forward_calls_per_batch": len(batched),
        "max_abs_latent_diff": max_diff,
        **({"max_abs_latent_diff_stock": max_diff_stock} if args.stock else {}),
        "order": " ".join(order),
        "cpu_share_min_median": [round(min(cpu_shares), 3), round(statistics.median(cpu_shares), 3)],
        "loadavg_1_5_15_before_after": [[round(v, 2) for v in load_before], [round(v, 2) for v in os.getloadavg()]],
        **figures,
    }
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
