"""Every entry point on bad input: exit status 2, one line that names the argument and the reason, no
traceback (unless --debug or -v), and nothing written. Runs the real command line, in this process
(``main``) or as a program; none of these cases may start Ray or load a model."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from twostep.cli import main
from twostep.toy.world import build_toy_manifest


@pytest.fixture(autouse=True)
def _logging_levels():
    """``main`` sets the root and twostep logger levels; put them back for the tests that follow."""
    root, own = logging.getLogger().level, logging.getLogger("twostep").level
    yield
    logging.getLogger().setLevel(root)
    logging.getLogger("twostep").setLevel(own)


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything starts (or connects to) a Ray cluster."""
    import ray

    def refuse(*a, **k):
        raise AssertionError("Ray was started on bad input")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs of every wrong kind, and one good toy manifest."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "text.parquet").write_text("not parquet at all\n")
    (d / "folder").mkdir()
    (d / "not-a-pipeline").mkdir()
    (d / "not-a-pipeline" / "readme.txt").write_text("hello")
    (d / "broken-store").mkdir()
    (d / "broken-store" / "index.json").write_text("{not json")
    (d / "file.txt").write_text("a file\n")
    (d / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (d / "student").mkdir()  # passes the folder check; nothing in it may be loaded
    (d / "student" / "model_index.json").write_text("{}")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": ["a red circle"]}), d / "other.parquet")
    build_toy_manifest(8, d / "toy.parquet")
    return {k: str(d / v) for k, v in {
        "text_parquet": "text.parquet", "folder": "folder", "not_pipeline": "not-a-pipeline",
        "broken_store": "broken-store", "file": "file.txt", "latin1": "latin1.txt", "student": "student",
        "other_parquet": "other.parquet", "manifest": "toy.parquet", "missing": "no/such/thing"}.items()} | {
        "root": str(d)}


def _fails(capsys, argv: list[str], *needles: str) -> str:
    """Run ``twostep argv``: exit 2, one stderr line that starts with the command and holds ``needles``."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("twostep "), err
    for n in needles:
        assert n in lines[0], (n, err)
    return lines[0]


# --- generate ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing teacher", "teacher not a pipeline", "teacher is a file",
                                  "missing manifest", "manifest not parquet", "manifest is a folder",
                                  "manifest not a manifest", "out is a file"])
def test_generate(case, files, tmp_path, capsys, no_ray):
    f = files
    out = tmp_path / "store"
    teacher, manifest, needles = "toy", f["manifest"], ()
    if case == "missing teacher":
        teacher, needles = "/no/such/folder", ("--teacher /no/such/folder", "no such folder")
    elif case == "teacher not a pipeline":
        teacher, needles = f["not_pipeline"], ("--teacher", "no model_index.json")
    elif case == "teacher is a file":
        teacher, needles = f["file"], ("--teacher", "a file, not a pipeline folder")
    elif case == "missing manifest":
        manifest, needles = f["missing"], ("--manifest", "no such file")
    elif case == "manifest not parquet":
        manifest, needles = f["text_parquet"], ("--manifest", "text.parquet", "not a readable parquet file")
    elif case == "manifest is a folder":
        manifest, needles = f["folder"], ("--manifest", "a folder, not a parquet file")
    elif case == "manifest not a manifest":
        manifest, needles = f["other_parquet"], ("--manifest", "not a twostep manifest", "prompt_id")
    elif case == "out is a file":
        out, needles = f["file"], ("--out", "a file, not a store folder")
    line = _fails(capsys, ["generate", "--manifest", manifest, "--out", str(out), "--teacher", teacher], *needles)
    assert line.startswith("twostep generate: error: ")
    if case != "out is a file":
        assert not out.exists()  # no store folder, no manifest copy, no lease
    else:
        assert open(out).read() == "a file\n"


def test_generation_job_checks_the_teacher_before_ray_or_the_store(files, tmp_path, no_ray):
    """The job itself (what twostep demo calls) refuses a bad teacher before it touches anything."""
    from twostep.pipeline.job import GenerateConfig, run_generation

    with pytest.raises(FileNotFoundError, match="--teacher /no/such/folder: no such folder"):
        run_generation(GenerateConfig(manifest=files["manifest"], out=str(tmp_path / "store"),
                                      teacher="/no/such/folder"))
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("argv,field,flag", [
    (["--shard-size", "0"], "shard_size must be ≥ 1, not 0", "--shard-size must be ≥ 1, not 0"),
    (["--save", "mid,latent"], "save accepts mid and noise, not ['latent']",
     "--save accepts mid and noise, not ['latent']"),
    (["--startup-timeout", "0"], "startup_timeout must be > 0, not 0.0", "--startup-timeout must be > 0, not 0.0"),
])
def test_generate_bad_values_name_the_field_and_at_the_command_line_the_flag(argv, field, flag, files, tmp_path,
                                                                             capsys, no_ray):
    """The config's check names the field; the command line says the flag in its place."""
    from twostep.common.config_flags import FieldError
    from twostep.pipeline.config import GenerateConfig

    out = tmp_path / "store"
    name = argv[0].removeprefix("--").replace("-", "_")
    value = {"save": ("mid", "latent"), "startup_timeout": 0.0}.get(name, 0)
    with pytest.raises(FieldError) as e:
        GenerateConfig(manifest=files["manifest"], out=str(out), **{name: value})
    assert str(e.value) == field
    line = _fails(capsys, ["generate", "--manifest", files["manifest"], "--out", str(out), *argv])
    assert line == f"twostep generate: error: {flag}"
    assert not out.exists()


def test_generate_as_a_program(files, tmp_path):
    """A missing teacher folder, run as a user runs it: one line, and no store folder left behind."""
    out = tmp_path / "store"
    r = subprocess.run([sys.executable, "-m", "twostep.cli", "generate", "--manifest", files["manifest"],
                        "--out", str(out), "--teacher", "/no/such/folder"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "twostep generate: error: --teacher /no/such/folder: no such folder, and not toy or a hub id "
        "(owner/name[@revision])"]
    assert r.stdout == "" and not out.exists()


# --- verify ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,needles", [
    ("missing", ("store", "no such folder")),
    ("file", ("store", "a file, not a store folder")),
    ("folder", ("store", "not a twostep store (no index.json")),
    ("broken_store", ("store", "index.json is not JSON")),
])
def test_verify(key, needles, files, capsys):
    line = _fails(capsys, ["verify", files[key]], files[key], *needles)
    assert line.startswith("twostep verify: error: ")


