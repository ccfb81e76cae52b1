"""Benchmark (GPU): the trainer's step at full Z-Image width, and the FSDP path end to end
(docs/gpu.md).

1. ``sweep``: the shipped Z-Image-Turbo student config (``zimage_turbo_8gpu``: two full-parameter
   students, AdamW, EMA, discriminator heads on the frozen teacher, bf16, gradient checkpointing)
   at full width (dim 3840, 30 heads) and reduced depth (``--depths``: 1 and 2 of 30 blocks on a
   card under 100 GiB, 2 and 4 on a larger one), 1024² (128×128 latents), batch 1, 2 and 4 on one
   GPU, smallest points first (batch by batch, depth by depth), so a point that runs out of memory
   or time ends the sweep with the smaller points measured. The real ``setup`` /
   ``generator_step`` / ``discriminator_step`` / EMA update of ``twostep.trainer.loop`` run on a
   store the real ``ShardWorker`` wrote with the same random teacher. Per point: seconds per step,
   peak memory, and the model state left between steps.
2. ``slope``: per-layer slopes of those figures and their extrapolation to 30 layers; an 8-GPU
   FSDP estimate from them (sharded student state + replicated teacher and text encoder +
   measured activations) and the training throughput of one 8-GPU node.
3. ``fsdp``: ``accelerate launch`` with the 8-GPU FSDP config as one process, on a small model:
   two steps, a checkpoint, a resume to four steps, an export, and the exported student loaded
   and sampled. The launch runs from a temporary folder with ``PYTHONSAFEPATH=1``: ``-m`` would
   otherwise put the current folder first on ``sys.path``, and a repository root's partial
   ``twostep/`` folder would shadow the installed package.
4. ``lora``: one full-depth LoRA (rank 64, ``zimage_turbo_lora``) step: time and peak memory.
5. ``adamw``: the smallest sweep point once per AdamW implementation (``optim.adamw``: fused,
   foreach, loop): step time and peak memory of each.

Every section starts only while the deadline (``--budget-s`` or ``--deadline-at``) leaves it time,
and one that fails is recorded in ``errors`` while the others go on.

    python tests/benchmarks/bench_train_gpu.py --out results_train_gpu.json
    python tests/benchmarks/bench_train_gpu.py --tiny --out /tmp/train.json       # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc as pygc
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import gpu_common as gc
import torch

ROOT = Path(__file__).resolve().parents[2]
FULL_DEPTH = 30
PRESETS = {  # every value is also a flag; --tiny swaps the whole set
    "full": dict(arch="full", device="cuda", size=1024, depths=None, batches="1,2,4", steps=3, warmup=1,
                 lora_rank=64, lora_layers=FULL_DEPTH, lora_batch=1, fsdp_dim=256, fsdp_heads=4, fsdp_layers=4,
                 fsdp_size=128, fsdp_launcher="accelerate", fsdp_need_s=60, adamw="fused,foreach,loop"),
    "tiny": dict(arch="tiny", device="cpu", size=64, depths="1,2", batches="1,2", steps=1, warmup=1,
                 lora_rank=4, lora_layers=2, lora_batch=1, fsdp_dim=64, fsdp_heads=2, fsdp_layers=2,
                 fsdp_size=64, fsdp_launcher="inprocess", fsdp_need_s=0, adamw="fused,foreach,loop"),
}
# Two fp32 students with AdamW, EMA and gradients are about 7 GiB per full-width layer (docs/scaling.md):
# depth 4 with its activations does not fit an 80 GB card, depth 2 does.
DEPTHS_BY_MEMORY = ((100.0, "1,2"), (float("inf"), "2,4"))
GIB = 2**30


def make_store(teacher, root: Path, samples: int, size: int) -> str:
    """A real store (ShardWorker shards + index.json) of ``samples`` teacher samples with ``mid``."""
    from twostep.pipeline.job import write_index
    from twostep.pipeline.worker import ShardWorker, WorkerConfig

    path, _, _ = gc.manifest(root / "manifest.parquet", samples, size)
    w = ShardWorker(WorkerConfig(store_url=str(root / "store"), manifest=path, teacher="-", shard_size=samples,
                                 batch_size=min(samples, 4), image_format="none", save=("mid",)), teacher=teacher)
    w.run(0, "bench")
    write_index(w.store, "bench", {"shard_size": samples, "manifest_hash": "bench", "save": ["mid"],
                                   "image_format": "none"}, 1, w.describe(), 0.0, {})
    return str(root / "store")


def fit_disc_layers(config: str, layers: int) -> list[str]:
    """``model.disc_layers=[]`` (evenly spaced) when the config's layers do not exist at this depth."""
    from twostep.trainer.config import load_config

    taps = load_config(config).model.disc_layers
    return ["model.disc_layers=[]"] if taps and max(taps) >= layers else []


