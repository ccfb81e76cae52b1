"""Train the toy teacher: a real ``ZImagePipeline`` folder for the shapes world.

    python -m twostep.pipeline.toy.train_teacher --out runs/toy-teacher [--preset cpu|gpu] [...]

Stages, each resumable (running the same command again continues where it stopped):
1. render a fixed set of scenes (64×64) from a seed;
2. train a small ``AutoencoderKL`` (4× down, 16 latent channels: 16×16 latents; ``--vae-channels 32,64``
   gives 2× down, 32×32 latents, 4×4-pixel tokens) on them, with a shape code in its first three
   latent channels (``vae_shape_code``), then set its ``shift_factor``/``scaling_factor`` to the
   latents' mean and 1/std, as Z-Image's VAE has; then train its decoder alone for
   ``vae_decoder_steps`` (the encoder, so the latents, stay fixed);
3. train a small ``ZImageTransformer2DModel`` by flow matching (``x_σ = (1-σ)x0 + σε``, target
   ``v = x0 - ε``, σ drawn with the scheduler's shift of 3) on those latents, conditioned on the
   features of a frozen, randomly initialised small ``Qwen3Model`` over a word-level
   ``Qwen2Tokenizer``, with an EMA of the weights;
4. save the pipeline (weights in fp16: the shipped folder stays under 20 MB) and
   ``training_record.json`` (config, loss curve, time, device).

Captions are drawn afresh for every sample of every step, so each scene is seen with many
partial captions: the model must learn the spread of images a partial caption allows.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from twostep.prompts.toy import SHAPES, TOY_WORDS, caption, sample_scene

from ..teacher import transformer_velocity
from ..zimage import build_pipeline
from .render import render_batch

log = logging.getLogger("twostep.toy.train_teacher")


@dataclass
class ToyTeacherConfig:
    """Everything that decides the toy teacher; written to training_record.json."""

    seed: int = 0
    """Seed of the scene set, the initial weights and the training noise."""
    num_scenes: int = 60000
    """Distinct rendered scenes (captions are re-drawn each time a scene is used)."""
    image_size: int = 64
    """Image side in pixels."""
    vae_channels: tuple[int, ...] = (16, 32, 32)
    """AutoencoderKL block widths; len - 1 halvings (3 → 4× down, 16×16 latents, 8×8-pixel tokens).
    (16, 32, 32) trains a step of 32 in 0.37 s on 2 cores, (32, 64, 64) in 1.46 s; (32, 64) gives 2×
    down and 4×4-pixel tokens, at ~4× the transformer's cost per step."""
    latent_channels: int = 16
    """Latent channels (= the transformer's in_channels; Z-Image's VAE has 16). Measured with the
    shape code on the old world: 16 channels kept shapes in 85% of reconstructions, 8 in 77–79%."""
    vae_steps: int = 3000
    """VAE training steps."""
    vae_batch: int = 128
    vae_lr: float = 1e-3
    vae_kl: float = 1e-6
    """KL weight (small: the latent should be smooth but informative)."""
    vae_shape_code: float = 1.0
    """Weight of the VAE's shape-code loss (0 = off): the encoder's posterior mean must carry, in
    latent channel ``k`` for the ``k``-th shape of ``SHAPES``, ``vae_code_scale`` × (the rest of the
    latent's std) × the fraction of each latent cell the object covers, and 0 elsewhere; the other
    channels stay free. Colour, position and background change the latent over the whole object, so
    a denoiser learns them early; shape changed only a few corner pixels (between a circle's and a
    square's conditional means: 3.5 RMS pixels, against the noise), so it was learned last or not
    at all. With the code, shape moves the latent as much as colour does (the idea of aligning a
    VAE's latents with semantic features to make them easier to generate, as VA-VAE does, with the
    world's ground truth as the semantics). Needs ``latent_channels`` > len(SHAPES)."""
    vae_code_scale: float = 2.0
    """Size of the shape code, in units of the std of the latent's free channels."""
    vae_object_weight: float = 10.0
    """Extra reconstruction weight on pixels near the object (as ``object_weight`` for the transformer).
    Unweighted, a VAE with 34 dB PSNR still rounded shapes off: the checker read the shape right on
    only 72% of the shipped VAE's reconstructions, which caps any teacher built on it."""
    vae_decoder_steps: int = 500
    """Steps of a second VAE stage that trains the decoder alone (encoder frozen, so the latents and
    everything trained on them stay valid), with ``vae_decoder_object_weight``: at the object weight
    of 10 that keeps shapes (checker 0.998 on shape), flat backgrounds came back pale and blotchy
    (pink read as white in 22% of reconstructions)."""
    vae_decoder_object_weight: float = 2.0
    """Object weight of the decoder-only stage."""
    dim: int = 128
    """Transformer width. 128 wide × 4 layers (2.0M parameters) trains 36 samples/s on one busy
    core against 11 for the earlier 192 × 6 (6.2M): on a CPU, samples seen matter more than width."""
    n_layers: int = 4
    n_refiner_layers: int = 1
    n_heads: int = 4
    axes_dims: tuple[int, int, int] = (8, 12, 12)
    """RoPE axes (sum = head dim)."""
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 48
    """Caption tokens after the chat template (the tokenizer's model_max_length)."""
    steps: int = 12000
    """Transformer training steps."""
    batch: int = 256
    lr: float = 5e-4
    warmup: int = 500
    ema: float = 0.999
    shift: float = 3.0
    """Shift of the training σ distribution ``σ = s·u / (1 + (s - 1)·u)``, u uniform: 3 is the
    scheduler's (more weight at high noise, where layout is decided); 1 is uniform in σ, below 1
    favours low noise (the last sampling step, from σ = 0.3, is where shapes are sharpened)."""
    object_weight: float = 4.0
    """Extra loss weight on latent positions the object covers (dilated by one): the loss is then
    ``mean(w·err²) / mean(w)`` with ``w = 1 + object_weight·covered``. Objects fill 2–6% of the
    image, so unweighted the flat background dominates the loss and shape is learned last."""
    max_minutes: float = 0.0
    """Length of transformer training in minutes (0 = ``steps`` decides); the LR anneals over it."""

    @classmethod
    def preset(cls, name: str) -> ToyTeacherConfig:
        if name == "gpu":
            return cls()
        if name == "cpu":  # fits this project's 2-core CI-class machine in under an hour (VAE ~10 min)
            return cls(num_scenes=20000, vae_steps=1500, vae_batch=32, steps=100000, batch=64, lr=6e-4,
                       warmup=200, max_minutes=40)
        raise ValueError(f"unknown preset {name!r} (cpu or gpu)")


