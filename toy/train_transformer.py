"""The toy teacher's transformer stage (run by ``train_teacher``).

Flow matching on the VAE's latents: ``x_σ = (1-σ)x0 + σε``, target ``v = x0 - ε``, σ drawn with a
shift (``shift``; 3 is the scheduler's), the loss weighted up on latent positions the object covers
(``object_weight``). Captions are drawn afresh for every sample of every step and encoded by the
pipeline's frozen text encoder. The weights' EMA (``twostep.common.ema.EMA``, the trainer's) is what the
stage leaves in the model. ``checkpoint.pt`` in the output folder is written every 500 steps and on
stopping; the same command resumes from it.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from twostep.common.ema import EMA
from twostep.teacher.families.zimage import transformer_velocity
from twostep.toy.world import caption

from .teacher_config import ToyTeacherConfig
from .train_vae import background_colours, object_mask, weighted_mean

log = logging.getLogger("twostep.toy.train_teacher")  # one logger for the whole command


def object_weights(scenes: list, images: np.ndarray, latent_hw: tuple[int, int], weight: float) -> torch.Tensor:
    """(N, 1, h, w) loss weights on the latent grid: ``1 + weight`` where the object is (any pixel
    of the latent position's footprint differs from the background, dilated by one position)."""
    bg = background_colours(scenes)
    covered = torch.cat([F.adaptive_max_pool2d(object_mask(torch.from_numpy(images[i:i + 4096]),
                                                           torch.from_numpy(bg[i:i + 4096]), dilate=0), latent_hw)
                         for i in range(0, len(images), 4096)])
    covered = F.max_pool2d(covered, 3, stride=1, padding=1)
    return (1.0 + weight * covered).to(torch.float16)


def sample_sigma(n: int, shift: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """``n`` training noise levels ``σ = s·u / (1 + (s - 1)·u)``, u uniform, s = ``shift``."""
    u = torch.rand(n, generator=g)
    return (shift * u / (1 + (shift - 1) * u)).to(device)


def transformer_lr(cfg: ToyTeacherConfig, step: int, frac: float) -> float:
    """Linear warm-up over ``cfg.warmup`` steps (0 = none, as the trainer's ``optim.warmup_steps``), times
    a cosine from ``cfg.lr`` to 0 over ``frac``, the fraction of the run done (steps or time)."""
    warm = 1.0 if cfg.warmup <= 0 else min(1.0, (step + 1) / cfg.warmup)
    return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


class _CaptionBatches(torch.utils.data.IterableDataset):
    """Endless batches of (scene indices, tokenised fresh captions), built in loader workers.

    Tokenising with the chat template is CPU work of ~1 ms a caption; in the training loop it
    would starve a GPU, so workers do it in parallel (each with its own seeded stream).
    """

    def __init__(self, scenes: list, tokenizer, batch: int, max_tokens: int, seed: int):
        self.scenes, self.tok, self.batch, self.max_tokens, self.seed = scenes, tokenizer, batch, max_tokens, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        rng = np.random.default_rng([self.seed, wid])
        while True:
            idx = rng.integers(0, len(self.scenes), self.batch)
            texts = [self.tok.apply_chat_template([{"role": "user", "content": caption(self.scenes[i], rng)[0]}],
                                                  tokenize=False, add_generation_prompt=True, enable_thinking=True)
                     for i in idx]
            enc = self.tok(texts, padding="max_length", max_length=self.max_tokens, truncation=True,
                           return_tensors="pt")
            yield torch.from_numpy(idx), enc.input_ids, enc.attention_mask.bool()


def _encode_tokens(pipe, ids: torch.Tensor, mask: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Caption features as ZImagePipeline._encode_prompt computes them (2nd-to-last hidden state)."""
    ids, mask = ids.to(device), mask.to(device)
    hidden = pipe.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    lens = mask.sum(1)
    if bool((mask == (torch.arange(mask.shape[1], device=device) < lens[:, None])).all()):  # right padding
        return [hidden[i, :n] for i, n in enumerate(lens.tolist())]  # views: no sync per sample
    return [hidden[i][mask[i]] for i in range(len(ids))]


def _flow_matching_loss(pipe, model, batch: tuple, latents: torch.Tensor, weights: torch.Tensor | None,
                        cfg: ToyTeacherConfig, g: torch.Generator, device: torch.device, autocast) -> torch.Tensor:
    """The (object-weighted) velocity MSE on one batch of (scene indices, caption ids, caption mask)."""
    idx, ids, mask = batch
    idx = idx.to(device)
    x0 = latents[idx]
    with torch.no_grad():
        caps = _encode_tokens(pipe, ids, mask, device)
    eps = torch.randn(x0.shape, generator=g).to(device)
    sigma = sample_sigma(cfg.batch, cfg.shift, g, device)
    s = sigma.view(-1, 1, 1, 1)
    xs = (1 - s) * x0 + s * eps
    with autocast:
        v = transformer_velocity(model, xs, sigma, caps)
    return weighted_mean((v.float() - (x0 - eps)).square(), None if weights is None else weights[idx].float())


def _resume(ckpt: Path, model, ema: EMA, opt, device: torch.device) -> tuple[int, list, float]:
    """Load ``checkpoint.pt`` if there is one; (steps done, loss curve, seconds spent)."""
    if not ckpt.exists():
        return 0, [], 0.0
    state = torch.load(ckpt, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    log.info("resumed transformer training at step %d", int(state["step"]))
    return int(state["step"]), state["losses"], float(state["seconds"])


def train_transformer(pipe, scenes, latents: torch.Tensor, cfg: ToyTeacherConfig, device: torch.device,
                      out: Path, record: dict, workers: int = 0, stop_after: float = 0.0,
                      weights: torch.Tensor | None = None) -> None:
    """Flow-matching training with EMA; leaves the EMA weights in ``pipe.transformer`` and sets
    ``record["transformer"]``. ``stop_after`` (minutes, this invocation) pauses the run without
    touching the LR schedule: the EMA weights are exported and the same command resumes."""
    model = pipe.transformer.to(device).train()
    ema = EMA(model, cfg.ema)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99),
                            fused=device.type == "cuda")
    ckpt = out / "checkpoint.pt"
    start, losses, seconds = _resume(ckpt, model, ema, opt, device)
    g = torch.Generator().manual_seed(cfg.seed + 2 + start)
    batches = iter(torch.utils.data.DataLoader(
        _CaptionBatches(scenes, pipe.tokenizer, cfg.batch, cfg.max_tokens, cfg.seed + 3 + start),
        batch_size=None, num_workers=workers, prefetch_factor=4 if workers else None))
    latents = latents.to(device)
    weights = weights.to(device) if weights is not None else None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    t0 = time.perf_counter() - seconds
    t_call = time.perf_counter()
    step = start
    bar = tqdm(range(start, cfg.steps), desc="transformer", initial=start, total=cfg.steps, mininterval=5.0)
    for step in bar:
        loss = _flow_matching_loss(pipe, model, next(batches), latents, weights, cfg, g, device, autocast)
        # Progress is steps done or, under a time budget, time spent: the LR anneals fully either way.
        elapsed = time.perf_counter() - t0
        frac = max(step / cfg.steps, elapsed / (cfg.max_minutes * 60) if cfg.max_minutes else 0.0)
        for group in opt.param_groups:
            group["lr"] = transformer_lr(cfg, step, frac)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, step)
        if step % 100 == 0:
            losses.append([step, round(loss.item(), 5)])
            bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1 == cfg.steps
        paused = bool(stop_after) and time.perf_counter() - t_call >= stop_after * 60
        over = frac >= 1.0 or paused
        if (step + 1) % 500 == 0 or done or over:
            torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                        "losses": losses, "seconds": time.perf_counter() - t0}, ckpt)
        if over:
            log.info("%s at step %d", "paused (--stop-after-minutes); run again to continue" if paused and frac < 1
                     else f"time budget of {cfg.max_minutes:.1f} min reached", step + 1)
            break
    ema.copy_to(model)
    model.eval()
    record["transformer"] = {"losses": losses, "steps_done": step + 1, "seconds": round(time.perf_counter() - t0, 1),
                             "samples_seen": (step + 1) * cfg.batch}
