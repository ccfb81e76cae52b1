"""Generation at fleet scale: start-up from one listing plus the index (requests counted on the S3-protocol
server itself), a store committed by a killed driver, foreign files in the listing, the index written at
intervals, and workers that read only their shard's manifest rows."""

from __future__ import annotations

import json
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twostep.pipeline.job import GenerateConfig, fingerprint, run_generation
from twostep.pipeline.layout import SHARD_STATS, SHARD_TAR
from twostep.pipeline.shardformat import encode_sample, tar_bytes
from twostep.pipeline.store import Store
from twostep.pipeline.worker import ShardWorker, read_rows
from twostep.prompts.manifest import read_meta
from twostep.toy.world import build_toy_manifest

SHARDS = 200  # shards of one sample: enough for listing pagination to matter, quick to write


def _sample(key: str, seed: int) -> dict:
    meta = {"prompt_id": key, "seed": seed, "height": 8, "width": 8}
    return encode_sample(key, f"prompt {key}", meta, np.full((4, 1, 1), seed % 7, np.float16))


def _commit_all(store: Store, keys: list[str], fp: str, shards) -> dict[int, dict]:
    """Commit one-sample shards with the store API, 16 at a time; returns shard → stats."""
    def one(i):
        return store.commit_shard(i, tar_bytes([_sample(keys[i], i)]),
                                  {"samples": 1, "failures": [], "rows": 1, "fingerprint": fp})

    with ThreadPoolExecutor(16) as pool:
        return dict(zip(shards, pool.map(one, shards)))


def _index(fp: str, stats: dict[int, dict]) -> dict:
    from twostep.pipeline.layout import INDEX_ENTRY

    return {"fingerprint": fp, "shards": [{k: s[k] for k in INDEX_ENTRY} for _, s in sorted(stats.items())]}


# --- start-up from one listing (no Ray) ------------------------------------------------------------

def test_committed_shards_from_one_listing_and_the_index(counted_s3):
    """A complete index: one LIST request, whatever the shard count. Shards committed after the
    index was written (a driver that died): one GET of each one's stats, nothing else."""
    opts, log = counted_s3
    store = Store("s3://twostep-test/scale/listing", opts)
    keys = [f"k{i}" for i in range(SHARDS)]
    stats = _commit_all(store, keys, "fp", range(SHARDS))
    log.take()
    found = store.committed_shards("fp", _index("fp", stats))
    requests = log.take()
    assert sorted(found) == list(range(SHARDS))
    assert [m for m, _, _ in requests] == ["GET"] and "list-type=2" in requests[0][2]
    # the index of a driver killed after 150 commits: the other 50 stats files are read, once each
    found = store.committed_shards("fp", _index("fp", {i: stats[i] for i in range(150)}))
    requests = log.take()
    assert sorted(found) == list(range(SHARDS))
    assert {k: found[i][k] for i in (7, 170) for k in ("sha256", "bytes")} == \
        {k: stats[i][k] for i in (7, 170) for k in ("sha256", "bytes")}
    stats_reads = sorted(p for m, p, _ in requests if p.endswith(".json"))
    assert stats_reads == [f"/twostep-test/scale/listing/{SHARD_STATS.format(i)}" for i in range(150, SHARDS)]
    assert len(requests) == 1 + 50
    # no index at all, or one of other settings: every listed stats file is read
    assert sorted(store.committed_shards("fp", None)) == list(range(SHARDS))
    assert store.committed_shards("other", _index("fp", stats)) == {}


