"""Loss terms. Latents follow docs/design.md ("σ and x0"): ``x_σ = (1-σ)·x0 + σ·ε``; the student's
step-1 state is ``x_mid = (1-σ_mid)·x̂0₁ + σ_mid·ε``.

Discriminator logits are token logits (B, N) or image logits (B,); every GAN loss here averages over
all its elements, so ``reduce_logits(…, "token")`` gives SANA-Sprint's per-token hinge and
``"image"`` a hinge on the token-averaged logit."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def renoise(x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Put clean latents (B, C, h, w) back at noise levels ``sigma`` (B,)."""
    s = sigma.view(-1, 1, 1, 1).to(x0.dtype)
    return (1 - s) * x0 + s * eps


def sample_sigma(n: int, mean: float, std: float, g: torch.Generator, dist: str = "logit_normal") -> torch.Tensor:
    """Noise levels (B,) inside [0.02, 0.98]: logit-normal sigmoid(N(mean, std²)), or uniform."""
    if dist == "uniform":
        return 0.02 + 0.96 * torch.rand(n, generator=g)
    return torch.sigmoid(torch.randn(n, generator=g) * std + mean).clamp(0.02, 0.98)


def step1_target(mid: torch.Tensor, noise: torch.Tensor, sigma_mid: float) -> torch.Tensor:
    """The teacher's x0 implied by its own σ_mid state for the same noise: (mid − σ·ε) / (1 − σ).

    The regression lives in x0 space: an error in x̂0₁ reaches the state scaled by (1 − σ_mid)
    (1/16 of its square at σ_mid = 0.75), so a loss on the state itself would barely move step 1.
    """
    return (mid - sigma_mid * noise) / (1 - sigma_mid)


def reduce_logits(logits: torch.Tensor, how: str) -> torch.Tensor:
    """Token logits (B, N) → image logits (B,) for ``how="image"``; unchanged for ``"token"``."""
    return logits.mean(1) if how == "image" and logits.dim() == 2 else logits


def d_loss(real: torch.Tensor, fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Discriminator loss on real and fake logits ((B,) or (B, N)), each averaged over its elements."""
    if kind == "hinge":
        return F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_loss(fake: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """Generator (student) adversarial loss on fake logits ((B,) or (B, N))."""
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()


def misaligned(real: torch.Tensor) -> torch.Tensor:
    """Real latents rolled by one position in the batch: under the original captions they are
    image/caption pairs that do not belong together, extra fakes that make the discriminator check
    text alignment (SANA-Sprint's ``misaligned_pairs_D``)."""
    return real.roll(1, dims=0)


def accuracy(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Real/fake accuracy of image logits (token logits are averaged first): real > 0, fake < 0,
    each class weighted equally."""
    real, fake = reduce_logits(real, "image"), reduce_logits(fake, "image")
    return ((real > 0).float().mean() + (fake < 0).float().mean()) / 2


def auc(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Area under the ROC curve of image logits (token logits are averaged first): the probability that
    a random real sample scores above a random fake one, ties counting half (Mann–Whitney U)."""
    real = reduce_logits(real, "image").double().flatten().cpu()
    fake = reduce_logits(fake, "image").double().flatten().cpu()
    above = (real[:, None] > fake[None, :]).double().sum() + 0.5 * (real[:, None] == fake[None, :]).double().sum()
    return float(above / (len(real) * len(fake)))


def feature_matching(real: list[torch.Tensor], fake: list[torch.Tensor]) -> torch.Tensor:
    """Paired feature matching in the discriminator's feature space: mean over layers of the MSE
    between the image tokens of the re-noised teacher and student latents (same ε, σ, caption),
    each layer normalised by its real features' mean square so deep layers do not dominate."""
    terms = [F.mse_loss(f.float(), r.float().detach()) / r.float().pow(2).mean().clamp_min(1e-6).detach()
             for r, f in zip(real, fake)]
    return torch.stack(terms).mean()


def approx_r1(disc, x: torch.Tensor, sigma: torch.Tensor, caps: list[torch.Tensor], noise_std: float,
              g: torch.Generator, logits: torch.Tensor | None = None) -> torch.Tensor:
    """Approximate R1: E‖D(x + δ) − D(x)‖² / σ_δ², δ ~ N(0, σ_δ²), on real inputs.

    Exact R1 needs a double backward through the frozen teacher, which fused attention kernels do not
    support; this finite-difference form costs one more discriminator forward (docs/training.md, "R1").
    """
    delta = torch.randn(x.shape, generator=g).to(x.device, x.dtype) * noise_std
    base = logits if logits is not None else disc(x, sigma, caps)
    return (disc(x + delta, sigma, caps) - base).pow(2).mean() / noise_std ** 2