# --- train -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing data", "data not a store", "broken store", "missing teacher",
                                  "teacher in the config", "out is a file", "bad override", "no out"])
def test_train(case, files, tmp_path, capsys):
    f = files
    run = tmp_path / "run"
    shard = tmp_path / "one.tar"  # a shard spec resolves without reading the shard
    shard.write_bytes(b"")
    argv = ["train", "--data", str(shard), "--out", str(run)]
    if case == "missing data":
        argv, needles = ["train", "--data", "/no/such/store", "--out", str(run)], ("--data", "/no/such/store",
                                                                                  "not a store")
    elif case == "data not a store":
        argv, needles = ["train", "--data", f["folder"], "--out", str(run)], ("--data", f["folder"], "no index.json")
    elif case == "broken store":
        argv, needles = ["train", "--data", f["broken_store"], "--out", str(run)], ("--data", f["broken_store"])
    elif case == "missing teacher":
        argv, needles = [*argv, "--teacher", "/no/such/teacher"], ("--teacher /no/such/teacher", "no such folder")
    elif case == "teacher in the config":
        argv, needles = [*argv, "model.teacher=" + f["not_pipeline"]], ("model.teacher", "no model_index.json")
    elif case == "out is a file":
        argv, needles = ["train", "--data", str(shard), "--out", f["file"]], ("--out", "a file, not a run directory")
    elif case == "bad override":
        argv, needles = [*argv, "optim.lrr=1"], ("unknown key 'lrr'",)
    elif case == "no out":
        argv, needles = ["train", "--data", str(shard)], ("--out RUN_DIR is required",)
    line = _fails(capsys, argv, *needles)
    assert line.startswith("twostep train: error: ")
    assert not run.exists()


