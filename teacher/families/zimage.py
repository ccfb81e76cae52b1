"""Z-Image (``ZImagePipeline``; Z-Image-Turbo, and the toy teacher built on its classes).

The transformer takes a list of (C, 1, h, w) latents, model time ``t = 1 - σ`` and a list of
(L_i, D) captions, and predicts ``x0 - ε`` (the pipeline negates it before the scheduler's step), so
``u = -output``. Image tokens come first in every block's ``[image, caption]`` sequence. The forward
runs through ``batched_forward`` (same result as the stock list-based forward, far fewer kernel
launches) whenever the image token count is a multiple of 32 (docs/families.md).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..zimage_batched import batched_forward, supports_batched
from .base import Captions, Family, ScaledVAE


def transformer_velocity(model: nn.Module, x: torch.Tensor, sigma: torch.Tensor | float, caps: Captions,
                         batched: bool = True) -> torch.Tensor:
    """A ``ZImageTransformer2DModel`` on a batch: (B, C, h, w) at σ → its raw fp32 prediction ``x0 - ε``.

    ``batched`` uses :func:`batched_forward` when the size allows (same result, far fewer launches).
    """
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(x.shape[0])
    dtype = next(model.parameters()).dtype
    caps = [c.to(dtype) for c in caps]
    if batched and supports_batched(model, x.shape[-2], x.shape[-1]):
        return batched_forward(model, x.to(dtype), 1.0 - sigma, caps).float()
    xs = list(x.to(dtype).unsqueeze(2).unbind(0))  # B × (C, 1, h, w)
    out = model(xs, 1.0 - sigma, caps, return_dict=False)[0]
    return torch.stack([o.float() for o in out]).squeeze(2)


class ZImageFamily(ScaledVAE, Family):
    name: ClassVar[str] = "z-image"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("ZImagePipeline", "TwoStepZImagePipeline")
    lora_targets: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3"]

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import ZImagePipeline

        return ZImagePipeline

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor)

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor * 2  # VAE factor × 2×2 patches

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        self.check_size(height, width)
        f = self.vae_scale_factor
        return int(self.transformer.config.in_channels), height // f, width // f

    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        return h // 2, w // 2

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device, max_sequence_length: int) -> Captions:
        return self.pipe._encode_prompt(list(prompts), device=device, max_sequence_length=max_sequence_length)

    def text_dim(self, model: nn.Module) -> int:
        return int(model.config.cap_feat_dim)

    def sigmas(self, num_steps: int, height: int, width: int, grid: list[float] | None = None) -> list[float]:
        grid = list(grid) if grid is not None else torch.linspace(1.0, 1.0 / num_steps, num_steps).tolist()
        sched = self.pipe.scheduler
        sched.set_timesteps(sigmas=grid, device="cpu")  # static shift: the same at every size
        return [float(s) for s in sched.sigmas.cpu()]

    def velocity(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor | float, caps: Captions
                 ) -> torch.Tensor:
        return -transformer_velocity(model, x, sigma, caps)

    def guide(self, pos: torch.Tensor, neg: torch.Tensor, scale: float, sigma: float) -> torch.Tensor:
        return pos + scale * (pos - neg)  # ZImagePipeline's guidance: 0 = off

    def guides(self, scale: float) -> bool:
        return scale > 0

    def num_blocks(self, model: nn.Module) -> int:
        return len(model.layers)

    def hidden_dim(self, model: nn.Module) -> int:
        return int(model.config.dim)

    def features(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, caps: Captions,
                 layers: list[int]) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        if not supports_batched(model, h, w):
            raise ValueError(f"latents {h}×{w}: the discriminator needs image token counts that are a multiple of 32")
        dtype = next(model.parameters()).dtype
        hooks: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        batched_forward(model, x.to(dtype), 1.0 - sigma.to(x.device, torch.float32), [c.to(dtype) for c in caps],
                        stop_after=max(layers) + 1, hooks=hooks)
        n = (h // 2) * (w // 2)  # image tokens come first in each [image, caption] sequence
        return [hooks[i][0][:, :n] for i in layers]

    def export_pipeline(self, transformer: nn.Module, transformer_2: nn.Module | None, sigma_mid: float
                        ) -> tuple[Any, dict[str, Any]]:
        from diffusers import ZImagePipeline

        from twostep.trainer.export import stock_sigmas
        from twostep.trainer.pipeline_twostep import PIPELINE_CLASS, PIPELINE_FILE, TwoStepZImagePipeline

        p = self.pipe
        components = dict(scheduler=p.scheduler, vae=p.vae, text_encoder=p.text_encoder, tokenizer=p.tokenizer,
                          transformer=transformer)
        if transformer_2 is not None:
            pipe = TwoStepZImagePipeline(**components, transformer_2=transformer_2, sigma_mid=sigma_mid)
            return pipe, {"layout": "two_transformers", "pipeline_class": [PIPELINE_FILE, PIPELINE_CLASS],
                          "load": "DiffusionPipeline.from_pretrained(path, trust_remote_code=True)", "call": {}}
        stock = stock_sigmas(p.scheduler, sigma_mid)
        call = None if stock is None else {"num_inference_steps": 2, "sigmas": stock, "guidance_scale": 0.0}
        return ZImagePipeline(**components), {"layout": "shared", "pipeline_class": "ZImagePipeline",
                                              "load": "DiffusionPipeline.from_pretrained(path)", "call": call,
                                              "stock_call": call}
