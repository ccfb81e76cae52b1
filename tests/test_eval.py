"""twostep eval: metric code on known inputs, CLIP score on a tiny random open_clip model, and eval end
to end on the toy teacher and on the tiny random-weight Z-Image pipeline (open_clip features)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from twostep.common.config_flags import FieldError
from twostep.eval import EvalConfig, gap_closed, omitted_tv
from twostep.eval.metrics import (
    ClipModel,
    DinoModel,
    mean_pairwise_distance,
    precision_recall,
    total_variation,
)


def test_gap_closed_formula():
    assert gap_closed(100.0, 100.0, 10.0) == 0.0
    assert gap_closed(10.0, 100.0, 10.0) == 1.0
    assert gap_closed(55.0, 100.0, 10.0) == pytest.approx(0.5)
    assert gap_closed(5.0, 5.0, 10.0) is None  # no gap to close


@pytest.mark.parametrize("values,message", [
    ({"references": 0}, "references must be ≥ 1, not 0"),
    ({"num_samples": 0}, "num_samples must be ≥ 1, not 0"),
    ({"batch_size": -2}, "batch_size must be ≥ 1, not -2"),
    ({"diversity_prompts": -1}, "diversity_prompts must be ≥ 0, not -1"),
    ({"features": "pixels"}, "features must be one of auto, toy, clip, dino, not 'pixels'"),
    ({"size": (0, 64)}, "size must be (height, width), both ≥ 1, not (0, 64)"),
])
def test_eval_config_checks_name_the_field(values, message):
    with pytest.raises(FieldError) as e:
        EvalConfig(**values)
    assert str(e.value) == message and e.value.field == next(iter(values))


def test_eval_config_is_the_flags():
    """Every EvalConfig field is a flag of twostep eval, its default the field's."""
    import argparse
    import dataclasses

    from twostep.eval import add_parser

    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    args = sub.choices["eval"].parse_args(["--student", "s", "--manifest", "m.parquet", "-n", "7", "--size", "32x48"])
    cfg = EvalConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)})
    assert cfg == EvalConfig(student="s", prompts="m.parquet", num_samples=7, size=(32, 48))
    assert sub.choices["eval"].parse_args(["--student", "s"]).out == EvalConfig().out == "out/eval"


def test_precision_recall_known_cases():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 8))
    assert precision_recall(real, real) == (1.0, 1.0)
    p, r = precision_recall(real, real + 100.0)  # far away: nothing inside either manifold
    assert (p, r) == (0.0, 0.0)
    # a collapsed generator: every sample near one real point → precise, no coverage
    collapsed = real[:1] + 1e-3 * rng.normal(size=(300, 8))
    p, r = precision_recall(real, collapsed)
    assert p == 1.0 and r < 0.05
    # a fresh sample of the same distribution covers most of it
    p, r = precision_recall(real, rng.normal(size=(300, 8)))
    assert p > 0.8 and r > 0.8
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(real[:3], real[:3])


def test_total_variation_and_diversity_known_values():
    assert total_variation([1, 0], [0, 1]) == 1.0
    assert total_variation([2, 2], [1, 1]) == 0.0
    assert total_variation([3, 1], [1, 1]) == pytest.approx(0.25)
    # two seeds per prompt at distance 3 and 5 → mean 4; identical samples → 0
    g = np.array([[[0.0, 0.0], [3.0, 0.0]], [[0.0, 0.0], [0.0, 5.0]]])
    assert mean_pairwise_distance(g) == pytest.approx(4.0)
    assert mean_pairwise_distance(np.ones((3, 4, 5))) == 0.0
    # three points on a line at 0, 1, 2: pairs 1, 1, 2 → mean 4/3
    assert mean_pairwise_distance(np.array([[[0.0], [1.0], [2.0]]])) == pytest.approx(4 / 3)


def test_omitted_attribute_tv_compares_only_left_out_attributes():
    named = [{"shape": "circle", "colour": None, "size": None, "position": "top", "background": None}] * 4
    ref = [{"shape": "circle", "colour": c, "size": "small", "position": "top", "background": "black"}
           for c in ("red", "red", "blue", "blue")]
    same = omitted_tv(ref, ref, named)
    assert same["colour"] == 0.0 and same["shape"] is None and same["position"] is None
    collapsed = [dict(r, colour="red") for r in ref]
    tv = omitted_tv(collapsed, ref, named)
    assert tv["colour"] == 0.5 and tv["size"] == 0.0 and tv["mean"] == pytest.approx(0.5 / 3, abs=1e-4)


