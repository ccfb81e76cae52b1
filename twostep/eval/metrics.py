"""Sample-set metrics shared by the toy-teacher evaluation and ``twostep eval``."""

from __future__ import annotations

import numpy as np


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` (N, D) and ``b`` (M, D).

    ``|μa - μb|² + tr(Σa + Σb - 2 (Σa Σb)^½)``; the matrix square root's trace is taken from the
    eigenvalues of ``Σa^½ Σb Σa^½`` (symmetric PSD), which avoids complex parts from ``sqrtm``.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with equal D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_a @ cov_b @ sqrt_a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., 2019) of ``fake`` against ``real``.

    Each set's manifold is the union of balls around its points with radius the distance to the
    point's k-th nearest neighbour in the same set. Precision = share of fake points inside the real
    manifold (quality); recall = share of real points inside the fake manifold (coverage: a collapsed
    generator has low recall)."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")

    def dist(a, b):
        d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
        return np.sqrt(np.clip(d, 0, None))

    def radii(x):
        return np.sort(dist(x, x), axis=1)[:, k]  # column 0 is the point itself

    r_real, r_fake = radii(real), radii(fake)
    d = dist(fake, real)  # (fake, real)
    precision = float((d <= r_real[None]).any(1).mean())
    recall = float((r_fake[None] >= d.T).any(1).mean())
    return precision, recall


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Total variation distance ½·Σ|p − q| between two distributions over the same classes."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    return 0.5 * float(np.abs(p / p.sum() - q / q.sum()).sum())


def mean_pairwise_distance(groups: np.ndarray) -> float:
    """Mean Euclidean distance between samples of the same group, averaged over groups: ``groups``
    is (G, K, D), K samples (seeds) of each of G prompts. Per-prompt diversity."""
    g = np.asarray(groups, np.float64)
    if g.ndim != 3 or g.shape[1] < 2:
        raise ValueError(f"expected (prompts, seeds ≥ 2, features), got {g.shape}")
    diff = g[:, :, None, :] - g[:, None, :, :]
    d = np.sqrt((diff ** 2).sum(-1))
    k = g.shape[1]
    return float(d.sum((1, 2)).mean() / (k * (k - 1)))


class ClipModel:
    """An open_clip model for image features (FD for real teachers) and CLIP score.

    ``spec`` is what ``open_clip.create_model_and_transforms`` takes (``ViT-B-32`` with
    ``pretrained`` a tag or a local weights file, ``hf-hub:org/repo``, ``local-dir:PATH``) or a local
    folder holding ``open_clip_config.json`` and weights (read as ``local-dir:``). Checkpoints load
    with ``weights_only``."""

    def __init__(self, spec: str, pretrained: str | None = None, device: str = "cpu", batch_size: int = 64):
        import os

        import open_clip

        if os.path.isdir(spec):
            spec = f"local-dir:{spec}"
        self.spec = spec if pretrained is None else f"{spec}/{pretrained}"
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(spec, pretrained=pretrained,
                                                                               device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(spec)
        self.device, self.batch_size = device, batch_size

    def _images(self, images: np.ndarray):
        import torch
        from PIL import Image

        return torch.stack([self.preprocess(Image.fromarray(x)) for x in images]).to(self.device)

    def image_embeddings(self, images: np.ndarray) -> np.ndarray:
        """L2-normalised image embeddings (N, D) of uint8 images (N, H, W, 3)."""
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                e = self.model.encode_image(self._images(images[i:i + self.batch_size])).float()
                out.append(torch.nn.functional.normalize(e, dim=-1).cpu())
        return torch.cat(out).double().numpy()

    features = image_embeddings

    def text_embeddings(self, prompts: list[str]) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(prompts), self.batch_size):
                e = self.model.encode_text(self.tokenizer(prompts[i:i + self.batch_size]).to(self.device)).float()
                out.append(torch.nn.functional.normalize(e, dim=-1).cpu())
        return torch.cat(out).double().numpy()

    def score(self, images: np.ndarray, prompts: list[str]) -> float:
        """CLIP score: mean over pairs of max(100 · cos(image, prompt), 0)."""
        cos = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(1)
        return float(np.clip(100 * cos, 0, None).mean())


class DinoModel:
    """DINOv2 image features through ``transformers`` (``AutoModel`` + ``AutoImageProcessor``), for
    FD, precision/recall and diversity outside the toy world (FD_DINOv2, Stein et al. 2023).

    ``spec`` is a hub id (``facebook/dinov2-large``, the ViT-L/14 that paper uses) or a local folder
    with ``config.json``, weights and ``preprocessor_config.json``. Features are the pooled CLS token
    (the last layer's CLS after the final layer norm), as that paper takes them; images are resized
    and normalised by the model's own image processor."""

    def __init__(self, spec: str, device: str = "cpu", batch_size: int = 64):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        config = AutoConfig.from_pretrained(spec)  # checked before any weights are read
        if not config.model_type.startswith("dinov2"):
            raise ValueError(f"--dino-model {spec}: a {config.model_type!r} model, not DINOv2")
        self.spec, self.device, self.batch_size = spec, device, batch_size
        self.processor = AutoImageProcessor.from_pretrained(spec)
        self.model = AutoModel.from_pretrained(spec, config=config).to(device).eval()

    def features(self, images: np.ndarray) -> np.ndarray:
        """(N, D) float64 CLS features of uint8 images (N, H, W, 3)."""
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                pixels = self.processor(images=list(images[i:i + self.batch_size]), return_tensors="pt")
                pooled = self.model(pixel_values=pixels["pixel_values"].to(self.device)).pooler_output
                out.append(pooled.float().cpu())
        return torch.cat(out).double().numpy()
