"""The shipped toy teacher through the teacher interface, its training script, and FD."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from twostep.pipeline.metrics import frechet_distance
from twostep.pipeline.teacher import TOY_TEACHER_DIR, Teacher

PROMPTS = ["a small red circle in the top left", "a large blue square", "something green on a black background"]


@pytest.fixture(scope="module")
def toy():
    return Teacher.load("toy", device="cpu")


def test_toy_teacher_is_a_real_zimage_pipeline_under_20mb(toy):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen2Tokenizer, Qwen3Model

    p = toy.pipe
    assert isinstance(p, ZImagePipeline) and isinstance(p.transformer, ZImageTransformer2DModel)
    assert isinstance(p.text_encoder, Qwen3Model) and isinstance(p.tokenizer, Qwen2Tokenizer)
    assert isinstance(p.vae, AutoencoderKL) and isinstance(p.scheduler, FlowMatchEulerDiscreteScheduler)
    assert p.scheduler.config.shift == 3.0
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(TOY_TEACHER_DIR)
               for f in fs if f.endswith(".safetensors"))
    assert size <= 20 * 2**20
    record = json.loads((TOY_TEACHER_DIR / "training_record.json").read_text())
    assert record["config"] and record["transformer"]["losses"] and record["final_metrics"]["n"] >= 500


def test_toy_teacher_through_the_interface(toy):
    assert toy.default_size == 64 and toy.latent_shape(64, 64) == (4, 16, 16)
    out = toy.generate(PROMPTS, [1, 2, 3], 64, 64)
    assert out.images.shape == (3, 64, 64, 3) and out.mid.shape == out.latent.shape == (3, 4, 16, 16)
    one = toy.generate(PROMPTS[1:2], [2], 64, 64, decode=False)
    torch.testing.assert_close(one.latent[0], out.latent[1], atol=1e-4, rtol=1e-4)
    # mid is the state after 4 of the 8 steps: continuing from it for the last 4 reaches the latent
    caps = toy.encode_prompts(PROMPTS)
    x, s = out.mid.clone(), toy.sampler.sigmas
    for i in range(4, 8):
        x = x + (s[i + 1] - s[i]) * (-toy.velocity(x, s[i], caps))
    torch.testing.assert_close(x, out.latent, atol=1e-4, rtol=1e-4)


def test_train_teacher_script_end_to_end_and_resume(tmp_path):
    from twostep.pipeline.toy.train_teacher import main

    args = ["--out", str(tmp_path), "--preset", "cpu", "--steps", "3", "--vae-steps", "2", "--num-scenes", "64",
            "--batch", "4", "--workers", "0", "--threads", "1"]
    assert main(args) == 0
    record = json.loads((tmp_path / "pipeline" / "training_record.json").read_text())
    assert record["transformer"]["steps_done"] == 3 and record["vae"]["psnr_db"] > 0
    t = Teacher.load(str(tmp_path / "pipeline"), device="cpu")
    assert t.generate(["a red circle"], [0], 64, 64).images.shape == (1, 64, 64, 3)
    # running the same command again resumes: VAE and transformer are not trained again
    assert main([*args[:5], "5", *args[6:]]) == 0
    record = json.loads((tmp_path / "pipeline" / "training_record.json").read_text())
    assert record["transformer"]["steps_done"] == 5 and record["transformer"]["losses"][0][0] == 0


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    b = rng.normal(size=(4000, 8)) * 2.0 + 1.0  # N(1, 4I): FD = |Δμ|² + tr(I + 4I - 2·2I) = 8 + 8
    assert frechet_distance(a, b) == pytest.approx(16.0, rel=0.05)
    with pytest.raises(ValueError):
        frechet_distance(a, a[:, :4])


def test_evaluate_on_a_toy_manifest(tmp_path, toy):
    from twostep.pipeline.toy.evaluate import evaluate_teacher
    from twostep.prompts.toy import build_toy_manifest

    build_toy_manifest(12, tmp_path / "toy.parquet", seed=5)
    metrics, img8, img2, rows = evaluate_teacher(toy, n=8, batch=4, manifest=str(tmp_path / "toy.parquet"))
    assert metrics["n"] == 8 and img8.shape == img2.shape == (8, 64, 64, 3) and len(rows) == 8
    acc = metrics["steps8"]["accuracy"]
    assert 0.0 <= acc["all"] <= 1.0 and metrics["steps8"]["fd_to_renders"] > 0
    assert not np.array_equal(img8, img2)  # 2 naive steps differ from 8 for the same noise
