"""The shipped toy teacher through the teacher interface, its training script, and FD."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from twostep.eval.metrics import frechet_distance
from twostep.teacher.core import TOY_TEACHER_DIR, Teacher

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


def test_toy_teacher_through_the_interface(toy, toy_latent_shape):
    assert toy.default_size == 64 and toy.latent_shape(64, 64) == toy_latent_shape
    out = toy.generate(PROMPTS, [1, 2, 3], 64, 64)
    assert out.images.shape == (3, 64, 64, 3) and out.mid.shape == out.latent.shape == (3, *toy_latent_shape)
    one = toy.generate(PROMPTS[1:2], [2], 64, 64, decode=False)
    torch.testing.assert_close(one.latent[0], out.latent[1], atol=1e-4, rtol=1e-4)
    # mid is the state after 4 of the 8 steps: continuing from it for the last 4 reaches the latent
    caps = toy.encode_prompts(PROMPTS)
    x, s = out.mid.clone(), toy.sampler.sigmas
    for i in range(4, 8):
        x = x + (s[i + 1] - s[i]) * toy.velocity(x, s[i], caps)  # u = ε - x0
    torch.testing.assert_close(x, out.latent, atol=1e-4, rtol=1e-4)


def test_train_teacher_script_end_to_end_and_resume(tmp_path):
    from twostep.toy.train_teacher import main

    args = ["--out", str(tmp_path), "--preset", "cpu", "--steps", "3", "--vae-steps", "2", "--num-scenes", "64",
            "--batch", "4", "--workers", "0", "--threads", "1", "--object-weight", "4", "--vae-object-weight", "4", "--train-shift", "0.5",
            "--vae-decoder-steps", "2"]
    assert main(args) == 0
    record = json.loads((tmp_path / "pipeline" / "training_record.json").read_text())
    assert record["transformer"]["steps_done"] == 3 and record["vae"]["psnr_db"] > 0
    assert record["config"]["object_weight"] == record["config"]["vae_object_weight"] == 4
    assert record["config"]["shift"] == 0.5
    # the shape code is on by default; the decoder-only stage ran and kept the encoder's latent scaling
    assert record["config"]["vae_shape_code"] > 0 and len(record["vae"]["losses"][0]) == 3
    stage = record["vae"]["decoder_stage"]
    assert stage["steps"] == 2 and set(stage["before"]) == {"psnr_db", "checker_on_reconstructions"}
    vae_cfg = json.loads((tmp_path / "pipeline" / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == record["vae"]["scaling_factor"]
    # the VAE's ceiling: the checker on its reconstructions, per attribute (2 steps: near chance)
    assert set(record["vae"]["checker_on_reconstructions"]) == {"shape", "colour", "size", "position", "background",
                                                                 "all"}
    ceiling = record["vae"]["checker_on_reconstructions"]["all"]
    assert ceiling < 0.5  # two VAE steps: the gate stops before the transformer and says why
    assert main([*args[:5], "9", *args[6:], "--vae-gate", "0.9"]) == 3
    assert main([*args[:5], "9", *args[6:], "--vae-only"]) == 0  # reports the loaded VAE and stops
    assert json.loads((tmp_path / "pipeline" / "training_record.json").read_text())["transformer"]["steps_done"] == 3
    t = Teacher.load(str(tmp_path / "pipeline"), device="cpu")
    assert t.generate(["a red circle"], [0], 64, 64).images.shape == (1, 64, 64, 3)
    # running the same command again resumes: VAE and transformer are not trained again
    assert main([*args[:5], "5", *args[6:]]) == 0
    record = json.loads((tmp_path / "pipeline" / "training_record.json").read_text())
    assert record["transformer"]["steps_done"] == 5 and record["transformer"]["losses"][0][0] == 0


def test_training_sigma_shift_moves_the_median_noise_level():
    from twostep.toy.train_transformer import sample_sigma

    g = torch.Generator().manual_seed(0)
    # σ = s·u / (1 + (s - 1)·u) at u = 1/2 is s / (1 + s): 0.75 for the scheduler's 3, 1/3 for 0.5
    for shift, median in ((3.0, 0.75), (1.0, 0.5), (0.5, 1 / 3)):
        sig = sample_sigma(20000, shift, g, torch.device("cpu"))
        assert sig.min() >= 0 and sig.max() <= 1
        assert sig.median().item() == pytest.approx(median, abs=0.01)


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    b = rng.normal(size=(4000, 8)) * 2.0 + 1.0  # N(1, 4I): FD = |Δμ|² + tr(I + 4I - 2·2I) = 8 + 8
    assert frechet_distance(a, b) == pytest.approx(16.0, rel=0.05)
    with pytest.raises(ValueError):
        frechet_distance(a, a[:, :4])


def test_evaluate_on_a_toy_manifest(tmp_path, toy):
    from twostep.toy.evaluate import evaluate_teacher
    from twostep.toy.world import build_toy_manifest

    build_toy_manifest(12, tmp_path / "toy.parquet", seed=5)
    metrics, img8, img2, rows = evaluate_teacher(toy, n=8, batch=4, manifest=str(tmp_path / "toy.parquet"))
    assert metrics["n"] == 8 and img8.shape == img2.shape == (8, 64, 64, 3) and len(rows) == 8
    acc = metrics["steps8"]["accuracy"]
    assert 0.0 <= acc["all"] <= 1.0 and metrics["steps8"]["fd_to_renders"] > 0
    assert not np.array_equal(img8, img2)  # 2 naive steps differ from 8 for the same noise


def test_object_weights_cover_the_object_and_nothing_far_from_it():
    from twostep.toy.render import object_centre, render_batch
    from twostep.toy.train_transformer import object_weights
    from twostep.toy.world import ToyScene

    scenes = [ToyScene(shape="square", colour="red", size="small", position="top left", background="white"),
              ToyScene(shape="circle", colour="blue", size="large", position="bottom right", background="black")]
    w = object_weights(scenes, render_batch(scenes), (16, 16), 9.0).float()
    assert w.shape == (2, 1, 16, 16) and set(w.unique().tolist()) == {1.0, 10.0}
    for k, sc in enumerate(scenes):
        cx, cy = object_centre(sc)
        assert w[k, 0, int(cy) // 4, int(cx) // 4] == 10.0  # the latent cell under the object's centre
    assert w[0, 0, 15, 15] == 1.0 and w[1, 0, 0, 0] == 1.0  # the far corner is background
    assert (w[0] == 10.0).sum() < (w[1] == 10.0).sum()  # the large object covers more cells


def test_diagnose_denoises_from_every_noise_level(toy):
    from twostep.toy.diagnose import diagnose

    result = diagnose(toy, n=4, batch=4)
    rows = result["rows"]
    steps = len(toy.sampler.sigmas) - 1
    assert len(rows) == 2 + steps and list(rows)[2].startswith("from σ=1.000 (8 steps)")
    assert rows["renders"]["all"] >= 0.75  # the checker on ground truth
    # one step from the lowest noise level keeps what the VAE round trip keeps (a wrong velocity sign does not)
    assert list(rows.values())[-1]["all"] >= rows["vae round trip"]["all"] - 0.25
    for row in rows.values():
        assert 0.0 <= row["all"] <= 1.0 and 1 / 3 <= row["shape_confidence"] <= 1.0
    for table in result["shape_confusion"].values():  # every scene counted once, under its named shape
        assert sum(sum(r.values()) for r in table.values()) == 4
    gen = result["shape_confusion"]["plain generation"]
    right = sum(gen[s][s] for s in gen) / 4
    assert right == pytest.approx(rows["from σ=1.000 (8 steps)"]["shape"])  # the diagonal is the shape accuracy


def test_shape_confusion_counts_named_against_read():
    from twostep.toy.checker import load_checker
    from twostep.toy.diagnose import shape_confusion
    from twostep.toy.render import render_batch
    from twostep.toy.world import ToyScene

    scenes = [ToyScene(shape=s, colour="red", size="large", position="center", background="white")
              for s in ("circle", "square", "square", "triangle")]
    named = [{"shape": s} for s in ("circle", "square", "triangle", "triangle")]  # the 3rd is named wrong
    table = shape_confusion(load_checker().predict(render_batch(scenes)), named)
    assert table["circle"] == {"circle": 1, "square": 0, "triangle": 0}
    assert table["square"] == {"circle": 0, "square": 1, "triangle": 0}
    assert table["triangle"] == {"circle": 0, "square": 1, "triangle": 1}


def test_shape_code_target_marks_the_object_in_its_shape_channel():
    from twostep.toy.render import coverage, render_batch
    from twostep.toy.train_vae import background_colours, shape_code_loss, shape_code_target
    from twostep.toy.world import BACKGROUNDS, COLOURS, SHAPES, ToyScene

    scenes = [ToyScene(shape="triangle", colour="red", size="large", position="top left", background="white"),
              ToyScene(shape="circle", colour="blue", size="small", position="bottom right", background="gray")]
    images = render_batch(scenes)
    shapes = torch.tensor([SHAPES.index(sc.shape) for sc in scenes])
    target = shape_code_target(torch.from_numpy(images), torch.from_numpy(background_colours(scenes)), shapes,
                               (16, 16), len(SHAPES))
    assert target.shape == (2, 3, 16, 16) and target.min() >= 0 and target.max() <= 1
    for k, sc in enumerate(scenes):
        others = [c for c in range(3) if c != SHAPES.index(sc.shape)]
        assert target[k, others].abs().sum() == 0  # only the object's own shape channel is set
        # the code is the object's area per latent cell (4×4 pixels): its sum is the area / 16, the area
        # being the pixels whose colour the object moves by more than 8 levels (so faint edges are out)
        contrast = np.abs(np.subtract(COLOURS[sc.colour], BACKGROUNDS[sc.background])).max()
        area = float((coverage(sc) * contrast > 8.5).sum())
        assert target[k, SHAPES.index(sc.shape)].sum().item() == pytest.approx(area / 16, rel=0.02)
    # a latent that holds scale × (std of its free channels) × target has zero loss; another does not
    free = torch.randn(2, 5, 16, 16)
    z = torch.cat([2.0 * free.std() * target, free], dim=1)
    assert shape_code_loss(z, target, 2.0).item() == pytest.approx(0.0, abs=1e-10)
    assert shape_code_loss(z, target.roll(1, dims=1), 2.0).item() > 0.01


def test_decoder_stage_trains_the_decoder_and_leaves_the_encoder_alone():
    from twostep.teacher.random_zimage import build_pipeline
    from twostep.toy.render import render_batch
    from twostep.toy.teacher_config import ToyTeacherConfig
    from twostep.toy.train_vae import background_colours, finetune_decoder
    from twostep.toy.world import sample_scene

    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(8)]
    vae = build_pipeline().vae.eval()
    enc = {k: v.clone() for k, v in vae.state_dict().items() if not k.startswith(("decoder.", "post_quant_conv."))}
    dec = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    cfg = ToyTeacherConfig(num_scenes=8, vae_batch=4, vae_decoder_steps=2)
    record = {"psnr_db": 0.0, "checker_on_reconstructions": {}}
    finetune_decoder(vae, render_batch(scenes), cfg, torch.device("cpu"), record, background_colours(scenes))
    after = vae.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in enc.items())  # encoder, quant_conv: untouched
    assert any(not torch.equal(v, vae.decoder.state_dict()[k]) for k, v in dec.items())
    assert record["decoder_stage"]["steps"] == 2 and record["psnr_db"] > 0
    assert set(record["checker_on_reconstructions"]) >= {"shape", "all"}


def test_every_train_teacher_flag_shows_the_default_it_gets():
    """--help shows each flag's dataclass default; parsing a command line without the flag (gpu preset:
    the dataclass defaults) gives exactly that value, and typing the shown value gives it back."""
    import re
    from dataclasses import MISSING, fields

    from twostep.common.config_flags import field_default, format_value
    from twostep.toy.train_teacher import (
        CONFIG_FLAGS,
        ToyRunOptions,
        ToyTeacherConfig,
        build_parser,
        parse_args,
    )

    ap = build_parser()
    printed = "".join(ap.format_help().split())  # argparse re-wraps help texts: compare without whitespace
    cfg, _ = parse_args(["--out", "o", "--preset", "gpu"])
    _, opts = parse_args(["--out", "o"])
    assert cfg == ToyTeacherConfig()
    helps = {}
    for action in ap._actions:
        if action.dest == "help":
            continue
        cls, parsed = (ToyTeacherConfig, cfg) if action.dest in CONFIG_FLAGS else (ToyRunOptions, opts)
        default = field_default({f.name: f for f in fields(cls)}[action.dest])
        text = helps[action.option_strings[0]] = action.help % {}  # argparse %-formats help texts
        assert "".join(text.split()) in printed
        if default is MISSING or default == "":
            assert "(default" not in text
            continue
        assert getattr(parsed, action.dest) == default
        shown = re.search(r"\(default: ([^;)]+)", text).group(1)
        assert shown == format_value(default), action.option_strings
        if action.type is not None:
            assert action.type(shown) == default, action.option_strings
    assert len(helps) == len(CONFIG_FLAGS) + len(fields(ToyRunOptions))
    # the three that once disagreed with the code, and a preset's value beside the default
    assert helps["--object-weight"].endswith("(default: 4.0)") and helps["--vae-shape-code"].endswith("(default: 1.0)")
    assert helps["--vae-channels"].endswith("(default: 16,32,32)")
    assert helps["--steps"].endswith("(default: 12000; --preset cpu: 100000)")


def test_train_teacher_flags_override_the_preset_and_nothing_else():
    from dataclasses import replace

    from twostep.toy.train_teacher import ToyTeacherConfig, parse_args

    cfg, opts = parse_args(["--out", "o", "--preset", "cpu", "--train-shift", "0.5", "--vae-channels", "32,64",
                            "--steps", "7", "--vae-only", "--init", "runs/x", "--workers", "3"])
    assert cfg == replace(ToyTeacherConfig.preset("cpu"), shift=0.5, vae_channels=(32, 64), steps=7)
    assert (opts.out, opts.preset, opts.vae_only, opts.init, opts.workers) == ("o", "cpu", True, "runs/x", 3)
    with pytest.raises(SystemExit) as e:  # the shape code needs a free latent channel beside one per shape
        parse_args(["--out", "o", "--latent-channels", "3"])
    assert e.value.code == 2


def test_transformer_lr_warms_up_linearly_then_follows_the_cosine():
    from twostep.toy.teacher_config import ToyTeacherConfig
    from twostep.toy.train_transformer import transformer_lr

    cfg = ToyTeacherConfig(lr=1.0, warmup=4)
    assert [transformer_lr(cfg, s, 0.0) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert transformer_lr(cfg, 100, 0.5) == pytest.approx(0.5) and transformer_lr(cfg, 100, 1.2) == 0.0
    assert transformer_lr(ToyTeacherConfig(lr=1.0, warmup=0), 0, 0.0) == 1.0  # no warm-up, as the trainer's
