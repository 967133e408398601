"""Tests for fedray.data.catalog: layout recognition, labels, bad input, duplicates, schema."""

from __future__ import annotations

import hashlib
import random
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image, ImageFile

from fedray.data.catalog import (
    MANIFEST_SCHEMA,
    Catalog,
    DataError,
    Skipped,
    find_layout,
    scan,
)

KAGGLE_CLASSES = ("Benign", "Early", "Pre", "Pro")
BLOOD_CELL_FOLDERS = {
    "Benign": "Benign",
    "[Malignant] early Pre-B": "Early",
    "[Malignant] Pre-B": "Pre",
    "[Malignant] Pro-B": "Pro",
}

_seed = iter(range(1_000_000))


def make_image(path: Path, size: int = 8, fmt: str | None = None) -> Path:
    """A small noise image with unique content (so no accidental duplicates)."""
    rng = random.Random(next(_seed))
    image = Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def make_class_folders(parent: Path, counts: dict[str, int], ext: str = ".png") -> None:
    """`counts[name]` images in `parent/name/`, alternating PNG and JPEG."""
    for folder, n in counts.items():
        for i in range(n):
            suffix = ext if i % 2 == 0 else ".jpg"
            make_image(parent / folder / f"img_{i:03d}{suffix}")


def make_kaggle_original(dataset: Path, n_original: int = 2, n_segmented: int = 3) -> Path:
    make_class_folders(dataset / "Original", {c: n_original for c in KAGGLE_CLASSES})
    make_class_folders(dataset / "Segmented", {c: n_segmented for c in KAGGLE_CLASSES})
    return dataset


def make_blood_cell(parent: Path) -> Path:
    dataset = parent / "Blood cell Cancer [ALL]"
    # distinct counts per class, so any mapping mix-up changes the counts
    counts = dict(zip(BLOOD_CELL_FOLDERS, (1, 2, 3, 4)))
    make_class_folders(dataset, counts)
    return dataset


def make_plain(parent: Path, n: int = 2) -> Path:
    make_class_folders(parent, {c: n for c in KAGGLE_CLASSES})
    return parent


def labels_by_folder(catalog: Catalog) -> dict[str, set[str]]:
    """Class folder (first path part below the class parent) -> labels seen in it."""
    out: dict[str, set[str]] = {}
    for path, label in zip(catalog.table["path"].to_pylist(), catalog.table["label"].to_pylist()):
        out.setdefault(path.split("/")[-2], set()).add(label)
    return out


def label_counts(catalog: Catalog) -> Counter[str]:
    return Counter(catalog.table["label"].to_pylist())


# --------------------------------------------------------------------------- layouts


def test_kaggle_original_nested_under_top_folder(tmp_path: Path) -> None:
    dataset = make_kaggle_original(tmp_path / "archive" / "ALL")
    cat = scan(tmp_path)  # two levels above the dataset root
    assert cat.layout == "kaggle-original"
    assert cat.root == dataset.resolve()
    assert label_counts(cat) == {c: 2 for c in KAGGLE_CLASSES}
    paths = cat.table["path"].to_pylist()
    assert all(p.startswith("Original/") for p in paths)
    assert set(cat.table["source_layout"].to_pylist()) == {"kaggle-original"}
    assert labels_by_folder(cat) == {c: {c} for c in KAGGLE_CLASSES}
    assert cat.skipped == [] and cat.duplicates == []
    # the same dataset found from its own root gives the same table
    assert scan(dataset).table.equals(cat.table)


def test_segmented_ignored_by_default_and_selectable(tmp_path: Path) -> None:
    make_kaggle_original(tmp_path / "ALL", n_original=2, n_segmented=3)
    default = scan(tmp_path)
    assert not any("Segmented" in p for p in default.table["path"].to_pylist())
    assert default.table.num_rows == 8
    seg = scan(tmp_path, include_segmented=True)
    assert seg.table.num_rows == 12
    assert all(p.startswith("Segmented/") for p in seg.table["path"].to_pylist())
    assert label_counts(seg) == {c: 3 for c in KAGGLE_CLASSES}


def test_kaggle_original_missing_selected_variant(tmp_path: Path) -> None:
    make_class_folders(tmp_path / "ALL" / "Segmented", {c: 1 for c in KAGGLE_CLASSES})
    with pytest.raises(DataError, match="include_segmented=True") as err:
        scan(tmp_path)
    assert "Original" in str(err.value) and str(tmp_path / "ALL") in str(err.value)
    assert scan(tmp_path, include_segmented=True).table.num_rows == 4


