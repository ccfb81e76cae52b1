"""Fleet faults on a real local Ray cluster with 2 workers and the toy teacher: an actor whose GPU
fails fast on every shard, an actor that stops mid-shard, an actor whose constructor raises, uploads
that fail everywhere; a lease that fences writes (local folders and the S3-protocol server); a
retried shard that is already committed; what dead writers leave behind (docs/generation.md, Faults).

Each faulty worker class is made inside a function, so Ray ships it to its workers by value; the
first actor to create a marker file is the faulty one, its replacement is healthy."""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import pytest

from twostep.pipeline.job import GenerateConfig, _IndexWriter, _LeaseKeeper, run_generation
from twostep.pipeline.store import Store, StoreError
from twostep.pipeline.verify import verify_store
from twostep.pipeline.worker import ShardWorker
from twostep.toy.world import build_toy_manifest

ROWS, SHARD = 24, 4  # 6 shards


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "toy.parquet"
    build_toy_manifest(ROWS, path, seed=5)
    return str(path)


def _cfg(manifest, out, **kw):
    return GenerateConfig(manifest=manifest, out=str(out), shard_size=SHARD, batch_size=4, num_workers=2,
                          image_format="none", **kw)


def _once():
    """A function that is True for the first process to call it with ``marker`` (which it creates).
    Made inside a function, so that Ray ships it by value with the classes that call it."""

    def first(marker) -> bool:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True

    return first


def _complete(index: dict, out) -> None:
    assert index["status"] == "complete" and index["failed_shards"] == {} and index["samples"] == ROWS
    assert verify_store(str(out))["ok"]


def _broken_gpu_worker(marker, log_path):
    _first = _once()

    class BrokenGpu(ShardWorker):
        def __init__(self, cfg):
            super().__init__(cfg)
            self.broken = _first(marker)

        def run(self, shard, fingerprint, **kw):
            if self.broken:
                with open(log_path, "a") as f:
                    f.write(f"{shard}\n")
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return super().run(shard, fingerprint, **kw)

    return BrokenGpu


def test_an_actor_failing_fast_on_every_shard_is_replaced_without_burning_the_queue(ray_cluster, manifest,
                                                                                    tmp_path, caplog):
    """With one retry a shard, the broken actor's failures would exhaust every shard it touched;
    they are blamed on it instead: it is replaced and every shard is committed."""
    out, log_path = tmp_path / "store", tmp_path / "broken"
    with caplog.at_level(logging.WARNING, logger="twostep.generate"):
        index = run_generation(_cfg(manifest, out, max_shard_retries=1),
                               worker_cls=_broken_gpu_worker(tmp_path / "marker", log_path))
    _complete(index, out)
    assert len(set(log_path.read_text().split())) >= 2  # it did fail distinct shards
    assert "while other workers succeed; replacing it" in caplog.text


def _stopping_worker(marker):
    _first = _once()

    class StopsMidShard(ShardWorker):
        def _generate(self, rows, idx, default):
            yield from super()._generate(rows, idx, default)
            if _first(marker):
                os.kill(os.getpid(), signal.SIGSTOP)  # a wedged kernel: alive, never answering

    return StopsMidShard


def test_a_stopped_actor_passes_the_shard_deadline_and_is_replaced(ray_cluster, manifest, tmp_path, caplog):
    out = tmp_path / "store"
    marker = tmp_path / "marker"
    with caplog.at_level(logging.WARNING, logger="twostep.generate"):
        index = run_generation(_cfg(manifest, out, shard_timeout=12), worker_cls=_stopping_worker(marker))
    _complete(index, out)
    stopped = int(marker.read_text())
    with pytest.raises(ProcessLookupError):  # killed, not left stopped
        for _ in range(50):
            os.kill(stopped, 0)
            time.sleep(0.2)
    assert "passed its 12 s deadline" in caplog.text


def _failing_constructor(marker, always: bool = False):
    _first = _once()

    class NoGpu(ShardWorker):
        def __init__(self, cfg):
            if always or _first(marker):
                raise RuntimeError("no CUDA device is available")
            super().__init__(cfg)

    return NoGpu


def test_an_actor_whose_constructor_raises_is_replaced_at_start_up(ray_cluster, manifest, tmp_path, caplog):
    out = tmp_path / "store"
    with caplog.at_level(logging.WARNING, logger="twostep.generate"):
        index = run_generation(_cfg(manifest, out), worker_cls=_failing_constructor(tmp_path / "marker"))
    _complete(index, out)
    assert "no CUDA device is available; replacing it" in caplog.text


def test_no_actor_starting_ends_the_job_with_each_reason(ray_cluster, manifest, tmp_path):
    with pytest.raises(StoreError, match=r"no worker started: worker 0: .*no CUDA device.*worker 1: "):
        run_generation(_cfg(manifest, tmp_path / "store", max_actor_restarts=1),
                       worker_cls=_failing_constructor(tmp_path / "marker", always=True))
    assert not (tmp_path / "store" / "lease.json").exists()


