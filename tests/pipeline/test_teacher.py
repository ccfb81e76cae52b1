"""The teacher interface on the tiny random-weight Z-Image pipeline (the real code path)."""

from __future__ import annotations

import pytest
import torch

from twostep.teacher.core import SamplerConfig, Teacher, noise_fingerprint, recorded_sigma_mid

PROMPTS = ["a red circle", "a large blue square at the top", "something green"]
SEEDS = [11, 22, 33]


@pytest.fixture(scope="module")
def teacher(tiny_pipeline_dir):
    return Teacher.load(tiny_pipeline_dir, device="cpu")


def test_turbo_defaults_and_sigmas(teacher):
    s = teacher.sampler
    assert s.num_steps == 8 and s.guidance_scale == 0.0 and s.shift == 3.0
    assert [round(x, 4) for x in s.sigmas] == [1.0, 0.9545, 0.9, 0.8333, 0.75, 0.6429, 0.5, 0.3, 0.0]
    assert s.mid_index == 4
    two = teacher.make_sampler(num_steps=2)
    assert [round(x, 4) for x in two.sigmas] == [1.0, 0.75, 0.0]


def test_with_sampler_keeps_guidance_and_shares_the_weights(tiny_pipeline_dir):
    """The naive 2-step baseline of a guided teacher is guided too; only what is overridden changes."""
    guided = Teacher.load(tiny_pipeline_dir, device="cpu", guidance_scale=1.5, sigma_mid=0.5)
    two = guided.with_sampler(num_steps=2)
    assert (two.sampler.num_steps, two.sampler.guidance_scale, two.sampler.sigma_mid) == (2, 1.5, 0.5)
    assert [round(x, 4) for x in two.sampler.sigmas] == [1.0, 0.75, 0.0]
    assert two.pipe is guided.pipe and two.weights == guided.weights and two.sampler.hash != guided.sampler.hash
    calls = []
    h = two.transformer.t_embedder.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = two.generate(PROMPTS[:1], SEEDS[:1], 32, 32, decode=False)
    finally:
        h.remove()
    assert out.nfe == 2 == len(calls)  # guidance runs in the same call, on a doubled batch
    unguided = guided.with_sampler(num_steps=2, guidance_scale=0.0).generate(PROMPTS[:1], SEEDS[:1], 32, 32,
                                                                             decode=False)
    assert not torch.allclose(out.latent, unguided.latent)


def test_exactly_eight_transformer_calls(teacher):
    calls = []  # the timestep embedder runs once per transformer call, on either forward path
    h = teacher.transformer.t_embedder.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = teacher.generate(PROMPTS[:1], SEEDS[:1], 32, 32, decode=False)
    finally:
        h.remove()
    assert len(calls) == 8 == out.nfe


def test_matches_the_diffusers_pipeline_and_mid_is_on_its_trajectory(teacher):
    out = teacher.generate(PROMPTS[:1], SEEDS[:1], 32, 32)
    seen = {}

    def grab(pipe, i, t, kw):
        seen[i] = kw["latents"].clone()
        return kw

    grid = torch.linspace(1.0, 1 / 8, 8).tolist()
    ref = teacher.pipe(PROMPTS[:1], height=32, width=32, sigmas=grid, num_inference_steps=8, guidance_scale=0.0,
                       latents=out.noise.clone(), output_type="latent", max_sequence_length=128,
                       callback_on_step_end=grab).images
    torch.testing.assert_close(out.latent, ref.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mid, seen[3].float(), atol=1e-5, rtol=1e-5)  # after 4 of 8 steps
    assert out.images.shape == (1, 32, 32, 3) and out.images.dtype.name == "uint8"


