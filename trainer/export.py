"""Export the trained 2-step student as a diffusers pipeline folder, and load it back.

Two layouts, chosen by ``export_student`` from whether the student has one parameter set or two:

* **Two transformers** (``transformer`` = step 1, σ=1 → σ_mid; ``transformer_2`` = step 2, σ_mid → 0;
  Wan 2.2's naming). The folder holds ``TwoStepZImagePipeline``'s components, ``sigma_mid`` in
  ``model_index.json``, and copies of ``pipeline_twostep.py`` (imports only torch, diffusers and the
  file beside it) and ``zimage_batched.py`` (the batched transformer forward; imports only torch).
  ``model_index.json`` names the first as ``"_class_name": ["pipeline_twostep", "TwoStepZImagePipeline"]``;
  diffusers copies the second along with it, since the first imports it relatively.
  Load it with one of::

      DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)   # no twostep needed
      TwoStepZImagePipeline.from_pretrained(folder)                       # twostep's installed class
      load_student(folder)                                                # the same, plus device/dtype

  Plain ``DiffusionPipeline.from_pretrained(folder)`` (no arguments) cannot load it: diffusers 0.42
  resolves a string ``_class_name`` with ``getattr(diffusers, name)`` (only diffusers' own classes),
  and a ``[file, class]`` pair to the file shipped in the folder, which ``get_cached_module_file``
  refuses to execute without ``trust_remote_code=True`` (also for local folders). It then raises
  a ``ValueError`` that says to pass ``trust_remote_code=True``; it never silently loads a 1-transformer
  pipeline. ``TwoStepZImagePipeline.from_pretrained`` avoids the flag because the class reads the
  ``[file, class]`` pair naming itself as its own name (see ``TwoStepZImagePipeline.load_config``).

* **Shared parameters** (``transformer_2=None``): a stock ``ZImagePipeline`` folder, which plain
  ``DiffusionPipeline.from_pretrained(folder)`` loads. No diffusers config stores steps, so the 2-step
  settings are in ``twostep_student.json`` and the README: the stock call
  ``pipe(prompt, num_inference_steps=2, sigmas=<stock_sigmas>, guidance_scale=0.0)`` with the
  *unshifted* sigmas recorded there (``[1.0, 0.5]`` for σ_mid = 0.75 under shift 3) reproduces the
  student, and ``load_student`` returns a ``TwoStepZImagePipeline`` (``transformer_2=None``) that
  samples it without any arguments.

Both layouts carry ``twostep_student.json`` (sigma_mid, num_steps 2, sigmas, ``extra``) and a
README model card. Folders exported by earlier versions say ``boundary_sigma`` where these say
``sigma_mid``; they load all the same (``TwoStepZImagePipeline.load_config``, :func:`load_student`). Weights are safetensors. Text encoder, tokenizer, VAE and scheduler come from
the teacher pipeline.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .pipeline_twostep import (
    BATCHED_FILE,
    DEFAULT_SIGMA_MID,
    LEGACY_CONFIG_KEYS,
    PIPELINE_CLASS,
    PIPELINE_FILE,
    TwoStepZImagePipeline,
    rename_legacy_keys,
    student_sigmas,
)

log = logging.getLogger(__name__)

STUDENT_JSON = "twostep_student.json"
FORMAT_VERSION = 1


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain model under DDP/FSDP-style ``.module`` and ``torch.compile``'s ``._orig_mod`` wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, torch.nn.parallel.DistributedDataParallel) or (
                type(module).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel")
                and hasattr(module, "module")):
            module = module.module
        else:
            return module


def stock_sigmas(scheduler: Any, sigma_mid: float) -> list[float] | None:
    """The ``sigmas=`` argument that makes a stock ``ZImagePipeline`` (``num_inference_steps=2``) visit
    exactly ``[1, sigma_mid, 0]``: the *unshifted* grid, since ``set_timesteps`` shifts what it is
    given. Checked by running a copy of the scheduler; None when the scheduler shifts by resolution
    (``use_dynamic_shifting``), where no single list is right for every image size."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg = scheduler.config
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or cfg.get("use_dynamic_shifting"):
        return None
    b = student_sigmas(sigma_mid)[1]
    shift = float(cfg.get("shift", 1.0))
    s = b / (shift - (shift - 1.0) * b)  # inverse of σ = shift·s / (1 + (shift - 1)·s)
    probe = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    probe.set_timesteps(sigmas=[1.0, s], device="cpu")
    got = [float(v) for v in probe.sigmas]
    if len(got) != 3 or max(abs(g - w) for g, w in zip(got, student_sigmas(b))) > 1e-6:
        return None
    return [1.0, round(s, 8)]


