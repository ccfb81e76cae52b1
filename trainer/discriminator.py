"""The discriminator: the frozen teacher transformer as a feature extractor, small trainable heads.

The teacher's forward sees the (re-noised) latent at its noise level and the caption, so the
features are conditioned on both; the family adapter's hooks collect the image tokens of a few blocks
(``Family.features``; docs/families.md) and the forward stops after the deepest one (docs/design.md, "Discriminator features"). Each head maps every
image token to a logit, modulated by the noise level (FiLM from a sinusoidal σ embedding); the
discriminator's output is the mean over heads of these token logits, (B, N). The loss decides how
tokens are reduced (``loss.gan_reduce``): averaged into one logit per image before the hinge, or a
hinge per token (SANA-Sprint's heads). Only the heads are trained.

With ``model.disc_text``, each head is also a projection discriminator (StyleGAN-T's and
SANA-Sprint's ``DiscHead``): the caption's features, averaged over its tokens and mapped by a linear
layer, take the place of the head's last layer, so a token's logit is the inner product of its hidden
features with the caption's projection (scaled by 1/√hidden).

Two head kinds (``model.disc_head``):

* ``mlp``: LayerNorm → FiLM → Linear → SiLU → Linear, token by token;
* ``conv``: on the (h/2, w/2) token grid, spectral-norm 1×1 conv → LeakyReLU → residual spectral-norm
  3×3 conv → spectral-norm 1×1 conv to one logit per token (the shape of SANA's / StyleGAN-T's
  ``DiscHead``, with a 2-D kernel since the image tokens are a row-major grid).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from twostep.teacher.families import Family

HEAD_KINDS = ("mlp", "conv")


def default_layers(n_layers: int, k: int = 3) -> list[int]:
    """k evenly spaced layers, the last one included (e.g. 30 layers → 9, 19, 29)."""
    k = min(k, n_layers)
    return sorted({round((i + 1) * n_layers / k) - 1 for i in range(k)})


def sigma_embedding(sigma: torch.Tensor, dim: int = 64) -> torch.Tensor:
    """(B,) σ in [0, 1] → (B, dim) sinusoidal features."""
    freqs = torch.exp(torch.arange(dim // 2, device=sigma.device) * (-math.log(1000.0) / (dim // 2)))
    ang = 1000.0 * sigma.float()[:, None] * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], -1)


class _Film(nn.Module):
    """LayerNorm of the tokens, then scale and shift from the σ embedding (zero-initialised: identity)."""

    def __init__(self, dim: int, emb: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.film = nn.Linear(emb, 2 * dim)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, tokens: torch.Tensor, semb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(semb).unsqueeze(1).chunk(2, dim=-1)
        return self.norm(tokens.float()) * (1 + scale) + shift


class _Projection(nn.Module):
    """Token logits as the inner product of hidden features (B, N, H) with the projected caption (B, H)."""

    def __init__(self, text_dim: int, hidden: int):
        super().__init__()
        self.map = nn.Linear(text_dim, hidden)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return (h * self.map(cond.float()).unsqueeze(1)).sum(-1) / math.sqrt(h.shape[-1])


class Head(nn.Module):
    """MLP head: image tokens (B, N, D) + σ embedding (+ pooled caption) → token logits (B, N)."""

    def __init__(self, dim: int, hidden: int, emb: int = 64, text_dim: int = 0):
        super().__init__()
        self.film = _Film(dim, emb)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU())
        self.out = _Projection(text_dim, hidden) if text_dim else nn.Linear(hidden, 1)

    def forward(self, tokens: torch.Tensor, semb: torch.Tensor, grid: tuple[int, int],
                cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.mlp(self.film(tokens, semb))
        return self.out(h, cond) if isinstance(self.out, _Projection) else self.out(h).squeeze(-1)


class ConvHead(nn.Module):
    """Spectral-norm conv head on the token grid: tokens (B, N, D), N = gh·gw → token logits (B, N)."""

    def __init__(self, dim: int, hidden: int, emb: int = 64, text_dim: int = 0):
        super().__init__()
        self.film = _Film(dim, emb)
        self.inp = spectral_norm(nn.Conv2d(dim, hidden, 1))
        self.res = spectral_norm(nn.Conv2d(hidden, hidden, 3, padding=1))
        self.out = _Projection(text_dim, hidden) if text_dim else spectral_norm(nn.Conv2d(hidden, 1, 1))
        self.act = nn.LeakyReLU(0.2)

    def forward(self, tokens: torch.Tensor, semb: torch.Tensor, grid: tuple[int, int],
                cond: torch.Tensor | None = None) -> torch.Tensor:
        b, _, d = tokens.shape
        h = self.film(tokens, semb).transpose(1, 2).reshape(b, d, *grid)  # row-major token grid
        h = self.act(self.inp(h))
        h = (h + self.act(self.res(h))) / math.sqrt(2)
        if isinstance(self.out, _Projection):
            return self.out(h.flatten(2).transpose(1, 2), cond)
        return self.out(h).flatten(1)


def pooled_captions(caps: list[torch.Tensor]) -> torch.Tensor:
    """Each caption's features averaged over its tokens: (B, D_cap)."""
    return torch.stack([c.float().mean(0) for c in caps])


class Discriminator(nn.Module):
    """The frozen teacher transformer of ``family`` as backbone (not a registered submodule: it is
    neither trained nor checkpointed with the heads, and stays shared with the teacher). ``layers``
    index the family's hook points (its transformer blocks in forward order)."""

    def __init__(self, family: Family, layers: list[int] | None = None, hidden: int = 256,
                 head: str = "mlp", text: bool = False):
        super().__init__()
        self.family = family  # not a module (see the class docstring)
        backbone = family.transformer
        object.__setattr__(self, "backbone", backbone)
        n_layers = family.num_blocks(backbone)
        self.layers = list(layers) if layers else default_layers(n_layers)
        if any(not 0 <= i < n_layers for i in self.layers):
            raise ValueError(f"discriminator layers {self.layers} out of range for a {n_layers}-layer teacher")
        if head not in HEAD_KINDS:
            raise ValueError(f"discriminator head {head!r}: expected one of {', '.join(HEAD_KINDS)}")
        dim = family.hidden_dim(backbone)
        kind = ConvHead if head == "conv" else Head
        text_dim = family.text_dim(backbone) if text else 0
        self.text = bool(text)
        self.heads = nn.ModuleList(kind(dim, hidden, text_dim=text_dim) for _ in self.layers)

    def features(self, x: torch.Tensor, sigma: torch.Tensor, caps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Image tokens (B, N, D) of each hooked layer for latents ``x`` at noise levels ``sigma`` (B,)."""
        return self.family.features(self.backbone, x, sigma.to(x.device, torch.float32), caps, self.layers)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, caps: list[torch.Tensor],
                return_features: bool = False):
        """Token logits (B, N) (and the features when asked): the mean of the heads' token logits."""
        feats = self.features(x, sigma, caps)
        semb = sigma_embedding(sigma.to(x.device))
        grid = self.family.token_grid(x.shape[-2], x.shape[-1])
        cond = pooled_captions(caps).to(x.device) if self.text else None
        logits = torch.stack([head(f, semb, grid, cond) for head, f in zip(self.heads, feats)]).mean(0)
        return (logits, feats) if return_features else logits