def measure(teacher, config: str, overrides: list[str], warmup: int, steps: int) -> dict:
    """Seconds per training step (generator + discriminator update + EMA), peak memory and the
    model state between steps, through the trainer's own setup and step functions."""
    from accelerate.state import AcceleratorState

    from twostep.teacher.core import Teacher
    from twostep.trainer.config import load_config
    from twostep.trainer.loop import discriminator_step, generator_step, setup

    cfg = load_config(config, ["log_with=none", "data.num_workers=0", *overrides])
    with mock.patch.object(Teacher, "load", lambda *a, **k: teacher):  # the in-memory random teacher
        p = setup(cfg, tempfile.mkdtemp(prefix="bench-train-"))
    try:
        batches, times, skipped = iter(p.loader), [], 0
        for i in range(warmup + steps):
            if i == warmup:
                state = gc.allocated_gib()  # weights, AdamW state and EMA: what stays between steps
                gc.reset_peak()
            batch = {k: v.to(p.accelerator.device) if torch.is_tensor(v) else v for k, v in next(batches).items()}
            gc.sync()
            t0 = time.perf_counter()
            caps = p.teacher.encode_prompts(batch["prompt"])
            g = generator_step(p, batch, caps, i, log_now=False)
            if g.fakes is not None:
                discriminator_step(p, batch, caps, i, g.fakes)
                if p.ema is not None:
                    p.ema.update(p.accelerator.unwrap_model(p.student), i)
            gc.sync()
            times.append(time.perf_counter() - t0)
            skipped += int(g.skipped)
        student = p.accelerator.unwrap_model(p.student)
        trainable = sum(x.numel() for x in student.parameters() if x.requires_grad)
    finally:
        del p
        pygc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        AcceleratorState._reset_state(True)
    timed = times[warmup:]
    peak = gc.peak_gib()
    return {"step_s": round(sorted(timed)[len(timed) // 2], 4), "step_s_all": [round(t, 4) for t in times],
            "peak_gib": peak, "state_gib": state, "activation_gib": None if peak is None else round(peak - state, 2),
            "trainable_params": trainable, "skipped_steps": skipped}


def with_depth(c: SimpleNamespace, layers: int):
    """The shared pipeline with a fresh random transformer of ``layers`` blocks, as a Teacher."""
    from twostep.teacher.core import Teacher

    c.pipe.transformer = None
    pygc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    cfg = gc.arch_config(c.args.arch, layers, c.args.dim, c.args.heads)
    c.pipe.transformer = gc.build_transformer(cfg, c.device, c.dtype)
    return Teacher(c.pipe, name=f"random-zimage-{c.args.arch}-{layers}", device=c.device)


def ensure_store(c: SimpleNamespace, teacher) -> None:
    """One store for every point (the latents do not depend on the depth), made on first use."""
    if c.store is None:
        c.store = make_store(teacher, c.tmp, max(8, 2 * max(c.args.batches), 2 * c.args.lora_batch), c.args.size)


def teacher_at(c: SimpleNamespace, layers: int):
    """The teacher with ``layers`` blocks, rebuilt only when the depth changes."""
    if getattr(c, "teacher_layers", None) != layers:
        c.teacher = None  # the old transformer is freed before the new one is built
        c.teacher, c.teacher_layers = with_depth(c, layers), layers
    return c.teacher


def section_sweep(c: SimpleNamespace) -> None:
    """Smallest points first: batch by batch, each at every depth (the slope needs two depths at one
    batch). A point that fails (out of memory) ends that batch and every larger one."""
    a, rows, failed = c.args, [], False
    for b in a.batches:
        for layers in a.depths:
            if failed or not gc.budget_left(c.deadline, 20):
                rows.append({"layers": layers, "batch": b, "skipped": "an earlier point failed" if failed else "time budget"})
                continue
            teacher = teacher_at(c, layers)
            ensure_store(c, teacher)
            over = [f"data.data={c.store}", f"data.batch_size={b}", *c.mp, *fit_disc_layers(a.config, layers)]
            try:
                r = measure(teacher, a.config, over, a.warmup, a.steps)
            except Exception as e:  # out of memory at a large point, say: recorded, the smaller ones stand
                r = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"}
                failed = True
            rows.append({"layers": layers, "batch": b, **r})
            print(f"train {layers} layers, batch {b}: {r}", flush=True)
            c.res.data["sweep"] = rows
            c.res.write()
    c.res.section("sweep", rows)


def section_adamw(c: SimpleNamespace) -> None:
    """The smallest sweep point once per AdamW implementation: step time and peak memory."""
    a, out = c.args, {}
    layers, b = a.depths[0], a.batches[0]
    teacher = teacher_at(c, layers)
    ensure_store(c, teacher)
    for impl in a.adamw:
        if not gc.budget_left(c.deadline, 20):
            out[impl] = {"skipped": "time budget"}
            continue
        over = [f"data.data={c.store}", f"data.batch_size={b}", f"optim.adamw={impl}", *c.mp,
                *fit_disc_layers(a.config, layers)]
        try:
            r = measure(teacher, a.config, over, a.warmup, a.steps)
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"}
        out[impl] = {k: r.get(k) for k in ("step_s", "peak_gib", "state_gib", "activation_gib", "error") if k in r}
        print(f"AdamW {impl}, {layers} layers, batch {b}: {out[impl]}", flush=True)
    done = {k: v for k, v in out.items() if "step_s" in v}
    best = {}
    if done:
        best["fastest"] = min(done, key=lambda k: done[k]["step_s"])
        if all(v.get("peak_gib") is not None for v in done.values()):
            best["least_memory"] = min(done, key=lambda k: done[k]["peak_gib"])
    c.res.section("adamw", {"layers": layers, "batch": b, "runs": out, **best})


def param_gib(layers: int, c: SimpleNamespace) -> dict[str, float]:
    """Model state in GiB computed from parameter counts: full-parameter students as trained here
    (fp32 weights, grads, AdamW m and v, EMA: 20 bytes/parameter, two students), frozen teacher
    and text encoder in the run's dtype."""
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        t = ZImageTransformer2DModel(**gc.arch_config(c.args.arch, layers, c.args.dim, c.args.heads)["transformer"])
    n = sum(p.numel() for p in t.parameters())
    te = sum(p.numel() for p in c.pipe.text_encoder.parameters())
    item = torch.finfo(c.dtype).bits // 8
    return {"students": round(2 * 20 * n / GIB, 2), "teacher": round(item * n / GIB, 2),
            "text_encoder": round(item * te / GIB, 2), "transformer_params": n}


def section_slope(c: SimpleNamespace) -> None:
    """Per-layer slopes between the two deepest measured depths, extrapolated to 30 layers."""
    a, out = c.args, {}
    full = param_gib(FULL_DEPTH, c)
    for b in a.batches:
        pts = {r["layers"]: r for r in c.res.data["sweep"] if r["batch"] == b and "step_s" in r}
        if len(pts) < 2:
            continue
        (l1, r1), (l2, r2) = sorted(pts.items())[-2:]
        row = {"from_layers": [l1, l2]}
        for k in ("step_s", "peak_gib", "state_gib", "activation_gib"):
            if r1.get(k) is None or r2.get(k) is None:
                continue
            slope = (r2[k] - r1[k]) / (l2 - l1)
            row[f"{k}_per_layer"] = round(slope, 4)
            row[f"{k}_at_{FULL_DEPTH}"] = round(r2[k] + slope * (FULL_DEPTH - l2), 3)
        at30 = row.get(f"step_s_at_{FULL_DEPTH}")
        if not at30 or at30 <= 0:  # timings too noisy to extrapolate (a CPU smoke run shares its cores)
            row["note"] = "no positive extrapolated step time: timings too noisy"
            out[f"batch={b}"] = row
            continue
        row["images_per_s_one_gpu_at_30"] = round(b / at30, 4)
        act = row.get(f"activation_gib_at_{FULL_DEPTH}")
        per_gpu = full["students"] / 8 + full["teacher"] + full["text_encoder"] + (act or 0.0)
        row["fsdp8"] = {"per_gpu_gib_estimate": round(per_gpu, 1), "images_per_s_per_node": round(8 * b / at30, 4),
                        "note": "FSDP communication not included: a lower bound on the step time"}
        out[f"batch={b}"] = row
    c.res.section("slope", {"computed_state_gib_at_30": full, **out})


def section_lora(c: SimpleNamespace) -> None:
    a = c.args
    teacher = teacher_at(c, a.lora_layers)
    ensure_store(c, teacher)
    over = [f"data.data={c.store}", f"data.batch_size={a.lora_batch}", f"model.lora_rank={a.lora_rank}", *c.mp,
            *fit_disc_layers(a.lora_config, a.lora_layers)]
    r = measure(teacher, a.lora_config, over, a.warmup, max(1, a.steps - 1))
    c.res.section("lora", {"layers": a.lora_layers, "rank": a.lora_rank, "batch": a.lora_batch, **r})
    print(f"LoRA step, {a.lora_layers} layers: {r}", flush=True)


def run_cli(c: SimpleNamespace, argv: list[str]) -> dict:
    """``twostep train ARGV`` through the chosen launcher; returns exit code, seconds, output tail."""
    a = c.args
    t0 = time.perf_counter()
    if a.fsdp_launcher == "inprocess":  # CPU smoke runs: no launcher, no second interpreter start
        from twostep.cli import main as cli_main

        seen: list[str] = []
        handler = logging.Handler(logging.INFO)
        handler.emit = lambda rec: seen.append(rec.getMessage())
        logging.getLogger("twostep").addHandler(handler)
        try:
            rc = cli_main(["train", *argv])
        finally:
            logging.getLogger("twostep").removeHandler(handler)
        text = "\n".join(seen)
    else:
        cmd = [sys.executable, "-m", "twostep.cli", "train", *argv]
        if a.fsdp_launcher == "accelerate":
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "trainer" / "configs" / "accelerate" / "fsdp_8gpu.yaml"), "--num_processes", "1",
                   "--num_machines", "1", "--main_process_port", "29517", "-m", "twostep.cli", "train", *argv]
        # -m puts the current folder first on sys.path: from a repository root its partial twostep/
        # folder would shadow the installed package. Another folder, and PYTHONSAFEPATH for both
        # interpreters (the launcher's and the trainer's).
        env = {**os.environ, "PYTHONSAFEPATH": "1"}
        limit = max(1.0, min(a.fsdp_timeout_s, gc.seconds_left(c.deadline)))
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=c.tmp, env=env)
            rc, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = 124, f"{(e.stdout or b'').decode(errors='replace')}{(e.stderr or b'').decode(errors='replace')}" \
                f"\nstopped at its {limit:.0f} s limit"
    errors = [ln.strip()[:300] for ln in text.splitlines() if "Error" in ln or "error:" in ln]
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "error_lines": errors[-8:], "tail": text[-3000:],
            "_text": text}


