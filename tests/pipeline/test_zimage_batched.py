"""The batched transformer forward equals the stock diffusers forward."""

from __future__ import annotations

import torch

from twostep.teacher.families.zimage import transformer_velocity
from twostep.teacher.random_zimage import build_pipeline


def test_batched_forward_matches_stock_with_mixed_caption_lengths():
    pipe = build_pipeline(seed=1, n_layers=2, n_refiner_layers=2)
    model = pipe.transformer.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 16, 16, generator=g)
    # caption lengths 5, 40 and 33: padded to 32, 64 and 64 tokens (mask needed)
    caps = [torch.randn(n, 32, generator=g) for n in (5, 40, 33)]
    sigma = torch.tensor([1.0, 0.6, 0.1])
    with torch.no_grad():
        stock = transformer_velocity(model, x, sigma, caps, batched=False)
        fast = transformer_velocity(model, x, sigma, caps, batched=True)
        same_len = [torch.randn(7, 32, generator=g) for _ in range(3)]
        torch.testing.assert_close(transformer_velocity(model, x, sigma, same_len, batched=True),
                                   transformer_velocity(model, x, sigma, same_len, batched=False),
                                   atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast, stock, atol=1e-5, rtol=1e-4)


def test_batched_forward_gradients_match_stock():
    pipe = build_pipeline(seed=2)
    model = pipe.transformer
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 16, generator=g)
    caps = [torch.randn(n, 32, generator=g) for n in (3, 50)]
    grads = []
    for batched in (False, True):
        model.zero_grad()
        transformer_velocity(model, x, torch.tensor([0.9, 0.3]), caps, batched=batched).square().mean().backward()
        # parameters the batched path never touches (x_pad_token: no image padding) count as zero
        grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-3)
