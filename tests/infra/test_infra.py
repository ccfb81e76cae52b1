"""infra/: every launcher file parses, names entrypoints and flags that exist, and the generation
job submitted with ``ray job submit`` to a local Ray cluster writes a valid store in a bucket."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
ACCEL = ROOT / "trainer" / "configs" / "accelerate"
TWOSTEP = [sys.executable, "-m", "twostep.cli"]
VERSION = importlib.metadata.version("twostep")


def run_twostep(argv: list[str]) -> dict:
    """Run a ``twostep`` command line with ``--dry-run`` through the real CLI; returns its JSON or config."""
    assert argv[0] in ("generate", "train"), argv
    r = subprocess.run([*TWOSTEP, *argv, "--dry-run"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, f"{shlex.join(argv)}\n{r.stderr}"
    return json.loads(r.stdout) if argv[0] == "generate" else yaml.safe_load(r.stdout)


def twostep_argv(cmd: str) -> list[str]:
    words = shlex.split(cmd)
    return words[words.index("twostep") + 1:]


# --- accelerate --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["1gpu", "ddp_8gpu", "fsdp_8gpu", "fsdp_multinode"])
def test_accelerate_configs_load_with_accelerates_own_classes(name):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = ACCEL / f"{name}.yaml"
    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.mixed_precision == "bf16" and not cfg.use_cpu
    assert cfg.num_processes % cfg.num_machines == 0
    # accelerate launch merges the file with the command line the same way
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(
        ["--config_file", str(path), "-m", "twostep.cli", "train"]))
    assert (args.num_processes, args.num_machines) == (cfg.num_processes, cfg.num_machines)
    expected = {"1gpu": "NO", "ddp_8gpu": "MULTI_GPU", "fsdp_8gpu": "FSDP", "fsdp_multinode": "FSDP"}[name]
    assert cfg.distributed_type.value == expected
    if expected == "FSDP":
        import diffusers.models.transformers.transformer_z_image as zi

        layer = cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
        assert hasattr(zi, layer), f"{path}: {layer} is not a Z-Image class"
        assert args.use_fsdp


@pytest.mark.parametrize("config", ["zimage_turbo_8gpu", "zimage_turbo_lora", "toy"])
def test_trainer_configs_named_by_the_launchers_resolve(config):
    cfg = run_twostep(["train", "--config", config, "--data", "s3://bucket/store", "--out", "/tmp/never-written"])
    assert cfg["data"]["data"] == "s3://bucket/store"


# --- fake cluster commands: accelerate parses for real, then the trainer runs with --dry-run --------


FAKE_ACCELERATE = """#!{python}
import json, os, subprocess, sys
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser

argv = sys.argv[1:]
assert argv[0] == "launch", argv
args = launch_command_parser().parse_args(argv[1:])
load_config_from_file(args.config_file)
args, _, _ = _validate_launch_command(args)
assert args.module, "the launchers start the trainer as a module"
out = subprocess.run([sys.executable, "-m", args.training_script, *args.training_script_args, "--dry-run"],
                     capture_output=True, text=True)
rec = {{"rc": out.returncode, "stderr": out.stderr[-2000:], "stdout": out.stdout,
        "module": args.training_script, "script_args": args.training_script_args,
        "num_processes": args.num_processes, "num_machines": args.num_machines,
        "machine_rank": args.machine_rank, "main_process_ip": args.main_process_ip,
        "main_process_port": args.main_process_port, "use_fsdp": args.use_fsdp,
        "config_file": args.config_file}}
with open(os.environ["LAUNCH_LOG"], "a") as f:
    f.write(json.dumps(rec) + "\\n")
