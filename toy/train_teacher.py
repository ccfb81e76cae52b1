"""Train the toy teacher: a real ``ZImagePipeline`` folder for the shapes world.

    python -m twostep.toy.train_teacher --out runs/toy-teacher [--preset cpu|gpu] [...]

Stages, each resumable (running the same command again continues where it stopped):
1. render a fixed set of scenes (64×64) from a seed;
2. train a small ``AutoencoderKL`` (4× down, 16 latent channels: 16×16 latents; ``--vae-channels 32,64``
   gives 2× down, 32×32 latents, 4×4-pixel tokens) on them, with a shape code in its first three
   latent channels (``vae_shape_code``), then set its ``shift_factor``/``scaling_factor`` to the
   latents' mean and 1/std, as Z-Image's VAE has; then train its decoder alone for
   ``vae_decoder_steps`` (the encoder, so the latents, stay fixed) (``train_vae.py``);
3. train a small ``ZImageTransformer2DModel`` by flow matching (``x_σ = (1-σ)x0 + σε``, target
   ``v = x0 - ε``, σ drawn with the scheduler's shift of 3) on those latents, conditioned on the
   features of a frozen, randomly initialised small ``Qwen3Model`` over a word-level
   ``Qwen2Tokenizer``, with an EMA of the weights (``train_transformer.py``);
4. save the pipeline (weights in fp16: the shipped folder stays under 20 MB) and
   ``training_record.json`` (config, loss curve, time, device).

Captions are drawn afresh for every sample of every step, so each scene is seen with many
partial captions: the model must learn the spread of images a partial caption allows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from twostep.common.config_flags import add_dataclass_flags
from twostep.common.logs import configure_logging
from twostep.teacher.random_zimage import build_pipeline
from twostep.toy.world import SHAPES, TOY_WORDS, sample_scene

from .render import render_batch
from .teacher_config import ToyTeacherConfig
from .train_transformer import object_weights, train_transformer
from .train_vae import background_colours, encode_latents, finetune_decoder, round_fp16_, train_vae

log = logging.getLogger("twostep.toy.train_teacher")

__all__ = ["CONFIG_FLAGS", "ToyRunOptions", "ToyTeacherConfig", "build_parser", "main", "parse_args"]

CONFIG_FLAGS = ("steps", "vae_steps", "batch", "warmup", "lr", "shift", "object_weight", "vae_object_weight",
                "vae_shape_code", "vae_code_scale", "vae_decoder_steps", "latent_channels", "num_scenes",
                "vae_channels", "max_minutes", "seed")
"""The ``ToyTeacherConfig`` fields the command line can set (``shift`` as ``--train-shift``)."""


@dataclass
class ToyRunOptions:
    """How one invocation runs; not part of the teacher (so not in the record's config)."""

    out: str
    """Folder for the pipeline, checkpoints and training_record.json."""
    preset: str = field(default_factory=lambda: "gpu" if torch.cuda.is_available() else "cpu",
                        metadata={"choices": ("cpu", "gpu")})
    """Size of the run: cpu fits a 2-core machine in under an hour, gpu is the shipped teacher's (the
    config's defaults); gpu when CUDA is available."""
    vae_only: bool = False
    """Train (or load) the VAE, report the checker on its reconstructions, and stop: for comparing VAE
    settings before spending time on the transformer."""
    vae_gate: float = 0.0
    """Stop (exit 3) before training the transformer if the checker reads all attributes right on fewer
    than this fraction of the VAE's reconstructions of fresh renders (0 = off)."""
    stop_after_minutes: float = 0.0
    """Pause transformer training after this long in this invocation and export the EMA weights so far;
    the LR schedule is unchanged and the same command continues (0 = off)."""
    init: str = ""
    """Continue from a saved toy teacher folder (its VAE and transformer weights; fresh optimiser and LR
    schedule)."""
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    """Torch device; cuda when available."""
    threads: int = 0
    """Torch CPU threads (0 = torch's default)."""
    workers: int = field(default_factory=lambda: min(8, max(0, (os.cpu_count() or 1) - 2)))
    """Data-loader processes that draw and tokenise captions (cores - 2, at most 8)."""


def build_parser() -> argparse.ArgumentParser:
    """The command line: ``ToyRunOptions`` and the ``CONFIG_FLAGS`` of ``ToyTeacherConfig``, each
    flag's help and shown default taken from its field."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(ap.add_argument_group("run"), ToyRunOptions)
    config = ap.add_argument_group(
        "teacher config", "Each flag overrides the preset's value; the defaults shown are the gpu preset's\n"
                          "(ToyTeacherConfig's), and the cpu preset's where it differs.")
    add_dataclass_flags(config, ToyTeacherConfig, CONFIG_FLAGS, flags={"shift": "--train-shift"}, overrides=True,
                        variants={"--preset cpu": ToyTeacherConfig.preset("cpu")})
    return ap


def _render_scenes(cfg: ToyTeacherConfig) -> tuple[list, np.ndarray]:
    rng = np.random.default_rng(cfg.seed)
    scenes = [sample_scene(rng) for _ in range(cfg.num_scenes)]
    chunks = [scenes[i:i + 2000] for i in range(0, len(scenes), 2000)]
    with ProcessPoolExecutor(max_workers=max(1, min(16, os.cpu_count() or 1))) as pool:
        images = np.concatenate(list(pool.map(partial(render_batch, size=cfg.image_size), chunks)))
    return scenes, images


def _build(cfg: ToyTeacherConfig, device: torch.device):
    """A fresh pipeline of the config's sizes; its text encoder (frozen) rounded to fp16 values and on
    ``device``."""
    words = (*TOY_WORDS, "user", "assistant")
    pipe = build_pipeline(dim=cfg.dim, n_layers=cfg.n_layers, n_refiner_layers=cfg.n_refiner_layers,
                          n_heads=cfg.n_heads, axes_dims=cfg.axes_dims, text_dim=cfg.text_dim,
                          text_layers=cfg.text_layers, text_heads=cfg.text_heads, vae_channels=cfg.vae_channels,
                          latent_channels=cfg.latent_channels, words=words, model_max_length=cfg.max_tokens,
                          seed=cfg.seed)
    pipe.vae.register_to_config(sample_size=cfg.image_size)
    round_fp16_(pipe.text_encoder)
    pipe.text_encoder.to(device)
    return pipe


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


def _vae_stages(pipe, cfg: ToyTeacherConfig, opts: ToyRunOptions, scenes: list, images: np.ndarray,
                device: torch.device, record: dict) -> None:
    """The VAE of ``--init``, or the one saved in ``OUT/vae_trained``, or a newly trained one (saved
    there); then the decoder-only stage unless the record shows it done. Sets ``record["vae"]``."""
    out = Path(opts.out)
    vae_dir = out / "vae_trained"
    if opts.init:
        _init_from(pipe, Path(opts.init), record)
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
    if cfg.vae_decoder_steps and "decoder_stage" not in record["vae"] and not opts.init:
        # after the joint stage, or on a VAE saved before this stage existed; the encoder is untouched
        pipe.vae.to(device)
        finetune_decoder(pipe.vae, images, cfg, device, record["vae"], background_colours(scenes))
        pipe.vae.save_pretrained(vae_dir)
        (out / "vae_record.json").write_text(json.dumps(record["vae"]))


def _stop_after_vae(record: dict, opts: ToyRunOptions) -> int | None:
    """The exit code when ``--vae-gate`` or ``--vae-only`` stops the run before the transformer."""
    ceiling = record["vae"].get("checker_on_reconstructions", {}).get("all")
    if opts.vae_gate and ceiling is not None and ceiling < opts.vae_gate:
        log.error("the VAE's reconstructions score %.3f all-attributes right (checker), below --vae-gate %.3f: "
                  "no teacher on these latents can reach the bar. Delete %s and train the VAE again (more "
                  "--vae-steps, --vae-object-weight, --latent-channels)", ceiling, opts.vae_gate,
                  Path(opts.out) / "vae_trained")
        return 3
    if opts.vae_only:
        log.info("--vae-only: stopping before the transformer; checker on the VAE's reconstructions: %s",
                 record["vae"].get("checker_on_reconstructions", "not measured (an older record)"))
        return 0
    return None


def parse_args(argv: list[str] | None = None) -> tuple[ToyTeacherConfig, ToyRunOptions]:
    """The config (the preset, then the config flags given) and the run options of a command line."""
    ap = build_parser()
    args = ap.parse_args(argv)
    opts = ToyRunOptions(**{f.name: getattr(args, f.name) for f in fields(ToyRunOptions)})
    cfg = replace(ToyTeacherConfig.preset(opts.preset), **{k: v for k, v in vars(args).items() if k in CONFIG_FLAGS})
    if cfg.vae_shape_code and cfg.latent_channels <= len(SHAPES):
        ap.error(f"--vae-shape-code needs more than {len(SHAPES)} latent channels (one per shape plus free ones), "
                 f"not {cfg.latent_channels}: raise --latent-channels or pass --vae-shape-code 0")
    return cfg, opts


def main(argv: list[str] | None = None) -> int:
    cfg, opts = parse_args(argv)
    configure_logging()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    record: dict = {"config": asdict(cfg), "device": torch.cuda.get_device_name() if device.type == "cuda"
                    else f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__}

    scenes, images = _render_scenes(cfg)
    log.info("rendered %d scenes in %.1fs", len(images), time.perf_counter() - t0)
    pipe = _build(cfg, device)
    _vae_stages(pipe, cfg, opts, scenes, images, device, record)
    code = _stop_after_vae(record, opts)
    if code is not None:
        return code
    latents = encode_latents(pipe, images, device)
    weights = object_weights(scenes, images, latents.shape[-2:], cfg.object_weight) if cfg.object_weight else None
    train_transformer(pipe, scenes, latents, cfg, device, out, record, workers=opts.workers,
                      stop_after=opts.stop_after_minutes, weights=weights)

    record["total_seconds"] = round(time.perf_counter() - t0, 1)
    for m in (pipe.transformer, pipe.vae, pipe.text_encoder):
        m.to("cpu", torch.float16)
    pipe.save_pretrained(out / "pipeline")
    (out / "pipeline" / "training_record.json").write_text(json.dumps(record, indent=1))
    log.info("saved the toy teacher to %s (%.1f min)", out / "pipeline", record["total_seconds"] / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
