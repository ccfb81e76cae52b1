"""Run by test_fsdp.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): a student sharded with
FSDP2, its EMA on the shards, the per-rank EMA files, and the export's gather of the full weights."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from diffusers import ZImageTransformer2DModel
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import fully_shard

from twostep.teacher.families.zimage import ZImageFamily
from twostep.trainer.checkpoint import EMA
from twostep.trainer.student import TwoStepStudent, gather_student, is_sharded


def build(teacher: torch.nn.Module, lora: int) -> TwoStepStudent:
    torch.manual_seed(0)  # LoRA's gaussian init: the same on every rank and in the reference
    return TwoStepStudent(ZImageFamily(None), 0.75, decoupled=True, lora_rank=lora, base=teacher)


def main(tiny_dir: str, out: str, lora: int) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    teacher = ZImageTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    student = build(teacher, lora)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    for m in (student.transformer, student.transformer_2):
        for block in m.layers:
            fully_shard(block)
        fully_shard(m)
    assert is_sharded(student)
    ema = EMA(student, 0.5)
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.01)
    ema.update(student, step=10**6)  # decay 0.5: shadow = initial + 0.005, live = initial + 0.01
    # the EMA state is this rank's plain tensors: it saves and loads per rank
    path = f"{out}/ema-rank{rank}.safetensors"
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, path)
    again = EMA(student, 0.5)
    again.load_state_dict(load_file(path))
    assert all(torch.equal(again.shadow[k], ema.shadow[k]) for k in ema.shadow)
    with ema.applied(student):
        full = gather_student(student, rank == 0)
    live = gather_student(student, rank == 0)  # the live weights are back after the EMA context
    if rank == 0:
        ref = build(teacher, lora)
        ref_ema, ref_live = ref.state_dict(), {}
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if p.requires_grad:
                    ref_live[n] = p + 0.01
                    ref_ema[n] = p + 0.005
        got, got_live = full.state_dict(), live.state_dict()
        ema_ok = set(got) == set(ref_ema) and all(torch.allclose(got[k], ref_ema[k]) for k in got)
        live_ok = all(torch.allclose(got_live[k], ref_live[k]) for k in trainable)
        # the exported (LoRA-fused) transformers compute what the unsharded reference computes
        ref.load_state_dict(ref_ema)
        (e1, e2), (r1, r2) = full.export_transformers(), ref.export_transformers()
        torch.manual_seed(1)
        x = [torch.randn(e1.config.in_channels, 1, 8, 8)]
        cap = [torch.randn(5, e1.config.cap_feat_dim)]
        t = torch.tensor([0.3])
        with torch.no_grad():
            diff = max(float((a(x, t, cap)[0][0] - b(x, t, cap)[0][0]).abs().max()) for a, b in ((e1, r1), (e2, r2)))
            scale = float(r1(x, t, cap)[0][0].abs().max())
        with open(f"{out}/result.json", "w") as f:
            json.dump({"ema_ok": ema_ok, "live_ok": live_ok, "export_diff": diff, "output_scale": scale, "trainable": len(trainable),
                       "sharded_local": [tuple(p.to_local().shape) for p in student.transformer.parameters()][:1]}, f)
    else:
        assert full is None and live is None
    dist.barrier()  # both ranks tear gloo down together (a rank leaving early can abort under load)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
