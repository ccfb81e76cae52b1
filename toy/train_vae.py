"""The toy teacher's VAE stages (run by ``train_teacher``).

1. ``train_vae``: the joint stage trains the whole ``AutoencoderKL`` on the rendered scenes
   (reconstruction with extra weight near the object, KL, and the shape code: ``vae_shape_code``),
   then sets ``shift_factor``/``scaling_factor`` to the latents' mean and 1/std, as Z-Image's VAE has.
2. ``finetune_decoder``: the decoder alone for ``vae_decoder_steps`` (the encoder, so the latents, stay
   fixed) at a lower object weight.

Both write their losses and a report (PSNR, the checker on reconstructions of fresh renders) into the
training record's ``vae`` entry. Also here: the pixel helpers both stages and the transformer's loss
weights share, and ``encode_latents`` (the transformer's training data).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from twostep.toy.world import ATTRIBUTES, BACKGROUNDS, SHAPES, sample_scene

from .render import render_batch
from .teacher_config import ToyTeacherConfig

log = logging.getLogger("twostep.toy.train_teacher")  # one logger for the whole command


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def round_fp16_(module: torch.nn.Module) -> None:
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
    """(N, 3) uint8 background colour of each scene."""
    return np.array([BACKGROUNDS[sc.background] for sc in scenes], dtype=np.uint8)


def weighted_mean(values: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``values.mean()``, or with per-position weights ``w`` (broadcast): ``mean(w·values) / mean(w)``."""
    return values.mean() if w is None else (values * w).mean() / w.mean()


@torch.no_grad()
def vae_checker_accuracy(vae, device: torch.device, n: int = 500, seed: int = 99, size: int = 64) -> dict:
    """The toy checker on ``decode(encode(render))`` of ``n`` fresh scenes: the ceiling on any
    teacher's attribute accuracy that this VAE allows."""
    from .checker import load_checker

    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    truth = render_batch(scenes, size)
    rec = []
    for i in range(0, n, 100):
        z = vae.encode(to_tensor(truth[i:i + 100]).to(device)).latent_dist.mode()
        x = vae.decode(z).sample.float().clamp(-1, 1)
        rec.append(((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    acc = load_checker().score(np.concatenate(rec), [{a: getattr(sc, a) for a in ATTRIBUTES} for sc in scenes])
    return {k: round(acc[k], 4) for k in (*ATTRIBUTES, "all")}


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
    return weighted_mean(err.square() + 0.1 * err.abs(), w)


def _cosine(peak: float, step: int, steps: int) -> float:
    """Cosine decay from ``peak`` to 0 over ``steps``."""
    return peak * 0.5 * (1 + math.cos(math.pi * step / steps))


def train_vae(pipe, images: np.ndarray, cfg: ToyTeacherConfig, device: torch.device, record: dict,
              backgrounds: np.ndarray, shapes: np.ndarray) -> None:
    """The joint VAE stage: reconstruction, KL and (``vae_shape_code``) the shape code; ``backgrounds``
    (N, 3) uint8 and ``shapes`` (N,) int64 indices into ``SHAPES`` per scene. Sets ``record["vae"]``."""
    vae = pipe.vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    losses, t0 = [], time.perf_counter()
    for step in tqdm(range(cfg.vae_steps), desc="vae", mininterval=2.0):
        idx = torch.randint(0, len(images), (cfg.vae_batch,), generator=g).numpy()
        batch, bg = images[idx], backgrounds[idx]
        x = to_tensor(batch).to(device)
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
    round_fp16_(vae)
    with torch.no_grad():
        z = torch.cat([vae.encode(to_tensor(images[i:i + 512]).to(device)).latent_dist.mode()
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
    x = to_tensor(images[:256]).to(device)
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
        x = to_tensor(images[idx]).to(device)
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
    round_fp16_(vae.decoder)
    round_fp16_(vae.post_quant_conv)
    before = {k: vae_record[k] for k in ("psnr_db", "checker_on_reconstructions")}
    vae_record.update(_vae_report(vae, images, cfg, device))
    vae_record["decoder_stage"] = {"steps": cfg.vae_decoder_steps, "object_weight": cfg.vae_decoder_object_weight,
                                   "seconds": round(time.perf_counter() - t0, 1), "losses": losses, "before": before}
    log.info("VAE decoder stage: PSNR %.2f dB; checker on reconstructions: %s (before: %s)",
             vae_record["psnr_db"], vae_record["checker_on_reconstructions"], before)


@torch.no_grad()
def encode_latents(pipe, images: np.ndarray, device: torch.device) -> torch.Tensor:
    """The transformer's training latents: ``(mode(encode(x)) - shift_factor) · scaling_factor``."""
    vae = pipe.vae
    out = []
    for i in range(0, len(images), 512):
        z = vae.encode(to_tensor(images[i:i + 512]).to(device)).latent_dist.mode()
        out.append((z - vae.config.shift_factor) * vae.config.scaling_factor)
    return torch.cat(out)
