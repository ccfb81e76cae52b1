"""Typed training configuration: dataclasses with a docstring under every field, loaded from YAML,
overridden by ``key=value`` pairs (``loss.e2e=false``), validated on construction.

    cfg = load_config("toy", overrides=["optim.lr=1e-4"])   # a name under trainer/configs/ or a path
    print(to_yaml(cfg))                                        # what --dry-run prints
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    data: str = ""
    """Teacher samples: a store (folder or fsspec URL with index.json) or shard URLs (comma list, brace
    pattern ``shards/{000000..000099}.tar``, glob); local, http(s), s3://, gs://."""
    batch_size: int = 16
    """Samples per step per process."""
    num_workers: int = 2
    """Data-loader processes per process (exact resume needs the same number)."""
    shuffle: bool = True
    """Shuffle shard order per epoch and samples within each shard (seeded by seed and epoch)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for the store (e.g. ``{client_kwargs: {endpoint_url: ...}}``)."""
    external: str = ""
    """For ``loss.real_source: external``: a WebDataset of real images (jpg/png/webp, optional txt)."""
    heldout_fraction: float = 0.01
    """Fraction of the store's samples (chosen by a hash of their key) kept out of the training stream;
    the discriminator's held-out diagnostics read them (docs/training.md, "Held-out diagnostics")."""
    heldout_samples: int = 64
    """At most this many held-out samples are read (from the store's first shards that hold them)."""

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size must be ≥ 1")
        _check(self.num_workers >= 0, "data.num_workers must be ≥ 0")
        _check(0.0 <= self.heldout_fraction < 1.0, "data.heldout_fraction must be in [0, 1)")
        _check(self.heldout_samples >= 0, "data.heldout_samples must be ≥ 0")


@dataclass
class ModelConfig:
    teacher: str = "toy"
    """Teacher: ``toy``, a pipeline folder of a supported family (docs/families.md), or a hub id
    (``Tongyi-MAI/Z-Image-Turbo``)."""
    sigma_mid: float | None = None
    """The 2-step boundary: step 1 maps σ=1 → σ_mid, step 2 maps σ_mid → 0 (the store's ``mid``). Unset,
    the run takes the σ the store records for its ``mid`` states (0.75 for Z-Image-Turbo; 0.75 when the
    store records none); set, it must agree with the store's (checked at start-up). The run's config.yaml
    holds the value used (docs/design.md, "The mid state")."""
    decoupled: bool = True
    """Two parameter sets (one per step); false shares one (the ablation)."""
    lora_rank: int = 0
    """0 trains every weight; > 0 trains a LoRA of this rank per step (frozen base weights)."""
    gradient_checkpointing: bool = False
    """Recompute transformer blocks in the backward pass (memory for time)."""
    disc_layers: list[int] = field(default_factory=list)
    """Teacher layers whose image tokens feed the discriminator heads; empty = 3 evenly spaced."""
    disc_hidden: int = 256
    """Width of each discriminator head."""
    disc_head: str = "mlp"
    """Discriminator head: mlp (per token) | conv (spectral-norm convs with a residual 3×3 block on the token
    grid, SANA-Sprint's head shape)."""
    disc_text: bool = False
    """Text-conditioned heads: the caption's pooled features, projected, multiply each head's hidden
    features into its logit (a projection discriminator, as StyleGAN-T's and SANA-Sprint's ``DiscHead``)."""
    disc_frozen: bool = False
    """Control: heads stay at their initialisation and are never updated (the adversarial terms then
    measure what an untrained discriminator does as a loss, i.e. a regulariser)."""

    def __post_init__(self) -> None:
        _check(self.sigma_mid is None or 0.0 < self.sigma_mid < 1.0, "model.sigma_mid must be in (0, 1)")
        _check(self.lora_rank >= 0, "model.lora_rank must be ≥ 0")
        _check(self.disc_hidden >= 1, "model.disc_hidden must be ≥ 1")
        _check(self.disc_head in ("mlp", "conv"), "model.disc_head must be mlp|conv")


