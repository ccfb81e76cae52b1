"""Checkpoints (accelerate's ``save_state`` plus our own state: EMA, data position, progress) and the EMA.

Layout: ``RUN_DIR/checkpoints/step-00000200/`` holds accelerate's files (models, optimisers; sharded
under FSDP), ``ema.safetensors`` (``ema-rank{r}.safetensors`` under FSDP, where each rank keeps the EMA
of its own shards), ``data-rank{r}.json`` (each rank's loader position) and ``progress.json``,
written last: a folder without it is incomplete and ignored. Resume = run the same command again.
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of an FSDP2 ``DTensor``, a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """Exponential moving average of a module's trainable parameters (fp32).

    Written here rather than diffusers' ``EMAModel`` because it must also work on FSDP's local
    shards: it only ever touches each rank's own part of each parameter (``local``), keyed by name,
    so its state is plain tensors that save per rank.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: local(p).detach().float().clone() for n, p in module.named_parameters()
                       if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # short warm-up: early weights fade fast
        for n, p in module.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(local(p).detach().float(), 1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])

    @contextmanager
    def applied(self, module: nn.Module):
        """Temporarily load the EMA weights into ``module`` (restored on exit)."""
        backup = {}
        with torch.no_grad():
            for n, p in module.named_parameters():
                if n in self.shadow:
                    backup[n] = local(p).detach().clone()
                    local(p).copy_(self.shadow[n].to(p.dtype))
        try:
            yield module
        finally:
            with torch.no_grad():
                for n, p in module.named_parameters():
                    if n in backup:
                        local(p).copy_(backup[n])


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
            ema.load_state_dict(load_file(str(f), device=str(accelerator.device)))
        data_file = path / f"data-rank{rank}.json"
        data_state = json.loads(data_file.read_text()) if data_file.exists() else {}
        if not data_file.exists():
            log.warning("%s has no data position for rank %d (different world size?): the data stream restarts",
                        path, rank)
        return data_state, json.loads((path / "progress.json").read_text())
