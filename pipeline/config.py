"""Settings of ``twostep generate`` (the job and its workers) and ``twostep verify``.

Each command's flags are made from these dataclasses (common/config_flags.py): a flag's help is
the docstring under its field and its default the field's default, written here once. Their checks
raise :class:`~twostep.common.config_flags.FieldError`, which names the field (the command line
names the flag). docs/generation.md describes the settings for users.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from twostep.common.config_flags import FieldError, at_least

from .shardformat import IMAGE_FORMATS, OPTIONAL_ARRAYS

DEFAULT_SAMPLE = 32
"""Shards ``twostep verify`` reads in full by default (``--sample N`` changes it)."""


def json_object(text: str) -> dict:
    """A JSON object given on the command line."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _names(text: str) -> tuple[str, ...]:
    """Comma-separated names; ``''`` for none."""
    return tuple(s for s in text.split(",") if s)


def _sample(text: str) -> int | str:
    if text.strip().lower() == "all":
        return "all"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of shards or 'all'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected at least 1 shard (--fast reads none)")
    return value


@dataclass(kw_only=True)
class ShardSettings:
    """How a shard is generated and written: the settings the job hands every worker as they are."""

    teacher: str = "toy"
    """toy, a local pipeline folder of a supported family (Z-Image, Lumina 2, FLUX.2 [klein], Wan; docs/families.md),
    or a hub id[@revision]."""
    shard_size: int = 256
    """Manifest rows per shard."""
    batch_size: int = 16
    """Samples per teacher call."""
    image_format: str = field(default="webp", metadata={"choices": (*IMAGE_FORMATS, "none")})
    """Image member per sample: webp and png lossless, jpg at quality 95; none keeps latents only."""
    save: tuple[str, ...] = field(default=("mid",), metadata={"parse": _names, "metavar": "NAME,..."})
    """Extra arrays per sample, comma-separated: mid, noise ('' for none)."""
    on_sample_error: str = field(default="skip", metadata={"choices": ("skip", "fail")})
    """skip: record a failing sample in failed.parquet and commit the rest of its shard; fail: fail the
    shard."""
    encode_threads: int = 0
    """Threads per worker that encode finished samples (image, arrays, json) while its teacher
    generates; 0 = the CPUs the worker may run on, at most 8. On GPU nodes, about the CPUs per GPU."""
    num_steps: int | None = None
    """Override the teacher's sampling steps (default: the teacher's, 8)."""
    guidance_scale: float | None = None
    """Override the teacher's guidance (default: its family's, 0 for Z-Image-Turbo; docs/families.md)."""
    storage_options: dict[str, Any] = field(default_factory=dict, metadata={"parse": json_object})
    """fsspec storage options as JSON, e.g. '{"endpoint_url": "http://…"}'."""

    def __post_init__(self) -> None:
        self.save = tuple(self.save)
        bad = sorted(set(self.save) - set(OPTIONAL_ARRAYS))
        if bad:
            raise FieldError("save", f"accepts {' and '.join(OPTIONAL_ARRAYS)}, not {bad}")
        for name, allowed in (("image_format", (*IMAGE_FORMATS, "none")), ("on_sample_error", ("skip", "fail"))):
            if getattr(self, name) not in allowed:
                raise FieldError(name, f"must be {', '.join(allowed[:-1])} or {allowed[-1]}, "
                                       f"not {getattr(self, name)!r}")
        at_least(self, 1, "shard_size", "batch_size")
        at_least(self, 0, "encode_threads")

    @property
    def sampler_overrides(self) -> dict[str, Any]:
        """The sampler settings given (``Teacher.load``'s keywords)."""
        return {k: v for k, v in (("num_steps", self.num_steps), ("guidance_scale", self.guidance_scale))
                if v is not None}

    def shard_settings(self) -> dict[str, Any]:
        """This config's values of the :class:`ShardSettings` fields."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ShardSettings)}


@dataclass(kw_only=True)
class GenerateConfig(ShardSettings):
    """Settings of ``twostep generate``: the shard settings, plus the job's."""

    manifest: str = field(metadata={"metavar": "MANIFEST"})
    """Manifest parquet (twostep prompts build/toy): a local path or a URL (s3://…, gs://…,
    https://…); the job copies it into the store."""
    out: str = field(metadata={"metavar": "STORE"})
    """Store URL: a local folder, s3://bucket/prefix, gs://…"""
    num_workers: int = 1
    """Worker actors, each holding one teacher."""
    gpus_per_worker: float = 0.0
    """GPUs per worker; 0 = CPU workers that split the cluster's CPUs."""
    ray_address: str | None = None
    """Existing Ray cluster (default: RAY_ADDRESS, else start a local one)."""
    max_shard_retries: int = 2
    """Retries of a failing shard, each on another worker."""
    shard_timeout: float | None = field(default=None, metadata={"metavar": "SECONDS"})
    """A shard still running this long has its worker killed and replaced and is requeued (default:
    10x the median shard time so far, at least 60 s; 1800 s before the first shard ends)."""
    startup_timeout: float = field(default=1800.0, metadata={"metavar": "SECONDS"})
    """Time the workers have to load their teacher; those not up by then are left out and the job
    runs with the others."""
    overwrite: bool = False
    """Replace a store made with another manifest, teacher or sampler."""
    index_every_shards: int = 500
    """While the job runs, ``index.json`` is rewritten after this many newly committed shards, or
    after ``index_every_s`` seconds with at least one, so a killed driver leaves a useful index.
    Each write serialises every entry (about 200 bytes a shard)."""
    index_every_s: float = 300.0
    """Seconds between rewrites of ``index.json`` while the job runs (see ``index_every_shards``)."""
    max_actor_restarts: int = 3
    """Replacements of one worker slot in a row without a shard done there, before the slot is left out."""
    actor_fail_limit: int = 2
    """Distinct shards an actor may fail while other actors succeed, before it is replaced (those
    failures do not count against the shards' retries)."""
    max_upload_failures: int = 8
    """Failed shard uploads in a row (no upload succeeding between them) that stop the job."""
    lease_ttl: float = 300.0
    """Seconds the store's lease lasts unless renewed; renewed every ``lease_ttl / 5``."""

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least(self, 1, "num_workers", "index_every_shards", "actor_fail_limit", "max_upload_failures")
        at_least(self, 0, "max_actor_restarts")
        at_least(self, 0, "index_every_s", "shard_timeout", "startup_timeout", "lease_ttl", strict=True)


