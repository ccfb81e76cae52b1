"""One command for a GPU machine: the generation and the training benchmarks, each in its own process
(so each starts with an empty GPU) under its own time limit, results and logs into one folder.
docs/gpu.md says how to run it on a GPU machine and what each number means.

    python tests/benchmarks/gpu_truth.py --out-dir $OUT                 # H100/H200: about 8 minutes
    python tests/benchmarks/gpu_truth.py --tiny --out-dir /tmp/truth    # CPU smoke run, tiny model

Writes ``results_generate_gpu.json`` (bench_generate_gpu.py), ``results_train_gpu.json``
(bench_train_gpu.py), ``profile_generate.md`` and the gzipped profiler traces, and
``gpu_truth.log`` (both parts' output). Each results file is rewritten after every section, so
a part stopped by its time limit keeps what it had measured. Exit status 0 when both parts ran
to the end without a failed section.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARTS = {
    # name: (script, results file, --budget-s for optional sections, hard limit in seconds)
    "gen": ("bench_generate_gpu.py", "results_generate_gpu.json", 290, 330),
    "train": ("bench_train_gpu.py", "results_train_gpu.json", 150, 210),
}


def run_part(cmd: list[str], log, limit_s: float) -> int:
    """Run ``cmd``, copying its output to stdout and ``log`` line by line; kill it at ``limit_s``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=HERE.parents[1], start_new_session=True)
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        os.killpg(proc.pid, 9)

    timer = threading.Timer(limit_s, kill)
    if limit_s < float("inf"):
        timer.start()
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        rc = proc.wait()
    finally:
        timer.cancel()
    if killed.is_set():
        msg = f"[gpu_truth] {cmd[1]} stopped at its {limit_s:.0f} s limit; its results file keeps the sections done\n"
        sys.stdout.write(msg)
        log.write(msg)
        return 124
    return rc


def headline(out_dir: Path) -> dict:
    """The figures the docs table asks for, read back from the results files."""
    out: dict = {}
    gen = out_dir / PARTS["gen"][1]
    if gen.exists():
        g = json.loads(gen.read_text())
        comp = g.get("compile") or {}
        out["generate"] = {k: g.get(k) for k in ("device", "median_bare", "median_worker", "ratio_worker_over_bare",
                                                  "transformer_calls_per_image", "fastest_path", "sections_done", "errors")}
        out["generate"]["compile"] = {k: comp.get(k) for k in ("compile_s", "ratio_over_bare", "images_to_pay_back", "ok")}
    train = out_dir / PARTS["train"][1]
    if train.exists():
        t = json.loads(train.read_text())
        out["train"] = {"slope": t.get("slope"), "lora": {k: (t.get("lora") or {}).get(k) for k in ("step_s", "peak_gib")},
                        "fsdp_ok": (t.get("fsdp") or {}).get("ok"), "sections_done": t.get("sections_done"),
                        "errors": t.get("errors")}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run of both parts with the tiny model")
    ap.add_argument("--out-dir", default=str(HERE), help="folder for results, profile, traces and log "
                    "(default: tests/benchmarks; on a GPU machine: $OUT)")
    ap.add_argument("--parts", default="gen,train", help="which parts, comma-separated: gen, train (default both)")
    ap.add_argument("--gen-args", default="", help="extra flags for bench_generate_gpu.py, one quoted string")
    ap.add_argument("--train-args", default="", help="extra flags for bench_train_gpu.py, one quoted string")
    ap.add_argument("--no-limits", action="store_true",
                    help="no --budget-s and no hard time limit per part (the default with --tiny)")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown part(s) {unknown}; choose from {sorted(PARTS)}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ["GPU_TRUTH_COMMAND"] = shlex.join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    limits = not (args.no_limits or args.tiny)  # the limits are sized for an H100/H200
    worst = 0
    with open(out_dir / "gpu_truth.log", "a") as log:
        for name in parts:
            script, results, budget, limit = PARTS[name]
            extra = shlex.split(args.gen_args if name == "gen" else args.train_args)
            cmd = [sys.executable, str(HERE / script), "--out", str(out_dir / results), *extra]
            if args.tiny:
                cmd.append("--tiny")
            if limits:
                cmd += ["--budget-s", str(budget)]
            log.write(f"[gpu_truth] {time.strftime('%H:%M:%S')} {shlex.join(cmd)}\n")
            log.flush()
            t0 = time.perf_counter()
            rc = run_part(cmd, log, limit if limits else float("inf"))
            log.write(f"[gpu_truth] {name}: exit {rc} after {time.perf_counter() - t0:.0f} s\n")
            worst = worst or rc
    summary = headline(out_dir)
    print(json.dumps(summary, indent=1, default=str))
    errors = [e for part in summary.values() for e in (part.get("errors") or {})]
    return 1 if worst or errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
