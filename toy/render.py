"""Render toy scenes to RGB images: anti-aliased, deterministic, any side that is a multiple of 16.

Geometry is defined in pixels of a 64×64 image and scaled with the side; pixel ``i`` spans
``[i, i + 1)``. Coverage is point-sampled on a ``SUPERSAMPLE``× finer grid and box-averaged (the
same as drawing at 8× and box-downsampling, without a rasteriser's rounding conventions).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from twostep.toy.world import BACKGROUNDS, COLOURS, POSITIONS, RADIUS, ToyScene

SUPERSAMPLE = 8
# Square half-side = r·√π/2 (same area as the circle of radius r); triangle circumradius 1.3·r
# (70% of that area: equal area would push large triangles well outside their cell).
SQUARE_HALF = math.sqrt(math.pi) / 2
TRIANGLE_R = 1.3
MARGIN = 1.0  # px at 64×64 kept clear between the object and the image border


def cell_centre(position: str, size: int = 64) -> tuple[float, float]:
    """``(x, y)`` pixel centre of a position's cell in the 3×3 grid (pixel centres at i + 0.5)."""
    row, col = divmod(POSITIONS.index(position), 3)
    return (col + 0.5) * size / 3, (row + 0.5) * size / 3


def object_radius(scene: ToyScene) -> float:
    """Characteristic radius of the object in pixels at 64×64 (the circle's radius)."""
    return RADIUS[scene.size] * scene.scale


def object_vertices(scene: ToyScene, size: int = 64) -> np.ndarray | None:
    """Polygon vertices ``(k, 2)`` as ``(x, y)`` in pixels of a ``size`` image, centred on the
    origin (add :func:`object_centre`), or ``None`` for a circle. Rotation is counter-clockwise."""
    r = object_radius(scene) * size / 64
    if scene.shape == "circle":
        return None
    if scene.shape == "square":
        half = r * SQUARE_HALF
        pts = np.array([[-half, -half], [half, -half], [half, half], [-half, half]])
    else:  # equilateral triangle pointing up at rotation 0
        ang = np.deg2rad(np.array([90.0, 210.0, 330.0]))
        pts = TRIANGLE_R * r * np.stack([np.cos(ang), -np.sin(ang)], axis=1)  # y grows downwards
    t = math.radians(scene.rotation)
    rot = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])  # CCW on screen
    return pts @ rot.T


def object_centre(scene: ToyScene, size: int = 64) -> tuple[float, float]:
    """Where the object's centre lands: cell centre + jitter, pushed inward just enough that the
    whole object stays inside the image (matters only for large objects in border cells)."""
    k = size / 64
    cx, cy = cell_centre(scene.position, size)
    cx, cy = cx + scene.dx * k, cy + scene.dy * k
    verts = object_vertices(scene, size)
    if verts is None:
        r = object_radius(scene) * k
        lo, hi = np.array([-r, -r]), np.array([r, r])
    else:
        lo, hi = verts.min(axis=0), verts.max(axis=0)
    m = MARGIN * k
    cx = float(np.clip(cx, m - lo[0], size - m - hi[0]))
    cy = float(np.clip(cy, m - lo[1], size - m - hi[1]))
    return cx, cy


def coverage(scene: ToyScene, size: int = 64) -> np.ndarray:
    """Fraction (size, size) float32 of each pixel the object covers: ``SUPERSAMPLE``² point
    samples per pixel, evaluated only over the object's bounding box."""
    ss = SUPERSAMPLE
    cov = np.zeros((size, size), dtype=np.float32)
    cx, cy = object_centre(scene, size)
    verts = object_vertices(scene, size)
    r = object_radius(scene) * size / 64
    lo, hi = (np.array([-r, -r]), np.array([r, r])) if verts is None else (verts.min(0), verts.max(0))
    x0, y0 = max(0, math.floor(cx + lo[0])), max(0, math.floor(cy + lo[1]))
    x1, y1 = min(size, math.ceil(cx + hi[0])), min(size, math.ceil(cy + hi[1]))
    # Sample points at sub-pixel centres, relative to the object centre: (1, W·ss) and (H·ss, 1).
    px = (np.arange(x0 * ss, x1 * ss) + 0.5) / ss - cx
    py = ((np.arange(y0 * ss, y1 * ss) + 0.5) / ss - cy)[:, None]
    if verts is None:
        inside = px * px + py * py <= r * r
    else:  # convex polygon: inside every edge's half-plane (sign fixed by the winding)
        inside = np.ones((len(py), len(px)), dtype=bool)
        area2 = np.sum(verts[:, 0] * np.roll(verts[:, 1], -1) - np.roll(verts[:, 0], -1) * verts[:, 1])
        for (ax, ay), (bx, by) in zip(verts, np.roll(verts, -1, axis=0)):
            inside &= ((bx - ax) * (py - ay) - (by - ay) * (px - ax)) * np.sign(area2) >= 0
    h, w = y1 - y0, x1 - x0
    cov[y0:y1, x0:x1] = inside.reshape(h, ss, w, ss).mean(axis=(1, 3))
    return cov


def render(scene: ToyScene, size: int = 64) -> np.ndarray:
    """The scene as a ``(size, size, 3)`` uint8 RGB image; ``size`` a positive multiple of 16.

    Each pixel blends background and object colour by the object's exact-ish area coverage
    (``SUPERSAMPLE``² samples), so edges are anti-aliased and the output is bit-for-bit
    deterministic (numpy only, no rasteriser conventions involved).
    """
    if size < 16 or size % 16:
        raise ValueError(f"size must be a positive multiple of 16, not {size}")
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    fg = np.array(COLOURS[scene.colour], dtype=np.float32)
    img = bg + coverage(scene, size)[..., None] * (fg - bg)
    return np.rint(img).astype(np.uint8)


def render_batch(scenes: Iterable[ToyScene], size: int = 64) -> np.ndarray:
    """``(N, size, size, 3)`` uint8 renders of ``scenes``."""
    images = [render(sc, size) for sc in scenes]
    if not images:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    return np.stack(images)


def write_render_shards(out, n: int = 2048, seed: int = 7, shard_size: int = 512, size: int = 64) -> list[str]:
    """``n`` ground-truth renders of random scenes with captions as WebDataset shards
    ``out/renders-NNNN.tar`` (``png`` + ``txt``): real images for the GAN ablation. Returns the paths."""
    import io
    from pathlib import Path

    import webdataset as wds
    from PIL import Image

    from twostep.toy.world import caption, sample_scene

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    images = render_batch(scenes, size)
    paths = []
    for s in range(0, n, shard_size):
        paths.append(str(out / f"renders-{s // shard_size:04d}.tar"))
        with wds.TarWriter(paths[-1]) as sink:
            for i in range(s, min(n, s + shard_size)):
                buf = io.BytesIO()
                Image.fromarray(images[i]).save(buf, format="PNG")
                sink.write({"__key__": f"render{i:06d}", "png": buf.getvalue(), "txt": caption(scenes[i], rng)[0]})
    return paths
