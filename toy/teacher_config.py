"""The toy teacher's training config (written to training_record.json) and its presets.

Each field's docstring is also the help text of its ``train_teacher`` flag (``twostep.common.config_flags``).
"""

from __future__ import annotations

from dataclasses import dataclass


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
    """VAE batch size (both VAE stages)."""
    vae_lr: float = 1e-3
    """Peak learning rate of the joint VAE stage (cosine decay to 0, no warm-up); the decoder-only stage
    uses 0.3× it."""
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
    everything trained on them stay valid; 0 skips it), with ``vae_decoder_object_weight``: at the
    object weight of 10 that keeps shapes (checker 0.998 on shape), flat backgrounds came back pale
    and blotchy (pink read as white in 22% of reconstructions)."""
    vae_decoder_object_weight: float = 2.0
    """Object weight of the decoder-only stage."""
    dim: int = 128
    """Transformer width. 128 wide × 4 layers (2.0M parameters) trains 36 samples/s on one busy
    core against 11 for the earlier 192 × 6 (6.2M): on a CPU, samples seen matter more than width."""
    n_layers: int = 4
    """Transformer layers."""
    n_refiner_layers: int = 1
    """Layers of each of the transformer's noise and context refiners."""
    n_heads: int = 4
    """Transformer attention heads."""
    axes_dims: tuple[int, int, int] = (8, 12, 12)
    """RoPE axes (sum = head dim)."""
    text_dim: int = 128
    """Width of the frozen, randomly initialised text encoder."""
    text_layers: int = 2
    """Text encoder layers."""
    text_heads: int = 4
    """Text encoder attention heads."""
    max_tokens: int = 48
    """Caption tokens after the chat template (the tokenizer's model_max_length)."""
    steps: int = 12000
    """Transformer training steps."""
    batch: int = 256
    """Transformer batch size."""
    lr: float = 5e-4
    """Transformer peak learning rate (AdamW; cosine decay to 0 over the run)."""
    warmup: int = 500
    """Transformer LR warm-up steps (linear, as the trainer's; 0 = none). A short one suits ``--init``."""
    ema: float = 0.999
    """EMA decay of the transformer's weights (the saved pipeline holds the EMA weights)."""
    shift: float = 3.0
    """Shift of the training σ distribution ``σ = s·u / (1 + (s - 1)·u)``, u uniform: 3 is the
    scheduler's (more weight at high noise, where layout is decided); 1 is uniform in σ, below 1
    favours low noise (the last sampling step, from σ = 0.3, is where shapes are sharpened).
    Sampling is unchanged."""
    object_weight: float = 4.0
    """Extra loss weight on latent positions the object covers (dilated by one): the loss is then
    ``mean(w·err²) / mean(w)`` with ``w = 1 + object_weight·covered`` (0 = plain flow-matching MSE).
    Objects fill 2–6% of the image, so unweighted the flat background dominates the loss and shape
    is learned last."""
    max_minutes: float = 0.0
    """Length of transformer training in minutes (0 = ``steps`` decides); the LR anneals over it."""

    @classmethod
    def preset(cls, name: str) -> ToyTeacherConfig:
        """``gpu``: the defaults (the shipped teacher's); ``cpu``: sized for a 2-core machine."""
        if name == "gpu":
            return cls()
        if name == "cpu":  # fits this project's 2-core CI-class machine in under an hour (VAE ~10 min)
            return cls(num_scenes=20000, vae_steps=1500, vae_batch=32, steps=100000, batch=64, lr=6e-4,
                       warmup=200, max_minutes=40)
        raise ValueError(f"unknown preset {name!r} (cpu or gpu)")
