"""Exponential moving average of a module's weights, shared by the student trainer and the toy teacher's
training script (``twostep.toy``). It lives outside both packages because the trainer imports
the pipeline and nothing may import the trainer."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


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
        """``shadow ← d·shadow + (1 - d)·weights`` with ``d = min(decay, (1 + step) / (10 + step))``."""
        d = min(self.decay, (1 + step) / (10 + step))  # short warm-up: early weights fade fast
        pairs = [(self.shadow[n], local(p).detach().float()) for n, p in module.named_parameters()
                 if n in self.shadow]
        if pairs:  # one fused call: a loop of per-tensor lerps costs a kernel launch per tensor on a GPU
            shadow, live = zip(*pairs)
            torch._foreach_lerp_(list(shadow), list(live), 1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` into the shadow weights; keys it has beyond them are ignored."""
        missing = set(self.shadow) - set(state)
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Load the EMA weights into ``module`` for good (``applied`` restores the raw ones)."""
        for n, p in module.named_parameters():
            if n in self.shadow:
                local(p).copy_(self.shadow[n].to(p.dtype))

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
