"""The teacher interface: one class that every stage (generation, trainer, eval) uses.

``Teacher.load(spec)`` takes ``toy`` (the shipped toy teacher), a local pipeline folder of any supported
family, or a hub id (``Tongyi-MAI/Z-Image-Turbo``, optionally ``@revision``); the family's adapter
(:mod:`twostep.teacher.families`) comes from the folder's ``model_index.json``. ``Teacher.generate``
runs the N-step sampler (8 by default) on a batch of (prompt, seed, height, width) and returns the
initial noise, the state at the 2-step boundary (``mid``, σ = σ_mid, 0.75 by default), the final
latent and the decoded image.

Conventions (docs/design.md, "σ and x0"; docs/families.md): latents are the family's unpacked
``(B, C, h, w)`` in the space its transformer sees; ``x_σ = (1 - σ)·x0 + σ·ε``; the adapter's velocity
is ``u = ε - x0``, so ``x0 = x_σ - σ·u`` and an Euler step from σ to σ' is ``x + (σ' - σ)·u``, the
scheduler's own step. Sigmas are the scheduler's shift applied once to the *unshifted* grid
``linspace(1, 1/N, N)`` (docs/design.md, "The sigma grids").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .families import Family, adapter_for, family_of, family_of_hub, family_of_index
from .families.base import euler_step, read_model_index

log = logging.getLogger(__name__)

TOY_TEACHER_DIR = Path(__file__).parent.parent / "toy" / "teacher"
DEFAULT_STEPS = 8
DEFAULT_SIGMA_MID = 0.75
"""σ_mid, the 2-step boundary: the one default, for the sampler that writes ``mid`` into a store and
the trainer's ``model.sigma_mid``, which must agree with the store (docs/design.md, "The mid state")."""
SIGMA_MID_TOL = 1e-4
"""Two σ values within this of each other are the same σ_mid: a step of the sampler's grid and σ_mid
(:attr:`SamplerConfig.mid_index`), and the trainer's ``model.sigma_mid`` and a store's."""
STORE_SIGMA_MID_KEY = "mid_sigma"
"""σ_mid's key in the sampler record a store keeps (:meth:`SamplerConfig.to_dict`; docs/design.md,
"The mid state"): the on-disk name, kept so that old stores read and sampler hashes do not change."""


def step_at(sigmas: tuple[float, ...] | list[float], sigma: float) -> int | None:
    """The index of the step of an N+1-sigma grid (ending at 0) that lands on ``sigma`` within
    :data:`SIGMA_MID_TOL`; None when none does."""
    return next((i for i, s in enumerate(sigmas[:-1]) if abs(s - sigma) < SIGMA_MID_TOL), None)


def recorded_sigma_mid(sampler: dict[str, Any]) -> float | None:
    """σ_mid from a sampler record as a store keeps it (:meth:`SamplerConfig.to_dict`, in a store's
    ``index.json`` under ``teacher.sampler``); None when the record has none."""
    value = (sampler or {}).get(STORE_SIGMA_MID_KEY)
    return None if value is None else float(value)


@dataclass(frozen=True)
class SamplerConfig:
    """The teacher's sampler settings; recorded in every shard, hashed for store identity."""

    num_steps: int = DEFAULT_STEPS
    """Transformer calls per image (Turbo: 8)."""
    guidance_scale: float = 0.0
    """Classifier-free guidance; 0 = off (Turbo). > 0 doubles the batch with negative prompts."""
    shift: float = 3.0
    """Timestep shift of the flow-matching scheduler (from its config)."""
    sigmas: tuple[float, ...] = ()
    """The N+1 noise levels actually used, ending at 0 (read back from the scheduler)."""
    sigma_mid: float = DEFAULT_SIGMA_MID
    """The 2-step boundary; ``mid`` is the state at this σ (recorded as ``mid_sigma``, see :meth:`to_dict`)."""
    max_sequence_length: int = 512
    """Prompt tokens after the chat template (longer prompts are truncated)."""

    def to_dict(self) -> dict[str, Any]:
        """The settings as a store records them (the hash's input): ``sigma_mid`` under its on-disk key
        ``mid_sigma``, in field order, sigmas rounded to 6 decimals."""
        d = {STORE_SIGMA_MID_KEY if k == "sigma_mid" else k: v for k, v in asdict(self).items()}
        d["sigmas"] = [round(float(s), 6) for s in self.sigmas]
        return d

    @property
    def hash(self) -> str:
        """Stable sha256 (first 16 hex digits) of the settings, for shard metadata."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def mid_index(self) -> int | None:
        """Index into ``sigmas`` of the mid state (None when no step lands on ``sigma_mid``)."""
        return step_at(self.sigmas, self.sigma_mid)


@dataclass
class TeacherOutput:
    """What :meth:`Teacher.generate` returns for a batch of B samples."""

    noise: torch.Tensor
    """(B, C, h, w) fp32, the initial state at σ=1, from each sample's seed on a CPU generator."""
    latent: torch.Tensor
    """(B, C, h, w) fp32, the final latent at σ=0."""
    mid: torch.Tensor | None = None
    """(B, C, h, w) fp32, the state at σ=sigma_mid (after 4 of 8 steps), if a step lands there."""
    images: np.ndarray | None = None
    """(B, H, W, 3) uint8 decoded images (None when decoding was not asked for)."""
    nfe: int = 0
    """Transformer calls made per sample (CFG counts once)."""


