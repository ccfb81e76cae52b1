"""Every stage with a tiny random pipeline folder of each new family passed as ``--teacher``: generate →
store → train → export → load with diffusers → sample → eval, through the ``twostep`` CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from twostep.cli import main as twostep

FAMILIES = ["lumina2", "flux2-klein", "wan"]
SIZE = 64  # each tiny pipeline's default size
ROWS = 8


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    from twostep.toy.world import build_toy_manifest

    path = tmp_path_factory.mktemp("manifest") / "m.parquet"
    build_toy_manifest(ROWS, path, height=SIZE, width=SIZE)
    return str(path)


@pytest.fixture(scope="module", params=FAMILIES)
def trained(request, ray_cluster, manifest, tmp_path_factory):
    """A teacher folder of the family, its store and a 4-step training run with the student exported."""
    from twostep.teacher.random_pipelines import build_pipeline

    family = request.param
    root = tmp_path_factory.mktemp(family)
    teacher, store, run = root / "teacher", root / "store", root / "run"
    build_pipeline(family, seed=1).save_pretrained(teacher)
    assert twostep(["-q", "generate", "--manifest", manifest, "--out", str(store), "--teacher", str(teacher),
                    "--num-workers", "1", "--shard-size", "4", "--batch-size", "4", "--save", "mid,noise"]) == 0
    assert twostep(["-q", "train", "--config", "toy", "--data", str(store), "--teacher", str(teacher),
                    "--out", str(run), "max_steps=4", "checkpoint_every=2", "log_with=none", "sample_every=2",
                    "data.batch_size=4", "data.heldout_fraction=0.0", "optim.warmup_steps=0",
                    "loss.adv_warmup_steps=0", "model.disc_layers=[0, 1]"]) == 0
    return family, teacher, store, run


def test_the_store_holds_every_row_with_its_mid_state(trained):
    import webdataset as wds

    from twostep.teacher.core import Teacher

    family, teacher_dir, store, _ = trained
    index = json.loads((store / "index.json").read_text())
    assert index["status"] == "complete" and index["samples"] == ROWS
    teacher = Teacher.load(str(teacher_dir), device="cpu")
    assert teacher.family.name == family
    assert index["teacher"]["sampler"]["mid_sigma"] == pytest.approx(teacher.sampler.sigma_mid)
    shape = teacher.latent_shape(SIZE, SIZE)
    samples = list(wds.WebDataset(sorted(str(p) for p in (store / "shards").glob("*.tar")), shardshuffle=False)
                   .decode())
    assert len(samples) == ROWS
    for s in samples:
        assert s["latent.npy"].shape == s["mid.npy"].shape == s["noise.npy"].shape == shape


def test_the_exported_student_loads_with_diffusers_and_samples_what_twostep_samples(trained, tmp_path):
    from diffusers import DiffusionPipeline

    from twostep.trainer.export import open_student, read_student_info

    family, _, store, run = trained
    info = read_student_info(run / "student")
    index = json.loads((store / "index.json").read_text())
    assert info["family"] == family and info["layout"] == "two_transformers"
    assert info["sigma_mid"] == pytest.approx(index["teacher"]["sampler"]["mid_sigma"])
    pipe = DiffusionPipeline.from_pretrained(run / "student", trust_remote_code=True)
    assert pipe.transformer_2 is not None
    prompts, seeds = ["a red circle", "two blue squares at the top"], [3, 4]
    out = pipe(prompt=prompts, height=SIZE, width=SIZE, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
               output_type="np", **info["call"])
    theirs = out.images if hasattr(out, "images") else np.asarray(out.frames)[:, 0]  # Wan: one-frame videos
    ours = open_student(run / "student").images(prompts, seeds, SIZE, SIZE)
    assert np.asarray(theirs).shape == ours.shape == (2, SIZE, SIZE, 3)
    # the stock pipelines' float images against twostep's uint8 decode: within 2 levels of 255
    np.testing.assert_allclose(np.asarray(theirs).squeeze() * 255, ours.astype(np.float64), atol=2.0)

    out = tmp_path / "samples"
    assert twostep(["-q", "sample", "--student", str(run / "student"), "--out", str(out), "--seed", "3",
                    "--prompt", prompts[0], "--prompt", prompts[1]]) == 0
    from PIL import Image

    written = [np.asarray(Image.open(out / f"{i:04d}-seed{s}.png")) for i, s in enumerate(seeds)]
    np.testing.assert_array_equal(np.stack(written), ours)


def test_the_model_cards_code_runs(trained, run_model_card):
    """The README's load-and-sample snippet of the exported folder, as written (fp32 on the CPU here)."""
    _, _, _, run = trained
    assert run_model_card(run / "student").size == (SIZE, SIZE)


def test_eval_reports_the_three_sets(trained, manifest, tmp_path):
    _, teacher, _, run = trained
    out = tmp_path / "eval"
    assert twostep(["-q", "eval", "--student", str(run), "--teacher", str(teacher), "--prompts", manifest,
                    "-n", "4", "--diversity-prompts", "2", "--diversity-seeds", "2", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["teacher"] == str(teacher)
    for key in ("teacher8", "student2", "naive2"):
        assert np.isfinite(metrics[key]["fd_to_reference"]) and metrics[key]["images_per_s"] > 0, key
    assert (out / "report.md").is_file() and (out / "grid.png").is_file()