TINY_CLIP = {"model_cfg": {"embed_dim": 32,
                           "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                           "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2,
                                        "layers": 2}},
             "preprocess_cfg": {"mean": [0.481, 0.458, 0.408], "std": [0.269, 0.261, 0.276]}}


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A randomly initialised tiny open_clip model saved as open_clip's local-folder layout."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("tiny-clip")
    (path / "open_clip_config.json").write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP["model_cfg"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "open_clip_model.safetensors")
    return str(path)


@pytest.fixture(scope="module")
def tiny_dino_dir(tmp_path_factory):
    """A randomly initialised tiny DINOv2 (transformers) with its image processor, saved as a local folder."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    path = tmp_path_factory.mktemp("tiny-dino")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=28, patch_size=14)).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 28, "width": 28},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(path)
    return str(path)


def test_dino_features_on_a_tiny_model(tiny_dino_dir):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 40, 40, 3), dtype=np.uint8)
    a, b = DinoModel(tiny_dino_dir, batch_size=2), DinoModel(tiny_dino_dir, batch_size=5)
    f = a.features(images)
    assert f.shape == (5, 32) and f.dtype == np.float64
    assert np.allclose(f, b.features(images), atol=1e-5)  # batching does not change a sample's features
    assert not np.allclose(f[0], f[1])  # different images, different features


def test_clip_score_on_a_tiny_model_is_deterministic(tiny_clip_dir):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 40, 40, 3), dtype=np.uint8)
    prompts = ["a red circle", "a blue square", "green", "a small triangle", "black background", "x"]
    a = ClipModel(tiny_clip_dir)
    b = ClipModel(f"local-dir:{tiny_clip_dir}")  # open_clip's own spelling loads the same weights
    s = a.score(images, prompts)
    assert s == b.score(images, prompts) and 0.0 <= s <= 100.0
    f = a.features(images)
    assert f.shape == (6, 32) and np.allclose(np.linalg.norm(f, axis=1), 1.0)
    # the score is per pair: permuting prompts against images changes it
    assert a.score(images, prompts[::-1]) != s


def _eval(args, tmp_path, timeout=900):
    out = subprocess.run([sys.executable, "-m", "twostep.cli", "eval", *args, "--device", "cpu",
                          "--out", str(tmp_path / "eval")], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads((tmp_path / "eval" / "metrics.json").read_text()), out


def test_naive_student_scores_like_the_naive_teacher(tmp_path):
    """A "student" that is the teacher's own transformer in both steps must score exactly like the
    teacher's naive 2 steps (gap closed 0) on every metric."""
    from twostep.teacher.core import Teacher
    from twostep.trainer.export import export_student

    teacher = Teacher.load("toy", device="cpu")
    export_student(tmp_path / "naive", teacher.pipe, teacher.transformer, teacher.transformer)
    m, out = _eval(["--student", str(tmp_path / "naive"), "-n", "16", "--batch-size", "8",
                    "--diversity-prompts", "3", "--diversity-seeds", "2"], tmp_path)
    assert m["n"] == 16 and m["features"] == "toy"
    for f in ("grid.png", "metrics.png", "report.md", "report.html"):
        assert (tmp_path / "eval" / f).stat().st_size > 0
    s, nv = m["student2"], m["naive2"]
    assert s["accuracy"] == nv["accuracy"] and s["omitted_tv"] == nv["omitted_tv"]
    assert (s["precision"], s["recall"]) == (nv["precision"], nv["recall"])
    assert s["diversity"] == pytest.approx(nv["diversity"], rel=1e-3)
    assert np.isclose(s["fd_to_reference"], nv["fd_to_reference"], rtol=1e-3)
    assert np.isclose(s["paired_fd_to_teacher8"], nv["paired_fd_to_teacher8"], rtol=1e-3)
    assert m["gap_closed"] is None or abs(m["gap_closed"]) < 1e-3
    assert m["teacher8"]["paired_fd_to_teacher8"] is None and m["teacher8"]["fd_to_reference"] > 0
    for key in ("teacher8", "student2", "naive2"):
        t = m[key]
        assert t["batch_size"] == 8 and t["images_per_s"] > 0 and t["latency_s_per_batch"] > 0
        # images/s is n over the unrounded seconds, which the record rounds to 0.01 s
        assert 16 / (t["seconds"] + 0.005) <= t["images_per_s"] <= 16 / max(t["seconds"] - 0.005, 1e-9)
    assert "gap closed" in out.stdout and "images/s" in (tmp_path / "eval" / "report.md").read_text()
    assert "<table>" in (tmp_path / "eval" / "report.html").read_text()


