"""The store format's one owner: what the writer encodes, the real webdataset reader reads back, and
``twostep verify`` and the trainer's shard reader accept and refuse the same shards, for the same reason."""

from __future__ import annotations

import glob
import io
import json
import re
import subprocess
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twostep.pipeline.job import write_index
from twostep.pipeline.shardformat import (
    ShardFormatError,
    encode_sample,
    iter_samples,
    npy_bytes,
    tar_bytes,
)
from twostep.pipeline.store import Store
from twostep.pipeline.verify import verify_store
from twostep.trainer.data import (
    CorruptShard,
    ShardStream,
    StreamLoader,
    read_shard,
    resolve_shards,
)

SHAPE = (4, 2, 2)
KEYS = [["k0", "k1", "k2"], ["k3", "k4"]]  # two shards of a store with shard_size 3
FACTS = {"teacher": "synthetic", "revision": None, "weights": None, "dtype": "float32", "device": "cpu",
         "sampler": {"num_steps": 8, "guidance_scale": 0.0, "sigmas": [1.0, 0.75, 0.0], "mid_sigma": 0.75},
         "sampler_hash": "s", "versions": {}}


def _encoded(key: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    meta = {"prompt_id": key, "seed": seed, "height": 4, "width": 4, "extra": "kept"}
    image = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return encode_sample(key, f"prompt {key} ü", meta, rng.standard_normal(SHAPE), mid=rng.standard_normal(SHAPE),
                         noise=rng.standard_normal(SHAPE), image=image, image_format="png")


def _members(samples: list[dict]) -> list[tuple[str, bytes]]:
    """(member name, bytes) in the order the writer puts them (one sample's members sorted by name)."""
    return [(f"{s['__key__']}.{k}", s[k]) for s in samples for k in sorted(s) if k != "__key__"]


def _tar(members: list[tuple[str, bytes]], directory: str | None = None) -> bytes:
    """A tar of arbitrary members (and optionally a directory entry), for shards the writer cannot make."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        if directory:
            ti = tarfile.TarInfo(directory)
            ti.type = tarfile.DIRTYPE
            tf.addfile(ti)
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _write_store(url: str, shard0: bytes | None = None) -> None:
    """A two-shard store through the pipeline's own writers; ``shard0`` replaces the first shard's tar
    (committed with its own sha256 and size, so only the format can be wrong)."""
    store = Store(url)
    manifest = f"{url}.manifest.parquet"
    pq.write_table(pa.table({"prompt_id": [k for keys in KEYS for k in keys]}), manifest)
    store.put_file("manifest.parquet", manifest)
    for i, keys in enumerate(KEYS):
        tar = tar_bytes(_encoded(k, 10 * i + j) for j, k in enumerate(keys))
        if i == 0 and shard0 is not None:
            tar = shard0
        store.commit_shard(i, tar, {"samples": len(keys), "failures": [], "rows": len(keys), "fingerprint": "fp"})
    write_index(store, "fp", {"shard_size": 3, "manifest_hash": "x", "save": ["mid", "noise"], "image_format": "png"},
                len(KEYS), FACTS, 0.0, {})


# --- writing, and the real webdataset reader ---------------------------------------------------------

def test_round_trip_through_webdataset_and_the_parser(tmp_path):
    import webdataset as wds

    samples = [_encoded(k, j) for j, k in enumerate(KEYS[0])]
    tar = tar_bytes(samples)
    assert tar == tar_bytes([_encoded(k, j) for j, k in enumerate(KEYS[0])])  # deterministic bytes
    (tmp_path / "s.tar").write_bytes(tar)
    read = list(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False))
    assert [s["__key__"] for s in read] == KEYS[0]
    for ours, theirs in zip(samples, read):
        assert {k: v for k, v in theirs.items() if not k.startswith("__")} == \
            {k: v for k, v in ours.items() if k != "__key__"}
        assert set(theirs) >= {"txt", "json", "latent.npy", "mid.npy", "noise.npy", "png"}
    parsed = list(iter_samples(tar))
    assert [s.key for s in parsed] == KEYS[0]
    for s, theirs in zip(parsed, read):
        assert s.prompt == theirs["txt"].decode() and s.meta == json.loads(theirs["json"]) and s.seed == s.meta["seed"]
        for name, dtype in (("latent", np.float16), ("mid", np.float16), ("noise", np.float32)):
            array = getattr(s, name)
            assert array.dtype == dtype and array.shape == SHAPE
            assert np.array_equal(array, np.load(io.BytesIO(theirs[f"{name}.npy"]), allow_pickle=False))
        assert s.image_format == "png" and s.image == theirs["png"]
    # images in the shard decode with webdataset's own decoder
    decoded = next(iter(wds.WebDataset(str(tmp_path / "s.tar"), shardshuffle=False).decode("rgb8")))
    assert decoded["png"].shape == (4, 4, 3)


@pytest.mark.parametrize("key", ["a.b", "a/b", "", "sp ace"])
def test_writer_refuses_a_key_readers_would_split_or_refuse(key):
    with pytest.raises(ValueError, match="letters, digits"):
        encode_sample(key, "p", {"prompt_id": key, "seed": 1, "height": 4, "width": 4}, np.zeros(SHAPE))


def test_writer_refuses_a_json_readers_would_refuse():
    with pytest.raises(ValueError, match="no integer seed"):
        encode_sample("k", "p", {"prompt_id": "k", "height": 4, "width": 4}, np.zeros(SHAPE))
    with pytest.raises(ValueError, match="prompt_id is 'other', not the key"):
        encode_sample("k", "p", {"prompt_id": "other", "seed": 1, "height": 4, "width": 4}, np.zeros(SHAPE))


# --- verify and the trainer agree ---------------------------------------------------------------------

def _good() -> list[tuple[str, bytes]]:
    return _members([_encoded(k, j) for j, k in enumerate(KEYS[0])])


def _replace(members, name, data):
    return [(n, data if n == name else d) for n, d in members]


def _pickled() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return buf.getvalue()


def _npz() -> bytes:
    buf = io.BytesIO()
    np.savez(buf, latent=np.zeros(SHAPE, np.float16))
    return buf.getvalue()


def _meta(**change) -> bytes:
    return json.dumps({"prompt_id": "k1", "seed": 1, "height": 4, "width": 4, **change}).encode()


def _dotted_key():
    """A prompt_id with a dot: WebDataset would read key 'k1' with members 'x.txt', 'x.json', …"""
    return [(n.replace("k1.", "k1.x.", 1), d) for n, d in _good()]


BAD = {  # name → (shard 0's tar, the reason both readers give)
    "duplicate member": (lambda: _tar([*_good(), ("k2.latent.npy", npy_bytes(np.zeros(SHAPE, np.float16)))]),
                         "member k2.latent.npy appears twice"),
    "key with a dot": (lambda: _tar(_dotted_key()), "member 'k1.x.json': unknown suffix 'x.json'"),
    "key with a space": (lambda: _tar([(n.replace("k1", "k 1"), d) for n, d in _good()]),
                         "member 'k 1.json': not <key>.<suffix> with a valid key"),
    "pickled npy": (lambda: _tar(_replace(_good(), "k1.latent.npy", _pickled())),
                    "sample k1: latent.npy: ValueError: Object arrays cannot be loaded when allow_pickle=False"),
    "npz, not npy": (lambda: _tar(_replace(_good(), "k1.mid.npy", _npz())), "sample k1: mid.npy: ValueError"),
    "missing latent": (lambda: _tar([m for m in _good() if m[0] != "k1.latent.npy"]),
                       "sample k1 has no latent.npy member"),
    "float32 latent": (lambda: _tar(_replace(_good(), "k1.latent.npy", npy_bytes(np.zeros(SHAPE, np.float32)))),
                       "sample k1: latent.npy is float32, not float16"),
    "mid of another shape": (lambda: _tar(_replace(_good(), "k1.mid.npy", npy_bytes(np.zeros((4, 2, 3), np.float16)))),
                             r"sample k1: mid.npy has shape \(4, 2, 3\), latent.npy \(4, 2, 2\)"),
    "members not adjacent": (lambda: _tar([*_good(), ("k0.png", b"\x89PNG\r\n\x1a\n")]),
                             r"key k0 appears twice \(its members are not adjacent\)"),
    "unknown member": (lambda: _tar([*_good(), ("k2.cls", b"3")]), "member 'k2.cls': unknown suffix 'cls'"),
    "json without seed": (lambda: _tar(_replace(_good(), "k1.json", _meta(seed=None))),
                          "sample k1: json has no integer seed"),
    "json of another key": (lambda: _tar(_replace(_good(), "k1.json", _meta(prompt_id="k9"))),
                            "sample k1: json prompt_id is 'k9', not the key"),
    "prompt not utf-8": (lambda: _tar(_replace(_good(), "k1.txt", b"\xff\xfe")), "sample k1: txt: UnicodeDecodeError"),
    "not a png": (lambda: _tar(_replace(_good(), "k1.png", b"GIF89a")), "sample k1: png member is not a png image"),
    "two images": (lambda: _tar([*_good(), ("k2.webp", b"RIFF\0\0\0\0WEBP")]), "sample k2 has 2 images"),
    "directory member": (lambda: _tar(_good(), directory="k9"), "member 'k9' is not a regular file"),
    "truncated tar": (lambda: tar_bytes([_encoded(k, j) for j, k in enumerate(KEYS[0])])[:3000],
                      "not a readable tar: ReadError"),
}


def _trainer_reason(url: str) -> str | None:
    """What the trainer's shard reader says of shard 0 (None: it reads it)."""
    shards, _ = resolve_shards(url)
    try:
        read_shard(shards[0])
    except CorruptShard as e:
        return str(e)
    return None


def test_a_good_store_passes_verify_and_the_trainer_reads_every_sample(tmp_path):
    url = str(tmp_path / "store")
    _write_store(url)
    report = verify_store(url)
    assert report["ok"] and report["problems"] == [] and report["samples"] == 5
    assert _trainer_reason(url) is None
    shards, _ = resolve_shards(url)
    loader = StreamLoader(ShardStream(shards, shuffle=False), 5)
    batch = next(iter(loader))
    assert batch["key"] == [k for keys in KEYS for k in keys] and loader.corrupt_shards == 0
    assert batch["latent"].shape == (5, *SHAPE) and "mid" in batch


@pytest.mark.parametrize("case", sorted(BAD))
def test_verify_and_the_trainer_refuse_the_same_bad_shard_for_the_same_reason(tmp_path, case):
    make, reason = BAD[case]
    url = str(tmp_path / "store")
    _write_store(url, shard0=make())
    report = verify_store(url)
    assert not report["ok"]
    assert len(report["problems"]) == 1, report["problems"]  # shard 1 is good; sizes and sha256 match
    problem = report["problems"][0]
    assert problem.startswith("shards/000000.tar: ") and re.search(reason, problem), problem
    said = _trainer_reason(url)
    assert said is not None and problem == f"shards/000000.tar: {said}"  # the same words: one parser
    # in training, the shard is skipped whole and counted; the good shard is read
    shards, _ = resolve_shards(url)
    loader = StreamLoader(ShardStream(shards, shuffle=False), 2)
    assert next(iter(loader))["key"] == KEYS[1] and loader.corrupt_shards == 1


def test_iter_samples_yields_the_good_samples_before_a_problem():
    samples = [_encoded(k, j) for j, k in enumerate(KEYS[0])]
    it = iter_samples(_tar([*_members(samples[:2]), ("k2.txt", b"x")]))
    assert [next(it).key, next(it).key] == ["k0", "k1"]
    with pytest.raises(ShardFormatError, match="sample k2 has no json, latent.npy member"):
        next(it)


def test_twostep_verify_command(tmp_path):
    good, bad = str(tmp_path / "good"), str(tmp_path / "bad")
    _write_store(good)
    _write_store(bad, shard0=BAD["duplicate member"][0]())
    cmd = [sys.executable, "-m", "twostep.cli", "verify"]  # the default reads every shard of a small store
    ok = subprocess.run([*cmd, good], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and ok.stdout == "OK: 2 shards, 5 samples; read 2 of 2 shards in full\n", \
        ok.stdout + ok.stderr
    no = subprocess.run([*cmd, bad], capture_output=True, text=True, timeout=300)
    assert no.returncode == 1 and "shards/000000.tar: member k2.latent.npy appears twice" in no.stdout, no.stdout
    assert len(glob.glob(f"{bad}/shards/*.tar")) == 2  # verify changes nothing


def test_the_layout_plans_shards_names_their_files_and_reads_either_index_version():
    from twostep.pipeline import layout

    assert layout.num_shards(10, 4) == 3 and layout.num_shards(8, 4) == 2
    assert [layout.rows_of(i, 4, 10) for i in range(3)] == [range(0, 4), range(4, 8), range(8, 10)]
    assert layout.rows_of(5, 4) == range(20, 24) and layout.rows_of(3, 4, 10) == range(12, 12)
    assert layout.SHARD_TAR.format(42) == "shards/000042.tar" and layout.INDEX_PART.format(1) == "index/00001.json"
    assert layout.shard_file("shards/000042.json") == (42, "json") and layout.shard_file("shards/000042.tar") == (42, "tar")
    assert [layout.shard_file(n) for n in ("shards/42.tar", "shards/x.tar", "index/000042.json")] == [None] * 3
    assert layout.shard_pattern(42) == "shards/{000000..000041}.tar"
    head = layout.index_head(fingerprint="fp", identity={}, num_shards=3, committed=2, samples=7, teacher={},
                             seconds=1.234, parts=[0])
    assert (head["index_version"], head["status"], head["seconds"]) == (2, "in progress", 1.2)
    final = layout.index_head(fingerprint="fp", identity={}, num_shards=3, committed=2, samples=7, teacher={},
                              seconds=1.0, parts=[0], missing=[2], failed_shards={2: "why"}, failed_samples=1)
    assert (final["status"], final["missing_shards"], final["failed_shards"]) == ("incomplete", [2], {"2": "why"})
    present = np.array([True, False, True])
    part = layout.index_part(0, present, np.array([4, 0, 3], np.int32), np.array([10, 0, 9]),
                             np.zeros((3, 32), np.uint8), {2: [{"prompt_id": "k", "row": 9, "reason": "r"}]})
    entries = json.loads(part)
    assert [(e["shard"], e["url"], e["samples"], e["failures"]) for e in entries] == [
        (0, "shards/000000.tar", 4, []), (2, "shards/000002.tar", 3, [{"prompt_id": "k", "row": 9, "reason": "r"}])]
    files = {layout.INDEX: json.dumps(head).encode(), layout.INDEX_PART.format(0): part}
    assert layout.index_entries(files.__getitem__, layout.read_index(files.__getitem__)) == entries
    v1 = {"shards": entries[::-1]}  # version 1: the entries inline
    assert layout.index_entries(files.__getitem__, v1) == entries
    with pytest.raises(ValueError, match="index.json version 3"):
        layout.index_entries(files.__getitem__, {**head, "index_version": 3})