def _denied_uploads(log_path):
    class Denied(ShardWorker):
        def run(self, shard, fingerprint, **kw):
            with open(log_path, "a") as f:
                f.write(f"{shard}\n")
            return super().run(shard, fingerprint, **kw)

        def __init__(self, cfg):
            super().__init__(cfg)

            def deny(*a, **k):
                raise PermissionError("Access Denied (bucket policy)")

            self.store.commit_shard = deny

    return Denied


def test_uploads_failing_everywhere_stop_the_job(ray_cluster, manifest, tmp_path):
    """The circuit breaker: three failed uploads in a row end the job with the upload's error,
    not after the whole queue was generated for nothing (6 shards × 3 attempts)."""
    log_path = tmp_path / "attempts"
    with pytest.raises(StoreError, match="3 shard uploads in a row failed.*Access Denied"):
        run_generation(_cfg(manifest, tmp_path / "store", max_upload_failures=3),
                       worker_cls=_denied_uploads(log_path))
    assert len(log_path.read_text().split()) <= 3 + 4  # the three, and at most the four then in flight


# --- a committed shard is never written again --------------------------------------------------------


def _dies_after_commit(marker):
    _first = _once()

    class DiesAfterCommit(ShardWorker):
        def run(self, shard, fingerprint, **kw):
            stats = super().run(shard, fingerprint, **kw)
            if shard == 0 and _first(marker):
                os._exit(17)  # committed, but the result never reaches the driver
            return stats

    return DiesAfterCommit


def test_a_retried_shard_that_is_committed_is_not_rewritten(ray_cluster, manifest, counted_s3, tmp_path):
    """Counted at the server: shard 0's tar is PUT once, though its shard ran twice. And a multipart
    upload a dead writer left under the store's prefix is aborted at start-up."""
    import s3fs

    opts, requests = counted_s3
    url = "s3://twostep-test/faults/committed"
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    bucket, key = "twostep-test", "faults/committed/shards/000003.tar"
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)
    fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024)
    requests.take()
    index = run_generation(_cfg(manifest, url, storage_options=opts), worker_cls=_dies_after_commit(tmp_path / "m"))
    assert index["status"] == "complete" and index["samples"] == ROWS
    puts = [p for m, p, _ in requests.take() if m == "PUT" and p.endswith("/shards/000000.tar")]
    assert len(puts) == 1
    assert fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix="faults/committed/").get("Uploads", []) == []
    assert verify_store(url, opts)["ok"]


def test_temporary_files_of_dead_writers_are_removed_at_start_up(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.put_json("shards/000000.json", {"x": 1})
    junk = [tmp_path / "store" / "shards" / f".000001.tar.{'a' * 32}.tmp", tmp_path / "store" / f".index.json.{'b' * 32}.tmp"]
    for p in junk:
        p.write_bytes(b"half")
    kept = [tmp_path / "store" / f".lease.{'c' * 32}.tmp", tmp_path / "store" / "shards" / "notes.tmp"]
    for p in kept:
        p.write_bytes(b"not ours")
    assert store.clean_incomplete() == {"tmp_files": 2, "multipart_uploads": 0}
    assert not any(p.exists() for p in junk) and all(p.exists() for p in kept)


# --- the lease fences writes ---------------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "store"))
    opts = request.getfixturevalue("s3_server")
    return Store(f"s3://twostep-test/lease-fence/{tmp_path.name}", opts)


def test_renewal_errors_fence_the_driver_at_expiry(store, monkeypatch):
    """Renewals that fail (a 503, say) are retried; once the lease may have expired, check() stops
    the driver and an index write is refused: the store's index.json is never written."""
    store.acquire_lease("me:1:a", ttl=2.0)
    keeper = _LeaseKeeper(store, "me:1:a", ttl=2.0, every=0.2)
    writer = _IndexWriter(store, "fp", {}, 1, {}, {}, GenerateConfig(manifest="m", out="o"), guard=keeper.check)

    def unavailable(*a, **k):
        raise OSError("503 Slow Down")

    try:
        monkeypatch.setattr(store, "renew_lease", unavailable)
        keeper.check()  # still within the lease
        time.sleep(2.2)
        with pytest.raises(StoreError, match="could not be renewed before it expired.*503 Slow Down"):
            keeper.check()
        with pytest.raises(StoreError, match="could not be renewed"):
            writer.write(1.0)
        assert not store.exists("index.json")
    finally:
        keeper.stop()


def test_a_deposed_drivers_index_write_is_refused(store):
    store.acquire_lease("me:1:a", ttl=60)
    keeper = _LeaseKeeper(store, "me:1:a", ttl=60, every=0.1)
    writer = _IndexWriter(store, "fp", {}, 1, {}, {}, GenerateConfig(manifest="m", out="o"), guard=keeper.check)
    try:
        writer.write(1.0)  # held: written
        before = store.read_bytes("index.json")
        store.put_json("lease.json", {"owner": "other:2:b", "expires": time.time() + 300})  # taken over
        time.sleep(0.5)
        with pytest.raises(StoreError, match="the lease was taken by other:2:b"):
            writer.write(2.0)
        assert store.read_bytes("index.json") == before
    finally:
        keeper.stop()


def test_renewal_errors_end_a_running_job(ray_cluster, manifest, tmp_path, monkeypatch):
    def unavailable(self, *a, **k):
        raise OSError("connection timed out")

    monkeypatch.setattr(Store, "renew_lease", unavailable)
    with pytest.raises(StoreError, match="could not be renewed"):
        run_generation(_cfg(manifest, tmp_path / "store", lease_ttl=1.0), worker_cls=_slow_worker())


def test_a_driver_that_loses_its_lease_while_actors_start_stops_and_ends_them(ray_cluster, manifest, tmp_path,
                                                                               monkeypatch):
    """Start-up is fenced too: the lease is checked while the actors load (here for 60 s), and the actors
    are ended with the job, so their CPUs are free again at once."""
    def unavailable(self, *a, **k):
        raise OSError("connection timed out")

    class SlowStart(ShardWorker):
        def __init__(self, *a, **k):
            time.sleep(60)
            super().__init__(*a, **k)

    monkeypatch.setattr(Store, "renew_lease", unavailable)
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="could not be renewed"):
        run_generation(_cfg(manifest, tmp_path / "store", lease_ttl=1.0), worker_cls=SlowStart)
    assert time.monotonic() - t0 < 30
    deadline = time.monotonic() + 20
    while ray_cluster.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_cluster.available_resources().get("CPU", 0) == 2


