"""Fingerprint what twostep writes, to show that a change of code leaves the bytes alone.

    python experiments/bit_identity.py run --out /tmp/fp-new.json [--work DIR]
    python experiments/bit_identity.py compare /tmp/fp-old.json /tmp/fp-new.json

``run`` drives the ``twostep`` command on ``PATH`` (so the same script fingerprints an older checkout
installed elsewhere): 96 toy prompts, a store generated on a local Ray cluster (2 workers, shards of
32), a 6-step toy training run with a checkpoint at step 3 and 6 and its export, and the exported
student's 2-step samples for 4 prompts; it records the sha256 of each file, and of each member of
a shard tar. ``compare`` lists every
key whose hash differs or that only one side has, and exits 1 if any.

Every file of the store, of the run's ``checkpoints/`` (weights, optimiser and RNG states, data
position) and of the exported ``student/`` is fingerprinted, and ``config.yaml``. Left out, as they
hold wall times by design: the logs, ``run.json``/``result.json`` and the store's dataset card
(``README.md``, which states the job's duration). JSON files are compared after dropping the keys
that record wall times or the code version (:data:`TIME_KEYS`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TIME_KEYS = {"seconds", "committed_at", "worker", "code_version", "_name_or_path", "sha256", "bytes", "shards_hash"}
"""JSON keys left out of a comparison: wall times (``seconds``, ``committed_at``), which worker made a
shard, the code version, the folder a component was loaded from, and a shard tar's checksum and size
(the tar holds each sample's generation time, so its members are compared one by one instead), and
the data position's hash of those checksums."""
WORK = Path(tempfile.gettempdir()) / "twostep-bit-identity"
"""One fixed working folder: the data position a checkpoint records hashes the shard URLs."""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIME_KEYS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _rng_hash(path: Path) -> str:
    """accelerate's RNG file without the process-global Python and NumPy states: twostep draws from
    seeded torch generators only and never seeds those two, so they differ between any two runs."""
    import torch

    # written moments ago by the run this script started: its own file, not untrusted input
    states = torch.load(path, weights_only=False)
    kept = {k: v for k, v in states.items() if k not in ("random_state", "numpy_random_seed")}
    return _sha(repr({k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in sorted(kept.items())}).encode())


def _file_hash(path: Path) -> str:
    if path.name.startswith("random_states_"):
        return _rng_hash(path)
    if path.suffix == ".md":  # the exported student's card quotes its run record, code version included
        return _sha("\n".join(line for line in path.read_text().splitlines() if '"code_version"' not in line).encode())
    if path.suffix == ".json":
        try:
            return _sha(json.dumps(_strip(json.loads(path.read_text())), sort_keys=True).encode())
        except ValueError:
            pass
    return _sha(path.read_bytes())


def _tar_hashes(path: Path) -> dict[str, str]:
    with tarfile.open(path) as tar:
        return {m.name: _sha(json.dumps(_strip(json.loads(data)), sort_keys=True).encode()) if m.name.endswith(".json")
                else _sha(data) for m in tar.getmembers() if m.isfile()
                for data in [tar.extractfile(m).read()]}


def _run(cmd: list[str], cwd: Path) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def fingerprint(work: Path) -> dict[str, str]:
    work.mkdir(parents=True, exist_ok=True)
    manifest, store, run = work / "train.parquet", work / "store", work / "run"
    _run(["twostep", "-q", "prompts", "toy", "-n", "96", "-o", str(manifest), "--seed", "0"], work)
    _run(["twostep", "-q", "generate", "--manifest", str(manifest), "--out", str(store), "--num-workers", "2",
          "--shard-size", "32", "--batch-size", "8"], work)
    _run(["twostep", "-q", "train", "--config", "toy", "--data", str(store), "--out", str(run),
          "max_steps=6", "checkpoint_every=3", "keep_checkpoints=2", "log_with=none", "sample_every=0",
          "data.batch_size=8", "data.heldout_fraction=0.0", "optim.warmup_steps=2", "loss.adv_warmup_steps=2"], work)
    out: dict[str, str] = {}
    for f in sorted(store.rglob("*")):
        if f.is_file() and f.suffix == ".tar":
            out.update({f"store/{f.relative_to(store)}:{m}": h for m, h in _tar_hashes(f).items()})
        elif f.is_file() and f.name != "README.md":
            out[f"store/{f.relative_to(store)}"] = _file_hash(f)
    for f in sorted(run.rglob("*")):
        rel = f.relative_to(run)
        if f.is_file() and (rel.parts[0] in {"checkpoints", "student"} or f.name == "config.yaml"):
            out[f"run/{rel}"] = _file_hash(f)
    samples = work / "samples"
    shutil.rmtree(samples, ignore_errors=True)
    prompts = ["a red circle", "two blue squares", "a green triangle on a yellow background", "a small purple star"]
    _run(["twostep", "-q", "sample", "--student", str(run / "student"), "--out", str(samples), "--seed", "7",
          *[a for p in prompts for a in ("--prompt", p)]], work)
    for f in sorted(samples.rglob("*.png")):
        out[f"samples/{f.relative_to(samples)}"] = _file_hash(f)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="fingerprint the twostep on PATH")
    r.add_argument("--out", required=True, help="JSON file for the fingerprints")
    r.add_argument("--work", default=str(WORK), help="working folder, emptied first; compare runs made in the same "
                   "folder (default: %(default)s)")
    c = sub.add_parser("compare", help="compare two fingerprint files; exit 1 on any difference")
    c.add_argument("old")
    c.add_argument("new")
    args = ap.parse_args(argv)
    if args.cmd == "run":
        work = Path(args.work)
        shutil.rmtree(work, ignore_errors=True)
        fp = fingerprint(work)
        Path(args.out).write_text(json.dumps(fp, indent=1, sort_keys=True) + "\n")
        print(f"{len(fp)} files fingerprinted into {args.out} (work folder {work})")
        return 0
    old, new = (json.loads(Path(p).read_text()) for p in (args.old, args.new))
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    for k in diff:
        print(f"{'differs' if k in old and k in new else 'only in ' + ('old' if k in old else 'new')}: {k}")
    print(f"{len(old.keys() & new.keys()) - len([k for k in diff if k in old and k in new])} identical, "
          f"{len(diff)} different or one-sided")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
