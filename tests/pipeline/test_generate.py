"""Teacher generation on a real local Ray cluster: store format, real readers, resume, faults, S3."""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from twostep.pipeline.job import GenerateConfig, run_generation
from twostep.pipeline.store import Store, StoreError
from twostep.pipeline.verify import verify_store
from twostep.pipeline.worker import ShardWorker
from twostep.toy.world import build_toy_manifest

ROWS, SHARD = 20, 8  # 3 shards: 8 + 8 + 4


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "toy.parquet"
    build_toy_manifest(ROWS, path, seed=11)
    return str(path)


def _cfg(manifest, out, **kw):
    return GenerateConfig(manifest=manifest, out=str(out), shard_size=SHARD, batch_size=4,
                          num_workers=kw.pop("num_workers", 2), **kw)


def _arrays(out) -> dict[str, bytes]:
    """key.member → bytes of every array and text member (the json holds timings, so it differs)."""
    import webdataset as wds

    urls = sorted(glob.glob(f"{out}/shards/*.tar"))
    return {f"{s['__key__']}.{k}": v for s in wds.WebDataset(urls, shardshuffle=False)
            for k, v in s.items() if k.endswith(".npy") or k in ("txt", "webp")}


@pytest.fixture(scope="module")
def clean_store(ray_cluster, manifest, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "store"
    index = run_generation(_cfg(manifest, out, save=("mid", "noise")))
    return out, index


def test_clean_run_writes_the_documented_store(clean_store, manifest):
    out, index = clean_store
    assert index["status"] == "complete" and index["samples"] == ROWS and index["committed_shards"] == 3
    assert [e["shard"] for e in Store(str(out)).index_entries(index)] == [0, 1, 2]
    for rel in ("index.json", "manifest.parquet", "failed.parquet", "README.md", "shards/000002.json"):
        assert os.path.exists(f"{out}/{rel}"), rel
    assert not os.path.exists(f"{out}/lease.json")
    assert pq.read_table(f"{out}/failed.parquet").num_rows == 0
    stats = json.load(open(f"{out}/shards/000002.json"))
    assert stats["samples"] == 4 and stats["failures"] == [] and stats["worker"]
    first_two = {json.load(open(f"{out}/shards/00000{i}.json"))["worker"] for i in (0, 1)}
    assert len(first_two) == 2  # the first shards go to different workers
    assert verify_store(str(out))["ok"]


def test_real_readers(clean_store, manifest, toy_latent_shape):
    import datasets
    import ray.data
    import webdataset as wds

    out, _ = clean_store
    ids = pq.read_table(manifest).column("prompt_id").to_pylist()
    urls = sorted(glob.glob(f"{out}/shards/*.tar"))
    got = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in got] == ids
    s0 = got[0]
    latent = np.load(io.BytesIO(s0["latent.npy"]), allow_pickle=False)
    mid = np.load(io.BytesIO(s0["mid.npy"]), allow_pickle=False)
    noise = np.load(io.BytesIO(s0["noise.npy"]), allow_pickle=False)
    assert latent.dtype == mid.dtype == np.float16 and noise.dtype == np.float32
    assert latent.shape == mid.shape == toy_latent_shape
    meta = json.loads(s0["json"])
    assert meta["prompt_id"] == ids[0] and meta["sampler"]["num_steps"] == 8 and meta["sampler_hash"]
    assert set(s0) >= {"txt", "json", "latent.npy", "mid.npy", "noise.npy", "webp"}
    hf = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train")
    assert hf.num_rows == ROWS and hf[0]["webp"].size == (64, 64)
    rd = ray.data.read_webdataset(urls).take_all()
    assert sorted(r["__key__"] for r in rd) == sorted(ids)


