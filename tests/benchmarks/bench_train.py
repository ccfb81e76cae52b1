"""Benchmark: trainer step time and peak memory at toy scale, against a plain flow-matching step.

Each variant runs in its own process (so peak memory is its own), A B A B, on the same store,
teacher and batch size:

* ``baseline``: one flow-matching step of a copy of the teacher transformer (forward, backward, AdamW)
  — what fine-tuning the teacher itself costs;
* ``regress``: the student with paired + step-1 regression only (2 transformer calls, end to end);
* ``full``: the toy config (adds the discriminator on the final output and on the step-1 state).

Reported: median seconds per step after warm-up, the ratio to the baseline, and peak memory
(CUDA: max allocated; CPU: the process's max RSS).

    python tests/benchmarks/bench_train.py --data STORE [--batch 16] [--steps 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = {
    "baseline": [],
    "regress": ["loss.adv_weight=0", "loss.step1_loss=regress"],
    "full": [],
}


def run_variant(variant: str, data: str, batch: int, steps: int, warmup: int) -> dict:
    from twostep.trainer.config import load_config
    from twostep.trainer.loop import discriminator_step, generator_step, setup

    cfg = load_config("toy", [f"data.data={data}", f"data.batch_size={batch}", "log_with=none",
                              "loss.adv_warmup_steps=0", *VARIANTS[variant]])
    p = setup(cfg, tempfile.mkdtemp())
    batches = iter(p.loader)
    if variant == "baseline":
        model = p.accelerator.unwrap_model(p.student).transformer
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        from twostep.teacher.families.zimage import transformer_velocity

    times = []
    for i in range(warmup + steps):
        batch = next(batches)
        t0 = time.perf_counter()
        caps = p.teacher.encode_prompts(batch["prompt"])
        if variant == "baseline":
            sigma = torch.rand(len(batch["latent"]))
            s = sigma.view(-1, 1, 1, 1)
            x = (1 - s) * batch["latent"] + s * batch["noise"]
            v = transformer_velocity(model, x, sigma, caps)
            loss = torch.nn.functional.mse_loss(v, batch["latent"] - batch["noise"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            fakes = generator_step(p, batch, caps, i, log_now=False).fakes
            discriminator_step(p, batch, caps, i, fakes)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available()
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"variant": variant, "step_s": statistics.median(times), "peak_mib": round(peak, 1),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a toy store (twostep generate)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).with_name("results_train.json")))
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.data, args.batch, args.steps, args.warmup)))
        return 0
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        for v in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--variant", v, "--data", args.data, "--batch",
                                  str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)],
                                 capture_output=True, text=True, check=True)
            runs[v].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r} {v}: {runs[v][-1]}", flush=True)
    base = statistics.median(x["step_s"] for x in runs["baseline"])
    summary = {v: {"median_step_s": round(statistics.median(x["step_s"] for x in rs), 4),
                   "ratio_to_baseline": round(statistics.median(x["step_s"] for x in rs) / base, 2),
                   "peak_mib": max(x["peak_mib"] for x in rs)} for v, rs in runs.items()}
    result = {"batch": args.batch, "steps": args.steps, "repeats": args.repeats, "device": runs["full"][0]["device"],
              "summary": summary, "runs": runs}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