def test_blood_cell_cancer_exact_mapping_no_substrings(tmp_path: Path) -> None:
    dataset = make_blood_cell(tmp_path / "kaggle-download")
    cat = scan(tmp_path)
    assert cat.layout == "kaggle-blood-cell-cancer"
    assert cat.root == dataset.resolve()
    assert labels_by_folder(cat) == {folder: {label} for folder, label in BLOOD_CELL_FOLDERS.items()}
    # "[Malignant] early Pre-B" (2 images) is Early and "[Malignant] Pre-B" (3) is Pre
    assert label_counts(cat) == {"Benign": 1, "Early": 2, "Pre": 3, "Pro": 4}
    layout, folders = find_layout(tmp_path)
    assert layout == "kaggle-blood-cell-cancer"
    assert sorted(f.name for f in folders) == sorted(BLOOD_CELL_FOLDERS)


def test_plain_class_folders(tmp_path: Path) -> None:
    make_class_folders(tmp_path, {"benign": 2, "Early Pre-B": 2, "PRE": 3})
    cat = scan(tmp_path)
    assert cat.layout == "class-folders"
    assert cat.root == tmp_path.resolve()
    assert label_counts(cat) == {"Benign": 2, "Early": 2, "Pre": 3}
    assert set(cat.table["group"].to_pylist()) == {""}  # flat layout: patient unknown


def test_find_layout_returns_class_folders(tmp_path: Path) -> None:
    dataset = make_kaggle_original(tmp_path / "ALL")
    layout, folders = find_layout(tmp_path)
    assert layout == "kaggle-original"
    assert folders == [(dataset / "Original" / c).resolve() for c in KAGGLE_CLASSES]
    _, seg = find_layout(tmp_path, include_segmented=True)
    assert seg == [(dataset / "Segmented" / c).resolve() for c in KAGGLE_CLASSES]


def test_substring_folder_names_are_unknown(tmp_path: Path) -> None:
    make_plain(tmp_path)
    make_image(tmp_path / "Preliminary" / "x.png")
    make_image(tmp_path / "Pre-B cells" / "y.png")
    with pytest.raises(DataError) as err:
        scan(tmp_path)
    msg = str(err.value)
    assert "2 problem(s)" in msg
    assert str(tmp_path / "Preliminary") in msg and str(tmp_path / "Pre-B cells") in msg
    cat = scan(tmp_path, skip_bad=True)
    assert label_counts(cat) == {c: 2 for c in KAGGLE_CLASSES}
    assert {s.path for s in cat.skipped} == {"Preliminary/", "Pre-B cells/"}
    assert all("unknown folder" in s.reason and "1 files not scanned" in s.reason for s in cat.skipped)


def test_nested_subfolders_give_group(tmp_path: Path) -> None:
    make_image(tmp_path / "Benign" / "patient1" / "a.png")
    make_image(tmp_path / "Benign" / "patient2" / "b.png")
    make_image(tmp_path / "Pro" / "c.png")
    cat = scan(tmp_path)
    assert dict(zip(cat.table["path"].to_pylist(), cat.table["group"].to_pylist())) == {
        "Benign/patient1/a.png": "Benign/patient1",
        "Benign/patient2/b.png": "Benign/patient2",
        "Pro/c.png": "",  # directly in its class folder: patient unknown
    }


# --------------------------------------------------------------------------- table


def test_schema_values_and_deterministic_order(tmp_path: Path) -> None:
    make_image(tmp_path / "Pro" / "z.png", size=12)
    make_image(tmp_path / "Benign" / "b.JPG", size=8, fmt="JPEG")
    make_image(tmp_path / "Benign" / "a.TIFF", size=8, fmt="TIFF")
    make_image(tmp_path / "Early" / "m.bmp", size=8)
    cat = scan(tmp_path)
    assert cat.table.schema.equals(MANIFEST_SCHEMA)
    assert cat.table.schema.field("width").type == pa.int32()
    assert cat.table.schema.field("height").type == pa.int32()
    paths = cat.table["path"].to_pylist()
    assert paths == ["Benign/a.TIFF", "Benign/b.JPG", "Early/m.bmp", "Pro/z.png"]
    rows = {r["path"]: r for r in cat.table.to_pylist()}
    assert rows["Pro/z.png"]["width"] == 12 and rows["Pro/z.png"]["height"] == 12
    for path, row in rows.items():
        assert row["sha256"] == hashlib.sha256((tmp_path / path).read_bytes()).hexdigest()
    assert scan(tmp_path).table.equals(cat.table)


def test_class_table_lists_every_class(tmp_path: Path) -> None:
    make_class_folders(tmp_path, {"Benign": 3, "Pro": 2})
    text = scan(tmp_path).class_table()
    lines = {line.split()[0]: line.split()[-1] for line in text.splitlines()[2:7]}
    assert lines == {"Benign": "3", "Early": "0", "Pre": "0", "Pro": "2", "total": "5"}
    assert "skipped: 0" in text and "class-folders" in text


