"""Lumina-Image-2.0 (``Lumina2Pipeline``: Gemma2 text features, ``Lumina2Transformer2DModel``,
``AutoencoderKL``, ``FlowMatchEulerDiscreteScheduler``).

The transformer takes unpacked latents ``(B, C, h, w)`` (it patchifies 2×2 itself), model time
``t = 1 - σ`` and Gemma2's second-to-last hidden states with their attention mask, and predicts
``x0 - ε`` (the pipeline negates it before the scheduler's step), so ``u = -output``. Prompts are
prefixed with the pipeline's system prompt; negative prompts are not. The model masks caption
padding, so captions drop it. Every joint block runs on ``[text_i, image]`` with each sample's own
text length, padded at the end to the batch's longest (docs/families.md).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .base import Captions, Family, ScaledVAE, hooked_features, stock_or_experts

STOCK_GUIDANCE = 4.0
"""``Lumina2Pipeline.__call__``'s default ``guidance_scale`` (CFG on when > 1)."""
STOCK_MAX_SEQUENCE_LENGTH = 256
"""``Lumina2Pipeline.__call__``'s default ``max_sequence_length``."""


def unpad(embeds: torch.Tensor, mask: torch.Tensor) -> Captions:
    """(B, L, D) right-padded features and their (B, L) mask → per-sample (L_i, D) without the pads."""
    lengths = mask.sum(dim=1).tolist()
    for i, n in enumerate(lengths):
        if not bool(mask[i, :n].all()):
            raise ValueError("caption masks must be right-padded (Lumina2Pipeline sets padding_side='right')")
    return [e[:n] for e, n in zip(embeds, lengths)]


