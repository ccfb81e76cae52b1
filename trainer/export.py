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

import numpy as np
import torch

from twostep.teacher.families import (
    adapter_for,
    class_name_of,
    family_of_index,
)
from twostep.teacher.families.base import read_model_index

from .pipeline_twostep import (
    DEFAULT_SIGMA_MID,
    PIPELINE_CLASS,
    TwoStepZImagePipeline,
    rename_legacy_keys,
    student_sigmas,
    two_step,
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


def _model_card(info: dict[str, Any], code: list[str], size: int) -> str:
    b, family = info["sigma_mid"], info["family"]
    head = ("---\nlibrary_name: diffusers\npipeline_tag: text-to-image\n"
            f"tags:\n- twostep\n- {family}\n- distillation\n- text-to-image\n---\n\n")
    intro = (f"# 2-step {family} student\n\nA 2-step text-to-image student distilled from a {family} "
             f"teacher with `twostep`. It samples with exactly 2 transformer calls at noise levels "
             f"σ = {info['sigmas']} and no classifier-free guidance.\n\n")
    if info["layout"] == "two_transformers":
        layout = (f"Two parameter sets split by noise level (Wan 2.2's convention): `transformer` takes "
                  f"σ=1 → {b}, `transformer_2` takes {b} → 0.")
    else:
        layout = "One parameter set for both steps, saved as the family's stock pipeline."
    cls = info["pipeline_class"]
    remote = isinstance(cls, list)
    if remote:
        files = ", ".join(f"`{f}`" for f in code)
        layout += (f" The pipeline class `{cls[1]}` ships in this folder ({files}; only torch and diffusers): "
                   "`trust_remote_code=True` is needed because it is not part of diffusers, so read those "
                   "files first.")
    call = info.get("call")
    args = "".join(f", {k}={v!r}" for k, v in (call or {}).items())
    out = ".frames[0][0]  # a one-frame video\nPIL.Image.fromarray((image * 255).round().astype(\"uint8\"))" \
        if family == "wan" else ".images[0]\nimage"
    sample = (f"image = pipe(prompt=\"a red cube on a blue floor\"{args}, height={size}, width={size},\n             "
              f"generator=torch.Generator(\"cpu\").manual_seed(0)){out}.save(\"sample.png\")"
              if call is not None else "# this scheduler shifts by resolution: sample with twostep (below)")
    imports = "import PIL.Image\n" if family == "wan" else ""
    how = ("\n\n## Load and sample\n\n```python\n" + imports + "import torch\nfrom diffusers import DiffusionPipeline\n\n"
           f"pipe = DiffusionPipeline.from_pretrained(\"PATH\"{', trust_remote_code=True' if remote else ''}, "
           "dtype=torch.bfloat16).to(\"cuda\")\n" + sample + "\n```\n\n"
           "Always pass these settings: the stock defaults run more steps, with guidance. With `twostep` "
           "installed, `twostep.trainer.export.load_student(\"PATH\")` loads the folder without "
           "`trust_remote_code`, and `twostep sample --student PATH --prompt \"...\"` writes PNGs.\n")
    facts = "\n## Export facts\n\n```json\n" + json.dumps(info, indent=2, sort_keys=True, default=str) + "\n```\n"
    return head + intro + layout + how + facts


def export_student(out_dir: str | os.PathLike, teacher: Any, transformer: torch.nn.Module,
                   transformer_2: torch.nn.Module | None = None, sigma_mid: float = DEFAULT_SIGMA_MID,
                   extra: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write the student to ``out_dir`` as a pipeline folder (see the module docstring for layouts).

    ``teacher``: the ``Teacher`` (or its family adapter, or its bare diffusers pipeline), source of
    text encoder, tokenizer and VAE. ``sigma_mid``: the boundary the student was trained at (the
    trainer passes its store's). ``transformer`` / ``transformer_2``: the step-1 / step-2 models
    (``transformer_2=None``: shared parameters, the stock layout); DDP and ``torch.compile`` wrappers
    are unwrapped; weights are saved in their current dtype. ``extra``: JSON-serialisable facts for
    ``twostep_student.json`` (run id, step, metrics …). The folder is written beside ``out_dir`` and
    renamed into place; an existing ``out_dir`` is replaced only with ``overwrite=True``. Returns the
    folder's path.
    """
    from diffusers import __version__ as diffusers_version

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
    family = adapter_for(teacher)
    sigmas = student_sigmas(sigma_mid)
    t2 = None if transformer_2 is None else _unwrap(transformer_2)
    student, facts = family.export_pipeline(_unwrap(transformer), t2, sigmas[1])
    info: dict[str, Any] = {
        "format": "twostep-student", "format_version": FORMAT_VERSION, "family": family.name,
        "num_steps": 2, "sigma_mid": sigmas[1], "sigmas": sigmas, "guidance_scale": 0.0,
        **facts, "diffusers_version": diffusers_version, "extra": dict(extra or {}),
    }
    # Fail on unserialisable extras before writing gigabytes.
    info_json = json.dumps(info, indent=2, sort_keys=True) + "\n"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
    try:
        student.save_pretrained(tmp, safe_serialization=True)
        (tmp / STUDENT_JSON).write_text(info_json, encoding="utf-8")
        code = sorted(p.name for p in tmp.glob("*.py"))
        (tmp / "README.md").write_text(_model_card(info, code, family.default_size), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported the %s %s student (σ_mid=%g) to %s", info["layout"], family.name, sigmas[1], out)
    return out


def read_student_info(path: str | os.PathLike) -> dict[str, Any]:
    """``twostep_student.json`` of an exported folder ({} when the folder has none), with the keys of
    earlier versions under their present names (``boundary_sigma`` → ``sigma_mid``)."""
    p = Path(path) / STUDENT_JSON
    return rename_legacy_keys(json.loads(p.read_text(encoding="utf-8")) if p.exists() else {})


def _student_class(name: str) -> type:
    """The class that loads an exported folder whose ``model_index.json`` names ``name``: twostep's
    own student classes (never the folder's copy), else diffusers'."""
    import diffusers

    from . import pipeline_experts

    own = {PIPELINE_CLASS: TwoStepZImagePipeline,
           "TwoStepLumina2Pipeline": pipeline_experts.TwoStepLumina2Pipeline,
           "TwoStepFlux2KleinPipeline": pipeline_experts.TwoStepFlux2KleinPipeline}
    return own.get(name) or getattr(diffusers, name)


def load_student(path: str | os.PathLike, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> Any:
    """Load an exported student (either layout, any family) as a diffusers pipeline, with twostep's
    own classes for the two-transformer layouts (no folder code runs, no ``trust_remote_code``).
    A Z-Image student always loads as ``TwoStepZImagePipeline`` (``transformer_2=None`` for the shared
    layout, ``sigma_mid`` from ``twostep_student.json``), as in earlier versions, whose folders
    (``boundary_sigma``) load too."""
    path = str(path)
    if not os.path.exists(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(f"{path}: not a pipeline folder (no model_index.json)")
    index = read_model_index(path)
    family_of_index(index, path)  # an unsupported family, named
    name = class_name_of(index)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if name == "ZImagePipeline":  # the shared Z-Image layout: twostep's class samples it with no arguments
        name = PIPELINE_CLASS
        kwargs["sigma_mid"] = float(read_student_info(path).get("sigma_mid", DEFAULT_SIGMA_MID))
    pipe = _student_class(name).from_pretrained(path, **kwargs)
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Student:
    """An exported student sampled through its family adapter: the trainer's own 2-step sampler
    (:func:`two_step` with ``Family.velocity``), so eval and ``twostep sample`` see what was trained."""

    def __init__(self, pipe: Any, sigma_mid: float, device: torch.device):
        self.pipe = pipe
        self.family = adapter_for(pipe)
        self.transformer = pipe.transformer
        self.transformer_2 = getattr(pipe, "transformer_2", None)
        self.sigmas = student_sigmas(sigma_mid)
        self.device = device

    @property
    def default_size(self) -> int:
        return self.family.default_size

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return self.family.latent_shape(height, width)

    @torch.no_grad()
    def latents(self, prompts: list[str], noise: torch.Tensor) -> torch.Tensor:
        """Final latents (B, C, h, w) from the noise (B, C, h, w) at σ=1."""
        f = self.family
        caps = f.encode_prompts(list(prompts), self.device, f.max_sequence_length())
        t2 = self.transformer_2 if self.transformer_2 is not None else self.transformer
        _, _, x0 = two_step(lambda x, s: f.velocity(self.transformer, x, s, caps),
                            lambda x, s: f.velocity(t2, x, s, caps), noise.to(self.device), self.sigmas[1])
        return x0

    @torch.no_grad()
    def images(self, prompts: list[str], seeds: list[int], height: int, width: int) -> np.ndarray:
        """uint8 images (B, H, W, 3), from each seed's CPU noise (the store's convention)."""
        from twostep.teacher.core import Teacher

        noise = Teacher.make_noise(seeds, self.latent_shape(height, width))
        return self.family.decode(self.latents(prompts, noise))


def open_student(path: str | os.PathLike, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None) -> Student:
    """:func:`load_student`, wrapped for sampling through the family adapter."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    pipe = load_student(path, device=device, dtype=dtype)
    sigma_mid = getattr(pipe.config, "sigma_mid", None) or read_student_info(path).get("sigma_mid", DEFAULT_SIGMA_MID)
    student = Student(pipe, float(sigma_mid), device)
    for m in (*student.family.modules, student.transformer_2):
        if m is not None:
            m.requires_grad_(False).eval()
    return student
