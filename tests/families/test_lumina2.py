"""The Lumina-Image-2.0 adapter against the stock ``Lumina2Pipeline`` on a tiny random-weight pipeline
(fp32, CPU): sampler and sigmas, the velocity convention, per-sample feature hooks, the exported
2-step students, and the VAE and size helpers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from twostep.teacher.families.base import euler_step, x0_from
from twostep.teacher.families.lumina2 import Lumina2Family
from twostep.teacher.random_lumina2 import build_pipeline

PROMPTS = ["a red cat", "a small blue house on a green hill under the warm sun"]
WORDS = sorted({w for p in PROMPTS for w in p.split()})
SEEDS = [11, 12]
H, W = 32, 64  # latents (16, 4, 8), a 2×4 token grid: height and width differ on purpose
CPU = torch.device("cpu")
ATOL = 1e-4  # adapter vs stock pipeline, fp32 on CPU (observed differences are about 1e-6)


@pytest.fixture(scope="module")
def fam() -> Lumina2Family:
    pipe = build_pipeline(words=WORDS, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return Lumina2Family(pipe)


def noise(fam: Lumina2Family, seeds: list[int], height: int = H, width: int = W) -> torch.Tensor:
    shape = fam.latent_shape(height, width)
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


@torch.no_grad()
def adapter_sample(fam: Lumina2Family, steps: int, scale: float) -> torch.Tensor:
    """The generic teacher sampler, from the adapter's methods."""
    msl = fam.max_sequence_length()
    caps = fam.encode_prompts(PROMPTS, CPU, msl)
    neg = fam.encode_negative_prompts([""] * len(PROMPTS), CPU, msl) if scale > 0 else None
    sig = fam.sigmas(steps, H, W)
    x = noise(fam, SEEDS)
    for i in range(steps):
        u = fam.velocity(fam.transformer, x, sig[i], caps)
        if neg is not None:
            u = fam.guide(u, fam.velocity(fam.transformer, x, sig[i], neg), scale, sig[i])
        x = euler_step(x, u, sig[i], sig[i + 1])
    return x


def stock_sample(pipe, steps: int, scale: float, **kwargs) -> tuple[torch.Tensor, list[float]]:
    """The stock pipeline's latents and the sigmas its scheduler visited."""
    seen: list[float] = []

    def record(p, i, t, callback_kwargs):
        seen[:] = [float(s) for s in p.scheduler.sigmas]
        return {}

    out = pipe(PROMPTS, height=H, width=W, num_inference_steps=steps, guidance_scale=scale,
               generator=generators(SEEDS), output_type="latent", callback_on_step_end=record, **kwargs).images
    return out.float(), seen


@pytest.mark.parametrize("scale", [0.0, 0.5, 4.0])
def test_sampler_matches_stock_pipeline(fam, scale):
    """No guidance, guidance ≤ 1 (the pipeline ignores it; guide() returns the conditional velocity),
    and CFG at the stock default 4.0."""
    ours = adapter_sample(fam, 4, scale)
    stock, seen = stock_sample(fam.pipe, 4, scale)
    assert seen == pytest.approx(fam.sigmas(4, H, W), abs=1e-7)
    assert ours.shape == stock.shape == (2, *fam.latent_shape(H, W))
    torch.testing.assert_close(ours, stock, atol=ATOL, rtol=0)
    if scale > 1:  # the guidance is the normalised one (cfg_normalization=True): the plain formula differs
        plain, _ = stock_sample(fam.pipe, 4, scale, cfg_normalization=False)
        assert (plain - stock).abs().max() > 1e-3