def test_rerun_is_idempotent_and_refuses_other_settings(clean_store, manifest, ray_cluster):
    out, _ = clean_store
    before = {p: os.path.getmtime(p) for p in glob.glob(f"{out}/shards/*")}
    index = run_generation(_cfg(manifest, out, save=("mid", "noise")))
    assert index["status"] == "complete"
    assert {p: os.path.getmtime(p) for p in glob.glob(f"{out}/shards/*")} == before  # nothing redone
    with pytest.raises(StoreError, match="image_format"):
        run_generation(_cfg(manifest, out, save=("mid", "noise"), image_format="png"))


def test_lease_refuses_a_second_driver(clean_store, manifest):
    out, _ = clean_store
    Store(str(out)).acquire_lease("someone-else")
    try:
        with pytest.raises(StoreError, match="being written by someone-else"):
            run_generation(_cfg(manifest, out, save=("mid", "noise")))
    finally:
        Store(str(out)).release_lease("someone-else")


def _crash_once_worker(marker) -> type[ShardWorker]:
    """A ShardWorker whose process exits once, the first time a batch is generated (a preempted or
    OOM-killed worker, mid-shard: the shard has more batches). The first actor to create ``marker``
    dies; the others and the replacements run normally. Defined inside a function, so Ray ships the
    class to its worker processes by value (cloudpickle), not as a test module they cannot import."""

    class CrashOnce(ShardWorker):
        def _generate(self, rows, idx, default):
            yield from super()._generate(rows, idx, default)
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os._exit(17)

    return CrashOnce


def test_worker_killed_mid_shard(ray_cluster, manifest, clean_store, tmp_path, caplog):
    """A worker process dies mid-shard: it is replaced, the shard requeued, and the store equals a
    clean run's (same keys, same latent, mid, noise and image bytes)."""
    marker = tmp_path / "crashed"
    with caplog.at_level(logging.WARNING, logger="twostep.generate"):
        index = run_generation(_cfg(manifest, tmp_path / "store", save=("mid", "noise")),
                               worker_cls=_crash_once_worker(marker))
    dead = int(marker.read_text())  # the crash happened, in this process
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    assert "died on shard" in caplog.text and "replacing it" in caplog.text
    workers = {json.load(open(p))["worker"] for p in glob.glob(f"{tmp_path}/store/shards/*.json")}
    assert not any(w.endswith(f":{dead}") for w in workers)  # its shard was redone elsewhere
    assert index["status"] == "complete" and index["samples"] == ROWS
    assert verify_store(str(tmp_path / "store"))["ok"]
    assert _arrays(tmp_path / "store") == _arrays(clean_store[0])


def test_a_teacher_that_cannot_load_ends_the_job(ray_cluster, manifest, tmp_path):
    # a teacher folder that cannot load: the job must end with the reason, not hang
    with pytest.raises(Exception, match="model_index.json|not a diffusers pipeline"):
        run_generation(_cfg(manifest, tmp_path / "store", teacher=str(tmp_path), max_shard_retries=1))


def _failing_shard_worker(shard: int, log_path) -> type[ShardWorker]:
    """A ShardWorker whose task for ``shard`` always raises; every attempt appends a line to ``log_path``."""

    class FailsOneShard(ShardWorker):
        def run(self, i: int, fingerprint: str, **kw) -> dict:
            if i != shard:
                return super().run(i, fingerprint, **kw)
            with open(log_path, "a") as f:
                f.write(f"{i}\n")
            raise RuntimeError(f"shard {i} fails (injected)")

    return FailsOneShard


def test_failing_shard_is_retried_then_recorded_and_a_rerun_completes_it(ray_cluster, manifest, clean_store,
                                                                         tmp_path):
    out, attempts = tmp_path / "store", tmp_path / "attempts"
    index = run_generation(_cfg(manifest, out, save=("mid", "noise"), max_shard_retries=1),
                           worker_cls=_failing_shard_worker(1, attempts))
    assert attempts.read_text().split() == ["1", "1"]  # the first try and one retry
    assert index["status"] == "incomplete" and index["missing_shards"] == [1]
    assert list(index["failed_shards"]) == ["1"] and "fails (injected)" in index["failed_shards"]["1"]
    assert index["samples"] == ROWS - SHARD and not os.path.exists(out / "shards" / "000001.json")
    assert not verify_store(str(out))["ok"]
    before = {p: os.path.getmtime(p) for p in glob.glob(f"{out}/shards/*")}
    index = run_generation(_cfg(manifest, out, save=("mid", "noise")))
    assert index["status"] == "complete" and index["samples"] == ROWS
    assert {p: os.path.getmtime(p) for p in before} == before  # the rerun did only the failed shard
    assert _arrays(out) == _arrays(clean_store[0]) and verify_store(str(out))["ok"]


