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


# ----------------------------------------------------------------------------- difficulty & sites

# Digest of the sha256 column of generate(n=48, size=32, seed=3, patients_per_class=4) as the
# generator made it before difficulty and sites existed: difficulty 0 must stay byte-identical.
EASY_DIGEST = "9af6a96d0b382bbaad23e30793b8b813007b8d28a240026a78b5827e4d9f4687"
EASY_DIGEST_64 = "b892cf515ea022d09fb25e139f23b5e251130c338b60f9cfeb64a86722541841"


def _digest(table: pa.Table) -> str:
    return hashlib.sha256("".join(table.column("sha256").to_pylist()).encode()).hexdigest()


def _patient_mask(table: pa.Table, test_share: float = 0.3) -> np.ndarray:
    """Test mask holding out about ``test_share`` of each (site, class)'s patients."""
    patients = np.array(table.column("patient").to_pylist())
    keys = sorted(set(zip(table.column("site").to_pylist(), table.column("true_label").to_pylist(),
                          patients)))
    rng = np.random.default_rng(0)
    held = set()
    for site, label in sorted({(s, c) for s, c, _ in keys}):
        pool = [p for s, c, p in keys if (s, c) == (site, label)]
        if len(pool) >= 2:
            held.update(rng.choice(pool, size=max(1, round(test_share * len(pool))), replace=False))
    return np.isin(patients, sorted(held))


@pytest.fixture(scope="module")
def site_table() -> pa.Table:
    """Three hospitals at the default difficulty, small images (generating dominates)."""
    return synth.generate_sites(n=900, size=32, seed=0, sites=3)


def test_difficulty_zero_reproduces_the_original_images(small_table: pa.Table) -> None:
    assert _digest(small_table) == EASY_DIGEST
    explicit = synth.generate(n=48, size=32, seed=3, patients_per_class=4, difficulty=0.0)
    assert explicit.equals(small_table)
    assert _digest(synth.generate(n=24, size=64, seed=0)) == EASY_DIGEST_64


def test_difficulty_changes_the_blasts_only_when_asked() -> None:
    easy = synth.generate(n=48, size=32, seed=3, patients_per_class=4)
    hard = synth.generate(n=48, size=32, seed=3, patients_per_class=4, difficulty=1.0)
    assert hard.schema.equals(synth.SCHEMA)
    assert hard.column("label").to_pylist() == easy.column("label").to_pylist()
    assert hard.column("sha256").to_pylist() != easy.column("sha256").to_pylist()
    with pytest.raises(ValueError):
        synth.generate(n=8, size=32, difficulty=-0.5)


def test_blast_morphologies_overlap_and_benign_stays_apart() -> None:
    """At difficulty 1 the subtypes' nucleus looks share ranges; at 0 they do not. Benign
    borrows so little that its cells stay smaller than any blast's."""

    def notch(label: int, difficulty: float) -> np.ndarray:
        looks = [synth.patient_look(label, difficulty, np.random.default_rng([9, p]))
                 for p in range(200)]
        return np.array([np.mean(look.notch_depth) for look in looks])

    pre, pro = CLASSES.index("Pre"), CLASSES.index("Pro")
    assert notch(pre, 0.0).max() < notch(pro, 0.0).min()  # easy: disjoint
    assert notch(pre, 1.0).max() > notch(pro, 1.0).min()  # hard: overlapping
    early_hard = synth.patient_look(1, 1.0, np.random.default_rng([9, 1]))
    assert early_hard != synth.patient_look(1, 0.0, np.random.default_rng([9, 1]))

    benign_top = max(
        synth.patient_look(0, 1.0, np.random.default_rng([5, p])).cell_radius[1] for p in range(200)
    )
    assert benign_top < min(synth._LOOKS[CLASSES[k]].cell_radius[0] for k in (1, 2, 3))


def test_mean_colour_baseline_is_near_chance_with_sites(site_table: pa.Table) -> None:
    """Each site's colour cast moves the mean colour, but by site, not by class: on held-out
    patients, logistic regression on mean RGB stays at or below 0.40 balanced accuracy."""
    test = _patient_mask(site_table)
    features = _decode(site_table).mean(axis=(1, 2))
    score = _balanced_accuracy(features, _labels(site_table), ~test, test)
    assert score <= 0.40, score


def test_site_is_visible_in_colour_while_class_is_not(site_table: pa.Table) -> None:
    test = _patient_mask(site_table)
    images = _decode(site_table)
    features = np.concatenate([images.mean(axis=(1, 2)), images.std(axis=(1, 2))], axis=1)
    sites = np.array([["site_a", "site_b", "site_c"].index(s)
                      for s in site_table.column("site").to_pylist()])
    site_score = _balanced_accuracy(features, sites, ~test, test)
    class_score = _balanced_accuracy(images.mean(axis=(1, 2)), _labels(site_table), ~test, test)
    assert site_score > 0.75, site_score  # chance is 1/3
    assert site_score > class_score + 0.35, (site_score, class_score)


def test_sites_differ_in_scanner_and_class_mix(site_table: pa.Table) -> None:
    styles = [synth.site_style(0, k) for k in range(3)]
    assert len({s.cast for s in styles}) == 3 and len({s.jpeg_quality for s in styles}) == 3
    assert synth.site_style(0, 0, difficulty=0.0).cast == (1.0, 1.0, 1.0)
    sites = np.array(site_table.column("site").to_pylist())
    labels = _labels(site_table)
    shares = np.stack([np.bincount(labels[sites == s], minlength=4) / (sites == s).sum()
                       for s in ("site_a", "site_b", "site_c")])
    assert np.abs(shares - shares.mean(axis=0)).max() > 0.05, shares