sys.exit(out.returncode)
"""


@pytest.fixture
def fake_bin(tmp_path):
    """A PATH folder with ``accelerate`` (real parsing, trainer dry run), ``srun`` (runs its command
    once per node with SLURM_NODEID set) and ``scontrol`` (expands the node list)."""
    b = tmp_path / "bin"
    b.mkdir()
    (b / "accelerate").write_text(FAKE_ACCELERATE.format(python=sys.executable))
    (b / "srun").write_text("#!/bin/bash\n"
                            "while [[ $1 == --* ]]; do shift; done\n"
                            "for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n \"$@\" || exit $?; done\n")
    (b / "scontrol").write_text("#!/bin/bash\n"
                                "[[ $1 == show && $2 == hostnames ]] || exit 2\n"
                                "for ((n = 0; n < SLURM_NNODES; n++)); do echo gpu-node-$n; done\n")
    for f in b.iterdir():
        f.chmod(0o755)
    log = tmp_path / "launches.jsonl"
    env = {**os.environ, "PATH": f"{b}:{os.environ['PATH']}", "LAUNCH_LOG": str(log), "VENV": str(tmp_path / "none")}
    return env, log


def read_launches(log: Path) -> list[dict]:
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    for r in recs:
        assert r["rc"] == 0, r["stderr"]
    return recs


def test_slurm_script_launches_one_accelerate_per_node(fake_bin):
    env, log = fake_bin
    script = INFRA / "slurm" / "train.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {**env, "SLURM_JOB_NODELIST": "gpu-node-[0-1]", "SLURM_NNODES": "2", "DATA": "s3://b/store",
           "RUN_DIR": "/shared/run"}
    r = subprocess.run(["bash", str(script), "optim.lr=2e-5"], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    recs = read_launches(log)
    assert sorted(x["machine_rank"] for x in recs) == [0, 1]
    for x in recs:
        assert x["module"] == "twostep.cli" and x["script_args"][0] == "train"
        assert (x["num_machines"], x["num_processes"], x["main_process_ip"]) == (2, 16, "gpu-node-0")
        assert x["use_fsdp"]
        cfg = yaml.safe_load(x["stdout"])
        assert cfg["data"]["data"] == "s3://b/store" and cfg["optim"]["lr"] == 2e-5
    directives = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert any("--signal=TERM@" in d for d in directives)


def load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_kubernetes_indexed_job_launches_rank_from_the_completion_index(fake_bin):
    env, log = fake_bin
    docs = load_all(INFRA / "k8s" / "train-job.yaml")
    svc = next(d for d in docs if d["kind"] == "Service")
    job = next(d for d in docs if d["kind"] == "Job")
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert svc["spec"]["clusterIP"] == "None" and pod["subdomain"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    (c,) = pod["containers"]
    assert c["image"].endswith(f"/twostep:{VERSION}")
    penv = {e["name"]: e["value"] for e in c["env"]}
    assert int(penv["NUM_MACHINES"]) == spec["completions"]
    assert penv["MAIN_HOST"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == int(penv["GPUS_PER_NODE"])
    assert pod["securityContext"]["runAsNonRoot"]
    for index in range(spec["completions"]):  # what every pod runs, as the Job runs it
        r = subprocess.run([*c["command"], *c["args"]], env={**env, **penv, "JOB_COMPLETION_INDEX": str(index)},
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    recs = read_launches(log)
    assert sorted(x["machine_rank"] for x in recs) == list(range(spec["completions"]))
    assert all(x["num_processes"] == spec["completions"] * int(penv["GPUS_PER_NODE"]) for x in recs)
    assert all(yaml.safe_load(x["stdout"])["data"]["data"] == penv["DATA"] for x in recs)


# --- Ray -----------------------------------------------------------------------------------------


def check_ray_cluster_spec(spec: dict, image: str) -> int:
    """A KubeRay cluster spec: CPU-only head, an autoscaling 1-GPU worker group; returns max GPUs."""
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert spec["enableInTreeAutoscaling"] is True
    gpus = 0
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (c,) = group["template"]["spec"]["containers"]
        assert c["image"] == image
        per_pod = int(c["resources"]["limits"]["nvidia.com/gpu"])
        assert per_pod == int(c["resources"]["requests"]["nvidia.com/gpu"])
        gpus += per_pod * group["maxReplicas"]
        assert group["template"]["spec"]["securityContext"]["runAsNonRoot"]
    assert head["template"]["spec"]["containers"][0]["image"] == image
    return gpus


def test_kuberay_rayjob_entrypoint_is_a_valid_generate_command():
    (job,) = load_all(INFRA / "ray" / "rayjob-generate.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    image = f"REGISTRY/twostep:{VERSION}"
    max_gpus = check_ray_cluster_spec(job["spec"]["rayClusterSpec"], image)
    argv = twostep_argv(job["spec"]["entrypoint"])
    cfg = run_twostep(argv)
    assert cfg["out"].startswith("s3://") and cfg["manifest"].startswith("s3://")
    assert cfg["gpus_per_worker"] == 1 and cfg["num_workers"] <= max_gpus
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_kuberay_raycluster_and_its_submit_command():
    (cluster,) = load_all(INFRA / "ray" / "raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    max_gpus = check_ray_cluster_spec(cluster["spec"], f"REGISTRY/twostep:{VERSION}")
    submit = commands_in_comments(INFRA / "ray" / "raycluster.yaml", "ray job submit")
    assert submit
    for cmd in submit:
        cfg = run_twostep(twostep_argv(cmd))
        assert cfg["num_workers"] <= max_gpus


def commands_in_comments(path: Path, start: str) -> list[str]:
    """Shell commands quoted in a file's comments, continuation lines joined."""
    lines = [line.lstrip("#").strip() for line in path.read_text().splitlines() if line.startswith("#")]
    out, cur = [], None
    for line in lines:
        if cur is not None:
            cur += " " + line.rstrip("\\").strip()
            if not line.endswith("\\"):
                out.append(cur)
                cur = None
        elif line.startswith(start):
            if line.endswith("\\"):
                cur = line.rstrip("\\").strip()
            else:
                out.append(line)
    return out


