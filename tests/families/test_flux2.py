"""The FLUX.2 [klein] adapter against the stock ``Flux2KleinPipeline`` (tiny random weights, fp32 on CPU)."""

from __future__ import annotations

import copy
from itertools import pairwise

import numpy as np
import pytest
import torch

from twostep.teacher.families.base import euler_step, x0_from
from twostep.teacher.families.flux2 import Flux2KleinFamily
from twostep.teacher.random_flux2 import build_pipeline

PROMPTS = ["a red cat sitting on a green mat", "a small blue house"]
WORDS = sorted({w for p in PROMPTS for w in p.split()})
H, W = 32, 48  # latent grid 4×6: not square, so a transposed token order shows
SEEDS = [11, 12]
ATOL = 1e-5  # stock vs adapter: the same ops, plus the stock latent output's unnormalise/renormalise round trip


@pytest.fixture(scope="module")
def fam() -> Flux2KleinFamily:
    pipe = build_pipeline(words=WORDS, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return Flux2KleinFamily(pipe)


def gens(seeds=SEEDS) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def noise(fam: Flux2KleinFamily, seeds=SEEDS) -> torch.Tensor:
    shape = fam.latent_shape(H, W)
    return torch.stack([torch.randn(shape, generator=g) for g in gens(seeds)])


def to_adapter(fam: Flux2KleinFamily, raw: torch.Tensor) -> torch.Tensor:
    """The stock ``output_type="latent"`` (unnormalised VAE latents) → the adapter's patchified, normalised grid."""
    z = fam.pipe._patchify_latents(raw)
    mean, std = fam._bn(z)
    return (z - mean) / std


def stock(pipe, fam: Flux2KleinFamily, **kw) -> torch.Tensor:
    out = pipe(prompt=PROMPTS, height=H, width=W, generator=gens(), output_type="latent", **kw).images
    return to_adapter(fam, out)


def perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return out


# --- 1. the N-step sampler equals the stock pipeline ----------------------------------------------


@torch.no_grad()
def adapter_sample(fam: Flux2KleinFamily, steps: int, guidance: float) -> torch.Tensor:
    msl = fam.max_sequence_length()
    caps = fam.encode_prompts(PROMPTS, torch.device("cpu"), msl)
    neg = fam.encode_prompts([""] * len(PROMPTS), torch.device("cpu"), msl)
    x = noise(fam)
    for s, s_next in pairwise(fam.sigmas(steps, H, W)):
        u = fam.velocity(fam.transformer, x, s, caps)
        if guidance > 0:
            u = fam.guide(u, fam.velocity(fam.transformer, x, s, neg), guidance, s)
        x = euler_step(x, u, s, s_next)
    return x


@pytest.mark.parametrize("guidance", [0.0, 3.0])
def test_sampler_matches_stock_pipeline(fam, guidance):
    ours = adapter_sample(fam, 4, guidance)
    theirs = stock(fam.pipe, fam, num_inference_steps=4, guidance_scale=guidance if guidance else 1.0,
                   max_sequence_length=fam.max_sequence_length())
    assert [round(float(s), 6) for s in fam.pipe.scheduler.sigmas] == [round(s, 6) for s in fam.sigmas(4, H, W)]
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    if guidance:  # guidance changes the result (the uncond branch is really used)
        assert (ours - adapter_sample(fam, 4, 0.0)).abs().max() > 1e-3


def test_sigmas_dynamic_shift_and_scheduler_untouched(fam):
    fam.pipe.scheduler.set_timesteps(3, sigmas=[1.0, 0.7, 0.4], mu=1.0)
    before = fam.pipe.scheduler.sigmas.clone()
    small, large = fam.sigmas(4, 32, 32), fam.sigmas(4, 256, 256)
    torch.testing.assert_close(fam.pipe.scheduler.sigmas, before)  # a copy was used
    assert len(small) == 5 and small[0] == pytest.approx(1.0) and small[-1] == 0.0
    assert small != large  # mu depends on the token count
    assert not np.allclose(small[:-1], np.linspace(1, 0.25, 4))  # the shift is applied
    assert len(fam.sigmas(3, H, W, grid=[1.0, 0.6, 0.2])) == 4


def test_guidance_conventions(fam):
    pos, neg = torch.ones(2), torch.zeros(2)
    assert fam.default_guidance == 4.0  # the stock default for a non-distilled checkpoint
    torch.testing.assert_close(fam.guide(pos, neg, 3.0, 0.5), torch.full((2,), 3.0))
    torch.testing.assert_close(fam.guide(pos, neg, 1.0, 0.5), pos)  # the pipeline's CFG needs scale > 1
    p = fam.pipe
    distilled = Flux2KleinFamily(type(p)(scheduler=p.scheduler, vae=p.vae, text_encoder=p.text_encoder,
                                         tokenizer=p.tokenizer, transformer=p.transformer, is_distilled=True))
    assert distilled.default_guidance == 0.0
    torch.testing.assert_close(distilled.guide(pos, neg, 3.0, 0.5), pos)  # guidance ignored, as the pipeline does


# --- 2. the velocity convention -------------------------------------------------------------------


def test_velocity_convention_with_stub(fam, monkeypatch):
    model = copy.deepcopy(fam.transformer)
    g = torch.Generator().manual_seed(3)
    c, h, w = fam.latent_shape(H, W)
    x0, eps = torch.randn(2, c, h, w, generator=g), torch.randn(2, c, h, w, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    x = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
    pack = lambda t: t.reshape(2, c, h * w).permute(0, 2, 1)  # noqa: E731
    seen = {}

    def stub(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance=None, return_dict=True,
             **_):
        seen["t"] = timestep
        torch.testing.assert_close(hidden_states, pack(x))
        ij = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
        assert torch.equal(img_ids[0, :, 1:3], ij) and not img_ids[0, :, [0, 3]].any()
        assert guidance is None and txt_ids.shape[:2] == encoder_hidden_states.shape[:2]
        return (pack(eps - x0),)  # FLUX.2 predicts ε - x0 on the packed sequence

    monkeypatch.setattr(model, "forward", stub)
    caps = fam.encode_prompts(PROMPTS, torch.device("cpu"), fam.max_sequence_length())
    u = fam.velocity(model, x, sigma, caps)
    torch.testing.assert_close(seen["t"], sigma)  # model time is σ (the model scales by 1000 itself)
    assert u.dtype == torch.float32
    torch.testing.assert_close(u, eps - x0)
    torch.testing.assert_close(x0_from(x, u, sigma.view(-1, 1, 1, 1)), x0, atol=1e-6, rtol=0)


def test_velocity_has_gradients(fam):
    model = copy.deepcopy(fam.transformer).requires_grad_(True)
    caps = fam.encode_prompts(PROMPTS[:1], torch.device("cpu"), fam.max_sequence_length())
    fam.velocity(model, noise(fam, SEEDS[:1]), 0.5, caps).square().mean().backward()
    assert model.x_embedder.weight.grad is not None and model.x_embedder.weight.grad.abs().sum() > 0


def test_captions_must_share_a_length(fam):
    caps = [torch.zeros(5, fam.text_dim(fam.transformer)), torch.zeros(7, fam.text_dim(fam.transformer))]
    with pytest.raises(ValueError, match="one length"):
        fam.velocity(fam.transformer, noise(fam), 0.5, caps)


# --- 3. the hooks ---------------------------------------------------------------------------------


@torch.no_grad()
def test_features_are_image_tokens_per_sample(fam):
    model = fam.transformer
    n_double, n_blocks = len(model.transformer_blocks), fam.num_blocks(model)
    assert n_blocks == n_double + len(model.single_transformer_blocks) == 4
    caps = fam.encode_prompts(PROMPTS, torch.device("cpu"), fam.max_sequence_length())
    x, sigma = noise(fam), torch.tensor([0.9, 0.4])
    layers = list(range(n_blocks))
    feats = fam.features(model, x, sigma, caps, layers)
    gh, gw = fam.token_grid(*x.shape[-2:])
    assert all(f.shape == (2, gh * gw, fam.hidden_dim(model)) for f in feats)
    for i in range(2):
        alone = fam.features(model, x[i:i + 1], sigma[i:i + 1], caps[i:i + 1], layers)
        for a, b in zip(alone, feats):
            torch.testing.assert_close(a[0], b[i], atol=1e-5, rtol=1e-5)
    other = fam.features(model, x.flip(-1), sigma, caps, layers)
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(other, feats))  # they depend on the image latents

    # the last double block's image tokens are the image part of the first single block's input
    got = {}

    def keep_input(_module, _args, kwargs):
        got["in"] = kwargs["hidden_states"]

    handle = model.single_transformer_blocks[0].register_forward_pre_hook(keep_input, with_kwargs=True)
    try:
        fam.velocity(model, x, sigma, caps)
    finally:
        handle.remove()
    n_txt = caps[0].shape[0]
    torch.testing.assert_close(feats[n_double - 1], got["in"][:, n_txt:])
    # the last single block's image tokens, through the output layers, give the velocity (token order kept)
    inputs = fam._inputs(model, x, sigma, caps)
    temb = model.time_guidance_embed(inputs["timestep"] * 1000, None)
    out = model.proj_out(model.norm_out(feats[-1], temb))
    torch.testing.assert_close(out.permute(0, 2, 1).reshape(x.shape), fam.velocity(model, x, sigma, caps))


@torch.no_grad()
def test_features_stop_after_deepest_block(fam):
    model = fam.transformer
    calls = []
    handle = model.single_transformer_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        caps = fam.encode_prompts(PROMPTS, torch.device("cpu"), fam.max_sequence_length())
        fam.features(model, noise(fam), torch.tensor([0.5, 0.5]), caps, [1, 0])
    finally:
        handle.remove()
    assert not calls


def test_lora_targets_wrap(fam):
    from peft import LoraConfig

    model = copy.deepcopy(fam.transformer)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=fam.lora_targets))
    wrapped = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert len(wrapped) == 12 * len(model.transformer_blocks) + len(model.single_transformer_blocks)