def _model_card(layout: str, info: dict[str, Any]) -> str:
    b = info["sigma_mid"]
    head = ("---\nlibrary_name: diffusers\npipeline_tag: text-to-image\n"
            "tags:\n- twostep\n- z-image\n- distillation\n- text-to-image\n---\n\n")
    intro = (f"# 2-step Z-Image student\n\nA 2-step text-to-image student distilled from an 8-step Z-Image "
             f"teacher with `twostep`. It samples with exactly 2 transformer calls at noise levels "
             f"σ = {info['sigmas']} and no classifier-free guidance.\n\n")
    if layout == "two_transformers":
        how = (
            f"Two parameter sets split by noise level (Wan 2.2's convention): `transformer` takes "
            f"σ=1 → {b}, `transformer_2` takes {b} → 0. The pipeline class ships in this folder "
            f"(`{PIPELINE_FILE}.py`, and `{BATCHED_FILE}.py` for its batched transformer forward; only "
            "torch and diffusers).\n\n"
            "## Load and sample\n\n```python\nimport torch\nfrom diffusers import DiffusionPipeline\n\n"
            "pipe = DiffusionPipeline.from_pretrained(\"PATH\", trust_remote_code=True, "
            "dtype=torch.bfloat16).to(\"cuda\")\n"
            "image = pipe(\"a red cube on a blue floor\", "
            "generator=torch.Generator(\"cpu\").manual_seed(0)).images[0]\nimage.save(\"sample.png\")\n```\n\n"
            "`trust_remote_code=True` is needed because the class is not part of diffusers; read "
            f"`{PIPELINE_FILE}.py` and `{BATCHED_FILE}.py` first. With `twostep` installed, "
            "`twostep.trainer.export.load_student(\"PATH\")` (or "
            "`TwoStepZImagePipeline.from_pretrained`) loads it without that flag, and "
            "`twostep sample --student PATH --prompt \"...\"` writes PNGs.\n"
        )
    else:
        call = info.get("stock_call")
        stock = (f"pipe(\"a red cube on a blue floor\", num_inference_steps=2, sigmas={call['sigmas']}, "
                 f"guidance_scale=0.0,\n             generator=torch.Generator(\"cpu\").manual_seed(0))"
                 if call else "...  # this scheduler shifts by resolution: use load_student below")
        how = (
            "One parameter set for both steps, saved as a stock `ZImagePipeline`.\n\n"
            "## Load and sample\n\n```python\nimport torch\nfrom diffusers import DiffusionPipeline\n\n"
            "pipe = DiffusionPipeline.from_pretrained(\"PATH\", dtype=torch.bfloat16).to(\"cuda\")\n"
            f"image = {stock}.images[0]\n```\n\n"
            "Always pass these settings: `ZImagePipeline` defaults to 50 steps with guidance 5. "
            "`sigmas` is the *unshifted* grid: the scheduler's shift maps it to "
            f"{info['sigmas']}. With `twostep` installed, `twostep.trainer.export.load_student(\"PATH\")` "
            "returns a pipeline that samples the 2 steps with no arguments, and "
            "`twostep sample --student PATH --prompt \"...\"` writes PNGs.\n"
        )
    facts = "\n## Export facts\n\n```json\n" + json.dumps(info, indent=2, sort_keys=True, default=str) + "\n```\n"
    return head + intro + how + facts


