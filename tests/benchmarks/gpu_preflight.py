"""Preflight of the GPU script: what every later section needs, checked in about 10 s, so that a
time-limited GPU machine is never spent on a run that was going to fail (docs/gpu.md).

Checks, in order, and stops at nothing (every failure is listed):

1. ``imports``: torch, transformers, accelerate, peft, diffusers, webdataset, braceexpand,
   safetensors, pyarrow and the project's modules the benchmarks run (worker, trainer, exported
   pipeline), with their versions and where each came from.
2. ``device``: CUDA present (not with ``--tiny``), its name, total and free memory, bf16 support.
3. ``cli``: ``python -m twostep.cli --help`` and ``python -m twostep.cli train --help`` run from a
   folder outside the repository, as the FSDP section launches the trainer: the installed package
   answers, not a partial ``twostep/`` folder of the current directory.
4. ``diffusers``: the installed diffusers with the installed transformers builds a tiny random
   ``ZImagePipeline`` on the device and runs one transformer step to finite latents.

    python tests/benchmarks/gpu_preflight.py --out preflight.json          # on the GPU machine
    python tests/benchmarks/gpu_preflight.py --tiny --out /tmp/pre.json    # on a CPU

Exit status 0 when every check passes, 2 otherwise (the reasons are printed and in ``--out``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

MODULES = ("torch", "transformers", "accelerate", "peft", "diffusers", "webdataset", "braceexpand", "safetensors",
           "pyarrow", "twostep", "twostep.cli", "twostep.pipeline.worker", "twostep.trainer.loop",
           "twostep.trainer.pipeline_twostep")


def check_imports() -> dict:
    out = {}
    for name in MODULES:
        mod = importlib.import_module(name)
        out[name] = {"version": getattr(mod, "__version__", None), "file": getattr(mod, "__file__", None)}
    return out


def check_device(tiny: bool) -> dict:
    import torch

    if not torch.cuda.is_available():
        if tiny:
            return {"cuda": False, "device": "cpu"}
        raise RuntimeError("CUDA is not available: torch.cuda.is_available() is False")
    free, total = torch.cuda.mem_get_info()
    return {"cuda": True, "device": torch.cuda.get_device_name(0), "total_gib": round(total / 2**30, 1),
            "free_gib": round(free / 2**30, 1), "bf16": torch.cuda.is_bf16_supported(),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))), "torch_cuda": torch.version.cuda}


def check_cli() -> dict:
    """The trainer's module entry point from outside the repository (PYTHONSAFEPATH as the FSDP
    section runs it): the package that answers must be the installed one, whole."""
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    out = {}
    with tempfile.TemporaryDirectory(prefix="preflight-") as cwd:
        for argv in (["--help"], ["train", "--help"]):
            r = subprocess.run([sys.executable, "-m", "twostep.cli", *argv], capture_output=True, text=True,
                               timeout=120, cwd=cwd, env=env)
            if r.returncode != 0 or "usage" not in r.stdout:
                raise RuntimeError(f"python -m twostep.cli {' '.join(argv)} (cwd {cwd}) exited {r.returncode}: "
                                   f"{(r.stderr or r.stdout)[-1500:]}")
            out[" ".join(argv)] = "ok"
    return out


def check_diffusers(tiny: bool) -> dict:
    import gpu_common as gc
    import torch

    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pipe = gc.build_pipeline(gc.arch_config("tiny"), device, dtype, 64)
    lat = pipe(prompt=["a red cube"], num_inference_steps=1, guidance_scale=0.0, height=64, width=64,
               generator=[torch.Generator("cpu").manual_seed(0)], output_type="latent").images
    if not bool(torch.isfinite(lat.float()).all()):
        raise RuntimeError("the tiny ZImagePipeline's latents are not finite")
    return {"latent_shape": list(lat.shape), "dtype": str(dtype)}


CHECKS = (("imports", lambda a: check_imports()), ("device", lambda a: check_device(a.tiny)),
          ("cli", lambda a: check_cli()), ("diffusers", lambda a: check_diffusers(a.tiny)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU run: no CUDA required")
    ap.add_argument("--out", default=None, help="preflight JSON (default: printed only)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    result: dict = {"ok": True, "failed": {}, "check_s": {}}
    for name, fn in CHECKS:
        t = time.perf_counter()
        try:
            result[name] = fn(args)
        except Exception as e:
            result["ok"] = False
            result["failed"][name] = f"{type(e).__name__}: {e}"[:3000]
            result[f"{name}_traceback"] = traceback.format_exc()[-3000:]
            print(f"[preflight] {name} FAILED: {result['failed'][name]}", flush=True)
        else:
            print(f"[preflight] {name} ok", flush=True)
        result["check_s"][name] = round(time.perf_counter() - t, 2)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(f"[preflight] {'passed' if result['ok'] else 'FAILED'} in {result['seconds']} s", flush=True)
    return 0 if result["ok"] else 2


if __name__ == "__main__":
    raise SystemExit(main())
