"""``twostep train``: the streaming trainer's command (``accelerate launch -m twostep.cli train …`` for
several GPUs or nodes)."""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger("twostep.train")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train the 2-step student on a teacher shard store",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the step-decoupled 2-step student end to end against the teacher's samples.\n\n"
                    "Resume = run the same command again: the latest checkpoint in RUN_DIR/checkpoints is\n"
                    "found and models, optimisers, EMA, step and data position are restored. Several GPUs:\n"
                    "  accelerate launch [--config_file trainer/configs/accelerate/fsdp_8gpu.yaml] \\\n"
                    "      -m twostep.cli train --config zimage_turbo_8gpu --out RUN_DIR\n\n"
                    "Overrides are key=value pairs on the config's dotted keys, e.g.\n"
                    "  loss.e2e=false model.decoupled=false optim.lr=1e-4 max_steps=2000",
        epilog="Outputs: RUN_DIR/config.yaml, run.json (manifest hash, code version), checkpoints/, "
               "samples/, TensorBoard logs, student/ (the exported diffusers pipeline), result.json.")
    p.add_argument("--config", default="toy",
                   help="YAML config file, or the name of a bundled one in trainer/configs (default: toy)")
    p.add_argument("--data", default=None,
                   help="teacher samples: a store (folder/URL with index.json) or shard URLs; sets data.data")
    p.add_argument("--teacher", default=None, help="toy, a pipeline folder of a supported family (docs/families.md) or a hub id; sets model.teacher")
    p.add_argument("--out", required=False, default=None, help="run directory (checkpoints, logs, samples, export)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides (dotted keys)")
    p.set_defaults(func=run)


def _check_inputs(cfg, args: argparse.Namespace) -> None:
    """The teacher, the data and the run directory, checked before anything loads or is written."""
    from twostep.common.errors import reworded
    from twostep.teacher.core import check_teacher_spec

    from .data import resolve_shards

    check_teacher_spec(cfg.model.teacher, "--teacher" if args.teacher else "model.teacher")
    data = "--data" if args.data else "data.data"
    try:
        resolve_shards(cfg.data.data, cfg.data.storage_options or None)
    except (OSError, ValueError) as e:  # missing, not a store, no shards, an unreadable index.json
        named = str(cfg.data.data) in str(e)  # resolve_shards names the spec in most of its messages
        raise reworded(e, f"{data}: {e}" if named else f"{data} {cfg.data.data}: {e}") from None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise NotADirectoryError(f"--out {args.out}: a file, not a run directory")


def run(args: argparse.Namespace) -> int:
    from .config import load_config, to_yaml

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.data={args.data}")
    if args.teacher:
        overrides.append(f"model.teacher={args.teacher}")
    cfg = load_config(args.config, overrides)  # ConfigError (a ValueError): twostep.cli prints it
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    if not args.out:
        raise ValueError("--out RUN_DIR is required (except with --dry-run)")
    if not cfg.data.data:
        raise ValueError("no data: pass --data STORE_OR_SHARDS or set data.data in the config")
    _check_inputs(cfg, args)
    from .loop import train

    result = train(cfg, args.out)
    log.info("done at step %d; run directory %s", result["step"], args.out)
    return 0