def test_train_as_a_program(tmp_path):
    """A missing store, run as a user runs it: the message, and no traceback."""
    r = subprocess.run([sys.executable, "-m", "twostep.cli", "train", "--data", "/no/such/store", "--out",
                        str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("twostep train: error: --data: no shards found for '/no/such/store'")
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


# --- sample ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["missing student", "student is a file", "student not a pipeline",
                                  "missing prompts file", "prompts file is a folder", "prompts file not utf-8",
                                  "no prompts", "png for two prompts", "out is a file"])
def test_sample(case, files, tmp_path, capsys):
    f = files
    out = tmp_path / "images"
    argv = ["sample", "--student", f["student"], "--prompt", "a red circle", "-o", str(out)]
    if case == "missing student":
        argv[2], needles = f["missing"], ("--student", "no such folder")
    elif case == "student is a file":
        argv[2], needles = f["file"], ("--student", "a file, not an exported student folder")
    elif case == "student not a pipeline":
        argv[2], needles = f["not_pipeline"], ("--student", "no model_index.json")
    elif case == "missing prompts file":
        argv, needles = [*argv, "--prompts-file", f["missing"]], ("--prompts-file", "no such file")
    elif case == "prompts file is a folder":
        argv, needles = [*argv, "--prompts-file", f["folder"]], ("--prompts-file", "a folder, not a text file")
    elif case == "prompts file not utf-8":
        argv, needles = [*argv, "--prompts-file", f["latin1"]], ("--prompts-file", "not UTF-8 text")
    elif case == "no prompts":
        argv, needles = ["sample", "--student", f["student"], "-o", str(out)], ("--prompt or --prompts-file",)
    elif case == "png for two prompts":
        out = tmp_path / "one.png"
        argv, needles = [*argv[:-1], str(out), "--prompt", "b"], ("is a .png file but there are 2 prompts",)
    elif case == "out is a file":
        out = tmp_path / "taken"
        out.write_text("x")
        argv, needles = [*argv[:-1], str(out)], ("--out", "a file, not a folder")
    line = _fails(capsys, argv, *needles)
    assert line.startswith("twostep sample: error: ")
    assert not out.exists() or out.read_text() == "x"


# --- eval --------------------------------------------------------------------------------------


def test_eval_missing_student(files, tmp_path):
    r = subprocess.run([sys.executable, "-m", "twostep.cli", "eval", "--student", files["missing"], "--out",
                        str(tmp_path / "eval")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"--student {files['missing']}: neither an exported student" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "eval").exists()


def test_eval_bad_teacher(files, tmp_path, capsys):
    _fails(capsys, ["eval", "--student", files["student"], "--teacher", "/no/such/teacher", "--out",
                    str(tmp_path / "eval")], "twostep eval: error: ", "teacher /no/such/teacher", "no such folder")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--references", "0"], "--references must be ≥ 1, not 0"),
    (["-n", "0"], "--num-samples must be ≥ 1, not 0"),
    (["--diversity-seeds", "-1"], "--diversity-seeds must be ≥ 0, not -1"),
    (["--features", "dino"], "--dino-model is needed for --features dino"),
])
def test_eval_bad_values(argv, needle, files, tmp_path, capsys):
    """EvalConfig's checks and evaluate's name the field; the command line shows its flag. No model loads."""
    line = _fails(capsys, ["eval", "--student", files["student"], *argv, "--out", str(tmp_path / "eval")], needle)
    assert line.startswith("twostep eval: error: ") and not (tmp_path / "eval").exists()


