"""Benchmark (GPU): the generation worker against the plain ``ZImagePipeline`` loop, where the
worker's time goes, and candidate faster paths, at full Z-Image-Turbo size (docs/gpu.md).

Builds the Z-Image-Turbo architecture with random bf16 weights on the GPU (6.15B transformer,
Qwen3-4B text encoder, FLUX VAE; the pad tokens given values), then, section by section in the
order of their value (the results file is rewritten after each one, a section starts only while
the deadline leaves it time, and a failed one is recorded while the others go on):

1. ``outputs``: one batch through the plain pipeline and through the teacher path the worker runs
   (``Teacher.generate``); transformer calls counted on both (8 each) and final latents compared
   within a stated tolerance (bf16: relative RMS ≤ ``--tol``).
2. ``main``: the plain loop (``pipe(...)``, PIL images dropped) against ``ShardWorker`` committing
   WebP + latents + ``mid`` shards of at least 2 batches, two shards in flight as in the Ray actor,
   A B B A on fresh rows each time. Images/s to the last commit and to the end of the last GPU
   batch (the difference is the unoverlapped tail of the measurement).
3. ``transformer``: one transformer call at the batch size, per variant: the batched forward (the
   worker's), the stock forward (the plain loop's), without the caption mask, and under each
   SDPA backend; seconds per call, TFLOP/s, fraction of the bf16 peak, output difference.
4. ``fastest``: ``Teacher.generate`` end to end, default and with the fastest exact SDPA backend.
5. ``student``: the exported 2-step student pipeline (``TwoStepZImagePipeline``, 2 transformer
   calls) against the plain 8-step loop, end to end to PIL images, A B B A; goal ≥ 3.8×.
6. ``variants``: two worker variants that isolate the encoding, C D D C: images off
   (``image_format: none``), and the worker as it was before the teacher was released early (the
   teacher held until the shard's encodes, tar and commit are done, one encode thread).
7. ``sweep``: transformer calls at other batch sizes, and the images/s they predict.
8. ``profile``: one plain batch and one worker shard under ``torch.profiler``: top operators side
   by side, host-device syncs, GPU idle time, CPU time per worker stage (gpu_profile.py).
9. ``compile``: regional ``torch.compile`` of the transformer blocks: compile seconds, calls and
   end to end after it, the images it takes to pay the compile back, output difference.

    python tests/benchmarks/bench_generate_gpu.py --out results_generate_gpu.json
    python tests/benchmarks/bench_generate_gpu.py --tiny --out /tmp/gen.json      # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import gpu_common as gc
import gpu_profile
import torch

ROOT = Path(__file__).resolve().parents[2]
PRESETS = {  # every value is also a flag; --tiny swaps the whole set
    "full": dict(arch="full", device="cuda", size=1024, batch=4, images=16, repeats=1, reps=3,
                 sweep="8,16", sdpa="cudnn,flash,efficient", e2e_images=8, compile_backend="inductor",
                 compile_need_s=100, tol=0.02, matmul_n=8192),
    "tiny": dict(arch="tiny", device="cpu", size=64, batch=2, images=8, repeats=1, reps=1,
                 sweep="4", sdpa="flash,cudnn", e2e_images=4, compile_backend="eager",
                 compile_need_s=0, tol=1e-4, matmul_n=256),
}
WORKER_VARIANTS = ("worker", "worker_images_off", "worker_held")
VARIANTS_ORDER = ["worker_images_off", "worker_held", "worker_held", "worker_images_off"]
SDPA = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


def load_capacity():
    spec = importlib.util.spec_from_file_location("capacity", ROOT / "infra" / "capacity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def sdpa(backend: str | None):
    """``torch.nn.attention.sdpa_kernel`` restricted to one backend (None: torch's own choice)."""
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, SDPA[backend])])


def bare_loop(pipe, prompts: list[str], seeds: list[int], batch: int, size: int) -> float:
    """Images/s of the stock pipeline call, Turbo settings, PIL images returned and dropped."""
    gc.sync()
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + batch]]
        pipe(prompt=prompts[i:i + batch], num_inference_steps=8, guidance_scale=0.0, height=size, width=size,
             generator=gens, output_type="pil")
    gc.sync()
    return len(prompts) / (time.perf_counter() - t0)


