"""One command for a GPU machine: a preflight, then the generation and the training benchmarks, each
in its own process (so each starts with an empty GPU), all under one absolute deadline, results and
logs into one folder. docs/gpu.md says how to run it on a GPU machine and what each number means.

    python tests/benchmarks/gpu_truth.py --out-dir $OUT                 # H100/H200: about 6 minutes
    python tests/benchmarks/gpu_truth.py --tiny --out-dir /tmp/truth    # CPU smoke run, tiny model

1. ``gpu_preflight.py`` (about 10 s): imports, CUDA and the card's memory, ``python -m twostep.cli``
   from outside the repository, diffusers with the installed transformers. Any failure ends the
   command at once with exit status 2 and the reason (``preflight.json``).
2. The parts, in order: ``gen`` (bench_generate_gpu.py) until its share of the time left, then
   ``train`` (bench_train_gpu.py) until the deadline. Each part starts a section only while its
   time allows it, records a failed section and goes on, and rewrites its results file after every
   section; a part still running ``--grace-s`` after its end is killed and keeps what it wrote.

Writes ``preflight.json``, ``results_generate_gpu.json``, ``results_train_gpu.json``,
``profile_generate.md`` with two gzipped profiler traces, and ``gpu_truth.log`` (every part's
output). Exit status 0 when every part ran to its end without a failed section.
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
PARTS = {  # name: (script, results file)
    "gen": ("bench_generate_gpu.py", "results_generate_gpu.json"),
    "train": ("bench_train_gpu.py", "results_train_gpu.json"),
}
DEADLINE_S = 330  # the whole command on an H100/H200, start to end (docs/gpu.md: sizing)
GEN_SHARE = 0.6  # of the time left after the preflight, when both parts run
PREFLIGHT_LIMIT_S = 120


def say(log, msg: str) -> None:
    line = f"[gpu_truth] {time.strftime('%H:%M:%S')} {msg}\n"
    sys.stdout.write(line)
    sys.stdout.flush()
    log.write(line)
    log.flush()


def run_part(cmd: list[str], log, limit_s: float, env: dict[str, str]) -> int:
    """Run ``cmd``, copying its output to stdout and ``log`` line by line; kill it at ``limit_s``
    (exit status 124 then). It runs from the output folder, never the repository root."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=cmd_cwd(cmd), start_new_session=True)
    killed = threading.Event()

    def kill() -> None:
        killed.set()
        os.killpg(proc.pid, 9)

    timer = threading.Timer(max(0.0, limit_s), kill)
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
        say(log, f"{Path(cmd[1]).name} stopped at its {limit_s:.0f} s limit; its results file keeps the sections done")
        mark_killed(cmd, limit_s)
        return 124
    return rc


def mark_killed(cmd: list[str], limit_s: float) -> None:
    """Record in a killed part's results file that it was stopped, and which planned sections it
    never finished (the one running then among them)."""
    if "--out" not in cmd:
        return
    path = Path(cmd[cmd.index("--out") + 1])
    if not path.exists():
        return
    d = json.loads(path.read_text())
    seen = set(d.get("sections_done", [])) | set(d.get("skipped_for_time", [])) | set(d.get("skipped", [])) \
        | set(d.get("errors", {}))
    d["killed"] = {"limit_s": round(limit_s, 1),
                   "unfinished": [x for x in d.get("sections_planned", []) if x not in seen]}
    path.write_text(json.dumps(d, indent=1, default=str))


def cmd_cwd(cmd: list[str]) -> str:
    out = cmd[cmd.index("--out") + 1] if "--out" in cmd else str(HERE)
    return str(Path(out).parent)


