"""Shared fixtures: the tiny random-weight Z-Image pipeline saved as a real pipeline folder, a local Ray
cluster per module, free ports and the S3-protocol server."""

from __future__ import annotations

import os

import pytest

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # Two test processes on two cores: one compute thread each (and in the processes they start), so
    # that torch's thread pools do not fight over the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def toy_latent_shape() -> tuple[int, int, int]:
    """(C, h, w) of the shipped toy teacher's 64×64 latents, read from its VAE config (not assumed)."""
    import json

    from twostep.teacher.core import TOY_TEACHER_DIR

    cfg = json.loads((TOY_TEACHER_DIR / "vae" / "config.json").read_text())
    down = 2 ** (len(cfg["block_out_channels"]) - 1)
    return (cfg["latent_channels"], 64 // down, 64 // down)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> str:
    """A random-weight ZImagePipeline folder (tiny sizes, byte-level tokenizer), built locally."""
    from twostep.teacher.random_zimage import build_pipeline

    path = tmp_path_factory.mktemp("tiny-zimage")
    build_pipeline(seed=0, model_max_length=128).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster of 2 CPUs for the module's tests."""
    import ray

    for attempt in range(3):  # a loaded machine can miss the raylet's 30 s start-up deadline
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


@pytest.fixture
def run_model_card(tmp_path, monkeypatch):
    """A function that runs an exported student folder's README snippet as written (fp32 on the CPU,
    in a fresh folder) and returns the image it saves."""

    def run(folder):
        from pathlib import Path

        from PIL import Image

        card = (Path(folder) / "README.md").read_text()
        code = card.split("```python\n", 1)[1].split("```", 1)[0]
        code = (code.replace('"PATH"', repr(str(folder))).replace("torch.bfloat16", "torch.float32")
                .replace('.to("cuda")', ""))
        cwd = tmp_path / "card"
        cwd.mkdir(exist_ok=True)
        monkeypatch.chdir(cwd)
        exec(compile(code, "README.md", "exec"), {})
        return Image.open(cwd / "sample.png")

    return run


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port():
    """A function that returns a free TCP port on 127.0.0.1 each time it is called."""
    return _free_port


@pytest.fixture(scope="session")
def _s3_server_session():
    """moto's standalone S3 server on 127.0.0.1 (as s3fs's own tests use it), bucket ``twostep-test``,
    one per test process; tests write under prefixes of their own.

    moto keeps its state per process, not per server: a bucket made by an earlier test is still
    there, so the bucket is created only if missing."""
    import s3fs
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing"}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    if not fs.exists("twostep-test"):
        fs.mkdir("twostep-test")
    yield opts
    server.stop()


@pytest.fixture
def s3_server(_s3_server_session) -> dict:
    """Storage options of the session's S3-protocol server (moto on 127.0.0.1), bucket ``twostep-test``:
    a fresh copy for each test, which may add options of its own."""
    return dict(_s3_server_session)