def worker_round(worker, shards: list[int], gpu_ends: list[float]) -> dict[str, float]:
    """The worker committing ``shards`` with two in flight (the actor's concurrency)."""
    gpu_ends.clear()
    gc.sync()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        stats = list(pool.map(lambda s: worker.run(s, "bench"), shards))
    gc.sync()
    t1 = time.perf_counter()
    n = sum(s["samples"] for s in stats)
    return {"images_per_s": n / (t1 - t0), "images_per_s_to_gpu_end": n / (max(gpu_ends) - t0),
            "tail_s": t1 - max(gpu_ends)}


def generate_rate(teacher, prompts: list[str], seeds: list[int], batch: int, size: int, warm: int = 1):
    """Images/s of ``Teacher.generate`` (decode included) batch after batch, the first ``warm``
    batches left out; returns the stats and the first batch's final latents."""
    times, first = [], None
    for i in range(0, len(prompts), batch):
        gc.sync()
        t0 = time.perf_counter()
        out = teacher.generate(prompts[i:i + batch], seeds[i:i + batch], size, size, decode=True)
        gc.sync()
        times.append(time.perf_counter() - t0)
        first = out.latent if first is None else first
    timed = times[warm:] or times
    return {"images_per_s": round(batch * len(timed) / sum(timed), 4), "batch_s": [round(t, 3) for t in times]}, first


def held_worker(cfg, teacher):
    """The worker as it was before the teacher was released early: one shard at a time from its
    first batch to its commit (the actor's other shard waits for the encodes, tar and upload), one
    encode thread. The comparison that shows what the early release and the pool are worth."""
    from twostep.pipeline.worker import ShardWorker

    class HeldWorker(ShardWorker):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self._held = threading.Lock()

        def run(self, shard: int, fingerprint: str) -> dict:
            with self._held:
                return super().run(shard, fingerprint)

    return HeldWorker(dataclasses.replace(cfg, encode_threads=1), teacher=teacher)


def setup(args) -> SimpleNamespace:
    from twostep.pipeline.worker import ShardWorker, WorkerConfig
    from twostep.teacher.core import Teacher

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    res = gc.Results(args.out, gc.environment(device, args.tiny))
    cfg = gc.arch_config(args.arch, args.layers, args.dim, args.heads)
    t0 = time.perf_counter()
    pipe = gc.build_pipeline(cfg, device, dtype, args.size)
    build_s = time.perf_counter() - t0
    tmp = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    shard = args.images // args.shards
    order = main_order(args.repeats)
    # fresh rows for every measurement of main and variants, then one shard for the profile
    rows = (args.shards * (len(order) + len(VARIANTS_ORDER)) + 1) * shard
    path, prompts, seeds = gc.manifest(tmp / "manifest.parquet", max(rows, args.e2e_images, max(args.sweep)), args.size)
    teacher = Teacher(pipe, name=f"random-zimage-{args.arch}", device=device)

    def worker_cfg(name: str, image_format: str) -> WorkerConfig:
        return WorkerConfig(store_url=str(tmp / name), manifest=path, teacher="-", shard_size=shard,
                            batch_size=args.batch, image_format=image_format, save=("mid",))

    workers = {"worker": ShardWorker(worker_cfg("worker", "webp"), teacher=teacher),
               "worker_images_off": ShardWorker(worker_cfg("worker_images_off", "none"), teacher=teacher),
               "worker_held": held_worker(worker_cfg("worker_held", "webp"), teacher)}
    t = cfg["transformer"]
    res.data.update({
        "arch": args.arch, "transformer": {k: t[k] for k in ("dim", "n_layers", "n_heads", "n_refiner_layers")},
        "transformer_params": sum(p.numel() for p in pipe.transformer.parameters()), "dtype": str(dtype)[6:],
        "size": args.size, "batch": args.batch, "images_per_measurement": args.images, "shards": args.shards,
        "batches_per_shard": shard // args.batch, "repeats": args.repeats, "main_order": order,
        "variants_order": VARIANTS_ORDER, "build_s": round(build_s, 1), "tolerance_rel_rms": args.tol,
        "matmul_tflops": gc.matmul_tflops(device, args.matmul_n, dtype), "peak_tflops": gc.PEAK_BF16_TFLOPS,
    })
    print(f"built {args.arch} Z-Image in {build_s:.1f}s ({res.data['transformer_params'] / 1e9:.2f}B transformer)",
          flush=True)
    return SimpleNamespace(args=args, res=res, pipe=pipe, teacher=teacher, workers=workers, worker=workers["worker"],
                           device=device, cfg=cfg, prompts=prompts, seeds=seeds, shard=shard, next_shard=0,
                           calls=gc.count_calls(pipe.transformer), deadline=gc.deadline(args.budget_s, args.deadline_at),
                           tmp=tmp)


