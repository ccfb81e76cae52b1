"""Benchmark (GPU): the generation worker vs a bare ``ZImagePipeline`` loop, full-size Z-Image.

Builds the Z-Image-Turbo architecture with random weights on the GPU (6.15B transformer, Qwen3-4B
text encoder, FLUX VAE; bf16), then times, A B A B, on the same prompts and batch size:

* bare: ``pipe(prompts, num_inference_steps=8, guidance_scale=0, height, width)`` in a loop,
  images returned as PIL and dropped (no saving at all);
* worker: :class:`twostep.pipeline.worker.ShardWorker` (no Ray) committing shards to a local
  store with two shards in flight, as the Ray actor runs them: noise, mid, latent, webp image,
  tar, stats.

Reported: images/s of each (median), the ratio worker / bare (goal ≥ 0.97), transformer calls per
image (hooks count them: both must make 8), and seconds per image against the physical floor
(GUIDE §3: 8 transformer calls × FLOPs per call at the H100/H200's 989 TFLOP/s dense bf16 peak).

    python tests/benchmarks/bench_generate_gpu.py [--size 1024] [--batch 4] [--images 16] [--repeats 2]
    python tests/benchmarks/bench_generate_gpu.py --arch tiny --device cpu   # a smoke run of this script
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16


def build_full_zimage(device: torch.device, dtype: torch.dtype, size: int):
    """Z-Image-Turbo's architecture (configs as published on its model card) with random weights."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    from twostep.pipeline.zimage import build_tokenizer

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise straight into bf16 on the GPU (fp32 would need 40 GB)
    try:
        with torch.device(device):
            transformer = ZImageTransformer2DModel(
                all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
                rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
            text_encoder = Qwen3Model(Qwen3Config(
                vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True))
            vae = AutoencoderKL(
                in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                use_quant_conv=False, use_post_quant_conv=False, sample_size=size)
    finally:
        torch.set_default_dtype(prev)
    # Random weights in bf16 can overflow deep in the stack; keep activations finite so both paths
    # do the same work (a NaN does not change the FLOPs, but the image encoders would see garbage).
    with torch.no_grad():
        for p in transformer.parameters():
            if p.dim() >= 2:
                p.mul_(0.5)
    tokenizer = build_tokenizer(model_max_length=512)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = ZImagePipeline(scheduler=sched, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    for m in (transformer, text_encoder, vae):
        m.requires_grad_(False).eval()
    return pipe


def build_tiny(device: torch.device, size: int):
    from twostep.pipeline.zimage import build_pipeline

    pipe = build_pipeline()
    pipe.vae.register_to_config(sample_size=size)
    return pipe.to(device)


def transformer_flops_per_call(model: torch.nn.Module, tokens: int) -> float:
    """Forward FLOPs of one call on ``tokens`` image tokens, as GUIDE §3 counts them: 2 FLOPs per
    parameter per token plus attention's 4·seq²·dim per layer (≈ 6e13 for Z-Image at 1024²)."""
    params = sum(p.numel() for p in model.parameters())
    return 2 * params * tokens + len(model.layers) * 4 * tokens * tokens * model.config.dim


def count_calls(model: torch.nn.Module) -> list[int]:
    """Transformer calls, counted at the timestep embedder (run once per call by both paths)."""
    calls = [0]
    model.t_embedder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def bare_loop(pipe, prompts: list[str], seeds: list[int], batch: int, size: int) -> float:
    """Images/s of the stock pipeline call, Turbo settings."""
    sync()
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i:i + batch]]
        pipe(prompt=prompts[i:i + batch], num_inference_steps=8, guidance_scale=0.0, height=size, width=size,
             generator=gens, output_type="pil")
    sync()
    return len(prompts) / (time.perf_counter() - t0)