def test_killed_driver_then_rerun_equals_clean_run(manifest, clean_store, tmp_path):
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "twostep.cli", "generate", "--manifest", manifest, "--out", str(out),
           "--shard-size", str(SHARD), "--batch-size", "4", "--num-workers", "2", "--save", "mid,noise"]  # same threads as the clean run
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    while not glob.glob(f"{out}/shards/*.json") and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # driver and its local cluster, mid-job
    proc.wait(timeout=60)
    assert glob.glob(f"{out}/shards/*.json"), "no shard committed before the kill"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _arrays(out) == _arrays(clean_store[0])
    assert verify_store(str(out))["ok"]


def test_verify_reports_corruption(clean_store, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(clean_store[0], copy)
    with open(copy / "shards" / "000001.tar", "r+b") as f:
        f.seek(700)
        f.write(b"corrupt!")
    with open(copy / "shards" / "000000.tar", "r+b") as f:
        f.truncate(3000)
    os.remove(copy / "shards" / "000002.tar")
    report = verify_store(str(copy))
    assert not report["ok"]
    assert any("000000.tar: 3000 bytes, index says" in p for p in report["problems"])
    assert any("000001.tar: sha256 differs" in p for p in report["problems"])
    assert any("000002.tar: missing" in p for p in report["problems"])


def _flip_a_byte(tar_path) -> str:
    """Flip one byte in the middle of a member's data (the first sample's latent array), keeping the
    size: a same-size corruption that the listing cannot see. Returns the member's name."""
    import tarfile

    with tarfile.open(tar_path) as tf:
        member = next(m for m in tf.getmembers() if m.name.endswith(".latent.npy"))
    with open(tar_path, "r+b") as f:
        f.seek(member.offset_data + member.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x40]))
    return member.name


def _twostep(capsys, *argv) -> tuple[int, str]:
    from twostep.cli import main

    levels = [(lg, lg.level) for lg in (logging.getLogger(), logging.getLogger("twostep"))]
    try:
        code = main(list(argv))
    finally:
        for lg, level in levels:  # main sets them; put them back for the tests that follow
            lg.setLevel(level)
    out = capsys.readouterr()
    return code, out.out + out.err


def test_twostep_verify_reads_every_shard_of_a_small_store_by_default(clean_store, tmp_path, capsys):
    """The default check reads the shards' bytes (every shard of a store under the bound): one flipped
    byte inside a shard fails the command and names the shard; the listing alone (--fast) cannot see it."""
    import shutil

    code, out = _twostep(capsys, "verify", str(clean_store[0]))
    assert code == 0 and out.startswith(f"OK: 3 shards, {ROWS} samples; read 3 of 3 shards in full\n"), out
    code, out = _twostep(capsys, "verify", str(clean_store[0]), "--json")
    report = json.loads(out)
    assert code == 0 and (report["mode"], report["checked"], report["checked_of"]) == ("sample", 3, 3)

    copy = tmp_path / "copy"
    shutil.copytree(clean_store[0], copy)
    size = os.path.getsize(copy / "shards" / "000001.tar")
    _flip_a_byte(copy / "shards" / "000001.tar")
    assert os.path.getsize(copy / "shards" / "000001.tar") == size
    code, out = _twostep(capsys, "verify", str(copy))
    assert code == 1, out
    assert out.splitlines()[:2] == [f"PROBLEMS: 3 shards, {ROWS} samples; read 3 of 3 shards in full",
                                    "  shards/000001.tar: sha256 differs from index.json (corrupt or replaced)"], out
    code, out = _twostep(capsys, "verify", str(copy), "--full")
    assert code == 1 and "shards/000001.tar: sha256 differs" in out, out
    code, out = _twostep(capsys, "verify", str(copy), "--fast")  # reads no shard: the same size passes
    assert code == 0 and out == f"OK: 3 shards, {ROWS} samples; read 0 of 3 shards (fast check: the listing only)\n"


