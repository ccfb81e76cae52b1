"""External "real" samples for the discriminator (``loss.real_source: external``, the ablation of
distribution-aligned adversarial learning): a WebDataset of real images (``jpg``/``png``/``webp``, with
an optional ``txt`` caption), resized to the training resolution and encoded by the teacher's VAE.

The stream is endless (shards re-permuted each pass by seed and pass) and split by rank; its
position is not checkpointed, so a resumed run sees other external images than an uninterrupted one.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from .data import resolve_shards

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class ExternalLatents:
    def __init__(self, spec: str, teacher, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not spec:
            raise ValueError("loss.real_source is external but data.external names no WebDataset of real images")
        shards, _ = resolve_shards(spec)
        self.urls = [s.url for s in shards][rank::world_size]
        if not self.urls:
            raise ValueError(f"{spec}: {len(shards)} shards cannot be split over {world_size} ranks")
        self.teacher, self.batch_size, self.seed = teacher, batch_size, seed
        self._it = self._samples()

    def _samples(self):
        import webdataset as wds

        epoch = 0
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
            ds = wds.WebDataset([self.urls[i] for i in order], shardshuffle=False, empty_check=False,
                                handler=wds.warn_and_continue).decode("rgb8", handler=wds.warn_and_continue)
            n = 0
            for sample in ds:
                key = next((k for k in IMAGE_KEYS if k in sample), None)
                if key is None:
                    continue
                n += 1
                yield sample[key], sample.get("txt", "") or ""
            if n == 0:
                raise ValueError(f"no images ({', '.join(IMAGE_KEYS)}) in the external shards {self.urls[:3]}…")
            epoch += 1

    @torch.no_grad()
    def next_batch(self, n: int, height: int, width: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``n`` real latents (n, C, h, w) at the training resolution and their caption features."""
        images, texts = [], []
        for _ in range(n):
            img, txt = next(self._it)
            if img.shape[:2] != (height, width):
                img = np.asarray(Image.fromarray(img).resize((width, height), Image.BICUBIC))
            images.append(img[..., :3])
            texts.append(txt if isinstance(txt, str) else str(txt))
        latents = self.teacher.encode_images(np.stack(images))
        return latents, self.teacher.encode_prompts(texts)
