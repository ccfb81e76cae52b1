"""Teacher adapters, one per diffusers family, and the lookup from a pipeline folder to its adapter.

A folder's family comes from its ``model_index.json`` ``_class_name`` (a class name, or a
``[file, class]`` pair for exported students with their own pipeline file). docs/families.md lists
the families, what each adapter does, and what is verified.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import Family, read_model_index

FAMILIES: dict[str, tuple[str, str]] = {
    "z-image": ("zimage", "ZImageFamily"),
    "lumina2": ("lumina2", "Lumina2Family"),
    "flux2-klein": ("flux2", "Flux2KleinFamily"),
    "wan": ("wan", "WanFamily"),
}
"""Family name → (module in this package, adapter class), imported on first use."""

PIPELINES: dict[str, str] = {
    "ZImagePipeline": "z-image", "TwoStepZImagePipeline": "z-image",
    "Lumina2Pipeline": "lumina2", "TwoStepLumina2Pipeline": "lumina2",
    "Flux2KleinPipeline": "flux2-klein", "TwoStepFlux2KleinPipeline": "flux2-klein",
    "WanPipeline": "wan",
}
"""Pipeline class name (a teacher's, or an exported student's) → family name."""


def family_class(name: str) -> type[Family]:
    module, cls = FAMILIES[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


class UnsupportedTeacher(ValueError):
    """A pipeline folder of a family twostep has no adapter for."""


def class_name_of(index: dict[str, Any]) -> str:
    """The pipeline class a ``model_index.json`` names (the class of a ``[file, class]`` pair)."""
    name = index.get("_class_name")
    return str(name[-1] if isinstance(name, (list, tuple)) else name)


def family_of_class(cls: str, where: str) -> type[Family]:
    """The adapter for a pipeline class name (``where`` names its folder, hub id or object in errors)."""
    if cls not in PIPELINES:
        listed = ", ".join(f"{c} ({f})" for c, f in sorted(PIPELINES.items()))
        raise UnsupportedTeacher(f"{where}: pipeline class {cls!r}, which twostep has no adapter for; "
                                 f"supported: {listed}")
    return family_class(PIPELINES[cls])


def family_of_index(index: dict[str, Any], where: str) -> type[Family]:
    """The adapter for a ``model_index.json`` (``where`` names the folder or hub id in errors)."""
    return family_of_class(class_name_of(index), f"{where} (model_index.json)")


def adapter_for(obj: Any) -> Family:
    """The family adapter of a ``Teacher`` (its ``family``), an adapter (itself), or a bare diffusers
    pipeline of a supported class (a new adapter around it)."""
    if isinstance(obj, Family):
        return obj
    if isinstance(getattr(obj, "family", None), Family):
        return obj.family
    return family_of_class(type(obj).__name__, "a pipeline object")(obj)


def family_of(path: str) -> type[Family]:
    """The adapter for a local pipeline folder."""
    return family_of_index(read_model_index(path), path)


def family_of_hub(repo: str, revision: str | None = None) -> type[Family]:
    """The adapter for a hub id, from its ``model_index.json`` (the hub cache, or a download)."""
    import json

    from huggingface_hub import hf_hub_download

    with open(hf_hub_download(repo, "model_index.json", revision=revision), encoding="utf-8") as f:
        return family_of_index(json.load(f), repo)


__all__ = [
    "FAMILIES",
    "PIPELINES",
    "Family",
    "UnsupportedTeacher",
    "adapter_for",
    "class_name_of",
    "family_class",
    "family_of",
    "family_of_class",
    "family_of_hub",
    "family_of_index",
]
