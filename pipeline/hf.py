"""Stream a shard store with Hugging Face ``datasets``, from a bucket too.

``datasets.load_dataset("webdataset", data_files=[...], streaming=True)`` reads a local store, but
not one in an ``s3://`` bucket: ``datasets`` (5.2 and the versions around it) opens each tar with
``block_size=0``, a keyword meant for its HTTP streaming, and hands it to s3fs, which passes unknown
keywords on to aiobotocore (``AioSession.__init__() got an unexpected keyword argument
'block_size'``). ``streaming=False`` works, but copies every shard into the local cache first.

``load_store_streaming`` avoids the bad path without patching ``datasets``: it signs each committed
shard's URL with the store's own filesystem (``fs.sign``: a presigned ``https://`` URL on S3) and
hands those URLs to the same ``webdataset`` builder, whose HTTP reader streams them. Columns, types
and decoding are therefore exactly those of ``load_dataset("webdataset", …)``; ``__url__`` holds the
signed URL. Local and ``http(s)://`` stores are passed through unsigned.

    from twostep.pipeline.hf import load_store_streaming
    ds = load_store_streaming("s3://bucket/store", {"endpoint_url": "https://…"})
    for sample in ds:   # {"txt": str, "json": dict, "latent.npy": ndarray, …, "__key__", "__url__"}
        ...

Signed URLs expire (``expires_s``; S3 allows at most 7 days, and URLs signed with temporary
credentials end with those credentials): build the dataset again for a longer pass.
"""

from __future__ import annotations

from typing import Any

import fsspec
import fsspec.implementations.local

from .layout import INDEX, index_entries, read_index

_UNSIGNED = ("file", "local", "http", "https")


def shard_urls(store_url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Absolute URLs of the store's committed shards, in shard order, from its ``index.json``."""
    fs, root = fsspec.core.url_to_fs(store_url, **(storage_options or {}))
    root = root.rstrip("/")
    def read_bytes(rel: str) -> bytes:
        return fs.cat_file(f"{root}/{rel}")

    try:
        index = read_index(read_bytes)
    except FileNotFoundError:
        raise FileNotFoundError(f"{store_url}: no {INDEX} (not a twostep store, or generation "
                                "has not finished a pass yet)") from None
    shards = index_entries(read_bytes, index)
    if not shards:
        raise ValueError(f"{store_url}: {INDEX} lists no committed shards")
    local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
    return [f"{root}/{s['url']}" if local else fs.unstrip_protocol(f"{root}/{s['url']}") for s in shards]


def streamable_urls(urls: list[str], storage_options: dict[str, Any] | None = None,
                    expires_s: int = 24 * 3600) -> list[str]:
    """URLs ``datasets`` can stream: local paths and http(s) as they are, others signed by their filesystem."""
    out = []
    for url in urls:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        if any(p in _UNSIGNED for p in protocols):
            out.append(url)
            continue
        try:
            out.append(fs.sign(path, expiration=expires_s))
        except NotImplementedError:
            raise ValueError(f"{url}: {type(fs).__name__} cannot sign URLs, so datasets cannot stream it "
                             "here; use load_dataset(..., streaming=False) or webdataset.WebDataset") from None
    return out


def load_store_streaming(store_url: str, storage_options: dict[str, Any] | None = None,
                         expires_s: int = 24 * 3600):
    """The store's committed shards as a streaming ``datasets.IterableDataset`` (one split, ``train``).

    ``storage_options`` are fsspec's for the store (``endpoint_url``, ``key``, ``secret``, …); they are
    used to read ``index.json`` and to sign the shard URLs, and never reach ``datasets``. The dataset
    has one shard per store shard (``ds.num_shards``), so ``split_dataset_by_node`` and DataLoader
    workers divide it by shards.
    """
    import datasets

    urls = streamable_urls(shard_urls(store_url, storage_options), storage_options, expires_s)
    return datasets.load_dataset("webdataset", data_files={"train": urls}, split="train", streaming=True)
