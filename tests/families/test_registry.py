"""Picking the adapter from a folder's model_index.json, the error for other families, and a FLUX.2
row whose size has no mid state."""

from __future__ import annotations

import json

import pytest

from twostep.cli import main as twostep
from twostep.teacher.families import FAMILIES, PIPELINES, UnsupportedTeacher, family_of


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_tiny_folder_gets_its_family(family, tmp_path):
    from twostep.teacher.random_pipelines import build_pipeline

    build_pipeline(family, seed=0).save_pretrained(tmp_path)
    kind = family_of(str(tmp_path))
    assert kind.name == family and type(build_pipeline(family)).__name__ in kind.pipeline_classes
    assert all(PIPELINES[c] == family for c in kind.pipeline_classes)


def test_an_unsupported_family_is_named_with_the_supported_ones(tmp_path, capsys):
    folder = tmp_path / "sd3"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(UnsupportedTeacher, match="StableDiffusion3Pipeline") as e:
        family_of(str(folder))
    for name in ("ZImagePipeline", "Lumina2Pipeline", "Flux2KleinPipeline", "WanPipeline"):
        assert name in str(e.value)
    # the commands stop before starting anything
    from twostep.toy.world import build_toy_manifest

    build_toy_manifest(2, tmp_path / "m.parquet")
    assert twostep(["generate", "--manifest", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "s"),
                    "--teacher", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "StableDiffusion3Pipeline" in err and "WanPipeline" in err
    assert not (tmp_path / "s").exists()


def test_flux2_rows_off_the_default_size_fail_with_the_reason_when_mid_is_saved(tmp_path):
    """FLUX.2's σ grid depends on the image size: a row at another size has no state at the store's
    σ_mid, so it is a failed row that says why; the rows at the default size are written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from twostep.pipeline.worker import ShardWorker, WorkerConfig
    from twostep.teacher.random_pipelines import build_pipeline
    from twostep.toy.world import build_toy_manifest

    teacher = tmp_path / "klein"
    build_pipeline("flux2-klein", seed=0).save_pretrained(teacher)
    build_toy_manifest(4, tmp_path / "m.parquet", height=64, width=64)
    table = pq.read_table(tmp_path / "m.parquet")
    h = table.column("height").to_pylist()
    h[2:] = [32, 32]
    pq.write_table(table.set_column(table.schema.get_field_index("height"), "height",
                                    pa.array(h, table.schema.field("height").type)),
                   tmp_path / "m.parquet")
    worker = ShardWorker(WorkerConfig(store_url=str(tmp_path / "store"), manifest=str(tmp_path / "m.parquet"),
                                      teacher=str(teacher), shard_size=4, batch_size=4, image_format="none"))
    assert worker.teacher.mid_index_at(64, 64) == 4 and worker.teacher.mid_index_at(32, 64) is None
    stats = worker.run(0, "fp")
    assert stats["samples"] == 2 and [f["row"] for f in stats["failures"]] == [2, 3]
    assert all("no mid state at 32×64" in f["reason"] for f in stats["failures"])
