"""Prompt manifests: read prompt files, normalise, de-duplicate, assign ids and seeds, hash."""

from .build import BuildOptions, BuildSummary, ManifestError, build_manifest, rejects_path
from .manifest import compute_hash, derive_seed, read_meta, text_id
from .readers import InputError, bundled_path
from .report import inspect_manifest
from .split import split_manifest

__all__ = [
    "BuildOptions", "BuildSummary", "InputError", "ManifestError", "build_manifest", "bundled_path",
    "compute_hash", "derive_seed", "inspect_manifest", "read_meta", "rejects_path", "split_manifest",
    "text_id",
]
