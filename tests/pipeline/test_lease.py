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


def _race(url: str, opts: dict | None, owners: list[str], barrier: threading.Barrier | None = None) -> list[str]:
    """Every owner tries to take the lease at the same instant (a barrier); returns who got it."""
    barrier = barrier or threading.Barrier(len(owners))
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
import json, os, sys
from twostep.pipeline.store import Store, StoreError
url, opts = sys.argv[1], json.loads(sys.argv[2]) or None
store = Store(url, opts)
store.exists("lease.json")  # connected
print("ready", flush=True)
sys.stdin.readline()  # go: both processes try at once
try:
    store.acquire_lease(f"{os.uname().nodename}:{os.getpid()}:p")
    print("got", flush=True)
except StoreError as e:
    print("refused:", e, flush=True)
sys.stdin.readline()  # the winner holds the lease until both have answered
"""


def test_two_driver_processes_exactly_one_proceeds(store_url):
    url, opts = store_url
    for _ in range(3):
        procs = [subprocess.Popen([sys.executable, "-c", _DRIVER, url, json.dumps(opts)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        try:
            assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"], \
                [p.stderr.read()[-1500:] for p in procs if p.poll() is not None]
            for p in procs:  # imported and connected: release both together
                p.stdin.write("go\n")
                p.stdin.flush()
            lines = sorted(p.stdout.readline().strip() for p in procs)
            for p in procs:
                p.stdin.write("done\n")
                p.stdin.flush()
            assert all(p.wait(timeout=60) == 0 for p in procs), [p.stderr.read()[-1500:] for p in procs]
        finally:
            for p in procs:
                p.kill()
        assert lines[0] == "got" and lines[1].startswith("refused:"), lines
        Store(url, opts).fs.rm(Store(url, opts).path("lease.json"))


def test_other_stores_fall_back_to_read_write_read():
    store = Store("memory://lease-fallback")
    assert store.lease_mode == "read-write-read"
    store.acquire_lease("a:1:x")
    with pytest.raises(StoreError, match="being written by a:1:x"):
        store.acquire_lease("b:2:y")


def test_renewal_extends_only_a_lease_still_held(store_url):
    url, opts = store_url
    store = Store(url, opts)
    store.acquire_lease("me:1:a", ttl=5)
    first = store.read_json("lease.json")
    assert store.renew_lease("me:1:a", ttl=300) is None
    renewed = store.read_json("lease.json")
    assert renewed["owner"] == "me:1:a" and renewed["expires"] > first["expires"] + 200
    # taken over meanwhile (an expired lease, a driver elsewhere): renewal reports it and writes nothing
    store.put_json("lease.json", {"owner": "elsewhere:2:b", "expires": time.time() + 300})
    assert store.renew_lease("me:1:a") == "elsewhere:2:b"
    assert store.read_json("lease.json")["owner"] == "elsewhere:2:b"
    store.release_lease("elsewhere:2:b")
    assert store.renew_lease("me:1:a").startswith("nobody")
    assert not store.exists("lease.json")


def test_renewal_racing_a_takeover_never_leaves_two_holders(store_url):
    """The holder renews while drivers race to take the lease over as if it had expired: whoever
    lease.json names at the end is the only one that believes it holds it."""
    url, opts = store_url
    store = Store(url, opts)
    for r in range(ROUNDS):
        store.put_json("lease.json", {"owner": "holder:1:h", "expires": time.time() - 1})  # just expired
        barrier = threading.Barrier(DRIVERS + 1)
        believers: list[str] = []

        def renew(barrier: threading.Barrier, believers: list[str]) -> None:
            s = Store(url, opts)
            barrier.wait()
            if s.renew_lease("holder:1:h") is None:
                believers.append("holder:1:h")

        t = threading.Thread(target=renew, args=(barrier, believers))
        t.start()
        won = _race(url, opts, _owners(r), barrier)
        t.join()
        believers += won
        assert len(believers) == 1, (r, believers)
        assert store.read_json("lease.json")["owner"] == believers[0]
        store.fs.rm(store.path("lease.json"))
