"""WanFamily against the stock WanPipeline, on a tiny random-weight Wan 2.1 folder at one frame (fp32, CPU)."""

from __future__ import annotations

import copy
from itertools import pairwise

import numpy as np
import pytest
import torch

from twostep.teacher.families.base import euler_step, x0_from
from twostep.teacher.families.wan import WanFamily
from twostep.teacher.random_wan import build_pipeline

PROMPTS = ["a red cat sitting on a green mat under the warm evening sun", "dog"]
NEGATIVE = "blurry low quality"
SEEDS = [3, 11]
H, W = 32, 48  # latents 4×6, tokens 2×3: not square, so row and column order differ
STEPS = 4
SIGMA_MID = 0.75
ATOL = 1e-4
"""fp32 on CPU: the adapter's loops and the pipeline's differ only in the order of a few float ops."""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    words = {w for p in [*PROMPTS, NEGATIVE] for w in p.split()}
    path = tmp_path_factory.mktemp("tiny-wan")
    build_pipeline(words=words, seed=0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def fam(folder) -> WanFamily:
    return WanFamily.load(folder, torch.float32)


def seed_noise(fam: WanFamily, seeds: list[int]) -> torch.Tensor:
    shape = fam.latent_shape(H, W)
    return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def captions(fam: WanFamily, prompts: list[str]) -> list[torch.Tensor]:
    return fam.encode_prompts(prompts, torch.device("cpu"), fam.max_sequence_length())


def teacher_sample(fam, noise, caps, neg_caps, sigmas, scale) -> torch.Tensor:
    """The teacher's generic Euler sampler, from the adapter's methods."""
    x = noise
    for s, s_next in pairwise(sigmas):
        u = fam.velocity(fam.transformer, x, s, caps)
        if scale > 0:
            u = fam.guide(u, fam.velocity(fam.transformer, x, s, neg_caps), scale, s)
        x = euler_step(x, u, s, s_next)
    return x


def student_sample(fam, transformer, transformer_2, noise, caps, sigma_mid) -> torch.Tensor:
    """The student's generic 2-step sampler."""
    u1 = fam.velocity(transformer, noise, 1.0, caps)
    x_mid = euler_step(noise, u1, 1.0, sigma_mid)
    u2 = fam.velocity(transformer_2 or transformer, x_mid, sigma_mid, caps)
    return euler_step(x_mid, u2, sigma_mid, 0.0)


def euler_pipeline(fam: WanFamily, grid: list[float] | None = None):
    """The stock WanPipeline with a stock FlowMatchEulerDiscreteScheduler at the folder's flow_shift; with
    ``grid``, its set_timesteps is given those unshifted sigmas (WanPipeline passes none of its own)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=fam.shift())
    if grid is not None:
        stock_set = sched.set_timesteps
        sched.set_timesteps = lambda num_inference_steps, device=None: stock_set(device=device, sigmas=grid)
    return WanPipeline(**{**fam.pipe.components, "scheduler": sched})


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def test_noise_and_captions_match_the_pipeline(fam):
    c, h, w = fam.latent_shape(H, W)
    drawn = fam.pipe.prepare_latents(len(SEEDS), c, H, W, 1, torch.float32, torch.device("cpu"), generators(SEEDS))
    assert drawn.shape == (len(SEEDS), c, 1, h, w)  # one frame: T = 1
    torch.testing.assert_close(drawn[:, :, 0], seed_noise(fam, SEEDS), rtol=0, atol=0)

    assert fam.max_sequence_length() == 512
    caps = captions(fam, PROMPTS)
    embeds, _ = fam.pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=512,
                                       device=torch.device("cpu"))
    assert [tuple(x.shape) for x in caps] == [(512, fam.text_dim(fam.transformer))] * 2
    torch.testing.assert_close(torch.stack(caps), embeds, rtol=0, atol=1e-5)
    n_tokens = fam.pipe.tokenizer(PROMPTS, padding=False).attention_mask
    for cap, ids in zip(caps, n_tokens):  # kept zero padding after each prompt's own tokens
        assert cap[: len(ids)].abs().sum(-1).min() > 0 and cap[len(ids):].abs().max() == 0


def test_sigmas(fam):
    from diffusers import UniPCMultistepScheduler

    assert isinstance(fam.pipe.scheduler, UniPCMultistepScheduler)
    assert fam.shift() == 3.0  # the folder's flow_shift
    before = fam.pipe.scheduler.timesteps.clone()
    got = fam.sigmas(STEPS, H, W)
    s, grid = 3.0, np.linspace(1.0, 1.0 / STEPS, STEPS)
    np.testing.assert_allclose(got, [*(s * grid / (1 + (s - 1) * grid)), 0.0], atol=1e-6)
    assert got[0] == 1.0 and got[-1] == 0.0
    # the folder's UniPC applies the same flow_shift once to the same grid (and nudges σ=1 by 1e-6)
    unipc = copy.deepcopy(fam.pipe.scheduler)
    unipc.set_timesteps(sigmas=grid.copy())
    np.testing.assert_allclose(unipc.sigmas.numpy(), got, atol=2e-6)
    torch.testing.assert_close(fam.pipe.scheduler.timesteps, before)  # the pipeline's scheduler is untouched
    np.testing.assert_allclose(fam.sigmas(2, H, W, grid=[1.0, 0.5]), [1.0, 0.75, 0.0], atol=1e-6)


@pytest.mark.parametrize("scale", [0.0, 5.0])
@pytest.mark.parametrize("grid", ["default", "stock"])
def test_sampler_matches_stock_pipeline(fam, grid, scale):
    if grid == "default":
        pipe = euler_pipeline(fam, torch.linspace(1.0, 1.0 / STEPS, STEPS).tolist())
        sigmas = fam.sigmas(STEPS, H, W)
    else:  # the stock scheduler's own default grid, unchanged: linspace(1, σ_min) before the shift
        pipe = euler_pipeline(fam)
        sigmas = fam.sigmas(STEPS, H, W, grid=(np.linspace(1000, pipe.scheduler.sigma_min * 1000, STEPS) / 1000))
    kwargs = dict(negative_prompt=[NEGATIVE] * len(PROMPTS)) if scale > 1 else {}
    stock = pipe(PROMPTS, height=H, width=W, num_frames=1, num_inference_steps=STEPS, guidance_scale=scale,
                 generator=generators(SEEDS), output_type="latent", max_sequence_length=fam.max_sequence_length(),
                 **kwargs).frames
    np.testing.assert_allclose(pipe.scheduler.sigmas.numpy(), sigmas, atol=1e-6)
    assert stock.shape == (len(SEEDS), *fam.latent_shape(H, W)[:1], 1, *fam.latent_shape(H, W)[1:])
    ours = teacher_sample(fam, seed_noise(fam, SEEDS), captions(fam, PROMPTS),
                          captions(fam, [NEGATIVE] * len(PROMPTS)), sigmas, scale)
    torch.testing.assert_close(ours, stock[:, :, 0], rtol=0, atol=ATOL)
    assert (ours - seed_noise(fam, SEEDS)).abs().max() > 0.1  # the sampler moved


def test_bf16_load_matches_stock_pipeline(folder):
    """A bf16 load keeps some transformer parameters in fp32 (diffusers' _keep_in_fp32_modules): the adapter
    still feeds the model bf16 inputs, as the pipeline does."""
    fam = WanFamily.load(folder, torch.bfloat16)
    assert fam.transformer.scale_shift_table.dtype == torch.float32
    assert fam.transformer.patch_embedding.weight.dtype == torch.bfloat16
    pipe = euler_pipeline(fam, torch.linspace(1.0, 0.5, 2).tolist())
    stock = pipe(PROMPTS, height=H, width=W, num_frames=1, num_inference_steps=2, guidance_scale=0.0,
                 generator=generators(SEEDS), output_type="latent").frames[:, :, 0]
    ours = teacher_sample(fam, seed_noise(fam, SEEDS), captions(fam, PROMPTS), None, fam.sigmas(2, H, W), 0.0)
    assert ours.dtype == torch.float32
    # FlowMatchEulerDiscreteScheduler.step returns latents in the model's dtype: the stock loop rounds its
    # state to bf16 at every step, the teacher's keeps it in fp32
    assert stock.dtype == torch.bfloat16
    torch.testing.assert_close(ours, stock.float(), rtol=0, atol=5e-2)


def test_guidance_changes_the_sample(fam):
    sigmas = fam.sigmas(2, H, W)
    noise, caps, neg = seed_noise(fam, SEEDS), captions(fam, PROMPTS), captions(fam, [NEGATIVE] * 2)
    plain = teacher_sample(fam, noise, caps, neg, sigmas, 0.0)
    assert (teacher_sample(fam, noise, caps, neg, sigmas, fam.default_guidance) - plain).abs().max() > 1e-3
    torch.testing.assert_close(teacher_sample(fam, noise, caps, neg, sigmas, 1.0), plain, rtol=0, atol=1e-5)


def test_velocity_known_answer(fam):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = copy.deepcopy(fam.transformer)
    g = torch.Generator().manual_seed(0)
    shape = (2, *fam.latent_shape(H, W))
    x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    x = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
    seen: list[torch.Tensor] = []

    def stub(hidden_states, timestep, encoder_hidden_states, return_dict=True, **kwargs):
        assert hidden_states.shape == (2, x.shape[1], 1, *x.shape[2:])  # 5-D, one frame
        torch.testing.assert_close(hidden_states[:, :, 0], x[: hidden_states.shape[0]])
        assert encoder_hidden_states.shape == (2, 512, fam.text_dim(model))
        seen.append(timestep)
        return ((eps - x0).unsqueeze(2)[: hidden_states.shape[0]],)  # Wan's native prediction: ε - x0, 5-D

    model.forward = stub
    caps = captions(fam, PROMPTS)
    u = fam.velocity(model, x, sigma, caps)
    torch.testing.assert_close(seen[-1], sigma * 1000)  # model time σ·1000
    assert u.dtype == torch.float32 and u.shape == x.shape
    torch.testing.assert_close(u, eps - x0)
    torch.testing.assert_close(x0_from(x, u, sigma.view(-1, 1, 1, 1)), x0)

    u = fam.velocity(model, x, 0.8, caps)  # a scalar σ
    torch.testing.assert_close(seen[-1], torch.tensor([800.0, 800.0]))
    # the pipeline's own scheduler step with that native output lands on x0 from σ to 0
    sched = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sched.set_timesteps(sigmas=[0.8], device="cpu")
    x_08 = 0.2 * x0 + 0.8 * eps
    step = sched.step((eps - x0).unsqueeze(2), sched.timesteps[0], x_08.unsqueeze(2), return_dict=False)[0]
    torch.testing.assert_close(step[:, :, 0], x0, rtol=0, atol=1e-5)


def test_velocity_has_gradients(fam):
    model = perturbed(fam.transformer, 5)
    x = seed_noise(fam, SEEDS)
    u = fam.velocity(model, x, torch.tensor([0.5, 0.9]), captions(fam, PROMPTS))
    u.square().mean().backward()
    assert model.proj_out.weight.grad is not None and model.blocks[0].attn1.to_q.weight.grad.abs().sum() > 0


def test_features(fam):
    model = fam.transformer
    x, sigma, caps = seed_noise(fam, SEEDS), torch.tensor([0.4, 0.7]), captions(fam, PROMPTS)
    gh, gw = fam.token_grid(*x.shape[-2:])
    assert (gh, gw) == (2, 3) and fam.num_blocks(model) == 2
    ran_head: list[bool] = []
    handle = model.proj_out.register_forward_hook(lambda *a: ran_head.append(True))
    try:
        feats = fam.features(model, x, sigma, caps, [1, 0])
        assert not ran_head  # stopped after the deepest hooked block
    finally:
        handle.remove()
    for f in feats:
        assert f.shape == (2, gh * gw, fam.hidden_dim(model))
    for i in range(2):
        alone = fam.features(model, x[i: i + 1], sigma[i: i + 1], caps[i: i + 1], [1, 0])
        for f, a in zip(feats, alone):
            torch.testing.assert_close(f[i: i + 1], a, rtol=0, atol=1e-5)
    moved = fam.features(model, x + 0.5 * torch.randn_like(x), sigma, caps, [1, 0])
    assert all((f - m).abs().max() > 1e-3 for f, m in zip(feats, moved))


def test_feature_tokens_are_row_major(fam):
    """Token k of the last block's output feeds exactly the output patch (k // gw, k % gw): the model's own
    unpatchify fixes the order, and features() returns that output unchanged."""
    model = fam.transformer
    x, sigma, caps = seed_noise(fam, SEEDS[:1]), torch.tensor([0.5]), captions(fam, PROMPTS[:1])
    gh, gw = fam.token_grid(*x.shape[-2:])
    last = model.blocks[fam.num_blocks(model) - 1]
    base = fam.velocity(model, x, sigma, caps)
    torch.testing.assert_close(fam.features(model, x, sigma, caps, [fam.num_blocks(model) - 1])[0],
                               _block_output(model, last, lambda: fam.velocity(model, x, sigma, caps)))
    for k in range(gh * gw):
        def bump(_m, _a, out, k=k):
            out = out.clone()
            out[:, k] += 1.0
            return out

        handle = last.register_forward_hook(bump)
        try:
            changed = (fam.velocity(model, x, sigma, caps) - base).abs().amax(dim=(0, 1)) > 0
        finally:
            handle.remove()
        expect = torch.zeros_like(changed)
        expect[2 * (k // gw): 2 * (k // gw) + 2, 2 * (k % gw): 2 * (k % gw) + 2] = True
        assert torch.equal(changed, expect), k


def _block_output(model, block, run) -> torch.Tensor:
    got = []
    handle = block.register_forward_hook(lambda _m, _a, out: got.append(out))
    try:
        run()
    finally:
        handle.remove()
    return got[0]


@pytest.mark.parametrize("layout", ["two_transformers", "shared"])
def test_export(fam, tmp_path, layout):
    from diffusers import DiffusionPipeline

    t1 = perturbed(fam.transformer, 1)
    t2 = perturbed(fam.transformer, 2) if layout == "two_transformers" else None
    pipe, facts = fam.export_pipeline(t1, t2, SIGMA_MID)
    assert facts["layout"] == layout and facts["pipeline_class"] == "WanPipeline"
    assert facts["call"]["num_inference_steps"] == 2 and facts["call"]["guidance_scale"] == 1.0
    pipe.save_pretrained(tmp_path)
    loaded = eval(facts["load"], {"DiffusionPipeline": DiffusionPipeline, "path": str(tmp_path)})
    assert type(loaded).__name__ == "WanPipeline" and (loaded.transformer_2 is None) == (t2 is None)
    sched = copy.deepcopy(loaded.scheduler)
    sched.set_timesteps(2)
    np.testing.assert_allclose(sched.sigmas.numpy(), [1.0, SIGMA_MID, 0.0], atol=1e-6)

    out = loaded(PROMPTS, height=H, width=W, generator=generators(SEEDS), output_type="latent",
                 **facts["call"]).frames
    assert out.ndim == 5 and out.shape[2] == 1
    noise, caps = seed_noise(fam, SEEDS), captions(fam, PROMPTS)
    ref = student_sample(fam, t1, t2, noise, caps, SIGMA_MID)
    torch.testing.assert_close(out[:, :, 0], ref, rtol=0, atol=ATOL)
    if t2 is not None:  # step 2 really ran transformer_2
        assert (student_sample(fam, t1, None, noise, caps, SIGMA_MID) - ref).abs().max() > 1e-3


def test_export_rejects_bad_sigma_mid(fam):
    with pytest.raises(ValueError, match="sigma_mid"):
        fam.export_pipeline(fam.transformer, None, 1.0)


def test_sizes_and_vae(fam):
    assert fam.vae_scale_factor == 8 and fam.size_multiple == 16 and fam.default_size == 64
    assert fam.latent_shape(H, W) == (16, 4, 6) and fam.token_grid(4, 6) == (2, 3)
    for bad in [(40, 48), (32, 50), (0, 32)]:
        with pytest.raises(ValueError, match="multiples of 16"):
            fam.latent_shape(*bad)

    # decode = the stock pipeline's own decode of the same latents
    pipe = euler_pipeline(fam, [1.0])
    common = dict(height=H, width=W, num_frames=1, num_inference_steps=1, guidance_scale=0.0)
    latents = pipe(PROMPTS, generator=generators(SEEDS), output_type="latent", **common).frames[:, :, 0]
    frames = pipe(PROMPTS, generator=generators(SEEDS), output_type="np", **common).frames  # (B, 1, H, W, 3)
    images = fam.decode(latents)
    assert images.dtype == np.uint8 and images.shape == (2, H, W, 3)
    assert np.abs(images.astype(np.float64) - frames[:, 0] * 255).max() <= 0.51

    z = fam.encode_images(images)
    assert z.dtype == torch.float32 and z.shape == (2, *fam.latent_shape(H, W))
    torch.testing.assert_close(fam.encode_images(images), z)  # the posterior's mode, not a sample


def test_latent_normalisation_round_trip(fam, monkeypatch):
    """decode un-normalises with latents_mean / latents_std and encode_images normalises back."""
    from types import SimpleNamespace

    vae, raw = fam.vae, []
    x = seed_noise(fam, SEEDS)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)

    def decode(z, return_dict=True):
        raw.append(z)
        return (torch.zeros(z.shape[0], 3, 1, H, W),)

    monkeypatch.setattr(vae, "decode", decode)
    monkeypatch.setattr(vae, "encode", lambda v: SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: raw[0])))
    fam.decode(x)
    torch.testing.assert_close(raw[0], x.unsqueeze(2) * std + mean)
    torch.testing.assert_close(fam.encode_images(np.zeros((2, H, W, 3), np.uint8)), x)


def test_two_expert_folders_are_refused_as_teachers(fam, tmp_path):
    from diffusers import WanPipeline

    from twostep.teacher.core import Teacher
    from twostep.trainer.export import export_student

    p = fam.pipe
    two_experts = WanPipeline(tokenizer=p.tokenizer, text_encoder=p.text_encoder, vae=p.vae, scheduler=p.scheduler,
                              transformer=p.transformer, transformer_2=perturbed(p.transformer, 1), boundary_ratio=0.9)
    two_experts.save_pretrained(tmp_path / "wan22")
    with pytest.raises(ValueError, match="Wan 2.2"):
        Teacher.load(str(tmp_path / "wan22"), device="cpu")
    export_student(tmp_path / "student", fam, p.transformer, perturbed(p.transformer, 2), sigma_mid=0.75)
    with pytest.raises(ValueError, match="two transformers"):  # a 2-step student is not a teacher
        Teacher.load(str(tmp_path / "student"), device="cpu")
    export_student(tmp_path / "shared", fam, p.transformer, None, sigma_mid=0.75)  # one set: a stock WanPipeline
    assert Teacher.load(str(tmp_path / "shared"), device="cpu").family.name == "wan"