def test_hidden_and_os_files_ignored_silently(tmp_path: Path) -> None:
    make_plain(tmp_path)
    (tmp_path / "Benign" / ".DS_Store").write_bytes(b"\0junk")
    (tmp_path / "Benign" / "._img_000.png").write_bytes(b"appledouble")
    (tmp_path / "Early" / "Thumbs.db").write_bytes(b"junk")
    (tmp_path / "Pre" / "desktop.ini").write_text("[x]")
    (tmp_path / ".cache").mkdir()
    (tmp_path / "__MACOSX" / "Benign").mkdir(parents=True)
    (tmp_path / "README.md").write_text("about")
    cat = scan(tmp_path)
    assert cat.table.num_rows == 8 and cat.skipped == []


# --------------------------------------------------------------------------- bad input


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("name", ["cut.jpg", "cut.png"])
def test_truncated_image(tmp_path: Path, name: str) -> None:
    make_plain(tmp_path)
    bad = make_image(tmp_path / "Early" / name, size=64)
    _truncate(bad)
    with pytest.raises(DataError, match="truncated") as err:
        scan(tmp_path)
    assert str(bad) in str(err.value) and "skip_bad=True" in str(err.value)
    cat = scan(tmp_path, skip_bad=True)
    assert [s.path for s in cat.skipped] == [f"Early/{name}"]
    assert f"Early/{name}" not in cat.table["path"].to_pylist()
    assert cat.table.num_rows == 8


