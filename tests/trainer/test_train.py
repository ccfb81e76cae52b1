"""The trainer end to end on CPU: tiny random-weight Z-Image teacher, a store written by the real
generation worker, real accelerate, real checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from twostep.trainer.config import ConfigError, load_config, to_yaml


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, tiny_pipeline_dir) -> str:
    """16 toy prompts through the tiny teacher: 4 shards of 4 (latent, mid), with index.json."""
    from twostep.pipeline.job import write_index
    from twostep.pipeline.worker import ShardWorker, WorkerConfig
    from twostep.toy.world import build_toy_manifest

    tmp = tmp_path_factory.mktemp("store")
    build_toy_manifest(16, tmp / "m.parquet", height=32, width=32)
    url = str(tmp / "store")
    worker = ShardWorker(WorkerConfig(store_url=url, manifest=str(tmp / "m.parquet"), teacher=tiny_pipeline_dir,
                                      shard_size=4, batch_size=4, image_format="none"))
    for shard in range(4):
        worker.run(shard, "fp")
    write_index(worker.store, "fp", {"shard_size": 4, "manifest_hash": "m" * 16, "save": ["mid"], "image_format": "none"},
                4, worker.describe(), 1.0, {})
    return url


def tiny_cfg(store: str, teacher: str, *extra: str):
    return load_config("toy", [f"data.data={store}", f"model.teacher={teacher}", "data.batch_size=2",
                               "data.num_workers=1", "model.disc_layers=[0, 1]", "model.disc_hidden=16",
                               "log_with=none", "sample_every=0", "export=false", "max_steps=4",
                               "checkpoint_every=2", "loss.adv_warmup_steps=0",
                               "optim.warmup_steps=0", "optim.lr=1e-3", "optim.disc_lr=1e-3",
                               "data.heldout_fraction=0.25", *extra])


# --- config ----------------------------------------------------------------------------------------


def test_config_overrides_types_and_errors(tmp_path):
    cfg = load_config("toy", ["optim.lr=1e-4", "loss.e2e=false", "model.disc_layers=[0, 2]", "max_steps=7"])
    assert cfg.optim.lr == 1e-4 and cfg.loss.e2e is False and cfg.model.disc_layers == [0, 2] and cfg.max_steps == 7
    assert load_config(None).model.teacher == "toy"
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        load_config("toy", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="loss.step1_loss must be"):
        load_config("toy", ["loss.step1_loss=sometimes"])
    with pytest.raises(ConfigError, match="max_steps must be an integer"):
        load_config("toy", ["max_steps=many"])
    with pytest.raises(ConfigError, match="neither a file nor a bundled config"):
        load_config("no-such-config")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(bad))
    # The printed YAML loads back to the same config.
    path = tmp_path / "round.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg
    for name in ("toy", "zimage_turbo_8gpu"):
        load_config(name)


def test_every_config_field_has_a_docstring():
    """The docstrings are the fields' help (``common.config_flags.field_docs``)."""
    import dataclasses

    from twostep.common.config_flags import field_docs
    from twostep.trainer import config

    for cls in (config.DataConfig, config.ModelConfig, config.LossConfig, config.OptimConfig, config.TrainConfig):
        docs = field_docs(cls)
        assert [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)] == [], cls.__name__


