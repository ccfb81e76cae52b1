"""The training loop: one visible loop, a generator step and a discriminator step per iteration.

    setup → [resume] → for step: batch → caption features → generator_step → discriminator_step
                                 → EMA → log → samples → checkpoint (interval, SIGTERM) → export

Every process runs the same loop (accelerate: DDP, or FSDP for the full-size students). Decisions
that must agree across ranks (skip a non-finite step, stop, save on SIGTERM) are all-reduced first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import signal
import subprocess
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from twostep import __version__
from twostep.teacher.core import DEFAULT_SIGMA_MID, SIGMA_MID_TOL, Teacher, recorded_sigma_mid

from . import losses as L
from .checkpoint import EMA, Checkpoints
from .config import OptimConfig, TrainConfig, to_dict, to_yaml
from .data import ShardStream, StreamLoader, read_heldout, resolve_shards
from .discriminator import Discriminator
from .report import MetricsLog, plot_run
from .student import TwoStepStudent, gather_student, is_sharded

log = logging.getLogger(__name__)


@dataclass
class Parts:
    """Everything the loop touches, built once by :func:`setup`."""

    cfg: TrainConfig
    accelerator: Any
    teacher: Teacher
    sigma_mid: float
    """The run's σ_mid, from :func:`store_sigma_mid`: the student, the step-1 losses, the grids and the
    export all use this one value."""
    student: Any  # TwoStepStudent, wrapped by accelerate
    disc: Any  # Discriminator (heads), wrapped by accelerate
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    ema: EMA | None
    loader: StreamLoader
    external: Any = None
    run_dir: Path = Path(".")
    progress: dict[str, Any] = field(default_factory=dict)
    """What a checkpoint keeps of the loop: ``step``, ``nonfinite_total``, ``nonfinite_streak``."""
    heldout: dict[str, Any] | None = None
    """The store's held-out samples (never in the training stream), for :func:`heldout_diagnostics`."""
    fsdp: bool = False
    """The student is FSDP-sharded (the EMA is then saved and loaded sharded)."""


@dataclass
class StepResult:
    """What an update returns: the metrics it logs and, apart from them, whether it was skipped."""

    metrics: dict[str, Any] = field(default_factory=dict)
    skipped: bool = False
    """A non-finite loss or gradient (on any rank): the update was not applied."""


@dataclass
class GeneratorStepResult(StepResult):
    """:func:`generator_step`'s result."""

    fakes: tuple[torch.Tensor, ...] | None = None
    """The detached (final x0, step-1 state, step-1 x̂0₁) for the discriminator step; None when skipped."""
    student_step: bool = True
    """A student update step; False on the discriminator-only steps (``optim.g_every``, ``optim.g_start``),
    whose metrics are empty."""


def _generator(cfg: TrainConfig, rank: int, step: int, salt: int) -> torch.Generator:
    """Per-step CPU generator, a function of (seed, rank, step): resume needs no RNG state."""
    key = hashlib.sha256(f"{cfg.seed}:{rank}:{step}:{salt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little") >> 1)


def _code_version() -> str:
    try:
        rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"twostep {__version__}" + (f" ({rev})" if rev else "")


def adamw(params: list[torch.nn.Parameter], optim: OptimConfig, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW in the implementation ``optim.adamw`` names (``auto``: fused on CUDA, where it also
    saves the foreach temporaries; torch's default elsewhere, so CPU runs stay bit-identical)."""
    impl = optim.adamw
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else None
    kind = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}, None: {}}[impl]
    return torch.optim.AdamW(params, lr=lr, betas=optim.betas, weight_decay=optim.weight_decay, **kind)


