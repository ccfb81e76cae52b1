"""The 2-step student: sampler math, the exported pipeline folder (both layouts), ``twostep sample``."""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from twostep.teacher import zimage_batched
from twostep.teacher.core import Teacher, seed_noise
from twostep.teacher.random_zimage import build_pipeline
from twostep.trainer import pipeline_twostep, sample
from twostep.trainer.export import STUDENT_JSON, export_student, load_student, read_student_info
from twostep.trainer.pipeline_twostep import TwoStepZImagePipeline, two_step, zimage_velocity

PROMPTS = ("a red cube", "two blue spheres on a green floor")  # a tuple: ZImagePipeline edits lists in place
SIZE = 32  # the tiny VAE's sample_size: latents (16, 16, 16)
ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny():
    return build_pipeline(seed=0, model_max_length=128)


@pytest.fixture(scope="module")
def transformer_2(tiny):
    t2 = copy.deepcopy(tiny.transformer)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in t2.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return t2


@pytest.fixture(scope="module")
def caps(tiny):
    with torch.no_grad():
        return tiny._encode_prompt(list(PROMPTS), device="cpu", max_sequence_length=128)


@pytest.fixture(scope="module")
def noise():
    return torch.stack([seed_noise(s, (16, SIZE // 2, SIZE // 2)) for s in (3, 4)])


@pytest.fixture(scope="module")
def two_dir(tmp_path_factory, tiny, transformer_2):
    out = tmp_path_factory.mktemp("export") / "student"
    return str(export_student(out, tiny, tiny.transformer, transformer_2, extra={"run": "test", "step": 7}))


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory, tiny):
    out = tmp_path_factory.mktemp("export") / "shared"
    return str(export_student(out, tiny, tiny.transformer, None, sigma_mid=0.75))


def velocity(model, caps):
    """The stock per-sample forward (diffusers' list-based call): the reference for the batched path,
    as the flow velocity u = ε - x0 (minus what Z-Image predicts)."""
    return lambda x, sigma: -zimage_velocity(model, x, sigma, caps, batched=False)


@torch.no_grad()
def direct(tiny, transformer_2, caps, noise):
    """``two_step`` with the in-memory transformers through their stock forward: the reference every
    pipeline is compared with."""
    return two_step(velocity(tiny.transformer, caps), velocity(transformer_2, caps), noise, 0.75)


@pytest.fixture
def batched_calls(monkeypatch):
    """Counts the pipeline's calls of ``batched_forward`` (the name ``zimage_velocity`` looks up)."""
    calls = []
    real = pipeline_twostep.batched_forward

    def counted(model, *args, **kwargs):
        calls.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(pipeline_twostep, "batched_forward", counted)
    return calls


def count_calls(*models):
    calls = [0] * len(models)
    handles = []
    for i, m in enumerate(models):
        def hook(module, inputs, output, i=i):
            calls[i] += 1
        handles.append(m.register_forward_hook(hook))
    return calls, handles


# --- the sampler ---------------------------------------------------------------------------------


@torch.no_grad()
def test_two_step_is_the_schedulers_euler_steps(tiny, transformer_2, caps, noise):
    from diffusers import FlowMatchEulerDiscreteScheduler

    x0_hat, x_mid, x0 = direct(tiny, transformer_2, caps, noise)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(sigmas=[1.0, 0.5])  # the unshifted grid; shift 3 maps it to [1, .75, 0]
    torch.testing.assert_close(sched.sigmas, torch.tensor([1.0, 0.75, 0.0]))
    x, states = noise.clone(), []
    for i, (t, model) in enumerate(zip(sched.timesteps, (tiny.transformer, transformer_2))):
        v = zimage_velocity(model, x, float(sched.sigmas[i]), caps)
        if i == 0:
            torch.testing.assert_close(x0_hat, x + v)  # x0̂ = x_σ + σ·v at σ = 1
        x = sched.step(-v, t, x, return_dict=False)[0]  # the stock pipeline negates the output
        states.append(x)
    torch.testing.assert_close(x_mid, states[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(x0, states[1], atol=ATOL, rtol=0)
    # x_mid re-noises the step-1 estimate with the same noise.
    torch.testing.assert_close(x_mid, 0.75 * noise + 0.25 * x0_hat, atol=ATOL, rtol=0)
    # The pitfall the pipeline avoids: set_timesteps shifts the sigmas it is given.
    sched.set_timesteps(sigmas=[1.0, 0.75])
    assert float(sched.sigmas[1]) == pytest.approx(0.9)


def test_two_step_with_shared_parameters_is_the_teachers_naive_two_step(tiny, caps, noise):
    teacher = Teacher(tiny, "tiny", num_steps=2)
    assert teacher.sampler.sigmas == pytest.approx((1.0, 0.75, 0.0))
    ref = teacher.generate(list(PROMPTS), seeds=[3, 4], height=SIZE, width=SIZE, decode=False)
    torch.testing.assert_close(ref.noise, noise)
    with torch.no_grad():
        _, x_mid, x0 = two_step(velocity(tiny.transformer, caps), velocity(tiny.transformer, caps), noise, 0.75)
    torch.testing.assert_close(x_mid, ref.mid, atol=ATOL, rtol=0)
    torch.testing.assert_close(x0, ref.latent, atol=ATOL, rtol=0)
    pipe = TwoStepZImagePipeline(**tiny.components)  # transformer_2=None: transformer does both steps
    out = pipe(list(PROMPTS), latents=noise, output_type="latent").images
    torch.testing.assert_close(out, ref.latent, atol=ATOL, rtol=0)


def test_pipeline_ignores_the_scheduler_shift_and_seeds_per_image(tiny, transformer_2, caps, noise):
    from diffusers import FlowMatchEulerDiscreteScheduler

    _, _, x0 = direct(tiny, transformer_2, caps, noise)
    comps = {**tiny.components, "scheduler": FlowMatchEulerDiscreteScheduler(shift=1.0)}
    pipe = TwoStepZImagePipeline(**comps, transformer_2=transformer_2)
    assert pipe.sigmas == [1.0, 0.75, 0.0]
    calls, handles = count_calls(pipe.transformer, pipe.transformer_2)
    gens = [torch.Generator("cpu").manual_seed(s) for s in (3, 4)]  # per-image generators = seed_noise
    out = pipe(list(PROMPTS), generator=gens, output_type="latent").images
    for h in handles:
        h.remove()
    assert calls == [1, 1]
    torch.testing.assert_close(out, x0, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="sigma_mid"):
        TwoStepZImagePipeline(**comps, sigma_mid=1.0)


# Captions of 20, 29 and 101 tokens (chat template included): padded to 32, 32 and 128, so the batched
# forward masks the shorter ones.
MIXED_PROMPTS = ("a", "a red cube",
                 "two blue spheres on a green floor beside a tall yellow cone and a small pink torus")


@torch.no_grad()
def test_pipeline_runs_the_batched_forward_with_the_stock_result(tiny, transformer_2, batched_calls):
    caps = tiny._encode_prompt(list(MIXED_PROMPTS), device="cpu", max_sequence_length=128)
    assert len({len(c) for c in caps}) == 3
    noise = torch.stack([seed_noise(s, (16, SIZE // 2, SIZE // 2)) for s in (5, 6, 7)])
    _, x_mid, x0 = direct(tiny, transformer_2, caps, noise)  # stock forward, one list entry per sample
    assert batched_calls == []
    pipe = TwoStepZImagePipeline(**tiny.components, transformer_2=transformer_2)
    out = pipe(list(MIXED_PROMPTS), latents=noise, output_type="latent").images
    assert batched_calls == [pipe.transformer, pipe.transformer_2]  # one batched call per step
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-6)
    # zimage_velocity itself, at both noise levels: batched against stock.
    for x, sigma in ((noise, 1.0), (x_mid, 0.75)):
        torch.testing.assert_close(zimage_velocity(transformer_2, x, sigma, caps),
                                   zimage_velocity(transformer_2, x, sigma, caps, batched=False),
                                   rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_pipeline_falls_back_to_the_stock_forward(tiny, transformer_2, caps, noise, batched_calls):
    pipe = TwoStepZImagePipeline(**tiny.components, transformer_2=transformer_2)
    # joint_attention_kwargs are the stock forward's (its LoRA scale).
    out = pipe(list(PROMPTS), latents=noise, output_type="latent", joint_attention_kwargs={"scale": 1.0}).images
    assert batched_calls == []
    torch.testing.assert_close(out, direct(tiny, transformer_2, caps, noise)[2], atol=ATOL, rtol=0)
    # 24 px: 12×12 latents, 36 image tokens, not a multiple of 32.
    assert not zimage_batched.supports_batched(pipe.transformer, 12, 12)
    small = torch.stack([seed_noise(s, (16, 12, 12)) for s in (3, 4)])
    out = pipe(list(PROMPTS), height=24, width=24, latents=small, output_type="latent").images
    assert batched_calls == []
    torch.testing.assert_close(out, direct(tiny, transformer_2, caps, small)[2], atol=ATOL, rtol=0)
    # A model with hooks (here a forward hook; also accelerate's and diffusers' offloading, which
    # replace its forward) runs its own forward, so the hooks see every call.
    calls, handles = count_calls(pipe.transformer)
    pipe(list(PROMPTS), latents=noise, output_type="latent")
    for h in handles:
        h.remove()
    assert calls == [1] and batched_calls == [pipe.transformer_2]


def test_two_step_backpropagates_into_both_transformers(tiny, transformer_2, caps, noise):
    t1, t2 = copy.deepcopy(tiny.transformer), copy.deepcopy(transformer_2)
    x0_hat, _, x0 = two_step(velocity(t1, caps), velocity(t2, caps), noise, 0.75)
    (x0.square().mean() + x0_hat.square().mean()).backward()
    for m in (t1, t2):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


# --- the exported folder ------------------------------------------------------------------------

LOAD_FROM_FOLDER = textwrap.dedent("""
    import importlib.abc, json, sys
    import torch

    class BlockTwostep(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "twostep" or name.startswith("twostep."):
                raise ImportError("twostep is not importable in this test")
            return None

    sys.meta_path.insert(0, BlockTwostep())
    from diffusers import DiffusionPipeline

    folder, latents_path, out_path = sys.argv[1:4]
    try:
        DiffusionPipeline.from_pretrained(folder)
        plain = "loaded"
    except ValueError as e:
        plain = str(e)
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    module = sys.modules[type(pipe).__module__]
    batched = []
    real = module.batched_forward
    module.batched_forward = lambda model, *a, **k: batched.append(1) or real(model, *a, **k)
    prompts = json.loads(sys.argv[4])
    latents = torch.load(latents_path)
    torch.save(pipe(prompts, latents=latents, output_type="latent").images, out_path + ".pt")
    batched_calls = len(batched)
    calls = {"transformer": 0, "transformer_2": 0}
    for name in calls:
        getattr(pipe, name).register_forward_hook(
            lambda m, a, o, name=name: calls.__setitem__(name, calls[name] + 1))
    image = pipe(prompts[0], latents=latents[:1], output_type="np").images
    with open(out_path, "w") as f:
        json.dump({"class": type(pipe).__name__, "module": type(pipe).__module__, "calls": calls,
                   "batched_calls": batched_calls, "batched_module": real.__module__,
                   "plain": plain, "sigma_mid": pipe.config.sigma_mid,
                   "np_shape": list(image.shape),
                   "twostep_imported": sorted(m for m in sys.modules if m.split(".")[0] == "twostep")}, f)
""")


@pytest.mark.slow  # a fresh interpreter (about 10 s)
def test_export_loads_from_its_own_folder_without_twostep(two_dir, tiny, transformer_2, caps, noise, tmp_path):
    index = json.load(open(os.path.join(two_dir, "model_index.json")))
    assert index["_class_name"] == ["pipeline_twostep", "TwoStepZImagePipeline"]
    assert index["sigma_mid"] == 0.75 and "boundary_sigma" not in index
    assert os.path.isfile(os.path.join(two_dir, "pipeline_twostep.py"))
    assert os.path.isfile(os.path.join(two_dir, "zimage_batched.py"))
    torch.save(noise, tmp_path / "latents.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    script = tmp_path / "load.py"
    script.write_text(LOAD_FROM_FOLDER)
    res = subprocess.run([sys.executable, str(script), two_dir, str(tmp_path / "latents.pt"),
                          str(tmp_path / "out.json"), json.dumps(list(PROMPTS))],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.load(open(tmp_path / "out.json"))
    assert got["class"] == "TwoStepZImagePipeline"
    assert got["module"].startswith("diffusers_modules."), got["module"]  # the folder's copy
    assert got["twostep_imported"] == []
    assert "trust_remote_code=True" in got["plain"]  # plain from_pretrained refuses, loudly
    # The first call runs the batched forward from the folder's zimage_batched.py, once per step; the
    # second, with forward hooks on both transformers, their stock forward, once each.
    assert got["batched_calls"] == 2
    assert got["batched_module"].startswith("diffusers_modules."), got["batched_module"]
    assert got["batched_module"].endswith(".zimage_batched"), got["batched_module"]
    assert got["calls"] == {"transformer": 1, "transformer_2": 1}
    assert got["sigma_mid"] == 0.75
    assert got["np_shape"] == [1, SIZE, SIZE, 3]
    _, _, x0 = direct(tiny, transformer_2, caps, noise)
    torch.testing.assert_close(torch.load(str(tmp_path / "out.json") + ".pt"), x0, atol=ATOL, rtol=0)


def test_load_student_uses_the_installed_class(two_dir, tiny, transformer_2, caps, noise):
    pipe = load_student(two_dir)
    assert type(pipe) is TwoStepZImagePipeline and pipe.transformer_2 is not None
    assert TwoStepZImagePipeline.from_pretrained(two_dir).config.sigma_mid == 0.75
    calls, handles = count_calls(pipe.transformer, pipe.transformer_2)
    out = pipe(list(PROMPTS), latents=noise, output_type="latent").images
    for h in handles:
        h.remove()
    assert calls == [1, 1]
    _, _, x0 = direct(tiny, transformer_2, caps, noise)
    torch.testing.assert_close(out, x0, atol=ATOL, rtol=0)


def test_export_files(two_dir, shared_dir, tiny, transformer_2, tmp_path):
    info = read_student_info(two_dir)
    assert info["num_steps"] == 2 and info["sigma_mid"] == 0.75
    assert info["sigmas"] == [1.0, 0.75, 0.0] and info["layout"] == "two_transformers"
    assert info["extra"] == {"run": "test", "step": 7}
    for d, subs in ((two_dir, ("transformer", "transformer_2", "vae", "text_encoder")),
                    (shared_dir, ("transformer", "vae", "text_encoder"))):
        files = {os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs}
        assert {"README.md", STUDENT_JSON, "model_index.json"} <= files
        assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
        for s in subs:
            assert any(f.startswith(s + os.sep) and f.endswith(".safetensors") for f in files), s
    readme = open(os.path.join(two_dir, "README.md")).read()
    assert "trust_remote_code=True" in readme and "library_name: diffusers" in readme
    assert "zimage_batched.py" in readme
    # The folder carries the one implementation of the batched forward, byte for byte, and so does a
    # folder saved again from a loaded pipeline.
    source = open(zimage_batched.__file__, "rb").read()
    assert open(os.path.join(two_dir, "zimage_batched.py"), "rb").read() == source
    load_student(two_dir).save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "zimage_batched.py").read_bytes() == source
    assert (tmp_path / "again" / "pipeline_twostep.py").read_bytes() == open(pipeline_twostep.__file__, "rb").read()
    with pytest.raises(FileExistsError):
        export_student(two_dir, tiny, tiny.transformer, transformer_2)
    with pytest.raises(TypeError):
        export_student(tmp_path / "bad", tiny, tiny.transformer, extra={"x": object()})
    assert not (tmp_path / "bad").exists()


def test_shared_export_is_a_stock_zimage_pipeline(shared_dir, tiny, caps, noise):
    from diffusers import DiffusionPipeline, ZImagePipeline

    assert json.load(open(os.path.join(shared_dir, "model_index.json")))["_class_name"] == "ZImagePipeline"
    assert not os.path.exists(os.path.join(shared_dir, "pipeline_twostep.py"))
    info = read_student_info(shared_dir)
    assert info["layout"] == "shared" and info["sigma_mid"] == 0.75
    assert info["stock_call"] == {"num_inference_steps": 2, "sigmas": [1.0, 0.5], "guidance_scale": 0.0}
    assert "sigmas=[1.0, 0.5]" in open(os.path.join(shared_dir, "README.md")).read()

    stock = DiffusionPipeline.from_pretrained(shared_dir)
    assert type(stock) is ZImagePipeline
    stock.set_progress_bar_config(disable=True)
    with torch.no_grad():
        _, _, x0 = two_step(velocity(tiny.transformer, caps), velocity(tiny.transformer, caps), noise, 0.75)
    calls, handles = count_calls(stock.transformer)
    out = stock(list(PROMPTS), height=SIZE, width=SIZE, latents=noise, output_type="latent",
                **info["stock_call"]).images
    for h in handles:
        h.remove()
    assert calls == [2]
    torch.testing.assert_close(out, x0, atol=ATOL, rtol=0)

    pipe = load_student(shared_dir)
    assert type(pipe) is TwoStepZImagePipeline and pipe.transformer_2 is None
    assert pipe.config.sigma_mid == 0.75
    torch.testing.assert_close(pipe(list(PROMPTS), latents=noise, output_type="latent").images, x0, atol=ATOL, rtol=0)


def _as_earlier_export(src, dst, sigma_mid):
    """A copy of an exported folder as earlier versions wrote it: σ_mid under ``boundary_sigma`` in
    ``model_index.json`` (two-transformer layout) and ``twostep_student.json``, here at ``sigma_mid``."""
    import shutil

    shutil.copytree(src, dst)
    for name in ("model_index.json", STUDENT_JSON):
        path = dst / name
        d = json.loads(path.read_text())
        if "sigma_mid" in d:
            del d["sigma_mid"]
            d["boundary_sigma"] = sigma_mid
        path.write_text(json.dumps(d, indent=2, sort_keys=True))
    return dst


def test_exports_of_earlier_versions_with_boundary_sigma_still_load(two_dir, shared_dir, tiny, transformer_2, caps,
                                                                    noise, tmp_path):
    old = _as_earlier_export(two_dir, tmp_path / "two", 0.6)
    assert json.loads((old / "model_index.json").read_text())["boundary_sigma"] == 0.6
    assert read_student_info(old)["sigma_mid"] == 0.6
    assert TwoStepZImagePipeline.from_pretrained(old).config.sigma_mid == 0.6
    pipe = load_student(old)
    assert pipe.sigmas == [1.0, 0.6, 0.0] and pipe.transformer_2 is not None
    with torch.no_grad():
        _, _, x0 = two_step(velocity(tiny.transformer, caps), velocity(transformer_2, caps), noise, 0.6)
    torch.testing.assert_close(pipe(list(PROMPTS), latents=noise, output_type="latent").images, x0, atol=ATOL, rtol=0)
    pipe.save_pretrained(tmp_path / "again")  # saved again, the folder says sigma_mid
    index = json.loads((tmp_path / "again" / "model_index.json").read_text())
    assert index["sigma_mid"] == 0.6 and "boundary_sigma" not in index

    shared = load_student(_as_earlier_export(shared_dir, tmp_path / "shared", 0.6))
    assert shared.transformer_2 is None and shared.config.sigma_mid == 0.6


# --- twostep sample -----------------------------------------------------------------------------


def sample_parser():
    parser = argparse.ArgumentParser(prog="twostep")
    sub = parser.add_subparsers()
    sample.add_parser(sub)
    return parser


def run_sample(argv):
    args = sample_parser().parse_args(["sample", *argv])
    assert args.func is sample.main
    assert args.func(args) == 0


def test_sample_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        sample_parser().parse_args(["sample", "--help"])
    text = capsys.readouterr().out
    for flag in ("--student", "--prompt", "--prompts-file", "--seed", "--height", "--width", "--out",
                 "--batch-size", "--device", "--dtype"):
        assert flag in text, flag
    assert "SEED+i" in text


def test_sample_writes_one_png_of_the_right_size(two_dir, tmp_path):
    out = tmp_path / "one.png"
    run_sample(["--student", two_dir, "--prompt", "a red cube", "--height", "32", "--width", "48",
                "-o", str(out), "--device", "cpu"])
    assert Image.open(out).size == (48, 32)
    with pytest.raises(ValueError, match="--out .* is a .png file but there are 2 prompts"):
        run_sample(["--student", two_dir, "--prompt", "a", "--prompt", "b", "-o", str(out)])


def test_sample_images_do_not_depend_on_the_batch(shared_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\ntwo blue spheres\na green cone on a yellow floor\n", encoding="utf-8")
    common = ["--student", shared_dir, "--prompts-file", str(prompts), "--seed", "10", "--device", "cpu"]
    run_sample([*common, "--batch-size", "3", "-o", str(tmp_path / "b3")])
    run_sample([*common, "--batch-size", "1", "-o", str(tmp_path / "b1")])
    run_sample(["--student", shared_dir, "--prompt", "a green cone on a yellow floor", "--seed", "12",
                "-o", str(tmp_path / "alone.png")])
    names = ["0000-seed10.png", "0001-seed11.png", "0002-seed12.png"]
    records = [json.loads(line) for line in open(tmp_path / "b3" / "samples.jsonl")]
    assert [r["file"] for r in records] == names and [r["seed"] for r in records] == [10, 11, 12]
    assert records[1]["prompt"] == "two blue spheres"
    a = [np.asarray(Image.open(tmp_path / "b3" / n), dtype=np.int16) for n in names]
    b = [np.asarray(Image.open(tmp_path / "b1" / n), dtype=np.int16) for n in names]
    assert a[0].shape == (SIZE, SIZE, 3)  # default size: the VAE's sample_size
    for x, y in zip(a, b):
        assert np.abs(x - y).max() <= 1
    assert np.abs(a[2] - np.asarray(Image.open(tmp_path / "alone.png"), dtype=np.int16)).max() <= 1
    assert np.abs(a[0] - a[1]).max() > 1  # different seeds and prompts give different images


@pytest.mark.parametrize("layout", ["two", "shared"])
def test_the_model_cards_code_runs(layout, two_dir, shared_dir, tiny, run_model_card):
    """Each layout's README snippet, as written (fp32 on the CPU here), at the teacher's default size."""
    size = tiny.vae.config.sample_size
    assert run_model_card(two_dir if layout == "two" else shared_dir).size == (size, size)