def _render_scenes(cfg: ToyTeacherConfig) -> tuple[list, np.ndarray]:
    rng = np.random.default_rng(cfg.seed)
    scenes = [sample_scene(rng) for _ in range(cfg.num_scenes)]
    chunks = [scenes[i:i + 2000] for i in range(0, len(scenes), 2000)]
    with ProcessPoolExecutor(max_workers=max(1, min(16, os.cpu_count() or 1))) as pool:
        images = np.concatenate(list(pool.map(partial(render_batch, size=cfg.image_size), chunks)))
    return scenes, images


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _round_fp16_(module: torch.nn.Module) -> None:
    """Round weights to fp16 values, so training sees exactly what the fp16 folder will hold."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())


def object_mask(images: torch.Tensor, backgrounds: torch.Tensor, dilate: int = 1) -> torch.Tensor:
    """(B, 1, H, W) 1.0 where a pixel differs from the scene's background colour, dilated by
    ``dilate`` pixels; ``images`` (B, H, W, 3) uint8, ``backgrounds`` (B, 3) uint8."""
    diff = (images.to(torch.int16) - backgrounds.to(torch.int16)[:, None, None, :]).abs().amax(-1) > 8
    mask = diff.float()[:, None]
    return F.max_pool2d(mask, 2 * dilate + 1, stride=1, padding=dilate) if dilate else mask


def background_colours(scenes: list) -> np.ndarray:
    from twostep.prompts.toy import BACKGROUNDS

    return np.array([BACKGROUNDS[sc.background] for sc in scenes], dtype=np.uint8)


@torch.no_grad()
def vae_checker_accuracy(vae, device: torch.device, n: int = 500, seed: int = 99, size: int = 64) -> dict:
    """The toy checker on ``decode(encode(render))`` of ``n`` fresh scenes: the ceiling on any
    teacher's attribute accuracy that this VAE allows."""
    from twostep.prompts.toy import ATTRIBUTES

    from .checker import load_checker

    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    truth = render_batch(scenes, size)
    rec = []
    for i in range(0, n, 100):
        z = vae.encode(_to_tensor(truth[i:i + 100]).to(device)).latent_dist.mode()
        x = vae.decode(z).sample.float().clamp(-1, 1)
        rec.append(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    acc = load_checker().score(np.concatenate(rec), [{a: getattr(sc, a) for a in ATTRIBUTES} for sc in scenes])
    return {k: round(acc[k], 4) for k in (*ATTRIBUTES, "all")}


def _weighted_mean(values: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``values.mean()``, or with per-position weights ``w`` (broadcast): ``mean(w·values) / mean(w)``."""
    return values.mean() if w is None else (values * w).mean() / w.mean()


def shape_code_target(images: torch.Tensor, backgrounds: torch.Tensor, shapes: torch.Tensor, latent_hw: tuple[int, int],
                      n_shapes: int) -> torch.Tensor:
    """(B, n_shapes, h, w) unit shape code: channel ``shapes[b]`` holds the fraction of each latent
    cell that the object covers, the other channels 0. ``images`` (B, H, W, 3) uint8, ``backgrounds``
    (B, 3) uint8, ``shapes`` (B,) int64 indices into ``SHAPES``."""
    cover = F.adaptive_avg_pool2d(object_mask(images, backgrounds, dilate=0), latent_hw)  # (B, 1, h, w)
    onehot = F.one_hot(shapes, n_shapes).to(cover.dtype)[:, :, None, None]  # (B, S, 1, 1)
    return cover * onehot


def shape_code_loss(z: torch.Tensor, target: torch.Tensor, scale: float) -> torch.Tensor:
    """MSE between the first ``S`` latent channels of ``z`` (B, C, h, w) and ``scale`` × the free
    channels' std × ``target`` (B, S, h, w), in units of that std (so the loss does not depend on the
    latent's overall scale, which the KL barely fixes)."""
    s = target.shape[1]
    unit = z[:, s:].detach().std().clamp_min(1e-4)
    return (z[:, :s] / unit - scale * target).square().mean()


def _reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, images: np.ndarray, backgrounds: np.ndarray,
                         object_weight: float) -> torch.Tensor:
    """MSE + 0.1·L1 between ``rec`` and ``x`` (B, 3, H, W), with ``1 + object_weight`` on pixels near
    the object; ``images`` (B, H, W, 3) and ``backgrounds`` (B, 3) are the batch's uint8 renders."""
    err = rec - x
    w = None
    if object_weight:
        mask = object_mask(torch.from_numpy(images), torch.from_numpy(backgrounds)).to(x.device)
        w = 1.0 + object_weight * mask
    return _weighted_mean(err.square() + 0.1 * err.abs(), w)


def _cosine(peak: float, step: int, steps: int) -> float:
    """Cosine decay from ``peak`` to 0 over ``steps``."""
    return peak * 0.5 * (1 + math.cos(math.pi * step / steps))


def train_vae(pipe, images: np.ndarray, cfg: ToyTeacherConfig, device: torch.device, record: dict,
              backgrounds: np.ndarray, shapes: np.ndarray) -> None:
    """The joint VAE stage: reconstruction, KL and (``vae_shape_code``) the shape code; ``backgrounds``
    (N, 3) uint8 and ``shapes`` (N,) int64 indices into ``SHAPES`` per scene."""
    vae = pipe.vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    losses, t0 = [], time.perf_counter()
    for step in tqdm(range(cfg.vae_steps), desc="vae", mininterval=2.0):
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=g).numpy()
        batch, bg = images[idx], backgrounds[idx]
        x = _to_tensor(batch).to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = _reconstruction_loss(rec, x, batch, bg, cfg.vae_object_weight) + cfg.vae_kl * kl
        if cfg.vae_shape_code:
            target = shape_code_target(torch.from_numpy(batch), torch.from_numpy(bg), torch.from_numpy(shapes[idx]),
                                       post.mean.shape[-2:], len(SHAPES))
            code = shape_code_loss(post.mean, target.to(device), cfg.vae_code_scale)
            loss = loss + cfg.vae_shape_code * code
        for group in opt.param_groups:
            group["lr"] = _cosine(cfg.vae_lr, step, cfg.vae_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            losses.append([step, round(loss.item(), 6)] + ([round(code.item(), 5)] if cfg.vae_shape_code else []))
    vae.eval()
    _round_fp16_(vae)
    with torch.no_grad():
        z = torch.cat([vae.encode(_to_tensor(images[i:i + 512]).to(device)).latent_dist.mode()
                       for i in range(0, min(len(images), 8192), 512)])
    mean, std = z.mean().item(), z.std().item()
    vae.register_to_config(shift_factor=round(mean, 4), scaling_factor=round(1.0 / std, 4))
    record["vae"] = {"losses": losses, "seconds": round(time.perf_counter() - t0, 1), "shift_factor": round(mean, 4),
                     "scaling_factor": round(1.0 / std, 4), **_vae_report(vae, images, cfg, device)}
    log.info("VAE: PSNR %.2f dB, latent mean %.4f std %.4f; checker on reconstructions: %s",
             record["vae"]["psnr_db"], mean, std, record["vae"]["checker_on_reconstructions"])


@torch.no_grad()
def _vae_report(vae, images: np.ndarray, cfg: ToyTeacherConfig, device: torch.device) -> dict:
    """PSNR on 256 training renders and the checker on reconstructions of fresh ones."""
    x = _to_tensor(images[:256]).to(device)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    psnr = -10 * torch.log10(F.mse_loss((rec.clamp(-1, 1) + 1) / 2, (x + 1) / 2))
    return {"psnr_db": round(psnr.item(), 2), "checker_on_reconstructions":
            vae_checker_accuracy(vae, device, n=min(500, cfg.num_scenes), size=cfg.image_size)}


def finetune_decoder(vae, images: np.ndarray, cfg: ToyTeacherConfig, device: torch.device, vae_record: dict,
                     backgrounds: np.ndarray) -> None:
    """The decoder-only VAE stage (``vae_decoder_steps``): the encoder, its latents and the latent
    scaling stay as they are; the report in ``vae_record`` is measured again afterwards."""
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.vae_lr * 0.3, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 4)
    vae.decoder.train()
    losses, t0 = [], time.perf_counter()
    for step in tqdm(range(cfg.vae_decoder_steps), desc="vae decoder", mininterval=2.0):
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=g).numpy()
        x = _to_tensor(images[idx]).to(device)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample(generator=g)
        loss = _reconstruction_loss(vae.decode(z).sample, x, images[idx], backgrounds[idx],
                                    cfg.vae_decoder_object_weight)
        for group in opt.param_groups:
            group["lr"] = _cosine(cfg.vae_lr * 0.3, step, cfg.vae_decoder_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            losses.append([step, round(loss.item(), 6)])
    vae.eval()
    _round_fp16_(vae.decoder)
    _round_fp16_(vae.post_quant_conv)
    before = {k: vae_record[k] for k in ("psnr_db", "checker_on_reconstructions")}
    vae_record.update(_vae_report(vae, images, cfg, device))
    vae_record["decoder_stage"] = {"steps": cfg.vae_decoder_steps, "object_weight": cfg.vae_decoder_object_weight,
                                   "seconds": round(time.perf_counter() - t0, 1), "losses": losses, "before": before}
    log.info("VAE decoder stage: PSNR %.2f dB; checker on reconstructions: %s (before: %s)",
             vae_record["psnr_db"], vae_record["checker_on_reconstructions"], before)


def _init_from(pipe, folder: Path, record: dict) -> None:
    """Continue from a saved toy teacher: its VAE, text encoder and transformer (fp16 on disk → fp32)."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import AutoTokenizer, Qwen3Model

    pipe.vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32).eval()
    pipe.transformer = ZImageTransformer2DModel.from_pretrained(folder / "transformer", dtype=torch.float32)
    pipe.text_encoder = Qwen3Model.from_pretrained(folder / "text_encoder", dtype=torch.float32).eval()
    pipe.tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")  # the ids its encoder was trained on
    earlier = json.loads((folder / "training_record.json").read_text())
    record["init"] = {"from": str(folder), "record": earlier}
    record["vae"] = earlier["vae"]
    log.info("continuing from %s (%d transformer steps done there)", folder,
             earlier.get("transformer", {}).get("steps_done", 0))


@torch.no_grad()
def encode_latents(pipe, images: np.ndarray, device: torch.device) -> torch.Tensor:
    vae = pipe.vae
    out = []
    for i in range(0, len(images), 512):
        z = vae.encode(_to_tensor(images[i:i + 512]).to(device)).latent_dist.mode()
        out.append((z - vae.config.shift_factor) * vae.config.scaling_factor)
    return torch.cat(out)


def object_weights(scenes: list, images: np.ndarray, latent_hw: tuple[int, int], weight: float) -> torch.Tensor:
    """(N, 1, h, w) loss weights on the latent grid: ``1 + weight`` where the object is (any pixel
    of the latent position's footprint differs from the background, dilated by one position)."""
    bg = background_colours(scenes)
    covered = torch.cat([F.adaptive_max_pool2d(object_mask(torch.from_numpy(images[i:i + 4096]),
                                                           torch.from_numpy(bg[i:i + 4096]), dilate=0), latent_hw)
                         for i in range(0, len(images), 4096)])
    covered = F.max_pool2d(covered, 3, stride=1, padding=1)
    return (1.0 + weight * covered).to(torch.float16)


def _sample_sigma(n: int, shift: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    u = torch.rand(n, generator=g)
    return (shift * u / (1 + (shift - 1) * u)).to(device)


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


def train_transformer(pipe, scenes, latents: torch.Tensor, cfg: ToyTeacherConfig, device: torch.device,
                      out: Path, record: dict, workers: int = 0, stop_after: float = 0.0,
                      weights: torch.Tensor | None = None) -> None:
    """Flow-matching training with EMA; ``stop_after`` (minutes, this invocation) pauses the run
    without touching the LR schedule: the EMA weights are exported and the same command resumes."""
    model = pipe.transformer.to(device).train()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.99),
                            fused=device.type == "cuda")
    ckpt = out / "checkpoint.pt"
    start, losses, seconds = 0, [], 0.0
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        ema = state["ema"]
        opt.load_state_dict(state["opt"])
        start, losses, seconds = int(state["step"]), state["losses"], float(state["seconds"])
        log.info("resumed transformer training at step %d", start)
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
        idx, ids, mask = next(batches)
        idx = idx.to(device)
        x0 = latents[idx]
        with torch.no_grad():
            caps = _encode_tokens(pipe, ids, mask, device)
        eps = torch.randn(x0.shape, generator=g).to(device)
        sigma = _sample_sigma(cfg.batch, cfg.shift, g, device)
        s = sigma.view(-1, 1, 1, 1)
        xs = (1 - s) * x0 + s * eps
        with autocast:
            v = transformer_velocity(model, xs, sigma, caps)
        loss = _weighted_mean((v.float() - (x0 - eps)).square(), None if weights is None else weights[idx].float())
        # Progress is steps done or, under a time budget, time spent: the LR anneals fully either way.
        elapsed = time.perf_counter() - t0
        frac = max(step / cfg.steps, elapsed / (cfg.max_minutes * 60) if cfg.max_minutes else 0.0)
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            state = model.state_dict()
            floats = [k for k, v_ in state.items() if v_.is_floating_point()]
            torch._foreach_lerp_([ema[k] for k in floats], [state[k] for k in floats], 1 - decay)
        if step % 100 == 0:
            losses.append([step, round(loss.item(), 5)])
            bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1 == cfg.steps
        paused = bool(stop_after) and time.perf_counter() - t_call >= stop_after * 60
        over = frac >= 1.0 or paused
        if (step + 1) % 500 == 0 or done or over:
            torch.save({"model": model.state_dict(), "ema": ema, "opt": opt.state_dict(), "step": step + 1,
                        "losses": losses, "seconds": time.perf_counter() - t0}, ckpt)
        if over:
            log.info("%s at step %d", "paused (--stop-after-minutes); run again to continue" if paused and frac < 1
                     else f"time budget of {cfg.max_minutes:.1f} min reached", step + 1)
            break
    model.load_state_dict(ema)
    model.eval()
    record["transformer"] = {"losses": losses, "steps_done": step + 1, "seconds": round(time.perf_counter() - t0, 1),
                             "samples_seen": (step + 1) * cfg.batch}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="folder for the pipeline, checkpoints and training_record.json")
    ap.add_argument("--preset", choices=("cpu", "gpu"), default="gpu" if torch.cuda.is_available() else "cpu",
                    help="size of the run: 'cpu' fits a 2-core machine in under an hour, 'gpu' is the shipped "
                         "teacher's (default: gpu when CUDA is available)")
    ap.add_argument("--steps", type=int, help="transformer training steps (overrides the preset)")
    ap.add_argument("--vae-steps", type=int, help="VAE training steps (overrides the preset)")
    ap.add_argument("--batch", type=int, help="transformer batch size (overrides the preset)")
    ap.add_argument("--warmup", type=int, help="transformer LR warm-up steps (overrides the preset; a short one "
                    "suits --init)")
    ap.add_argument("--lr", type=float, help="transformer peak learning rate (overrides the preset)")
    ap.add_argument("--train-shift", type=float, dest="shift",
                    help="shift of the σ distribution the transformer trains on (default 3, the scheduler's; "
                         "1 = uniform in σ, < 1 favours low noise); sampling is unchanged")
    ap.add_argument("--object-weight", type=float, help="extra loss weight on latent positions covered by the "
                    "object (default 0: plain flow-matching MSE)")
    ap.add_argument("--vae-object-weight", type=float, help="extra VAE reconstruction weight on pixels near "
                    "the object (overrides the preset)")
    ap.add_argument("--vae-shape-code", type=float, help="weight of the VAE's shape-code loss: latent channel k "
                    "carries the object's coverage when its shape is the k-th (default 0: off; see the config's docs)")
    ap.add_argument("--vae-code-scale", type=float, help="size of the shape code in std units of the free latent "
                    "channels (default 2)")
    ap.add_argument("--vae-decoder-steps", type=int, help="steps of the decoder-only VAE stage (encoder frozen; "
                    "default 500; 0 skips it)")
    ap.add_argument("--vae-only", action="store_true",
                    help="train (or load) the VAE, report the checker on its reconstructions, and stop: for "
                         "comparing VAE settings before spending time on the transformer")
    ap.add_argument("--vae-gate", type=float, default=0.0,
                    help="stop (exit 3) before training the transformer if the checker reads all attributes right "
                         "on fewer than this fraction of the VAE's reconstructions of fresh renders (default 0: off)")
    ap.add_argument("--latent-channels", type=int, help="VAE latent channels = transformer in_channels "
                    "(overrides the preset)")
    ap.add_argument("--num-scenes", type=int, help="rendered scenes (overrides the preset)")
    ap.add_argument("--vae-channels", type=lambda s: tuple(int(c) for c in s.split(",")),
                    help="VAE block widths, comma-separated; their count - 1 is the number of 2× downsamplings "
                         "(default 32,64,64: 16×16 latents)")
    ap.add_argument("--max-minutes", type=float, help="stop transformer training after this long (resumable)")
    ap.add_argument("--stop-after-minutes", type=float, default=0.0,
                    help="pause transformer training after this long in this invocation and export the EMA "
                         "weights so far; the LR schedule is unchanged and the same command continues")
    ap.add_argument("--init", default=None, help="continue from a saved toy teacher folder (its VAE and "
                    "transformer weights; fresh optimiser and LR schedule)")
    ap.add_argument("--seed", type=int, default=None, help="seed of scenes, weights and noise (overrides the preset)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--workers", type=int, default=min(8, max(0, (os.cpu_count() or 1) - 2)),
                    help="data-loader processes that draw and tokenise captions (default: cores - 2, at most 8)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = ToyTeacherConfig.preset(args.preset)
    for k in ("steps", "vae_steps", "batch", "lr", "warmup", "shift", "object_weight", "vae_object_weight", "latent_channels",
              "vae_shape_code", "vae_code_scale", "vae_decoder_steps", "num_scenes", "max_minutes", "seed", "vae_channels"):
        if getattr(args, k) is not None:
            setattr(cfg, k, getattr(args, k))
    if cfg.vae_shape_code and cfg.latent_channels <= len(SHAPES):
        ap.error(f"--vae-shape-code needs more than {len(SHAPES)} latent channels (one per shape plus free ones), "
                 f"not {cfg.latent_channels}: raise --latent-channels or pass --vae-shape-code 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    record: dict = {"config": asdict(cfg), "device": torch.cuda.get_device_name() if device.type == "cuda"
                    else f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__}

    scenes, images = _render_scenes(cfg)
    log.info("rendered %d scenes in %.1fs", len(images), time.perf_counter() - t0)
    words = (*TOY_WORDS, "user", "assistant")
    pipe = build_pipeline(dim=cfg.dim, n_layers=cfg.n_layers, n_refiner_layers=cfg.n_refiner_layers,
                          n_heads=cfg.n_heads, axes_dims=cfg.axes_dims, text_dim=cfg.text_dim,
                          text_layers=cfg.text_layers, text_heads=cfg.text_heads, vae_channels=cfg.vae_channels,
                          latent_channels=cfg.latent_channels, words=words, model_max_length=cfg.max_tokens,
                          seed=cfg.seed)
    pipe.vae.register_to_config(sample_size=cfg.image_size)
    _round_fp16_(pipe.text_encoder)
    pipe.text_encoder.to(device)
    vae_dir = out / "vae_trained"
    if args.init:
        _init_from(pipe, Path(args.init), record)
        pipe.vae.to(device)
        pipe.text_encoder.to(device)
    elif (vae_dir / "config.json").exists():
        from diffusers import AutoencoderKL

        pipe.vae = AutoencoderKL.from_pretrained(vae_dir).to(device).eval()
        record["vae"] = json.loads((out / "vae_record.json").read_text())
    else:
        shapes = np.array([SHAPES.index(sc.shape) for sc in scenes], dtype=np.int64)
        train_vae(pipe, images, cfg, device, record, backgrounds=background_colours(scenes), shapes=shapes)
        pipe.vae.save_pretrained(vae_dir)
        (out / "vae_record.json").write_text(json.dumps(record["vae"]))
    if cfg.vae_decoder_steps and "decoder_stage" not in record["vae"] and not args.init:
        # after the joint stage, or on a VAE saved before this stage existed; the encoder is untouched
        pipe.vae.to(device)
        finetune_decoder(pipe.vae, images, cfg, device, record["vae"], background_colours(scenes))
        pipe.vae.save_pretrained(vae_dir)
        (out / "vae_record.json").write_text(json.dumps(record["vae"]))
    ceiling = record["vae"].get("checker_on_reconstructions", {}).get("all")
    if args.vae_gate and ceiling is not None and ceiling < args.vae_gate:
        log.error("the VAE's reconstructions score %.3f all-attributes right (checker), below --vae-gate %.3f: "
                  "no teacher on these latents can reach the bar. Delete %s and train the VAE again (more "
                  "--vae-steps, --vae-object-weight, --latent-channels)", ceiling, args.vae_gate, vae_dir)
        return 3
    if args.vae_only:
        log.info("--vae-only: stopping before the transformer; checker on the VAE's reconstructions: %s",
                 record["vae"].get("checker_on_reconstructions", "not measured (an older record)"))
        return 0
    latents = encode_latents(pipe, images, device)
    weights = object_weights(scenes, images, latents.shape[-2:], cfg.object_weight) if cfg.object_weight else None
    train_transformer(pipe, scenes, latents, cfg, device, out, record, workers=args.workers,
                      stop_after=args.stop_after_minutes, weights=weights)

    record["total_seconds"] = round(time.perf_counter() - t0, 1)
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder):
        m.to("cpu", torch.float16)
    pipe.save_pretrained(out / "pipeline")
    (out / "pipeline" / "training_record.json").write_text(json.dumps(record, indent=1))
    log.info("saved the toy teacher to %s (%.1f min)", out / "pipeline", record["total_seconds"] / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