def pad_captions(caps: Captions, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (L_i, D) captions → (B, L, D) zero-padded at the end and their (B, L) mask."""
    n = max(c.shape[0] for c in caps)
    embeds = torch.zeros(len(caps), n, caps[0].shape[-1], dtype=dtype, device=device)
    mask = torch.zeros(len(caps), n, dtype=torch.long, device=device)
    for i, c in enumerate(caps):
        embeds[i, : c.shape[0]] = c.to(device, dtype)
        mask[i, : c.shape[0]] = 1
    return embeds, mask


class Lumina2Family(ScaledVAE, Family):
    name: ClassVar[str] = "lumina2"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("Lumina2Pipeline", "TwoStepLumina2Pipeline")
    # the feed-forward's full names: ``linear_1``/``linear_2`` alone would also match the timestep MLP
    lora_targets: ClassVar[list[str]] = [
        "to_q", "to_k", "to_v", "to_out.0", "feed_forward.linear_1", "feed_forward.linear_2",
        "feed_forward.linear_3",
    ]
    default_guidance: ClassVar[float] = STOCK_GUIDANCE

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import Lumina2Pipeline

        return Lumina2Pipeline

    # --- sizes ---------------------------------------------------------------------------------

    @property
    def _patch(self) -> int:
        return int(self.transformer.config.patch_size)

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)  # Lumina2Pipeline fixes it at 8, whatever the VAE

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * self._patch

    @property
    def default_size(self) -> int:
        """The pipeline's own default side: the transformer config's ``sample_size`` × 8."""
        return int(self.pipe.default_sample_size * self.pipe.vae_scale_factor)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        self.check_size(height, width)
        f = self.vae_scale_factor
        return int(self.transformer.config.in_channels), height // f, width // f

    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        return h // self._patch, w // self._patch

    # --- text ----------------------------------------------------------------------------------

    def max_sequence_length(self) -> int:
        return min(STOCK_MAX_SEQUENCE_LENGTH, int(getattr(self.pipe.tokenizer, "model_max_length",
                                                          STOCK_MAX_SEQUENCE_LENGTH)))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device, max_sequence_length: int) -> Captions:
        """Prompts as the pipeline encodes them: the system prompt, ``" <Prompt Start> "``, the prompt."""
        embeds, mask, _, _ = self.pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False, device=device,
                                                     max_sequence_length=max_sequence_length)
        return unpad(embeds, mask)

    @torch.no_grad()
    def encode_negative_prompts(self, prompts: list[str], device: torch.device, max_sequence_length: int
                                ) -> Captions:
        """Negative prompts as the pipeline encodes them: without the system prompt (``""`` is ``<bos>``
        alone)."""
        embeds, mask = self.pipe._get_gemma_prompt_embeds(list(prompts), device=device,
                                                          max_sequence_length=max_sequence_length)
        return unpad(embeds, mask)

    def text_dim(self, model: nn.Module) -> int:
        return int(model.config.cap_feat_dim)

    # --- the sampler ---------------------------------------------------------------------------

    def sigmas(self, num_steps: int, height: int, width: int, grid: list[float] | None = None) -> list[float]:
        """The pipeline's schedule. Its ``mu`` (used only with dynamic shifting) is computed from
        ``latents.shape[1]``, the latent channel count, so it does not depend on the size."""
        from diffusers.pipelines.lumina2.pipeline_lumina2 import calculate_shift

        sched = copy.deepcopy(self.pipe.scheduler)
        grid = np.linspace(1.0, 1.0 / num_steps, num_steps) if grid is None else list(grid)
        cfg = sched.config
        mu = calculate_shift(int(self.transformer.config.in_channels), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                             cfg.get("max_shift", 1.15))
        sched.set_timesteps(sigmas=grid, device="cpu", mu=mu)
        return [float(s) for s in sched.sigmas]

    def _inputs(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor | float, caps: Captions
                ) -> dict[str, Any]:
        """The transformer's keyword arguments, as ``Lumina2Pipeline.__call__`` builds them."""
        if len(caps) != x.shape[0]:
            raise ValueError(f"{len(caps)} captions for a batch of {x.shape[0]} latents")
        dtype = next(model.parameters()).dtype
        n = float(self.pipe.scheduler.config.num_train_timesteps)
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(x.shape[0])
        embeds, mask = pad_captions(caps, dtype, x.device)
        return dict(hidden_states=x.to(dtype), timestep=1 - (sigma * n) / n,  # t = 1 - timestep / 1000
                    encoder_hidden_states=embeds, encoder_attention_mask=mask, return_dict=False)

    def velocity(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor | float, caps: Captions
                 ) -> torch.Tensor:
        return -model(**self._inputs(model, x, sigma, caps))[0].float()  # the model predicts x0 - ε

    def guide(self, pos: torch.Tensor, neg: torch.Tensor, scale: float, sigma: float) -> torch.Tensor:
        """The pipeline's guidance at its defaults: on only when ``scale > 1``; ``cfg_normalization=True``
        rescales the result to the conditional prediction's norm over the last (width) axis;
        ``cfg_trunc_ratio=1.0`` guides every step. Both are sign-symmetric, so applying them to ``u``
        equals the pipeline's on ``-u``."""
        if not self.guides(scale):
            return pos
        out = neg + scale * (pos - neg)
        return out * (torch.norm(pos, dim=-1, keepdim=True) / torch.norm(out, dim=-1, keepdim=True))

    # --- VAE -----------------------------------------------------------------------------------

    # --- discriminator -------------------------------------------------------------------------

    def num_blocks(self, model: nn.Module) -> int:
        return len(model.layers)

    def hidden_dim(self, model: nn.Module) -> int:
        return int(model.config.hidden_size)

    def features(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, caps: Captions,
                 layers: list[int]) -> list[torch.Tensor]:
        inputs = self._inputs(model, x, sigma, caps)
        gh, gw = self.token_grid(*x.shape[-2:])
        starts = [c.shape[0] for c in caps]

        def image_tokens(output: torch.Tensor) -> torch.Tensor:
            # sample i's joint sequence is [text (L_i tokens), image (gh·gw tokens), padding]
            return torch.stack([output[i, s: s + gh * gw] for i, s in enumerate(starts)])

        return hooked_features(model, list(model.layers), layers, image_tokens, lambda: model(**inputs))

    # --- export --------------------------------------------------------------------------------

    def student_scheduler(self, sigma_mid: float) -> Any:
        """Flow-matching Euler with the static shift ``sigma_mid / (1 - sigma_mid)``: at
        ``num_inference_steps=2`` the pipeline's grid ``[1, 0.5]`` becomes ``[1, sigma_mid]`` (its ``mu``
        is ignored without dynamic shifting)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not 0.0 < sigma_mid < 1.0:
            raise ValueError(f"sigma_mid must be in (0, 1), got {sigma_mid}")
        return FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=self.pipe.scheduler.config.get("num_train_timesteps", 1000),
            shift=sigma_mid / (1.0 - sigma_mid), use_dynamic_shifting=False)

    def export_pipeline(self, transformer: nn.Module, transformer_2: nn.Module | None, sigma_mid: float
                        ) -> tuple[Any, dict[str, Any]]:
        from diffusers import Lumina2Pipeline

        from twostep.trainer.pipeline_experts import PIPELINE_FILE, TwoStepLumina2Pipeline

        p = self.pipe
        components = dict(transformer=transformer, scheduler=self.student_scheduler(float(sigma_mid)), vae=p.vae,
                          text_encoder=p.text_encoder, tokenizer=p.tokenizer)
        # guidance_scale 1.0 turns CFG off (it needs > 1)
        call = {"num_inference_steps": 2, "guidance_scale": 1.0, "max_sequence_length": self.max_sequence_length()}
        return stock_or_experts(Lumina2Pipeline, TwoStepLumina2Pipeline, PIPELINE_FILE, components, transformer_2, sigma_mid, call)