def test_listing_with_foreign_files(tmp_path):
    """Junk names, a tar without stats, stats without a tar, a temporary file, a sub-folder, a
    non-canonical name, stats of other settings, a truncated tar and a stats file that is not JSON:
    only the good shards count."""
    store = Store(str(tmp_path / "store"))
    keys = [f"k{i}" for i in range(12)]
    stats = _commit_all(store, keys, "fp", range(4))
    _commit_all(store, keys, "other-settings", [4])
    _commit_all(store, keys, "fp", [5, 6])
    store.put_bytes(SHARD_STATS.format(5), b"{not json")
    tar6 = tmp_path / "store" / SHARD_TAR.format(6)
    tar6.write_bytes(tar6.read_bytes()[:-512])  # truncated after its commit
    store.put_bytes(SHARD_TAR.format(7), tar_bytes([_sample("k7", 7)]))  # tar without its marker
    store.put_json(SHARD_STATS.format(8), {**stats[0], "shard": 8, "url": SHARD_TAR.format(8)})  # marker, no tar
    for junk in ("shards/notes.txt", "shards/.000009.tar.1f2e.tmp", "shards/9.tar", "shards/9.json",
                 "shards/sub/000010.tar", "shards/sub/000010.json", "shards/000011.tar.json", "shards/000011"):
        store.put_bytes(junk, b"x")
    listing = store.list_shards()
    assert set(listing) == set(range(9))
    found = store.committed_shards("fp", _index("fp", stats))
    assert sorted(found) == [0, 1, 2, 3]
    assert store.committed_shards("fp", None).keys() == found.keys()
    # an index entry whose tar has another size in the listing is not trusted
    entry = _index("fp", stats)
    entry["shards"][2]["bytes"] += 1
    assert sorted(store.committed_shards("fp", entry)) == [0, 1, 2, 3]  # re-read from its stats


# --- the real job on the S3-protocol server ----------------------------------------------------------

def _toy_fingerprint(cfg: GenerateConfig) -> str:
    from twostep.teacher.core import Teacher

    facts = Teacher.load("toy", device="cpu").describe()
    return fingerprint(read_meta(cfg.manifest)[0], cfg, facts)[0]


def test_killed_driver_store_then_no_op_rerun_on_s3(ray_cluster, counted_s3, tmp_path):
    """A store whose shards were all committed by a driver that died before writing any index: the
    rerun reads each stats file once and generates nothing. The rerun after it, on a complete store,
    makes a few requests that do not depend on the number of shards: no per-shard request at all."""
    opts, log = counted_s3
    build_toy_manifest(SHARDS, tmp_path / "m.parquet", seed=5)
    url = "s3://twostep-test/scale/noop"
    cfg = GenerateConfig(manifest=str(tmp_path / "m.parquet"), out=url, shard_size=1, num_workers=1,
                         image_format="none", save=(), storage_options=opts)
    keys = pq.read_table(cfg.manifest).column("prompt_id").to_pylist()
    store = Store(url, opts)
    store.put_file("manifest.parquet", cfg.manifest)
    stats = _commit_all(store, keys, _toy_fingerprint(cfg), range(SHARDS))
    log.take()

    index = run_generation(cfg)
    first = log.take()
    entries = store.index_entries(index)
    assert index["status"] == "complete" and index["samples"] == SHARDS and len(entries) == SHARDS
    assert [s["sha256"] for s in entries] == [stats[i]["sha256"] for i in range(SHARDS)]
    assert not [p for m, p, _ in first if m == "PUT" and "/shards/" in p]  # nothing regenerated
    assert sum(1 for m, p, _ in first if m == "GET" and p.endswith(".json") and "/shards/" in p) == SHARDS

    index = run_generation(cfg)
    second = log.take()
    assert index["status"] == "complete" and index["samples"] == SHARDS
    assert not [p for _, p, _ in second if "/shards/" in p]  # one LIST of the prefix, no per-shard request
    assert len(second) <= 25, second
    print(f"no-op rerun of {SHARDS} shards: {len(second)} requests: {sorted(set((m, p) for m, p, _ in second))}")