def main_order(repeats: int) -> list[str]:
    """The measurements of ``main``: A B B A, ``repeats`` times (a linear drift cancels)."""
    return ["bare", "worker", "worker", "bare"] * repeats


def section_outputs(c: SimpleNamespace) -> None:
    """Both paths on one batch: 8 transformer calls each, final latents within the tolerance."""
    a, b = c.args, c.args.batch
    p, s = c.prompts[:b], c.seeds[:b]
    c.calls[0] = 0
    gens = [torch.Generator("cpu").manual_seed(x) for x in s]
    # a copy: the pipeline applies the chat template to the list it is given, in place
    c.bare_latent = c.pipe(prompt=list(p), num_inference_steps=8, guidance_scale=0.0, height=a.size, width=a.size,
                           generator=gens, output_type="latent").images.float().cpu()
    bare_calls = c.calls[0]
    c.calls[0] = 0
    out = c.teacher.generate(p, s, a.size, a.size, decode=False)
    teacher_calls = c.calls[0]
    diff = gc.rel_rms(out.latent, c.bare_latent)
    c.res.data["transformer_calls_per_image"] = {"bare": bare_calls, "teacher_path": teacher_calls}
    c.res.section("outputs", {"teacher_vs_bare_rel_rms": round(diff, 6), "ok": diff <= a.tol})
    c.latent_ref = out.latent


