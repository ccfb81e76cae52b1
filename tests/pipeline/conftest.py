"""Fixtures of the generation tests: the S3-protocol server with every request it receives recorded
(the local Ray cluster per module is in tests/conftest.py)."""

from __future__ import annotations

import threading

import pytest


class RequestLog:
    """Every HTTP request the S3-protocol server receives, from any process (a WSGI wrapper)."""

    def __init__(self, app):
        self.app, self.requests, self._lock = app, [], threading.Lock()
        self.ranges: list[str] = []  # the Range header of every ranged GET

    def __call__(self, environ, start_response):
        with self._lock:
            self.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""),
                                  environ.get("QUERY_STRING", "")))
            if "HTTP_RANGE" in environ:
                self.ranges.append(environ["HTTP_RANGE"])
        return self.app(environ, start_response)

    def take(self) -> list[tuple[str, str, str]]:
        with self._lock:
            out, self.requests = self.requests, []
        return out


@pytest.fixture
def counted_s3(free_port):
    """moto's S3 server on 127.0.0.1 (as ``s3_server`` in conftest) with its WSGI app wrapped in a
    :class:`RequestLog`: (storage options, request log)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    log = RequestLog(server._server.app)
    server._server.app = log  # werkzeug's request handler calls server.app for every request
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    if not fs.exists("twostep-test"):
        fs.mkdir("twostep-test")
    log.take()
    yield opts, log
    server.stop()