def section_fsdp(c: SimpleNamespace) -> None:
    """Two steps and a checkpoint, then the same command resumed to four steps with an export,
    then the exported student loaded and sampled: the full-size FSDP path on a small model."""
    import json

    from twostep.teacher.core import Teacher
    from twostep.trainer.pipeline_twostep import TwoStepZImagePipeline

    a = c.args
    root = Path(tempfile.mkdtemp(prefix="bench-fsdp-"))
    cfg = gc.arch_config("tiny", None, a.fsdp_dim, a.fsdp_heads)  # small text encoder and VAE
    cfg["transformer"]["n_layers"] = a.fsdp_layers
    pipe = gc.build_pipeline(cfg, torch.device("cpu"), torch.float32, a.fsdp_size)
    pipe.save_pretrained(root / "teacher")
    store = make_store(Teacher(pipe, "fsdp-bench", device=torch.device("cpu")), root, 8, a.fsdp_size)
    run = root / "run"
    common = ["--config", a.config, "--teacher", str(root / "teacher"), "--data", store, "--out", str(run),
              "data.batch_size=2", "data.num_workers=0", "log_with=none", "sample_every=0", "checkpoint_every=2",
              "model.disc_layers=[]", *c.mp]
    first = run_cli(c, [*common, "max_steps=2", "export=false"])
    ckpt = run / "checkpoints" / "step-00000002"
    out = {"launcher": a.fsdp_launcher, "model": {"dim": a.fsdp_dim, "layers": a.fsdp_layers, "size": a.fsdp_size},
           "first": {k: v for k, v in first.items() if k != "_text"},
           "checkpoint": ckpt.joinpath("progress.json").exists(),
           "ema_per_rank": ckpt.joinpath("ema-rank0.safetensors").exists()}
    if first["rc"] == 0:
        second = run_cli(c, [*common, "max_steps=4", "export=true"])
        out["second"] = {k: v for k, v in second.items() if k != "_text"}
        out["resumed"] = "resumed from" in second["_text"] and str(ckpt.name) in second["_text"]
        result = run / "result.json"
        out["final_step"] = json.loads(result.read_text())["step"] if result.exists() else None
        student = run / "student"
        out["exported"] = student.joinpath("model_index.json").exists()
        if out["exported"]:
            pipe2 = TwoStepZImagePipeline.from_pretrained(str(student))
            img = pipe2(["a red cube"], height=a.fsdp_size, width=a.fsdp_size, output_type="latent").images
            out["export_sample_finite"] = bool(torch.isfinite(img).all())
    # FSDP shards the EMA per rank: its files are the evidence the FSDP branch ran, not plain DDP/NO
    out["fsdp"] = out["ema_per_rank"]
    out["ok"] = bool(first["rc"] == 0 and out.get("second", {}).get("rc") == 0 and out["checkpoint"]
                     and out.get("resumed") and out.get("final_step") == 4 and out.get("export_sample_finite"))
    c.res.section("fsdp", out)
    print(f"FSDP end to end: ok={out['ok']} fsdp={out['fsdp']}", flush=True)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke preset: tiny architecture, 64² images, fp32")
    ap.add_argument("--arch", choices=("full", "tiny"), help="full Z-Image-Turbo width (default) or the tiny test model")
    ap.add_argument("--dim", type=int, help="transformer width (default: the architecture's, 3840 for full)")
    ap.add_argument("--heads", type=int, help="attention heads (default: the architecture's, 30 for full)")
    ap.add_argument("--device", help="cuda (default) or cpu")
    ap.add_argument("--size", type=int, help="image side in pixels (full: 1024)")
    ap.add_argument("--depths", help="transformer depths of the sweep, comma-separated (full: 1,2 on a card "
                    "under 100 GiB, 2,4 on a larger one)")
    ap.add_argument("--batches", help="per-GPU batch sizes of the sweep, comma-separated (full: 1,2,4)")
    ap.add_argument("--steps", type=int, help="timed steps per point (full: 3)")
    ap.add_argument("--warmup", type=int, help="untimed steps per point first (full: 1)")
    ap.add_argument("--config", default="zimage_turbo_8gpu", help="trainer config of the sweep and the FSDP run")
    ap.add_argument("--lora-config", default="zimage_turbo_lora", help="trainer config of the LoRA step")
    ap.add_argument("--lora-rank", type=int, help="LoRA rank (full: 64)")
    ap.add_argument("--lora-layers", type=int, help="transformer depth of the LoRA step (full: 30)")
    ap.add_argument("--lora-batch", type=int, help="batch of the LoRA step (full: 1)")
    ap.add_argument("--fsdp-dim", type=int, help="width of the FSDP run's small model (full: 256)")
    ap.add_argument("--fsdp-heads", type=int, help="heads of the FSDP run's small model (full: 4)")
    ap.add_argument("--fsdp-layers", type=int, help="depth of the FSDP run's small model (full: 4)")
    ap.add_argument("--fsdp-size", type=int, help="image side of the FSDP run (full: 128)")
    ap.add_argument("--fsdp-launcher", choices=("accelerate", "python", "inprocess"),
                    help="accelerate launch with fsdp_8gpu.yaml as one process (full), plain python, or in-process (tiny)")
    ap.add_argument("--fsdp-timeout-s", type=float, default=240,
                    help="limit of each FSDP training command (never past the deadline)")
    ap.add_argument("--fsdp-need-s", type=float, help="the FSDP section starts only with this many seconds left (full: 60)")
    ap.add_argument("--adamw", help="AdamW implementations the adamw section compares (optim.adamw values; "
                    "default fused,foreach,loop)")
    ap.add_argument("--skip", default="", help="sections to skip, comma-separated: sweep,slope,fsdp,lora,adamw")
    gc.add_deadline_flags(ap)
    ap.add_argument("--out", default=None, help="results JSON (rewritten after each section)")
    args = ap.parse_args(argv)
    gc.apply_preset(args, PRESETS)
    args.depths_from = "--depths" if args.depths else None
    if args.depths is None:  # by the card's memory
        gib = gc.total_memory_gib()
        args.depths = next(d for limit, d in DEPTHS_BY_MEMORY if (gib or 0) < limit)
        args.depths_from = f"{gib} GiB card"
    args.adamw = [x for x in str(args.adamw).split(",") if x]
    args.depths = sorted(int(x) for x in str(args.depths).split(",") if x)
    args.batches = [int(x) for x in str(args.batches).split(",") if x]
    args.skip = {x for x in args.skip.split(",") if x}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    res = gc.Results(args.out, gc.environment(device, args.tiny))
    cfg = gc.arch_config(args.arch, args.depths[0], args.dim, args.heads)
    res.data.update({"arch": args.arch, "config": args.config, "lora_config": args.lora_config, "size": args.size,
                     "transformer": {k: cfg["transformer"][k] for k in ("dim", "n_heads", "n_refiner_layers")},
                     "dtype": str(dtype)[6:], "depths": args.depths, "depths_from": args.depths_from,
                     "gpu_total_gib": gc.total_memory_gib(),
                     "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF")})
    t0 = time.perf_counter()
    pipe = gc.build_pipeline(cfg, device, dtype, args.size)
    res.data["build_s"] = round(time.perf_counter() - t0, 1)
    c = SimpleNamespace(args=args, res=res, pipe=pipe, device=device, dtype=dtype, store=None,
                        tmp=Path(tempfile.mkdtemp(prefix="bench-train-gpu-")),
                        mp=[] if device.type == "cuda" else ["mixed_precision='no'"],
                        deadline=gc.deadline(args.budget_s, args.deadline_at))
    # by value: the sweep and its slope, then the FSDP path end to end, then LoRA and the optimisers
    sections = (("sweep", section_sweep, 30), ("slope", section_slope, 0), ("fsdp", section_fsdp, args.fsdp_need_s),
                ("lora", section_lora, 30), ("adamw", section_adamw, 30))
    res.data["sections_planned"] = [x[0] for x in sections]
    for name, fn, need in sections:
        if name in args.skip or (name == "slope" and "sweep" not in res.data):
            res.data.setdefault("skipped", []).append(name)
            continue
        if not gc.budget_left(c.deadline, need):
            res.data.setdefault("skipped_for_time", []).append(name)
            res.write()
            continue
        if name == "fsdp":  # its own small model, in another process: free what this one cached
            pygc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        try:
            fn(c)
        except Exception as e:  # one failed section must not lose the others' numbers
            res.error(name, e)
    if torch.cuda.is_available():
        res.data["peak_memory_gib"] = gc.peak_gib()
    res.write()
    print(f"training results: {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
