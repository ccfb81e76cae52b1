"""The teacher interface: one class that every stage (generation, trainer, eval) uses.

``Teacher.load(spec)`` takes ``toy`` (the shipped toy teacher), a local ``ZImagePipeline`` folder, or a
hub id (``Tongyi-MAI/Z-Image-Turbo``, optionally ``@revision``). ``Teacher.generate`` runs the
8-step Turbo sampler on a batch of (prompt, seed, height, width) and returns the initial noise, the
state at the 2-step boundary (``mid``, σ = σ_mid, 0.75 by default), the final latent and the decoded image.

Conventions: latents are ``(B, C, H/f, W/f)`` in the pipeline's normalised space
(``(z - shift_factor) * scaling_factor``); the transformer takes ``t = 1 - σ`` and predicts
``v = x0 - ε`` under ``x_σ = (1 - σ)·x0 + σ·ε``, so ``x0 = x_σ + σ·v`` and an Euler step from σ to σ'
is ``x + (σ' - σ)·(-v)``, the scheduler's own step. Sigmas are set on the scheduler from the
*unshifted* grid ``linspace(1, 1/N, N)`` and read back, so the shift is applied exactly once
(docs/design.md, "σ and x0" and "The sigma grids").
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

from .zimage_batched import batched_forward, supports_batched

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
        for i, s in enumerate(self.sigmas):
            if abs(s - self.sigma_mid) < SIGMA_MID_TOL:
                return i
        return None


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


def transformer_velocity(model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor | float,
                         caps: list[torch.Tensor], batched: bool = True) -> torch.Tensor:
    """Run a ``ZImageTransformer2DModel`` on a batch: (B, C, h, w) at σ → fp32 ``v`` (B, C, h, w).

    The stock model takes a list of (C, 1, h, w) latents, ``t = 1 - σ`` and a list of (L_i, D)
    captions; ``batched`` uses :func:`batched_forward` (same result, far fewer kernel launches).
    """
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(x.shape[0])
    dtype = next(model.parameters()).dtype
    caps = [c.to(dtype) for c in caps]
    if batched and supports_batched(model, x.shape[-2], x.shape[-1]):
        return batched_forward(model, x.to(dtype), 1.0 - sigma, caps).float()
    xs = list(x.to(dtype).unsqueeze(2).unbind(0))  # B × (C, 1, h, w)
    out = model(xs, 1.0 - sigma, caps, return_dict=False)[0]
    return torch.stack([o.float() for o in out]).squeeze(2)


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
    elif os.path.exists(spec):
        raise ValueError(f"{what} {spec}: a file, not a pipeline folder")
    elif not HUB_ID.fullmatch(spec):
        raise FileNotFoundError(f"{what} {spec}: no such folder, and not toy or a hub id (owner/name[@revision])")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Teacher:
    """A ``ZImagePipeline`` wrapped with the project's sampler conventions."""

    def __init__(self, pipe: Any, name: str, revision: str | None = None, device: torch.device | None = None,
                 **sampler_overrides: Any):
        self.pipe = pipe
        self.name, self.revision = name, revision
        self.device = device or pipe.device
        self.dtype = pipe.transformer.dtype
        self.sampler = self.make_sampler(**sampler_overrides)
        self.weights: str | None = None
        """Identity of the weights: sha256 over a local folder's files, or the hub commit."""

    # --- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: str = "toy", device: str | torch.device | None = None, dtype: torch.dtype | None = None,
             **sampler_overrides: Any) -> Teacher:
        """Load ``toy``, a local pipeline folder, or a hub id (``owner/name[@revision]``).

        Defaults: bf16 on CUDA, fp32 on CPU.
        """
        from diffusers import ZImagePipeline

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
        log.info("loading teacher %s (%s, %s)", spec, device, dtype)
        pipe = ZImagePipeline.from_pretrained(path, dtype=dtype, revision=revision)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        for m in (pipe.transformer, pipe.text_encoder, pipe.vae):
            m.requires_grad_(False).eval()
        teacher = cls(pipe, name=name, revision=revision, device=device, **sampler_overrides)
        teacher.weights = weights_id(path, revision)
        return teacher

    # --- sampler -----------------------------------------------------------------------------

    def make_sampler(self, num_steps: int = DEFAULT_STEPS, guidance_scale: float = 0.0,
                     sigma_mid: float = DEFAULT_SIGMA_MID, max_sequence_length: int | None = None,
                     sigmas: list[float] | None = None) -> SamplerConfig:
        """Sampler settings from the scheduler's config with Turbo defaults, overridable.

        ``sigmas`` (optional) is the *unshifted* grid; the scheduler applies its shift.
        """
        grid = list(sigmas) if sigmas is not None else torch.linspace(1.0, 1.0 / num_steps, num_steps).tolist()
        sched = self.pipe.scheduler
        sched.set_timesteps(sigmas=grid, device="cpu")
        used = tuple(float(s) for s in sched.sigmas.cpu())
        msl = max_sequence_length or min(512, int(getattr(self.pipe.tokenizer, "model_max_length", 512)))
        return SamplerConfig(num_steps=len(used) - 1, guidance_scale=float(guidance_scale),
                             shift=float(sched.config.get("shift", 1.0)), sigmas=used, sigma_mid=sigma_mid,
                             max_sequence_length=msl)

    def with_sampler(self, **overrides: Any) -> Teacher:
        """The same weights (shared, not copied) with other sampler settings: those not given are kept,
        guidance included, so a naive 2-step baseline is ``teacher.with_sampler(num_steps=2)``. The σ
        grid is derived again from ``num_steps`` unless ``sigmas`` is given."""
        s = self.sampler
        kept = {"num_steps": s.num_steps, "guidance_scale": s.guidance_scale, "sigma_mid": s.sigma_mid,
                "max_sequence_length": s.max_sequence_length}
        other = Teacher(self.pipe, self.name, self.revision, self.device, **{**kept, **overrides})
        other.weights = self.weights
        return other

    # --- components the trainer uses ---------------------------------------------------------

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def text_encoder(self):
        return self.pipe.text_encoder

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def default_size(self) -> int:
        """Image side used when a manifest gives none: the VAE config's ``sample_size`` (1024 for
        Z-Image, 64 for the toy teacher), else 1024."""
        size = getattr(self.pipe.vae.config, "sample_size", None)
        return int(size if isinstance(size, int) else 1024)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        f = self.vae_scale_factor * 2  # VAE factor × 2×2 patches
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f} for this teacher, got {height}×{width}")
        return (int(self.transformer.config.in_channels), height // self.vae_scale_factor,
                width // self.vae_scale_factor)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> list[torch.Tensor]:
        """Caption features exactly as the pipeline computes them: list of (L_i, D) tensors."""
        return self.pipe._encode_prompt(list(prompts), device=self.device,
                                        max_sequence_length=self.sampler.max_sequence_length)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor | float, caps: list[torch.Tensor],
                 transformer: torch.nn.Module | None = None) -> torch.Tensor:
        """Model output ``v = x0 - ε`` at noise level σ (scalar or (B,)), as fp32 (B, C, h, w)."""
        return transformer_velocity(transformer or self.transformer, x, sigma, caps)

    def make_noise(self, seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
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
        if cfg.guidance_scale > 0:
            neg = self.encode_prompts(negative_prompts or [""] * len(prompts))
        x = x0.to(self.device, torch.float32)
        mid = None
        sig = cfg.sigmas
        for i in range(len(sig) - 1):
            if i == cfg.mid_index:
                mid = x.clone()
            v = self._guided_velocity(x, sig[i], caps, neg)
            x = x + (sig[i + 1] - sig[i]) * (-v)  # the scheduler's Euler step (pipeline negates v)
        images = self.decode(x) if decode else None
        return TeacherOutput(noise=x0.cpu(), latent=x.cpu(), mid=None if mid is None else mid.cpu(),
                             images=images, nfe=len(sig) - 1)

    def _guided_velocity(self, x: torch.Tensor, sigma: float, caps: list[torch.Tensor],
                         neg: list[torch.Tensor] | None) -> torch.Tensor:
        if neg is None:
            return self.velocity(x, sigma, caps)
        both = self.velocity(torch.cat([x, x]), sigma, caps + neg)
        pos, negv = both.chunk(2)
        return pos + self.sampler.guidance_scale * (pos - negv)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents (B, C, h, w) → uint8 images (B, H, W, 3)."""
        vae = self.vae
        z = latents.to(self.device, vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        img = vae.decode(z, return_dict=False)[0]
        img = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return img.permute(0, 2, 3, 1).cpu().numpy()

    @torch.no_grad()
    def encode_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) images → normalised latents (B, C, h, w), using the VAE's mean."""
        x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        vae = self.vae
        z = vae.encode(x.to(self.device, vae.dtype)).latent_dist.mode()
        return ((z.float() - vae.config.shift_factor) * vae.config.scaling_factor)

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