def _slow_worker():
    class Slow(ShardWorker):
        def run(self, shard, fingerprint, **kw):
            time.sleep(1.0)
            return super().run(shard, fingerprint, **kw)

    return Slow


class Conflicts:
    """A WSGI wrapper that answers the first ``n`` PUTs of ``lease.json`` with S3's 409."""

    BODY = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ConditionalRequestConflict</Code>'
            b"<Message>A conflicting conditional operation is currently in progress against this resource."
            b"</Message></Error>")

    def __init__(self, app, n: int):
        self.app, self.n, self.seen = app, n, 0

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] == "PUT" and environ.get("PATH_INFO", "").endswith("/lease.json"):
            self.seen += 1
            if self.seen <= self.n:
                start_response("409 Conflict", [("Content-Type", "application/xml"),
                                                ("Content-Length", str(len(self.BODY)))])
                return [self.BODY]
        return self.app(environ, start_response)


def test_a_409_on_acquire_is_retried(free_port):
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        conflicts = Conflicts(server._server.app, 2)
        server._server.app = conflicts
        opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
        store = Store("s3://twostep-test/lease-409/store", opts)
        if not store.fs.exists("twostep-test"):
            store.fs.mkdir("twostep-test")
        store.acquire_lease("me:1:a")
        assert conflicts.seen == 3  # two 409s, then the PUT that took it
        assert json.loads(store.read_bytes("lease.json"))["owner"] == "me:1:a"
    finally:
        server.stop()


# --- a manifest written as one huge row group ------------------------------------------------------


def test_a_manifest_of_one_huge_row_group_is_rechunked_in_the_stores_copy(ray_cluster, manifest, tmp_path,
                                                                         monkeypatch):
    """Every row in one row group: the store's copy gets groups of whole shards (here 1 shard of 4
    rows, the threshold scaled down), with the same rows and the same manifest hash, and the job
    completes from it."""
    import pyarrow.parquet as pq

    from twostep.pipeline import job
    from twostep.prompts.manifest import read_meta

    one = tmp_path / "one_group.parquet"
    source = pq.ParquetFile(manifest)
    with pq.ParquetWriter(one, source.schema_arrow) as w:
        w.write_table(source.read(), row_group_size=ROWS)
        w.add_key_value_metadata({k: v for k, v in source.metadata.metadata.items() if k.startswith(b"twostep.")})
    assert pq.read_metadata(one).num_row_groups == 1
    monkeypatch.setattr(job, "ROW_GROUP_ROWS", 4)  # 24 rows > 4 × 4
    out = tmp_path / "store"
    index = run_generation(_cfg(str(one), out))
    _complete(index, out)
    copy = pq.ParquetFile(out / "manifest.parquet")
    assert [copy.metadata.row_group(i).num_rows for i in range(copy.num_row_groups)] == [SHARD] * (ROWS // SHARD)
    assert read_meta(out / "manifest.parquet")[0] == read_meta(one)[0] == read_meta(manifest)[0]
    assert copy.read().equals(pq.read_table(one))
