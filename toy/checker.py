"""The toy world's attribute checker: a small CNN that reads shape, colour, size, position and
background off an image, and gives penultimate features for a Fréchet distance.

An analytic shape rule is unreliable on small renders (0.79 at 32×32; docs/toy_world.md, "The
checker"), so the checker is learned from renders with known labels. Train (about 4 minutes on
one CPU core)::

    python -m twostep.toy.checker --out-dir pipeline/toy

The weights and their config live in one ``checker.safetensors`` (config in its metadata, no
pickles); ``checker.json`` beside it records the training run and held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from twostep.toy.world import ATTRIBUTES, CLASSES, sample_scene

from .render import render_batch

DEFAULT_PATH = Path(__file__).with_name("checker.safetensors")
INPUT_SIZE = 64
DEFAULT_ARCH: dict[str, Any] = {"widths": [16, 32, 48, 64, 96], "spatial_channels": 8, "feature_dim": 128,
                                "input_size": INPUT_SIZE}


class CheckerNet(nn.Module):
    """3×3 conv stack (BN, ReLU) 64→32→16→8 px, one more conv at 8×8, then two readouts:
    global max+mean pooling (translation invariant: shape, colour, size, background) and a 1×1
    conv flattened over the 8×8 grid (where the object is). Both feed one shared ``feature_dim``
    vector and a linear head per attribute. Pooling matters: a flatten-only readout must learn
    each shape anew at every position and trains several times slower."""

    def __init__(self, widths: Sequence[int] = (16, 32, 48, 64, 96), spatial_channels: int = 8,
                 feature_dim: int = 128, input_size: int = INPUT_SIZE):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i, w in enumerate(widths):  # first and last convs keep resolution, the others halve it
            stride = 1 if i in (0, len(widths) - 1) else 2
            layers += [nn.Conv2d(c_in, w, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(inplace=True)]
            c_in = w
        self.conv = nn.Sequential(*layers)
        side = input_size >> (len(widths) - 2)
        self.spatial = nn.Sequential(nn.Conv2d(c_in, spatial_channels, 1), nn.ReLU(inplace=True), nn.Flatten())
        self.fc = nn.Sequential(nn.Linear(2 * c_in + spatial_channels * side * side, feature_dim),
                                nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({a: nn.Linear(feature_dim, len(CLASSES[a])) for a in ATTRIBUTES})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``x`` (N, 3, 64, 64) in [-1, 1] → features (N, D) and logits per attribute."""
        h = self.conv(x)  # (N, C, 8, 8)
        pooled = torch.cat([h.amax(dim=(2, 3)), h.mean(dim=(2, 3)), self.spatial(h)], dim=1)
        f = self.fc(pooled)
        return f, {a: head(f) for a, head in self.heads.items()}


