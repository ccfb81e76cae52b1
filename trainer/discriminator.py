"""The discriminator: the frozen teacher transformer as a feature extractor, small trainable heads.

The teacher's forward sees the (re-noised) latent at its noise level and the caption, so the
features are conditioned on both; forward hooks collect the image tokens of a few layers and the
forward stops after the deepest one (GUIDE §3). Each head maps every image token to a logit,
modulated by the noise level (FiLM from a sinusoidal σ embedding), averaged over tokens; the
discriminator's logit is the mean over heads. Only the heads are trained.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from twostep.pipeline.zimage_batched import batched_forward, supports_batched


def default_layers(n_layers: int, k: int = 3) -> list[int]:
    """k evenly spaced layers, the last one included (e.g. 30 layers → 9, 19, 29)."""
    k = min(k, n_layers)
    return sorted({round((i + 1) * n_layers / k) - 1 for i in range(k)})


def sigma_embedding(sigma: torch.Tensor, dim: int = 64) -> torch.Tensor:
    """(B,) σ in [0, 1] → (B, dim) sinusoidal features."""
    freqs = torch.exp(torch.arange(dim // 2, device=sigma.device) * (-math.log(1000.0) / (dim // 2)))
    ang = 1000.0 * sigma.float()[:, None] * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], -1)


class Head(nn.Module):
    """Image tokens (B, N, D) + σ → per-sample logit (B,)."""

    def __init__(self, dim: int, hidden: int, emb: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.film = nn.Linear(emb, 2 * dim)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, tokens: torch.Tensor, semb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(semb).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm(tokens.float()) * (1 + scale) + shift
        return self.mlp(h).squeeze(-1).mean(1)  # (B, N) token logits → (B,)


class Discriminator(nn.Module):
    """``backbone``: the frozen teacher transformer (not a registered submodule: it is neither
    trained nor checkpointed with the heads, and stays shared with the teacher)."""

    def __init__(self, backbone: nn.Module, layers: list[int] | None = None, hidden: int = 256):
        super().__init__()
        object.__setattr__(self, "backbone", backbone)
        n_layers = len(backbone.layers)
        self.layers = list(layers) if layers else default_layers(n_layers)
        if any(not 0 <= i < n_layers for i in self.layers):
            raise ValueError(f"discriminator layers {self.layers} out of range for a {n_layers}-layer teacher")
        dim = int(backbone.config.dim)
        self.heads = nn.ModuleList(Head(dim, hidden) for _ in self.layers)

    def features(self, x: torch.Tensor, sigma: torch.Tensor, caps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Image tokens (B, N, D) of each hooked layer for latents ``x`` at noise levels ``sigma`` (B,)."""
        h, w = x.shape[-2:]
        if not supports_batched(self.backbone, h, w):
            raise ValueError(f"latents {h}×{w}: the discriminator needs image token counts that are a multiple of 32")
        dtype = next(self.backbone.parameters()).dtype
        hooks: dict[int, list[torch.Tensor]] = {i: [] for i in self.layers}
        batched_forward(self.backbone, x.to(dtype), 1.0 - sigma.to(x.device, torch.float32),
                        [c.to(dtype) for c in caps], stop_after=max(self.layers) + 1, hooks=hooks)
        n = (h // 2) * (w // 2)  # image tokens come first in each [image, caption] sequence
        return [hooks[i][0][:, :n] for i in self.layers]

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, caps: list[torch.Tensor],
                return_features: bool = False):
        feats = self.features(x, sigma, caps)
        semb = sigma_embedding(sigma.to(x.device))
        logits = torch.stack([head(f, semb) for head, f in zip(self.heads, feats)]).mean(0)
        return (logits, feats) if return_features else logits