def test_sigma_mid_comes_from_the_store_and_the_config_must_agree(tiny_store, tiny_pipeline_dir, tmp_path):
    from twostep.teacher.core import SIGMA_MID_TOL
    from twostep.trainer.loop import setup, store_sigma_mid

    index = json.loads((Path(tiny_store) / "index.json").read_text())
    assert index["teacher"]["sampler"]["mid_sigma"] == 0.75  # the store's on-disk key
    cfg = tiny_cfg(tiny_store, tiny_pipeline_dir)
    assert store_sigma_mid(index, cfg) == 0.75
    near = tiny_cfg(tiny_store, tiny_pipeline_dir, f"model.sigma_mid={0.75 + SIGMA_MID_TOL / 2}")
    assert store_sigma_mid(index, near) == 0.75  # within the tolerance: the store's value is the run's
    other = tiny_cfg(tiny_store, tiny_pipeline_dir, "model.sigma_mid=0.5")
    assert store_sigma_mid({}, other) == 0.5  # shards without an index.json: the config's
    unset = load_config("toy", [f"data.data={tiny_store}"])
    assert store_sigma_mid({}, unset, 0.857) == 0.857  # … else the teacher's own
    # Disagreeing with the store stops the run at start-up, naming both values and the field.
    with pytest.raises(ValueError, match=r"σ_mid=0\.75, but model\.sigma_mid is 0\.5"):
        setup(other, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_warmup_ramps_linearly_to_one():
    from twostep.trainer.loop import warmup

    assert [warmup(step, 4) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup(0, 0) == warmup(0, -1) == 1.0


def test_dry_run_prints_the_resolved_config():
    out = subprocess.run([sys.executable, "-m", "twostep.cli", "train", "--config", "toy", "--data", "somewhere",
                          "--dry-run", "loss.e2e=false"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "e2e: false" in out.stdout and "data: somewhere" in out.stdout


# --- one step --------------------------------------------------------------------------------------


def _parts(tiny_store, tiny_pipeline_dir, tmp_path, *extra):
    from twostep.trainer.loop import setup

    return setup(tiny_cfg(tiny_store, tiny_pipeline_dir, *extra), tmp_path / "run")


def _one_step(p, step=0):
    """One generator and one discriminator update, neither skipped; their metrics."""
    from twostep.trainer.loop import discriminator_step, generator_step

    batch = next(iter(p.loader))
    caps = p.teacher.encode_prompts(batch["prompt"])
    g = generator_step(p, batch, caps, step, log_now=True)
    assert not g.skipped and g.student_step and g.fakes is not None
    d = discriminator_step(p, batch, caps, step, g.fakes)
    assert not d.skipped
    return {**g.metrics, **d.metrics}


def test_one_step_updates_both_students_and_the_heads(tiny_store, tiny_pipeline_dir, tmp_path):
    p = _parts(tiny_store, tiny_pipeline_dir, tmp_path)
    student = p.accelerator.unwrap_model(p.student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    heads = {k: v.clone() for k, v in p.disc.state_dict().items()}
    teacher = {k: v.clone() for k, v in p.teacher.transformer.state_dict().items()}
    out = _one_step(p)
    for k in ("loss/paired", "loss/step1_regress", "loss/adv", "loss/step1_adv", "loss/disc",
              "disc/real_logit", "disc/fake_logit", "grad_norm/step2/adv", "grad_norm/step1/paired"):
        assert k in out and torch.isfinite(torch.as_tensor(out[k])), k
    changed = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("transformer.") for k in changed)
    assert any(k.startswith("transformer_2.") for k in changed)
    moved = {k.split(".")[1] for k, v in p.disc.state_dict().items() if not torch.equal(v, heads[k])}
    assert moved == {str(i) for i in range(len(p.disc.heads))}  # every head was updated
    assert all(torch.equal(v, teacher[k]) for k, v in p.teacher.transformer.state_dict().items())  # frozen


@pytest.mark.parametrize("e2e", [True, False])
def test_step1_gets_gradients_through_step2_only_when_e2e(tiny_store, tiny_pipeline_dir, tmp_path, e2e):
    p = _parts(tiny_store, tiny_pipeline_dir, tmp_path, f"loss.e2e={str(e2e).lower()}", "loss.step1_loss=none")
    student = p.accelerator.unwrap_model(p.student)
    batch = next(iter(p.loader))
    caps = p.teacher.encode_prompts(batch["prompt"])
    _, _, x0 = student(batch["noise"], caps, e2e=e2e)
    torch.nn.functional.mse_loss(x0, batch["latent"]).backward()
    g1 = [q.grad for q in student.transformer.parameters() if q.grad is not None and q.grad.abs().sum() > 0]
    g2 = [q.grad for q in student.transformer_2.parameters() if q.grad is not None and q.grad.abs().sum() > 0]
    assert g2, "step 2 always learns from the final loss"
    assert bool(g1) == e2e


def test_shared_student_and_step1_target_in_x0_space(tiny_store, tiny_pipeline_dir, tmp_path):
    from twostep.trainer.losses import step1_target

    p = _parts(tiny_store, tiny_pipeline_dir, tmp_path, "model.decoupled=false")
    student = p.accelerator.unwrap_model(p.student)
    assert student.transformer_2 is None and student.step_model(2) is student.transformer
    batch = next(iter(p.loader))
    # The teacher's own mid is (1-σ)·x0_implied + σ·ε: the target inverts exactly that.
    target = step1_target(batch["mid"], batch["noise"], 0.75)
    assert torch.allclose(0.25 * target + 0.75 * batch["noise"], batch["mid"], atol=1e-5)


# --- resume, non-finite, preemption ---------------------------------------------------------------------


def _params(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    return out


def test_2n_steps_equal_n_steps_resume_n_steps(tiny_store, tiny_pipeline_dir, tmp_path):
    from twostep.trainer.loop import train

    train(tiny_cfg(tiny_store, tiny_pipeline_dir, "max_steps=6", "checkpoint_every=3"), tmp_path / "straight")
    train(tiny_cfg(tiny_store, tiny_pipeline_dir, "max_steps=3", "checkpoint_every=3"), tmp_path / "resumed")
    result = train(tiny_cfg(tiny_store, tiny_pipeline_dir, "max_steps=6", "checkpoint_every=3"), tmp_path / "resumed")
    assert result["step"] == 6
    a, b = _params(tmp_path / "straight"), _params(tmp_path / "resumed")
    assert a.keys() == b.keys() and len(a) > 10
    assert any("ema" in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    data = json.loads((tmp_path / "resumed" / "checkpoints" / "step-00000006" / "data-rank0.json").read_text())
    assert data == json.loads((tmp_path / "straight" / "checkpoints" / "step-00000006" / "data-rank0.json").read_text())
    run = json.loads((tmp_path / "resumed" / "run.json").read_text())
    assert run["manifest_hash"] == "m" * 16 and run["code_version"].startswith("twostep")
    assert (tmp_path / "resumed" / "config.yaml").exists()
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]


def test_nonfinite_steps_are_skipped_then_stop_the_run(tiny_store, tiny_pipeline_dir, tmp_path, monkeypatch):
    from twostep.trainer import loop

    run = tmp_path / "run"
    loop.train(tiny_cfg(tiny_store, tiny_pipeline_dir, "max_steps=2", "checkpoint_every=2"), run)
    good = _params(run)
    real = loop.L.step1_target
    monkeypatch.setattr(loop.L, "step1_target", lambda *a: real(*a) * float("nan"))
    with pytest.raises(RuntimeError, match="3 steps in a row had a non-finite loss.*step-00000002"):
        loop.train(tiny_cfg(tiny_store, tiny_pipeline_dir, "max_steps=8", "max_nonfinite=3", "checkpoint_every=2"), run)
    after = _params(run)
    assert all(torch.equal(good[k], after[k]) for k in good)  # the last checkpoint is intact


def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(tiny_store, tiny_pipeline_dir, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "twostep.cli", "train", "--config", "toy", "--out", str(run), "--data", tiny_store,
           "--teacher", tiny_pipeline_dir, "data.batch_size=2", "data.num_workers=0", "model.disc_layers=[0, 1]",
           "model.disc_hidden=16", "log_with=none", "sample_every=0", "export=false", "max_steps=100000",
           "checkpoint_every=100000", "log_every=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"  # a line a step (log_every=1)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (
            metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # some steps in
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    assert "preempted: checkpoint saved at step" in out
    saved = sorted((run / "checkpoints").glob("step-*"))
    assert len(saved) == 1
    step = json.loads((saved[0] / "progress.json").read_text())["step"]
    assert step > 0
    cmd[cmd.index("max_steps=100000")] = f"max_steps={step + 2}"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {saved[0]} (step {step})" in done.stderr
    assert json.loads((run / "result.json").read_text())["step"] == step + 2


# --- export ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [(), ("model.lora_rank=4",), ("model.decoupled=false",)])
def test_exported_student_reproduces_the_trainers_two_step_output(tiny_store, tiny_pipeline_dir, tmp_path, extra):
    from twostep.trainer.export import load_student
    from twostep.trainer.loop import export

    p = _parts(tiny_store, tiny_pipeline_dir, tmp_path, *extra)
    for step in range(2):
        _one_step(p, step)
        p.ema.update(p.accelerator.unwrap_model(p.student), step)
    student = p.accelerator.unwrap_model(p.student)
    if extra == ("model.lora_rank=4",):  # only adapters train; the base stays the teacher's
        assert all(("lora" in n) == q.requires_grad for n, q in student.named_parameters())
    out = export(p)
    prompts = ["a red circle", "a small blue square at the top"]
    noise = p.teacher.make_noise([5, 6], p.teacher.latent_shape(32, 32))
    caps = p.teacher.encode_prompts(prompts)
    with torch.no_grad(), p.ema.applied(student):
        _, _, mine = student(noise, caps)
    pipe = load_student(out)
    assert (pipe.transformer_2 is None) == (extra == ("model.decoupled=false",))
    theirs = pipe(prompt=prompts, latents=noise, height=32, width=32, output_type="latent").images
    torch.testing.assert_close(theirs, mine, atol=1e-4, rtol=1e-4)
    info = json.loads((out / "twostep_student.json").read_text())
    assert info["extra"]["step"] == 0 and info["extra"]["config"]["model"]["sigma_mid"] == 0.75
    assert info["sigma_mid"] == pipe.config.sigma_mid == 0.75


# --- several processes -------------------------------------------------------------------------------


def test_two_processes_ddp_on_cpu(tiny_store, tiny_pipeline_dir, tmp_path):
    """torchrun, 2 ranks (accelerate picks DDP over gloo on 127.0.0.1): the ranks split the shards, agree
    on every step and write one checkpoint with both data positions."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", "29517", "-m", "twostep.cli", "train", "--config", "toy", "--out", str(run), "--data", tiny_store,
           "--teacher", tiny_pipeline_dir, "data.batch_size=2", "data.num_workers=1", "model.disc_layers=[0, 1]",
           "model.disc_hidden=16", "log_with=none", "sample_every=0", "max_steps=3", "checkpoint_every=3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    ckpt = run / "checkpoints" / "step-00000003"
    states = [json.loads((ckpt / f"data-rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["rank"] for s in states] == [0, 1] and all(s["world_size"] == 2 for s in states)
    assert all(s["batches"] == 3 for s in states)
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert (run / "student" / "model_index.json").exists()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_store, tiny_pipeline_dir, tmp_path):
    grads = []
    for gc in ("false", "true"):
        p = _parts(tiny_store, tiny_pipeline_dir, tmp_path / gc, f"model.gradient_checkpointing={gc}")
        student = p.accelerator.unwrap_model(p.student)
        assert student.transformer.gradient_checkpointing == (gc == "true")
        batch = next(iter(p.loader))
        caps = p.teacher.encode_prompts(batch["prompt"])
        _, _, x0 = student(batch["noise"], caps)
        s = torch.full((len(x0),), 0.5)
        (torch.nn.functional.mse_loss(x0, batch["latent"]) + p.disc(x0, s, caps).mean()).backward()
        grads.append([q.grad.clone() for q in student.parameters() if q.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 10
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_external_real_images_feed_the_discriminator(tiny_store, tiny_pipeline_dir, tmp_path):
    """loss.real_source=external: ground-truth renders (WebDataset png + txt) are D's real samples."""
    from twostep.toy.render import write_render_shards

    paths = write_render_shards(tmp_path / "renders", n=6, shard_size=3)
    assert len(paths) == 2
    p = _parts(tiny_store, tiny_pipeline_dir, tmp_path, "loss.real_source=external",
               f"data.external={tmp_path / 'renders' / 'renders-*.tar'}")
    latents, caps = p.external.next_batch(4, 32, 32)
    assert latents.shape == (4, 16, 16, 16) and len(caps) == 4
    out = _one_step(p)
    assert "disc/real_logit" in out


# --- the adversarial terms ---------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["mlp", "conv"])
def test_heads_give_one_logit_per_image_token(tiny_pipeline_dir, head):
    from twostep.teacher.core import Teacher
    from twostep.trainer.discriminator import Discriminator

    teacher = Teacher.load(tiny_pipeline_dir, device="cpu")
    disc = Discriminator(teacher.family, [0, 1], 16, head)
    x = torch.randn(3, teacher.transformer.config.in_channels, 16, 16)
    caps = teacher.encode_prompts(["a red circle", "a blue square", "x"])
    logits = disc(x, torch.tensor([0.2, 0.5, 0.9]), caps)
    assert logits.shape == (3, 8 * 8)  # patch 2: (16/2)·(16/2) image tokens
    if head == "conv":  # spectral norm on every conv of the head
        assert all(hasattr(m, "parametrizations") for m in disc.heads[0].modules() if isinstance(m, torch.nn.Conv2d))
    with pytest.raises(ValueError, match="discriminator head 'big'"):
        Discriminator(teacher.family, [0], 16, "big")


def test_per_token_conv_heads_pass_gradients_to_both_steps(tiny_store, tiny_pipeline_dir, tmp_path):
    """Adversarial terms alone, conv heads, per-token hinge: both parameter sets still learn from them."""
    p = _parts(tiny_store, tiny_pipeline_dir, tmp_path, "model.disc_head=conv", "loss.gan_reduce=token",
               "loss.paired_weight=0", "loss.step1_loss=adv", "loss.adv_weight=1", "loss.step1_adv_weight=1")
    student = p.accelerator.unwrap_model(p.student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    out = _one_step(p)
    assert set(k for k in out if k.startswith("loss/")) >= {"loss/adv", "loss/step1_adv", "loss/disc"}
    assert "loss/paired" not in out and "loss/step1_regress" not in out
    for part in ("step1", "step2"):
        assert float(out[f"grad_norm/{part}/adv"]) > 0
        assert float(out[f"grad_share/{part}/adv"]) + float(out[f"grad_share/{part}/step1_adv"]) == pytest.approx(1.0)
    assert float(out["grad_norm/step1/step1_adv"]) > 0  # step 1 only: the step-1 state does not touch step 2
    assert float(out["grad_norm/step2/step1_adv"]) == 0
    changed = {k.split(".")[0] for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"transformer", "transformer_2"}
    for k in ("disc/batch_accuracy", "disc/logit_gap", "disc/batch_accuracy_mid", "disc/logit_gap_mid"):
        assert k in out
    assert 0.0 <= float(out["disc/batch_accuracy"]) <= 1.0
    gap = float(out["disc/real_logit"]) - float(out["disc/fake_logit"])
    assert float(out["disc/logit_gap"]) == pytest.approx(gap, abs=1e-6)


def test_misaligned_pairs_are_extra_fakes(tiny_store, tiny_pipeline_dir, tmp_path, monkeypatch):
    """The fake side of the discriminator's loss holds the student's outputs and, after them, the real
    latents rolled by one in the batch under the original captions, scored by the same heads."""
    from twostep.trainer import loop
    from twostep.trainer import losses as L

    p = _parts(tiny_store, tiny_pipeline_dir, tmp_path, "loss.misaligned_fakes=true", "loss.step1_loss=none",
               "loss.gan_reduce=image", "model.disc_head=mlp")  # no spectral-norm power step between forwards
    seen, renoised = [], []
    real_renoise, real_d_loss = L.renoise, L.d_loss

    def renoise(x0, sigma, eps):
        renoised.append((x0, sigma, real_renoise(x0, sigma, eps)))
        return renoised[-1][2]

    def d_loss(real, fake, kind="hinge"):
        seen.append((real.detach(), fake.detach()))
        return real_d_loss(real, fake, kind)

    monkeypatch.setattr(L, "renoise", renoise)
    monkeypatch.setattr(L, "d_loss", d_loss)
    batch = next(iter(p.loader))
    caps = p.teacher.encode_prompts(batch["prompt"])
    fakes = loop.generator_step(p, batch, caps, 0, log_now=False).fakes
    renoised.clear()
    heads = {k: v.clone() for k, v in p.disc.state_dict().items()}
    out = loop.discriminator_step(p, batch, caps, 0, fakes).metrics
    (real, fake), = seen
    b = len(batch["latent"])
    assert real.shape == (b,) and fake.shape == (2 * b,)
    x0, sigma, x_mis = renoised[-1]  # the third re-noising: rolled reals
    assert torch.equal(x0, L.misaligned(batch["latent"])) and torch.equal(x0[1:], batch["latent"][:-1])
    p.disc.load_state_dict(heads)  # the heads as they were when the loss was computed
    with torch.no_grad():
        expect = L.reduce_logits(p.disc(x_mis, sigma, caps), "image")
    assert torch.allclose(fake[b:], expect, atol=1e-5)
    assert "disc/misaligned_logit" in out and 0.0 <= float(out["disc/misaligned_accuracy"]) <= 1.0


def test_discriminator_only_steps_leave_the_student_alone(tiny_store, tiny_pipeline_dir, tmp_path):
    from twostep.trainer.loop import discriminator_step, generator_step

    p = _parts(tiny_store, tiny_pipeline_dir, tmp_path, "optim.g_every=2", "optim.g_start=1")
    student = p.accelerator.unwrap_model(p.student)
    batch = next(iter(p.loader))
    caps = p.teacher.encode_prompts(batch["prompt"])
    for step, updates in ((0, False), (1, True), (2, False), (3, True)):
        before = {k: v.clone() for k, v in student.state_dict().items()}
        heads = {k: v.clone() for k, v in p.disc.state_dict().items()}
        g = generator_step(p, batch, caps, step, log_now=False)
        assert g.student_step is updates and not g.skipped
        assert bool(g.metrics) is updates and all(k.startswith(("loss/", "grad_norm/")) for k in g.metrics)
        same = all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
        assert same is not updates, step
        discriminator_step(p, batch, caps, step, g.fakes)
        assert any(not torch.equal(v, heads[k]) for k, v in p.disc.state_dict().items())  # heads every step


def test_run_logs_diagnostics_and_plots_them(tiny_store, tiny_pipeline_dir, tmp_path):
    from twostep.trainer.loop import train
    from twostep.trainer.report import MetricsLog, read_metrics

    run = tmp_path / "run"
    train(tiny_cfg(tiny_store, tiny_pipeline_dir, "max_steps=4", "log_every=2", "heldout_every=3"), run)
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 3, 4]  # a held-out check is logged on its own step too
    assert all("disc/batch_accuracy" in r and "grad_share/step2/adv" in r for r in rows)
    assert ["disc/heldout_auc" in r for r in rows] == [False, True, False]
    assert not any(k in r for r in rows for k in ("skipped", "g_update", "fsdp"))  # metrics hold only metrics
    assert (run / "report.png").stat().st_size > 0 and "batch_accuracy" in (run / "report.md").read_text()
    MetricsLog(run / "metrics.jsonl", start=3)  # a resume from step 3 drops the rows after it
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [2, 3]


def test_ema_loads_on_an_indexed_cpu_device(tmp_path):
    """accelerate launch can give the device as cpu:0, which safetensors refuses as a device name."""
    from types import SimpleNamespace

    from twostep.trainer.checkpoint import EMA, Checkpoints

    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.9)
    path = tmp_path / "checkpoint-000001"
    path.mkdir()
    from safetensors.torch import save_file

    save_file({k: v + 1 for k, v in ema.state_dict().items()}, str(path / "ema.safetensors"))
    (path / "progress.json").write_text(json.dumps({"step": 1}))
    acc = SimpleNamespace(device=torch.device("cpu", 0), process_index=0, load_state=lambda p: None)
    Checkpoints(tmp_path, 2).load(acc, path, ema)
    assert all(torch.equal(v, model.state_dict()[k] + 1) for k, v in ema.state_dict().items())


# --- held-out slice, controls, accounting ------------------------------------------------------------


def test_heldout_slice_never_reaches_the_training_stream(tiny_store):
    """Held-out samples (by key hash) are skipped by every loader worker in every epoch, and
    read_heldout returns exactly them; resuming mid-shard still skips them."""
    from twostep.trainer.data import ShardStream, StreamLoader, heldout_score, read_heldout, resolve_shards

    shards, _ = resolve_shards(tiny_store)
    every = {s.key for i in range(len(shards)) for s in ShardStream(shards)._load(i)}
    held = {k for k in every if heldout_score(k) < 0.25}
    assert 0 < len(held) < len(every)  # the tiny store has both kinds at this fraction
    loader = StreamLoader(ShardStream(shards, seed=3, heldout_fraction=0.25), batch_size=3, num_workers=2)
    seen = [k for _, b in zip(range(12), loader) for k in b["key"]]  # 36 samples: over two epochs
    assert set(seen) == every - held
    state = loader.state_dict()
    resumed = StreamLoader(ShardStream(shards, seed=3, heldout_fraction=0.25), batch_size=3, num_workers=2)
    resumed.load_state_dict(state)
    assert not held & {k for _, b in zip(range(4), resumed) for k in b["key"]}
    batch = read_heldout(shards, 0.25, 100)
    assert set(batch["key"]) == held and batch["latent"].shape[0] == len(held) and "mid" in batch
    assert len(read_heldout(shards, 0.25, 1)["key"]) == 1 and read_heldout(shards, 0.0, 10) is None
    # A stream without a held-out slice keeps the identity that older checkpoints were saved with.
    assert "heldout_fraction" not in ShardStream(shards).identity()


def test_auc_known_answers():
    from twostep.trainer.losses import auc

    assert auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 0.0
    assert auc(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])) == 0.5
    assert auc(torch.tensor([[0.0, 4.0], [1.0, 1.0]]), torch.tensor([1.5, 0.5])) == 0.75  # token logits averaged


def test_frozen_heads_receive_no_update(tiny_store, tiny_pipeline_dir, tmp_path):
    """model.disc_frozen: the heads (spectral-norm buffers included) stay at their initialisation
    over a run, while the student still learns from the adversarial terms through them."""
    from twostep.trainer.loop import discriminator_step, generator_step

    p = _parts(tiny_store, tiny_pipeline_dir, tmp_path, "model.disc_frozen=true", "model.disc_head=conv")
    student = p.accelerator.unwrap_model(p.student)
    heads = {k: v.clone() for k, v in p.disc.state_dict().items()}
    before = {k: v.clone() for k, v in student.state_dict().items()}
    batches = iter(p.loader)
    for step in range(3):
        batch = next(batches)
        caps = p.teacher.encode_prompts(batch["prompt"])
        g = generator_step(p, batch, caps, step, log_now=True)
        out = {**g.metrics, **discriminator_step(p, batch, caps, step, g.fakes).metrics}
        assert "loss/disc" in out and "disc/batch_accuracy" in out and float(out["grad_norm/step2/adv"]) > 0
    assert all(torch.equal(v, heads[k]) for k, v in p.disc.state_dict().items())
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_real_renders_replace_both_real_inputs(tiny_store, tiny_pipeline_dir, tmp_path):
    """loss.real_source=external: the final term's real input is the render re-noised, and the step-1
    term's is the render at σ_mid with the step-1 state's noise, never the store's mid."""
    from twostep.toy.render import write_render_shards
    from twostep.trainer import losses as L
    from twostep.trainer.loop import discriminator_step, generator_step

    write_render_shards(tmp_path / "renders", n=6, shard_size=3)
    p = _parts(tiny_store, tiny_pipeline_dir, tmp_path, "loss.real_source=external", "loss.misaligned_fakes=false",
               f"data.external={tmp_path / 'renders' / 'renders-*.tar'}")
    batch = next(iter(p.loader))
    caps = p.teacher.encode_prompts(batch["prompt"])
    fakes = generator_step(p, batch, caps, 0, log_now=False).fakes
    renders, render_caps = p.external.next_batch(2, 32, 32)
    p.external.next_batch = lambda n, h, w: (renders, render_caps)
    inputs = []
    hook = p.disc.register_forward_pre_hook(lambda m, args: inputs.append((args[0].detach(), args[1].detach())))
    discriminator_step(p, batch, caps, 0, fakes)
    hook.remove()
    (real, s_real), _, (real_mid, s_mid), (fake_mid, _) = inputs
    assert torch.allclose(s_mid, torch.full_like(s_mid, 0.75)) and torch.equal(fake_mid, fakes[1])
    assert torch.allclose(real_mid, L.renoise(renders, s_mid, batch["noise"]), atol=1e-6)
    assert not torch.allclose(real_mid, batch["mid"], atol=1e-3)
    eps = (real - (1 - s_real.view(-1, 1, 1, 1)) * renders) / s_real.view(-1, 1, 1, 1)  # a render, re-noised
    assert torch.allclose(L.renoise(renders, s_real, eps), real, atol=1e-5)


def test_grad_share_per_parameter_set_known_answer(tiny_store, tiny_pipeline_dir, tmp_path):
    """Detached steps (loss.e2e=false), regressions only: the final loss reaches step 2 alone and the
    step-1 regression step 1 alone, so each owns its set's share; the norms equal a direct autograd."""
    from twostep.trainer.loop import generator_step

    p = _parts(tiny_store, tiny_pipeline_dir, tmp_path, "loss.e2e=false", "loss.step1_loss=regress",
               "loss.adv_weight=0")
    student = p.accelerator.unwrap_model(p.student)
    batch = next(iter(p.loader))
    caps = p.teacher.encode_prompts(batch["prompt"])
    _, _, x0 = student(batch["noise"], caps, e2e=False)
    paired = torch.nn.functional.mse_loss(x0, batch["latent"])
    grads = torch.autograd.grad(paired, list(student.transformer_2.parameters()), allow_unused=True)
    expect = torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None))
    out = generator_step(p, batch, caps, 0, log_now=True).metrics
    assert float(out["grad_norm/step1/paired"]) == 0 and float(out["grad_norm/step2/step1_regress"]) == 0
    assert float(out["grad_share/step1/step1_regress"]) == pytest.approx(1.0)
    assert float(out["grad_share/step2/paired"]) == pytest.approx(1.0)
    assert float(out["grad_norm/step2/paired"]) == pytest.approx(float(expect), rel=1e-4)
    shared = _parts(tiny_store, tiny_pipeline_dir, tmp_path / "shared", "model.decoupled=false")
    out = generator_step(shared, batch, caps, 0, log_now=True).metrics
    assert {k.split("/")[1] for k in out if k.startswith("grad_share/")} == {"shared"}


@pytest.mark.parametrize("extra", [("model.disc_text=true", "model.disc_head=conv"),
                                   ("model.disc_text=true", "model.disc_head=mlp", "loss.independent_renoise=true"),
                                   ("loss.step1_adv_on=x0", "loss.sigma_dist=uniform", "loss.gan_loss=logistic")])
def test_discriminator_options_train_and_report_heldout(tiny_store, tiny_pipeline_dir, tmp_path, extra):
    """Each recipe option runs a training step with finite losses, and the held-out check reports an
    AUC for both terms."""
    from twostep.trainer.loop import heldout_diagnostics

    p = _parts(tiny_store, tiny_pipeline_dir, tmp_path, *extra)
    out = _one_step(p)
    assert all(torch.isfinite(torch.as_tensor(out[k])) for k in out if k.startswith("loss/"))
    held = heldout_diagnostics(p)
    for k in ("disc/heldout_auc", "disc/heldout_auc_mid", "disc/heldout_accuracy", "disc/heldout_logit_gap_mid"):
        assert k in held and held[k] == held[k]
    assert 0.0 <= held["disc/heldout_auc"] <= 1.0


def test_text_conditioned_heads_depend_on_the_caption(tiny_pipeline_dir):
    from twostep.teacher.core import Teacher
    from twostep.trainer.discriminator import Discriminator

    teacher = Teacher.load(tiny_pipeline_dir, device="cpu")
    disc = Discriminator(teacher.family, [0, 1], 16, "mlp", text=True)
    x = torch.randn(1, teacher.transformer.config.in_channels, 16, 16).repeat(2, 1, 1, 1)
    with torch.no_grad():
        logits = disc(x, torch.tensor([0.5, 0.5]), teacher.encode_prompts(["a red circle", "a blue square"]))
    assert logits.shape == (2, 64) and not torch.allclose(logits[0], logits[1])


def test_probe_reports_heldout_auc(tiny_store, tiny_pipeline_dir, tmp_path):
    """twostep probe-disc: the student frozen (the naive sampler), held-out checks at each interval."""
    out = subprocess.run([sys.executable, "-m", "twostep.cli", "probe-disc", "--config", "toy", "--data", tiny_store,
                          "--out", str(tmp_path / "probe"), "--steps", "4", "--every", "2",
                          f"model.teacher={tiny_pipeline_dir}", "data.batch_size=2", "model.disc_layers=[0, 1]",
                          "model.disc_hidden=16", "log_with=none", "data.heldout_fraction=0.25"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    probe = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert [c["step"] for c in probe["checks"]] == [2, 4]
    assert 0 <= probe["last_auc"] <= 1 and 0 <= probe["best_auc_mid"] <= 1 and "held-out AUC" in out.stdout
    result = json.loads((tmp_path / "probe" / "result.json").read_text())
    assert result["step"] == 4 and not (tmp_path / "probe" / "student").exists()


def test_adamw_implementations_give_the_same_update_and_auto_is_the_default_off_cuda():
    from twostep.trainer.config import OptimConfig
    from twostep.trainer.loop import adamw

    with pytest.raises(ConfigError, match="optim.adamw must be"):
        load_config("toy", ["optim.adamw=apex"])
    torch.manual_seed(0)
    start, grads = torch.randn(3, 5), [torch.randn(3, 5) for _ in range(3)]
    finals = {}
    for impl in ("auto", "fused", "foreach", "loop"):
        p = torch.nn.Parameter(start.clone())
        opt = adamw([p], OptimConfig(adamw=impl, weight_decay=0.01), 1e-2, torch.device("cpu"))
        for g in grads:
            p.grad = g.clone()
            opt.step()
        finals[impl] = p.detach()
        group = opt.param_groups[0]
        assert (group["fused"], group["foreach"]) == {"auto": (None, None), "fused": (True, None),
                                                      "foreach": (None, True), "loop": (None, False)}[impl]
    assert not torch.equal(finals["auto"], start)
    for impl in ("fused", "foreach", "loop"):
        torch.testing.assert_close(finals[impl], finals["auto"], rtol=1e-6, atol=1e-6)
