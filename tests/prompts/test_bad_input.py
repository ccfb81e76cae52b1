"""Every kind of bad input gets a message naming file, row and reason, and loses nothing."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twostep.prompts import BuildOptions, ManifestError, build_manifest, rejects_path

GOOD = "a blue square in the centre"


def _rejects(manifest) -> list[dict]:
    with open(rejects_path(manifest), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _txt(tmp_path, data: bytes, name="p.txt"):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


# (name, file bytes builder, expected row, expected reason fragment)
CASES = {
    "empty prompt": (lambda d: _txt(d, f"{GOOD}\n   \t \n".encode()), 2, "empty or whitespace only"),
    "invalid utf-8": (lambda d: _txt(d, f"{GOOD}\nbad \xff\xfe bytes\n".encode("latin-1")), 2, "invalid UTF-8"),
    "nul byte": (lambda d: _txt(d, f"{GOOD}\nnul\x00here\n".encode()), 2, "NUL byte"),
    "over-long": (lambda d: _txt(d, f"{GOOD}\n{'x' * 60}\n".encode()), 2, "over --max-chars 50"),
    "reused id": (lambda d: _jsonl(d, [{"prompt_id": "a1", "prompt": GOOD},
                                       {"prompt_id": "a1", "prompt": "something else"}]), 2,
                  "prompt_id 'a1' reused with different text"),
    "jsonl wrong type": (lambda d: _jsonl(d, [{"prompt": GOOD}, {"prompt": 42}]), 2,
                         "prompt has type int, expected a string"),
    "jsonl missing field": (lambda d: _jsonl(d, [{"prompt": GOOD}, {"caption_x": "hi"}]), 2,
                            "missing field"),
    "bad id": (lambda d: _jsonl(d, [{"prompt": GOOD}, {"prompt": "x y", "prompt_id": "a.b"}]), 2, "no dots"),
    "bad height": (lambda d: _jsonl(d, [{"prompt": GOOD}, {"prompt": "x y", "height": 100}]), 2,
                   "positive multiple of 16"),
    "invalid json": (lambda d: _txt(d, f'{{"prompt": "{GOOD}"}}\n{{"prompt": \n'.encode(), "p.jsonl"), 2,
                     "invalid JSON"),
}


def _jsonl(d, rows):
    return _txt(d, "".join(json.dumps(r) + "\n" for r in rows).encode(), "p.jsonl")


@pytest.mark.parametrize("case", list(CASES))
def test_bad_row_is_rejected_with_file_row_and_reason(tmp_path, case):
    make, row, reason = CASES[case]
    src = make(tmp_path)
    out = tmp_path / "m.parquet"
    s = build_manifest([src], out, BuildOptions(max_chars=50))
    assert s.rows == 1 and s.rejected == 1
    [rej] = _rejects(out)
    assert rej["source"] == src and rej["row"] == row and reason in rej["reason"]
    # fail mode stops with the same facts in the message and writes no manifest
    out2 = tmp_path / "f.parquet"
    with pytest.raises(ManifestError) as e:
        build_manifest([src], out2, BuildOptions(max_chars=50, on_invalid="fail"))
    assert f"{src}:{row}" in str(e.value) and reason in str(e.value)
    assert not out2.exists()


def test_invalid_utf8_reject_keeps_the_bytes_readable(tmp_path):
    src = CASES["invalid utf-8"][0](tmp_path)
    build_manifest([src], tmp_path / "m.parquet", BuildOptions())
    assert _rejects(tmp_path / "m.parquet")[0]["prompt"] == "bad \\xff\\xfe bytes"


def test_empty_file(tmp_path):
    empty = _txt(tmp_path, b"", "empty.txt")
    good = _txt(tmp_path, f"{GOOD}\n".encode(), "good.txt")
    s = build_manifest([empty, good], tmp_path / "m.parquet", BuildOptions())
    assert s.rows == 1 and s.rejected == 1
    assert _rejects(tmp_path / "m.parquet")[0]["reason"] == "file is empty (no rows)"
    with pytest.raises(ManifestError, match="empty.txt: file is empty"):
        build_manifest([empty, good], tmp_path / "f.parquet", BuildOptions(on_invalid="fail"))


def test_nothing_valid_is_an_error_that_points_at_rejects(tmp_path):
    src = _txt(tmp_path, b"\n \n")
    with pytest.raises(ManifestError, match="no valid prompts.*rejects.jsonl"):
        build_manifest([src], tmp_path / "m.parquet", BuildOptions())
    assert len(_rejects(tmp_path / "m.parquet")) == 2


def test_truncated_gzip_keeps_rows_before_the_cut(tmp_path):
    lines = "".join(f"prompt number {i} with some words\n" for i in range(5000)).encode()
    blob = gzip.compress(lines)
    src = _txt(tmp_path, blob[: len(blob) // 2], "cut.txt.gz")
    s = build_manifest([src], tmp_path / "m.parquet", BuildOptions())
    [rej] = _rejects(tmp_path / "m.parquet")
    assert "truncated or corrupt gzip" in rej["reason"] and rej["source"] == src
    assert 0 < s.rows < 5000 and rej["row"] == s.rows + 1
    with pytest.raises(ManifestError, match=r"cut.txt.gz:\d+: truncated or corrupt gzip"):
        build_manifest([src], tmp_path / "f.parquet", BuildOptions(on_invalid="fail"))


def test_missing_column(tmp_path):
    src = _txt(tmp_path, b"title,score\nhello,1\n", "p.csv")
    with pytest.raises(ManifestError, match=r"p.csv: no prompt column.*\['title', 'score'\]"):
        build_manifest([src], tmp_path / "m.parquet", BuildOptions(on_invalid="fail"))
    with pytest.raises(ManifestError, match="p.csv: missing column 'caption'"):
        build_manifest([src], tmp_path / "m.parquet", BuildOptions(on_invalid="fail", text_column="caption"))


def test_wrong_typed_column(tmp_path):
    pq.write_table(pa.table({"prompt": [1, 2, 3]}), tmp_path / "p.parquet")
    with pytest.raises(ManifestError, match="column 'prompt' has type int64, expected a string column"):
        build_manifest([str(tmp_path / "p.parquet")], tmp_path / "m.parquet", BuildOptions(on_invalid="fail"))


def test_csv_row_with_too_many_fields(tmp_path):
    src = _txt(tmp_path, f"prompt\n{GOOD}\n\"x\",\"y\"\n".encode(), "p.csv")
    build_manifest([src], tmp_path / "m.parquet", BuildOptions())
    [rej] = _rejects(tmp_path / "m.parquet")
    assert rej["row"] == 3 and "header has 1" in rej["reason"]


def test_duplicates_are_counted_and_listed_not_silently_dropped(tmp_path):
    src = _txt(tmp_path, f"{GOOD}\n{GOOD.upper()}\n  {GOOD}  \n".encode())
    s = build_manifest([src], tmp_path / "m.parquet", BuildOptions())
    assert (s.rows, s.duplicates, s.rejected) == (2, 1, 0)
    s = build_manifest([src], tmp_path / "ci.parquet", BuildOptions(case_insensitive=True))
    assert (s.rows, s.duplicates) == (1, 2)
    assert [r["row"] for r in _rejects(tmp_path / "ci.parquet")] == [2, 3]


def test_stale_rejects_file_is_removed(tmp_path):
    out = tmp_path / "m.parquet"
    build_manifest([_txt(tmp_path, f"{GOOD}\n\n".encode(), "a.txt")], out, BuildOptions())
    assert rejects_path(out).exists()
    build_manifest([_txt(tmp_path, f"{GOOD}\n".encode(), "b.txt")], out, BuildOptions())
    assert not rejects_path(out).exists()


def test_byte_order_mark_is_not_part_of_the_header(tmp_path):
    src = _txt(tmp_path, "\ufeffprompt,score\nhello there,1\n".encode(), "bom.csv")
    s = build_manifest([src], tmp_path / "m.parquet", BuildOptions(on_invalid="fail"))
    assert s.rows == 1 and pq.read_table(tmp_path / "m.parquet").column("score").to_pylist() == ["1"]  # CSV text kept as it is


def test_lone_surrogates_and_bad_extra_columns_are_rejected_per_row(tmp_path):
    src = _txt(tmp_path, (json.dumps({"prompt": GOOD}) + "\n" + '{"prompt": "bad \\ud800 escape"}\n').encode()
               + b'{"prompt": "fine text", "author": "caf\xe9"}\n', "p.jsonl")
    s = build_manifest([src], tmp_path / "m.parquet", BuildOptions())
    reasons = [r["reason"] for r in _rejects(tmp_path / "m.parquet")]
    assert s.rows == 1 and len(reasons) == 2
    assert "invalid UTF-8 in prompt" in reasons[0] and "column 'author' contains invalid UTF-8" in reasons[1]


def test_input_id_equal_to_a_derived_id_is_a_reused_id(tmp_path):
    from twostep.prompts import text_id

    src = _jsonl(tmp_path, [{"prompt": GOOD}, {"prompt": "other text", "prompt_id": text_id(GOOD)}])
    build_manifest([src], tmp_path / "m.parquet", BuildOptions())
    [rej] = _rejects(tmp_path / "m.parquet")
    assert rej["row"] == 2 and "reused with different text" in rej["reason"]