def test_per_seed_outputs_do_not_depend_on_batch(teacher):
    batch = teacher.generate(PROMPTS, SEEDS, 32, 32, decode=False)
    for i in range(3):
        one = teacher.generate([PROMPTS[i]], [SEEDS[i]], 32, 32, decode=False)
        assert torch.equal(one.noise[0], batch.noise[0 + i])
        torch.testing.assert_close(one.latent[0], batch.latent[i], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(one.mid[0], batch.mid[i], atol=1e-5, rtol=1e-4)
    assert noise_fingerprint(batch.noise[0]) == noise_fingerprint(teacher.make_noise([SEEDS[0]], (16, 16, 16))[0])


def test_sampler_hash_tracks_every_setting(teacher):
    base = teacher.sampler.hash
    assert teacher.make_sampler().hash == base
    for kw in ({"num_steps": 4}, {"guidance_scale": 1.5}, {"sigma_mid": 0.5}, {"max_sequence_length": 64}):
        assert teacher.make_sampler(**kw).hash != base, kw


def test_guidance_runs_doubled_batch(tiny_pipeline_dir):
    t = Teacher.load(tiny_pipeline_dir, device="cpu", guidance_scale=2.0)
    a = t.generate(PROMPTS[:1], SEEDS[:1], 32, 32, decode=False)
    b = Teacher.load(tiny_pipeline_dir, device="cpu").generate(PROMPTS[:1], SEEDS[:1], 32, 32, decode=False)
    assert not torch.allclose(a.latent, b.latent)


def test_components_and_description(teacher):
    caps = teacher.encode_prompts(PROMPTS)
    assert len(caps) == 3 and caps[0].shape[1] == teacher.text_encoder.config.hidden_size
    assert teacher.latent_shape(64, 32) == (16, 32, 16)
    with pytest.raises(ValueError, match="multiples of 4"):
        teacher.latent_shape(30, 32)
    d = teacher.describe()
    assert d["sampler_hash"] == teacher.sampler.hash and d["dtype"] == "float32" and d["device"] == "cpu"
    img = teacher.generate(PROMPTS[:1], SEEDS[:1], 32, 32).images
    z = teacher.encode_images(img)
    assert z.shape == (1, 16, 16, 16)


def test_hub_id_goes_through_from_pretrained(monkeypatch, tiny_pipeline_dir):
    """A hub id is handed to from_pretrained with its revision (no hub here: intercept the call)."""
    from diffusers import ZImagePipeline

    from twostep.teacher import core
    from twostep.teacher.families.zimage import ZImageFamily

    seen = {}
    real = ZImagePipeline.from_pretrained

    def fake(path, **kw):
        seen.update(path=path, **kw)
        return real(tiny_pipeline_dir, dtype=kw["dtype"])

    def family_of_hub(repo, revision):  # the hub's model_index.json names the family
        seen.update(index=(repo, revision))
        return ZImageFamily

    monkeypatch.setattr(ZImagePipeline, "from_pretrained", fake)
    monkeypatch.setattr(core, "family_of_hub", family_of_hub)
    t = Teacher.load("Tongyi-MAI/Z-Image-Turbo@abc123", device="cpu")
    assert seen["path"] == "Tongyi-MAI/Z-Image-Turbo" and seen["revision"] == "abc123"
    assert seen["index"] == ("Tongyi-MAI/Z-Image-Turbo", "abc123")
    assert seen["dtype"] == torch.float32 and t.describe()["teacher"] == "Tongyi-MAI/Z-Image-Turbo"


def test_store_record_keeps_the_mid_sigma_key_and_hash():
    """σ_mid is ``sigma_mid`` in code and ``mid_sigma`` in the record a store keeps; the record (and so
    the sampler hash that names a store) is what earlier versions wrote."""
    s = SamplerConfig(num_steps=8, guidance_scale=0.0, shift=3.0, sigma_mid=0.75, max_sequence_length=48,
                      sigmas=(1.0, 0.954545, 0.9, 0.833333, 0.75, 0.642857, 0.5, 0.3, 0.0))
    record = s.to_dict()
    assert list(record) == ["num_steps", "guidance_scale", "shift", "sigmas", "mid_sigma", "max_sequence_length"]
    assert record["mid_sigma"] == 0.75 and "sigma_mid" not in record
    assert s.hash == "f4e90faf95d04f98"  # the toy demo store's sampler_hash
    assert recorded_sigma_mid(record) == 0.75 and recorded_sigma_mid({}) is None


def test_default_sigma_mid_is_075_on_the_grid_else_the_state_after_half_the_steps():
    from twostep.teacher.core import default_sigma_mid

    turbo = (1.0, 0.954545, 0.9, 0.833333, 0.75, 0.642857, 0.5, 0.3, 0.0)
    assert default_sigma_mid(turbo) == 0.75
    lumina = (1.0, 0.976744, 0.947368, 0.909091, 0.857143, 0.782609, 0.666667, 0.461538, 0.0)
    assert default_sigma_mid(lumina) == 0.857143
    assert default_sigma_mid((1.0, 0.8, 0.6, 0.0)) == 0.8  # 3 steps: after the first
