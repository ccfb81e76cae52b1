"""Shared parts of the GPU benchmarks (bench_generate_gpu.py, bench_train_gpu.py, gpu_truth.py).

Architectures are plain dicts of constructor arguments, so the full Z-Image-Turbo model and the
tiny CPU test model are built by one code path: ``full`` is the published Z-Image-Turbo
configuration (6.15B transformer, Qwen3-4B text encoder, FLUX VAE), ``tiny`` a few hundred
thousand parameters that run on a CPU in seconds. Weights are random (no hub access where these
run); results JSON files carry the device, the torch version and the command that made them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16 peak of the H100/H200 SXM datasheet; KINDS.md-style matmul runs reach ~790 TFLOP/s,
# which each run measures again (matmul_tflops) so fractions can be read against either.
PEAK_BF16_TFLOPS = 989.0

ARCHS: dict[str, dict[str, Any]] = {
    "full": {
        "transformer": dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                            n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True,
                            cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48],
                            axes_lens=[1536, 512, 512]),
        "text_encoder": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                             num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                             max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                             tie_word_embeddings=True),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    layers_per_block=2, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
                    use_quant_conv=False, use_post_quant_conv=False),
    },
    "tiny": {
        "transformer": dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2,
                            n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12],
                            axes_lens=[1024, 512, 512]),
        "text_encoder": dict(vocab_size=512, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                             max_position_embeddings=512),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32),
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                    layers_per_block=1, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159),
    },
}


def arch_config(arch: str, n_layers: int | None = None, dim: int | None = None,
                heads: int | None = None) -> dict[str, Any]:
    """A copy of ``ARCHS[arch]`` with the transformer's depth, width or heads replaced.

    A changed width or head count keeps the RoPE split proportional (``sum(axes_dims)`` must be
    the head dim); the caption projection keeps the text encoder's width."""
    cfg = copy.deepcopy(ARCHS[arch])
    t = cfg["transformer"]
    if n_layers is not None:
        t["n_layers"] = int(n_layers)
    if dim is not None or heads is not None:
        t["dim"], t["n_heads"] = int(dim or t["dim"]), int(heads or t["n_heads"])
        t["n_kv_heads"] = t["n_heads"]
        head = t["dim"] // t["n_heads"]
        if head * t["n_heads"] != t["dim"] or head % 8:
            raise SystemExit(f"--dim {t['dim']} / --heads {t['n_heads']}: the head dim must be a whole multiple of 8")
        t["axes_dims"] = [head // 4, 3 * head // 8, 3 * head // 8]
        t["axes_dims"][0] += head - sum(t["axes_dims"])
    return cfg


def build_transformer(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0):
    """Only the (frozen, random) transformer of ``cfg``: for swapping depths under one text encoder.
    Seeds torch's generator with ``seed`` first, so :func:`build_pipeline`'s other parts follow it."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    with _default_dtype(dtype), torch.device(device):
        model = ZImageTransformer2DModel(**cfg["transformer"])
    # Random weights in bf16 can overflow deep in the stack; keep activations finite so every path
    # does the same work (a NaN does not change the FLOPs, but the image encoders would see garbage).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(0.5)
        # The constructor leaves the pad tokens at zero; a trained model's are not, and with zeros a
        # pad token put in the wrong place would not change the output: give them values.
        for name, p in model.named_parameters():
            if name.endswith("pad_token"):
                p.normal_(0.0, 0.5)
    return model.requires_grad_(False).eval()


def build_pipeline(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype, size: int, seed: int = 0):
    """A random-weight ``ZImagePipeline`` of ``cfg`` built straight on ``device`` in ``dtype``
    (fp32 first would need 40 GB for the full model) and frozen in eval mode."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen3Config, Qwen3Model

    from twostep.teacher.random_zimage import build_tokenizer

    transformer = build_transformer(cfg, device, dtype, seed)
    with _default_dtype(dtype), torch.device(device):
        text_encoder = Qwen3Model(Qwen3Config(**cfg["text_encoder"]))
        vae = AutoencoderKL(**cfg["vae"], sample_size=size)
    tokenizer = build_tokenizer(model_max_length=512)
    if len(tokenizer) > cfg["text_encoder"]["vocab_size"]:
        raise ValueError(f"text encoder vocab {cfg['text_encoder']['vocab_size']} < tokenizer size {len(tokenizer)}")
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = ZImagePipeline(scheduler=sched, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    for m in (text_encoder, vae):
        m.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def apply_preset(args: Any, presets: dict[str, dict[str, Any]]) -> None:
    """Fill every flag left at None from the ``tiny`` or ``full`` preset."""
    for k, v in presets["tiny" if args.tiny else "full"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def manifest(path: Path, rows: int, size: int) -> tuple[str, list[str], list[int]]:
    """A manifest of ``rows`` prompts from the bundled general set (real, varied caption lengths)
    at ``size``²; returns its path, prompts and seeds."""
    import pyarrow.parquet as pq

    from twostep.prompts.build import BuildOptions, build_manifest

    summary = build_manifest(["bundled:general"], path, BuildOptions(per_prompt=max(1, -(-rows // 364)),
                                                                      height=size, width=size))
    table = pq.read_table(summary.manifest)
    return summary.manifest, table.column("prompt").to_pylist(), table.column("seed").to_pylist()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def allocated_gib() -> float | None:
    return round(torch.cuda.memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def total_memory_gib(device: torch.device | None = None) -> float | None:
    """The GPU's memory in GiB (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.get_device_properties(device or 0).total_memory / 2**30, 1)


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def matmul_tflops(device: torch.device, n: int, dtype: torch.dtype, reps: int = 10) -> float:
    """Achieved TFLOP/s of an n×n×n matrix product (the ceiling the transformer is read against)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return round(2 * n**3 * reps / (time.perf_counter() - t0) / 1e12, 3)


def environment(device: torch.device, tiny: bool) -> dict[str, Any]:
    """Device name, versions and the command line: the header of every results file."""
    import diffusers
    import transformers

    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "tiny": tiny, "cpu_only": not cuda, "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
        "diffusers": diffusers.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        # the one command that was run (gpu_truth.py passes its own down), and this script's part of it
        "command": os.environ.get("GPU_TRUTH_COMMAND") or shlex.join(["python", *sys.argv]),
        "part_command": shlex.join(["python", *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


class Results:
    """A results dict written to ``path`` after every section, so a run cut off by its time limit
    still leaves what it measured (``sections_done`` says how far it got)."""

    def __init__(self, path: str | None, header: dict[str, Any]):
        self.path = Path(path) if path else None
        self.data: dict[str, Any] = {**header, "sections_done": [], "section_s": {}, "errors": {}}
        self.t0 = self.t_last = time.perf_counter()

    def section(self, name: str, value: Any = None) -> None:
        """Record a finished section (and the seconds since the previous one ended)."""
        if value is not None:
            self.data[name] = value
        now = time.perf_counter()
        self.data["sections_done"].append(name)
        self.data["section_s"][name] = round(now - self.t_last, 1)
        self.t_last = now
        self.write()

    def error(self, name: str, exc: BaseException) -> None:
        self.data["errors"][name] = f"{type(exc).__name__}: {str(exc)[:2000]}"
        self.t_last = time.perf_counter()
        print(f"[{name}] failed: {self.data['errors'][name]}", flush=True)
        self.write()

    def write(self) -> None:
        self.data["wall_s"] = round(time.perf_counter() - self.t0, 1)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=str))
            tmp.replace(self.path)


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ over all elements, in fp32: how far ``a`` is from the reference ``b``."""
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def count_calls(model: torch.nn.Module) -> list[int]:
    """Transformer calls, counted at the timestep embedder (run once per call by both paths)."""
    calls = [0]
    model.t_embedder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def time_calls(fn, reps: int, warm: int = 1) -> tuple[float, torch.Tensor, float]:
    """(median seconds per call after ``warm`` calls, last output, seconds of the first call)."""
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    first = time.perf_counter() - t0
    for _ in range(warm - 1):
        out = fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out, first


def deadline(budget_s: float | None, deadline_at: float | None) -> float | None:
    """The part's deadline on the monotonic clock: the earlier of ``budget_s`` from now and the
    absolute wall-clock time ``deadline_at`` (what gpu_truth.py passes: one deadline for all)."""
    ends = []
    if budget_s is not None:
        ends.append(time.monotonic() + budget_s)
    if deadline_at is not None:
        ends.append(time.monotonic() + (deadline_at - time.time()))
    return min(ends) if ends else None


def seconds_left(deadline_: float | None) -> float:
    return float("inf") if deadline_ is None else deadline_ - time.monotonic()


def add_deadline_flags(ap: Any) -> None:
    ap.add_argument("--budget-s", type=float, default=None,
                    help="sections start only while this many seconds from the start remain")
    ap.add_argument("--deadline-at", type=float, default=None,
                    help="the same as an absolute time (seconds since the epoch; gpu_truth.py passes one "
                         "deadline for the whole command)")


def budget_left(deadline: float | None, need_s: float = 0.0) -> bool:
    """True when there is no deadline or at least ``need_s`` seconds remain before it."""
    return deadline is None or time.monotonic() + need_s < deadline
