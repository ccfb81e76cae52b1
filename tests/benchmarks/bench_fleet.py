"""Benchmark: the generation driver against a simulated fleet.

The real driver (``run_generation``) on a local Ray cluster with many lightweight actors whose teacher
sleeps instead of generating (``--sleep`` seconds a sample, latents of 4×1×1), writing a store on the
local S3-protocol server (moto on 127.0.0.1, in its own process, so its CPU time is not the
driver's), whose requests are counted as the server receives them.
Optionally a killer thread SIGKILLs a random actor process now and then (``--kill-per-min``, a
fraction of the actors a minute). Reported:

- driver CPU per shard dispatched: the driver process's CPU time (every thread: the loop's and
  Ray's own) while its dispatch loop runs, from the first task submitted to the last result,
  over the shards, and how much of it is the loop's own thread. Measured twice: in the job
  itself, where the actors and the S3-protocol server share the machine's cores with the driver,
  and in a second job whose actors only sleep and return stats (``driver_only``: the driver with
  the machine to itself, as on a head node); beside them, the barest Ray loop over as many
  actors and tasks on the same cluster (Ray's own floor);
- the whole run's driver CPU (start-up, index and lease included) and wall time;
- requests per shard (all, and those under ``shards/``, by method);
- wall time against the sleep time the actors had to spend (shards · rows · sleep / actors);
- the CPU the actors and the S3-protocol server spent per shard (on a small machine, what the wall
  time is made of);
- actors killed, and whether the store is complete with every shard once (``twostep verify``
  full check: sha256, format, keys = manifest rows).

    python tests/benchmarks/bench_fleet.py [--actors 8] [--shards 400] [--sleep 0.02] [--kill-per-min 0.1]

Each actor is a process holding torch: about 377 MB (PSS) with a CUDA build of torch, 227 MB with
the CPU build; 64 actors need a machine with memory for them (on 24 GB, the CPU build).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path


class RequestLog:
    """WSGI wrapper recording every request the moto server receives (from any process)."""

    def __init__(self, app):
        self.app, self.requests, self._lock = app, [], threading.Lock()

    def __call__(self, environ, start_response):
        with self._lock:
            self.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")))
        return self.app(environ, start_response)


def _serve(conn) -> None:
    """The S3-protocol server's own process, so its CPU time is not counted as the driver's."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line a request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    log = RequestLog(server._server.app)
    server._server.app = log
    conn.send(port)
    while True:
        cmd = conn.recv()
        if cmd == "requests":
            with log._lock:
                conn.send(list(log.requests))
        elif cmd == "clear":
            with log._lock:
                log.requests.clear()
            conn.send(None)
        else:
            server.stop()
            conn.send(None)
            return


class S3Server:
    """moto on 127.0.0.1 in a child process; :meth:`requests` lists (method, path) it has received."""

    def __init__(self):
        import multiprocessing as mp

        import s3fs

        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), daemon=True)
        self._proc.start()
        port = self._conn.recv()
        self.pid = self._proc.pid
        self._lock = threading.Lock()
        self.opts = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "bench", "secret": "bench"}
        self.fs = s3fs.S3FileSystem(skip_instance_cache=True, **self.opts)
        self.fs.mkdir("fleet-bench")

    def _ask(self, cmd: str):
        with self._lock:
            self._conn.send(cmd)
            return self._conn.recv()

    def requests(self) -> list[tuple[str, str]]:
        return self._ask("requests")

    def clear(self) -> None:
        self._ask("clear")

    def stop(self) -> None:
        self._ask("stop")
        self._proc.join(10)


def sleeping_worker(sleep: float, pid_dir: str, commit: bool = True):
    """A ShardWorker class whose teacher sleeps ``sleep`` s a sample; each actor writes its pid to
    ``pid_dir`` so the killer can find it. ``commit=False``: a shard only sleeps and returns stats
    shaped like a commit's (nothing built or written), so the actors load neither the machine nor
    the store and the driver's own cost shows alone. Built in a function: Ray ships it by value."""
    import torch

    from twostep.pipeline.worker import ShardWorker
    from twostep.teacher.core import TeacherOutput, seed_noise

    class SleepTeacher:
        default_size = 8

        def generate(self, prompts, seeds, h, w, decode=True, negative_prompts=None):
            time.sleep(sleep * len(prompts))
            noise = torch.stack([seed_noise(s, (4, 1, 1)) for s in seeds])
            return TeacherOutput(noise=noise, latent=noise * 0.5, mid=noise * 0.75)

        def describe(self):
            return {"teacher": "sleep", "revision": None, "weights": None, "dtype": "float32", "device": "cpu",
                    "sampler": {"num_steps": 8, "guidance_scale": 0.0, "sigmas": [1.0, 0.0], "mid_sigma": 0.75},
                    "sampler_hash": f"sleep{sleep}", "versions": {}}

    class SleepWorker(ShardWorker):
        def __init__(self, cfg):
            super().__init__(cfg, teacher=SleepTeacher())
            self.cpu0 = time.process_time()  # after start-up: the shards' CPU is counted from here
            Path(pid_dir, str(os.getpid())).write_text("0")

        def run(self, shard, fp, **kw):
            if commit:
                out = super().run(shard, fp, **kw)
            else:
                rows = self.cfg.shard_size
                time.sleep(sleep * rows)
                out = {"shard": shard, "url": f"shards/{shard:06d}.tar", "samples": rows, "failures": [],
                       "rows": rows, "worker": self.name, "seconds": sleep * rows, "fingerprint": fp,
                       "bytes": 10240 * rows, "sha256": "0" * 64}
            Path(pid_dir, str(os.getpid())).write_text(str(time.process_time() - self.cpu0))  # CPU on shards
            return out

    return SleepWorker


