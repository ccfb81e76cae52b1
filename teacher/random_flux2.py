"""Build small random-weight ``Flux2KleinPipeline`` s locally (tests and CLI smoke runs), with the
FLUX.2 [klein] component classes and the byte-level Qwen tokenizer of :mod:`.random_zimage`. Nothing
here downloads anything.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .random_zimage import build_tokenizer, qwen3_config

TEXT_LAYERS_USED = (9, 18, 27)
"""``Flux2KleinPipeline``'s default ``text_encoder_out_layers``: the text encoder needs more layers."""


def build_pipeline(
    *,
    dim_head: int = 8,
    n_heads: int = 2,
    n_double: int = 2,
    n_single: int = 2,
    axes_dims: tuple[int, int, int, int] = (2, 2, 2, 2),
    text_dim: int = 16,
    text_layers: int = 28,
    text_heads: int = 2,
    vae_channels: tuple[int, ...] = (8, 16, 16),
    latent_channels: int = 4,
    sample_size: int = 64,
    is_distilled: bool = False,
    words: Iterable[str] = (),
    model_max_length: int = 64,
    seed: int = 0,
):
    """A random-weight ``Flux2KleinPipeline`` (about 200k parameters with the defaults).

    The VAE downsamples by ``2**(len(vae_channels) - 1)`` and the pipeline patchifies 2×2 on top of it
    (so the defaults take sides that are multiples of 8: 32 px → a 4×4 token grid). The VAE's
    batch-norm running statistics are random, so the latent normalisation is not the identity.
    ``sum(axes_dims)`` must equal ``dim_head``; the text encoder needs ``text_layers >= 27`` for the
    pipeline's default hidden-state layers (9, 18, 27).
    """
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )
    from transformers import Qwen3ForCausalLM

    if sum(axes_dims) != dim_head:
        raise ValueError(f"sum(axes_dims)={sum(axes_dims)} must equal dim_head={dim_head}")
    if text_layers < max(TEXT_LAYERS_USED):
        raise ValueError(f"text_layers must be at least {max(TEXT_LAYERS_USED)}, got {text_layers}")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words, model_max_length)
    text_encoder = Qwen3ForCausalLM(qwen3_config(len(tokenizer), text_dim, text_layers, text_heads, model_max_length,
                                                 ffn_mult=2, tie_word_embeddings=True)).eval()
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=n_double, num_single_layers=n_single,
        attention_head_dim=dim_head, num_attention_heads=n_heads, joint_attention_dim=len(TEXT_LAYERS_USED) * text_dim,
        timestep_guidance_channels=32, axes_dims_rope=tuple(axes_dims), guidance_embeds=False,
    )
    n = len(vae_channels)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=tuple(vae_channels),
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1, norm_num_groups=min(8, *vae_channels), sample_size=sample_size,
    )
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.3 * torch.randn_like(vae.bn.running_mean))
        vae.bn.running_var.copy_(0.5 + torch.rand_like(vae.bn.running_var))
    vae.eval()
    # FLUX.2 [klein]'s scheduler: resolution-dependent ("dynamic") exponential shift with mu from the pipeline.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential",
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=is_distilled)
