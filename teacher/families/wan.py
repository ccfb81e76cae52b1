"""Wan 2.1 text-to-video (``WanPipeline``) at one frame.

The transformer takes 5-D latents ``(B, C, T, h, w)`` (here ``T = 1``: the adapter adds and removes
the frame axis), model time ``t = σ·1000`` and UMT5 hidden states zero-padded to the prompt length
limit (the model attends to the pads, so captions keep them), and predicts ``ε - x0``: ``u`` is its
output as is. Latents are normalised per channel with the VAE config's ``latents_mean`` and
``latents_std``; the pipeline draws its noise in that space. Every block outputs image tokens only.
Wan 2.1 ships a UniPC scheduler with a ``flow_shift``; the teacher runs its own Euler loop at that
shift, and the exported student is a stock ``WanPipeline`` (docs/families.md).
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import Captions, Family, from_uint8, hooked_features, to_uint8


def stack_captions(caps: Captions, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-sample (L_i, D) captions → (B, L, D), zero-padded to the longest (as the pipeline pads)."""
    n = max(c.shape[0] for c in caps)
    return torch.stack([F.pad(c.to(device, dtype), (0, 0, 0, n - c.shape[0])) for c in caps])


class WanFamily(Family):
    name: ClassVar[str] = "wan"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("WanPipeline",)
    lora_targets: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    default_guidance: ClassVar[float] = 5.0
    """WanPipeline's default ``guidance_scale`` (Wan 2.1 is sampled with classifier-free guidance)."""

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import WanPipeline

        return WanPipeline

    @classmethod
    def load(cls, path: str, dtype: torch.dtype, revision: str | None = None) -> Family:
        """As ``Family.load``; a Wan 2.2 pipeline with ``expand_timesteps`` is refused (two-expert folders are
        refused as teachers before loading, ``check_teacher_spec``). twostep's own exported students (a
        ``twostep_student.json`` beside the weights) load as usual."""
        family = super().load(path, dtype, revision)
        config = family.pipe.config
        student = os.path.exists(os.path.join(path, "twostep_student.json"))
        if not student and config.get("expand_timesteps"):
            raise ValueError(f"{path}: a Wan 2.2 pipeline (two experts or expand_timesteps); twostep's Wan adapter "
                             "supports Wan 2.1 teachers (docs/families.md)")
        return family

    # --- sizes ---------------------------------------------------------------------------------

    @property
    def _patch(self) -> tuple[int, int, int]:
        return tuple(int(p) for p in self.transformer.config.patch_size)

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor_spatial)

    @property
    def size_multiple(self) -> int:
        _, ph, pw = self._patch
        return self.vae_scale_factor * math.lcm(ph, pw)

    @property
    def default_size(self) -> int:
        """The VAE config's ``sample_size`` when it has one (random test pipelines), else 480 (Wan 2.1's
        480p height, WanPipeline's default)."""
        size = self.vae.config.get("sample_size")
        return int(size) if isinstance(size, int) else 480

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        self.check_size(height, width)
        f = self.vae_scale_factor
        return int(self.transformer.config.in_channels), height // f, width // f

    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        _, ph, pw = self._patch
        return h // ph, w // pw

    # --- text ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device, max_sequence_length: int) -> Captions:
        embeds, _ = self.pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                            max_sequence_length=max_sequence_length, device=device)
        return list(embeds.unbind(0))  # each (max_sequence_length, D), zeros after the prompt's tokens

    def text_dim(self, model: nn.Module) -> int:
        return int(model.config.text_dim)

    # --- the sampler ---------------------------------------------------------------------------

    def shift(self) -> float:
        cfg = self.pipe.scheduler.config
        return float(cfg["flow_shift"] if "flow_shift" in cfg else cfg.get("shift", 1.0))

    def _euler_scheduler(self) -> Any:
        """A flow-matching Euler scheduler with the folder's shift (a copy of the folder's own when it is one)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = self.pipe.scheduler
        if isinstance(sched, FlowMatchEulerDiscreteScheduler):
            return copy.deepcopy(sched)
        cfg = sched.config
        if "flow_shift" in cfg and not cfg.get("use_flow_sigmas", False):
            raise ValueError(f"{type(sched).__name__} without use_flow_sigmas is not a flow-matching scheduler")
        if cfg.get("use_dynamic_shifting", False):
            raise ValueError("WanPipeline passes no mu: a scheduler with use_dynamic_shifting cannot run in it")
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.get("num_train_timesteps", 1000),
                                               shift=self.shift(), shift_terminal=cfg.get("shift_terminal"))

    def sigmas(self, num_steps: int, height: int, width: int, grid: list[float] | None = None) -> list[float]:
        grid = list(grid) if grid is not None else torch.linspace(1.0, 1.0 / num_steps, num_steps).tolist()
        sched = self._euler_scheduler()
        sched.set_timesteps(sigmas=grid, device="cpu")  # static shift: the same at every size
        return [float(s) for s in sched.sigmas]

    def _forward_kwargs(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor | float, caps: Captions
                        ) -> dict[str, Any]:
        # the input dtype (a bf16 load keeps some parameters, the first of them included, in fp32)
        dtype = model.patch_embedding.weight.dtype
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(x.shape[0])
        return dict(hidden_states=x.to(dtype).unsqueeze(2), timestep=sigma * 1000,
                    encoder_hidden_states=stack_captions(caps, dtype, x.device), return_dict=False)

    def velocity(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor | float, caps: Captions
                 ) -> torch.Tensor:
        out = model(**self._forward_kwargs(model, x, sigma, caps))[0]  # (B, C, 1, h, w), ε - x0
        return out.squeeze(2).float()

    def guide(self, pos: torch.Tensor, neg: torch.Tensor, scale: float, sigma: float) -> torch.Tensor:
        if not self.guides(scale):  # WanPipeline guides only when scale > 1
            return pos
        return neg + scale * (pos - neg)

    # --- VAE -----------------------------------------------------------------------------------

    def _latent_stats(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``latents_mean`` and ``1 / latents_std`` as the pipelines compute them, (1, C, 1, 1, 1)."""
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(device, dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(device, dtype)
        return mean, inv_std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.vae
        z = latents.to(vae.device, vae.dtype).unsqueeze(2)
        mean, inv_std = self._latent_stats(z.device, z.dtype)
        video = vae.decode(z / inv_std + mean, return_dict=False)[0]  # (B, 3, 1, H, W)
        return to_uint8(video[:, :, 0])

    @torch.no_grad()
    def encode_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        vae = self.vae
        x = from_uint8(images).to(vae.device, vae.dtype).unsqueeze(2)
        z = vae.encode(x).latent_dist.mode().float()  # (B, C, 1, h, w)
        mean, inv_std = self._latent_stats(z.device, z.dtype)
        return ((z - mean) * inv_std)[:, :, 0]

    # --- discriminator -------------------------------------------------------------------------

    def num_blocks(self, model: nn.Module) -> int:
        return len(model.blocks)

    def hidden_dim(self, model: nn.Module) -> int:
        return int(model.config.num_attention_heads * model.config.attention_head_dim)

    def features(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, caps: Captions,
                 layers: list[int]) -> list[torch.Tensor]:
        kwargs = self._forward_kwargs(model, x, sigma, caps)
        # each block's output is the (B, T·h/2·w/2, D) image tokens, row-major over (T, h/2, w/2)
        return hooked_features(model, list(model.blocks), layers, lambda out: out, lambda: model(**kwargs))

    # --- export --------------------------------------------------------------------------------

    def export_pipeline(self, transformer: nn.Module, transformer_2: nn.Module | None, sigma_mid: float
                        ) -> tuple[Any, dict[str, Any]]:
        """A stock ``WanPipeline``. Its scheduler, flow-matching Euler with ``shift=1`` and
        ``shift_terminal=σ_mid``, visits σ = [1, σ_mid, 0] at two steps; with two parameter sets
        ``transformer`` is the high-noise expert (step 1) and ``transformer_2`` takes step 2, switched at
        ``boundary_ratio`` halfway between σ_mid and 1 (Wan 2.2's two-expert convention)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

        if not 0.0 < sigma_mid < 1.0:
            raise ValueError(f"sigma_mid must lie in (0, 1), got {sigma_mid}")
        p = self.pipe
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=p.scheduler.config.get("num_train_timesteps", 1000), shift=1.0,
            shift_terminal=sigma_mid)
        check = copy.deepcopy(scheduler)
        check.set_timesteps(2)
        if not torch.allclose(check.sigmas, torch.tensor([1.0, sigma_mid, 0.0]), atol=1e-6):
            raise AssertionError(f"student scheduler sigmas {check.sigmas.tolist()} != [1, {sigma_mid}, 0]")
        two = transformer_2 is not None
        pipe = WanPipeline(tokenizer=p.tokenizer, text_encoder=p.text_encoder, vae=p.vae, scheduler=scheduler,
                           transformer=transformer, transformer_2=transformer_2,
                           boundary_ratio=(1.0 + sigma_mid) / 2 if two else None)
        call = {"num_inference_steps": 2, "guidance_scale": 1.0, "num_frames": 1,
                "max_sequence_length": self.max_sequence_length()}
        return pipe, {"layout": "two_transformers" if two else "shared", "pipeline_class": "WanPipeline",
                      "load": "DiffusionPipeline.from_pretrained(path)", "call": call}