@dataclass
class LossConfig:
    e2e: bool = True
    """Final losses backpropagate through step 2 into step 1; false detaches the step-1 state."""
    step1_loss: str = "both"
    """Explicit step-1 loss: none | regress (x̂0 of step 1 to the teacher's, from ``mid``) | adv
    (the discriminator judges the step-1 state against the teacher's ``mid``) | both."""
    step1_weight: float = 1.0
    """Weight of the step-1 regression (x0 space)."""
    step1_adv_weight: float = 0.5
    """Weight of the step-1 adversarial term."""
    adv_weight: float = 0.5
    """Weight of the final output's adversarial (generator) loss."""
    paired_weight: float = 1.0
    """Weight of the paired regression of the final output to the teacher's final latent."""
    feature_matching_weight: float = 0.0
    """Weight of paired feature matching in the discriminator's (frozen teacher) feature space."""
    real_source: str = "teacher"
    """Discriminator's real samples: teacher (its latents in the shards) | external (data.external)."""
    gan_loss: str = "hinge"
    """hinge | logistic (non-saturating)."""
    gan_reduce: str = "image"
    """image: average the token logits into one logit per image, then the GAN loss | token: the loss on
    every token logit, averaged (SANA-Sprint's per-token hinge)."""
    misaligned_fakes: bool = False
    """Add real latents rolled by one in the batch, under the original captions, as extra fakes of the
    final term's discriminator loss (text alignment)."""
    sigma_dist: str = "logit_normal"
    """Re-noising σ of the discriminator's inputs, for the discriminator and the student's adversarial term
    alike: logit_normal (sigmoid(N(sigma_mean, sigma_std²))) | uniform (on [0.02, 0.98])."""
    sigma_mean: float = 0.0
    """Logit-normal mean: 0 is a median σ of 0.5; lower means less noise (−0.6: median 0.35)."""
    sigma_std: float = 1.0
    """Logit-normal standard deviation."""
    independent_renoise: bool = False
    """Re-noise the discriminator's real and fake inputs with independent σ and ε (default: the same σ and ε
    for a real sample and the fake at its position in the batch)."""
    step1_adv_on: str = "mid"
    """What the step-1 adversarial term judges: mid (the step-1 state at σ_mid against the teacher's ``mid``)
    | x0 (step 1's clean estimate x̂0₁, re-noised like the final output, against the final term's real data)."""
    r1_weight: float = 0.0
    """Approximate R1: the discriminator's change under small input noise on real samples (0 = off)."""
    r1_noise: float = 0.05
    """Std of that input noise."""
    adv_warmup_steps: int = 0
    """Generator adversarial weights ramp from 0 to full over this many steps (D trains from step 0)."""

    def __post_init__(self) -> None:
        _check(self.step1_loss in ("none", "regress", "adv", "both"), "loss.step1_loss must be none|regress|adv|both")
        _check(self.real_source in ("teacher", "external"), "loss.real_source must be teacher|external")
        _check(self.gan_loss in ("hinge", "logistic"), "loss.gan_loss must be hinge|logistic")
        _check(self.gan_reduce in ("image", "token"), "loss.gan_reduce must be image|token")
        _check(self.sigma_dist in ("logit_normal", "uniform"), "loss.sigma_dist must be logit_normal|uniform")
        _check(self.step1_adv_on in ("mid", "x0"), "loss.step1_adv_on must be mid|x0")
        _check(self.sigma_std > 0 and self.r1_noise > 0, "loss.sigma_std and loss.r1_noise must be > 0")
        for name in ("step1_weight", "step1_adv_weight", "adv_weight", "paired_weight", "feature_matching_weight",
                     "r1_weight"):
            _check(getattr(self, name) >= 0, f"loss.{name} must be ≥ 0")

    @property
    def uses_adversarial(self) -> bool:
        return self.adv_weight > 0 or (self.step1_loss in ("adv", "both") and self.step1_adv_weight > 0)


