"""The step-decoupled 2-step student: two parameter sets initialised from the teacher transformer.

Both are copies of the teacher family's transformer and run through the family adapter's velocity
(``twostep.teacher.families``), whatever the family. Step 1 maps pure noise (σ=1) to a clean estimate x̂0₁ and the state at σ_mid; step 2 maps that state
to the final latent. The forward used in training is the exact 2-step sampler that
:func:`~twostep.trainer.pipeline_twostep.two_step`, the arithmetic of every exported student pipeline
(docs/families.md), so what is trained is what is exported.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from twostep.teacher.families import Family

from .pipeline_twostep import two_step

log = logging.getLogger(__name__)


def _trainable_copy(transformer: nn.Module, lora_rank: int, gradient_checkpointing: bool,
                    lora_targets: list[str]) -> nn.Module:
    """A copy of the teacher transformer: fp32 and fully trainable, or frozen with a LoRA adapter."""
    model = copy.deepcopy(transformer)
    if lora_rank:
        from peft import LoraConfig

        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=lora_targets,
                                     init_lora_weights="gaussian"))
        for p in model.parameters():  # adapters train in fp32 on a (possibly bf16) frozen base
            if p.requires_grad:
                p.data = p.data.float()
    else:
        model.float().requires_grad_(True)
    model.train()
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


class TwoStepStudent(nn.Module):
    """``transformer`` runs step 1 (σ=1 → σ_mid); ``transformer_2`` step 2 (σ_mid → 0), or None when
    the two steps share one parameter set (``decoupled=False``). Both start as copies of ``base``
    (default: the teacher family's transformer). ``sigma_mid``: the trainer passes the value its store
    records (docs/design.md, "The mid state")."""

    def __init__(self, family: Family, sigma_mid: float, decoupled: bool = True, lora_rank: int = 0,
                 gradient_checkpointing: bool = False, base: nn.Module | None = None):
        super().__init__()
        self.family = family  # not a module: the adapter holds the frozen teacher pipeline
        self.sigma_mid = float(sigma_mid)
        base = family.transformer if base is None else base
        targets = list(family.lora_targets)
        self.transformer = _trainable_copy(base, lora_rank, gradient_checkpointing, targets)
        self.transformer_2 = (_trainable_copy(base, lora_rank, gradient_checkpointing, targets)
                              if decoupled else None)
        self.lora_rank = lora_rank
        n = sum(p.numel() for p in self.parameters() if p.requires_grad)
        log.info("student: %s, %.2fM trainable parameters%s", "two parameter sets" if decoupled else "one shared set",
                 n / 1e6, f" (LoRA rank {lora_rank})" if lora_rank else "")

    def step_model(self, step: int) -> nn.Module:
        return self.transformer if step == 1 or self.transformer_2 is None else self.transformer_2

    def forward(self, noise: torch.Tensor, caps: list[torch.Tensor], e2e: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """noise (B, C, h, w) at σ=1, caption features → (x̂0 of step 1, state at σ_mid, final x0).

        ``e2e=False`` detaches the step-1 state, so final losses do not reach step 1.
        """
        def v1(x, s):
            return self.family.velocity(self.step_model(1), x, s, caps)

        def v2(x, s):
            return self.family.velocity(self.step_model(2), x, s, caps)

        return two_step(v1, v2, noise, self.sigma_mid, detach_mid=not e2e)

    def export_transformers(self) -> tuple[nn.Module, nn.Module | None]:
        """Stock transformer copies (LoRA fused in) for export and sampling."""
        out = []
        for m in (self.transformer, self.transformer_2):
            if m is None:
                out.append(None)
                continue
            m = copy.deepcopy(m)
            if self.lora_rank:
                m.fuse_lora()
                m.unload_lora()
            out.append(m.eval().requires_grad_(False))
        return out[0], out[1]


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module``'s parameters are FSDP2 shards (``DTensor``)."""
    return any(hasattr(p, "to_local") for p in module.parameters())


def gather_student(student: TwoStepStudent, main: bool) -> TwoStepStudent | None:
    """An unsharded copy, on the CPU, of a student whose parameters are FSDP2 shards: the full
    weights are gathered into the main process and loaded into a student of the same structure
    built on the ``meta`` device (no second random initialisation). A collective call: every rank
    calls it; ranks other than the main one get ``None``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return None
    with torch.device("meta"):
        base = type(student.transformer).from_config(student.transformer.config)
    copy_ = TwoStepStudent(student.family, student.sigma_mid, student.transformer_2 is not None, student.lora_rank,
                           base=base)
    missing, unexpected = copy_.load_state_dict(state, strict=False, assign=True)
    left = [n for n, t in [*copy_.named_parameters(), *copy_.named_buffers()] if t.is_meta]
    if missing or unexpected or left:
        raise RuntimeError(f"gathered student state does not fit: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}, unfilled {left[:3]}")
    return copy_
