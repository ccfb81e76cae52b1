"""Profiler helpers for bench_generate_gpu.py: named ranges around the worker's stages, and a
torch.profiler trace summarised to what separates the candidate causes of a slow worker
(docs/gpu.md, "What the profile separates"):

* top operators by self GPU time (and self CPU time), side by side for the plain loop and the
  worker: a transformer that runs slower in the worker shows up here (attention kernel choice
  under the caption mask, extra copies);
* host-device synchronisations (``cudaStreamSynchronize``, ``cudaMemcpy*``, ``aten::item``, …);
* GPU busy time over the batch's wall time: a GPU that waits on the host (CPU noise, fingerprints,
  an encode thread holding the GIL) shows up as idle time;
* CPU time inside each named range (``twostep/...``), per stage of the worker.
"""

from __future__ import annotations

import functools
import gzip
import os
import shutil
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType

RANGE_PREFIX = "twostep/"
# Attention operators and kernels (aten's SDPA variants; CUTLASS, flash and cuDNN kernel names).
ATTENTION_NAMES = ("scaled_dot_product", "fmha", "flash", "sdpa", "attention")
# Host calls that wait for the GPU, and the aten ops that cause them.
SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cudaMemcpyAsync", "aten::item", "aten::_local_scalar_dense", "aten::nonzero", "aten::to",
              "aten::copy_")


def _ranged(name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(RANGE_PREFIX + name):
            return fn(*args, **kwargs)
    return wrapper


@contextmanager
def worker_ranges(worker: Any, teacher: Any) -> Iterator[list[str]]:
    """Wrap the worker's and teacher's stages in named ranges for the duration (instance and
    module attributes only: the classes and the worker module's code are left as they are).
    Yields the names wrapped; a stage the current worker does not have is skipped."""
    import twostep.pipeline.worker as worker_mod

    targets = [("teacher", teacher, n) for n in ("make_noise", "encode_prompts", "_guided_velocity", "decode")]
    targets += [("worker", worker, n) for n in ("_encode", "_generate_shard")]
    targets += [("store", worker.store, "commit_shard")]
    targets += [("worker_module", worker_mod, n) for n in ("noise_fingerprint", "tar_bytes", "encode_sample")]
    saved: list[tuple[Any, str, Any, bool]] = []
    names: list[str] = []
    for label, obj, name in targets:
        if not hasattr(obj, name):
            continue
        # a module's function, or an instance attribute already set, is put back; a method is un-shadowed
        put_back = isinstance(obj, types.ModuleType) or name in vars(obj)
        saved.append((obj, name, getattr(obj, name), put_back))
        setattr(obj, name, _ranged(f"{label}.{name}", getattr(obj, name)))
        names.append(f"{label}.{name}")
    try:
        yield names
    finally:
        for obj, name, old, put_back in reversed(saved):
            if put_back:
                setattr(obj, name, old)
            else:
                delattr(obj, name)


def profiler(cuda: bool):
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    return torch.profiler.profile(activities=acts, record_shapes=False, with_stack=False)


def _device_us(e: Any, total: bool = False) -> float:
    if total:
        return float(getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)))
    return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))


def gpu_busy_s(prof: Any) -> float | None:
    """Seconds in which at least one GPU kernel or copy ran (the union of their intervals)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == DeviceType.CUDA)
    if not spans:
        return None
    busy, cur_s, cur_e = 0.0, *spans[0]
    for s, e in spans[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return (busy + cur_e - cur_s) / 1e6


def summarise(prof: Any, wall_s: float, top: int = 15) -> dict[str, Any]:
    """The profile of one batch reduced to numbers (milliseconds; ``device`` = GPU time)."""
    rows = [{"name": e.key, "count": int(e.count), "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
             "cpu_total_ms": round(e.cpu_time_total / 1e3, 3), "self_device_ms": round(_device_us(e) / 1e3, 3),
             "device_total_ms": round(_device_us(e, total=True) / 1e3, 3)} for e in prof.key_averages()]
    busy = gpu_busy_s(prof)
    return {
        "wall_s": round(wall_s, 4),
        "gpu_busy_s": None if busy is None else round(busy, 4),
        "gpu_idle_fraction": None if busy is None else round(max(0.0, 1 - busy / wall_s), 4),
        "top_device": sorted(rows, key=lambda r: -r["self_device_ms"])[:top],
        "top_cpu": sorted(rows, key=lambda r: -r["self_cpu_ms"])[:top],
        "syncs": {r["name"]: {"count": r["count"], "cpu_ms": r["cpu_total_ms"]} for r in rows
                  if any(r["name"].startswith(s) for s in SYNC_NAMES)},
        "attention": [r for r in rows if any(k in r["name"].lower() for k in ATTENTION_NAMES)],
        "ranges": {r["name"][len(RANGE_PREFIX):]: {"count": r["count"], "cpu_ms": r["cpu_total_ms"],
                                                   "device_ms": r["device_total_ms"]}
                   for r in rows if r["name"].startswith(RANGE_PREFIX)},
    }


def side_by_side(bare: dict[str, Any], worker: dict[str, Any], top: int = 15) -> str:
    """A Markdown table of the heaviest operators of both profiles: where the worker's extra time is."""
    key = "self_device_ms" if bare["gpu_busy_s"] is not None else "self_cpu_ms"
    b = {r["name"]: r for r in bare["top_device" if key == "self_device_ms" else "top_cpu"]}
    w = {r["name"]: r for r in worker["top_device" if key == "self_device_ms" else "top_cpu"]}
    names = sorted(set(b) | set(w), key=lambda n: -max(b.get(n, {}).get(key, 0), w.get(n, {}).get(key, 0)))
    lines = [f"| operator | plain loop {key} | worker {key} | worker − plain |", "|---|---|---|---|"]
    for n in names[:top]:
        x, y = b.get(n, {}).get(key), w.get(n, {}).get(key)
        d = "" if x is None or y is None else f"{y - x:+.1f}"
        lines.append(f"| `{n[:70]}` | {'' if x is None else f'{x:.1f}'} | {'' if y is None else f'{y:.1f}'} | {d} |")
    lines += ["", "| | plain loop | worker |", "|---|---|---|"]
    for label, k in (("wall s", "wall_s"), ("GPU busy s", "gpu_busy_s"), ("GPU idle fraction", "gpu_idle_fraction")):
        lines.append(f"| {label} | {bare[k]} | {worker[k]} |")
    for name in sorted(set(bare["syncs"]) | set(worker["syncs"])):
        lines.append(f"| {name} (count) | {bare['syncs'].get(name, {}).get('count', 0)} | "
                     f"{worker['syncs'].get(name, {}).get('count', 0)} |")
    lines += ["", "| worker stage | calls | CPU ms | GPU ms |", "|---|---|---|---|"]
    for name, r in sorted(worker["ranges"].items()):
        lines.append(f"| {name} | {r['count']} | {r['cpu_ms']:.1f} | {r['device_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def save_trace(prof: Any, path: Path, max_bytes: int = 15 * 2**20) -> str | None:
    """The Chrome trace, gzipped, if it stays under ``max_bytes`` (what a GPU machine returns)."""
    raw = path.with_suffix("")  # x.json.gz → x.json
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.remove(raw)
    if path.stat().st_size > max_bytes:
        os.remove(path)
        return None
    return path.name
