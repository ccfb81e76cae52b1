"""Every input kind reads into the same manifest."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twostep.prompts import BuildOptions, InputError, ManifestError, build_manifest

PROMPTS = ["a red circle on a blue background", "two green squares", "a small yellow triangle, top left"]


def _write(path, kind: str, rows: list[dict]) -> str:
    """Write ``rows`` ({'prompt': …, …}) as ``kind`` at ``path`` and return the path."""
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    if kind == "txt":
        with opener(path, "wt", encoding="utf-8") as f:
            f.writelines(r["prompt"] + "\n" for r in rows)
    elif kind in ("csv", "tsv"):
        with opener(path, "wt", encoding="utf-8", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if kind == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    elif kind == "jsonl":
        with opener(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _prompts(path) -> list[str]:
    return pq.read_table(path).column("prompt").to_pylist()


@pytest.mark.parametrize("name,kind", [
    ("p.txt", "txt"), ("p.txt.gz", "txt"), ("p.csv", "csv"), ("p.csv.gz", "csv"), ("p.tsv", "tsv"),
    ("p.tsv.gz", "tsv"), ("p.jsonl", "jsonl"), ("p.jsonl.gz", "jsonl"), ("p.parquet", "parquet"),
])
def test_each_file_kind_reads_the_same_prompts(tmp_path, name, kind):
    src = _write(tmp_path / name, kind, [{"prompt": p} for p in PROMPTS])
    s = build_manifest([src], tmp_path / "m.parquet", BuildOptions())
    assert _prompts(tmp_path / "m.parquet") == PROMPTS
    assert s.rows == 3 and s.rejected == 0 and s.rejects_file is None
    assert set(pq.read_table(tmp_path / "m.parquet").column("source").to_pylist()) == {name}


def test_same_prompts_give_same_ids_and_hash_across_formats(tmp_path):
    a = _write(tmp_path / "a.txt", "txt", [{"prompt": p} for p in PROMPTS])
    b = _write(tmp_path / "b.jsonl.gz", "jsonl", [{"prompt": p} for p in PROMPTS])
    build_manifest([a], tmp_path / "a.parquet", BuildOptions())
    build_manifest([b], tmp_path / "b.parquet", BuildOptions())
    ta, tb = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert ta.column("prompt_id").to_pylist() == tb.column("prompt_id").to_pylist()
    assert ta.column("seed").to_pylist() == tb.column("seed").to_pylist()


def test_text_column_and_extra_columns_are_kept(tmp_path):
    rows = [{"caption": p, "score": i * 0.5, "lang": "en", "rank": i} for i, p in enumerate(PROMPTS)]
    src = _write(tmp_path / "c.parquet", "parquet", rows)
    build_manifest([src], tmp_path / "m.parquet", BuildOptions(text_column="caption"))
    t = pq.read_table(tmp_path / "m.parquet")
    assert t.column("prompt").to_pylist() == PROMPTS
    assert t.column("score").to_pylist() == [0.0, 0.5, 1.0]
    assert t.column("rank").type == pa.int64() and t.column("rank").to_pylist() == [0, 1, 2]
    assert t.column("lang").to_pylist() == ["en"] * 3
    assert "caption" not in t.column_names


def test_csv_text_column_is_auto_detected_and_optional_fields_validated(tmp_path):
    rows = [{"text": PROMPTS[0], "height": "512", "width": "768", "negative_prompt": "blurry"},
            {"text": PROMPTS[1], "height": "", "width": "", "negative_prompt": ""}]
    src = _write(tmp_path / "c.csv", "csv", rows)
    build_manifest([src], tmp_path / "m.parquet", BuildOptions(height=1024, width=1024))
    t = pq.read_table(tmp_path / "m.parquet").to_pylist()
    assert (t[0]["height"], t[0]["width"], t[0]["negative_prompt"]) == (512, 768, "blurry")
    assert (t[1]["height"], t[1]["width"]) == (1024, 1024)


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"caption": PROMPTS, "idx": [0, 1, 2]})
    ds.save_to_disk(str(tmp_path / "ds"))
    build_manifest([str(tmp_path / "ds")], tmp_path / "m.parquet", BuildOptions(text_column="caption"))
    t = pq.read_table(tmp_path / "m.parquet")
    assert t.column("prompt").to_pylist() == PROMPTS and t.column("idx").to_pylist() == [0, 1, 2]


def test_hf_dataset_dict_picks_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": PROMPTS[:2]}),
                               "test": datasets.Dataset.from_dict({"text": PROMPTS[2:]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    build_manifest([str(tmp_path / "dd")], tmp_path / "m.parquet", BuildOptions(hf_split="test"))
    assert _prompts(tmp_path / "m.parquet") == PROMPTS[2:]
    with pytest.raises(ManifestError, match="split 'nope' not found"):
        build_manifest([str(tmp_path / "dd")], tmp_path / "x.parquet",
                       BuildOptions(hf_split="nope", on_invalid="fail"))


def test_hf_data_files_directory(tmp_path):
    (tmp_path / "d").mkdir()
    _write(tmp_path / "d" / "train.csv", "csv", [{"prompt": p} for p in PROMPTS])
    build_manifest([str(tmp_path / "d")], tmp_path / "m.parquet", BuildOptions())
    assert _prompts(tmp_path / "m.parquet") == PROMPTS


def test_hub_name_unreachable_is_a_clear_error(tmp_path):
    # The hub is unreachable here; offline mode makes that answer immediate (datasets reads the
    # variable at import, so run the CLI in a fresh process).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(["twostep", "prompts", "build", "hf:nobody/no-such-dataset", "-o",
                          str(tmp_path / "m.parquet"), "--on-invalid", "fail"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert "hf:nobody/no-such-dataset: cannot load Hugging Face dataset" in out.stderr


def test_missing_input_file_names_it(tmp_path):
    with pytest.raises(InputError, match="nope.txt: file not found"):
        build_manifest([str(tmp_path / "nope.txt")], tmp_path / "m.parquet", BuildOptions())
    assert not os.path.exists(tmp_path / "m.parquet")


def test_bundled_prompt_set(tmp_path):
    s = build_manifest(["bundled:general"], tmp_path / "m.parquet", BuildOptions(on_invalid="fail"))
    t = pq.read_table(tmp_path / "m.parquet")
    assert s.rows >= 300 and s.duplicates == 0
    cats = set(t.column("category").to_pylist())
    for want in ("people", "animals", "objects", "scenes", "text_rendering", "styles", "compositions",
                 "counting", "spatial_relations"):
        assert want in cats