def _index_peeking_worker(shard: int, out_path: str) -> type[ShardWorker]:
    """A ShardWorker that, when it starts ``shard``, copies the store's index (its head with the
    entries its parts hold) to ``out_path``. Index writes run on the driver's background thread, so
    it waits (10 s at most) for one that lists a shard."""

    class Peeks(ShardWorker):
        def run(self, i: int, fp: str, **kw) -> dict:
            if i == shard:
                for _ in range(100):
                    head = self.store.read_json("index.json")
                    entries = self.store.index_entries(head) if head else []
                    if entries:
                        break
                    time.sleep(0.1)
                with open(out_path, "w") as f:
                    json.dump({**head, "shards": entries}, f)
            return super().run(i, fp, **kw)

    return Peeks


def test_index_is_written_while_the_job_runs(ray_cluster, tmp_path):
    """One worker (two slots): shards 0 and 1 start at once, shard 2 when the first of them is committed
    (either may finish first). With ``index_every_shards=1`` the index the task of shard 2 finds
    already lists that shard, as the final index has it."""
    build_toy_manifest(6, tmp_path / "m.parquet", seed=3)
    out, peek = tmp_path / "store", tmp_path / "peek.json"
    cfg = GenerateConfig(manifest=str(tmp_path / "m.parquet"), out=str(out), shard_size=2, batch_size=2,
                         num_workers=1, image_format="none", save=(), index_every_shards=1)
    final = run_generation(cfg, worker_cls=_index_peeking_worker(2, str(peek)))
    mid = json.loads(peek.read_text())
    assert mid["status"] == "in progress" and mid["fingerprint"] == final["fingerprint"]
    listed = [s["shard"] for s in mid["shards"]]
    assert listed in ([0], [1], [0, 1])
    final_entries = Store(str(out)).index_entries(final)
    assert all(s == final_entries[s["shard"]] for s in mid["shards"])
    assert final["status"] == "complete" and [s["shard"] for s in final_entries] == [0, 1, 2]


def test_index_writes_stretch_as_the_store_grows(tmp_path):
    """With 1,000 shards committed, a write waits for a twentieth of the total (52 new: 1,052 / 20),
    not index_every_shards (10); the time rule waits at least 100 times the last write's duration;
    the index is compact JSON."""
    from twostep.pipeline.job import _IndexWriter

    store = Store(str(tmp_path / "store"))
    entry = {"url": "shards/000000.tar", "samples": 1, "sha256": "0" * 64, "bytes": 10, "failures": []}
    stats = {i: {**entry, "shard": i} for i in range(1000)}
    cfg = GenerateConfig(manifest="m.parquet", out=str(tmp_path), index_every_shards=10, index_every_s=3600)
    writer = _IndexWriter(store, "fp", {}, 2000, {}, stats, cfg)
    for i in range(1000, 1051):
        writer.add({**entry, "shard": i})
        writer.maybe_write(1.0)
    assert not store.exists("index.json")
    writer.add({**entry, "shard": 1051})
    writer.maybe_write(1.0)
    writer.flush()
    raw = store.read_bytes("index.json")
    assert b"\n" not in raw and len(store.index_entries(json.loads(raw))) == 1052
    assert writer.took > 0
    writer.every_s, writer.took, writer.last = 1e-9, 10.0, writer.last - 500  # 500 s since: < 100 x 10 s
    writer.add({**entry, "shard": 1052})
    writer.maybe_write(1.0)
    writer.flush()
    assert len(store.index_entries(store.read_json("index.json"))) == 1052
    writer.last -= 600  # now 1,100 s since the last write
    writer.maybe_write(1.0)
    writer.flush()
    assert len(store.index_entries(store.read_json("index.json"))) == 1053


# --- workers read only their rows --------------------------------------------------------------------

