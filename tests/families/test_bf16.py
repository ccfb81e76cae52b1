"""Every family in bf16, as on a GPU: the teacher samples, a full and a LoRA student train on a bf16
base, and the discriminator backpropagates to its input through the frozen bf16 teacher."""

from __future__ import annotations

import pytest
import torch

from twostep.teacher.families import FAMILIES

PROMPTS = ["a red circle", "two blue squares"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_teacher_student_and_discriminator(family, tmp_path):
    from twostep.teacher.core import Teacher
    from twostep.teacher.random_pipelines import build_pipeline
    from twostep.trainer.discriminator import Discriminator
    from twostep.trainer.student import TwoStepStudent

    build_pipeline(family, seed=0).save_pretrained(tmp_path)
    teacher = Teacher.load(str(tmp_path), device="cpu", dtype=torch.bfloat16, num_steps=4)
    assert teacher.dtype == torch.bfloat16
    out = teacher.generate(PROMPTS, [1, 2], 64, 64)
    assert out.latent.dtype == torch.float32 and torch.isfinite(out.latent).all()
    assert out.images.shape == (2, 64, 64, 3) and out.images.std() > 0
    caps = teacher.encode_prompts(PROMPTS)
    noise = teacher.make_noise([1, 2], teacher.latent_shape(64, 64))
    for lora in (0, 2):
        torch.manual_seed(0)
        student = TwoStepStudent(teacher.family, teacher.sampler.sigma_mid, decoupled=True, lora_rank=lora)
        _, _, x0 = student(noise, caps)
        x0.square().mean().backward()
        trained = [p for p in student.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 for p in trained)
        for model in (student.transformer, student.transformer_2):  # both steps get gradients
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    disc = Discriminator(teacher.family, [0, 1], 16, "conv", text=True)
    x = out.latent.clone().requires_grad_(True)
    logits = disc(x, torch.tensor([0.5, 0.5]), caps)
    gh, gw = teacher.family.token_grid(*x.shape[-2:])
    assert logits.shape == (2, gh * gw) and torch.isfinite(logits).all()
    logits.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
