"""Capacity planning for teacher generation and the store (infra/README.md, "Capacity").

    python infra/capacity.py                                  # Z-Image-Turbo at 1024², 1M samples
    python infra/capacity.py --pipeline DIR --height 512 --width 512 --samples 200000
    python infra/capacity.py --bench tests/benchmarks/results_generate_gpu.json \
        --train-bench tests/benchmarks/results_train_gpu.json  # + measured generation and training rates

FLOPs are counted, not estimated: each component is built on torch's ``meta`` device from its
config (a pipeline folder's ``transformer/``, ``text_encoder/`` and ``vae/`` config.json, or the
published Z-Image-Turbo configs below) and run once under ``torch.utils.flop_counter``; no weights
are loaded and nothing is allocated. Per image, the 8-step teacher costs 8 transformer calls (no
CFG: guidance 0), one text-encoder pass over the padded prompt and one VAE decode. The physical
floor is that work at the GPU's dense bf16 peak; the measured rates come from the GPU benchmarks
(tests/benchmarks/gpu_truth.py, docs/gpu.md): the generation worker's and the fastest path's
images/s, and the trainer's step time per 8-GPU node (full-parameter students extrapolated to 30
layers under FSDP, LoRA students measured at full depth under DDP).
Bytes per sample are exact for the npy members (float16 latents and ``mid``) and the tar headers;
the image member's size depends on the content and is reported only as the raw-RGB upper bound.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

# Published configs of Tongyi-MAI/Z-Image-Turbo (transformer: 6.15B parameters, the count this
# reproduces), its Qwen3-4B text encoder, and the FLUX VAE.
ZIMAGE_TURBO = {
    "transformer": {"all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840, "n_layers": 30,
                    "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True,
                    "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [32, 48, 48],
                    "axes_lens": [1024, 512, 512]},
    "text_encoder": {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                     "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "tie_word_embeddings": True},
    "vae": {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [128, 256, 512, 512],
            "layers_per_block": 2, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 32, "use_quant_conv": False,
            "use_post_quant_conv": False, "scaling_factor": 0.3611, "shift_factor": 0.1159},
}
H100_BF16_DENSE_TFLOPS = 989.0
TAR_BLOCK = 512
# The store's costs per shard, from docs/store.md and tests/benchmarks/bench_fleet.py: a shard is
# committed with two PUTs (tar, then stats); index.json holds one entry of about 150 bytes per shard
# (the demo store's: 1,789 bytes for 4 shards plus its header); a no-op rerun costs a fixed 13
# requests (lease, manifest check, index) plus one LIST per 1,000 keys (two keys a shard).
PUTS_PER_SHARD = 2
INDEX_BYTES_PER_SHARD = 150
RERUN_FIXED_REQUESTS = 13
# AWS S3's documented request rate per partitioned prefix (PUT/COPY/POST/DELETE).
S3_PUTS_PER_S_PER_PREFIX = 3500


def load_configs(pipeline: str | None) -> dict[str, dict]:
    """Component configs from a ZImagePipeline folder, or the published Z-Image-Turbo ones."""
    if pipeline is None:
        return ZIMAGE_TURBO
    root = Path(pipeline)
    out = {}
    for name in ("transformer", "text_encoder", "vae"):
        path = root / name / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; --pipeline must be a ZImagePipeline folder")
        out[name] = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return out


def _count(fn) -> float:
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def vae_scale(vae_cfg: dict) -> int:
    return 2 ** (len(vae_cfg["block_out_channels"]) - 1)


def transformer_flops(cfg: dict, latent_hw: tuple[int, int], caption_tokens: int) -> tuple[float, int]:
    """FLOPs of one transformer call on one image, and the transformer's parameter count."""
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(cfg)
    params = sum(p.numel() for p in model.parameters())
    c = model.config
    x = [torch.zeros(c.in_channels, 1, *latent_hw, device="meta")]
    cap = [torch.zeros(caption_tokens, c.cap_feat_dim, device="meta")]
    t = torch.zeros(1, device="meta")
    return _count(lambda: model(x, t, cap)), params


