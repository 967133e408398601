"""The data commands end to end: synth -> prepare -> inspect -> a run on the prepared folder."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from fedray.cli import main
from fedray.config import load_config
from fedray.data.pipeline import DataPrepError, build_shards, load_source


def test_synth_prepare_inspect(tmp_path: Path, capsys) -> None:
    assert main(["data", "synth", "--output", str(tmp_path / "smears"), "--n", "60",
                 "--size", "32", "--patients-per-class", "3"]) == 0
    assert len(list((tmp_path / "smears").rglob("*.png"))) == 60
    assert main(["data", "prepare", "--source", str(tmp_path / "smears"),
                 "--output", str(tmp_path / "prepared")]) == 0
    out = capsys.readouterr().out
    assert "class-folders" in out and "60 images" in out
    table = pq.read_table(tmp_path / "prepared" / "manifest.parquet")
    assert {"path", "label", "sha256", "group"} <= set(table.column_names)
    assert main(["data", "inspect", str(tmp_path / "prepared")]) == 0
    assert "duplicate images: 0" in capsys.readouterr().out

    config = load_config(None, ["data.source=prepared", f"data.path={tmp_path / 'prepared'}",
                                "data.split.group_aware=false", "federation.hospitals=2",
                                "data.partition.min_per_hospital=5"])
    images = load_source(config.data, 0)
    assert images.num_rows == 60 and "image" in images.column_names
    shards = build_shards(images, config.data, 2, 0, tmp_path / "shards")
    assert sum(sum(c.values()) for c in shards.counts.values()) == 60


def test_bad_inputs_exit_2_naming_the_culprit(tmp_path: Path, capsys) -> None:
    assert main(["data", "prepare", "--source", str(tmp_path / "nope"), "--output", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["train", "--set", "federation.rounds=zero"]) == 2
    assert "federation.rounds" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "config.yaml" in capsys.readouterr().err
    assert main(["data", "inspect", str(tmp_path)]) == 2
    assert "manifest.parquet" in capsys.readouterr().err


def test_prepared_folder_without_manifest(tmp_path: Path) -> None:
    config = load_config(None, ["data.source=prepared", f"data.path={tmp_path}"])
    with pytest.raises(DataPrepError, match="manifest.parquet not found"):
        load_source(config.data, 0)


def test_backbones_lists_registry(capsys) -> None:
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    for name in ("smallcnn", "resnet50", "inception_v3", "efficientnet_b0"):
        assert name in out
