"""``EvalConfig``: everything one ``twostep eval`` run is asked to do (docs/evaluation.md).

Each field's docstring is also the help text of its flag (``twostep.common.config_flags``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from twostep.common.config_flags import FieldError, at_least

FEATURES = ("auto", "toy", "clip", "dino")


def parse_size(text: str) -> tuple[int, int]:
    """``H`` or ``HxW`` → ``(H, W)``."""
    try:
        h, _, w = text.lower().partition("x")
        return int(h), int(w or h)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected H or HxW, not {text!r}") from e


@dataclass
class EvalConfig:
    """What to score, against what, on which prompts, and where the report goes."""

    student: str | None = None
    """An exported student folder (RUN_DIR/student) or a run folder."""
    teacher: str = "toy"
    """Its teacher: toy, a pipeline folder or a hub id."""
    prompts: str | None = field(default=None, metadata={"metavar": "MANIFEST"})
    """Eval prompts and seeds: the first N rows of a manifest (twostep prompts build/toy; toy manifests
    also give the named attributes); default: N fresh toy prompts."""
    num_samples: int = 500
    """Eval prompts."""
    seed: int = 20261122
    """Seed of the toy prompts, the references' and diversity's noise, and the render set."""
    size: tuple[int, int] | None = field(default=None, metadata={"parse": parse_size, "metavar": "H[xW]"})
    """Image size; default: the manifest's height/width, 64 for toy prompts."""
    batch_size: int = 100
    """Samples per call, the same for all three sets."""
    device: str | None = None
    """Torch device; default: cuda if available, else cpu."""
    features: str = field(default="auto", metadata={"choices": FEATURES})
    """Feature space of FD, precision/recall and diversity: toy checker, open_clip image embeddings or
    DINOv2 CLS features; auto: toy for toy prompts, else clip if --clip-model is given, else dino."""
    clip_model: str | None = None
    """open_clip model for CLIP score and clip features: a name (ViT-B-32, with --clip-pretrained),
    hf-hub:ORG/REPO, or a local folder with open_clip_config.json and weights."""
    clip_pretrained: str | None = None
    """With a model name: an open_clip pretrained tag or a local weights file."""
    dino_model: str | None = None
    """DINOv2 model for --features dino (FD_DINOv2): a hub id such as facebook/dinov2-large or a local
    folder with config.json, weights and preprocessor_config.json (transformers)."""
    diversity_prompts: int = 16
    """Prompts sampled with several seeds for per-prompt diversity; 0 = skip."""
    diversity_seeds: int = 4
    """Seeds per diversity prompt (fewer than 2 skips diversity)."""
    references: int = 1
    """Independent 8-step reference sets (other seeds) to score against; with 2 or more the report gives
    the gap closed against each and their spread."""
    cache: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Keep the teacher-side sample sets (8 steps, naive 2 steps, references) in DIR and reuse them when
    the teacher, prompts, seeds and size match (scoring several students)."""
    out: str = "out/eval"
    """Folder for the report, metrics and grids (the command line's; evaluate() writes nothing)."""

    def __post_init__(self) -> None:
        at_least(self, 1, "num_samples", "batch_size", "references")
        at_least(self, 0, "diversity_prompts", "diversity_seeds")
        if self.features not in FEATURES:
            raise FieldError("features", f"must be one of {', '.join(FEATURES)}, not {self.features!r}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise FieldError("size", f"must be (height, width), both ≥ 1, not {self.size}")