def text_encoder_flops(cfg: dict, tokens: int) -> float:
    from transformers import Qwen3Config, Qwen3Model

    with torch.device("meta"):
        model = Qwen3Model(Qwen3Config(**cfg))
    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    return _count(lambda: model(input_ids=ids))


def vae_decode_flops(cfg: dict, height: int, width: int) -> float:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(cfg)
    s = vae_scale(cfg)
    z = torch.zeros(1, cfg["latent_channels"], height // s, width // s, device="meta")
    return _count(lambda: vae.decode(z))


def tar_member(nbytes: int) -> int:
    """Bytes a member takes in a tar: a 512-byte header plus the data padded to 512."""
    return TAR_BLOCK + math.ceil(nbytes / TAR_BLOCK) * TAR_BLOCK


def npy_bytes(shape: tuple[int, ...], itemsize: int = 2) -> int:
    """Size of a float16 ``.npy`` file of ``shape`` (format 1.0: a header padded to 128 bytes here)."""
    return 128 + math.prod(shape) * itemsize


def sample_bytes(latent_shape: tuple[int, ...], arrays: int, text_bytes: int = 1024) -> int:
    """Tar bytes of one sample without its image: ``arrays`` float16 latents (latent, mid, …) and the
    json + txt members (``text_bytes`` each at most; 715 and 39 bytes on the toy store)."""
    return arrays * tar_member(npy_bytes(latent_shape)) + 2 * tar_member(text_bytes)


def plan(configs: dict, height: int, width: int, caption_tokens: int, text_tokens: int, steps: int,
         samples: int, peak_tflops: float, save: int, measured_ips: float | None,
         fastest_ips: float | None = None) -> dict:
    s = vae_scale(configs["vae"])
    latent_hw = (height // s, width // s)
    t_call, params = transformer_flops(configs["transformer"], latent_hw, caption_tokens)
    te = text_encoder_flops(configs["text_encoder"], text_tokens)
    vae = vae_decode_flops(configs["vae"], height, width)
    teacher = steps * t_call + te + vae
    student = 2 * t_call + te + vae
    floor_s = teacher / (peak_tflops * 1e12)
    latent_shape = (configs["vae"]["latent_channels"], *latent_hw)
    per_sample = sample_bytes(latent_shape, arrays=1 + save)
    raw_image = tar_member(height * width * 3)
    out = {
        "height": height, "width": width, "latent_shape": list(latent_shape),
        "image_tokens": latent_hw[0] * latent_hw[1] // 4, "caption_tokens": caption_tokens,
        "text_encoder_tokens": text_tokens, "transformer_params": params,
        "flops": {"transformer_call": t_call, "text_encoder": te, "vae_decode": vae,
                  f"teacher_{steps}_steps": teacher, "student_2_steps": student},
        "peak_tflops": peak_tflops,
        "floor": {"seconds_per_image": floor_s, "images_per_gpu_hour": 3600 / floor_s,
                  "gpu_hours": samples * floor_s / 3600},
        "bytes_per_sample": {"latents_only": per_sample, "with_image_at_most": per_sample + raw_image},
        "storage": {"latents_only": samples * per_sample, "with_image_at_most": samples * (per_sample + raw_image)},
        "samples": samples,
    }
    for key, ips in (("measured", measured_ips), ("fastest", fastest_ips)):
        if ips:
            out[key] = {"images_per_second": ips, "images_per_gpu_hour": ips * 3600, "gpu_hours": samples / ips / 3600,
                        "fraction_of_peak": ips * teacher / (peak_tflops * 1e12)}
    return out


def read_bench(path: str) -> dict:
    """The worker's and the fastest path's images/s from bench_generate_gpu.py's results file."""
    bench = _read_json(path, "bench_generate_gpu.py (or gpu_truth.py)")
    if not isinstance(bench.get("median_worker"), (int, float)):
        raise SystemExit(f"{path}: no median_worker; expected the results of bench_generate_gpu.py --out")
    fastest = (bench.get("fastest_path") or {}).get("images_per_s")
    return {"worker": float(bench["median_worker"]), "fastest": float(fastest) if fastest else None,
            "fastest_name": (bench.get("fastest_path") or {}).get("name"), "device": bench.get("device"),
            "tiny": bool(bench.get("tiny"))}


def _read_json(path: str, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: cannot read it as JSON ({e}); expected the results of {what}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a JSON object, the results of {what}")
    return data


def training_plan(path: str, samples: int, gpus: int = 8) -> dict:
    """Training throughput per ``gpus``-GPU node from bench_train_gpu.py's results file: full-parameter
    students at each measured batch (step time extrapolated to 30 layers, FSDP communication not
    included, so a bound from below on time) and LoRA students (one full-depth step, DDP: one
    student per GPU). Node-hours are for ``samples`` training samples seen."""
    bench = _read_json(path, "bench_train_gpu.py (or gpu_truth.py)")
    slope, lora = bench.get("slope"), bench.get("lora")
    if not isinstance(slope, dict) and not isinstance(lora, dict):
        raise SystemExit(f"{path}: neither slope nor lora; expected the results of bench_train_gpu.py --out")
    out: dict = {"device": bench.get("device"), "tiny": bool(bench.get("tiny")), "gpus_per_node": gpus, "rows": []}
    for key, row in sorted((slope or {}).items()):
        if not key.startswith("batch=") or not (row.get("step_s_at_30") or 0) > 0:
            continue  # no extrapolation, or a non-positive one from noisy timings
        ips = gpus * int(key[6:]) / row["step_s_at_30"]
        out["rows"].append({"kind": "full", "batch_per_gpu": int(key[6:]), "step_s": row["step_s_at_30"],
                            "images_per_s_per_node": ips, "node_hours": samples / ips / 3600,
                            "per_gpu_gib": (row.get("fsdp8") or {}).get("per_gpu_gib_estimate")})
    if isinstance(lora, dict) and lora.get("step_s"):
        ips = gpus * int(lora["batch"]) / lora["step_s"]
        out["rows"].append({"kind": f"lora{lora['rank']}", "batch_per_gpu": int(lora["batch"]), "step_s": lora["step_s"],
                            "images_per_s_per_node": ips, "node_hours": samples / ips / 3600,
                            "per_gpu_gib": lora.get("peak_gib"), "layers": lora.get("layers")})
    return out


def fleet_plan(p: dict, gpus: int, prompts: int, shard_size: int, driver_ms_per_shard: float | None) -> dict:
    """What a fleet of ``gpus`` generating ``prompts`` samples asks of the store and the driver, at the
    measured generation rate where there is one (else the floor)."""
    key = "measured" if "measured" in p else "floor"
    rate = p[key]
    ips_fleet = gpus * rate["images_per_gpu_hour"] / 3600
    shards = math.ceil(prompts / shard_size)
    commits_per_s = ips_fleet / shard_size
    out = {"gpus": gpus, "prompts": prompts, "shard_size": shard_size, "rate_from": key, "shards": shards,
           "wall_days": prompts / ips_fleet / 86400, "gpu_hours": prompts / rate["images_per_gpu_hour"],
           "images_per_s": ips_fleet, "commits_per_s": commits_per_s,
           "puts_per_s": PUTS_PER_SHARD * commits_per_s,
           "requests": PUTS_PER_SHARD * shards,
           "rerun_requests": RERUN_FIXED_REQUESTS + math.ceil(PUTS_PER_SHARD * shards / 1000),  # a key a PUT
           "index_bytes": INDEX_BYTES_PER_SHARD * shards,
           "storage_latents_only": prompts * p["bytes_per_sample"]["latents_only"],
           "storage_with_image_at_most": prompts * p["bytes_per_sample"]["with_image_at_most"]}
    if driver_ms_per_shard is not None:
        out["driver_ms_per_shard"] = driver_ms_per_shard
        out["driver_core_fraction"] = commits_per_s * driver_ms_per_shard / 1000
    return out


def read_fleet_bench(path: str) -> float:
    """The driver's CPU per shard from bench_fleet.py's results: the largest dispatch-loop figure
    (``dispatch_cpu_ms_per_shard``, start-up excluded) where any run has one, else the largest
    whole-run figure (``driver_cpu_ms_per_shard``, start-up included)."""
    data = _read_json(path, "tests/benchmarks/bench_fleet.py --out")
    runs = data.get("runs", [data])
    for key in ("dispatch_cpu_ms_per_shard", "driver_cpu_ms_per_shard"):
        vals = [v for v in (r.get(key) for r in runs) if isinstance(v, (int, float))]
        if vals:
            return max(vals)
    raise SystemExit(f"{path}: no dispatch_cpu_ms_per_shard or driver_cpu_ms_per_shard; expected the results "
                     "of bench_fleet.py --out")


def fleet_table(f: dict) -> str:
    rate = "the measured rate" if f["rate_from"] == "measured" else "the FLOP floor"
    rows = [
        ("GPUs / prompts / rows per shard", f"{f['gpus']:,} / {f['prompts']:,} / {f['shard_size']}"),
        ("shards", f"{f['shards']:,}"),
        (f"wall-clock at {rate}", f"{f['wall_days']:.1f} days ({f['gpu_hours']:,.0f} GPU-hours)"),
        ("samples per second, whole fleet", f"{f['images_per_s']:,.0f}"),
        ("shard commits per second", f"{f['commits_per_s']:.2f}"),
        ("store PUTs per second (2 a commit)",
         f"{f['puts_per_s']:.1f} (S3 allows {S3_PUTS_PER_S_PER_PREFIX:,} per prefix)"),
        ("store requests for the whole job (commits)", f"{f['requests']:,}"),
        ("requests of a no-op rerun (LIST + fixed)", f"{f['rerun_requests']:,}"),
        ("index.json", f"≈ {f['index_bytes'] / 1e6:,.0f} MB"),
        ("storage, latents only / with images (bound)",
         f"{f['storage_latents_only'] / 1e12:,.0f} TB / ≤ {f['storage_with_image_at_most'] / 1e12:,.0f} TB"),
    ]
    if "driver_core_fraction" in f:
        rows.append(("driver CPU (measured per shard × commits per second)",
                     f"{f['driver_ms_per_shard']:.2f} ms a shard: {100 * f['driver_core_fraction']:.2f}% of one core"))
    lines = ["| fleet | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def table(p: dict) -> str:
    def tf(x):
        return f"{x / 1e12:,.1f} TFLOP"

    f = p["flops"]
    teacher_key = next(k for k in f if k.startswith("teacher_"))
    rows = [
        ("transformer parameters", f"{p['transformer_params'] / 1e9:.2f} B"),
        ("image tokens / caption tokens", f"{p['image_tokens']:,} / {p['caption_tokens']}"),
        ("FLOPs per transformer call", tf(f["transformer_call"])),
        (f"FLOPs per image, text encoder ({p['text_encoder_tokens']} tokens)", tf(f["text_encoder"])),
        ("FLOPs per image, VAE decode", tf(f["vae_decode"])),
        (f"FLOPs per image, teacher {teacher_key.split('_')[1]} steps", tf(f[teacher_key])),
        ("FLOPs per image, 2-step student", tf(f["student_2_steps"])),
        (f"floor: images per GPU-hour at {p['peak_tflops']:g} TFLOP/s",
         f"{p['floor']['images_per_gpu_hour']:,.0f} ({p['floor']['seconds_per_image']:.3f} s/image)"),
    ]
    for what in ("bench", "training"):
        if p.get(what):
            smoke = " (tiny CPU smoke run: not a capacity figure)" if p[what].get("tiny") else ""
            rows.append((f"{'generation' if what == 'bench' else 'training'} measured on", f"{p[what]['device']}{smoke}"))
    for key, label in (("measured", "measured, generation worker"), ("fastest", "measured, fastest path")):
        if key in p:
            m = p[key]
            rows.append((f"{label}: images per GPU-hour", f"{m['images_per_gpu_hour']:,.0f} "
                         f"({100 * m['fraction_of_peak']:.0f}% of peak)"))
    b, st, n = p["bytes_per_sample"], p["storage"], p["samples"]
    rows += [
        ("bytes per sample, --image-format none", f"{b['latents_only']:,} B"),
        ("bytes per sample, with an image (raw-RGB bound)", f"≤ {b['with_image_at_most']:,} B"),
        (f"GPU-hours for {n:,} samples at the floor", f"{p['floor']['gpu_hours']:,.0f}"),
    ]
    for key, label in (("measured", "generation worker"), ("fastest", "fastest path")):
        if key in p:
            rows.append((f"GPU-hours for {n:,} samples, {label}", f"{p[key]['gpu_hours']:,.0f}"))
    rows += [
        (f"storage for {n:,} samples, latents only", f"{st['latents_only'] / 1e9:,.0f} GB"),
        (f"storage for {n:,} samples, with images (bound)", f"≤ {st['with_image_at_most'] / 1e9:,.0f} GB"),
    ]
    for r in (p.get("training") or {}).get("rows", []):
        what = (f"full-parameter students, FSDP, {r['batch_per_gpu']}/GPU (30 layers extrapolated)" if r["kind"] == "full"
                else f"LoRA rank {r['kind'][4:]} students, DDP, {r['batch_per_gpu']}/GPU")
        mem = f", ≈ {r['per_gpu_gib']:.0f} GiB/GPU" if r.get("per_gpu_gib") else ""
        rows.append((f"training, {what}: samples/s per 8-GPU node", f"{r['images_per_s_per_node']:,.2f} "
                     f"({r['step_s']:.2f} s/step{mem})"))
        rows.append((f"training, {what}: node-hours per {n:,} samples", f"{r['node_hours']:,.1f}"))
    lines = [f"| {p['height']}×{p['width']} | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default=None,
                    help="a ZImagePipeline folder whose component configs to read (default: the published "
                         "Z-Image-Turbo configs)")
    ap.add_argument("--height", type=int, default=1024, help="image height in pixels (default: 1024)")
    ap.add_argument("--width", type=int, default=1024, help="image width in pixels (default: 1024)")
    ap.add_argument("--caption-tokens", type=int, default=128,
                    help="caption tokens the transformer sees per image (default: 128)")
    ap.add_argument("--text-tokens", type=int, default=512,
                    help="tokens the text encoder runs over per prompt, padding included (default: 512)")
    ap.add_argument("--steps", type=int, default=8, help="teacher steps (default: 8)")
    ap.add_argument("--samples", type=int, default=1_000_000, help="store size to plan for (default: 1,000,000)")
    ap.add_argument("--save", type=int, default=1,
                    help="float16 arrays stored beside the final latent: 1 = mid (the default of twostep "
                         "generate --save mid), 2 = mid and noise")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                    help="the GPU's dense bf16 peak in TFLOP/s (default: 989, H100/H200 SXM)")
    ap.add_argument("--bench", default=None,
                    help="results_generate_gpu.json of tests/benchmarks/gpu_truth.py: adds the measured rates")
    ap.add_argument("--train-bench", default=None,
                    help="results_train_gpu.json of tests/benchmarks/gpu_truth.py: adds training throughput per node")
    ap.add_argument("--gpus", type=int, default=1000, help="fleet size for the fleet table (default: 1,000)")
    ap.add_argument("--prompts", type=int, default=100_000_000,
                    help="samples the fleet generates (default: 100,000,000)")
    ap.add_argument("--shard-size", type=int, default=256, help="rows per shard (default: 256, twostep generate's)")
    ap.add_argument("--fleet-bench", default=None,
                    help="results of tests/benchmarks/bench_fleet.py --out: adds the driver's CPU load")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the Markdown tables")
    args = ap.parse_args(argv)
    bench = read_bench(args.bench) if args.bench else {}
    training = training_plan(args.train_bench, args.samples) if args.train_bench else None
    p = plan(load_configs(args.pipeline), args.height, args.width, args.caption_tokens, args.text_tokens,
             args.steps, args.samples, args.peak_tflops, args.save, bench.get("worker"), bench.get("fastest"))
    if bench:
        p["bench"] = bench
    if training:
        p["training"] = training
    p["fleet"] = fleet_plan(p, args.gpus, args.prompts, args.shard_size,
                            read_fleet_bench(args.fleet_bench) if args.fleet_bench else None)
    print(json.dumps(p, indent=1) if args.json else table(p) + "\n\n" + fleet_table(p["fleet"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