def noise_fingerprint(noise: torch.Tensor) -> str:
    """sha256 of one sample's fp32 noise bytes (recorded so a later run can check its noise)."""
    return hashlib.sha256(noise.detach().to(torch.float32).cpu().contiguous().numpy().tobytes()).hexdigest()


def seed_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """One sample's fp32 initial noise from its seed on a CPU generator (the store's convention;
    the trainer regenerates it this way and checks :func:`noise_fingerprint`)."""
    return torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(seed)))


def weights_id(path: str, revision: str | None = None) -> str | None:
    """sha256 over a pipeline folder's weight and config files (name and content, in order), or
    ``commit:<sha>`` of a hub snapshot. Stores record it, so retrained weights never mix with old
    samples. Reads every byte once (about 10 s for Z-Image-Turbo's 20 GB on a fast disk)."""
    if not os.path.isdir(path):
        try:
            from huggingface_hub import snapshot_download

            return "commit:" + os.path.basename(snapshot_download(path, revision=revision, local_files_only=True))
        except Exception:
            return None
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file() and f.suffix in (".safetensors", ".json", ".bin", ".txt", ".jinja", ".model"):
            h.update(str(f.relative_to(path)).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


# A hub id: owner/name, optionally @revision (branch, tag or commit); never a path ("/…", "./…", "a/b/c").
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?")


def check_teacher_spec(spec: str, what: str = "teacher") -> None:
    """Raise an error naming ``what`` (a flag or config key) and ``spec`` unless it is ``toy``, a local
    pipeline folder (with ``model_index.json``) or a hub id ``owner/name[@revision]``. Looks at the
    local disk only, so a driver can check its flags before it starts workers or writes anything."""
    if spec == "toy":
        if not (TOY_TEACHER_DIR / "model_index.json").exists():
            raise FileNotFoundError(f"the toy teacher is not in {TOY_TEACHER_DIR}; train it with "
                                    "python -m twostep.toy.train_teacher")
    elif os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "model_index.json")):
            raise FileNotFoundError(f"{what} {spec}: not a diffusers pipeline folder (no model_index.json)")
        index = read_model_index(spec)
        family_of_index(index, f"{what} {spec}")  # an unsupported family, named
        if (index.get("transformer_2") or [None])[0] is not None:
            raise ValueError(f"{what} {spec}: a pipeline with two transformers (a 2-step student with two parameter "
                             "sets, or a Wan 2.2 two-expert pipeline), not a teacher: a teacher samples with one")
    elif os.path.exists(spec):
        raise ValueError(f"{what} {spec}: a file, not a pipeline folder")
    elif not HUB_ID.fullmatch(spec):
        raise FileNotFoundError(f"{what} {spec}: no such folder, and not toy or a hub id (owner/name[@revision])")


