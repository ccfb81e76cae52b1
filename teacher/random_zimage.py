"""Build Z-Image components locally: a byte-level ``Qwen2Tokenizer`` with a hand-set chat template,
and small random-weight ``ZImagePipeline`` s (tests, the toy teacher's starting point, and full-width
configs for GPU throughput runs). Nothing here downloads anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from itertools import pairwise

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# The Qwen3 chat template reduced to what ZImagePipeline uses: one user turn and the generation
# prompt (enable_thinking=True adds nothing, as in Qwen3's own template).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character map used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-level BPE as the tokenizer applies it: merge the best-ranked adjacent pair, repeat."""
    while len(symbols) > 1:
        pairs = [(ranks[p], p) for p in pairwise(symbols) if p in ranks]
        if not pairs:
            break
        a, b = min(pairs)[1]
        out, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                out.append(a + b)
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def build_tokenizer(words: Iterable[str] = (), model_max_length: int = 512):
    """A ``Qwen2Tokenizer`` over the 256 byte symbols, plus one token per word in ``words``.

    Each word, with and without a leading space (``Ġ``), gets one token: BPE applies merges by
    rank, not word by word, so each form is first tokenised with the merges made so far and then
    given merges (ranked after all earlier ones, so no earlier word changes) that join its pieces
    left to right. A caption made of known words costs one token a word; anything else falls
    back to bytes.
    """
    from transformers import Qwen2Tokenizer

    b2u = _bytes_to_unicode()
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in b2u.values():
        vocab.setdefault(ch, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in sorted(set(words)):
        for form in (word, " " + word):
            pieces = _bpe([b2u[b] for b in form.encode("utf-8")], ranks)
            while len(pieces) > 1:
                ranks.setdefault((pieces[0], pieces[1]), len(ranks))
                pieces = [pieces[0] + pieces[1], *pieces[2:]]
                vocab.setdefault(pieces[0], len(vocab))
    merges = sorted(ranks, key=ranks.get)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def qwen3_config(vocab_size: int, text_dim: int, text_layers: int, text_heads: int, model_max_length: int,
                 ffn_mult: int = 3, **extra):
    """A small ``Qwen3Config`` (the text encoder of Z-Image and FLUX.2 [klein]) of the given sizes."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=text_dim, intermediate_size=text_dim * ffn_mult,
        num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=text_heads,
        head_dim=text_dim // text_heads, max_position_embeddings=max(model_max_length, 512), **extra)


def build_pipeline(
    *,
    dim: int = 32,
    n_layers: int = 2,
    n_refiner_layers: int = 1,
    n_heads: int = 2,
    axes_dims: tuple[int, int, int] = (4, 6, 6),
    text_dim: int = 32,
    text_layers: int = 2,
    text_heads: int = 2,
    vae_channels: tuple[int, ...] = (32, 32),
    latent_channels: int = 16,
    words: Iterable[str] = (),
    model_max_length: int = 512,
    seed: int = 0,
):
    """A random-weight ``ZImagePipeline`` with the Z-Image component classes, at any size.

    Defaults give the tiny pipeline used in tests (a few hundred thousand parameters). The VAE
    downsamples by ``2**(len(vae_channels) - 1)``; the transformer patches 2×2 on top of it.
    ``sum(axes_dims)`` must equal the head dim ``dim // n_heads``.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Model

    if sum(axes_dims) != dim // n_heads:
        raise ValueError(f"sum(axes_dims)={sum(axes_dims)} must equal dim // n_heads = {dim // n_heads}")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words, model_max_length)
    text_encoder = Qwen3Model(qwen3_config(len(tokenizer), text_dim, text_layers, text_heads, model_max_length)).eval()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=latent_channels, dim=dim, n_layers=n_layers,
        n_refiner_layers=n_refiner_layers, n_heads=n_heads, n_kv_heads=n_heads, cap_feat_dim=text_dim,
        axes_dims=list(axes_dims), axes_lens=[1024, 512, 512],
    )
    n = len(vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=tuple(vae_channels),
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1, norm_num_groups=min(32, *vae_channels), scaling_factor=0.3611, shift_factor=0.1159,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