def test_eval_on_the_tiny_zimage_pipeline_with_open_clip(tiny_pipeline_dir, tiny_clip_dir, tiny_dino_dir, tmp_path):
    """The real-teacher path: a non-toy manifest, open_clip features for FD and CLIP score; then
    DINOv2 features (FD_DINOv2) instead."""
    from twostep.teacher.core import Teacher
    from twostep.trainer.export import export_student

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"a photo of thing number {i}" for i in range(12)) + "\n")
    subprocess.run([sys.executable, "-m", "twostep.cli", "prompts", "build", str(prompts), "-o",
                    str(tmp_path / "m.parquet"), "--height", "32", "--width", "32"], check=True, capture_output=True)
    teacher = Teacher.load(tiny_pipeline_dir, device="cpu")
    export_student(tmp_path / "student", teacher.pipe, teacher.transformer, teacher.transformer)
    common = ["--student", str(tmp_path / "student"), "--teacher", tiny_pipeline_dir,
              "--prompts", str(tmp_path / "m.parquet"), "-n", "12", "--batch-size", "6"]
    m, _ = _eval([*common, "--clip-model", tiny_clip_dir, "--diversity-prompts", "2"], tmp_path)
    assert (m["features"], m["height"], m["width"], m["n"]) == ("clip", 32, 32, 12)
    for key in ("teacher8", "student2", "naive2"):
        assert 0 <= m[key]["clip_score"] <= 100 and "accuracy" not in m[key]
        assert 0 <= m[key]["recall"] <= 1 and m[key]["images_per_s"] > 0
    assert m["student2"]["clip_score"] == m["naive2"]["clip_score"]  # same weights, same 2 steps
    assert "CLIP score" in (tmp_path / "eval" / "report.md").read_text()
    # without a CLIP model there is no feature space for a real teacher: a clear error, not a guess
    bad = subprocess.run([sys.executable, "-m", "twostep.cli", "eval", *common, "--device", "cpu", "--out",
                          str(tmp_path / "bad")], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--clip-model" in bad.stderr
    # DINOv2 features in place of CLIP's: a different feature space, the same student-equals-naive check
    d, _ = _eval([*common, "--dino-model", tiny_dino_dir, "--diversity-prompts", "0"], tmp_path)
    assert d["features"] == "dino" and d["dino_model"] == tiny_dino_dir and "clip_score" not in d["naive2"]
    assert d["student2"]["fd_to_reference"] == pytest.approx(d["naive2"]["fd_to_reference"], rel=1e-3)
    assert d["naive2"]["fd_to_reference"] != m["naive2"]["fd_to_reference"]
    assert "DINOv2" in (tmp_path / "eval" / "report.md").read_text()


def test_eval_prompts_reads_manifests_and_names_what_is_wrong(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from twostep.prompts.evalset import eval_prompts
    from twostep.toy.evaluate import evaluate_teacher

    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"prompt": ["a cat", "a dog", "a fox"], "seed": [1, 2, 3],
                             "height": [256, 256, 512], "width": [256, 256, 512]}), plain)
    ep = eval_prompts(str(plain), 2, seed=0)
    assert (ep.prompts, ep.seeds, ep.height, ep.width, ep.named) == (["a cat", "a dog"], [1, 2], 256, 256, None)
    with pytest.raises(ValueError, match="several sizes"):
        eval_prompts(str(plain), 3, seed=0)
    forced = eval_prompts(str(plain), 3, seed=0, size=(64, 96))
    assert (len(forced.prompts), forced.height, forced.width) == (3, 64, 96)
    noseed = tmp_path / "noseed.parquet"
    pq.write_table(pa.table({"prompt": ["a cat"]}), noseed)
    with pytest.raises(ValueError, match=r"noseed.parquet: not a twostep manifest, missing column\(s\) \['seed'\]"):
        eval_prompts(str(noseed), 1, seed=0)
    with pytest.raises(ValueError, match="plain.parquet: not a toy manifest"):
        evaluate_teacher(None, n=2, manifest=str(plain))