def test_ray_cluster_launcher_yaml_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    path = INFRA / "ray" / "cluster-aws.yaml"
    cfg = yaml.safe_load(path.read_text())
    validate_config(prepare_config(cfg))
    assert cfg["docker"]["image"] == f"REGISTRY/twostep:{VERSION}"
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}
    for cmd in commands_in_comments(path, "ray job submit"):
        assert run_twostep(twostep_argv(cmd))["gpus_per_worker"] == 1
    bad = yaml.safe_load(path.read_text())
    bad["available_node_types"]["gpu_8x_h100"]["max_wokers"] = 2  # a typo is caught by the same check
    with pytest.raises(Exception, match="max_wokers"):
        validate_config(prepare_config(bad))


def test_dockerfile_builds_the_project_as_a_non_root_user():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    instructions = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith("#")
                    and line.split(None, 1)[0].isupper()]
    first = next(i for i in instructions if i[0] in ("FROM", "ARG") and "CUDA_BASE" in i[1])
    assert "nvidia/cuda:" in first[1]
    users = [i[1].strip() for i in instructions if i[0] == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(i[0] == "RUN" and "pip install --no-deps ." in i[1] for i in instructions)
    build = f"docker build -f infra/docker/Dockerfile -t twostep:{VERSION} ."
    assert build in text and build in (INFRA / "README.md").read_text()
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".git"} <= set(ignored)


# --- ray job submit to a local cluster ------------------------------------------------------------


