"""Build small random-weight ``Lumina2Pipeline`` s locally: a ``GemmaTokenizer`` with a hand-made
vocabulary, a tiny ``Gemma2Model``, ``Lumina2Transformer2DModel`` and ``AutoencoderKL``. Nothing
here downloads anything.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .random_zimage import _bpe

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
SPACE = "▁"  # Gemma's normaliser writes every space as this symbol
# Lumina2Pipeline.system_prompt and its separator: the prefix of every prompt costs one token a word
SYSTEM_PROMPT = (
    "You are an assistant designed to generate superior images with the superior degree of image-text "
    "alignment based on textual prompts or user prompts. <Prompt Start>"
)


def build_tokenizer(words: Iterable[str] = (), model_max_length: int = 512):
    """A ``GemmaTokenizer`` (BPE with byte fallback, ``<bos>`` first, ``<pad>`` = 0) over printable
    ASCII, plus one token per word of ``words`` and of the pipeline's system prompt, each with and
    without a leading space.

    Merges join a word's pieces left to right after tokenising it with the merges made so far (as
    :func:`twostep.teacher.random_zimage.build_tokenizer` does); no merge starts a piece with a space
    symbol except at a word's start, so none crosses a word boundary. Anything else falls back to
    characters or bytes.
    """
    from transformers import GemmaTokenizer

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in [SPACE, *map(chr, range(33, 127))]:
        vocab.setdefault(ch, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(words) | set(SYSTEM_PROMPT.split())):
        for form in (word, SPACE + word):
            for ch in form:
                vocab.setdefault(ch, len(vocab))
            pieces = _bpe(list(form), ranks)
            while len(pieces) > 1:
                ranks.setdefault((pieces[0], pieces[1]), len(ranks))
                pieces = [pieces[0] + pieces[1], *pieces[2:]]
                vocab.setdefault(pieces[0], len(vocab))
    merges = sorted(ranks, key=ranks.get)
    return GemmaTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length, add_bos_token=True)


def build_pipeline(
    *,
    hidden_size: int = 32,
    num_layers: int = 3,
    num_refiner_layers: int = 1,
    num_attention_heads: int = 2,
    num_kv_heads: int = 1,
    axes_dim_rope: tuple[int, int, int] = (8, 4, 4),
    text_dim: int = 32,
    text_layers: int = 2,
    text_heads: int = 2,
    vae_channels: tuple[int, ...] = (8, 8, 8, 8),
    latent_channels: int = 16,
    sample_size: int = 64,
    shift: float = 6.0,
    use_dynamic_shifting: bool = False,
    words: Iterable[str] = (),
    model_max_length: int = 512,
    seed: int = 0,
):
    """A random-weight ``Lumina2Pipeline`` with the Lumina-Image-2.0 component classes.

    Defaults give the tiny pipeline used in tests (about 0.2 M parameters, 64×64 images by default).
    ``Lumina2Pipeline`` assumes an 8× VAE, so ``vae_channels`` needs four levels; the transformer
    patches 2×2 on top of it. ``sum(axes_dim_rope)`` must equal the head dim
    ``hidden_size // num_attention_heads``.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        Lumina2Pipeline,
        Lumina2Transformer2DModel,
    )
    from transformers import Gemma2Config, Gemma2Model

    if sum(axes_dim_rope) != hidden_size // num_attention_heads:
        raise ValueError(f"sum(axes_dim_rope)={sum(axes_dim_rope)} must equal hidden_size // num_attention_heads "
                         f"= {hidden_size // num_attention_heads}")
    if len(vae_channels) != 4:
        raise ValueError(f"Lumina2Pipeline assumes an 8× VAE: vae_channels needs 4 levels, got {len(vae_channels)}")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words, model_max_length)
    text_encoder = Gemma2Model(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=text_dim * 2,
        num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=1,
        head_dim=text_dim // text_heads, max_position_embeddings=max(model_max_length, 512), pad_token_id=0,
        bos_token_id=2, eos_token_id=1,
    )).eval()
    transformer = Lumina2Transformer2DModel(
        sample_size=sample_size // 8, patch_size=2, in_channels=latent_channels, hidden_size=hidden_size,
        num_layers=num_layers, num_refiner_layers=num_refiner_layers, num_attention_heads=num_attention_heads,
        num_kv_heads=num_kv_heads, multiple_of=16, axes_dim_rope=tuple(axes_dim_rope), cap_feat_dim=text_dim,
    )
    n = len(vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=tuple(vae_channels),
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1, norm_num_groups=min(4, *vae_channels), scaling_factor=0.3611, shift_factor=0.1159,
        sample_size=sample_size,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift,
                                                use_dynamic_shifting=use_dynamic_shifting)
    return Lumina2Pipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                           tokenizer=tokenizer)
