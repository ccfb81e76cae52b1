"""2-step students of stock diffusers pipelines, with one parameter set per step.

Self-contained on purpose: this file imports only diffusers, because an exported student folder
ships a copy of it (``model_index.json`` names ``["pipeline_experts", "<class>"]``), so the folder
loads with ``DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` without twostep.

Each class is the family's stock pipeline plus an optional ``transformer_2`` and ``sigma_mid`` in its
config: ``transformer`` runs every step at σ > ``sigma_mid`` and ``transformer_2`` every later step
(Wan 2.2's convention for two experts split by noise level). Everything else (text encoding, latent
preparation, guidance, the scheduler's Euler step, decoding) is the stock pipeline's own
``__call__``; the exported scheduler is configured so that ``num_inference_steps=2`` visits exactly
``[1, sigma_mid, 0]`` (static shift ``sigma_mid / (1 - sigma_mid)`` on the stock grid ``[1, 0.5]``).
"""

import json
import os
import shutil
from typing import Any, ClassVar

from diffusers import Flux2KleinPipeline, Lumina2Pipeline

PIPELINE_FILE = "pipeline_experts"
"""Module name of this file inside an exported folder."""
SIGMA_TOL = 1e-4


class _TwoExperts:
    """Mixin: swap ``transformer_2`` in once the scheduler's next σ is at or below ``sigma_mid``."""

    _optional_components: ClassVar[list[str]] = ["transformer_2"]

    def _register_experts(self, transformer_2: Any, sigma_mid: float) -> None:
        if not 0.0 < float(sigma_mid) < 1.0:
            raise ValueError(f"sigma_mid must be in (0, 1), got {sigma_mid}")
        self.register_modules(transformer_2=transformer_2)
        self.register_to_config(sigma_mid=float(sigma_mid))

    @classmethod
    def load_config(cls, *args, **kwargs):
        """A ``_class_name`` of ``[<file>, <this class>]`` is read as this class, so the installed class
        loads an exported folder without ``trust_remote_code``."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        name = config.get("_class_name") if isinstance(config, dict) else None
        if isinstance(name, (list, tuple)) and len(name) == 2 and name[1] == cls.__name__:
            config["_class_name"] = cls.__name__
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """``DiffusionPipeline.save_pretrained`` plus this file, named in ``model_index.json``."""
        if kwargs.get("push_to_hub"):
            raise ValueError("save first, then upload the folder (huggingface_hub.upload_folder)")
        super().save_pretrained(save_directory, **kwargs)
        shutil.copyfile(os.path.abspath(__file__), os.path.join(save_directory, PIPELINE_FILE + ".py"))
        index_path = os.path.join(save_directory, "model_index.json")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        index["_class_name"] = [PIPELINE_FILE, type(self).__name__]
        with open(index_path, "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
            f.write("\n")

    def __call__(self, *args: Any, **kwargs: Any):
        second = self.transformer_2
        if second is None:
            return super().__call__(*args, **kwargs)
        first, user_callback = self.transformer, kwargs.pop("callback_on_step_end", None)
        sigma_mid = float(self.config.sigma_mid)

        def swap(pipe, i, t, callback_kwargs):
            sigmas = pipe.scheduler.sigmas
            if i + 1 < len(sigmas) and float(sigmas[i + 1]) <= sigma_mid + SIGMA_TOL:
                pipe.__dict__["transformer"] = second  # not a config change: the same class
            return user_callback(pipe, i, t, callback_kwargs) if user_callback is not None else {}

        try:
            return super().__call__(*args, callback_on_step_end=swap, **kwargs)
        finally:
            self.__dict__["transformer"] = first


class TwoStepLumina2Pipeline(_TwoExperts, Lumina2Pipeline):
    """``Lumina2Pipeline`` with a step-2 ``transformer_2``. Call with ``num_inference_steps=2`` and
    ``guidance_scale=1.0`` (no guidance)."""

    model_cpu_offload_seq = "text_encoder->transformer->transformer_2->vae"

    def __init__(self, transformer, scheduler, vae, text_encoder, tokenizer, transformer_2=None,
                 sigma_mid: float = 0.75):
        super().__init__(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                         tokenizer=tokenizer)
        self._register_experts(transformer_2, sigma_mid)


class TwoStepFlux2KleinPipeline(_TwoExperts, Flux2KleinPipeline):
    """``Flux2KleinPipeline`` with a step-2 ``transformer_2``. Call with ``num_inference_steps=2`` and
    ``guidance_scale=1.0`` (no guidance)."""

    model_cpu_offload_seq = "text_encoder->transformer->transformer_2->vae"

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer, is_distilled: bool = False,
                 transformer_2=None, sigma_mid: float = 0.75):
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer, is_distilled=is_distilled)
        self._register_experts(transformer_2, sigma_mid)
