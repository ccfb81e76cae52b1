"""Reading a bucket store with Hugging Face ``datasets``: the upstream streaming bug, and the shim.

The store is written in the documented layout (docs/store.md) to moto's S3 server on 127.0.0.1:
two shards of WebDataset samples with txt, json, latent.npy, mid.npy and webp members, and the
index.json listing them. No Ray job is needed to exercise the readers.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from twostep.pipeline.hf import load_store_streaming, shard_urls, streamable_urls

STORE = "s3://twostep-test/stores/hf"
KEYS = [[f"{shard:02d}{i:014x}" for i in range(3)] for shard in range(2)]


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _webp(value: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def _latent(key: str) -> np.ndarray:
    return np.random.default_rng(int(key, 16)).standard_normal((4, 2, 2)).astype(np.float16)


@pytest.fixture
def bucket_store(s3_server):
    """A two-shard store in the bucket; returns the storage options."""
    import s3fs
    import webdataset as wds

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server)
    root = STORE.removeprefix("s3://")
    if fs.exists(root):
        fs.rm(root, recursive=True)
    shards = []
    for shard, keys in enumerate(KEYS):
        buf = io.BytesIO()
        with wds.TarWriter(buf, encoder=False) as w:
            for j, key in enumerate(keys):
                w.write({"__key__": key, "txt": f"a red circle {j}".encode(),
                         "json": json.dumps({"prompt_id": key, "seed": j}).encode(),
                         "latent.npy": _npy(_latent(key)), "mid.npy": _npy(_latent(key) * 2),
                         "webp": _webp(40 * j)})
        url = f"shards/{shard:06d}.tar"
        fs.pipe(f"{root}/{url}", buf.getvalue())
        fs.pipe(f"{root}/shards/{shard:06d}.json", b"{}")
        shards.append({"url": url, "samples": len(keys), "shard": shard, "sha256": "", "bytes": len(buf.getvalue())})
    fs.pipe(f"{root}/index.json", json.dumps({"status": "complete", "shards": shards[::-1]}).encode())
    return s3_server


def test_plain_streaming_from_s3_fails_as_documented(bucket_store):
    """datasets' own streaming reader passes block_size=0 into s3fs (docs/store.md). If this test starts
    failing, the installed datasets no longer has the bug: update docs/store.md's reading section."""
    import datasets

    with pytest.raises(TypeError, match="unexpected keyword argument 'block_size'"):
        # fails while inferring the columns from the first shard, before any sample is returned
        ds = datasets.load_dataset("webdataset", data_files={"train": shard_urls(STORE, bucket_store)},
                                   split="train", streaming=True, storage_options=bucket_store)
        next(iter(ds))


def test_shim_streams_the_bucket_store_like_the_non_streaming_reader(bucket_store, tmp_path):
    import datasets

    urls = shard_urls(STORE, bucket_store)
    assert urls == [f"{STORE}/shards/000000.tar", f"{STORE}/shards/000001.tar"]  # index order is not shard order

    ds = load_store_streaming(STORE, bucket_store)
    assert ds.num_shards == 2
    rows = list(ds)
    assert [r["__key__"] for r in rows] == KEYS[0] + KEYS[1]
    for r in rows:
        assert r["txt"].startswith("a red circle") and r["json"]["prompt_id"] == r["__key__"]
        latent = np.asarray(r["latent.npy"])
        assert latent.dtype == np.float16 and np.array_equal(latent, _latent(r["__key__"]))
        assert np.array_equal(np.asarray(r["mid.npy"]), _latent(r["__key__"]) * 2)
        assert r["webp"].size == (16, 16)
    assert np.asarray(rows[2]["webp"])[0, 0, 0] == 80  # lossless: the pixel value written

    # the documented workaround reads the same samples (after copying the shards into a cache)
    plain = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train",
                                  storage_options=bucket_store, cache_dir=str(tmp_path / "cache"))
    assert plain.column_names == list(rows[0].keys())
    for a, b in zip(plain, rows):
        assert a["__key__"] == b["__key__"] and a["txt"] == b["txt"] and a["json"] == b["json"]
        assert np.array_equal(np.asarray(a["latent.npy"]), np.asarray(b["latent.npy"]))


def test_local_paths_pass_through_and_missing_index_is_named(tmp_path, s3_server):
    assert streamable_urls([str(tmp_path / "a.tar"), "https://host/b.tar"]) == [str(tmp_path / "a.tar"),
                                                                                "https://host/b.tar"]
    with pytest.raises(FileNotFoundError, match="no index.json"):
        shard_urls("s3://twostep-test/no/such/store", s3_server)