def killer(pid_dir: str, actors: int, per_min: float, stop: threading.Event, killed: list[int],
           server: S3Server) -> None:
    """SIGKILL a random live actor every 60 / (actors · per_min) seconds, from the first shard
    upload on (the job's start-up, which asks every actor for its teacher's facts, is not retried)."""
    every = 60.0 / max(actors * per_min, 1e-9)
    rng = random.Random(0)
    while not any("/shards/" in p for _, p in server.requests()):
        if stop.wait(0.5):
            return
    while not stop.wait(every):
        live = []
        for p in os.listdir(pid_dir):
            try:
                os.kill(int(p), 0)
                live.append(int(p))
            except ProcessLookupError:
                pass
        if live:
            pid = rng.choice(live)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)


class DispatchMeter:
    """Wraps the driver's dispatch loop (``job._dispatch``) to record, for each call, its wall time,
    the driver process's CPU time (all threads) and the loop thread's own CPU time."""

    def __init__(self):
        from twostep.pipeline import job

        self.job, self.real, self.calls = job, job._dispatch, []
        job._dispatch = self._measured

    def _measured(self, *args, **kwargs):
        w0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
        try:
            return self.real(*args, **kwargs)
        finally:
            self.calls.append({"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0,
                               "loop_thread_cpu_s": time.thread_time() - m0})

    def close(self) -> None:
        self.job._dispatch = self.real


def job_config(args, server: S3Server, tmp: Path, name: str):
    """A toy manifest of ``args.shards`` shards and the job's settings for ``s3://fleet-bench/NAME``."""
    from twostep.pipeline.job import GenerateConfig
    from twostep.toy.world import build_toy_manifest

    build_toy_manifest(args.shards * args.shard_size, tmp / f"{name}.parquet", seed=1)
    (tmp / f"pids-{name}").mkdir()
    return GenerateConfig(manifest=str(tmp / f"{name}.parquet"), out=f"s3://fleet-bench/{name}",
                          shard_size=args.shard_size, batch_size=max(1, args.shard_size), num_workers=args.actors,
                          image_format="none", save=("mid",), storage_options=server.opts, max_shard_retries=5)


def dispatch_figures(d: dict, shards: int) -> dict:
    """One DispatchMeter record as figures per shard."""
    return {"dispatch_wall_s": round(d["wall_s"], 1), "dispatch_cpu_s": round(d["cpu_s"], 2),
            "dispatch_cpu_ms_per_shard": round(1000 * d["cpu_s"] / shards, 3),
            "dispatch_loop_thread_ms_per_shard": round(1000 * d["loop_thread_cpu_s"] / shards, 3)}


def driver_only(args, server: S3Server, meter: DispatchMeter, tmp: Path) -> dict:
    """The same job with actors that commit nothing (``sleeping_worker(commit=False)``): the
    dispatch loop's CPU when the driver has the machine to itself, as on a head node."""
    from twostep.pipeline.job import run_generation

    cfg = job_config(args, server, tmp, "driver-only")
    run_generation(cfg, worker_cls=sleeping_worker(args.sleep, str(tmp / "pids-driver-only"), commit=False))
    return dispatch_figures(meter.calls[-1], args.shards)


