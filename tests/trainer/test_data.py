"""The trainer's shard reader on stores in the generation job's format: split, order, exact resume,
corrupt shards, noise checks, shard specs, S3 and HTTP, and a store written by the real worker."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import logging
import os
import tarfile
import threading

import numpy as np
import pytest
import torch

from twostep.pipeline.job import write_index
from twostep.pipeline.shardformat import encode_sample, tar_bytes
from twostep.pipeline.store import Store
from twostep.teacher.core import noise_fingerprint, seed_noise
from twostep.trainer.data import ShardInfo, ShardStream, StreamLoader, resolve_shards

SIZES = [5, 4, 5, 3, 5, 4]  # 26 samples in 6 shards of uneven size
SHAPE = (4, 4, 4)  # (C, h, w) latents
FACTS = {"teacher": "synthetic", "revision": None, "weights": None, "dtype": "float32", "device": "cpu",
         "sampler": {"num_steps": 8, "guidance_scale": 0.0, "sigmas": [1.0, 0.75, 0.0], "mid_sigma": 0.75},
         "sampler_hash": "s", "versions": {}}
LOGGER = "twostep.trainer.data"


def _sample(key: str, seed: int, noise_sha: str | None = None, noise_file: bool = False) -> dict:
    """One sample's members as the worker encodes them (json with seed and the real fingerprint)."""
    noise = seed_noise(seed, SHAPE)
    meta = {"prompt_id": key, "seed": seed, "height": 8, "width": 8,
            "noise_sha256": noise_sha or noise_fingerprint(noise)}
    # noise.npy deliberately not seed_noise: proves the file is what the reader uses
    return encode_sample(key, f"a prompt for {key}", meta, (0.5 * noise + 0.1).numpy(), mid=(0.75 * noise).numpy(),
                         noise=(noise * 2 + 1).numpy() if noise_file else None)


def make_store(url: str, so: dict | None = None, sizes: list[int] = SIZES, **kw) -> list[str]:
    """Write a store (shards, stats, index.json) with the pipeline's own writers; returns all keys."""
    store, keys = Store(str(url), so), []
    for i, n in enumerate(sizes):
        samples = [_sample(f"s{i}-{j}", 100 * i + j, **kw) for j in range(n)]
        keys += [s["__key__"] for s in samples]
        store.commit_shard(i, tar_bytes(samples), {"samples": n, "failures": [], "rows": n, "fingerprint": "fp"})
    write_index(store, "fp", {"shard_size": max(sizes), "manifest_hash": "x", "save": ["mid"],
                              "image_format": "none"}, len(sizes), FACTS, 0.0, {})
    return keys


@pytest.fixture
def store(tmp_path) -> tuple[str, list[str]]:
    url = str(tmp_path / "store")
    return url, make_store(url)


def _sample_epoch(pos: dict) -> int:
    """Epoch of the sample whose position *after* it is ``pos`` (positions are normalised, so
    (e, 0, 0) follows the last sample of epoch e-1)."""
    return pos["epoch"] - 1 if (pos["index"], pos["offset"]) == (0, 0) else pos["epoch"]


def _epoch0_keys(loader: StreamLoader, cap: int = 400) -> list[str]:
    """Keys of epoch 0 from a batch_size-1 loader, attributing each batch to its logical worker via state_dict."""
    keys: list[str] = []
    for i, batch in enumerate(loader):
        st = loader.state_dict()
        w = (st["next_worker"] - 1) % len(st["workers"])
        if _sample_epoch(st["workers"][w]) == 0:
            keys += batch["key"]
        if all(x["epoch"] >= 1 for x in st["workers"]) or i > cap:
            return keys
    raise AssertionError("unreachable: the stream is endless")