@pytest.fixture
def ray_head(free_port):
    """``ray start --head --block`` on 127.0.0.1 with its own ports and temp dir; stopping the
    blocking process stops exactly the processes it started (no global ``ray stop``)."""
    tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # Ray's socket paths must stay short
    dash = free_port()
    cmd = ["ray", "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
           "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
           "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", tmp, "--disable-usage-stats"]
    # Ray ≥ 2.59 requires a token on local clusters; this cluster's own, passed to every client
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
    log = open(Path(tmp) / "head.log", "wb")  # closed at teardown
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 180
    import urllib.request

    req = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"})
    while True:
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"ray head did not come up: {(Path(tmp) / 'head.log').read_text()[-3000:]}")
        time.sleep(1)
    yield address, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:  # Ray's own shutdown waits up to 30 s on its processes; the job is done and nothing is kept
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    log.close()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
def test_generate_submitted_with_ray_job_submit_writes_a_valid_store_in_a_bucket(ray_head, s3_server, tmp_path):
    import s3fs

    address, env = ray_head
    import webdataset as wds

    manifest = tmp_path / "toy.parquet"
    subprocess.run([*TWOSTEP, "prompts", "toy", "-n", "12", "-o", str(manifest), "--seed", "3"], check=True,
                   capture_output=True, timeout=120)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_server)
    prefix = f"twostep-test/rayjob-{os.getpid()}-{time.time_ns()}"
    fs.put(str(manifest), f"{prefix}/toy.parquet")
    opts = json.dumps(s3_server)
    entry = ["twostep", "generate", "--manifest", f"s3://{prefix}/toy.parquet", "--out", f"s3://{prefix}/store",
             "--teacher", "toy", "--shard-size", "4", "--batch-size", "4", "--num-workers", "1",
             "--image-format", "png", "--storage-options", opts]
    runtime_env = json.dumps({"env_vars": {"OMP_NUM_THREADS": "1"}})
    submit = ["ray", "job", "submit", "--address", address, "--runtime-env-json", runtime_env, "--", *entry]
    deadline = time.time() + 120
    while True:
        r = subprocess.run(submit, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
        # the dashboard answers before the head's job agent has registered; Ray itself says to retry
        if "No available agent to submit job" not in r.stderr + r.stdout or time.time() > deadline:
            break
        time.sleep(2)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout, r.stdout[-3000:]
    assert "complete: 12 samples in 3/3 shards" in r.stdout
    # a valid store: verify passes, and the plain webdataset reader sees every sample
    v = subprocess.run([*TWOSTEP, "verify", f"s3://{prefix}/store", "--storage-options", opts, "--json"],
                       capture_output=True, text=True, timeout=300)
    assert v.returncode == 0, v.stdout + v.stderr
    report = json.loads(v.stdout)
    assert report["ok"] and report["samples"] == 12
    fs.get(f"{prefix}/store/shards/", str(tmp_path / "shards"), recursive=True)
    urls = sorted(str(p) for p in (tmp_path / "shards").glob("*.tar"))
    keys = []
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        assert sample["latent.npy"].dtype.name == "float16" and sample["txt"]
        keys.append(sample["__key__"])
    assert len(set(keys)) == 12


# --- capacity -------------------------------------------------------------------------------------


def load_capacity():
    import importlib.util

    spec = importlib.util.spec_from_file_location("capacity", INFRA / "capacity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_capacity_counts_what_a_real_forward_costs():
    import torch
    from diffusers import ZImageTransformer2DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cap = load_capacity()
    folder = ROOT / "toy" / "teacher"
    cfgs = cap.load_configs(str(folder))  # read from the folder's own config files
    flops, params = cap.transformer_flops(cfgs["transformer"], (16, 16), 12)
    real = ZImageTransformer2DModel.from_pretrained(folder, subfolder="transformer").float()
    assert params == sum(p.numel() for p in real.parameters())
    # the math attention backend: FlopCounterMode (torch 2.14) has no formula for the fused CPU
    # attention kernel a real CPU forward otherwise takes, so it would count no attention at all
    with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        real([torch.randn(real.config.in_channels, 1, 16, 16)], torch.tensor([0.5]),
             [torch.randn(12, real.config.cap_feat_dim)])
    assert flops == fc.get_total_flops() > 0
    # the published Z-Image-Turbo config reproduces its published size, and the plan adds up
    p = cap.plan(cap.ZIMAGE_TURBO, 1024, 1024, 128, 512, 8, 1000, 989.0, 1, None)
    assert abs(p["transformer_params"] / 1e9 - 6.15) < 0.01
    f = p["flops"]
    assert f["teacher_8_steps"] == 8 * f["transformer_call"] + f["text_encoder"] + f["vae_decode"]
    assert p["bytes_per_sample"]["latents_only"] == 2 * (512 + 524_288 + 512) + 2 * (512 + 1024)
    assert p["floor"]["gpu_hours"] == pytest.approx(1000 * f["teacher_8_steps"] / 989e12 / 3600)


def test_capacity_training_throughput_per_node_from_a_results_file(tmp_path):
    cap = load_capacity()
    path = tmp_path / "train.json"
    path.write_text(json.dumps({
        "device": "NVIDIA H200", "slope": {"batch=4": {"step_s_at_30": 10.0, "fsdp8": {"per_gpu_gib_estimate": 60.0}},
                                           "computed_state_gib_at_30": {"students": 229.1}},
        "lora": {"batch": 1, "rank": 64, "layers": 30, "step_s": 4.0, "peak_gib": 50.0}}))
    t = cap.training_plan(str(path), 1_000_000)
    full, lora = t["rows"]
    assert full["kind"] == "full" and full["images_per_s_per_node"] == pytest.approx(8 * 4 / 10.0)
    assert full["node_hours"] == pytest.approx(1e6 / 3.2 / 3600) and full["per_gpu_gib"] == 60.0
    assert lora["kind"] == "lora64" and lora["images_per_s_per_node"] == pytest.approx(2.0)
    assert lora["node_hours"] == pytest.approx(1e6 / 2.0 / 3600)


def test_capacity_refuses_results_files_it_cannot_use(tmp_path):
    cap = load_capacity()
    empty, broken = tmp_path / "empty.json", tmp_path / "broken.json"
    empty.write_text("{}")
    broken.write_text("not json")
    with pytest.raises(SystemExit, match="empty.json: no median_worker"):
        cap.read_bench(str(empty))
    with pytest.raises(SystemExit, match="empty.json: neither slope nor lora"):
        cap.training_plan(str(empty), 10)
    with pytest.raises(SystemExit, match="broken.json: cannot read it as JSON"):
        cap.read_bench(str(broken))
    with pytest.raises(SystemExit, match="empty.json: no dispatch_cpu_ms_per_shard or driver_cpu_ms_per_shard"):
        cap.read_fleet_bench(str(empty))


def test_capacity_fleet_rows_follow_from_the_rate_and_the_shard_size(tmp_path):
    cap = load_capacity()
    p = {"floor": {"images_per_gpu_hour": 3600.0}, "measured": {"images_per_gpu_hour": 1800.0},
         "bytes_per_sample": {"latents_only": 1000, "with_image_at_most": 4000}}
    bench = tmp_path / "fleet.json"
    bench.write_text(json.dumps({"runs": [{"driver_cpu_ms_per_shard": 9.0, "dispatch_cpu_ms_per_shard": 2.0},
                                          {"driver_cpu_ms_per_shard": 3.0, "dispatch_cpu_ms_per_shard": 1.5}]}))
    ms = cap.read_fleet_bench(str(bench))
    assert ms == 2.0  # the largest start-up-free figure where any run has one
    bench.write_text(json.dumps({"runs": [{"driver_cpu_ms_per_shard": 9.0}, {"driver_cpu_ms_per_shard": 3.0}]}))
    assert cap.read_fleet_bench(str(bench)) == 9.0
    ms = 3.0
    f = cap.fleet_plan(p, gpus=1000, prompts=100_000_000, shard_size=256, driver_ms_per_shard=ms)
    assert f["rate_from"] == "measured" and f["shards"] == 390_625  # ceil(1e8 / 256)
    assert f["images_per_s"] == pytest.approx(1000 * 0.5)
    assert f["wall_days"] == pytest.approx(1e8 / 500 / 86400)
    assert f["commits_per_s"] == pytest.approx(500 / 256) and f["puts_per_s"] == pytest.approx(2 * 500 / 256)
    assert f["requests"] == 2 * 390_625 and f["rerun_requests"] == 13 + 782
    assert f["driver_core_fraction"] == pytest.approx(500 / 256 * 3.0 / 1000)
    assert f["storage_latents_only"] == 1e11
    assert "390,625" in cap.fleet_table(f) and "of one core" in cap.fleet_table(f)
    assert "driver_core_fraction" not in cap.fleet_plan(p, 8, 1000, 256, None)