def test_eval_no_feature_model_for_real_prompts(files, tmp_path, capsys):
    """A manifest of non-toy prompts and no --clip-model or --dino-model: said before any model loads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = tmp_path / "photos.parquet"
    pq.write_table(pa.table({"prompt_id": ["a", "b"], "prompt": ["a cat", "a dog"], "seed": [1, 2],
                             "height": [32, 32], "width": [32, 32]}), manifest)
    _fails(capsys, ["eval", "--student", files["student"], "--teacher", "/no/such/teacher", "--prompts",
                    str(manifest), "--out", str(tmp_path / "eval")],
           "twostep eval: error: --clip-model is needed for FD outside the toy world", "or --dino-model")


# --- probe-disc, demo and sample: their configs' checks name the flag ------------------------------


@pytest.mark.parametrize("argv,needle", [
    (["probe-disc", "--data", "store", "--out", "OUT", "--every", "0"], "--every must be ≥ 1, not 0"),
    (["demo", "--out", "OUT", "--num-workers", "0"], "--num-workers must be ≥ 1, not 0"),
    (["sample", "--student", "s", "--prompt", "a", "-o", "OUT", "--batch-size", "0"], "--batch-size must be ≥ 1, not 0"),
])
def test_config_checks_name_the_flag(argv, needle, tmp_path, capsys, no_ray):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    line = _fails(capsys, argv, needle)
    assert line.startswith(f"twostep {argv[0]}: error: ") and not (tmp_path / "out").exists()


# --- prompts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["inspect"], ["split", "--eval-fraction", "0.2"]])
@pytest.mark.parametrize("key,needle", [("missing", "no such file"), ("text_parquet", "not a readable parquet file"),
                                        ("folder", "a folder, not a parquet file"),
                                        ("other_parquet", "not a twostep manifest")])
def test_prompts_inspect_and_split(command, key, needle, files, capsys):
    before = sorted(os.listdir(files["root"]))
    line = _fails(capsys, ["prompts", command[0], files[key], *command[1:]], files[key], needle)
    assert line.startswith(f"twostep prompts {command[0]}: error: ")
    assert sorted(os.listdir(files["root"])) == before


def test_prompts_split_bad_fraction(files, capsys):
    _fails(capsys, ["prompts", "split", files["manifest"], "--eval-fraction", "1.5"], "--eval-fraction")


def test_prompts_build_and_toy(files, tmp_path, capsys):
    _fails(capsys, ["prompts", "build", files["missing"], "-o", str(tmp_path / "m.parquet")],
           "twostep prompts build: error: ", files["missing"], "not found")
    _fails(capsys, ["prompts", "toy", "-n", "4", "-o", os.path.join(files["file"], "m.parquet")],
           "twostep prompts toy: error: ", files["file"])
    assert sorted(os.listdir(tmp_path)) == []


def test_prompts_inspect_as_a_program(tmp_path):
    """The case from the issue: a pyarrow traceback before."""
    r = subprocess.run([sys.executable, "-m", "twostep.cli", "prompts", "inspect", "missing.parquet"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", "twostep prompts inspect: error: missing.parquet: "
                                                         "no such file\n")


# --- --debug and -v show the traceback -------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--debug", "-v"])
def test_debug_and_verbose_raise(flag, files):
    with pytest.raises(FileNotFoundError, match="no such file"):
        main([flag, "prompts", "inspect", files["missing"]])


def test_a_bug_is_not_hidden(monkeypatch, files):
    """Errors that bad input does not raise (here a TypeError from a broken report) keep their traceback."""
    from twostep.prompts import cli as prompts_cli

    def broken(path):
        raise TypeError("a bug")

    monkeypatch.setattr(prompts_cli, "inspect_manifest", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["prompts", "inspect", files["manifest"]])


def test_default_logging_is_quiet_for_libraries(files, capsys):
    """twostep's INFO lines by default, the libraries' from WARNING; -v: the libraries' INFO too."""
    assert main(["prompts", "inspect", files["manifest"]]) == 0
    assert logging.getLogger("twostep.generate").isEnabledFor(logging.INFO)
    assert not logging.getLogger("accelerate.checkpointing").isEnabledFor(logging.INFO)
    assert main(["-v", "prompts", "inspect", files["manifest"]]) == 0
    assert logging.getLogger("accelerate.checkpointing").isEnabledFor(logging.INFO)
    assert logging.getLogger("twostep.generate").isEnabledFor(logging.DEBUG)
    assert main(["-q", "prompts", "inspect", files["manifest"]]) == 0
    assert not logging.getLogger("twostep.generate").isEnabledFor(logging.INFO)
    capsys.readouterr()
