"""Checkpoints: accelerate's ``save_state`` plus our own state (EMA, data position, progress). The EMA
class is ``twostep.common.ema.EMA``, re-exported here.

Layout: ``RUN_DIR/checkpoints/step-00000200/`` holds accelerate's files (models, optimisers; sharded
under FSDP), ``ema.safetensors`` (``ema-rank{r}.safetensors`` under FSDP, where each rank keeps the EMA
of its own shards), ``data-rank{r}.json`` (each rank's loader position) and ``progress.json``,
written last: a folder without it is incomplete and ignored. Resume = run the same command again.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from twostep.common.ema import EMA, local

__all__ = ["EMA", "Checkpoints", "local"]

log = logging.getLogger(__name__)


class Checkpoints:
    """Find, save and prune the run's checkpoints."""

    def __init__(self, run_dir: str | Path, keep: int):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def complete(self) -> list[Path]:
        if not self.dir.exists():
            return []
        return sorted(p for p in self.dir.glob("step-*") if (p / "progress.json").exists())

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, accelerator, step: int, ema: EMA | None, data_state: dict, progress: dict[str, Any],
             ema_sharded: bool = False) -> Path:
        path = self.dir / f"step-{step:08d}"
        rank = accelerator.process_index
        if accelerator.is_main_process and path.exists():
            shutil.rmtree(path)  # an incomplete folder from an interrupted save
        accelerator.wait_for_everyone()
        accelerator.save_state(str(path))
        if ema is not None and (ema_sharded or accelerator.is_main_process):
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()},
                      str(path / (f"ema-rank{rank}.safetensors" if ema_sharded else "ema.safetensors")))
        (path / f"data-rank{rank}.json").write_text(json.dumps(data_state))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (path / "progress.json").write_text(json.dumps({**progress, "step": step}, indent=1))
            for old in self.complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint: %s", path)
        accelerator.wait_for_everyone()
        return path

    def load(self, accelerator, path: Path, ema: EMA | None, ema_sharded: bool = False) -> tuple[dict, dict]:
        """Restore models and optimisers (accelerate) and the EMA; return (data state, progress)."""
        accelerator.load_state(str(path))
        rank = accelerator.process_index
        if ema is not None:
            f = path / (f"ema-rank{rank}.safetensors" if ema_sharded else "ema.safetensors")
            dev = accelerator.device  # safetensors takes "cpu" or "cuda:N", not the "cpu:0" of some launchers
            ema.load_state_dict(load_file(str(f), device="cpu" if dev.type == "cpu" else str(dev)))
        data_file = path / f"data-rank{rank}.json"
        data_state = json.loads(data_file.read_text()) if data_file.exists() else {}
        if not data_file.exists():
            log.warning("%s has no data position for rank %d (different world size?): the data stream restarts",
                        path, rank)
        return data_state, json.loads((path / "progress.json").read_text())
