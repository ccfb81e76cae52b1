"""The teacher adapter: what twostep needs from a diffusers flow-matching pipeline, in one convention.

One subclass per family (``zimage``, ``lumina2``, ``flux2``, ``wan``). Everything outside
``twostep.teacher.families`` (the generation job, the trainer, the discriminator, eval, sample)
reaches the pipeline only through these methods, so a family's packing, time mapping, sign,
latent normalisation and token order stay inside its adapter (docs/families.md).

The conventions every adapter keeps (docs/design.md, "σ and x0"):

* **Latents** are *unpacked* image latents ``(C, h, w)`` per sample, in the space the pipeline's
  transformer sees them (after the family's VAE normalisation): what a store holds as
  ``latent.npy`` / ``noise.npy`` / ``mid.npy``. A family whose transformer takes packed sequences
  or 5-D video latents packs and unpacks inside :meth:`Family.velocity`.
* **Noise** for one sample is ``torch.randn((C, h, w), generator=CPU generator seeded with seed)``:
  independent of the batch and the device, and the same numbers, in the same order, as the stock
  pipeline's ``prepare_latents`` draws for one image with a CPU generator.
* **σ** runs from 1 (noise) to 0 (clean): ``x_σ = (1 - σ)·x0 + σ·ε``.
* **Velocity** is ``u = ε - x0``, in fp32, whatever the model predicts: so ``x0 = x_σ - σ·u`` and an
  Euler step from σ to σ' is ``x + (σ' - σ)·u`` (:func:`euler_step`).
* **Captions** are a list of per-sample ``(L_i, D)`` tensors (:meth:`Family.encode_prompts`); the
  adapter pads or stacks them for its model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

Captions = list[torch.Tensor]


def euler_step(x: torch.Tensor, u: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One flow-matching Euler step from σ to σ' with velocity ``u = ε - x0``."""
    return x + (sigma_next - sigma) * u


