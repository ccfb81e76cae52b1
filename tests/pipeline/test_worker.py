"""The shard worker in-process (no Ray): a failing sample is isolated and recorded."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from twostep.pipeline.job import write_index
from twostep.pipeline.store import Store
from twostep.pipeline.worker import ShardWorker, WorkerConfig
from twostep.toy.world import build_toy_manifest


@pytest.fixture
def worker(tmp_path):
    build_toy_manifest(6, tmp_path / "toy.parquet", seed=2)
    cfg = WorkerConfig(store_url=str(tmp_path / "store"), manifest=str(tmp_path / "toy.parquet"), shard_size=6,
                       batch_size=3, image_format="png", save=())
    w = ShardWorker(cfg)
    bad = pq.read_table(tmp_path / "toy.parquet").column("prompt").to_pylist()[4]
    real = w.teacher.generate

    def flaky(prompts, *a, **kw):
        if bad in prompts:
            raise RuntimeError("CUDA out of memory (injected)")
        return real(prompts, *a, **kw)

    w.teacher.generate = flaky
    return w


def test_failing_sample_is_recorded_and_the_rest_commits(worker):
    stats = worker.run(0, "fp")
    assert stats["samples"] == 5 and len(stats["failures"]) == 1
    f = stats["failures"][0]
    assert f["row"] == 4 and "out of memory" in f["reason"]
    index = write_index(worker.store, "fp", {"shard_size": 6, "manifest_hash": "x", "save": [],
                                             "image_format": "png"}, 1, worker.describe(), 1.0, {})
    assert index["failed_samples"] == 1 and index["status"] == "complete"
    failed = pq.read_table(f"{worker.cfg.store_url}/failed.parquet").to_pylist()
    assert failed[0]["prompt_id"] == f["prompt_id"] and failed[0]["shard"] == 0


def test_on_sample_error_fail_fails_the_shard(worker):
    worker.cfg.on_sample_error = "fail"
    with pytest.raises(RuntimeError, match="out of memory"):
        worker.run(0, "fp")
    assert not Store(worker.cfg.store_url).exists("shards/000000.json")


def test_a_broken_teacher_fails_the_shard_instead_of_committing_it_empty(worker):
    def broken(*a, **kw):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

    worker.teacher.generate = broken
    with pytest.raises(RuntimeError, match="every sample of a batch failed"):
        worker.run(0, "fp")
    assert not Store(worker.cfg.store_url).exists("shards/000000.json")


def test_the_teacher_is_released_before_a_shards_encodes_finish(tmp_path):
    """Two shards in flight, as the actor runs them: the second shard's batch is generated while the
    first shard's samples are still encoding (the teacher waits on no encode)."""
    import threading
    import time

    build_toy_manifest(4, tmp_path / "toy.parquet", seed=2)
    cfg = WorkerConfig(store_url=str(tmp_path / "store"), manifest=str(tmp_path / "toy.parquet"), shard_size=2,
                       batch_size=2, image_format="png", save=(), encode_threads=2)
    w = ShardWorker(cfg)
    calls, real_generate, real_encode = [], w.teacher.generate, w._encode

    def generate(prompts, *a, **kw):
        calls.append(("generate", time.perf_counter()))
        return real_generate(prompts, *a, **kw)

    def slow_encode(*a, **kw):
        time.sleep(1.0)
        calls.append(("encoded", time.perf_counter()))
        return real_encode(*a, **kw)

    w.teacher.generate, w._encode = generate, slow_encode
    threads = [threading.Thread(target=w.run, args=(s, "fp")) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    starts = [t for k, t in calls if k == "generate"]
    first_encoded = min(t for k, t in calls if k == "encoded")
    assert len(starts) == 2 and starts[1] < first_encoded  # the second batch did not wait for the encodes
    assert all((tmp_path / "store" / "shards" / f"{s:06d}.tar").exists() for s in (0, 1))
    assert w._pool._max_workers == 2


def test_the_job_hands_its_workers_its_shard_settings():
    """GenerateConfig and WorkerConfig share ShardSettings: the worker gets the job's values as they are."""
    from twostep.common.config_flags import FieldError
    from twostep.pipeline.config import GenerateConfig, ShardSettings

    cfg = GenerateConfig(manifest="m.parquet", out="store", shard_size=8, save=["noise"], num_steps=4,
                         storage_options={"anon": True}, num_workers=3)
    w = WorkerConfig(**cfg.shard_settings(), store_url="store", manifest="store/manifest.parquet")
    assert {f: getattr(w, f) for f in ShardSettings.__dataclass_fields__} == cfg.shard_settings()
    assert (w.save, w.sampler_overrides) == (("noise",), {"num_steps": 4})
    with pytest.raises(FieldError, match="^batch_size must be ≥ 1, not 0$"):
        WorkerConfig(store_url="s", manifest="m", batch_size=0)