def measure_sequence(c: SimpleNamespace, order: list[str]) -> tuple[dict[str, list], dict[str, float]]:
    """Each name in ``order`` measured once, on fresh rows: ``bare`` the plain loop, any other the
    worker of that name committing ``--shards`` shards, two in flight. Returns the runs per name and
    the transformer calls per batch of each worker."""
    a, n = c.args, c.args.images
    gpu_ends: list[float] = []
    real = c.teacher.generate

    def timed_generate(*args, **kw):
        out = real(*args, **kw)  # returns CPU tensors: the batch's GPU work is done here
        gpu_ends.append(time.perf_counter())
        return out

    c.teacher.generate = timed_generate
    runs: dict[str, list] = {k: [] for k in order}
    calls: dict[str, float] = {}
    try:
        for name in order:
            lo = c.next_shard * c.shard
            if name == "bare":
                runs[name].append(bare_loop(c.pipe, c.prompts[lo:lo + n], c.seeds[lo:lo + n], a.batch, a.size))
                print(f"bare: {runs[name][-1]:.3f} img/s", flush=True)
            else:
                c.calls[0] = 0
                r = worker_round(c.workers[name], list(range(c.next_shard, c.next_shard + a.shards)), gpu_ends)
                calls[name] = c.calls[0] / (n // a.batch)
                runs[name].append(r)
                print(f"{name}: {r['images_per_s']:.3f} img/s ({r['images_per_s_to_gpu_end']:.3f} to the last GPU batch)",
                      flush=True)
            c.next_shard += a.shards
    finally:
        del c.teacher.generate
    return runs, calls


def section_main(c: SimpleNamespace) -> None:
    """The plain loop against the worker, A B B A on fresh rows each time, after one warm-up batch
    of each path."""
    a = c.args
    bare_loop(c.pipe, c.prompts[:a.batch], c.seeds[:a.batch], a.batch, a.size)
    c.teacher.generate(c.prompts[:a.batch], c.seeds[:a.batch], a.size, a.size, decode=True)
    runs, calls = measure_sequence(c, main_order(a.repeats))
    mb = statistics.median(runs["bare"])
    mw = statistics.median(w["images_per_s"] for w in runs["worker"])
    mg = statistics.median(w["images_per_s_to_gpu_end"] for w in runs["worker"])
    c.res.data.setdefault("transformer_calls_per_image", {})["worker"] = calls["worker"]
    c.res.data.update({"median_bare": round(mb, 4), "median_worker": round(mw, 4),
                       "ratio_worker_over_bare": round(mw / mb, 4), "seconds_per_image_worker": round(1 / mw, 4)})
    c.res.section("main", {"bare_images_per_s": [round(x, 4) for x in runs["bare"]],
                           "worker": [{k: round(v, 4) for k, v in w.items()} for w in runs["worker"]],
                           "median_worker_to_gpu_end": round(mg, 4), "ratio_to_gpu_end_over_bare": round(mg / mb, 4)})


def section_variants(c: SimpleNamespace) -> None:
    """The two worker variants, C D D C, against main's plain loop and worker."""
    runs, calls = measure_sequence(c, VARIANTS_ORDER)
    mb, mw = c.res.data["median_bare"], c.res.data["median_worker"]
    med = {k: statistics.median(w["images_per_s"] for w in runs[k]) for k in runs}
    c.res.data["worker_variants"] = {k: {"median_images_per_s": round(v, 4), "ratio_over_bare": round(v / mb, 4),
                                         "ratio_over_worker": round(v / mw, 4)} for k, v in med.items()}
    c.res.section("variants", {"runs": {k: [{x: round(v, 4) for x, v in w.items()} for w in runs[k]] for k in runs},
                               "transformer_calls_per_batch": calls})


def section_profile(c: SimpleNamespace) -> None:
    """One plain batch and one worker shard of one batch under the profiler."""
    a, cuda = c.args, c.device.type == "cuda"
    out_dir = Path(a.out).parent if a.out else c.tmp
    lo = c.next_shard * c.shard
    summaries, traces = {}, {}
    for name in ("bare", "worker"):
        ranges: list[str] = []
        with gpu_profile.profiler(cuda) as prof:
            gc.sync()
            t0 = time.perf_counter()
            if name == "bare":
                bare_loop(c.pipe, c.prompts[lo:lo + a.batch], c.seeds[lo:lo + a.batch], a.batch, a.size)
            else:
                c.worker.cfg.shard_size = a.batch  # one batch: shard c.next_shard·(shard/batch) of that size
                try:
                    with gpu_profile.worker_ranges(c.worker, c.teacher) as ranges:
                        c.worker.run(lo // a.batch, "bench")
                finally:
                    c.worker.cfg.shard_size = c.shard
            gc.sync()
            wall = time.perf_counter() - t0
        summaries[name] = gpu_profile.summarise(prof, wall)
        summaries[name]["ranges_installed"] = ranges
        traces[name] = gpu_profile.save_trace(prof, out_dir / f"trace_generate_{name}.json.gz")
    table = gpu_profile.side_by_side(summaries["bare"], summaries["worker"])
    (out_dir / "profile_generate.md").write_text(table)
    c.res.section("profile", {**summaries, "traces": traces, "table": "profile_generate.md"})


def transformer_flops(c: SimpleNamespace, caps: list[torch.Tensor]) -> float:
    """FLOPs of one transformer call on one image at the batch's mean caption length (counted by
    infra/capacity.py on the meta device, as in the capacity table)."""
    lat = c.args.size // c.pipe.vae_scale_factor
    mean_len = round(sum(len(x) for x in caps) / len(caps))
    return load_capacity().transformer_flops(c.cfg["transformer"], (lat, lat), mean_len)[0]


def section_transformer(c: SimpleNamespace) -> None:
    """One transformer call on the batch, per variant."""
    from twostep.teacher.families.zimage import transformer_velocity

    a, b = c.args, c.args.batch
    caps = c.teacher.encode_prompts(c.prompts[:b])
    shortest = min(len(x) for x in caps)
    same = [x[:shortest] for x in caps]  # equal lengths: the batched forward passes no mask
    lat = a.size // c.pipe.vae_scale_factor
    x = torch.randn(b, c.pipe.transformer.config.in_channels, lat, lat, generator=torch.Generator().manual_seed(0))
    x = x.to(c.device)
    flops = transformer_flops(c, caps) * b
    c.flops_per_image_call = flops / b
    variants = {"batched": (None, True, caps), "stock": (None, False, caps), "batched_no_mask": (None, True, same)}
    variants.update({f"sdpa_{k}": (k, True, caps) for k in a.sdpa})
    variants.update({f"sdpa_{k}_no_mask": (k, True, same) for k in a.sdpa if k == "flash"})
    out, ref = {}, {}
    for name, (backend, batched, cp) in variants.items():
        if not gc.budget_left(c.deadline, 30):
            out[name] = {"skipped": "time budget"}
            continue
        try:
            with torch.no_grad(), sdpa(backend):
                s, v, _ = gc.time_calls(lambda cp=cp, batched=batched: transformer_velocity(
                    c.pipe.transformer, x, 0.5, cp, batched=batched), a.reps)
        except Exception as e:  # e.g. flash attention refuses a mask: recorded, not fatal
            out[name] = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"}
            continue
        key = "no_mask" if cp is same else "mask"
        ref.setdefault(key, v)
        tf = flops / s / 1e12
        out[name] = {"s_per_call": round(s, 5), "tflops": round(tf, 2), "fraction_of_peak": round(tf / gc.PEAK_BF16_TFLOPS, 4),
                     "fraction_of_matmul": round(tf / c.res.data["matmul_tflops"], 4),
                     "rel_rms_vs_batched": round(gc.rel_rms(v, ref[key]), 6)}
        print(f"transformer {name}: {s:.4f} s/call, {tf:.1f} TFLOP/s", flush=True)
    exact = {k: v for k, v in out.items() if k.startswith("sdpa_") and "s_per_call" in v and "no_mask" not in k
             and v["rel_rms_vs_batched"] <= a.tol}
    c.best_sdpa = min(exact, key=lambda k: exact[k]["s_per_call"])[5:] if exact else None
    if c.best_sdpa and exact[f"sdpa_{c.best_sdpa}"]["s_per_call"] >= out["batched"].get("s_per_call", 0):
        c.best_sdpa = None  # no backend beats torch's own choice
    c.x, c.caps, c.v_batched = x, caps, ref.get("mask")
    c.res.section("transformer", {"batch": b, "flops_per_call": flops, "caption_tokens": [len(t) for t in caps],
                                  "variants": out, "best_sdpa": c.best_sdpa})


def section_sweep(c: SimpleNamespace) -> None:
    """Transformer calls at other batch sizes, and the images/s they predict with the text
    encoder and VAE decode at their measured cost per image."""
    from twostep.teacher.families.zimage import transformer_velocity

    a = c.args
    b = a.batch
    gc.sync()
    t0 = time.perf_counter()
    c.teacher.encode_prompts(c.prompts[:b])
    gc.sync()
    t1 = time.perf_counter()
    c.teacher.decode(c.latent_ref)
    gc.sync()
    other = (time.perf_counter() - t1 + t1 - t0) / b
    lat = a.size // c.pipe.vae_scale_factor
    rows = {}
    for n in a.sweep:
        if not gc.budget_left(c.deadline, 40):
            rows[str(n)] = {"skipped": "time budget"}
            continue
        try:
            caps = c.teacher.encode_prompts(c.prompts[:n])
            x = torch.randn(n, c.pipe.transformer.config.in_channels, lat, lat, device=c.device)
            gc.reset_peak()
            with torch.no_grad(), sdpa(c.best_sdpa):
                s, _, _ = gc.time_calls(lambda caps=caps, x=x: transformer_velocity(c.pipe.transformer, x, 0.5, caps), a.reps)
        except Exception as e:  # out of memory ends the sweep; the smaller batches stand
            rows[str(n)] = {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"}
            break
        tf = c.flops_per_image_call * n / s / 1e12
        rows[str(n)] = {"s_per_call": round(s, 5), "tflops": round(tf, 2), "fraction_of_peak": round(tf / gc.PEAK_BF16_TFLOPS, 4),
                        "predicted_images_per_s": round(n / (8 * s + n * other), 4), "peak_gib": gc.peak_gib()}
        print(f"sweep batch {n}: {s:.4f} s/call, {tf:.1f} TFLOP/s", flush=True)
    c.res.section("sweep", {"text_encode_and_decode_s_per_image": round(other, 5), "sdpa": c.best_sdpa,
                            "batches": rows})


def bare_rate(c: SimpleNamespace) -> float:
    """The plain loop's images/s from ``main``, or measured here when ``main`` was skipped."""
    if "median_bare" not in c.res.data:
        a = c.args
        bare_loop(c.pipe, c.prompts[:a.batch], c.seeds[:a.batch], a.batch, a.size)
        c.res.data["median_bare"] = round(bare_loop(c.pipe, c.prompts[:a.e2e_images], c.seeds[:a.e2e_images],
                                                     a.batch, a.size), 4)
    return c.res.data["median_bare"]


def section_fastest(c: SimpleNamespace) -> None:
    """``Teacher.generate`` end to end (the worker's GPU work, no encoding or upload), default and
    with the fastest exact SDPA backend, on the batch compared in ``outputs`` first."""
    a = c.args
    p, s = c.prompts[:a.e2e_images], c.seeds[:a.e2e_images]
    bare, runs = bare_rate(c), {}
    for name, backend in [("default", None)] + ([(f"sdpa_{c.best_sdpa}", c.best_sdpa)] if c.best_sdpa else []):
        if not gc.budget_left(c.deadline, a.e2e_images / bare * 1.5):
            runs[name] = {"skipped": "time budget"}
            continue
        with sdpa(backend):
            stats, first = generate_rate(c.teacher, p, s, a.batch, a.size)
        stats["ratio_over_bare"] = round(stats["images_per_s"] / bare, 4)
        stats["rel_rms_vs_bare"] = round(gc.rel_rms(first, c.bare_latent), 6)
        runs[name] = stats
        print(f"generate {name}: {stats['images_per_s']:.3f} img/s ({stats['ratio_over_bare']:.2f}x bare)", flush=True)
    c.res.section("fastest", {"runs": runs})


def section_compile(c: SimpleNamespace) -> None:
    """Regional compilation: each main transformer block compiled (one compiled graph serves all
    of them), under the fastest SDPA backend; undone at the end so later sections run eagerly."""
    from twostep.teacher.families.zimage import transformer_velocity

    a = c.args
    if not gc.budget_left(c.deadline, a.compile_need_s):
        c.res.section("compile", {"skipped": "time budget"})
        return
    model, out = c.pipe.transformer, {"backend": a.compile_backend, "mode": a.compile_mode, "sdpa": c.best_sdpa}
    t0 = time.perf_counter()
    for block in model.layers:
        block.compile(backend=a.compile_backend, mode=a.compile_mode)
    out["wrap_s"] = round(time.perf_counter() - t0, 2)
    try:
        with torch.no_grad(), sdpa(c.best_sdpa):
            s, v, first = gc.time_calls(lambda: transformer_velocity(model, c.x, 0.5, c.caps), a.reps)
        base = c.res.data["transformer"]["variants"].get(f"sdpa_{c.best_sdpa}" if c.best_sdpa else "batched", {})
        tf = c.flops_per_image_call * a.batch / s / 1e12
        out.update({"first_call_s": round(first, 2),
                    "compile_s_first_call": round(first - s, 2), "s_per_call": round(s, 5),
                    "speedup_per_call": round(base["s_per_call"] / s, 4) if "s_per_call" in base else None,
                    "tflops": round(tf, 2), "fraction_of_peak": round(tf / gc.PEAK_BF16_TFLOPS, 4),
                    "rel_rms_vs_batched": round(gc.rel_rms(v, c.v_batched), 6)})
        c.res.write()
        n = a.e2e_images + a.batch  # two warm-up batches: the second caption length recompiles once
        if gc.budget_left(c.deadline, n / bare_rate(c) * 1.5):
            with sdpa(c.best_sdpa):
                stats, latent = generate_rate(c.teacher, c.prompts[:n], c.seeds[:n], a.batch, a.size, warm=2)
            steady = statistics.median(stats["batch_s"][2:] or stats["batch_s"][-1:])
            out["generate"] = stats
            out["compile_s"] = round(out["compile_s_first_call"] + sum(max(0.0, t - steady) for t in stats["batch_s"][:2]), 2)
            out["ratio_over_bare"] = round(stats["images_per_s"] / bare_rate(c), 4)
            out["rel_rms_vs_bare"] = round(gc.rel_rms(latent, c.bare_latent), 6)
            out["ok"] = out["rel_rms_vs_bare"] <= a.tol
            default = (c.res.data.get("fastest") or {}).get("runs", {}).get("default", {}).get("images_per_s")
            gain = (1 / default - 1 / stats["images_per_s"]) if default else 0.0
            out["images_to_pay_back"] = round(out["compile_s"] / gain) if gain > 0 else None
            print(f"compiled generate: {stats['images_per_s']:.3f} img/s, compile {out['compile_s']:.1f}s", flush=True)
        else:
            out["generate"] = {"skipped": "time budget"}
    finally:
        for block in model.layers:
            block._compiled_call_impl = None  # back to eager (nn.Module.compile keeps the compiled call here)
    c.res.section("compile", out)


def section_student(c: SimpleNamespace) -> None:
    """The exported 2-step student pipeline against the plain 8-step loop, end to end to PIL
    images on the same rows, A B B A. The student is the teacher's transformer in
    ``TwoStepZImagePipeline`` (both steps): random weights, so only the speed means anything."""
    from twostep.trainer.pipeline_twostep import TwoStepZImagePipeline

    a, b = c.args, c.args.batch
    p = c.pipe
    student = TwoStepZImagePipeline(scheduler=p.scheduler, vae=p.vae, text_encoder=p.text_encoder,
                                    tokenizer=p.tokenizer, transformer=p.transformer)
    student.set_progress_bar_config(disable=True)
    prompts, seeds = c.prompts[:a.e2e_images], c.seeds[:a.e2e_images]

    def student_loop() -> float:
        gc.sync()
        t0 = time.perf_counter()
        for i in range(0, len(prompts), b):
            gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + b]]
            student(prompt=prompts[i:i + b], height=a.size, width=a.size, generator=gens, output_type="pil")
        gc.sync()
        return len(prompts) / (time.perf_counter() - t0)

    c.calls[0] = 0
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[:b]]
    student(prompt=prompts[:b], height=a.size, width=a.size, generator=gens, output_type="pil")  # warm-up
    calls = c.calls[0]
    teacher, two = [], []
    for name in ("teacher8", "student", "student", "teacher8"):
        if name == "student":
            two.append(student_loop())
        else:
            teacher.append(bare_loop(c.pipe, prompts, seeds, b, a.size))
        print(f"{name}: {(two if name == 'student' else teacher)[-1]:.3f} img/s", flush=True)
    ratio = statistics.median(two) / statistics.median(teacher)
    c.res.data["student_over_teacher8"] = round(ratio, 4)
    c.res.section("student", {"transformer_calls_per_batch": calls, "student_images_per_s": [round(x, 4) for x in two],
                              "teacher8_images_per_s": [round(x, 4) for x in teacher], "ratio": round(ratio, 4),
                              "goal": 3.8, "images": a.e2e_images})