def worker_run(worker, shards: list[int]) -> float:
    """Images/s of the worker committing ``shards`` with two in flight (the actor's concurrency)."""
    sync()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        stats = list(pool.map(lambda s: worker.run(s, "bench"), shards))
    sync()
    return sum(s["samples"] for s in stats) / (time.perf_counter() - t0)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=("full", "tiny"), default="full", help="full Z-Image-Turbo size or the tiny test pipeline")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=1024, help="image side")
    ap.add_argument("--batch", type=int, default=4, help="images per teacher call (both paths)")
    ap.add_argument("--images", type=int, default=16, help="images per measurement (split into --shards shards)")
    ap.add_argument("--shards", type=int, default=2,
                    help="shards per worker measurement; the last shard's encoding and upload follow the last GPU "
                         "work, so more shards measure closer to a long run's steady state")
    ap.add_argument("--repeats", type=int, default=2, help="A B rounds")
    ap.add_argument("--out", default=None, help="write the results JSON here")
    args = ap.parse_args(argv)

    from twostep.pipeline.teacher import Teacher
    from twostep.pipeline.worker import ShardWorker, WorkerConfig
    from twostep.prompts.build import BuildOptions, build_manifest

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t0 = time.perf_counter()
    pipe = build_full_zimage(device, dtype, args.size) if args.arch == "full" else build_tiny(device, args.size)
    print(f"built {args.arch} Z-Image in {time.perf_counter() - t0:.1f}s; transformer "
          f"{sum(p.numel() for p in pipe.transformer.parameters()) / 1e9:.2f}B params", flush=True)
    pipe.set_progress_bar_config(disable=True)
    calls = count_calls(pipe.transformer)

    tmp = Path(tempfile.mkdtemp())
    n = args.images
    shard = n // args.shards
    total = n * (2 * args.repeats + 1)  # a warm-up measurement, then fresh rows for every worker round
    summary = build_manifest(["bundled:general"], tmp / "manifest.parquet",
                             BuildOptions(per_prompt=max(1, -(-total // 364)), height=args.size, width=args.size))
    import pyarrow.parquet as pq

    table = pq.read_table(summary.manifest)
    prompts, seeds = table.column("prompt").to_pylist(), table.column("seed").to_pylist()
    teacher = Teacher(pipe, name=f"random-zimage-{args.arch}", device=device)
    worker = ShardWorker(WorkerConfig(store_url=str(tmp / "store"), manifest=summary.manifest, teacher="-",
                                      shard_size=shard, batch_size=args.batch, image_format="webp",
                                      save=("mid",)), teacher=teacher)
    # Warm-up (cuDNN autotuning, allocator): one batch each way.
    bare_loop(pipe, prompts[:args.batch], seeds[:args.batch], args.batch, args.size)
    worker_run(worker, [0])
    calls[0] = 0
    bare_loop(pipe, prompts[:args.batch], seeds[:args.batch], args.batch, args.size)
    bare_calls = calls[0]  # one batch: calls per batch = calls per image
    results: dict[str, list[float]] = {"bare": [], "worker": []}
    next_shard = 1
    for r in range(args.repeats):
        results["bare"].append(bare_loop(pipe, prompts[:n], seeds[:n], args.batch, args.size))
        calls[0] = 0
        results["worker"].append(worker_run(worker, list(range(next_shard, next_shard + args.shards))))
        worker_calls = calls[0] / (n // args.batch)
        next_shard += args.shards
        print(f"round {r}: bare {results['bare'][-1]:.3f} img/s, worker {results['worker'][-1]:.3f} img/s", flush=True)
    bare, work = statistics.median(results["bare"]), statistics.median(results["worker"])
    latent = args.size // pipe.vae_scale_factor
    flops = transformer_flops_per_call(pipe.transformer, (latent // 2) ** 2)
    floor = 8 * flops / PEAK_BF16_FLOPS
    out = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "arch": args.arch,
        "size": args.size, "batch": args.batch, "images_per_measurement": n, "shards": args.shards, "repeats": args.repeats,
        "bare_images_per_s": results["bare"], "worker_images_per_s": results["worker"],
        "median_bare": round(bare, 4), "median_worker": round(work, 4), "ratio_worker_over_bare": round(work / bare, 4),
        "transformer_calls_per_image": {"bare": bare_calls, "worker": worker_calls},
        "seconds_per_image_worker": round(1 / work, 4), "transformer_flops_per_call": flops,
        "floor_seconds_per_image_at_peak": round(floor, 4), "fraction_of_floor": round(floor * work, 4),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "torch": torch.__version__,
    }
    print(json.dumps(out, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
