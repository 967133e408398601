"""Tests of the synthetic smear generator: reproducibility, geometry, schema, and the two
statistical promises the rest of the project relies on (no mean-colour shortcut, but a
learnable shape/texture signal)."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fedray.data import synth
from fedray.data.labels import CLASSES


def _decode(table: pa.Table) -> np.ndarray:
    """All images of a table as one float array (N, H, W, 3) in [0, 1]."""
    images = [
        np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
        for b in table.column("image").to_pylist()
    ]
    return np.stack(images).astype(np.float32) / 255.0


def _labels(table: pa.Table) -> np.ndarray:
    return np.array([CLASSES.index(name) for name in table.column("label").to_pylist()])


def _patient_split(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Boolean train/test masks that keep every patient on one side (even/odd patient number)."""
    numbers = np.array([int(g.rsplit("_", 1)[1]) for g in table.column("group").to_pylist()])
    train = numbers % 2 == 0
    return train, ~train


def _balanced_accuracy(
    features: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray
) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(features[train], labels[train])
    return float(balanced_accuracy_score(labels[test], model.predict(features[test])))


def _texture_features(images: np.ndarray) -> np.ndarray:
    """Colour-free shape/texture summary: histograms of per-image standardised grey levels
    and of gradient magnitudes. Position-invariant, so it needs no cell localisation."""
    gray = images.mean(axis=-1)
    gray = (gray - gray.mean(axis=(1, 2), keepdims=True)) / (
        gray.std(axis=(1, 2), keepdims=True) + 1e-6
    )
    gy, gx = np.gradient(gray, axis=(1, 2))
    magnitude = np.hypot(gx, gy)

    def hist(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
        return np.stack([np.histogram(v, bins=edges)[0] for v in values]) / values[0].size

    return np.concatenate(
        [hist(gray, np.linspace(-4, 3, 22)), hist(magnitude, np.linspace(0, 3, 16))], axis=1
    )


@pytest.fixture(scope="module")
def stats_table() -> pa.Table:
    """One mid-sized dataset shared by the statistical tests (generating it dominates)."""
    return synth.generate(n=1200, size=32, seed=0)


@pytest.fixture(scope="module")
def small_table() -> pa.Table:
    return synth.generate(n=48, size=32, seed=3, patients_per_class=4)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_images(small_table: pa.Table) -> None:
    again = synth.generate(n=48, size=32, seed=3, patients_per_class=4)
    assert again.column("sha256").to_pylist() == small_table.column("sha256").to_pylist()
    assert again.column("image").to_pylist() == small_table.column("image").to_pylist()


def test_different_seed_gives_different_images(small_table: pa.Table) -> None:
    other = synth.generate(n=48, size=32, seed=4, patients_per_class=4)
    assert set(other.column("sha256").to_pylist()).isdisjoint(
        small_table.column("sha256").to_pylist()
    )


def test_each_image_reproducible_alone_from_seed_and_index(small_table: pa.Table) -> None:
    """Any row can be regenerated without the others: its randomness is (seed, index)."""
    for index in (0, 17, 47):
        row = small_table.slice(index, 1).to_pylist()[0]
        label = CLASSES.index(row["label"])
        patient = int(row["group"].rsplit("_", 1)[1])
        image, box = synth.render_smear(
            label, 32, synth.image_rng(3, index), synth.patient_style(3, label, patient)
        )
        assert synth.encode_png(image) == row["image"]
        assert list(box) == row["cell_box"]


def test_parallel_generation_matches_serial(small_table: pa.Table) -> None:
    parallel = synth.generate(n=48, size=32, seed=3, patients_per_class=4, workers=2)
    assert parallel.equals(small_table)


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("size", [32, 64, 97, 299])
def test_any_size_gives_right_shape_and_box_inside(size: int) -> None:
    for label in range(len(CLASSES)):
        style = synth.patient_style(1, label, 0)
        image, (x0, y0, x1, y1) = synth.render_smear(label, size, synth.image_rng(1, label), style)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
        assert (x1 - x0) >= size * 0.15  # a white cell is a sizeable object, not a speck


def test_scene_is_resolution_independent() -> None:
    """Drawing happens in normalised coordinates: the same scene at twice the size has its
    main cell box at twice the pixel coordinates (within rounding)."""
    style = synth.patient_style(2, 2, 0)
    _, small = synth.render_smear(2, 64, synth.image_rng(2, 5), style)
    _, large = synth.render_smear(2, 128, synth.image_rng(2, 5), style)
    assert np.abs(np.array(large) - 2 * np.array(small)).max() <= 2


def test_box_covers_the_white_cell() -> None:
    """The darkest (nuclear) pixels of a lone-cell image lie mostly inside the box."""
    inside = []
    for index in range(12):
        label = index % len(CLASSES)
        image, (x0, y0, x1, y1) = synth.render_smear(
            label, 96, synth.image_rng(7, index), synth.patient_style(7, label, index)
        )
        darkness = 1.0 - image.astype(np.float32).mean(axis=-1) / 255.0
        mask = darkness >= np.quantile(darkness, 0.99)
        inside.append(mask[y0:y1, x0:x1].sum() / mask.sum())
    assert np.median(inside) > 0.8


def test_invalid_arguments_are_rejected() -> None:
    style = synth.patient_style(0, 0, 0)
    with pytest.raises(ValueError):
        synth.render_smear(4, 32, synth.image_rng(0, 0), style)
    with pytest.raises(ValueError):
        synth.class_counts(10, (1.0, 2.0))


# ----------------------------------------------------------------------------- table & folder


def test_table_schema_and_values(small_table: pa.Table) -> None:
    assert small_table.schema.equals(synth.SCHEMA)
    assert small_table.num_rows == 48
    rows = small_table.to_pylist()
    for row in rows:
        assert row["label"] in CLASSES
        assert re.fullmatch(rf"{row['label']}/synth_\d{{6}}\.png", row["path"])
        assert re.fullmatch(rf"patient_{row['label']}_\d{{3}}", row["group"])
        assert row["sha256"] == hashlib.sha256(row["image"]).hexdigest()
        assert row["width"] == row["height"] == 32
        assert len(row["cell_box"]) == 4
        assert Image.open(io.BytesIO(row["image"])).size == (32, 32)
    assert len({row["path"] for row in rows}) == len(rows)


def test_each_patient_has_one_class(stats_table: pa.Table) -> None:
    classes_of: dict[str, set[str]] = {}
    for group, label in zip(
        stats_table.column("group").to_pylist(), stats_table.column("label").to_pylist()
    ):
        classes_of.setdefault(group, set()).add(label)
    assert all(len(labels) == 1 for labels in classes_of.values())
    assert len(classes_of) > 4 * 10  # images are spread over many patients per class


def test_default_class_balance_follows_real_dataset(stats_table: pa.Table) -> None:
    counts = np.bincount(_labels(stats_table), minlength=4)
    expected = 1200 * np.array(synth.DEFAULT_CLASS_WEIGHTS) / sum(synth.DEFAULT_CLASS_WEIGHTS)
    assert np.abs(counts - expected).max() <= 1


def test_class_weights_are_respected() -> None:
    assert synth.class_counts(10, (1.0, 1.0, 0.0, 0.0)) == [5, 5, 0, 0]
    table = synth.generate(n=20, size=32, seed=0, class_weights=(0.0, 0.0, 1.0, 3.0))
    labels = table.column("label").to_pylist()
    assert labels.count("Pre") == 5 and labels.count("Pro") == 15


def test_write_folder(small_table: pa.Table, tmp_path: Path) -> None:
    manifest_path = synth.write_folder(small_table, tmp_path / "synth")
    assert manifest_path == tmp_path / "synth" / "manifest.parquet"
    manifest = pq.read_table(manifest_path)
    assert "image" not in manifest.column_names
    assert manifest.column("sha256").to_pylist() == small_table.column("sha256").to_pylist()
    for rel, digest in zip(
        manifest.column("path").to_pylist(), manifest.column("sha256").to_pylist()
    ):
        assert hashlib.sha256((tmp_path / "synth" / rel).read_bytes()).hexdigest() == digest
    assert {p.name for p in (tmp_path / "synth").iterdir() if p.is_dir()} <= set(CLASSES)


# ----------------------------------------------------------------------------- statistics


def test_mean_colour_is_not_a_shortcut(stats_table: pa.Table) -> None:
    """Mean RGB alone must not predict the class on unseen patients."""
    train, test = _patient_split(stats_table)
    features = _decode(stats_table).mean(axis=(1, 2))
    score = _balanced_accuracy(features, _labels(stats_table), train, test)
    assert score <= 0.60, score


def test_shape_and_texture_are_learnable(stats_table: pa.Table) -> None:
    """A cheap colour-free texture model beats the mean-colour model by far on unseen
    patients: the class signal lives in morphology (a CNN, trained separately, gets ~0.96)."""
    train, test = _patient_split(stats_table)
    images = _decode(stats_table)
    labels = _labels(stats_table)
    texture = _balanced_accuracy(_texture_features(images), labels, train, test)
    colour = _balanced_accuracy(images.mean(axis=(1, 2)), labels, train, test)
    assert texture > 0.75, texture
    assert texture > colour + 0.3, (texture, colour)
