"""Shared fixtures: the tiny random-weight Z-Image pipeline, saved as a real pipeline folder."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> str:
    """A random-weight ZImagePipeline folder (tiny sizes, byte-level tokenizer), built locally."""
    from twostep.pipeline.zimage import build_pipeline

    path = tmp_path_factory.mktemp("tiny-zimage")
    build_pipeline(seed=0, model_max_length=128).save_pretrained(path)
    return str(path)