def test_sigmas_with_dynamic_shifting(fam):
    """With dynamic shifting the pipeline's ``mu`` comes from the latent channel count; sigmas() follows."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline

    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = Lumina2Pipeline(**{**fam.pipe.components, "scheduler": sched})
    pipe.set_progress_bar_config(disable=True)
    dyn = Lumina2Family(pipe)
    _, seen = stock_sample(pipe, 3, 0.0)
    assert seen == pytest.approx(dyn.sigmas(3, H, W), abs=1e-7)
    assert dyn.sigmas(3, H, W) != pytest.approx(fam.sigmas(3, H, W), abs=1e-3)
    assert fam.sigmas(4, H, W, grid=[1.0, 0.5]) == pytest.approx([1.0, 6 / 7, 0.0], abs=1e-6)  # shift 6


def test_velocity_convention(fam, monkeypatch):
    """A stub transformer predicts x0 - ε (Lumina2's sign) at model time 1 - σ: u = ε - x0."""
    model = fam.transformer
    gen = torch.Generator("cpu").manual_seed(3)
    x0 = torch.randn(2, *fam.latent_shape(H, W), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    sigma = torch.tensor([0.3, 0.8])
    s = sigma.view(-1, 1, 1, 1)
    x = (1 - s) * x0 + s * eps
    caps = fam.encode_prompts(PROMPTS, CPU, fam.max_sequence_length())
    calls = []

    def stub(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, return_dict=True, **_):
        calls.append(1)
        torch.testing.assert_close(timestep, 1 - sigma)
        torch.testing.assert_close(hidden_states, x)
        assert encoder_attention_mask.sum(dim=1).tolist() == [c.shape[0] for c in caps]
        return (x0 - eps,)

    monkeypatch.setattr(model, "forward", stub)
    u = fam.velocity(model, x, sigma, caps)
    assert calls and u.dtype == torch.float32
    torch.testing.assert_close(u, eps - x0)
    torch.testing.assert_close(x0_from(x, u, s), x0, atol=1e-6, rtol=0)


def test_captions(fam):
    """Captions drop the pipeline's padding; prompts carry the system prompt, negatives do not."""
    msl = fam.max_sequence_length()
    assert msl == 256
    caps = fam.encode_prompts(PROMPTS, CPU, msl)
    embeds, mask, _, _ = fam.pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, device=CPU)
    assert [c.shape for c in caps] == [(int(n), fam.text_dim(fam.transformer)) for n in mask.sum(1)]
    assert caps[0].shape[0] < caps[1].shape[0] < embeds.shape[1]
    torch.testing.assert_close(caps[1], embeds[1, : caps[1].shape[0]])
    neg = fam.encode_negative_prompts(["", "a red cat"], CPU, msl)
    assert neg[0].shape[0] == 1  # <bos> alone
    assert neg[1].shape[0] < caps[0].shape[0]  # no system prompt


def test_features_are_per_sample_image_tokens(fam):
    model = fam.transformer
    caps = fam.encode_prompts(PROMPTS, CPU, fam.max_sequence_length())
    assert caps[0].shape[0] != caps[1].shape[0]
    x = noise(fam, SEEDS)
    sigma = torch.tensor([0.9, 0.4])
    gh, gw = fam.token_grid(*x.shape[-2:])
    last = fam.num_blocks(model) - 1
    layers = [0, last]
    with torch.no_grad():
        both = fam.features(model, x, sigma, caps, layers)
        alone = [fam.features(model, x[i: i + 1], sigma[i: i + 1], caps[i: i + 1], layers) for i in range(2)]
    for f in both:
        assert f.shape == (2, gh * gw, fam.hidden_dim(model))
    for i in range(2):
        for k in range(len(layers)):
            torch.testing.assert_close(both[k][i], alone[i][k][0], atol=1e-5, rtol=0)

    # the last block's tokens are the image tokens, row-major: the output head turns them into the prediction
    with torch.no_grad():
        t = 1 - sigma
        temb, _ = model.time_caption_embed(x, t, caps[0][None])
        head = model.norm_out(both[1], temb)  # (B, N, p·p·C)
        p, c = model.config.patch_size, model.out_channels
        pred = head.view(2, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(x.shape)
        torch.testing.assert_close(-pred, fam.velocity(model, x, sigma, caps), atol=1e-5, rtol=0)

    # the features depend on the latents, and the forward stops after the deepest hooked block
    with torch.no_grad():
        other = fam.features(model, noise(fam, [5, 6]), sigma, caps, [0])
    assert (other[0] - both[0]).abs().max() > 1e-3
    ran = []
    handle = model.layers[last].register_forward_hook(lambda *a: ran.append(1))
    try:
        with torch.no_grad():
            fam.features(model, x, sigma, caps, [0])
    finally:
        handle.remove()
    assert not ran


def test_velocity_mixed_caption_lengths(fam):
    """A batch of captions of different lengths (cond and uncond together) equals each sample alone."""
    model = fam.transformer
    msl = fam.max_sequence_length()
    caps = fam.encode_prompts(PROMPTS[:1], CPU, msl) + fam.encode_negative_prompts([""], CPU, msl)
    x = noise(fam, [1, 1])
    with torch.no_grad():
        both = fam.velocity(model, x, 0.7, caps)
        alone = torch.cat([fam.velocity(model, x[i: i + 1], 0.7, caps[i: i + 1]) for i in range(2)])
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=0)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    out = copy.deepcopy(model)
    gen = torch.Generator("cpu").manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return out


@torch.no_grad()
def student_sample(fam: Lumina2Family, first, second, sigma_mid: float) -> torch.Tensor:
    """The generic 2-step student sampler."""
    caps = fam.encode_prompts(PROMPTS, CPU, fam.max_sequence_length())
    x = noise(fam, SEEDS)
    mid = euler_step(x, fam.velocity(first, x, 1.0, caps), 1.0, sigma_mid)
    return euler_step(mid, fam.velocity(second or first, mid, sigma_mid, caps), sigma_mid, 0.0)


@pytest.mark.parametrize("two", [True, False])
def test_export_runs_the_student_sampler(fam, tmp_path, two):
    from diffusers import DiffusionPipeline

    sigma_mid = 0.6
    first = perturbed(fam.transformer, 1)
    second = perturbed(fam.transformer, 2) if two else None
    pipe, facts = fam.export_pipeline(first, second, sigma_mid)
    assert facts["layout"] == ("two_transformers" if two else "shared")
    assert facts["call"]["guidance_scale"] == 1.0 and facts["call"]["num_inference_steps"] == 2
    pipe.save_pretrained(tmp_path)
    if two:
        assert facts["pipeline_class"] == ["pipeline_experts", "TwoStepLumina2Pipeline"]
        loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
        assert type(loaded).__name__ == "TwoStepLumina2Pipeline" and loaded.transformer_2 is not None
    else:
        assert facts["pipeline_class"] == "Lumina2Pipeline"
        loaded = DiffusionPipeline.from_pretrained(tmp_path)
        assert type(loaded).__name__ == "Lumina2Pipeline"
    loaded.set_progress_bar_config(disable=True)
    got = loaded(PROMPTS, height=H, width=W, generator=generators(SEEDS), output_type="latent",
                 **facts["call"]).images
    want = student_sample(fam, first, second, sigma_mid)
    torch.testing.assert_close(got.float(), want, atol=ATOL, rtol=0)
    if two:  # the second parameter set did take step 2
        assert (student_sample(fam, first, None, sigma_mid) - want).abs().max() > 1e-3


def test_vae_and_sizes(fam):
    assert fam.vae_scale_factor == 8 and fam.size_multiple == 16 and fam.default_size == 64
    assert fam.latent_shape(H, W) == (16, 4, 8) and fam.token_grid(4, 8) == (2, 4)
    for bad in [(40, 64), (32, 24), (0, 32)]:
        with pytest.raises(ValueError, match="multiples of 16"):
            fam.latent_shape(*bad)
    z = adapter_sample(fam, 2, 0.0)
    images = fam.decode(z)
    assert images.dtype == np.uint8 and images.shape == (2, H, W, 3)
    stock = fam.pipe(PROMPTS, height=H, width=W, num_inference_steps=2, guidance_scale=0.0,
                     generator=generators(SEEDS), output_type="np").images
    assert np.abs(np.round(stock * 255) - images.astype(np.float64)).max() <= 1
    latents = fam.encode_images(images)
    assert latents.dtype == torch.float32 and latents.shape == (2, *fam.latent_shape(H, W))


def test_lora_targets_name_only_attention_and_ffn(fam):
    names = [n for n, _ in fam.transformer.named_modules()]
    for target in fam.lora_targets:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        assert hits and all(".attn." in n or ".feed_forward." in n for n in hits), target