GENERATE_FLAGS = ("manifest", "out", "teacher", "shard_size", "batch_size", "num_workers", "gpus_per_worker",
                  "image_format", "save", "encode_threads", "ray_address", "max_shard_retries", "shard_timeout",
                  "startup_timeout", "on_sample_error", "storage_options", "num_steps", "guidance_scale",
                  "overwrite")
"""The :class:`GenerateConfig` fields ``twostep generate`` has flags for (the rest are the Python API's)."""


@dataclass(kw_only=True)
class WorkerConfig(ShardSettings):
    """What every worker needs: the shard settings, plus where the store is; the job passes the same
    one to all."""

    store_url: str
    """The store's URL."""
    manifest: str
    """Path or URL of the manifest (the store's own copy)."""
    threads: int = 0
    """torch CPU threads (0 = leave torch's default)."""
    device: str | None = None
    """The teacher's device (default: the teacher's choice)."""


@dataclass(kw_only=True)
class VerifyConfig:
    """Settings of ``twostep verify``."""

    store: str
    """Store URL."""
    fast: bool = False
    """Only the listing check: read no shard (a few requests whatever the store's size)."""
    full: bool = False
    """Read every shard in full: sha256, format (the trainer's parser) and keys (same as --sample all;
    with --sample N, N random shards)."""
    sample: int | str | None = field(default=None, metadata={"parse": _sample, "metavar": "N|all"})
    """Read N random shards in full (--seed picks them), or all of them (default: the number the
    description gives, every shard of a smaller store)."""
    threads: int = 16
    """Shards read at once."""
    ray_address: str | None = None
    """Read the shards as Ray tasks on this cluster (default: RAY_ADDRESS, else threads)."""
    regenerate: int = field(default=0, metadata={"metavar": "K"})
    """Regenerate K random samples with the recorded teacher and compare latents."""
    seed: int = 0
    """Which shards --sample reads and which samples --regenerate picks."""
    device: str | None = None
    """Device for --regenerate (default: cuda if available)."""
    teacher: str | None = None
    """Where the recorded teacher is on this machine, for --regenerate (default: the recorded id: toy,
    a folder path or a hub id)."""
    storage_options: dict[str, Any] = field(default_factory=dict, metadata={"parse": json_object})
    """fsspec storage options as JSON."""
    json: bool = False
    """Print the report as JSON."""

    def __post_init__(self) -> None:
        if self.fast and self.full:
            raise FieldError("fast", "reads no shard and {full} reads them all: give one of them")
        if self.fast and self.sample is not None:
            raise FieldError("fast", f"reads no shard; {{sample}} {self.sample} reads some: give one of them")
        if self.sample is not None and self.sample != "all" and (
                isinstance(self.sample, bool) or not isinstance(self.sample, int) or self.sample < 1):
            raise FieldError("sample", f"must be a number of shards ≥ 1 or 'all', not {self.sample!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int):
            raise FieldError("threads", f"must be a number ≥ 1, not {self.threads!r}")
        at_least(self, 1, "threads")
        at_least(self, 0, "regenerate")