@dataclass
class OptimConfig:
    lr: float = 1e-5
    """Student learning rate (AdamW)."""
    disc_lr: float = 1e-4
    """Discriminator heads' learning rate (AdamW)."""
    betas: tuple[float, float] = (0.9, 0.99)
    """AdamW's (β1, β2), for student and heads alike."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay, for student and heads alike."""
    warmup_steps: int = 0
    """Linear LR warm-up of both optimisers."""
    grad_clip: float = 1.0
    """Max gradient norm (0 = off), for student and heads separately."""
    g_every: int = 1
    """Update the student every g_every-th step; the discriminator is updated every step (DMD2's balance:
    several discriminator updates per student update)."""
    g_start: int = 0
    """Steps at the start where only the discriminator trains (the student is frozen), so that the student
    follows a discriminator that already tells its outputs from the teacher's."""
    ema_decay: float = 0.999
    """EMA of the student's weights (exported and sampled); 0 = no EMA."""
    adamw: str = "auto"
    """AdamW implementation: auto (fused on CUDA, torch's default elsewhere) | fused | foreach | loop
    (one tensor at a time: no foreach temporaries, the least memory and the slowest). The same
    update up to rounding; docs/scaling.md gives each one's memory."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives a list
        _check(self.adamw in ("auto", "fused", "foreach", "loop"),
               f"optim.adamw must be auto, fused, foreach or loop, got {self.adamw!r}")
        _check(self.lr > 0 and self.disc_lr > 0, "optim.lr and optim.disc_lr must be > 0")
        _check(0 <= self.ema_decay < 1, "optim.ema_decay must be in [0, 1)")
        _check(self.g_every >= 1 and self.g_start >= 0, "optim.g_every must be ≥ 1 and optim.g_start ≥ 0")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    """The store and how it is read (``data.*``)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Teacher, student and discriminator heads (``model.*``)."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The student's and the discriminator's loss terms (``loss.*``)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimisers, schedules and EMA (``optim.*``)."""
    seed: int = 0
    """Seeds data order, noise levels and initial heads (per-step generators: resume-safe)."""
    max_steps: int = 1000
    """Training steps (one generator + one discriminator update each)."""
    mixed_precision: str = "auto"
    """auto (bf16 on CUDA, none on CPU) | no | bf16 | fp16."""
    log_every: int = 10
    """Steps between logged metrics."""
    heldout_every: int = 50
    """Steps between the discriminator's held-out diagnostics (logged on those steps too; 0 = off)."""
    checkpoint_every: int = 200
    """Steps between checkpoints (also written on SIGTERM and at the end)."""
    keep_checkpoints: int = 3
    """Checkpoints kept (oldest deleted first)."""
    sample_every: int = 200
    """Steps between sample grids (teacher 8 steps vs student 2 steps; 0 = only at the end)."""
    sample_prompts: list[str] = field(default_factory=list)
    """Fixed prompts of the sample grids; empty = the first 8 prompts of the first batch."""
    sample_seed: int = 1234
    """Seeds of the grid images: sample_seed + i."""
    max_nonfinite: int = 5
    """Steps in a row with a non-finite loss or gradient before the run stops."""
    log_with: str = "tensorboard"
    """tensorboard | wandb | none."""
    export: bool = True
    """Export the EMA student as a diffusers pipeline folder (RUN_DIR/student) at the end."""

    def __post_init__(self) -> None:
        _check(self.max_steps >= 1, "max_steps must be ≥ 1")
        _check(self.mixed_precision in ("auto", "no", "bf16", "fp16"), "mixed_precision must be auto|no|bf16|fp16")
        _check(self.log_with in ("tensorboard", "wandb", "none"), "log_with must be tensorboard|wandb|none")
        _check(self.checkpoint_every >= 1 and self.keep_checkpoints >= 1, "checkpoint_every and keep_checkpoints must be ≥ 1")
        _check(self.max_nonfinite >= 1, "max_nonfinite must be ≥ 1")
        _check(self.log_every >= 1 and self.heldout_every >= 0, "log_every must be ≥ 1 and heldout_every ≥ 0")


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclasses."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Dataclass ``cls`` from a nested dict; unknown keys are errors that name the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (values or {}).items():
        if key not in names:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(names))})")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key} must be a mapping")
            value = _build(hints[key], value, f"{where}.{key}")
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Scalars as their field's type (PyYAML reads ``1e-4`` as a string; ``3`` is a fine float)."""
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where} must be a number, not {value!r}") from None
    if hint is int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ConfigError(f"{where} must be an integer, not {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, not {value!r}")
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, not {value!r}")
    return value


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def resolve_path(name_or_path: str) -> Path:
    """A config file, or the name of a file under trainer/configs/ (``toy`` → configs/toy.yaml). A
    folder of that name (``toy/`` at the repository root) is not a config, so the name wins."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    bundled = CONFIG_DIR / f"{name_or_path.removesuffix('.yaml')}.yaml"
    if bundled.exists():
        return bundled
    names = ", ".join(sorted(q.stem for q in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a bundled config ({names})")


def load_config(name_or_path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """YAML file (or bundled name) + ``key=value`` overrides (values parsed as YAML) → TrainConfig."""
    tree: dict[str, Any] = {}
    where = "defaults"
    if name_or_path:
        path = resolve_path(name_or_path)
        where = str(path)
        tree = yaml.safe_load(path.read_text()) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. optim.lr=1e-4)")
        _set(tree, key.strip(), yaml.safe_load(raw))
    return _build(TrainConfig, tree, where)


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["optim"]["betas"] = list(d["optim"]["betas"])
    return d


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