def test_truncation_caught_even_if_pil_is_lenient(tmp_path: Path) -> None:
    make_plain(tmp_path)
    _truncate(make_image(tmp_path / "Pro" / "cut.jpg", size=64))
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True
    try:
        cat = scan(tmp_path, skip_bad=True)
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # caller's setting restored
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    assert [s.path for s in cat.skipped] == ["Pro/cut.jpg"]


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("notes.txt", b"some notes", "not an image file"),
        ("fake.jpg", b"this is not a jpeg", "unreadable"),
        ("empty.png", b"", "unreadable"),
        ("README", b"no extension", "not an image file"),
    ],
)
def test_non_image_file_in_class_folder(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    make_plain(tmp_path)
    (tmp_path / "Pre" / name).write_bytes(content)
    with pytest.raises(DataError, match=reason) as err:
        scan(tmp_path)
    assert str(tmp_path / "Pre" / name) in str(err.value)
    cat = scan(tmp_path, skip_bad=True)
    assert len(cat.skipped) == 1
    assert cat.skipped[0].path == f"Pre/{name}" and reason in cat.skipped[0].reason
    assert cat.table.num_rows == 8


def test_empty_class_folder(tmp_path: Path) -> None:
    make_class_folders(tmp_path, {"Benign": 2, "Early": 2})
    (tmp_path / "Pro").mkdir()
    (tmp_path / "Pro" / "Thumbs.db").write_bytes(b"x")  # ignored, so still empty
    with pytest.raises(DataError, match="empty class folder") as err:
        scan(tmp_path)
    assert str(tmp_path / "Pro") in str(err.value)
    cat = scan(tmp_path, skip_bad=True)
    assert cat.skipped == [Skipped("Pro/", cat.skipped[0].reason)]
    assert "empty class folder" in cat.skipped[0].reason
    assert label_counts(cat) == {"Benign": 2, "Early": 2}


def test_unknown_class_folder_in_kaggle_layout(tmp_path: Path) -> None:
    dataset = make_kaggle_original(tmp_path / "ALL")
    make_image(dataset / "Original" / "Misc" / "m.png")
    with pytest.raises(DataError, match="unknown folder 'Misc'") as err:
        scan(tmp_path)
    assert str(dataset.resolve() / "Original" / "Misc") in str(err.value)
    cat = scan(tmp_path, skip_bad=True)
    assert [s.path for s in cat.skipped] == ["Original/Misc/"]
    assert cat.table.num_rows == 8


def test_loose_image_next_to_class_folders(tmp_path: Path) -> None:
    make_plain(tmp_path)
    make_image(tmp_path / "stray.png")
    with pytest.raises(DataError, match="outside any class folder") as err:
        scan(tmp_path)
    assert str(tmp_path / "stray.png") in str(err.value)
    assert [s.path for s in scan(tmp_path, skip_bad=True).skipped] == ["stray.png"]


def test_fewer_than_two_classes(tmp_path: Path) -> None:
    make_class_folders(tmp_path, {"Benign": 3})
    with pytest.raises(DataError, match="at least two") as err:
        scan(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(DataError, match="at least two"):
        scan(tmp_path, skip_bad=True)


def test_fewer_than_two_classes_after_skipping(tmp_path: Path) -> None:
    make_class_folders(tmp_path, {"Benign": 2})
    (tmp_path / "Early").mkdir()
    (tmp_path / "Early" / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="unreadable"):
        scan(tmp_path)
    with pytest.raises(DataError, match=r"at least two.*1 file\(s\)/folder\(s\) were skipped"):
        scan(tmp_path, skip_bad=True)


def test_all_problems_collected_and_capped(tmp_path: Path) -> None:
    make_plain(tmp_path)
    for i in range(23):
        (tmp_path / "Benign" / f"note_{i:02d}.txt").write_text("x")
    (tmp_path / "Pro" / "bad.png").write_bytes(b"nope")
    (tmp_path / "Misc").mkdir()
    with pytest.raises(DataError) as err:
        scan(tmp_path)
    msg = str(err.value)
    assert msg.startswith("25 problem(s)")
    assert msg.count("\n  - ") == 20 and "... and 5 more" in msg
    cat = scan(tmp_path, skip_bad=True)
    assert len(cat.skipped) == 25
    assert {"Pro/bad.png", "Misc/", "Benign/note_22.txt"} <= {s.path for s in cat.skipped}
    assert "skipped: 25" in cat.class_table()


def test_missing_source(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="no such folder") as err:
        scan(missing)
    assert str(missing) in str(err.value)


def test_source_is_a_file(tmp_path: Path) -> None:
    archive = tmp_path / "all.zip"
    archive.write_bytes(b"PK")
    with pytest.raises(DataError, match="not a folder") as err:
        scan(archive, skip_bad=True)
    assert str(archive) in str(err.value)


def test_no_recognisable_layout_lists_expected(tmp_path: Path) -> None:
    make_image(tmp_path / "images" / "a.png")
    make_image(tmp_path / "Misc" / "b.png")
    with pytest.raises(DataError, match="no recognisable dataset layout") as err:
        scan(tmp_path, skip_bad=True)
    msg = str(err.value)
    assert str(tmp_path.resolve()) in msg
    for layout in ("kaggle-original", "kaggle-blood-cell-cancer", "class-folders"):
        assert layout in msg
    with pytest.raises(DataError):
        find_layout(tmp_path)


def test_two_datasets_under_one_parent_is_ambiguous(tmp_path: Path) -> None:
    a = make_kaggle_original(tmp_path / "ALL")
    b = make_blood_cell(tmp_path)
    with pytest.raises(DataError, match="holds 2 datasets") as err:
        scan(tmp_path)
    assert str(a.resolve()) in str(err.value) and str(b.resolve()) in str(err.value)
    assert scan(a).layout == "kaggle-original" and scan(b).layout == "kaggle-blood-cell-cancer"


# --------------------------------------------------------------------------- duplicates


def test_duplicates_reported_across_classes(tmp_path: Path) -> None:
    make_plain(tmp_path)
    original = tmp_path / "Benign" / "img_000.png"
    shutil.copyfile(original, tmp_path / "Benign" / "copy.png")
    shutil.copyfile(original, tmp_path / "Pro" / "same.png")
    shutil.copyfile(tmp_path / "Early" / "img_001.jpg", tmp_path / "Pre" / "dup.jpg")
    cat = scan(tmp_path)
    assert cat.duplicates == [
        ["Benign/copy.png", "Benign/img_000.png", "Pro/same.png"],
        ["Early/img_001.jpg", "Pre/dup.jpg"],
    ]
    assert cat.table.num_rows == 11  # 8 originals + 3 copies: reported, not removed
    assert "duplicate groups: 2" in cat.class_table()


def test_no_false_duplicates(tmp_path: Path) -> None:
    make_plain(tmp_path, n=3)
    cat = scan(tmp_path)
    assert cat.table.num_rows == 12 and cat.duplicates == []
    assert len(set(cat.table["sha256"].to_pylist())) == 12


def test_thread_pool_path_matches_files(tmp_path: Path) -> None:
    """Enough files to use the thread pool: rows, order and problems stay exact."""
    make_plain(tmp_path, n=6)
    _truncate(make_image(tmp_path / "Pre" / "cut.png", size=64))
    cat = scan(tmp_path, skip_bad=True)
    assert cat.table.num_rows == 24
    paths = cat.table["path"].to_pylist()
    assert paths == sorted(paths)
    assert [s.path for s in cat.skipped] == ["Pre/cut.png"]
    for row in cat.table.to_pylist():
        assert row["sha256"] == hashlib.sha256((tmp_path / row["path"]).read_bytes()).hexdigest()
