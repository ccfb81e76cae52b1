"""The 2-step student as a diffusers pipeline: ``TwoStepZImagePipeline`` and the pure ``two_step`` sampler.

Self-contained on purpose: this file imports only torch, diffusers and, relatively, ``zimage_batched``
(which imports only torch), because ``export_student`` ships a copy of both inside every exported
student folder (``model_index.json`` names this one as ``["pipeline_twostep", "TwoStepZImagePipeline"]``,
and diffusers copies relatively imported files along with it), so people without ``twostep``
installed can load the student with ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)``.
Inside the package, ``.zimage_batched`` is ``twostep.trainer.zimage_batched``, a re-export of the one
implementation, ``twostep.teacher.zimage_batched``. With ``twostep`` installed,
``TwoStepZImagePipeline.from_pretrained(folder)`` loads the same folder with the installed class and
needs no ``trust_remote_code``.

The transformer runs through ``batched_forward`` (the teacher's path: the same result as the stock
list-based forward with far fewer kernel launches) whenever ``supports_batched`` allows it, no
``joint_attention_kwargs`` are given and the model carries no hooks; otherwise through its stock
forward (see :func:`zimage_velocity`).

Sampling (exactly 2 transformer calls, no guidance, sigmas ``[1, sigma_mid, 0]``), with the flow
velocity ``u = ε - x0``, which is minus what Z-Image's transformer predicts::

    x      = ε                                        # noise at σ = 1
    u1     = -transformer(x, t = 1 - 1)               # Z-Image predicts x0 - ε
    x0̂₁    = x - 1·u1                                 # the step-1 clean estimate
    x_mid  = x + (σ_mid - 1)·u1                       # Euler step 1 → σ_mid (= σ_mid·ε + (1 - σ_mid)·x0̂₁)
    u2     = -transformer_2(x_mid, t = 1 - σ_mid)     # transformer again when transformer_2 is None
    x0     = x_mid + (0 - σ_mid)·u2                   # Euler step 2 → σ = 0

These are the stock pipeline's conventions (it negates the model output and the Euler scheduler
steps ``x + (σ' - σ)·model_output``). The trainer runs :func:`two_step` too, for every teacher family,
with the family adapter's velocity (``twostep.teacher.families``). The scheduler component is carried
for the folder layout only: the student never calls ``scheduler.set_timesteps``, whose shift (3.0 for
Z-Image-Turbo) would move the boundary if it were given the sigmas above
(``set_timesteps(sigmas=[1, .5])`` is what yields ``[1, .75, 0]`` with shift 3). The sigmas are exact
and independent of the scheduler's config.
"""

import inspect
import json
import os
import shutil
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from diffusers.pipelines.z_image.pipeline_output import ZImagePipelineOutput

from .zimage_batched import batched_forward, supports_batched

PIPELINE_FILE = "pipeline_twostep"
"""Module name of this file inside an exported folder (``<PIPELINE_FILE>.py``)."""
PIPELINE_CLASS = "TwoStepZImagePipeline"
BATCHED_FILE = "zimage_batched"
"""Module name of the batched forward inside an exported folder (``<BATCHED_FILE>.py``), as imported above."""
DEFAULT_SIGMA_MID = 0.75
"""σ_mid when none is given (an exported folder's config always gives one); this self-contained file
keeps its own copy of the default rather than importing it."""
LEGACY_CONFIG_KEYS = {"boundary_sigma": "sigma_mid"}
"""Config keys that folders exported by earlier versions use, and their present names: such folders
still load (``load_config`` renames them)."""


