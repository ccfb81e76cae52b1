"""FSDP2 on the CPU (gloo, 2 processes): the EMA works on shards and saves per rank, and the export
gathers the full weights (EMA applied, LoRA fused) into the main process. accelerate runs FSDP only
on GPUs, so this drives torch's ``fully_shard`` directly on the same student classes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("lora", [0, 4])
def test_fsdp2_ema_and_export_gather(tiny_pipeline_dir, tmp_path, lora, free_port):
    worker = __file__.replace("test_fsdp.py", "fsdp_worker.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), worker, tiny_pipeline_dir, str(tmp_path),
                        str(lora)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads((tmp_path / "result.json").read_text())
    assert res["ema_ok"] and res["live_ok"], res
    assert res["export_diff"] <= 1e-5 * res["output_scale"], res  # float rounding only
    assert res["trainable"] > 0
    assert (tmp_path / "ema-rank0.safetensors").exists() and (tmp_path / "ema-rank1.safetensors").exists()