def test_verify_regenerate(clean_store):
    report = verify_store(str(clean_store[0]), regenerate=2, device="cpu")
    r = report["regenerate"]
    assert report["ok"] and len(r["samples"]) == 2 and r["sampler_hash_matches"]
    assert all(s["noise_matches"] for s in r["samples"]) and r["max_abs_diff"] < 1e-2


def test_bucket_store_on_s3_protocol_server(ray_cluster, manifest, s3_server, clean_store):
    url = "s3://twostep-test/stores/toy"
    index = run_generation(_cfg(manifest, url, save=("mid", "noise"), storage_options=s3_server))
    assert index["status"] == "complete" and index["samples"] == ROWS
    report = verify_store(url, s3_server)
    assert report["ok"] and report["samples"] == ROWS, report["problems"]
    store = Store(url, s3_server)
    assert store.exists("shards/000002.json") and store.exists("README.md") and not store.exists("lease.json")
    local = Store(str(clean_store[0]))
    local_entries = local.index_entries(local.read_json("index.json"))
    entries = store.index_entries(index)
    assert [s["sha256"] for s in entries] and [s["shard"] for s in entries] == [s["shard"] for s in local_entries]


def test_store_of_another_manifest_is_refused(ray_cluster, clean_store, tmp_path):
    other = tmp_path / "other.parquet"
    build_toy_manifest(ROWS, other, seed=99)
    with pytest.raises(StoreError, match="holds another manifest"):
        run_generation(_cfg(str(other), clean_store[0], save=("mid", "noise")))


def test_tiny_zimage_pipeline_through_the_job(ray_cluster, tiny_pipeline_dir, tmp_path):
    """The real Z-Image code path: byte-level tokenizer, 16-channel latents, 32×32 images."""
    build_toy_manifest(6, tmp_path / "m.parquet", seed=4, height=32, width=32)
    index = run_generation(GenerateConfig(manifest=str(tmp_path / "m.parquet"), out=str(tmp_path / "store"),
                                          teacher=tiny_pipeline_dir, shard_size=4, batch_size=2, num_workers=1,
                                          image_format="png"))
    assert index["status"] == "complete" and index["samples"] == 6
    assert index["teacher"]["sampler"]["num_steps"] == 8
    report = verify_store(str(tmp_path / "store"), regenerate=1, device="cpu")
    assert report["ok"] and report["regenerate"]["samples"][0]["noise_matches"]


def test_more_workers_than_cpus_fails_at_once(ray_cluster, manifest, tmp_path):
    with pytest.raises(ValueError, match="--num-workers 3 needs at least as many CPUs"):
        run_generation(_cfg(manifest, tmp_path / "store", num_workers=3))
    assert not os.path.exists(tmp_path / "store" / "lease.json")  # released on the way out


def test_a_driver_whose_lease_was_taken_stops(tmp_path):
    from twostep.pipeline.job import _LeaseKeeper

    store = Store(str(tmp_path / "store"))
    store.acquire_lease("me:1:a")
    keeper = _LeaseKeeper(store, "me:1:a", every=0.05)
    try:
        keeper.check()  # still ours
        store.put_json("lease.json", {"owner": "other:2:b", "expires": time.time() + 300})
        time.sleep(0.3)
        with pytest.raises(StoreError, match="the lease was taken by other:2:b"):
            keeper.check()
    finally:
        keeper.stop()