def export_student(out_dir: str | os.PathLike, teacher_pipe: Any, transformer: torch.nn.Module,
                   transformer_2: torch.nn.Module | None = None, sigma_mid: float = DEFAULT_SIGMA_MID,
                   extra: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write the student to ``out_dir`` as a pipeline folder (see the module docstring for layouts).

    ``teacher_pipe``: the teacher's ``ZImagePipeline`` (or a ``Teacher``), source of text encoder,
    tokenizer, VAE and scheduler. ``sigma_mid``: the boundary the student was trained at (the trainer
    passes its store's). ``transformer`` / ``transformer_2``: the step-1 / step-2 models
    (``transformer_2=None``: shared parameters, stock ``ZImagePipeline`` layout); DDP and
    ``torch.compile`` wrappers are unwrapped; weights are saved in their current dtype.
    ``extra``: JSON-serialisable facts for ``twostep_student.json`` (run id, step, metrics …).
    The folder is written beside ``out_dir`` and renamed into place; an existing ``out_dir`` is
    replaced only with ``overwrite=True``. Returns the folder's path.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
    pipe_src = getattr(teacher_pipe, "pipe", teacher_pipe)
    sigmas = student_sigmas(sigma_mid)
    components = dict(scheduler=pipe_src.scheduler, vae=pipe_src.vae, text_encoder=pipe_src.text_encoder,
                      tokenizer=pipe_src.tokenizer, transformer=_unwrap(transformer))
    info: dict[str, Any] = {
        "format": "twostep-student", "format_version": FORMAT_VERSION,
        "num_steps": 2, "sigma_mid": sigmas[1], "sigmas": sigmas,
        "timesteps": [1.0 - s for s in sigmas[:-1]], "guidance_scale": 0.0,
    }
    if transformer_2 is not None:
        from diffusers import __version__ as diffusers_version

        student = TwoStepZImagePipeline(**components, transformer_2=_unwrap(transformer_2),
                                        sigma_mid=sigmas[1])
        layout = "two_transformers"
        info.update(layout=layout, pipeline_class=[PIPELINE_FILE, PIPELINE_CLASS],
                    load="DiffusionPipeline.from_pretrained(path, trust_remote_code=True)",
                    diffusers_version=diffusers_version)
    else:
        from diffusers import ZImagePipeline
        from diffusers import __version__ as diffusers_version

        student = ZImagePipeline(**components)
        layout = "shared"
        stock = stock_sigmas(pipe_src.scheduler, sigmas[1])
        info.update(layout=layout, pipeline_class="ZImagePipeline",
                    load="DiffusionPipeline.from_pretrained(path)",
                    stock_call=None if stock is None else {"num_inference_steps": 2, "sigmas": stock,
                                                           "guidance_scale": 0.0},
                    diffusers_version=diffusers_version)
    info["extra"] = dict(extra or {})
    # Fail on unserialisable extras before writing gigabytes.
    info_json = json.dumps(info, indent=2, sort_keys=True) + "\n"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    try:
        student.save_pretrained(tmp, safe_serialization=True)
        (tmp / STUDENT_JSON).write_text(info_json, encoding="utf-8")
        (tmp / "README.md").write_text(_model_card(layout, info), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported the %s student (σ_mid=%g) to %s", layout, sigmas[1], out)
    return out


def read_student_info(path: str | os.PathLike) -> dict[str, Any]:
    """``twostep_student.json`` of an exported folder ({} when the folder has none), with the keys of
    earlier versions under their present names (``boundary_sigma`` → ``sigma_mid``)."""
    p = Path(path) / STUDENT_JSON
    return rename_legacy_keys(json.loads(p.read_text(encoding="utf-8")) if p.exists() else {})


def load_student(path: str | os.PathLike, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> TwoStepZImagePipeline:
    """Load an exported student (either layout) as a ``TwoStepZImagePipeline`` using twostep's own class,
    so no folder code runs and no ``trust_remote_code`` is needed. For the shared layout
    ``transformer_2`` is None and ``sigma_mid`` comes from ``twostep_student.json``. Folders exported by
    earlier versions (``boundary_sigma``) load too."""
    path = str(path)
    index_path = os.path.join(path, "model_index.json")
    if not os.path.exists(index_path):
        raise FileNotFoundError(f"{path}: not a pipeline folder (no model_index.json)")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if not ({"sigma_mid", *LEGACY_CONFIG_KEYS} & index.keys()):  # the shared layout: a stock ZImagePipeline
        kwargs["sigma_mid"] = float(read_student_info(path).get("sigma_mid", DEFAULT_SIGMA_MID))
    pipe = TwoStepZImagePipeline.from_pretrained(path, **kwargs)
    if device is not None:
        pipe.to(device)
    return pipe