# --- 4. export ------------------------------------------------------------------------------------


@torch.no_grad()
def two_step(fam: Flux2KleinFamily, t1, t2, sigma_mid: float) -> torch.Tensor:
    caps = fam.encode_prompts(PROMPTS, torch.device("cpu"), fam.max_sequence_length())
    x = noise(fam)
    x_mid = euler_step(x, fam.velocity(t1, x, 1.0, caps), 1.0, sigma_mid)
    return euler_step(x_mid, fam.velocity(t2 or t1, x_mid, sigma_mid, caps), sigma_mid, 0.0)


def test_export_two_transformers(fam, tmp_path):
    from diffusers import DiffusionPipeline

    from twostep.trainer.pipeline_experts import TwoStepFlux2KleinPipeline

    sigma_mid = 0.6
    t1, t2 = perturbed(fam.transformer, 1), perturbed(fam.transformer, 2)
    pipe, facts = fam.export_pipeline(t1, t2, sigma_mid)
    assert facts["layout"] == "two_transformers"
    assert facts["pipeline_class"] == ["pipeline_experts", "TwoStepFlux2KleinPipeline"]
    assert facts["call"]["guidance_scale"] <= 1.0 and facts["call"]["num_inference_steps"] == 2
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "TwoStepFlux2KleinPipeline" and loaded.transformer_2 is not None
    loaded.set_progress_bar_config(disable=True)
    expected = two_step(fam, t1, t2, sigma_mid)
    got = stock(loaded, fam, **facts["call"])
    torch.testing.assert_close(loaded.scheduler.sigmas, torch.tensor([1.0, sigma_mid, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (expected - two_step(fam, t1, None, sigma_mid)).abs().max() > 1e-3  # step 2 really used t2
    # the installed class loads the folder too
    again = TwoStepFlux2KleinPipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    torch.testing.assert_close(stock(again, fam, **facts["call"]), expected, atol=ATOL, rtol=0)


def test_export_shared(fam, tmp_path):
    from diffusers import DiffusionPipeline, Flux2KleinPipeline

    sigma_mid = 0.75
    t1 = perturbed(fam.transformer, 3)
    pipe, facts = fam.export_pipeline(t1, None, sigma_mid)
    assert facts["layout"] == "shared" and facts["pipeline_class"] == "Flux2KleinPipeline"
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is Flux2KleinPipeline
    loaded.set_progress_bar_config(disable=True)
    got = stock(loaded, fam, **facts["call"])
    torch.testing.assert_close(loaded.scheduler.sigmas, torch.tensor([1.0, sigma_mid, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(got, two_step(fam, t1, None, sigma_mid), atol=ATOL, rtol=0)


# --- 5. VAE and sizes -----------------------------------------------------------------------------


def test_sizes(fam):
    assert fam.vae_scale_factor == fam.size_multiple == 8
    assert fam.default_size == 64
    assert fam.latent_shape(32, 48) == (16, 4, 6) and fam.token_grid(4, 6) == (4, 6)
    assert fam.max_sequence_length() == 64
    assert fam.text_dim(fam.transformer) == 48 and fam.hidden_dim(fam.transformer) == 16
    for bad in [(30, 32), (32, 36), (0, 32)]:
        with pytest.raises(ValueError, match="multiples of 8"):
            fam.latent_shape(*bad)


@torch.no_grad()
def test_decode_and_encode_images(fam):
    x = noise(fam)
    images = fam.decode(x)
    assert images.shape == (2, H, W, 3) and images.dtype == np.uint8
    # the stock pipeline's own decode of the same latents (to [0, 1] floats)
    raw = fam.pipe._unpatchify_latents(x * fam._bn(x)[1] + fam._bn(x)[0])
    ref = fam.pipe.image_processor.postprocess(fam.vae.decode(raw, return_dict=False)[0], output_type="np")
    assert np.abs(images.astype(int) - np.round(ref * 255).astype(int)).max() <= 1
    z = fam.encode_images(images)
    assert z.shape == (2, *fam.latent_shape(H, W)) and z.dtype == torch.float32
    img = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    mode = fam.pipe._patchify_latents(fam.vae.encode(img).latent_dist.mode())
    mean, std = fam._bn(mode)
    torch.testing.assert_close(z, (mode - mean) / std)
