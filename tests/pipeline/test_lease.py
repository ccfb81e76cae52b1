"""The store's lease taken as a compare-and-swap: of drivers that start at once, exactly one proceeds, on a
local folder (hard-link create) and on the S3-protocol server (PUT with If-None-Match / If-Match)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from twostep.pipeline.store import Store, StoreError

ROUNDS, DRIVERS = 10, 6


def _race(url: str, opts: dict | None, owners: list[str]) -> list[str]:
    """Every owner tries to take the lease at the same instant (a barrier); returns who got it."""
    barrier = threading.Barrier(len(owners))
    won: list[str] = []
    errors: list[BaseException] = []

    def one(owner: str) -> None:
        store = Store(url, opts)
        barrier.wait()
        try:
            store.acquire_lease(owner)
            won.append(owner)
        except StoreError as e:
            if "being written by" not in str(e) and "at the same time" not in str(e):
                errors.append(e)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(o,)) for o in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return won


def _owners(r: int) -> list[str]:
    host = os.uname().nodename
    return [f"{host}:{os.getpid()}:r{r}d{k}" for k in range(DRIVERS)]  # all alive: this process


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store"), None
    opts = request.getfixturevalue("s3_server")
    return f"s3://twostep-test/lease/{tmp_path.name}", opts


def test_drivers_starting_at_once_exactly_one_proceeds(store_url):
    url, opts = store_url
    store = Store(url, opts)
    assert store.lease_mode == ("link" if opts is None else "conditional-put")
    for r in range(ROUNDS):
        won = _race(url, opts, _owners(r))
        assert len(won) == 1, (r, won)
        assert store.read_json("lease.json")["owner"] == won[0]
        store.release_lease(won[0])
        assert not store.exists("lease.json")


def test_a_stale_lease_is_taken_over_by_exactly_one(store_url):
    url, opts = store_url
    store = Store(url, opts)
    for r in range(ROUNDS):
        store.put_json("lease.json", {"owner": "elsewhere:1:old", "expires": time.time() - 1})  # expired
        won = _race(url, opts, _owners(r))
        assert len(won) == 1, (r, won)
        assert store.read_json("lease.json")["owner"] == won[0]
        store.release_lease(won[0])
    # a live lease of another host is refused, and left as it was
    store.put_json("lease.json", {"owner": "elsewhere:1:live", "expires": time.time() + 60})
    with pytest.raises(StoreError, match="being written by elsewhere:1:live"):
        store.acquire_lease(_owners(0)[0])
    assert store.read_json("lease.json")["owner"] == "elsewhere:1:live"


_DRIVER = """
import json, os, sys, time
from twostep.pipeline.store import Store, StoreError
url, opts, start = sys.argv[1], json.loads(sys.argv[2]) or None, float(sys.argv[3])
store = Store(url, opts)
time.sleep(max(0.0, start - time.time()))
try:
    store.acquire_lease(f"{os.uname().nodename}:{os.getpid()}:p")
    print("got")
    time.sleep(3)  # holds it while the other process tries
except StoreError as e:
    print("refused:", e)
"""


def test_two_driver_processes_exactly_one_proceeds(store_url):
    url, opts = store_url
    for _ in range(3):
        start = time.time() + 8  # both processes have imported and connected by then
        procs = [subprocess.Popen([sys.executable, "-c", _DRIVER, url, json.dumps(opts), str(start)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [e[-1500:] for _, e in outs]
        lines = sorted(o.strip() for o, _ in outs)
        assert lines[0] == "got" and lines[1].startswith("refused:"), lines
        Store(url, opts).fs.rm(Store(url, opts).path("lease.json"))


def test_other_stores_fall_back_to_read_write_read():
    store = Store("memory://lease-fallback")
    assert store.lease_mode == "read-write-read"
    store.acquire_lease("a:1:x")
    with pytest.raises(StoreError, match="being written by a:1:x"):
        store.acquire_lease("b:2:y")