def x0_from(x: torch.Tensor, u: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """The clean estimate ``x0 = x_σ - σ·u``."""
    return x - sigma * u


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """VAE output (B, 3, H, W) in [-1, 1] → uint8 (B, H, W, 3)."""
    img = ((img.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return img.permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) → fp32 (B, 3, H, W) in [-1, 1]."""
    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1


class StopForward(Exception):
    """Raised by a feature hook after the deepest hooked block, to end the forward there."""


def hooked_features(model: nn.Module, blocks: list[nn.Module], layers: list[int],
                    extract: Callable[[Any], torch.Tensor], run: Callable[[], Any]) -> list[torch.Tensor]:
    """Run ``run()`` (a forward of ``model``) with forward hooks on ``blocks[i]`` for ``i`` in
    ``layers``; each hook keeps ``extract(block output)`` (image tokens, (B, N, D)) and the forward
    stops after the deepest one. Returns the features in ``layers`` order."""
    got: dict[int, torch.Tensor] = {}
    last = max(layers)

    def hook(i):
        def fn(_module, _args, output):
            got[i] = extract(output)
            if i == last:
                raise StopForward
        return fn

    handles = [blocks[i].register_forward_hook(hook(i)) for i in sorted(set(layers))]
    try:
        run()
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return [got[i] for i in layers]


class Family:
    """A family adapter around a loaded diffusers pipeline ``pipe``.

    Subclasses set the class attributes and implement the methods marked ``NotImplementedError``.
    """

    name: ClassVar[str] = ""
    """Short family name (``--teacher`` errors and store metadata list it)."""
    pipeline_classes: ClassVar[tuple[str, ...]] = ()
    """``model_index.json`` ``_class_name`` values this adapter loads (teacher and exported student)."""
    lora_targets: ClassVar[list[str]] = []
    """Module names of the transformer's attention and feed-forward projections, for LoRA students."""
    default_guidance: ClassVar[float] = 0.0
    """The teacher sampler's guidance when none is given (0 = off for every family)."""

    def __init__(self, pipe: Any):
        self.pipe = pipe

    # --- loading -------------------------------------------------------------------------------

    @classmethod
    def pipeline_class(cls) -> type:
        """The diffusers pipeline class that loads this family's folders."""
        raise NotImplementedError

    @classmethod
    def load(cls, path: str, dtype: torch.dtype, revision: str | None = None) -> Family:
        pipe = cls.pipeline_class().from_pretrained(path, dtype=dtype, revision=revision)
        return cls(pipe)

    @property
    def transformer(self) -> nn.Module:
        return self.pipe.transformer

    @property
    def vae(self) -> nn.Module:
        return self.pipe.vae

    @property
    def modules(self) -> list[nn.Module]:
        """The frozen modules to move and put in eval mode."""
        return [self.pipe.transformer, self.pipe.text_encoder, self.pipe.vae]

    # --- sizes ---------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel of :meth:`latent_shape`'s ``h`` and ``w``."""
        raise NotImplementedError

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (VAE factor × patch)."""
        raise NotImplementedError

    @property
    def default_size(self) -> int:
        """Image side when a manifest gives none: the VAE config's ``sample_size`` when it is an int,
        else 1024."""
        size = getattr(self.vae.config, "sample_size", None)
        return int(size if isinstance(size, int) else 1024)

    def check_size(self, height: int, width: int) -> None:
        f = self.size_multiple
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f} for this teacher "
                             f"({self.name}), got {height}×{width}")

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The unpacked latent ``(C, h, w)`` of one image."""
        raise NotImplementedError

    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        """The image-token grid of a latent ``(C, h, w)`` (row-major token order)."""
        raise NotImplementedError

    # --- text ----------------------------------------------------------------------------------

    def max_sequence_length(self) -> int:
        """The default prompt length limit (the pipeline's own default, capped by the tokenizer)."""
        return min(512, int(getattr(self.pipe.tokenizer, "model_max_length", 512)))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device, max_sequence_length: int) -> Captions:
        """Caption features exactly as the pipeline computes them, one ``(L_i, D)`` tensor a prompt."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_negative_prompts(self, prompts: list[str], device: torch.device, max_sequence_length: int
                                ) -> Captions:
        """Negative prompts for guidance, as the pipeline encodes them (the same as
        :meth:`encode_prompts` unless a family treats them differently)."""
        return self.encode_prompts(prompts, device, max_sequence_length)

    def text_dim(self, model: nn.Module) -> int:
        """Width ``D`` of the caption features."""
        raise NotImplementedError

    # --- the sampler ---------------------------------------------------------------------------

    def sigmas(self, num_steps: int, height: int, width: int, grid: list[float] | None = None) -> list[float]:
        """The exact N+1 noise levels the stock pipeline visits at ``num_steps`` for this size (its
        scheduler's shift applied once to the unshifted grid ``linspace(1, 1/N, N)``, or to ``grid``),
        ending at 0."""
        raise NotImplementedError

    def shift(self) -> float:
        """The scheduler's static shift, as recorded in store metadata (1.0 when it has none)."""
        return float(self.pipe.scheduler.config.get("shift", 1.0))

    def velocity(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor | float, caps: Captions
                 ) -> torch.Tensor:
        """``u = ε - x0`` (fp32, shape of ``x``) of ``model`` (the teacher's transformer or a student
        copy of it) on unpacked latents ``x`` (B, C, h, w) at σ (scalar or (B,)), no guidance."""
        raise NotImplementedError

    def guide(self, pos: torch.Tensor, neg: torch.Tensor, scale: float, sigma: float) -> torch.Tensor:
        """Classifier-free guidance on two velocities, in the family's own convention."""
        return neg + scale * (pos - neg)

    def guides(self, scale: float) -> bool:
        """Whether guidance at ``scale`` changes anything (the sampler then runs the negative prompts):
        above 1, as diffusers' pipelines decide, unless a family says otherwise."""
        return scale > 1

    # --- VAE -----------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Unpacked latents (B, C, h, w) → uint8 images (B, H, W, 3)."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (B, H, W, 3) → unpacked latents (B, C, h, w) (the VAE posterior's mode)."""
        raise NotImplementedError

    # --- discriminator -------------------------------------------------------------------------

    def num_blocks(self, model: nn.Module) -> int:
        """How many hook points (transformer blocks, in forward order) ``model`` has."""
        raise NotImplementedError

    def hidden_dim(self, model: nn.Module) -> int:
        """Width of the hidden states at the hook points."""
        raise NotImplementedError

    def features(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, caps: Captions,
                 layers: list[int]) -> list[torch.Tensor]:
        """Image tokens ``(B, N, D)`` at each hook point in ``layers`` (row-major over
        :meth:`token_grid`), for latents ``x`` at σ (B,); the forward stops after the deepest."""
        raise NotImplementedError

    # --- export --------------------------------------------------------------------------------

    def export_pipeline(self, transformer: nn.Module, transformer_2: nn.Module | None, sigma_mid: float
                        ) -> tuple[Any, dict[str, Any]]:
        """The 2-step student as a diffusers pipeline object sharing this teacher's text encoder,
        tokenizer and VAE (and a scheduler configured for the student), and the export facts for
        ``twostep_student.json`` (``layout``, ``pipeline_class``, ``load``, ``call``: the keyword
        arguments that make the pipeline's ``__call__`` run the student's exact sampler)."""
        raise NotImplementedError


class ScaledVAE:
    """Decode and encode for an ``AutoencoderKL`` whose latents the pipeline normalises as
    ``(z - shift_factor) · scaling_factor`` (Z-Image, Lumina 2)."""

    vae: nn.Module

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.vae
        z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        return to_uint8(vae.decode(z, return_dict=False)[0])

    @torch.no_grad()
    def encode_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        vae = self.vae
        z = vae.encode(from_uint8(images).to(vae.device, vae.dtype)).latent_dist.mode()
        return (z.float() - vae.config.shift_factor) * vae.config.scaling_factor


def stock_or_experts(stock: type, experts: type, file: str, components: dict[str, Any],
                     transformer_2: nn.Module | None, sigma_mid: float, call: dict[str, Any]
                     ) -> tuple[Any, dict[str, Any]]:
    """``Family.export_pipeline``'s two layouts for a family whose two-parameter-set student is its stock
    pipeline class plus ``transformer_2`` (``experts``, shipped as ``file``.py): the pipeline and its facts."""
    if transformer_2 is None:
        return stock(**components), {"layout": "shared", "pipeline_class": stock.__name__,
                                     "load": "DiffusionPipeline.from_pretrained(path)", "call": call}
    pipe = experts(**components, transformer_2=transformer_2, sigma_mid=float(sigma_mid))
    return pipe, {"layout": "two_transformers", "pipeline_class": [file, experts.__name__],
                  "load": "DiffusionPipeline.from_pretrained(path, trust_remote_code=True)", "call": call}


def read_model_index(path: str) -> dict[str, Any]:
    import json

    with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
        return json.load(f)