def default_sigma_mid(sigmas: tuple[float, ...] | list[float]) -> float:
    """σ_mid for a teacher's N+1 sigmas: :data:`DEFAULT_SIGMA_MID` (Z-Image-Turbo's 4th of 8 steps) when a
    step lands on it, else the σ after half the steps, ``sigmas[N // 2]`` (docs/design.md, "The mid
    state"; docs/families.md)."""
    if step_at(sigmas, DEFAULT_SIGMA_MID) is not None:
        return DEFAULT_SIGMA_MID
    return float(sigmas[(len(sigmas) - 1) // 2])


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Teacher:
    """A diffusers pipeline, through its family adapter (:mod:`twostep.teacher.families`), with the
    project's sampler conventions."""

    def __init__(self, family: Family | Any, name: str, revision: str | None = None,
                 device: torch.device | None = None, **sampler_overrides: Any):
        """``family``: the adapter, or a bare pipeline of a supported class (wrapped in its adapter)."""
        family = adapter_for(family)
        self.family = family
        self.pipe = family.pipe
        self.name, self.revision = name, revision
        self.device = device or self.pipe.device
        self.dtype = self.pipe.transformer.dtype
        self.sampler = self.make_sampler(**sampler_overrides)
        grid = sampler_overrides.get("sigmas")
        self._grid: list[float] | None = None if grid is None else list(grid)
        """The unshifted grid the sampler was made from (None: ``linspace(1, 1/N, N)``)."""
        self._sigmas_at: dict[tuple[int, int], list[float]] = {}
        self.weights: str | None = None
        """Identity of the weights: sha256 over a local folder's files, or the hub commit."""

    # --- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: str = "toy", device: str | torch.device | None = None, dtype: torch.dtype | None = None,
             **sampler_overrides: Any) -> Teacher:
        """Load ``toy``, a local pipeline folder, or a hub id (``owner/name[@revision]``) of any supported
        family (docs/families.md); the adapter comes from the folder's ``model_index.json``.

        Defaults: bf16 on CUDA, fp32 on CPU.
        """
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        revision = None
        check_teacher_spec(spec)
        if spec == "toy":
            path, name = str(TOY_TEACHER_DIR), "toy"
        elif os.path.isdir(spec):
            path, name = spec, os.path.abspath(spec)
        else:
            path, _, revision = spec.partition("@")
            name, revision = path, revision or None
        kind = family_of(path) if os.path.isdir(path) else family_of_hub(path, revision)
        log.info("loading teacher %s (%s, %s, %s)", spec, kind.name, device, dtype)
        family = kind.load(path, dtype, revision)
        family.pipe.to(device)
        family.pipe.set_progress_bar_config(disable=True)
        for m in family.modules:
            m.requires_grad_(False).eval()
        teacher = cls(family, name=name, revision=revision, device=device, **sampler_overrides)
        teacher.weights = weights_id(path, revision)
        return teacher

    # --- sampler -----------------------------------------------------------------------------

    def make_sampler(self, num_steps: int = DEFAULT_STEPS, guidance_scale: float | None = None,
                     sigma_mid: float | None = None, max_sequence_length: int | None = None,
                     sigmas: list[float] | None = None) -> SamplerConfig:
        """Sampler settings from the scheduler's config with the family's defaults, overridable.

        ``sigmas`` (optional) is the *unshifted* grid; the scheduler applies its shift. The recorded
        ``sigmas`` are those at :attr:`default_size` (:meth:`sigmas_at` gives them at any size).
        ``sigma_mid`` (optional): by default :data:`DEFAULT_SIGMA_MID` when a step lands on it, else
        the σ after half the steps (:func:`default_sigma_mid`).
        """
        size = self.default_size
        used = tuple(self.family.sigmas(num_steps, size, size, None if sigmas is None else list(sigmas)))
        sigma_mid = default_sigma_mid(used) if sigma_mid is None else sigma_mid
        guidance = self.family.default_guidance if guidance_scale is None else guidance_scale
        msl = max_sequence_length or self.family.max_sequence_length()
        return SamplerConfig(num_steps=len(used) - 1, guidance_scale=float(guidance), shift=self.family.shift(),
                             sigmas=used, sigma_mid=sigma_mid, max_sequence_length=msl)

    def sigmas_at(self, height: int, width: int) -> list[float]:
        """The sampler's noise levels at one image size (the same at every size unless the family's
        scheduler shifts by resolution), computed once per size."""
        if (height, width) not in self._sigmas_at:
            self._sigmas_at[height, width] = self.family.sigmas(self.sampler.num_steps, height, width, self._grid)
        return self._sigmas_at[height, width]

    def mid_index_at(self, height: int, width: int) -> int | None:
        """The step whose state is ``mid`` (at σ_mid) at one image size; None when no step lands on σ_mid
        there (a family whose scheduler shifts by resolution: docs/families.md)."""
        return step_at(self.sigmas_at(height, width), self.sampler.sigma_mid)

    def with_sampler(self, **overrides: Any) -> Teacher:
        """The same weights (shared, not copied) with other sampler settings: those not given are kept,
        guidance included, so a naive 2-step baseline is ``teacher.with_sampler(num_steps=2)``. The σ
        grid is derived again from ``num_steps`` unless ``sigmas`` is given."""
        s = self.sampler
        kept = {"num_steps": s.num_steps, "guidance_scale": s.guidance_scale, "sigma_mid": s.sigma_mid,
                "max_sequence_length": s.max_sequence_length}
        other = Teacher(self.family, self.name, self.revision, self.device, **{**kept, **overrides})
        other.weights = self.weights
        return other

    # --- components the trainer uses ---------------------------------------------------------

    @property
    def transformer(self):
        return self.family.transformer

    @property
    def vae(self):
        return self.family.vae

    @property
    def text_encoder(self):
        return self.pipe.text_encoder

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (of :meth:`latent_shape`'s ``h`` and ``w``)."""
        return self.family.vae_scale_factor

    @property
    def default_size(self) -> int:
        """Image side used when a manifest gives none: the family's default (1024 for Z-Image-Turbo, 64
        for the toy teacher; docs/families.md)."""
        return self.family.default_size

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The unpacked latent ``(C, h, w)`` of one image (docs/families.md)."""
        return self.family.latent_shape(height, width)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        """Caption features exactly as the pipeline computes them: list of (L_i, D) tensors."""
        return self.family.encode_prompts(list(prompts), self.device, self.sampler.max_sequence_length)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, caps: list[torch.Tensor],
                 transformer: torch.nn.Module | None = None) -> torch.Tensor:
        """``u = ε - x0`` at noise level σ (scalar or (B,)), as fp32 (B, C, h, w), no guidance."""
        return self.family.velocity(transformer or self.transformer, x, sigma, caps)

    @staticmethod
    def make_noise(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
        """(B, *shape) fp32 noise, one CPU generator per seed: independent of batch and device."""
        return torch.stack([seed_noise(s, shape) for s in seeds])

    # --- sampling ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], height: int, width: int, decode: bool = True,
                 negative_prompts: list[str] | None = None, noise: torch.Tensor | None = None) -> TeacherOutput:
        """Run the teacher's sampler on one batch of equal-size samples."""
        cfg = self.sampler
        shape = self.latent_shape(height, width)
        x0 = noise if noise is not None else self.make_noise(seeds, shape)
        caps = self.encode_prompts(prompts)
        neg = None
        if self.family.guides(cfg.guidance_scale):
            neg = self.family.encode_negative_prompts(negative_prompts or [""] * len(prompts), self.device,
                                                      self.sampler.max_sequence_length)
        x = x0.to(self.device, torch.float32)
        mid = None
        sig = self.sigmas_at(height, width)
        mid_index = step_at(sig, cfg.sigma_mid)
        for i in range(len(sig) - 1):
            if i == mid_index:
                mid = x.clone()
            x = euler_step(x, self._guided_velocity(x, sig[i], caps, neg), sig[i], sig[i + 1])
        images = self.decode(x) if decode else None
        return TeacherOutput(noise=x0.cpu(), latent=x.cpu(), mid=None if mid is None else mid.cpu(),
                             images=images, nfe=len(sig) - 1)

    def _guided_velocity(self, x: torch.Tensor, sigma: float, caps: list[torch.Tensor],
                         neg: list[torch.Tensor] | None) -> torch.Tensor:
        if neg is None:
            return self.velocity(x, sigma, caps)
        both = self.velocity(torch.cat([x, x]), sigma, caps + neg)
        pos, negv = both.chunk(2)
        return self.family.guide(pos, negv, self.sampler.guidance_scale, sigma)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents (B, C, h, w) → uint8 images (B, H, W, 3)."""
        return self.family.decode(latents)

    @torch.no_grad()
    def encode_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) images → latents (B, C, h, w), the VAE posterior's mode."""
        return self.family.encode_images(images)

    # --- facts for shard metadata -------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Teacher identity and sampler settings, as recorded in shards and index.json."""
        import diffusers
        import transformers

        return {
            "teacher": self.name, "revision": self.revision, "weights": self.weights,
            "sampler": self.sampler.to_dict(),
            "sampler_hash": self.sampler.hash, "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device.type, "versions": {"torch": torch.__version__,
                                                      "diffusers": diffusers.__version__,
                                                      "transformers": transformers.__version__},
        }