def test_read_rows_across_row_group_boundaries(tmp_path):
    n = 100
    table = pa.table({"prompt_id": [f"p{i}" for i in range(n)], "seed": list(range(n))})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=7)
    pf = pq.ParquetFile(tmp_path / "m.parquet")
    read: list[int] = []
    real = pf.read_row_groups
    pf.read_row_groups = lambda groups, *a, **kw: (read.extend(groups), real(groups, *a, **kw))[1]
    for size in (1, 5, 7, 9, 30):
        for start in range(0, n, size):
            read.clear()
            got = read_rows(pf, start, size)
            assert got.to_pylist() == table.slice(start, size).to_pylist(), (start, size)
            assert read == list(range(start // 7, (min(start + size, n) - 1) // 7 + 1))  # only those groups
    assert read_rows(pf, n, 5).num_rows == 0


_PEAK = """
import json, os, sys
import pyarrow as pa, pyarrow.parquet as pq
from twostep.pipeline.worker import ShardWorker, WorkerConfig

pools = []  # kept alive: what was allocated from a pool must not outlive it

def peak(fn):
    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    pools.append(pool)
    pa.set_memory_pool(pool)
    out = fn()
    return pool.max_memory(), out

w = ShardWorker.__new__(ShardWorker)  # the row reading alone, without a teacher
w.cfg, w._manifest = WorkerConfig(store_url="unused", manifest=sys.argv[1], shard_size=300), None
worker, rows = peak(lambda: w.rows(1693))
whole, table = peak(lambda: pq.read_table(sys.argv[1]))
print(json.dumps({"worker": worker, "whole": whole, "rows": rows, "want": table.slice(1693 * 300, 300).to_pylist()}))
sys.stdout.flush()
os._exit(0)  # tables allocated from the proxy pools must not outlive them at interpreter exit
"""


def test_worker_rows_read_a_small_part_of_a_million_row_manifest(tmp_path):
    """A worker's rows of one shard from a 1,000,000-row manifest in row groups of 8,192 (as
    ``twostep prompts`` writes them): the peak Arrow memory of reading them is a few MB, against
    over 50 MB to read the manifest. Shard 1693 of 300 rows crosses the boundary at row 507,904."""
    import subprocess
    import sys

    n = 1_000_000
    pq.write_table(pa.table({"prompt_id": [f"p{i:07d}" for i in range(n)],
                             "prompt": [f"a photo of thing number {i}, with some words about it" for i in range(n)],
                             "seed": pa.array(range(n), pa.int64())}),
                   tmp_path / "m.parquet", row_group_size=8192)
    done = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "m.parquet")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads(done.stdout)
    assert r["rows"] == r["want"] and len(r["rows"]) == 300 and r["rows"][0]["prompt_id"] == "p0507900"
    assert r["whole"] > 50e6 and r["worker"] < 8e6, (r["worker"], r["whole"])
    print(f"peak Arrow memory: one shard's rows {r['worker'] / 1e6:.1f} MB, the manifest {r['whole'] / 1e6:.1f} MB")


# --- verify: fast from the listing, full in parallel ---------------------------------------------------

FACTS = {"teacher": "synthetic", "revision": None, "weights": None, "dtype": "float32", "device": "cpu",
         "sampler": {"num_steps": 8, "guidance_scale": 0.0, "sigmas": [1.0, 0.0], "mid_sigma": 0.75},
         "sampler_hash": "s", "versions": {}}


def _verified_store(url: str, shards: int, opts: dict | None = None, *, shard_size: int = 1,
                    row_group_size: int | None = None) -> Store:
    """A complete store written with the store API, its manifest and index: one-sample shards, or
    ``shard_size`` samples a shard with the manifest in row groups of ``row_group_size`` rows."""
    from twostep.pipeline.job import write_index

    store = Store(url, opts)
    keys = [f"k{i}" for i in range(shards * shard_size)]
    manifest = pa.BufferOutputStream()
    pq.write_table(pa.table({"prompt_id": keys, "prompt": [f"prompt {k}" for k in keys]}), manifest,
                   row_group_size=row_group_size)
    store.put_bytes("manifest.parquet", manifest.getvalue().to_pybytes())
    if shard_size == 1:
        _commit_all(store, keys, "fp", range(shards))
    else:
        for i in range(shards):
            rows = range(i * shard_size, (i + 1) * shard_size)
            store.commit_shard(i, tar_bytes([_sample(keys[j], j) for j in rows]),
                               {"samples": shard_size, "failures": [], "rows": shard_size, "fingerprint": "fp"})
    write_index(store, "fp", {"shard_size": shard_size, "manifest_hash": "x", "save": [], "image_format": "none"},
                shards, FACTS, 0.0, {})
    return store


def _shards_read(monkeypatch) -> list[int]:
    """The shards whose tar is read from now on (any thread), in the order read."""
    read: list[int] = []
    real = Store.read_bytes

    def logged(self, rel):
        if rel.startswith("shards/") and rel.endswith(".tar"):
            read.append(int(rel[len("shards/"):-len(".tar")]))
        return real(self, rel)

    monkeypatch.setattr(Store, "read_bytes", logged)
    return read


def test_verify_fast_catches_missing_and_truncated_shards_without_reading_any(tmp_path, monkeypatch):
    from twostep.pipeline.verify import verify_store

    url = str(tmp_path / "store")
    store = _verified_store(url, 30)
    root = tmp_path / "store"
    (root / SHARD_TAR.format(3)).write_bytes((root / SHARD_TAR.format(3)).read_bytes()[:-100])  # truncated
    (root / SHARD_TAR.format(4)).unlink()                                                     # missing
    (root / SHARD_STATS.format(5)).unlink()                                                   # no marker
    data = bytearray((root / SHARD_TAR.format(6)).read_bytes())
    data[600:608] = b"corrupt!"                                                               # same size
    (root / SHARD_TAR.format(6)).write_bytes(bytes(data))
    read = []
    real = Store.read_bytes
    monkeypatch.setattr(Store, "read_bytes", lambda self, rel: (read.append(rel), real(self, rel))[1])
    fast = verify_store(url, full=False)
    assert not fast["ok"] and fast["mode"] == "fast" and fast["checked"] == 0
    assert fast["problems"] == [f"{SHARD_TAR.format(3)}: {store.fs.size(store.path(SHARD_TAR.format(3)))} bytes, "
                                f"index says {store.fs.size(store.path(SHARD_TAR.format(3))) + 100}",
                                f"{SHARD_TAR.format(4)}: missing",
                                f"{SHARD_TAR.format(5)}: its stats file (the commit marker) is missing"]
    assert not [r for r in read if r.startswith("shards/")]  # the fast check reads no shard
    full = verify_store(url, full=True, threads=4)
    assert full["checked"] == 27 and full["problems"] == [*fast["problems"][:2],
                                                          f"{SHARD_TAR.format(5)}: its stats file (the commit "
                                                          "marker) is missing",
                                                          f"{SHARD_TAR.format(6)}: sha256 differs from index.json "
                                                          "(corrupt or replaced)"]
    some = verify_store(url, full=True, sample=5, seed=1)
    assert some["checked"] == 5
    assert verify_store(url, full=True, sample=27, seed=0)["problems"][-1].startswith(SHARD_TAR.format(6))


def test_verify_fast_on_s3_is_a_few_requests(counted_s3):
    from twostep.pipeline.verify import verify_store

    opts, log = counted_s3
    url = "s3://twostep-test/scale/verify"
    _verified_store(url, SHARDS, opts)
    log.take()
    report = verify_store(url, opts, full=False)
    requests = log.take()
    assert report["ok"] and report["shards"] == SHARDS and report["samples"] == SHARDS
    assert not [p for _, p, _ in requests if "/shards/" in p] and len(requests) <= 8, requests


def test_verify_full_as_ray_tasks(ray_cluster, tmp_path):
    from twostep.pipeline.verify import verify_store

    url = str(tmp_path / "store")
    _verified_store(url, 12)
    with open(tmp_path / "store" / SHARD_TAR.format(7), "r+b") as f:
        f.seek(600)
        f.write(b"corrupt!")
    report = verify_store(url, full=True, ray_address="auto")
    assert report["checked"] == 12
    assert report["problems"] == [f"{SHARD_TAR.format(7)}: sha256 differs from index.json (corrupt or replaced)"]


def test_verify_as_ray_tasks_keeps_a_bounded_window(ray_cluster, tmp_path, monkeypatch):
    """Tasks are submitted as results come back, at most the window in flight; no ray.wait over the
    tasks in flight (its cost grows with them)."""
    import ray

    from twostep.pipeline import verify

    url = str(tmp_path / "store")
    _verified_store(url, 12)
    with open(tmp_path / "store" / SHARD_TAR.format(7), "r+b") as f:
        f.seek(600)
        f.write(b"corrupt!")

    def no_wait(*a, **k):
        raise AssertionError("ray.wait")

    monkeypatch.setattr(ray, "wait", no_wait)
    index = json.loads((tmp_path / "store" / "index.json").read_text())
    drawn, results = [], []

    def jobs():
        for entry in Store(url).index_entries(index):
            drawn.append(entry["shard"])
            yield entry["shard"], entry, [f"k{entry['shard']}"]

    for result in verify._run_checks(Store(url), jobs(), 12, 16, "auto", False, window=3):
        assert len(drawn) - len(results) <= 3
        results.append(result)
    assert sorted(i for i, _, _ in results) == list(range(12))
    assert [p for _, p, _ in results if p] == [[f"{SHARD_TAR.format(7)}: sha256 differs from index.json "
                                                "(corrupt or replaced)"]]
    monkeypatch.setattr(verify, "RAY_WINDOW", (2, 2))  # through verify_store, the default window
    report = verify.verify_store(url, sample=5, seed=3, ray_address="auto")
    assert report["checked"] == 5


def test_verify_default_reads_a_bounded_random_sample_of_shards(tmp_path, monkeypatch, capsys):
    """A store larger than the bound: the default reads exactly the bound, random shards that --seed
    picks; --sample N reads N, --full and --sample all every shard, --fast none."""
    from twostep.cli import main
    from twostep.pipeline import cli
    from twostep.pipeline.verify import DEFAULT_SAMPLE, verify_store

    assert cli.DEFAULT_SAMPLE == DEFAULT_SAMPLE  # the help text's copy
    total = DEFAULT_SAMPLE + 8
    url = str(tmp_path / "store")
    _verified_store(url, total)
    read = _shards_read(monkeypatch)
    report = verify_store(url)
    assert report["ok"] and (report["mode"], report["checked"], report["checked_of"]) == ("sample", DEFAULT_SAMPLE,
                                                                                         total)
    first = sorted(read)
    assert len(first) == len(set(first)) == DEFAULT_SAMPLE
    read.clear()
    verify_store(url, seed=0)
    assert sorted(read) == first  # the seed picks them
    read.clear()
    verify_store(url, seed=1)
    assert len(read) == DEFAULT_SAMPLE and sorted(read) != first
    for kwargs, want in (({"sample": 5}, 5), ({"full": True, "sample": 5}, 5), ({"full": True}, total),
                         ({"sample": "all"}, total), ({"sample": 10 * total}, total), ({"full": False}, 0)):
        read.clear()
        report = verify_store(url, **kwargs)
        assert report["ok"] and report["checked"] == len(read) == len(set(read)) == want, (kwargs, report)
    # the command line says it
    levels = [(lg, lg.level) for lg in (logging.getLogger(), logging.getLogger("twostep"))]
    try:
        for argv, line in (([], f"read {DEFAULT_SAMPLE} of {total} shards in full (random, --seed 0)"),
                           (["--sample", "3", "--seed", "4"], f"read 3 of {total} shards in full (random, --seed 4)"),
                           (["--sample", "all"], f"read {total} of {total} shards in full"),
                           (["--full"], f"read {total} of {total} shards in full"),
                           (["--fast"], f"read 0 of {total} shards (fast check: the listing only)")):
            assert main(["verify", url, *argv]) == 0
            assert capsys.readouterr().out == f"OK: {total} shards, {total} samples; {line}\n", argv
        assert main(["verify", url, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert (report["checked"], report["checked_of"], report["sample"], report["seed"]) == (DEFAULT_SAMPLE, total,
                                                                                             DEFAULT_SAMPLE, 0)
    finally:
        for lg, level in levels:
            lg.setLevel(level)


def test_verify_bad_arguments_get_clear_errors(tmp_path, capsys):
    from twostep.cli import main
    from twostep.pipeline.verify import verify_store

    url = str(tmp_path / "store")
    _verified_store(url, 2)
    levels = [(lg, lg.level) for lg in (logging.getLogger(), logging.getLogger("twostep"))]
    try:
        for argv, said in ((["--fast", "--full"], "argument --full: not allowed with argument --fast"),
                           (["--sample", "0"], "argument --sample: 0: expected at least 1 shard (--fast reads none)"),
                           (["--sample", "some"], "argument --sample: 'some': expected a number of shards or 'all'")):
            with pytest.raises(SystemExit) as e:
                main(["verify", url, *argv])
            assert e.value.code == 2 and said in capsys.readouterr().err, argv
        for argv, said in ((["--fast", "--sample", "3"], "--fast reads no shard; --sample 3 reads some: give one "
                                                          "of them"),
                           (["--threads", "0"], "--threads must be ≥ 1, not 0"),
                           (["--regenerate", "-1"], "--regenerate must be ≥ 0, not -1")):
            assert main(["verify", url, *argv]) == 2
            assert capsys.readouterr().err == f"twostep verify: error: {said}\n", argv
    finally:
        for lg, level in levels:
            lg.setLevel(level)
    # the library names the settings as VerifyConfig's fields
    for kwargs, said in (({"full": False, "sample": 3}, "fast reads no shard; sample 3 reads some"),
                         ({"sample": 0}, "sample must be a number of shards ≥ 1 or 'all', not 0"),
                         ({"sample": "half"}, "sample must be a number of shards ≥ 1 or 'all', not 'half'"),
                         ({"threads": 0}, "threads must be ≥ 1, not 0")):
        with pytest.raises(ValueError, match=re.escape(said)):
            verify_store(url, **kwargs)
    Store(url).fs.rm(Store(url).path("manifest.parquet"))
    assert verify_store(url)["problems"] == [f"{url}: no manifest.parquet (the job copies it in first)"]
    assert main(["verify", url]) == 1 and capsys.readouterr().out.startswith("PROBLEMS: the store cannot be checked")


def test_verify_reads_only_the_sampled_shards_row_groups(tmp_path, monkeypatch):
    """A shard's manifest rows come from the row groups that hold them (shards of 3 rows, groups of 4:
    a shard may span two groups), each read once, the prompt_id column only; never the whole column."""
    from twostep.pipeline.verify import verify_store

    n, size, shards = 3, 4, 40
    url = str(tmp_path / "store")
    _verified_store(url, shards, shard_size=n, row_group_size=size)
    assert pq.ParquetFile(tmp_path / "store" / "manifest.parquet").metadata.num_row_groups == n * shards // size
    groups, read_columns = [], []
    real = pq.ParquetFile.read_row_groups

    def logged(self, row_groups, columns=None, **kw):
        groups.extend(row_groups)
        read_columns.append(columns)
        return real(self, row_groups, columns, **kw)

    def whole(*a, **k):
        raise AssertionError("the whole manifest was read")

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", logged)
    monkeypatch.setattr(pq.ParquetFile, "read", whole)
    monkeypatch.setattr(pq, "read_table", whole)
    read = _shards_read(monkeypatch)
    report = verify_store(url, sample=6, seed=2, threads=2)
    assert report["ok"] and len(read) == 6, report
    want = sorted({g for i in read for g in range(i * n // size, ((i + 1) * n - 1) // size + 1)})
    assert sorted(groups) == want and len(groups) == len(set(groups)) and len(want) < shards * n // size
    assert set(map(tuple, read_columns)) == {("prompt_id",)}
    # every shard: each group read once, one at a time as the shards move on
    groups.clear()
    assert verify_store(url, full=True)["ok"]
    assert sorted(groups) == list(range(shards * n // size))


def test_manifest_keys_across_uneven_and_empty_row_groups(tmp_path):
    from twostep.pipeline.verify import ManifestKeys

    keys = [f"k{i}" for i in range(50)]
    with pq.ParquetWriter(tmp_path / "m.parquet", pa.schema([("prompt_id", pa.string())])) as w:
        at = 0
        for size in (1, 7, 0, 13, 2, 0, 20, 7):
            w.write_table(pa.table({"prompt_id": keys[at:at + size]}, schema=w.schema))
            at += size
    pf = pq.ParquetFile(tmp_path / "m.parquet")
    for n in (1, 3, 8, 50, 64):
        of = ManifestKeys(pf, n)
        assert [of(i) for i in range(-(-50 // n))] == [keys[i * n:(i + 1) * n] for i in range(-(-50 // n))], n
        assert of(-(-50 // n)) == []
    of = ManifestKeys(pf, 4)
    assert [of(i) for i in (2, 5, 11)] == [keys[8:12], keys[20:24], keys[44:48]]


def test_verify_keeps_a_bounded_window_of_checks_in_flight(tmp_path):
    """Checks are submitted as results come back, at most ``window`` in flight; the jobs (and so the
    manifest rows) are drawn as the window moves on."""
    from twostep.pipeline.verify import _run_checks

    url = str(tmp_path / "store")
    _verified_store(url, 12)
    store, index = Store(url), json.loads((tmp_path / "store" / "index.json").read_text())
    drawn, results = [], []

    def jobs():
        for entry in store.index_entries(index):
            drawn.append(entry["shard"])
            yield entry["shard"], entry, [f"k{entry['shard']}"]

    for result in _run_checks(store, jobs(), 12, 4, None, False, window=3):
        assert len(drawn) - len(results) <= 3  # in flight when this one came back, itself included
        results.append(result)
    assert sorted(i for i, _, _ in results) == list(range(12)) and all(p == [] for _, p, _ in results)


def test_worker_rows_from_a_bucket_manifest_are_range_reads(counted_s3, tmp_path):
    """A worker reads its rows from the store's copy of the manifest in a bucket with a few range GETs,
    not a download of the file."""
    from twostep.pipeline.worker import WorkerConfig

    opts, log = counted_s3
    n = 600_000
    table = pa.table({"prompt_id": [f"p{i}" for i in range(n)], "seed": pa.array(range(n), pa.int64())})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=8192)
    url = "s3://twostep-test/scale/rows/manifest.parquet"
    Store("s3://twostep-test/scale/rows", opts).put_file("manifest.parquet", str(tmp_path / "m.parquet"))
    w = ShardWorker.__new__(ShardWorker)  # the row reading alone, without a teacher
    w.cfg, w._manifest = WorkerConfig(store_url="unused", manifest=url, shard_size=300, storage_options=opts), None
    log.take()
    log.ranges.clear()
    assert w.rows(100) == table.slice(30_000, 300).to_pylist()
    assert w.rows(101) == table.slice(30_300, 300).to_pylist()
    requests = log.take()
    size = (tmp_path / "m.parquet").stat().st_size
    fetched = sum(int(b) - int(a) + 1 for a, b in (r.removeprefix("bytes=").split("-") for r in log.ranges))
    gets = [r for r in requests if r[0] == "GET"]
    assert len(gets) == len(log.ranges) and len(requests) <= 8, requests  # every GET a range
    assert size > 5 * 2**20 and fetched < size / 3, (fetched, size)  # a footer and a block or two, not the file
