"""FLUX.2 [klein] (``Flux2KleinPipeline``: Qwen3 text features, ``Flux2Transformer2DModel``,
``AutoencoderKLFlux2``).

The pipeline patchifies the VAE latent 2×2 into channels and normalises it with the VAE's batch-norm
running statistics; the adapter's latent ``(C, h, w)`` is that patchified, normalised grid (what
``prepare_latents`` draws its noise in), one image token per latent pixel, row-major. The transformer
takes the packed sequence ``(B, h·w, C)`` with position ids, model time ``σ`` (it scales by 1000 itself)
and predicts ``u = ε - x0`` directly. Caption features stack three Qwen3 hidden layers and are padded to
``max_sequence_length``; the transformer attends to the padding, so it is kept. Double-stream blocks
return ``(text, image)``; single-stream blocks run on ``[text, image]`` (docs/families.md).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from .base import Captions, Family, from_uint8, hooked_features, stock_or_experts, to_uint8

STOCK_GUIDANCE = 4.0
"""``Flux2KleinPipeline.__call__``'s default ``guidance_scale`` (CFG on for a non-distilled checkpoint)."""


class Flux2KleinFamily(Family):
    name: ClassVar[str] = "flux2-klein"
    pipeline_classes: ClassVar[tuple[str, ...]] = ("Flux2KleinPipeline", "TwoStepFlux2KleinPipeline")
    # The single-stream blocks' fused ``attn.to_out`` is left out: its name also ends the double-stream
    # blocks' ``attn.to_out`` ModuleList, which peft cannot wrap.
    lora_targets: ClassVar[list[str]] = [
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "linear_in", "linear_out", "to_qkv_mlp_proj",
    ]

    @classmethod
    def pipeline_class(cls) -> type:
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline

    @property
    def distilled(self) -> bool:
        return bool(self.pipe.config.get("is_distilled", False))

    @property
    def default_guidance(self) -> float:  # type: ignore[override]
        """The stock default (4.0, CFG on) for a base checkpoint; 0 (off) for a step-distilled one,
        whose pipeline ignores guidance."""
        return 0.0 if self.distilled else STOCK_GUIDANCE

    # --- sizes ---------------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        return int(self.pipe.vae_scale_factor) * 2  # the latent grid is the 2×2-patchified one

    @property
    def size_multiple(self) -> int:
        return self.vae_scale_factor

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        self.check_size(height, width)
        f = self.vae_scale_factor
        return int(self.transformer.config.in_channels), height // f, width // f

    def token_grid(self, h: int, w: int) -> tuple[int, int]:
        return h, w

    # --- text ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device: torch.device, max_sequence_length: int) -> Captions:
        embeds, _ = self.pipe.encode_prompt(list(prompts), device=device, max_sequence_length=max_sequence_length)
        return list(embeds.unbind(0))

    def text_dim(self, model: nn.Module) -> int:
        return int(model.config.joint_attention_dim)

    # --- the sampler ---------------------------------------------------------------------------

    def sigmas(self, num_steps: int, height: int, width: int, grid: list[float] | None = None) -> list[float]:
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        sched = copy.deepcopy(self.pipe.scheduler)
        grid = list(grid) if grid is not None else np.linspace(1.0, 1.0 / num_steps, num_steps).tolist()
        if getattr(sched.config, "use_flow_sigmas", False):
            grid = None
        _, h, w = self.latent_shape(height, width)
        mu = compute_empirical_mu(image_seq_len=h * w, num_steps=num_steps)
        sched.set_timesteps(num_steps, device="cpu", sigmas=grid, mu=mu)
        return [float(s) for s in sched.sigmas]

    def _inputs(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor | float, caps: Captions
                ) -> dict[str, Any]:
        """The transformer's keyword arguments, as ``Flux2KleinPipeline.__call__`` builds them."""
        if len({tuple(c.shape) for c in caps}) != 1:
            raise ValueError(f"{self.name}: captions must share one length (pad them to max_sequence_length), got "
                             f"{sorted({c.shape[0] for c in caps})}")
        dtype = next(model.parameters()).dtype
        b, c, h, w = x.shape
        txt = torch.stack(list(caps)).to(x.device, dtype)
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(b)
        pipe = self.pipe
        return dict(
            hidden_states=x.to(dtype).reshape(b, c, h * w).permute(0, 2, 1),  # pack: (B, h·w, C), row-major
            timestep=(sigma * 1000).to(dtype) / 1000,  # the scheduler's t = 1000σ, passed as t / 1000
            guidance=None, encoder_hidden_states=txt,
            txt_ids=pipe._prepare_text_ids(txt).to(x.device), img_ids=pipe._prepare_latent_ids(x).to(x.device),
            return_dict=False,
        )

    def velocity(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor | float, caps: Captions
                 ) -> torch.Tensor:
        b, c, h, w = x.shape
        out = model(**self._inputs(model, x, sigma, caps))[0][:, : h * w]
        return out.float().permute(0, 2, 1).reshape(b, c, h, w)  # the model predicts ε - x0

    def guides(self, scale: float) -> bool:
        return scale > 1 and not self.distilled  # the pipeline's do_classifier_free_guidance

    def guide(self, pos: torch.Tensor, neg: torch.Tensor, scale: float, sigma: float) -> torch.Tensor:
        if not self.guides(scale):
            return pos
        return neg + scale * (pos - neg)

    # --- VAE -----------------------------------------------------------------------------------

    def _bn(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        vae = self.vae
        z = latents.to(vae.device, vae.dtype)
        mean, std = self._bn(z)
        z = self.pipe._unpatchify_latents(z * std + mean)
        return to_uint8(vae.decode(z, return_dict=False)[0])

    @torch.no_grad()
    def encode_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        vae = self.vae
        # the posterior's mode, patchified and normalised (Flux2KleinPipeline._encode_vae_image)
        return self.pipe._encode_vae_image(from_uint8(images).to(vae.device, vae.dtype), generator=None).float()

    # --- discriminator -------------------------------------------------------------------------

    def num_blocks(self, model: nn.Module) -> int:
        return len(model.transformer_blocks) + len(model.single_transformer_blocks)

    def hidden_dim(self, model: nn.Module) -> int:
        return int(model.config.num_attention_heads * model.config.attention_head_dim)

    def features(self, model: nn.Module, x: torch.Tensor, sigma: torch.Tensor, caps: Captions,
                 layers: list[int]) -> list[torch.Tensor]:
        inputs = self._inputs(model, x, sigma, caps)
        n_txt = inputs["encoder_hidden_states"].shape[1]

        def image_tokens(output: Any) -> torch.Tensor:
            # double-stream blocks return (text, image); single-stream blocks return [text, image]
            return output[1] if isinstance(output, tuple) else output[:, n_txt:]

        blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
        return hooked_features(model, blocks, layers, image_tokens, lambda: model(**inputs))

    # --- export --------------------------------------------------------------------------------

    def student_scheduler(self, sigma_mid: float) -> Any:
        """The stock scheduler with a static shift ``sigma_mid / (1 - sigma_mid)``: at
        ``num_inference_steps=2`` the pipeline's grid ``[1, 0.5]`` becomes ``[1, sigma_mid]`` (the
        pipeline's ``mu`` is ignored without dynamic shifting)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not 0.0 < sigma_mid < 1.0:
            raise ValueError(f"sigma_mid must be in (0, 1), got {sigma_mid}")
        return FlowMatchEulerDiscreteScheduler.from_config(
            self.pipe.scheduler.config, shift=sigma_mid / (1.0 - sigma_mid), use_dynamic_shifting=False,
            shift_terminal=None, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
            invert_sigmas=False, stochastic_sampling=False,
        )

    def export_pipeline(self, transformer: nn.Module, transformer_2: nn.Module | None, sigma_mid: float
                        ) -> tuple[Any, dict[str, Any]]:
        from diffusers import Flux2KleinPipeline

        from twostep.trainer.pipeline_experts import PIPELINE_FILE, TwoStepFlux2KleinPipeline

        p = self.pipe
        components = dict(scheduler=self.student_scheduler(float(sigma_mid)), vae=p.vae, text_encoder=p.text_encoder,
                          tokenizer=p.tokenizer, transformer=transformer, is_distilled=self.distilled)
        # guidance_scale 1.0 turns CFG off (it needs > 1); the captions' padded length matters to FLUX.2
        call = {"num_inference_steps": 2, "guidance_scale": 1.0, "max_sequence_length": self.max_sequence_length()}
        return stock_or_experts(Flux2KleinPipeline, TwoStepFlux2KleinPipeline, PIPELINE_FILE, components, transformer_2, sigma_mid, call)