def setup(cfg: TrainConfig, run_dir: str | Path) -> Parts:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() else "no"
    # cpu=True without CUDA lets accelerate run several CPU processes (torchrun) as DDP over gloo.
    accelerator = Accelerator(mixed_precision=mp, log_with=None if cfg.log_with == "none" else cfg.log_with,
                              project_dir=str(run_dir), cpu=not torch.cuda.is_available(),
                              # Z-Image has parameters a given call does not use (pad tokens, other patch sizes)
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    run_dir = Path(run_dir)
    teacher = Teacher.load(cfg.model.teacher, device=accelerator.device)
    shards, index = resolve_shards(cfg.data.data, cfg.data.storage_options or None)
    sigma_mid = store_sigma_mid(index, cfg, teacher.sampler.sigma_mid)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, sigma_mid=sigma_mid))  # the value used
    _warn_if_other_teacher(index, teacher)
    so = cfg.data.storage_options or None
    stream = ShardStream(shards, seed=cfg.seed, rank=accelerator.process_index, world_size=accelerator.num_processes,
                         shuffle=cfg.data.shuffle, storage_options=so, heldout_fraction=cfg.data.heldout_fraction)
    loader = StreamLoader(stream, cfg.data.batch_size, num_workers=cfg.data.num_workers)
    heldout = None
    if cfg.heldout_every and cfg.loss.uses_adversarial:
        heldout = read_heldout(shards, cfg.data.heldout_fraction, cfg.data.heldout_samples, so)
        if heldout is None:
            log.warning("no held-out samples (data.heldout_fraction=%s): the discriminator's held-out "
                        "diagnostics are off", cfg.data.heldout_fraction)
        else:
            log.info("%d held-out samples for the discriminator's diagnostics", len(heldout["prompt"]))

    torch.manual_seed(cfg.seed)  # heads' initial weights (identical on every rank)
    m = cfg.model
    student = TwoStepStudent(teacher.family, sigma_mid, m.decoupled, m.lora_rank, m.gradient_checkpointing)
    if m.gradient_checkpointing:  # the discriminator backpropagates to its input through the frozen teacher
        teacher.transformer.enable_gradient_checkpointing()
    disc = Discriminator(teacher.family, m.disc_layers, m.disc_hidden, m.disc_head, m.disc_text
                         ).to(accelerator.device)
    if m.disc_frozen:  # eval mode: the spectral norms' power iterations do not move either
        disc.eval()
    opt_g = adamw([p for p in student.parameters() if p.requires_grad], cfg.optim, cfg.optim.lr, accelerator.device)
    opt_d = adamw(list(disc.parameters()), cfg.optim, cfg.optim.disc_lr, accelerator.device)
    student, disc, opt_g, opt_d = accelerator.prepare(student, disc, opt_g, opt_d)
    ema = EMA(accelerator.unwrap_model(student), cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    external = None
    if cfg.loss.real_source == "external":
        from .external import ExternalLatents

        external = ExternalLatents(cfg.data.external, teacher, cfg.data.batch_size, seed=cfg.seed,
                                   rank=accelerator.process_index, world_size=accelerator.num_processes)
    parts = Parts(cfg, accelerator, teacher, sigma_mid, student, disc, opt_g, opt_d, ema, loader, external, run_dir,
                  {"step": 0, "nonfinite_total": 0, "nonfinite_streak": 0}, heldout,
                  fsdp=accelerator.distributed_type == DistributedType.FSDP)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_run_record(parts, index)
    return parts


def store_sigma_mid(index: dict, cfg: TrainConfig, teacher_default: float = DEFAULT_SIGMA_MID) -> float:
    """The run's σ_mid: the one the store records (its ``mid`` states are at it), once ``model.sigma_mid``
    is checked to agree with it within ``SIGMA_MID_TOL``. When the shards come without an index.json
    that records one: ``model.sigma_mid``, else ``teacher_default``, the σ_mid the teacher's own sampler
    would store (docs/design.md, "The mid state")."""
    configured = cfg.model.sigma_mid
    recorded = recorded_sigma_mid((index.get("teacher") or {}).get("sampler") or {})
    if recorded is None:
        configured = teacher_default if configured is None else configured
        log.info("the store records no σ_mid: using σ_mid=%s", configured)
        return configured
    if configured is None:
        return recorded
    if not abs(recorded - configured) < SIGMA_MID_TOL:
        raise ValueError(f"{cfg.data.data}: the store's mid states are at σ_mid={recorded}, but model.sigma_mid is "
                         f"{configured}; set model.sigma_mid={recorded}, or train on a store generated at "
                         f"σ_mid={configured}")
    return recorded


def _warn_if_other_teacher(index: dict, teacher: Teacher) -> None:
    """Warn when the store was generated by another teacher than the one this run loads."""
    t = (index.get("teacher") or {}).get("teacher")
    if t and teacher.name != t:
        log.warning("the store was generated by teacher %s; training with teacher %s", t, teacher.name)


def _write_run_record(p: Parts, index: dict) -> None:
    cfg_text = to_yaml(p.cfg)
    old = p.run_dir / "config.yaml"
    if old.exists() and old.read_text() != cfg_text:
        log.warning("%s differs from this run's config; resuming with the new one (saved as config.yaml, "
                    "the old one as config.previous.yaml)", old)
        old.rename(p.run_dir / "config.previous.yaml")
    old.write_text(cfg_text)
    record = {"code_version": _code_version(), "manifest_hash": (index.get("identity") or {}).get("manifest_hash"),
              "store_fingerprint": index.get("fingerprint"), "store_samples": index.get("samples"),
              "data": p.cfg.data.data, "teacher": p.teacher.describe(), "world_size": p.accelerator.num_processes,
              "device": str(p.accelerator.device), "mixed_precision": p.accelerator.mixed_precision,
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    (p.run_dir / "run.json").write_text(json.dumps(record, indent=1, default=str))


# --- the two updates ---------------------------------------------------------------------------------


def warmup(step: int, steps: int) -> float:
    """Linear warm-up factor at (0-based) ``step``: (step + 1) / steps, capped at 1; 1 when ``steps`` ≤ 0.
    The learning rates (``optim.warmup_steps``) and the adversarial weights (``loss.adv_warmup_steps``)."""
    return 1.0 if steps <= 0 else min(1.0, (step + 1) / steps)


def _renoise_draw(lc, n: int, shape: torch.Size, g: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise levels (n,) from ``loss.sigma_dist`` and Gaussian noise of ``shape``, on ``device``."""
    sigma = L.sample_sigma(n, lc.sigma_mean, lc.sigma_std, g, lc.sigma_dist).to(device)
    return sigma, torch.randn(shape, generator=g).to(device)


def generator_step(p: Parts, batch: dict, caps: list[torch.Tensor], step: int, log_now: bool
                   ) -> GeneratorStepResult:
    """Student update: the 2-step forward (end to end unless ``loss.e2e`` is false) and its losses.

    Returns the metrics and the detached (final x0, step-1 state, step-1 x̂0₁) outputs for the
    discriminator step (``fakes``), which are None when the step was skipped (non-finite loss or
    gradient). On the steps between student updates (``optim.g_every`` > 1, or before ``optim.g_start``)
    only the outputs are computed, without gradients: ``student_step`` is False and the metrics empty."""
    cfg, lc, acc = p.cfg, p.cfg.loss, p.accelerator
    disc = acc.unwrap_model(p.disc)  # heads are not updated here: bypass DDP's reducer
    g = _generator(cfg, acc.process_index, step, 1)
    noise, latent = batch["noise"], batch["latent"]
    if step < cfg.optim.g_start or (step - cfg.optim.g_start) % cfg.optim.g_every != 0:  # discriminator only
        with torch.no_grad(), acc.autocast():
            x0_1, x_mid, x0 = p.student(noise, caps, e2e=lc.e2e)
        return GeneratorStepResult(fakes=(x0.detach(), x_mid.detach(), x0_1.detach()), student_step=False)
    terms: dict[str, torch.Tensor] = {}
    red = lambda logits: L.reduce_logits(logits, lc.gan_reduce)  # noqa: E731
    with acc.autocast():
        x0_1, x_mid, x0 = p.student(noise, caps, e2e=lc.e2e)
        if lc.paired_weight > 0:
            terms["paired"] = lc.paired_weight * torch.nn.functional.mse_loss(x0, latent)
        if lc.step1_loss in ("regress", "both") and lc.step1_weight > 0:
            target = L.step1_target(_need_mid(batch), noise, p.sigma_mid)
            terms["step1_regress"] = lc.step1_weight * torch.nn.functional.mse_loss(x0_1, target)
        ramp = warmup(step, lc.adv_warmup_steps)
        if lc.adv_weight > 0 or lc.feature_matching_weight > 0:
            sigma, eps = _renoise_draw(lc, len(x0), x0.shape, g, x0.device)
            logits, feats = disc(L.renoise(x0, sigma, eps), sigma, caps, return_features=True)
            if lc.adv_weight > 0:
                terms["adv"] = lc.adv_weight * ramp * L.g_loss(red(logits), lc.gan_loss)
            if lc.feature_matching_weight > 0:
                with torch.no_grad():
                    real_feats = disc.features(L.renoise(latent, sigma, eps), sigma, caps)
                terms["feature_matching"] = lc.feature_matching_weight * L.feature_matching(real_feats, feats)
        if _step1_adv(cfg):
            x1, s1, _ = _step1_fake_input(p, x_mid, x0_1, g)
            terms["step1_adv"] = lc.step1_adv_weight * ramp * L.g_loss(red(disc(x1, s1, caps)), lc.gan_loss)
    if not terms:
        raise ValueError("no student loss is enabled (all weights are 0 and step1_loss is none)")
    total = sum(terms.values())
    out = {f"loss/{k}": v.detach() for k, v in terms.items()}
    if log_now:
        out.update(grad_shares(acc.unwrap_model(p.student), terms))
    if not _all_finite(acc, total):
        p.opt_g.zero_grad(set_to_none=True)
        return GeneratorStepResult(out, skipped=True)
    acc.backward(total)
    norm = acc.clip_grad_norm_(p.student.parameters(), cfg.optim.grad_clip) if cfg.optim.grad_clip else None
    if norm is not None and not _all_finite(acc, norm):
        p.opt_g.zero_grad(set_to_none=True)
        return GeneratorStepResult(out, skipped=True)
    p.opt_g.step()
    p.opt_g.zero_grad(set_to_none=True)
    out["loss/student_total"] = total.detach()
    if norm is not None:
        out["grad_norm/student"] = norm.detach()
    return GeneratorStepResult(out, fakes=(x0.detach(), x_mid.detach(), x0_1.detach()))


def grad_shares(student: TwoStepStudent, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """How hard each loss pulls on each parameter set: ``grad_norm/{set}/{loss}``, the norm of the loss's
    gradient on the step-1 (``step1``) and step-2 (``step2``) parameters (one ``shared`` set when the
    steps share one), and ``grad_share/{set}/{loss}``, its share of the summed norms on that set.
    One extra backward per loss, on logging steps only."""
    sets = {"step1": student.transformer, "step2": student.transformer_2}
    if student.transformer_2 is None:
        sets = {"shared": student.transformer}
    params = {name: [q for q in m.parameters() if q.requires_grad] for name, m in sets.items()}
    flat = [q for ps in params.values() for q in ps]
    out: dict[str, torch.Tensor] = {}
    for k, v in terms.items():
        grads = iter(torch.autograd.grad(v, flat, retain_graph=True, allow_unused=True))
        for name, ps in params.items():
            sq = torch.zeros((), device=v.device)
            for gr in (next(grads) for _ in ps):
                if gr is not None:
                    part = gr.float().pow(2).sum()
                    sq = sq + (part.full_tensor() if hasattr(part, "full_tensor") else part)  # FSDP shards
            out[f"grad_norm/{name}/{k}"] = sq.sqrt()
    for name in params:
        total = sum(out[f"grad_norm/{name}/{k}"] for k in terms).clamp_min(1e-12)
        for k in terms:
            out[f"grad_share/{name}/{k}"] = out[f"grad_norm/{name}/{k}"] / total
    return out


def _step1_adv(cfg: TrainConfig) -> bool:
    return cfg.loss.step1_loss in ("adv", "both") and cfg.loss.step1_adv_weight > 0


def _step1_fake_input(p: Parts, x_mid: torch.Tensor, x0_1: torch.Tensor, g: torch.Generator
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The step-1 adversarial term's fake input, its noise levels and the re-noising noise: the step-1
    state at σ_mid (no noise drawn), or (``loss.step1_adv_on: x0``) step 1's x̂0₁ re-noised like the
    final output."""
    if p.cfg.loss.step1_adv_on == "mid":
        return x_mid, torch.full((len(x_mid),), p.sigma_mid, device=x_mid.device), None
    sigma, eps = _renoise_draw(p.cfg.loss, len(x0_1), x0_1.shape, g, x0_1.device)
    return L.renoise(x0_1, sigma, eps), sigma, eps


def _real_draw(lc, sigma: torch.Tensor, eps: torch.Tensor, real: torch.Tensor, g: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The real inputs' noise levels and noise: the fakes' at the same batch positions, or (with
    ``loss.independent_renoise``) a draw of their own."""
    if lc.independent_renoise:
        return _renoise_draw(lc, len(real), real.shape, g, sigma.device)
    return sigma[:len(real)], eps[:len(real)]


def discriminator_step(p: Parts, batch: dict, caps: list[torch.Tensor], step: int,
                       fakes: tuple[torch.Tensor, ...]) -> StepResult:
    """Heads update: teacher latents (or external images) are real, the student's outputs fake
    (and, with ``loss.misaligned_fakes``, real latents under the wrong captions).

    Diagnostics come from the logits computed before this update on this training batch:
    ``disc/batch_accuracy`` (real > 0, fake < 0, classes weighted equally) and ``disc/logit_gap`` (mean
    real − mean fake). The real latents have been trained on in earlier epochs; the held-out figures
    are :func:`heldout_diagnostics`'. With ``model.disc_frozen`` the diagnostics are computed and the
    heads are not updated."""
    cfg, lc, acc = p.cfg, p.cfg.loss, p.accelerator
    fake, fake_mid, fake_x0_1 = fakes
    if not lc.uses_adversarial:
        return StepResult()
    g = _generator(cfg, acc.process_index, step, 2)
    real, real_caps = batch["latent"], caps
    if p.external is not None:
        f = p.teacher.vae_scale_factor
        real, real_caps = p.external.next_batch(len(fake), fake.shape[-2] * f, fake.shape[-1] * f)
    out = {}
    red = lambda logits: L.reduce_logits(logits, lc.gan_reduce)  # noqa: E731
    frozen = cfg.model.disc_frozen
    p.opt_d.zero_grad(set_to_none=True)  # drops what the generator step left on the heads
    with acc.autocast(), torch.no_grad() if frozen else nullcontext():
        terms = []
        if lc.adv_weight > 0:
            sigma, eps = _renoise_draw(lc, len(fake), fake.shape, g, fake.device)
            s_real, e_real = _real_draw(lc, sigma, eps, real, g)
            real_in = L.renoise(real, s_real, e_real)
            d_real = p.disc(real_in, s_real, real_caps)
            d_fake = p.disc(L.renoise(fake, sigma, eps), sigma, caps)
            fakes_all = red(d_fake)
            if lc.misaligned_fakes:
                d_mis = p.disc(L.renoise(L.misaligned(real), s_real, e_real), s_real, real_caps)
                fakes_all = torch.cat([fakes_all, red(d_mis)])
                out["disc/misaligned_logit"] = d_mis.detach().mean()
                out["disc/misaligned_accuracy"] = (L.reduce_logits(d_mis.detach(), "image") < 0).float().mean()
            terms.append(L.d_loss(red(d_real), fakes_all, lc.gan_loss))
            out.update(_d_diagnostics(d_real.detach(), d_fake.detach(), ""))
            if lc.r1_weight > 0:
                r1 = L.approx_r1(p.disc, real_in, s_real, real_caps, lc.r1_noise, g, d_real)
                terms.append(lc.r1_weight * r1)
                out["loss/r1"] = r1.detach()
        if _step1_adv(cfg):
            x1, s1, e1 = _step1_fake_input(p, fake_mid, fake_x0_1, g)
            if e1 is not None:  # x̂0₁ and the final term's real data, re-noised alike
                s_real1, e_real1 = _real_draw(lc, s1, e1, real, g)
                real1 = L.renoise(real, s_real1, e_real1)
            else:
                s_real1 = s1[:len(real)]
                # the teacher's state at σ_mid, or (external real data) ground truth put at σ_mid with the
                # step-1 state's own noise
                real1 = (_need_mid(batch) if p.external is None
                         else L.renoise(real, s_real1, batch["noise"][:len(real)].to(real.device)))
            d_real_mid = p.disc(real1, s_real1, real_caps)
            d_fake_mid = p.disc(x1, s1, caps)
            terms.append(L.d_loss(red(d_real_mid), red(d_fake_mid), lc.gan_loss))
            out.update(_d_diagnostics(d_real_mid.detach(), d_fake_mid.detach(), "_mid"))
        total = sum(terms)
    out["loss/disc"] = total.detach()
    if frozen:
        return StepResult(out)
    if not _all_finite(acc, total):
        return StepResult(out, skipped=True)
    acc.backward(total)
    if cfg.optim.grad_clip:
        acc.clip_grad_norm_(p.disc.parameters(), cfg.optim.grad_clip)
    p.opt_d.step()
    p.opt_d.zero_grad(set_to_none=True)
    return StepResult(out)


def _d_diagnostics(real: torch.Tensor, fake: torch.Tensor, suffix: str) -> dict[str, torch.Tensor]:
    """Mean logits, their gap and the real/fake accuracy of pre-update logits on the training batch."""
    return {f"disc/real{suffix}_logit": real.mean(), f"disc/fake{suffix}_logit": fake.mean(),
            f"disc/logit_gap{suffix}": real.mean() - fake.mean(),
            f"disc/batch_accuracy{suffix}": L.accuracy(real, fake)}


def heldout_diagnostics(p: Parts) -> dict[str, float]:
    """The discriminator on samples it never trained on: the store's held-out slice as real, the
    student's outputs from those samples' noise (never drawn in training) as fake, re-noised with a
    fixed draw so that every check sees the same inputs. ``disc/heldout_accuracy``, ``disc/heldout_auc``
    and ``disc/heldout_logit_gap`` (token logits averaged per image), and their ``_mid`` twins for the
    step-1 term. The heads run in eval mode (no spectral-norm power step), so training is unchanged."""
    cfg, lc, acc, held = p.cfg, p.cfg.loss, p.accelerator, p.heldout
    disc, student = acc.unwrap_model(p.disc), acc.unwrap_model(p.student)
    dev, n, bs = acc.device, len(held["prompt"]), cfg.data.batch_size
    g = torch.Generator().manual_seed(cfg.seed + 104729)  # the same re-noising at every check
    sigma, eps = _renoise_draw(lc, n, held["latent"].shape, g, "cpu")
    sigma1, eps1 = _renoise_draw(lc, n, held["latent"].shape, g, "cpu")
    logits: dict[str, list[torch.Tensor]] = {"real": [], "fake": [], "real_mid": [], "fake_mid": []}

    def judge(key: str, x: torch.Tensor, s: torch.Tensor, c: list[torch.Tensor]) -> None:
        logits[key].append(L.reduce_logits(disc(x, s.to(dev), c), "image").float().cpu())

    was_training = disc.training
    disc.eval()
    try:
        with torch.no_grad(), acc.autocast():
            for i in range(0, n, bs):
                sl = slice(i, i + bs)
                caps = p.teacher.encode_prompts(held["prompt"][sl])
                latent = held["latent"][sl].to(dev)
                x0_1, x_mid, x0 = student(held["noise"][sl].to(dev), caps)
                if lc.adv_weight > 0:
                    s, e = sigma[sl].to(dev), eps[sl].to(dev)
                    judge("real", L.renoise(latent, s, e), s, caps)
                    judge("fake", L.renoise(x0, s, e), s, caps)
                if _step1_adv(cfg) and lc.step1_adv_on == "x0":
                    s, e = sigma1[sl].to(dev), eps1[sl].to(dev)
                    judge("real_mid", L.renoise(latent, s, e), s, caps)
                    judge("fake_mid", L.renoise(x0_1, s, e), s, caps)
                elif _step1_adv(cfg) and "mid" in held:
                    s = torch.full((len(x_mid),), p.sigma_mid)
                    judge("real_mid", held["mid"][sl].to(dev), s, caps)
                    judge("fake_mid", x_mid, s, caps)
    finally:
        disc.train(was_training)
    out = {}
    for suffix in ("", "_mid"):
        if logits["real" + suffix]:
            real, fake = torch.cat(logits["real" + suffix]), torch.cat(logits["fake" + suffix])
            out[f"disc/heldout_accuracy{suffix}"] = float(L.accuracy(real, fake))
            out[f"disc/heldout_auc{suffix}"] = L.auc(real, fake)
            out[f"disc/heldout_logit_gap{suffix}"] = float(real.mean() - fake.mean())
    return out


def _need_mid(batch: dict) -> torch.Tensor:
    if "mid" not in batch:
        raise ValueError("the step-1 loss needs the teacher's mid state, but the store has no mid.npy "
                         "(generate with --save mid, or set loss.step1_loss=none)")
    return batch["mid"]


def _all_finite(acc, value: torch.Tensor) -> bool:
    """True when ``value`` is finite on every rank (all ranks then take the same branch)."""
    bad = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=acc.device)
    return bool(acc.reduce(bad, reduction="sum").item() == 0)


# --- the loop ----------------------------------------------------------------------------------------


def _set_lr(p: Parts, step: int) -> None:
    f = warmup(step, p.cfg.optim.warmup_steps)
    for opt, lr in ((p.opt_g, p.cfg.optim.lr), (p.opt_d, p.cfg.optim.disc_lr)):
        for group in opt.param_groups:
            group["lr"] = lr * f


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class _Preempted:
    """SIGTERM → save at the end of the current step and exit (preemptible machines)."""

    def __init__(self):
        self.flag = False
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a test runner thread): no handler
            self._old = None

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint at the end of this step")
        self.flag = True

    def any_rank(self, acc) -> bool:
        t = torch.tensor([1.0 if self.flag else 0.0], device=acc.device)
        return bool(acc.reduce(t, reduction="sum").item() > 0)

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def train(cfg: TrainConfig, run_dir: str | Path) -> dict[str, Any]:
    """Train (or resume) in ``run_dir``; returns the final progress record."""
    from .grids import TrainingGrid

    p = setup(cfg, run_dir)
    acc, ckpts = p.accelerator, Checkpoints(p.run_dir, cfg.keep_checkpoints)
    fsdp = p.fsdp
    latest = ckpts.latest()
    if latest is not None:
        data_state, progress = ckpts.load(acc, latest, p.ema, ema_sharded=fsdp)
        p.loader.load_state_dict(data_state)
        p.progress.update(progress)
        log.info("resumed from %s (step %d)", latest, p.progress["step"])
    if cfg.log_with != "none":
        acc.init_trackers("twostep", config=_flat(to_dict(cfg)))
    grid = (TrainingGrid(p.run_dir, p.teacher, acc.unwrap_model(p.student), p.sigma_mid, acc, p.ema,
                         cfg.sample_prompts, cfg.sample_seed) if acc.is_main_process else None)
    preempt = _Preempted()
    start = p.progress["step"]
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc="train",
               disable=not acc.is_main_process, mininterval=2.0)
    batches = iter(p.loader)
    t_last, step_last, metrics, last_g = time.perf_counter(), start, {}, {}
    history = MetricsLog(p.run_dir / "metrics.jsonl", start) if acc.is_main_process else None
    try:
        for step in bar:
            batch = _to_device(next(batches), acc.device)
            if grid is not None:
                grid.remember(batch)
            _set_lr(p, step)
            heldout_now = p.heldout is not None and cfg.heldout_every and (step + 1) % cfg.heldout_every == 0
            log_now = (step + 1) % cfg.log_every == 0 or bool(heldout_now)
            caps = p.teacher.encode_prompts(batch["prompt"])
            g = generator_step(p, batch, caps, step, log_now)
            out, skipped = dict(g.metrics), g.skipped
            if g.student_step:
                last_g = {k: v for k, v in g.metrics.items() if not k.startswith("grad_")}
            else:  # a discriminator-only step logs the last student update's losses
                out.update(last_g)
            if g.fakes is not None:
                d = discriminator_step(p, batch, caps, step, g.fakes)
                out.update(d.metrics)
                skipped = skipped or d.skipped
            if heldout_now:
                out.update(heldout_diagnostics(p))
            if skipped:
                p.progress["nonfinite_total"] += 1
                p.progress["nonfinite_streak"] += 1
                log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row)", step,
                            p.progress["nonfinite_streak"])
                if p.progress["nonfinite_streak"] >= cfg.max_nonfinite:
                    raise RuntimeError(
                        f"{cfg.max_nonfinite} steps in a row had a non-finite loss or gradient (step {step}); "
                        f"stopping. The last checkpoint ({ckpts.latest()}) is intact: lower optim.lr, check the "
                        "data, or raise max_nonfinite, then run the same command to resume from it.")
            else:
                p.progress["nonfinite_streak"] = 0
                if p.ema is not None and g.student_step:
                    p.ema.update(acc.unwrap_model(p.student), step)
            p.progress["step"] = step + 1
            if log_now:
                dt = time.perf_counter() - t_last
                t_last, steps_since, step_last = time.perf_counter(), step + 1 - step_last, step + 1
                metrics = {k: float(v) for k, v in out.items()}
                metrics.update({"time/step_s": dt / steps_since, "data/corrupt_shards": p.loader.corrupt_shards,
                                "train/nonfinite_total": p.progress["nonfinite_total"]})
                if torch.cuda.is_available():
                    metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                acc.log(metrics, step=step + 1)
                if history is not None:
                    history.append(step + 1, metrics)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in metrics.items() if k.startswith("loss/")})
            if grid is not None and cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                grid.save(step + 1)
            stop = preempt.any_rank(acc)
            due = (step + 1) % cfg.checkpoint_every == 0 or stop or step + 1 == cfg.max_steps
            if due and p.progress["nonfinite_streak"] == 0:  # never checkpoint inside a bad streak
                ckpts.save(acc, step + 1, p.ema, p.loader.state_dict(), dict(p.progress), ema_sharded=fsdp)
            if stop:
                log.warning("preempted: checkpoint saved at step %d; run the same command to resume", step + 1)
                return {**p.progress, "preempted": True}
    finally:
        preempt.restore()
        if cfg.log_with != "none":
            acc.end_training()
    if grid is not None:
        grid.save(p.progress["step"])
    if acc.is_main_process:
        plot_run(p.run_dir)
    if cfg.export:
        export(p)
    result = {**p.progress, "metrics": metrics}
    if acc.is_main_process:
        (p.run_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


def export(p: Parts) -> Path | None:
    """The EMA student as a diffusers pipeline folder: RUN_DIR/student."""
    from .export import export_student

    acc = p.accelerator
    student: TwoStepStudent = acc.unwrap_model(p.student)
    out = p.run_dir / "student"
    with p.ema.applied(student) if p.ema is not None else nullcontext():
        if is_sharded(student):  # FSDP: gather the full (EMA) weights into the main process first
            student = gather_student(student, acc.is_main_process)
        t1, t2 = student.export_transformers() if student is not None else (None, None)
    if acc.is_main_process:
        export_student(out, p.teacher, t1, t2, sigma_mid=p.sigma_mid, overwrite=True,
                       extra={"config": to_dict(p.cfg), "step": p.progress["step"], "code_version": _code_version()})
        log.info("exported the student to %s", out)
    acc.wait_for_everyone()
    return out