# --- unpaired scoring --------------------------------------------------------------------------------


def test_unpaired_gap_closed_on_known_gaussians():
    """Sets drawn from the reference's own distribution score 1 within sampling noise; a copy of the
    naive set scores exactly 0; the teacher's set is not the reference itself (its FD is above 0)."""
    from twostep.eval import unpaired_scores

    rng = np.random.default_rng(0)
    n, d = 2000, 8

    def draw(shift=0.0, scale=1.0):
        return rng.normal(shift, scale, (n, d))

    ref, teacher, naive = draw(), draw(), draw(0.6, 1.3)
    good = unpaired_scores(ref, {"teacher8": teacher, "student2": draw(), "naive2": naive})
    assert good["fd"]["teacher8"] > 0 and abs(good["gap_closed"] - 1) < 0.02
    bad = unpaired_scores(ref, {"teacher8": teacher, "student2": naive.copy(), "naive2": naive})
    assert bad["gap_closed"] == 0.0
    half = unpaired_scores(ref, {"teacher8": teacher, "student2": draw(0.3, 1.15), "naive2": naive})
    assert 0.3 < half["gap_closed"] < 0.9
    assert good["recall"]["student2"] > 0.85 and good["precision"]["student2"] > bad["precision"]["student2"]


def test_teacher_as_student_scores_one_and_naive_scores_zero(tmp_path):
    """On the toy teacher, unpaired: the teacher's own 8 steps as the "student", from other seeds, closes
    the gap within the noise of two references; from the eval seeds it is the teacher's own set
    (exactly 1); the naive 2 steps as the "student" score exactly 0. The teacher-side sets are made
    once and read from the cache afterwards."""
    from twostep.eval import EvalConfig, evaluate, teacher_sampler
    from twostep.teacher.core import Teacher

    teacher = Teacher.load("toy", device="cpu")
    t8 = teacher_sampler(teacher, 64, 64)
    other = lambda prompts, seeds: t8(prompts, [s + 1 for s in seeds])  # noqa: E731
    kw = {"teacher": teacher, "num_samples": 120, "batch_size": 60, "diversity_prompts": 0, "references": 2,
          "cache": str(tmp_path / "cache")}
    m, _ = evaluate(student_sampler=other, **kw)
    gaps = [r["gap_closed"] for r in m["references"]]
    # the spread is rounded from the unrounded gaps, each gap rounded on its own: 4 decimals, three roundings
    assert len(gaps) == 2 and m["gap_closed"] == gaps[0] and m["gap_closed_spread"] == pytest.approx(
        abs(gaps[0] - gaps[1]), abs=1.5e-4 + 1e-9)
    assert all(abs(g - 1) < 0.15 for g in gaps), gaps  # 120 prompts: measured spread in docs/evaluation.md
    assert m["student2"]["paired_fd_to_teacher8"] > m["teacher8"]["fd_to_reference"] / 2  # other noise: unpaired
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 4  # teacher 8, naive 2, two references
    same, _ = evaluate(EvalConfig(**{k: v for k, v in kw.items() if k != "teacher"}), teacher=teacher,
                       student_sampler=t8)
    assert same["gap_closed"] == 1.0 and same["student2"]["fd_to_reference"] == same["teacher8"]["fd_to_reference"]
    assert same["student2"]["paired_fd_to_teacher8"] == pytest.approx(0.0, abs=1e-6)
    naive = evaluate(student_sampler=teacher_sampler(teacher.with_sampler(num_steps=2), 64, 64), **kw)[0]
    assert naive["gap_closed"] == 0.0 and all(r["gap_closed"] == 0.0 for r in naive["references"])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached  # nothing sampled twice