def _take(loader: StreamLoader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    return out


# --- split and order ----------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size,num_workers", [(1, 1), (2, 2), (3, 1)])
def test_one_epoch_over_ranks_and_workers_has_every_key_once(store, world_size, num_workers):
    shards, _ = resolve_shards(store[0])
    seen: list[str] = []
    for rank in range(world_size):
        stream = ShardStream(shards, seed=5, rank=rank, world_size=world_size)
        seen += _epoch0_keys(StreamLoader(stream, 1, num_workers=num_workers if num_workers > 1 else 0))
    assert sorted(seen) == sorted(store[1]) and len(seen) == len(set(seen))


def test_order_depends_on_seed_and_epoch_and_repeats_for_the_same_seed(store):
    shards, _ = resolve_shards(store[0])

    def epochs(seed: int, shuffle: bool = True) -> tuple[list[str], list[str]]:
        it = ShardStream(shards, seed=seed, shuffle=shuffle).worker_samples(0, 1)
        keys = [next(it)["key"] for _ in range(2 * len(store[1]))]
        return keys[: len(store[1])], keys[len(store[1]):]

    e0, e1 = epochs(0)
    assert sorted(e0) == sorted(e1) == sorted(store[1])
    assert e0 != e1  # a new permutation each epoch
    assert epochs(0) == (e0, e1)  # same seed, same order
    assert epochs(1)[0] != e0
    assert epochs(0, shuffle=False) == (store[1], store[1])  # tar order, shard order


def test_too_many_ranks_times_workers_is_a_clear_error(store):
    shards, _ = resolve_shards(store[0])
    with pytest.raises(ValueError, match=r"6 shards .* ranks × loader workers must not exceed"):
        StreamLoader(ShardStream(shards, rank=0, world_size=3), 2, num_workers=3)


# --- resume -------------------------------------------------------------------------------------------

def _same(a: list[dict], b: list[dict]) -> None:
    assert [x["key"] for x in a] == [x["key"] for x in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and x["prompt"] == y["prompt"]
        for name in ("seed", "latent", "mid", "noise"):
            assert torch.equal(x[name], y[name]), name


@pytest.mark.parametrize("k", [3, 8, 11])
def test_resume_from_state_gives_the_uninterrupted_batches(store, k):
    """num_workers=2, batch 3: K=3 and 11 are odd (worker 1 due next); K=11 crosses into epoch 1."""
    shards, _ = resolve_shards(store[0])
    m = 6
    reference = _take(StreamLoader(ShardStream(shards, seed=3), 3, num_workers=2), k + m)
    first = StreamLoader(ShardStream(shards, seed=3), 3, num_workers=2, prefetch_factor=4)
    _same(_take(first, k), reference[:k])
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    assert state["batches"] == k and state["next_worker"] == k % 2  # prefetched batches not counted
    if k == 11:
        assert any(w["epoch"] >= 1 for w in state["workers"])
    resumed = StreamLoader(ShardStream(shards, seed=3), 3, num_workers=2)
    resumed.load_state_dict(state)
    _same(_take(resumed, m), reference[k:])
    assert resumed.state_dict()["batches"] == k + m


def test_stream_state_in_process_and_a_second_iteration_continues(store):
    shards, _ = resolve_shards(store[0])
    ref = [s["key"] for _, s in zip(range(12), ShardStream(shards, seed=9))]
    stream = ShardStream(shards, seed=9)
    assert [s["key"] for _, s in zip(range(7), stream)] == ref[:7]
    again = ShardStream(shards, seed=9)
    again.load_state_dict(stream.state_dict())
    assert [s["key"] for _, s in zip(range(5), again)] == ref[7:]
    loader = StreamLoader(ShardStream(shards, seed=9), 2)
    keys = [key for b in _take(loader, 2) for key in b["key"]] + [key for b in _take(loader, 2) for key in b["key"]]
    assert keys == ref[:8]  # iterating again continues where the first iteration stopped


def test_resume_with_other_settings_warns_and_goes_on(store, caplog):
    shards, _ = resolve_shards(store[0])
    first = StreamLoader(ShardStream(shards, seed=3), 2, num_workers=2)
    _take(first, 15)
    state = first.state_dict()
    other = StreamLoader(ShardStream(shards, seed=4), 2)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        other.load_state_dict(state)
    assert "approximately" in caplog.text and "num_workers" in caplog.text and "seed" in caplog.text
    low = min(w["epoch"] for w in state["workers"])
    assert other.state_dict()["workers"] == [{"epoch": low, "index": 0, "offset": 0, "corrupt": 0}]
    assert len(_take(other, 3)) == 3


# --- corrupt shards -----------------------------------------------------------------------------------

def _rewrite_member(path: str, name: str, data: bytes | None) -> None:
    """Replace (or with None drop) one member of a tar on disk."""
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for m, body in members:
            if m.name == name:
                if data is None:
                    continue
                m.size, body = len(data), data
            out.addfile(m, io.BytesIO(body))
    with open(path, "wb") as f:
        f.write(buf.getvalue())


@pytest.mark.parametrize("damage,reason", [("truncate", "ReadError"), ("flip", "sha256 differs"),
                                           ("bad_npy", "ValueError"), ("no_latent", "no latent.npy")])
def test_corrupt_shard_is_skipped_with_a_warning_and_counted(store, caplog, damage, reason):
    url, keys = store
    tar = f"{url}/shards/000002.tar"
    data = open(tar, "rb").read()
    if damage == "truncate":
        open(tar, "wb").write(data[: len(data) // 2 + 100])
    elif damage == "flip":
        flipped = bytearray(data)
        flipped[1500:1510] = bytes(b ^ 0xFF for b in flipped[1500:1510])
        open(tar, "wb").write(bytes(flipped))
    else:
        _rewrite_member(tar, "s2-1.latent.npy", b"not an npy file" if damage == "bad_npy" else None)
    # Only the sha256 check needs the index; the others go through a glob, which knows no sha256.
    spec = url if damage == "flip" else f"{url}/shards/*.tar"
    shards, _ = resolve_shards(spec)
    loader = StreamLoader(ShardStream(shards, seed=1), 1)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = _epoch0_keys(loader)
    assert sorted(got) == sorted(k for k in keys if not k.startswith("s2-"))
    assert loader.corrupt_shards == 1 and loader.state_dict()["workers"][0]["corrupt"] == 1
    assert tar in caplog.text and reason in caplog.text
    if damage == "flip":  # the count also travels back from loader worker processes
        two = StreamLoader(ShardStream(shards, seed=1, world_size=1), 1, num_workers=2)
        assert sorted(_epoch0_keys(two)) == sorted(got) and two.corrupt_shards >= 1


# --- noise --------------------------------------------------------------------------------------------

def test_noise_is_regenerated_from_the_seed(store):
    shards, _ = resolve_shards(store[0])
    for batch in _take(StreamLoader(ShardStream(shards), 4), 4):
        assert batch["latent"].dtype == torch.float32 and batch["latent"].shape == (4, *SHAPE)
        assert "mid" in batch and batch["seed"].dtype == torch.long
        for seed, noise in zip(batch["seed"].tolist(), batch["noise"]):
            assert torch.equal(noise, seed_noise(seed, SHAPE))


def test_a_noise_fingerprint_mismatch_raises_naming_the_key(tmp_path):
    url = str(tmp_path / "store")
    make_store(url, sizes=[2, 2], noise_sha="0" * 64)
    shards, _ = resolve_shards(url)
    with pytest.raises(RuntimeError, match=r"sample s\d-\d: the noise regenerated.*--save noise"):
        next(iter(StreamLoader(ShardStream(shards), 1)))


def test_noise_file_is_used_when_present_and_mid_can_be_left_out(tmp_path):
    url = str(tmp_path / "store")
    make_store(url, sizes=[3, 3], noise_file=True)
    shards, _ = resolve_shards(url)
    batch = next(iter(StreamLoader(ShardStream(shards, load_mid=False), 3)))
    assert "mid" not in batch
    for seed, noise in zip(batch["seed"].tolist(), batch["noise"]):
        assert torch.equal(noise, seed_noise(seed, SHAPE) * 2 + 1)


# --- shard specs --------------------------------------------------------------------------------------

def test_resolve_shards_specs(store):
    url, _ = store
    shards, index = resolve_shards(url + "/")
    tars = [f"{url}/shards/{i:06d}.tar" for i in range(6)]
    assert [s.url for s in shards] == tars and index["samples"] == sum(SIZES)
    assert shards[2] == ShardInfo(tars[2], 5, hashlib.sha256(open(tars[2], "rb").read()).hexdigest())
    assert resolve_shards(f"{url}/index.json")[0] == shards
    assert resolve_shards(f"{tars[0]}, {tars[3]}") == ([ShardInfo(tars[0]), ShardInfo(tars[3])], {})
    assert resolve_shards([tars[1], tars[4]])[0] == [ShardInfo(tars[1]), ShardInfo(tars[4])]
    assert [s.url for s in resolve_shards(f"{url}/shards/{{000000..000005}}.tar")[0]] == tars
    assert [s.url for s in resolve_shards(f"{url}/shards/{{000001,000004}}.tar,{tars[0]}")[0]] == \
        [tars[1], tars[4], tars[0]]
    assert [s.url for s in resolve_shards(f"{url}/shards/*.tar")[0]] == tars
    for bad in (f"{url}/nothing-here", f"{url}/shards/*.tgz", f"{url}/shards/{{000007..000009}}.tar"):
        with pytest.raises(FileNotFoundError, match="no shards") as e:
            resolve_shards(bad)
        assert bad in str(e.value)


# --- remote stores ------------------------------------------------------------------------------------

def test_read_a_store_on_s3(s3_server):
    url = "s3://twostep-test/stores/syn"
    keys = make_store(url, s3_server, sizes=[3, 2, 3])
    shards, index = resolve_shards(url, s3_server)
    assert shards[0].url == f"{url}/shards/000000.tar" and index["samples"] == 8
    assert [s.url for s in resolve_shards(f"{url}/shards/*.tar", s3_server)[0]] == [s.url for s in shards]
    loader = StreamLoader(ShardStream(shards, storage_options=s3_server), 1)
    assert sorted(_epoch0_keys(loader)) == sorted(keys) and loader.corrupt_shards == 0


def test_read_a_store_over_http(tmp_path):
    keys = make_store(str(tmp_path / "store"), sizes=[3, 2, 3])

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/store"
        shards, _ = resolve_shards(url)
        assert shards[1].url == f"{url}/shards/000001.tar" and shards[1].sha256
        assert sorted(_epoch0_keys(StreamLoader(ShardStream(shards), 1))) == sorted(keys)
    finally:
        server.shutdown()
        server.server_close()


# --- a store from the real generation worker ----------------------------------------------------------

def test_store_written_by_the_generation_worker(tmp_path, tiny_pipeline_dir):
    from twostep.pipeline.worker import ShardWorker, WorkerConfig
    from twostep.toy.world import build_toy_manifest

    build_toy_manifest(8, tmp_path / "m.parquet", height=32, width=32)  # small: fast on CPU
    url = str(tmp_path / "store")
    worker = ShardWorker(WorkerConfig(store_url=url, manifest=str(tmp_path / "m.parquet"), teacher=tiny_pipeline_dir,
                                      shard_size=4, batch_size=4, image_format="none"))
    for shard in (0, 1):
        worker.run(shard, "fp")
    write_index(worker.store, "fp", {"shard_size": 4, "manifest_hash": "x", "save": ["mid"], "image_format": "none"},
                2, worker.describe(), 1.0, {})
    stored = {}  # key → (json, latent) straight from the tars
    for name in sorted(os.listdir(f"{url}/shards")):
        if name.endswith(".tar"):
            with tarfile.open(f"{url}/shards/{name}") as tf:
                for m in tf:
                    key, _, suffix = m.name.partition(".")
                    stored.setdefault(key, {})[suffix] = tf.extractfile(m).read()
    shards, index = resolve_shards(url)
    assert len(shards) == 2 and index["samples"] == 8
    batches = _take(StreamLoader(ShardStream(shards, seed=0), 2, num_workers=2), 4)
    assert sorted(k for b in batches for k in b["key"]) == sorted(stored)
    for b in batches:
        for i, key in enumerate(b["key"]):
            latent = np.load(io.BytesIO(stored[key]["latent.npy"]))
            assert b["latent"].shape[1:] == latent.shape and latent.ndim == 3 and "mid" in b
            assert torch.equal(b["latent"][i], torch.from_numpy(latent.astype(np.float32)))
            assert noise_fingerprint(b["noise"][i]) == json.loads(stored[key]["json"])["noise_sha256"]
