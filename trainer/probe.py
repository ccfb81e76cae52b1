"""``twostep probe-disc``: can the configured discriminator see the gap between the teacher's naive 2
steps and its 8 steps?

A fresh discriminator of the config's architecture trains for ``--steps`` steps with the student frozen
at its initialisation, which is exactly the teacher's naive 2-step sampler (σ = 1 → σ_mid → 0): the
store's 8-step samples are real, the naive outputs from the same batches' noise are fake. Every
``--every`` steps it is scored on a held-out slice (docs/training.md, "Held-out diagnostics"): store
samples never streamed to it, against naive samples from their noise, which it never saw. A
discriminator that cannot separate these cannot teach a student that is closer still.

    twostep probe-disc --config toy --data out/demo/store --out runs/probe [KEY=VALUE ...]

Writes ``OUT/probe.json`` (the held-out accuracy and AUC at each check, for the final term and the step-1
term) beside the training run's own files, and prints the last and best AUC.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from twostep.common.config_flags import add_dataclass_flags, at_least, config_from_args

log = logging.getLogger("twostep.probe")


@dataclass(kw_only=True)
class ProbeConfig:
    """What ``twostep probe-disc`` probes and how long; each field is a flag (``overrides``: the
    positional KEY=VALUE arguments)."""

    config: str = "toy"
    """Training config whose discriminator is probed: a YAML file or a bundled name."""
    data: str
    """A teacher store (folder or URL with index.json); sets data.data."""
    out: str
    """Folder for the probe's run and probe.json."""
    steps: int = 200
    """Discriminator updates."""
    every: int = 25
    """Steps between held-out checks."""
    heldout_fraction: float | None = None
    """Fraction of the store held out; default: the config's data.heldout_fraction."""
    overrides: list[str] = field(default_factory=list)
    """Config overrides (dotted keys)."""

    def __post_init__(self) -> None:
        at_least(self, 1, "steps", "every")


FLAGS = {"overrides": "KEY=VALUE"}
"""``overrides`` is positional."""


def add_parser(sub) -> None:
    p = sub.add_parser("probe-disc", help="train a fresh discriminator to tell naive 2 steps from 8; held-out AUC",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(p, ProbeConfig, flags=FLAGS)
    p.set_defaults(func=run)


def probe_config(config: str, data: str, steps: int, every: int, overrides: list[str] = (),
                 heldout_fraction: float | None = None):
    """The training config that probes ``config``'s discriminator: the student frozen throughout
    (``optim.g_start`` = steps), held-out checks every ``every`` steps, no export or grids."""
    from .config import load_config

    if steps < 1 or every < 1:
        raise ValueError(f"--steps and --every must be ≥ 1, not {steps} and {every}")
    forced = [f"data.data={data}", f"max_steps={steps}", f"optim.g_start={steps}", f"log_every={every}",
              f"heldout_every={every}", f"checkpoint_every={steps}", "export=false", "sample_every=0",
              "model.disc_frozen=false"]
    if heldout_fraction is not None:
        forced.append(f"data.heldout_fraction={heldout_fraction}")
    cfg = load_config(config, [*overrides, *forced])
    if not cfg.loss.uses_adversarial:
        raise ValueError(f"config {config!r} has no adversarial term: there is no discriminator to probe")
    if cfg.data.heldout_fraction <= 0:
        raise ValueError("data.heldout_fraction is 0: the probe needs a held-out slice (--heldout-fraction)")
    return cfg


def summarise(run_dir: Path) -> dict:
    """The held-out checks of a probe run, from its metrics.jsonl."""
    from .report import read_metrics

    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if any(k.startswith("disc/heldout_") for k in r)]
    if not rows:
        raise RuntimeError(f"{run_dir}: no held-out check was logged (too few held-out samples in the store?)")
    out: dict = {"checks": [{"step": r["step"], **{k.split("/", 1)[1]: round(v, 4) for k, v in r.items()
                                                 if k.startswith("disc/heldout_")}} for r in rows]}
    for suffix in ("", "_mid"):
        aucs = [c.get(f"heldout_auc{suffix}") for c in out["checks"]]
        if aucs[-1] is not None:
            out[f"last_auc{suffix}"] = aucs[-1]
            out[f"best_auc{suffix}"] = max(a for a in aucs if a is not None)
            out[f"last_accuracy{suffix}"] = out["checks"][-1][f"heldout_accuracy{suffix}"]
    return out


def probe(cfg, run_dir: str | Path) -> dict:
    """Train the probe run (resumable) and write ``probe.json``."""
    from .config import to_dict
    from .loop import train

    run_dir = Path(run_dir)
    train(cfg, run_dir)
    result = {**summarise(run_dir), "steps": cfg.max_steps, "heldout_fraction": cfg.data.heldout_fraction,
              "config": to_dict(cfg)}
    (run_dir / "probe.json").write_text(json.dumps(result, indent=1))
    return result


def run(args: argparse.Namespace) -> int:
    opts = config_from_args(ProbeConfig, args, FLAGS)
    cfg = probe_config(opts.config, opts.data, opts.steps, opts.every, opts.overrides, opts.heldout_fraction)
    result = probe(cfg, opts.out)
    line = f"held-out AUC (final term): last {result['last_auc']:.3f}, best {result['best_auc']:.3f}"
    if "last_auc_mid" in result:
        line += f"; step-1 term: last {result['last_auc_mid']:.3f}, best {result['best_auc_mid']:.3f}"
    print(f"{line}\nprobe: {Path(opts.out) / 'probe.json'}")
    return 0