def test_site_table_schema_and_disjoint_patients(site_table: pa.Table) -> None:
    assert site_table.schema.equals(synth.SITE_SCHEMA)
    rows = site_table.drop_columns(["image"]).to_pylist()
    assert {r["site"] for r in rows} == {"site_a", "site_b", "site_c"}
    assert sorted(np.unique([r["site"] for r in rows], return_counts=True)[1]) == [300] * 3
    sites_of: dict[str, set[str]] = {}
    for r in rows:
        assert re.fullmatch(
            rf"{r['site']}/{r['label']}/{r['patient']}/synth_\d{{6}}\.png", r["path"]
        ), r["path"]
        assert r["group"] == f"{r['label']}/{r['patient']}"
        assert r["patient"].startswith(r["site"] + "_")
        assert r["label"] == r["true_label"]  # no label noise unless asked
        sites_of.setdefault(r["patient"], set()).add(r["site"])
    assert all(len(s) == 1 for s in sites_of.values())
    assert len(sites_of) > 3 * 4 * 5


def test_write_sites_layout_is_read_by_the_catalog(tmp_path: Path) -> None:
    from fedray.data import catalog

    table = synth.generate_sites(n=60, size=32, seed=1, sites=2, patients_per_class=3,
                                 label_noise=0.1)
    written = synth.write_sites(table, tmp_path / "sites")
    assert [p.relative_to(tmp_path / "sites").as_posix() for p in written] == [
        "site_a/manifest.parquet", "site_b/manifest.parquet", "manifest.parquet"]
    from fedray.data.pipeline import load_prepared

    pooled = load_prepared(tmp_path / "sites")  # data.source: prepared, all sites at once
    assert pooled.column("path").to_pylist() == table.column("path").to_pylist()
    assert pooled.column("image").to_pylist() == table.column("image").to_pylist()
    assert pooled.column("site").to_pylist() == table.column("site").to_pylist()
    patients = []
    for manifest in written[:-1]:
        site = manifest.parent
        files = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.png"))
        assert all(re.fullmatch(r"(Benign|Early|Pre|Pro)/[a-z_]+_\d{3}/synth_\d{6}\.png", f)
                   for f in files)
        cat = catalog.scan(site)
        assert cat.layout == catalog.CLASS_FOLDERS and not cat.skipped
        mine = pq.read_table(manifest).to_pylist()
        by_path = {r["path"]: r for r in mine}
        assert sorted(cat.table.column("path").to_pylist()) == sorted(by_path) == files
        for row in cat.table.to_pylist():
            assert row["group"] == by_path[row["path"]]["group"]
            assert row["label"] == by_path[row["path"]]["label"]
            assert row["sha256"] == by_path[row["path"]]["sha256"]
        patients.append({r["patient"] for r in mine})
    assert patients[0].isdisjoint(patients[1])


@pytest.fixture(scope="module")
def clean_sites() -> pa.Table:
    return synth.generate_sites(n=60, size=16, seed=2, sites=2)


@pytest.mark.parametrize("noise", [0.1, 0.3])
def test_label_noise_fraction_is_as_asked_and_recorded(noise: float, clean_sites: pa.Table) -> None:
    clean = clean_sites
    assert clean.column("label").to_pylist() == clean.column("true_label").to_pylist()
    table = synth.generate_sites(n=60, size=16, seed=2, sites=2, label_noise=noise)
    label = np.array(table.column("label").to_pylist())
    true = np.array(table.column("true_label").to_pylist())
    sites = np.array(table.column("site").to_pylist())
    for site in ("site_a", "site_b"):
        flipped = (label != true)[sites == site]
        assert flipped.sum() == round(noise * 30)
    same = label == true
    # Relabelling changes only the recorded label and folder, never the pixels.
    assert table.column("sha256").to_pylist() == clean.column("sha256").to_pylist()
    assert (np.array(clean.column("label").to_pylist())[same] == label[same]).all()
    with pytest.raises(ValueError):
        synth.generate_sites(n=12, size=16, label_noise=1.5)


def test_site_generation_is_deterministic_serial_or_parallel() -> None:
    one = synth.generate_sites(n=24, size=16, seed=5, sites=2)
    assert synth.generate_sites(n=24, size=16, seed=5, sites=2).equals(one)
    assert synth.generate_sites(n=24, size=16, seed=5, sites=2, workers=2).equals(one)
    other = synth.generate_sites(n=24, size=16, seed=6, sites=2)
    assert set(other.column("sha256").to_pylist()).isdisjoint(one.column("sha256").to_pylist())


def test_cli_writes_site_folders(tmp_path: Path) -> None:
    from fedray.cli import main

    out = tmp_path / "hospitals"
    assert main(["data", "synth", "--output", str(out), "--sites", "2", "--n", "40",
                 "--size", "16", "--label-noise", "0.1"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["site_a", "site_b"]
    assert (out / "site_a" / "manifest.parquet").is_file() and (out / "manifest.parquet").is_file()
    assert main(["data", "synth", "--output", str(tmp_path / "x"), "--label-noise", "0.1"]) == 2
