"""Build small random-weight Wan 2.1 text-to-video pipelines locally (``WanPipeline`` with its own
component classes: ``WanTransformer3DModel``, ``UMT5EncoderModel``, a T5-style Unigram tokenizer,
``AutoencoderKLWan`` and Wan 2.1's ``UniPCMultistepScheduler`` with flow sigmas). twostep runs them
at one frame (docs/families.md). Nothing here downloads anything.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

import torch

WAN_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
WAN_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                   3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]
"""Wan 2.1's per-channel latent statistics (``AutoencoderKLWan``'s defaults, 16 channels)."""


def build_tokenizer(words: Iterable[str] = (), model_max_length: int = 512):
    """A T5-style ``T5Tokenizer`` (Unigram, ``▁`` word starts, ``</s>`` appended, ``<pad>`` = 0) with one
    token per word in ``words`` and single printable characters as the fallback (others map to ``<unk>``)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in sorted(set(words)) if w]
    known = {piece for piece, _ in vocab}
    vocab += [(c, -8.0) for c in string.printable.strip() if c not in known]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def build_pipeline(
    *,
    words: Iterable[str] = (),
    seed: int = 0,
    n_heads: int = 2,
    head_dim: int = 12,
    n_layers: int = 2,
    ffn_dim: int = 48,
    freq_dim: int = 32,
    text_dim: int = 32,
    text_layers: int = 2,
    text_heads: int = 4,
    vae_base_dim: int = 8,
    latent_channels: int = 16,
    model_max_length: int = 512,
    flow_shift: float = 3.0,
    sample_size: int = 64,
):
    """A random-weight ``WanPipeline`` (a few hundred thousand parameters at the defaults).

    The VAE downsamples 8× in space (as Wan 2.1's) and the transformer patches 1×2×2 on top, so sides
    must be multiples of 16. ``head_dim`` must be a multiple of 6 (Wan's rotary split over t, h, w).
    The VAE config records ``sample_size`` (not an ``AutoencoderKLWan`` argument: diffusers keeps it in
    the config and warns on load) as the adapter's default image side.
    """
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if head_dim % 6:
        raise ValueError(f"head_dim={head_dim} must be a multiple of 6")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words, model_max_length)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=text_dim, d_kv=text_dim // text_heads, d_ff=text_dim * 2,
        num_layers=text_layers, num_heads=text_heads, relative_attention_num_buckets=8,
        relative_attention_max_distance=32, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )).eval()
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=n_heads, attention_head_dim=head_dim, in_channels=latent_channels,
        out_channels=latent_channels, text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn_dim, num_layers=n_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=1024,
    )
    gen = torch.Generator().manual_seed(seed)
    mean = WAN_LATENTS_MEAN if latent_channels == 16 else torch.randn(latent_channels, generator=gen).tolist()
    std = WAN_LATENTS_STD if latent_channels == 16 else (1 + torch.rand(latent_channels, generator=gen)).tolist()
    vae = AutoencoderKLWan(
        base_dim=vae_base_dim, z_dim=latent_channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=mean, latents_std=std,
    )
    vae.register_to_config(sample_size=sample_size)
    scheduler = UniPCMultistepScheduler(  # Wan 2.1's scheduler config
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift, num_train_timesteps=1000,
        solver_order=2, predict_x0=True, solver_type="bh2", lower_order_final=True, final_sigmas_type="zero",
    )
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