def summary(c: SimpleNamespace) -> None:
    """Top-level figures (``median_worker`` is what ``infra/capacity.py --bench`` reads)."""
    d = c.res.data
    flops = getattr(c, "flops_per_image_call", None)
    if flops is not None:
        floor = 8 * flops / (gc.PEAK_BF16_TFLOPS * 1e12)
        d["transformer_flops_per_call"] = flops
        d["floor_seconds_per_image_at_peak"] = round(floor, 4)
        if "median_worker" in d:
            d["fraction_of_floor"] = round(floor * d["median_worker"], 4)
    candidates = {k: v["images_per_s"] for k, v in (d.get("fastest") or {}).get("runs", {}).items() if "images_per_s" in v}
    comp = d.get("compile") or {}
    if comp.get("ok"):
        candidates["compile"] = comp["generate"]["images_per_s"]
    if candidates:
        name = max(candidates, key=candidates.get)
        d["fastest_path"] = {"name": name, "images_per_s": candidates[name],
                             "ratio_over_bare": round(candidates[name] / d["median_bare"], 4)}
    d["peak_memory_gib"] = gc.peak_gib()
    c.res.write()


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke preset: tiny architecture, 64² images, fp32")
    ap.add_argument("--arch", choices=("full", "tiny"), help="full Z-Image-Turbo size (default) or the tiny test model")
    ap.add_argument("--layers", type=int, help="transformer main blocks (default: the architecture's, 30 for full)")
    ap.add_argument("--dim", type=int, help="transformer width (default: the architecture's, 3840 for full)")
    ap.add_argument("--heads", type=int, help="attention heads (default: the architecture's, 30 for full)")
    ap.add_argument("--device", help="cuda (default) or cpu")
    ap.add_argument("--size", type=int, help="image side in pixels (full: 1024)")
    ap.add_argument("--batch", type=int, help="images per teacher call, both paths (full: 4)")
    ap.add_argument("--images", type=int, help="images per measurement of main (full: 16)")
    ap.add_argument("--shards", type=int,
                    help="worker shards per measurement, two in flight (default: 2 batches per shard, at least 2 shards)")
    ap.add_argument("--repeats", type=int, help="A B B A rounds of main (full: 1)")
    ap.add_argument("--reps", type=int, help="timed transformer calls per variant (full: 3)")
    ap.add_argument("--sweep", help="batch sizes of the transformer sweep, comma-separated (full: 4,8,16)")
    ap.add_argument("--sdpa", help="SDPA backends to try: flash, cudnn, efficient, math (full: cudnn,flash,efficient)")
    ap.add_argument("--e2e-images", type=int, help="images per end-to-end generate measurement (full: 12)")
    ap.add_argument("--compile-backend", help="torch.compile backend for the blocks (full: inductor; tiny: eager)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: torch's default)")
    ap.add_argument("--compile-need-s", type=float,
                    help="compile starts only with this many seconds of --budget-s left (full: 100)")
    ap.add_argument("--tol", type=float, help="max relative RMS difference of final latents (bf16: 0.02)")
    ap.add_argument("--matmul-n", type=int, help="side of the matmul that measures the achievable TFLOP/s")
    ap.add_argument("--skip", default="",
                    help="sections to skip, comma-separated: outputs,main,transformer,fastest,student,variants,sweep,"
                         "profile,compile")
    gc.add_deadline_flags(ap)
    ap.add_argument("--out", default=None, help="results JSON (rewritten after each section)")
    args = ap.parse_args(argv)
    gc.apply_preset(args, PRESETS)
    if args.shards is None:
        args.shards = max(2, args.images // (2 * args.batch))
    args.sweep = [int(x) for x in str(args.sweep).split(",") if x]
    args.sdpa = [x for x in str(args.sdpa).split(",") if x]
    bad = [x for x in args.sdpa if x not in SDPA]
    if bad:
        ap.error(f"--sdpa: unknown backend(s) {bad}; choose from {sorted(SDPA)}")
    if args.images % args.shards or (args.images // args.shards) % args.batch:
        ap.error(f"--images {args.images} must split into --shards {args.shards} shards of whole --batch {args.batch} batches")
    args.skip = {x for x in args.skip.split(",") if x}
    return args


# name, function, seconds of deadline it needs to start (compile checks its own), sections it needs
SECTIONS = (("outputs", section_outputs, 0, ()), ("main", section_main, 60, ()),
            ("transformer", section_transformer, 30, ()), ("fastest", section_fastest, 30, ("outputs", "transformer")),
            ("student", section_student, 40, ()), ("variants", section_variants, 60, ("main",)),
            ("sweep", section_sweep, 40, ("outputs", "transformer")), ("profile", section_profile, 40, ()),
            ("compile", section_compile, 0, ("outputs", "transformer")))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    c = setup(args)
    c.res.data["sections_planned"] = [x[0] for x in SECTIONS]
    for name, fn, need, needs in SECTIONS:
        missing = [x for x in needs if x not in c.res.data["sections_done"]]
        if name in args.skip or missing:
            c.res.data.setdefault("skipped", []).append(name)
            continue
        if not gc.budget_left(c.deadline, need):
            c.res.data.setdefault("skipped_for_time", []).append(name)
            continue
        try:
            fn(c)
        except Exception as e:  # one failed section must not lose the others' numbers
            c.res.error(name, e)
        summary(c)
    summary(c)
    print(f"generation results: {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