def one_run(args, server: S3Server, meter: DispatchMeter, tmp: Path, name: str) -> dict:
    """One generation job of ``args.shards`` shards into ``s3://fleet-bench/NAME``; its figures."""
    from twostep.pipeline.job import run_generation
    from twostep.pipeline.verify import verify_store

    cfg = job_config(args, server, tmp, name)
    pid_dir, url = tmp / f"pids-{name}", cfg.out
    shards, rows = args.shards, args.shards * args.shard_size
    stop, killed = threading.Event(), []
    k = threading.Thread(target=killer, args=(str(pid_dir), args.actors, args.kill_per_min, stop, killed, server),
                         daemon=True)
    server.clear()
    s0 = proc_cpu(server.pid)
    c0, t0 = time.process_time(), time.perf_counter()
    if args.kill_per_min:
        k.start()
    try:
        index = run_generation(cfg, worker_cls=sleeping_worker(args.sleep, str(pid_dir)))
    finally:
        stop.set()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    server_cpu = proc_cpu(server.pid) - s0
    actors_cpu = sum(float(p.read_text() or 0) for p in pid_dir.iterdir())  # a killed one's until its last shard
    d = meter.calls[-1]
    requests = server.requests()
    report = verify_store(url, server.opts, full=True, threads=8)
    index_bytes = len(server.fs.cat_file(f"fleet-bench/{name}/index.json"))
    shard_requests = [r for r in requests if "/shards/" in r[1]]
    ideal = rows * args.sleep / args.actors
    return {
        "actors": args.actors, "shards": shards, "shard_size": args.shard_size, "sleep_s": args.sleep,
        "kill_per_min": args.kill_per_min, "actors_killed": len(killed),
        "status": index["status"], "samples": index["samples"], "verify_full_ok": report["ok"],
        "verify_problems": report["problems"][:5],
        **dispatch_figures(d, shards), "sleep_bound_s": round(ideal, 1),
        "dispatch_overhead_s": round(d["wall_s"] - ideal, 1),
        "run_wall_s": round(wall, 1), "driver_cpu_s": round(cpu, 2),
        "driver_cpu_ms_per_shard": round(1000 * cpu / shards, 2),
        "requests": len(requests), "requests_per_shard": round(len(requests) / shards, 2),
        "shard_requests_per_shard": round(len(shard_requests) / shards, 2),
        "shard_requests_by_method": {m: sum(1 for r in shard_requests if r[0] == m) for m in ("GET", "HEAD", "PUT")},
        "index_bytes_per_shard": round(index_bytes / shards, 1),
        # What the machine's cores spent besides the driver: the wall time's floor on a small machine.
        "actors_cpu_ms_per_shard": round(1000 * actors_cpu / shards, 2),
        "server_cpu_ms_per_shard": round(1000 * server_cpu / shards, 2),
        "cores": os.cpu_count(),
    }


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bare_ray_cpu(actors: int, tasks: int, sleep: float) -> float:
    """Driver CPU seconds of the barest dispatch loop Ray allows, as a baseline: the same number of
    actors with two tasks each in flight, tasks that sleep ``sleep`` s and return a small dict,
    ``ray.wait`` then ``ray.get``; no store, no index, no progress bar."""
    import ray

    @ray.remote(num_cpus=1, max_concurrency=2)
    class Bare:
        def run(self, i):
            time.sleep(sleep)
            return {"shard": i, "samples": 1, "failures": []}

    handles = [Bare.remote() for _ in range(actors)]
    ray.get([h.run.remote(-1) for h in handles])  # started: actor start-up is not counted
    c0 = time.process_time()
    queue, idle, inflight = list(range(tasks)), [k for _ in range(2) for k in range(actors)], {}
    while queue or inflight:
        while queue and idle:
            k = idle.pop()
            inflight[handles[k].run.remote(queue.pop())] = k
        done, _ = ray.wait(list(inflight), num_returns=1)
        for ref in done:
            ray.get(ref)
            idle.append(inflight.pop(ref))
    cpu = time.process_time() - c0
    for h in handles:
        ray.kill(h)
    return cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--actors", type=int, default=8, help="Ray actors (logical workers; default: 8)")
    ap.add_argument("--shards", type=int, default=400, help="shards to generate (default: 400)")
    ap.add_argument("--shard-size", type=int, default=1, help="rows per shard (default: 1)")
    ap.add_argument("--sleep", type=float, default=0.02, help="seconds a sample (default: 0.02)")
    ap.add_argument("--kill-per-min", type=float, default=0.0,
                    help="fraction of the actors SIGKILLed a minute (default: 0; 0.1 is a tenth a minute)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    import ray

    server = S3Server()  # before Ray: a plain child process, not a Ray worker
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    ray.init(num_cpus=args.actors, include_dashboard=False, log_to_driver=False)  # logical CPUs: 1 an actor
    meter = DispatchMeter()
    try:
        figures = one_run(args, server, meter, tmp, "store")
        figures["driver_only"] = driver_only(args, server, meter, tmp)
        # The baseline on the same cluster, same actor and task counts: Ray's own floor per task.
        bare = bare_ray_cpu(args.actors, args.shards, args.sleep * args.shard_size)
    finally:
        meter.close()
        ray.shutdown()
        server.stop()
    figures["bare_ray_ms_per_task"] = round(1000 * bare / args.shards, 3)
    figures["ratio_driver_only_over_bare_ray"] = round(figures["driver_only"]["dispatch_cpu_ms_per_shard"]
                                                       / figures["bare_ray_ms_per_task"], 2)
    print(json.dumps(figures, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