def headline(out_dir: Path) -> dict:
    """The figures the docs table asks for, read back from the results files."""
    out: dict = {}
    pre = out_dir / "preflight.json"
    if pre.exists():
        p = json.loads(pre.read_text())
        out["preflight"] = {"ok": p.get("ok"), "failed": p.get("failed"), "seconds": p.get("seconds"),
                            "device": (p.get("device") or {}).get("device")}
    gen = out_dir / PARTS["gen"][1]
    if gen.exists():
        g = json.loads(gen.read_text())
        comp = g.get("compile") or {}
        out["generate"] = {k: g.get(k) for k in ("device", "median_bare", "median_worker", "ratio_worker_over_bare",
                                                  "worker_variants", "transformer_calls_per_image", "fastest_path",
                                                  "student_over_teacher8", "sections_done", "skipped_for_time",
                                                  "errors")}
        out["generate"]["compile"] = {k: comp.get(k) for k in ("compile_s", "ratio_over_bare", "images_to_pay_back", "ok")}
    train = out_dir / PARTS["train"][1]
    if train.exists():
        t = json.loads(train.read_text())
        adam = t.get("adamw") or {}
        out["train"] = {"depths": t.get("depths"), "slope": t.get("slope"),
                        "lora": {k: (t.get("lora") or {}).get(k) for k in ("step_s", "peak_gib")},
                        "fsdp_ok": (t.get("fsdp") or {}).get("ok"),
                        "adamw": {k: adam.get(k) for k in ("fastest", "least_memory")},
                        "sections_done": t.get("sections_done"), "skipped_for_time": t.get("skipped_for_time"),
                        "errors": t.get("errors")}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true",
                    help="CPU smoke run of every part with the tiny model (no deadline unless --deadline-s is given)")
    ap.add_argument("--out-dir", default=str(HERE), help="folder for results, profile, traces and log "
                    "(default: tests/benchmarks; on a GPU machine: $OUT)")
    ap.add_argument("--parts", default="gen,train", help="which parts, comma-separated: gen, train (default both)")
    ap.add_argument("--gen-args", default="", help="extra flags for bench_generate_gpu.py, one quoted string")
    ap.add_argument("--train-args", default="", help="extra flags for bench_train_gpu.py, one quoted string")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help=f"the whole command's seconds, preflight included (default {DEADLINE_S}, none with --tiny)")
    ap.add_argument("--gen-share", type=float, default=GEN_SHARE,
                    help=f"the generation part's share of the time left after the preflight (default {GEN_SHARE})")
    ap.add_argument("--grace-s", type=float, default=20,
                    help="a part still running this long after its end is killed (default 20)")
    ap.add_argument("--no-limits", action="store_true", help="no deadline (the default with --tiny)")
    ap.add_argument("--no-preflight", action="store_true", help="skip the preflight")
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"--parts: unknown part(s) {unknown}; choose from {sorted(PARTS)}")
    t_start = time.time()
    deadline_s = args.deadline_s if args.deadline_s is not None else (None if args.tiny else DEADLINE_S)
    limits = deadline_s is not None and not args.no_limits  # the default is sized for an H100/H200
    end = t_start + deadline_s if limits else float("inf")
    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "GPU_TRUTH_COMMAND": shlex.join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # large, changing activations
    tiny = ["--tiny"] if args.tiny else []
    results: dict[str, int] = {}
    with open(out_dir / "gpu_truth.log", "a") as log:
        say(log, f"start; deadline {'none' if end == float('inf') else time.strftime('%H:%M:%S', time.localtime(end))}")
        if not args.no_preflight:
            cmd = [sys.executable, str(HERE / "gpu_preflight.py"), "--out", str(out_dir / "preflight.json"), *tiny]
            rc = run_part(cmd, log, PREFLIGHT_LIMIT_S, env)
            say(log, f"preflight: exit {rc} after {time.time() - t_start:.0f} s")
            if rc != 0:
                say(log, "preflight failed: nothing else is run (reasons above and in preflight.json)")
                print(json.dumps(headline(out_dir), indent=1, default=str))
                return 2
        for i, name in enumerate(parts):
            script, results_file = PARTS[name]
            now = time.time()
            part_end = end
            if limits and name == "gen" and i < len(parts) - 1:
                part_end = now + (end - now) * args.gen_share
            extra = shlex.split(args.gen_args if name == "gen" else args.train_args)
            cmd = [sys.executable, str(HERE / script), "--out", str(out_dir / results_file), *tiny, *extra]
            if limits:
                cmd += ["--deadline-at", f"{part_end:.1f}"]
            say(log, shlex.join(cmd))
            limit = part_end + args.grace_s - now if limits else float("inf")
            rc = run_part(cmd, log, limit, env)
            results[name] = rc
            say(log, f"{name}: exit {rc} after {time.time() - now:.0f} s")
        say(log, f"end after {time.time() - t_start:.0f} s")
    summary = headline(out_dir)
    summary["exit_status"] = results
    print(json.dumps(summary, indent=1, default=str))
    errors = [e for part in ("generate", "train") for e in ((summary.get(part) or {}).get("errors") or {})]
    return 1 if any(results.values()) or errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