def rename_legacy_keys(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the keys of :data:`LEGACY_CONFIG_KEYS` under their present names, in place."""
    for old, new in LEGACY_CONFIG_KEYS.items():
        if old in config:
            config.setdefault(new, config.pop(old))
    return config

Velocity = Callable[[torch.Tensor, float], torch.Tensor]


def student_sigmas(sigma_mid: float) -> list[float]:
    """The student's noise levels ``[1, sigma_mid, 0]`` (exact; no scheduler shift)."""
    b = float(sigma_mid)
    if not 0.0 < b < 1.0:
        raise ValueError(f"sigma_mid must be in (0, 1), got {sigma_mid}")
    return [1.0, b, 0.0]


def two_step(velocity1: Velocity, velocity2: Velocity, noise: torch.Tensor,
             sigma_mid: float, detach_mid: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 2-step sampler. velocityK(x, sigma) -> u (fp32, same shape). Returns (x0_hat_step1, x_mid, x0_final).

    ``velocity1`` is called once at σ=1 on ``noise``, ``velocity2`` once at σ=``sigma_mid`` on ``x_mid``;
    ``u = ε - x0`` is the flow velocity (``x0̂ = x_σ - σ·u``). Each step is the flow-matching Euler step
    ``x + (σ' - σ)·u``. No ``no_grad`` here: the trainer backpropagates through both steps.
    ``detach_mid`` cuts the graph at the step-1 state (the trainer's ``e2e: false`` ablation): step 2
    then starts from a constant and the final output carries no gradient into step 1.
    """
    _, sigma_mid, _ = student_sigmas(sigma_mid)
    x = noise.float()
    u1 = velocity1(x, 1.0).float()
    x0_hat = x - 1.0 * u1
    x_mid = x + (sigma_mid - 1.0) * u1
    x_in = x_mid.detach() if detach_mid else x_mid
    u2 = velocity2(x_in, sigma_mid).float()
    x0 = x_in + (0.0 - sigma_mid) * u2
    return x0_hat, x_mid, x0


def runs_hooks(model: torch.nn.Module) -> bool:
    """Whether ``model``'s own forward does more than the model: forward (pre-)hooks, or a ``forward``
    replaced on the instance (accelerate's model offloading, diffusers' group offloading and caches
    wrap it so). ``batched_forward`` calls the submodules directly and would skip those."""
    return bool(model._forward_hooks or model._forward_pre_hooks or "forward" in vars(model))


def zimage_velocity(model: torch.nn.Module, x: torch.Tensor, sigma: float | torch.Tensor,
                    caps: list[torch.Tensor], batched: bool = True, **forward_kwargs: Any) -> torch.Tensor:
    """A ``ZImageTransformer2DModel`` on a batch: (B, C, h, w) at noise level σ → fp32 ``v`` (B, C, h, w).

    The stock call convention: a list of (C, 1, h, w) latents in the model's dtype, ``t = 1 - σ``
    (0 = noise, 1 = clean) per sample, and a list of (L_i, D) caption features. The output is the raw
    model prediction ``v = x0 - ε`` (not negated).

    With ``batched`` (the default) the call goes through ``batched_forward`` (same result, far fewer
    kernel launches) when ``supports_batched`` holds for the latent size, no ``forward_kwargs`` are
    set (``joint_attention_kwargs`` and the like are the stock forward's) and the model runs no
    hooks (:func:`runs_hooks`); otherwise, and with ``batched=False``, through the stock forward.
    """
    dtype = next(model.parameters()).dtype
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).expand(x.shape[0])
    caps = [c.to(dtype) for c in caps]
    if (batched and all(v is None for v in forward_kwargs.values()) and not runs_hooks(model)
            and supports_batched(model, x.shape[-2], x.shape[-1])):
        return batched_forward(model, x.to(dtype), 1.0 - sigma, caps).float()
    xs = list(x.to(dtype).unsqueeze(2).unbind(0))
    out = model(xs, 1.0 - sigma, caps, return_dict=False, **forward_kwargs)[0]
    return torch.stack([o.float() for o in out]).squeeze(2)


class TwoStepZImagePipeline(ZImagePipeline):
    """Z-Image with a 2-step student: ``transformer`` takes σ=1 → ``sigma_mid``, ``transformer_2``
    takes ``sigma_mid`` → 0 (``transformer`` does both steps when ``transformer_2`` is None).

    Follows Wan 2.2's convention for two parameter sets split by noise level (``transformer`` /
    ``transformer_2`` plus a boundary in the pipeline config). Text encoding, latent preparation and
    VAE decoding are ``ZImagePipeline``'s.
    """

    model_cpu_offload_seq = "text_encoder->transformer->transformer_2->vae"
    _optional_components: ClassVar[list[str]] = ["transformer_2"]

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL,
        text_encoder: Any,
        tokenizer: Any,
        transformer: ZImageTransformer2DModel,
        transformer_2: ZImageTransformer2DModel | None = None,
        sigma_mid: float = DEFAULT_SIGMA_MID,
    ):
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer)
        self.register_modules(transformer_2=transformer_2)
        student_sigmas(sigma_mid)  # validate
        self.register_to_config(sigma_mid=float(sigma_mid))

    # --- loading and saving ------------------------------------------------------------------

    @classmethod
    def load_config(cls, *args, **kwargs):
        """As ``ConfigMixin.load_config``, but a ``_class_name`` of ``[<file>, <this class>]`` is read as
        this class: ``TwoStepZImagePipeline.from_pretrained(folder)`` then uses the installed class
        instead of executing the folder's copy (which would need ``trust_remote_code=True``).
        ``DiffusionPipeline.from_pretrained`` is unaffected. Keys of :data:`LEGACY_CONFIG_KEYS`
        (``boundary_sigma`` in folders exported by earlier versions) are read under their present names."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if not isinstance(config, dict):
            return out
        name = config.get("_class_name")
        if isinstance(name, (list, tuple)) and len(name) == 2 and name[1] == cls.__name__:
            config["_class_name"] = cls.__name__
        rename_legacy_keys(config)
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """``DiffusionPipeline.save_pretrained`` plus this file as ``pipeline_twostep.py``, the batched
        forward's file as ``zimage_batched.py`` beside it, and ``model_index.json`` naming the pipeline
        file, so the folder loads without ``twostep`` installed."""
        if kwargs.get("push_to_hub"):
            raise ValueError("save first, then upload the folder (huggingface_hub.upload_folder): "
                             "the pipeline file is added after diffusers' own save")
        super().save_pretrained(save_directory, **kwargs)
        shutil.copyfile(os.path.abspath(__file__), os.path.join(save_directory, PIPELINE_FILE + ".py"))
        # The module that defines batched_forward: twostep/teacher/zimage_batched.py in the package,
        # the folder's copy when this class was itself loaded from an exported folder.
        shutil.copyfile(inspect.getsourcefile(batched_forward), os.path.join(save_directory, BATCHED_FILE + ".py"))
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        index["_class_name"] = [PIPELINE_FILE, type(self).__name__]
        with open(index_path, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")

    # --- sampling ----------------------------------------------------------------------------

    @property
    def sigmas(self) -> list[float]:
        """The noise levels the student visits: ``[1, sigma_mid, 0]``."""
        return student_sigmas(self.config.sigma_mid)

    @property
    def default_size(self) -> int:
        """Image side when none is given: the VAE config's ``sample_size`` (1024 for Z-Image), else 1024."""
        size = getattr(self.vae.config, "sample_size", None)
        return int(size) if isinstance(size, int) else 1024

    def _default_max_sequence_length(self) -> int:
        limit = getattr(self.tokenizer, "model_max_length", 512)
        return min(512, int(limit)) if isinstance(limit, int) and limit > 0 else 512

    def _step_velocity(self, model: torch.nn.Module, caps: list[torch.Tensor],
                       joint_attention_kwargs: dict[str, Any] | None) -> Velocity:
        def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:  # u = ε - x0
            return -zimage_velocity(model, x, sigma, caps, joint_attention_kwargs=joint_attention_kwargs)

        return velocity

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        prompt_embeds: list[torch.Tensor] | None = None,
        return_dict: bool = True,
        num_images_per_prompt: int = 1,
        max_sequence_length: int | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> ZImagePipelineOutput | tuple:
        """Generate with exactly 2 transformer calls at sigmas ``[1, sigma_mid, 0]``, no guidance.

        Args:
            prompt: one prompt or a list (or give ``prompt_embeds``, a list of (L_i, D) caption features).
            height, width: image size in pixels, multiples of ``2 × vae_scale_factor``; default
                :attr:`default_size`.
            generator: a ``torch.Generator``, or one per image (per-image seeds independent of the batch).
            latents: (B, C, H/f, W/f) initial noise at σ=1 (overrides ``generator``).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (the fp32 latents, normalised space).
            num_images_per_prompt: images per prompt.
            max_sequence_length: caption tokens after the chat template; default
                ``min(512, tokenizer.model_max_length)``.
            joint_attention_kwargs: passed to the transformers.

        Returns:
            ``ZImagePipelineOutput(images=...)``, or ``(images,)`` when ``return_dict`` is False.
        """
        height = height or self.default_size
        width = width or self.default_size
        multiple = self.vae_scale_factor * 2
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}×{width}")
        if prompt is None and prompt_embeds is None:
            raise ValueError("give prompt or prompt_embeds")
        device = self._execution_device
        self._guidance_scale = 0.0
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False

        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self._encode_prompt(
                prompts, device=device,
                max_sequence_length=max_sequence_length or self._default_max_sequence_length())
        caps = [pe for pe in prompt_embeds for _ in range(num_images_per_prompt)]
        batch = len(caps)

        # ZImagePipeline.prepare_latents: randn_tensor with one generator or one per image; `latents` wins.
        latents = self.prepare_latents(batch, self.transformer.config.in_channels, height, width,
                                       torch.float32, device, generator, latents).float()

        sigmas = self.sigmas
        transformer_2 = self.transformer_2 if self.transformer_2 is not None else self.transformer
        self._num_timesteps = len(sigmas) - 1
        _, _, latents = two_step(self._step_velocity(self.transformer, caps, joint_attention_kwargs),
                                 self._step_velocity(transformer_2, caps, joint_attention_kwargs),
                                 latents, sigmas[1])

        if output_type == "latent":
            image = latents
        else:
            z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
            image = self.vae.decode(z, return_dict=False)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ZImagePipelineOutput(images=image)
