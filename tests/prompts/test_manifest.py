"""Ids, seeds, hashes, variants, split, inspect and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import unicodedata

import pyarrow.parquet as pq
import pytest

from twostep.cli import build_parser, main
from twostep.prompts import (
    BuildOptions,
    build_manifest,
    compute_hash,
    derive_seed,
    inspect_manifest,
    read_meta,
    split_manifest,
    text_id,
)

PROMPTS = [f"prompt {i}: a {c} shape" for i, c in enumerate(["red", "green", "blue", "cyan"] * 50)]


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return str(p)


def test_normalisation_maps_variants_of_one_text_to_one_id(tmp_path):
    composed = "café  au\tlait\x07"
    decomposed = unicodedata.normalize("NFD", "café") + " au lait"
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": composed}) + "\n" + json.dumps({"prompt": decomposed}) + "\n")
    s = build_manifest([str(p)], tmp_path / "m.parquet", BuildOptions())
    row = pq.read_table(tmp_path / "m.parquet").to_pylist()
    assert s.duplicates == 1 and row[0]["prompt"] == "café au lait"
    assert row[0]["prompt_id"] == text_id("café au lait") and "." not in row[0]["prompt_id"]


def test_same_inputs_give_identical_manifest_and_hash(tmp_path, src):
    a = build_manifest([src], tmp_path / "a.parquet", BuildOptions(seed=7))
    b = build_manifest([src], tmp_path / "b.parquet", BuildOptions(seed=7))
    assert a.manifest_hash == b.manifest_hash == compute_hash(tmp_path / "a.parquet")
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))
    assert read_meta(tmp_path / "a.parquet")[0] == a.manifest_hash


def test_hash_in_a_fresh_interpreter_matches(tmp_path, src):
    """Hash randomisation or process state must not leak into ids, seeds or the hash."""
    s = build_manifest([src], tmp_path / "a.parquet", BuildOptions(seed=3))
    code = ("from twostep.prompts import build_manifest, BuildOptions;"
            f"print(build_manifest([{src!r}], {str(tmp_path / 'b.parquet')!r}, BuildOptions(seed=3)).manifest_hash)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert out.stdout.strip() == s.manifest_hash


def test_order_seed_and_settings_change_the_hash(tmp_path, src):
    base = build_manifest([src], tmp_path / "a.parquet", BuildOptions()).manifest_hash
    rev = tmp_path / "rev.txt"
    rev.write_text("\n".join(reversed(PROMPTS)) + "\n", encoding="utf-8")
    assert build_manifest([str(rev)], tmp_path / "b.parquet", BuildOptions()).manifest_hash != base
    assert build_manifest([src], tmp_path / "c.parquet", BuildOptions(seed=1)).manifest_hash != base


def test_seeds_derive_from_global_seed_and_id(tmp_path, src):
    build_manifest([src], tmp_path / "a.parquet", BuildOptions(seed=11))
    t = pq.read_table(tmp_path / "a.parquet")
    assert str(t.schema.field("seed").type) == "int64"
    for pid, seed in zip(t.column("prompt_id").to_pylist(), t.column("seed").to_pylist()):
        assert seed == derive_seed(11, pid) and 0 <= seed < 2**63
    assert len(set(t.column("seed").to_pylist())) == len(PROMPTS)


def test_per_prompt_variants(tmp_path, src):
    s = build_manifest([src], tmp_path / "a.parquet", BuildOptions(per_prompt=3))
    t = pq.read_table(tmp_path / "a.parquet")
    assert s.rows == 3 * len(PROMPTS) and s.prompts == len(PROMPTS)
    ids = t.column("prompt_id").to_pylist()
    assert ids[:3] == [f"{text_id(PROMPTS[0])}-{k}" for k in range(3)]
    assert len(set(ids)) == len(ids) and len(set(t.column("seed").to_pylist())) == len(ids)


def test_input_ids_and_seeds_are_kept(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt_id": "cat-1", "prompt": "a cat", "seed": 5}\n', encoding="utf-8")
    build_manifest([str(p)], tmp_path / "m.parquet", BuildOptions())
    row = pq.read_table(tmp_path / "m.parquet").to_pylist()[0]
    assert (row["prompt_id"], row["seed"]) == ("cat-1", 5)


def test_rebuilding_a_manifest_from_itself_is_a_fixed_point(tmp_path, src):
    a = build_manifest([src], tmp_path / "a.parquet", BuildOptions(seed=2))
    b = build_manifest([str(tmp_path / "a.parquet")], tmp_path / "b.parquet", BuildOptions(seed=99))
    ta, tb = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert ta.column("prompt_id").equals(tb.column("prompt_id")) and ta.column("seed").equals(tb.column("seed"))
    assert b.rows == a.rows


def test_split_is_deterministic_disjoint_and_keeps_variants_together(tmp_path, src):
    build_manifest([src], tmp_path / "m.parquet", BuildOptions(per_prompt=2))
    s1 = split_manifest(tmp_path / "m.parquet", 0.25, tmp_path / "s1")
    s2 = split_manifest(tmp_path / "m.parquet", 0.25, tmp_path / "s2")
    assert (s1.train_hash, s1.eval_hash) == (s2.train_hash, s2.eval_hash)
    train = pq.read_table(s1.train).column("prompt_id").to_pylist()
    ev = pq.read_table(s1.eval).column("prompt_id").to_pylist()
    assert set(train).isdisjoint(ev) and len(train) + len(ev) == 2 * len(PROMPTS)
    assert 0.1 < len(ev) / (len(train) + len(ev)) < 0.4
    assert {i.rsplit("-", 1)[0] for i in train}.isdisjoint({i.rsplit("-", 1)[0] for i in ev})
    assert read_meta(s1.eval)[0] == compute_hash(s1.eval) == s1.eval_hash


def test_split_is_stable_when_rows_are_added(tmp_path, src):
    build_manifest([src], tmp_path / "m.parquet", BuildOptions())
    more = tmp_path / "more.txt"
    more.write_text("an extra prompt\nanother extra prompt\n", encoding="utf-8")
    build_manifest([src, str(more)], tmp_path / "m2.parquet", BuildOptions())
    e1 = set(pq.read_table(split_manifest(tmp_path / "m.parquet", 0.3).eval).column("prompt_id").to_pylist())
    e2 = set(pq.read_table(split_manifest(tmp_path / "m2.parquet", 0.3).eval).column("prompt_id").to_pylist())
    assert e1 <= e2


def test_inspect_reports_counts_and_detects_tampering(tmp_path, src):
    extra = tmp_path / "x.txt"
    extra.write_text(f"{PROMPTS[0]}\n\n", encoding="utf-8")
    build_manifest([src, str(extra)], tmp_path / "m.parquet", BuildOptions())
    info = inspect_manifest(tmp_path / "m.parquet")
    assert (info["rows"], info["duplicates_dropped"], info["rows_rejected"]) == (len(PROMPTS), 1, 1)
    assert info["hash_ok"] and sum(b["count"] for b in info["length"]["histogram"]) == len(PROMPTS)
    # rewrite the rows (one prompt changed) but keep the footer: the hash check must fail
    t = pq.read_table(tmp_path / "m.parquet")
    rows = t.to_pylist()
    rows[0]["prompt"] = "tampered"
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), tmp_path / "t.parquet")
    assert not inspect_manifest(tmp_path / "t.parquet")["hash_ok"]


def test_cli_build_inspect_split(tmp_path, src, capsys):
    out = str(tmp_path / "m.parquet")
    assert main(["prompts", "build", src, "-o", out, "--seed", "4"]) == 0
    assert "manifest hash: " + read_meta(out)[0] in capsys.readouterr().out
    assert main(["prompts", "inspect", out]) == 0
    assert "(ok)" in capsys.readouterr().out
    assert main(["prompts", "split", out, "--eval-fraction", "0.2"]) == 0
    assert "eval:" in capsys.readouterr().out
    assert main(["prompts", "build", str(tmp_path / "missing.txt"), "-o", out]) == 2


def _walk(parser, path=()):
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


def test_every_flag_of_every_command_has_help():
    for path, parser in _walk(build_parser()):
        assert parser.description or not path, path
        for action in parser._actions:
            assert action.help, f"twostep {' '.join(path)} {action.option_strings or action.dest} has no help"


def test_console_script_runs():
    out = subprocess.run(["twostep", "prompts", "build", "--help"], capture_output=True, text=True, check=True)
    assert "--on-invalid" in out.stdout and "--per-prompt" in out.stdout