def to_input(images: np.ndarray | torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 NHWC (numpy or torch), or float NCHW in [-1, 1] → float32 (N, 3, size, size)."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.dtype == torch.uint8:
        x = x.unsqueeze(0) if x.ndim == 3 else x
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    x = x.float().unsqueeze(0) if x.ndim == 3 else x.float()
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected uint8 NHWC or float NCHW RGB images, got shape {tuple(x.shape)}")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def labels_of(scenes: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Class indices (N,) per attribute of scenes (``ToyScene`` or attribute dicts)."""
    get = (lambda s, a: s[a]) if scenes and isinstance(scenes[0], dict) else getattr
    return {a: torch.tensor([CLASSES[a].index(get(s, a)) for s in scenes]) for a in ATTRIBUTES}


class AttributeChecker:
    """A trained :class:`CheckerNet` in eval mode with numpy-friendly, batched, no-grad helpers."""

    def __init__(self, net: CheckerNet, batch_size: int = 256):
        self.net = net.eval()
        self.batch_size = batch_size
        self.device = next(net.parameters()).device

    @torch.no_grad()
    def _run(self, images: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Features (N, D) and logits per attribute, on the CPU, computed ``batch_size`` at a time."""
        images = images[None] if images.ndim == 3 else images  # one image → a batch of one
        feats: list[torch.Tensor] = [torch.zeros(0, self.net.fc[0].out_features)]
        logits = {a: [torch.zeros(0, len(CLASSES[a]))] for a in ATTRIBUTES}
        for i in range(0, len(images), self.batch_size):
            f, out = self.net(to_input(images[i:i + self.batch_size]).to(self.device))
            feats.append(f.float().cpu())
            for a in ATTRIBUTES:
                logits[a].append(out[a].float().cpu())
        return torch.cat(feats), {a: torch.cat(v) for a, v in logits.items()}

    def predict(self, images: np.ndarray | torch.Tensor) -> list[dict[str, str]]:
        """Predicted attribute names per image."""
        return self.names(self.probs(images))

    @staticmethod
    def names(probs: dict[str, np.ndarray]) -> list[dict[str, str]]:
        """:meth:`predict` from probabilities already computed (:meth:`probs`)."""
        idx = {a: v.argmax(1).tolist() for a, v in probs.items()}
        return [{a: CLASSES[a][idx[a][i]] for a in ATTRIBUTES} for i in range(len(idx["shape"]))]

    def probs(self, images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
        """Softmax probabilities (N, classes) per attribute (e.g. for distributions of omitted ones)."""
        _, logits = self._run(images)
        return {a: v.softmax(1).numpy() for a, v in logits.items()}

    def features(self, images: np.ndarray | torch.Tensor) -> np.ndarray:
        """Penultimate features (N, D) float64, for Fréchet distances."""
        return self._run(images)[0].double().numpy()

    def score(self, images: np.ndarray | torch.Tensor, named: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Accuracy over the attributes each caption names (``None`` or absent = not named).

        Returns ``{attr: accuracy or None, "all": rate of images with every named attribute right,
        "n": images, "counts": {attr: images naming it}}``.
        """
        return self.accuracy(self.predict(images), named)

    @staticmethod
    def accuracy(pred: Sequence[dict[str, str]], named: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """:meth:`score` from predictions already made (:meth:`predict`)."""
        if len(pred) != len(named):
            raise ValueError(f"{len(pred)} images but {len(named)} attribute rows")
        out: dict[str, Any] = {"n": len(pred), "counts": {}}
        all_ok = np.ones(len(pred), dtype=bool)
        for a in ATTRIBUTES:
            rows = [i for i, d in enumerate(named) if d.get(a) is not None]
            ok = np.array([pred[i][a] == named[i][a] for i in rows], dtype=bool)
            all_ok[rows] &= ok
            out[a] = float(ok.mean()) if rows else None
            out["counts"][a] = len(rows)
        out["all"] = float(all_ok.mean()) if len(pred) else None
        return out


def load_checker(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> AttributeChecker:
    """Load a checker saved by :func:`train_checker` (default: the shipped weights) onto ``device``."""
    path = Path(path) if path is not None else DEFAULT_PATH
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if json.loads(meta.get("classes", "null")) != {a: list(v) for a, v in CLASSES.items()}:
        raise ValueError(f"{path}: its classes do not match twostep.toy.world's attribute space")
    net = CheckerNet(**json.loads(meta["arch"]))
    net.load_state_dict(load_file(str(path)))
    return AttributeChecker(net.to(device))


def _batch(rng: np.random.Generator, n: int, small_frac: float = 0.0, noise: float = 0.0,
           colour_jitter: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` fresh renders (a ``small_frac`` share rendered at 32 px and upsampled, as a 32 px
    teacher's samples would be) with up to ``noise`` Gaussian noise (std in [-1, 1] units) and a
    per-image, per-channel colour offset uniform in ± ``colour_jitter`` ([-1, 1] units)."""
    scenes = [sample_scene(rng) for _ in range(n)]
    n_small = round(n * small_frac)
    parts = [to_input(render_batch(scenes[:n_small], 32))] if n_small else []
    parts.append(to_input(render_batch(scenes[n_small:], 64)))
    x = torch.cat(parts)
    if noise > 0:
        std = torch.from_numpy(rng.uniform(0, noise, size=(n, 1, 1, 1))).float()
        x = x + std * torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32))
    if colour_jitter > 0:
        x = x + torch.from_numpy(rng.uniform(-colour_jitter, colour_jitter, size=(n, 3, 1, 1))).float()
    return x, labels_of(scenes)


def evaluate(checker: AttributeChecker, n: int, seed: int, size: int = 64) -> dict[str, float]:
    """Per-attribute and all-attributes accuracy on ``n`` fully labelled renders at ``size``."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    s = checker.score(render_batch(scenes, size), [sc.named() for sc in scenes])
    return {a: round(s[a], 5) for a in (*ATTRIBUTES, "all")}


def train_checker(steps: int = 1200, batch_size: int = 64, seed: int = 0, out_dir: str | os.PathLike = ".",
                  lr: float = 2e-3, threads: int = 1, small_frac: float = 0.1, noise: float = 0.05,
                  colour_jitter: float = 0.1, eval_n: int = 2000, eval_seed: int | None = None, log_every: int = 100) -> dict[str, Any]:
    """Train on fresh random renders, evaluate on ``eval_n`` renders from ``eval_seed`` (default
    ``seed + 1_000_003``), write ``checker.safetensors`` + ``checker.json``; returns the record."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 0])  # training stream; evaluation seeds are plain ints
    eval_seed = seed + 1_000_003 if eval_seed is None else eval_seed
    net = CheckerNet(**DEFAULT_ARCH)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    warm = max(1, steps // 20)  # linear warm-up, then cosine decay to zero
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    t0 = time.perf_counter()
    net.train()
    for step in range(steps):
        x, y = _batch(rng, batch_size, small_frac, noise, colour_jitter)
        _, logits = net(x)
        loss = sum(F.cross_entropy(logits[a], y[a]) for a in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f} {time.perf_counter() - t0:.0f}s", flush=True)
    seconds = time.perf_counter() - t0
    checker = AttributeChecker(net)
    record = {
        "arch": DEFAULT_ARCH, "classes": {a: list(v) for a, v in CLASSES.items()},
        "params": sum(p.numel() for p in net.parameters()),
        "train": {"steps": steps, "batch_size": batch_size, "seed": seed, "lr": lr, "threads": threads,
                  "small_frac": small_frac, "noise": noise, "colour_jitter": colour_jitter, "seconds": round(seconds, 1),
                  "torch": torch.__version__},
        "heldout": {"n": eval_n, "seed": eval_seed, "size": 64, "accuracy": evaluate(checker, eval_n, eval_seed)},
        "heldout_32px": {"n": eval_n, "seed": eval_seed, "size": 32,
                         "accuracy": evaluate(checker, eval_n, eval_seed, 32)},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "twostep-toy-checker-1", "arch": json.dumps(DEFAULT_ARCH), "classes": json.dumps(
        record["classes"])}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "checker.safetensors"), meta)
    (out / "checker.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: train the checker and print its record."""
    p = argparse.ArgumentParser(prog="python -m twostep.toy.checker", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=1200, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=64, help="fresh renders per step")
    p.add_argument("--seed", type=int, default=0, help="seeds torch and the training render stream")
    p.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate (warm-up, cosine decay)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--small-frac", type=float, default=0.1,
                   help="share of each batch rendered at 32 px and upsampled (robustness to 32 px samples)")
    p.add_argument("--noise", type=float, default=0.05, help="max std of Gaussian noise added per image")
    p.add_argument("--colour-jitter", type=float, default=0.1,
                   help="max per-channel colour offset per image, in [-1, 1] units (0.1 = ±13 of 255): a VAE "
                        "that shifts a pink background by 13 levels must not turn it white for the checker")
    p.add_argument("--eval-n", type=int, default=2000, help="held-out renders for the recorded accuracy")
    p.add_argument("--eval-seed", type=int, default=None, help="held-out render seed; None means seed + 1000003")
    p.add_argument("--out-dir", default=str(DEFAULT_PATH.parent),
                   help="where checker.safetensors and checker.json go (the default is the shipped location)")
    args = p.parse_args(argv)
    record = train_checker(args.steps, args.batch_size, args.seed, args.out_dir, lr=args.lr, threads=args.threads,
                           small_frac=args.small_frac, noise=args.noise, colour_jitter=args.colour_jitter,
                           eval_n=args.eval_n,
                           eval_seed=args.eval_seed)
    print(json.dumps({k: record[k] for k in ("params", "train", "heldout", "heldout_32px")}, indent=2))


if __name__ == "__main__":
    main()
