"""Tests for fedray.data.catalog: layout recognition, labels, bad input, duplicates, schema."""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from fedray.config import DataConfig
from fedray.data import catalog
from fedray.data.catalog import (
    DEFAULT_MAX_FILE_MB,
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
    (tmp_path / "lost+found").mkdir()  # an ext4 volume's root, as a site volume mounts it
    (tmp_path / "lost+found" / "#1234").write_bytes(b"\0orphan")
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


# --------------------------------------------------------------------------- hostile folders

BAD_NAME = b"caf\xe9.png"  # Latin-1 bytes: not valid UTF-8
SHOWN_BAD_NAME = "caf\\xe9.png"


@pytest.fixture
def forbidden(monkeypatch):
    """Paths that must never be opened: any opener asked for one fails the test at once (so a
    regression fails instead of blocking on a FIFO or reading /dev/zero forever)."""
    paths: set[str] = set()
    real = {"os": os.open, "io": io.open, "builtins": builtins.open}

    def check(target: object) -> None:
        if isinstance(target, (str, bytes, os.PathLike)):
            resolved = os.path.realpath(os.fsdecode(target))
            assert resolved not in paths, f"opened {resolved}"

    def guarded(opener):
        def open_checked(file, *args, **kwargs):
            check(file)
            return opener(file, *args, **kwargs)

        return open_checked

    monkeypatch.setattr(os, "open", guarded(real["os"]))
    monkeypatch.setattr(io, "open", guarded(real["io"]))
    monkeypatch.setattr(builtins, "open", guarded(real["builtins"]))
    return paths


def make_hostile(parent: Path) -> tuple[Path, dict[str, str]]:
    """A class-folder dataset (8 good images) plus one hostile entry of each kind; returns the
    dataset and {manifest-spelled path: expected reason fragment}."""
    dataset = make_plain(parent / "ds")
    os.symlink("/dev/zero", dataset / "Benign" / "zero.png")
    os.mkfifo(dataset / "Early" / "pipe.png")
    make_image(parent / "elsewhere.png")
    os.symlink(parent / "elsewhere.png", dataset / "Pre" / "outside.png")
    make_image(Path(os.fsdecode(os.path.join(os.fsencode(dataset / "Pro"), BAD_NAME))))
    (dataset / "Pro" / "huge.png").write_bytes(b"\x89PNG" + b"\0" * 4096)
    expected = {
        "Benign/zero.png": "leaves the source folder",
        "Early/pipe.png": "a FIFO",
        "Pre/outside.png": "leaves the source folder",
        f"Pro/{SHOWN_BAD_NAME}": "not valid UTF-8",
        "Pro/huge.png": "over the 0.00390625 MiB cap",
    }
    return dataset, expected


HOSTILE_CAP_MB = 4 / 1024  # 4 KiB: the 8x8 test images are far smaller, huge.png is over it


@pytest.fixture
def hostile(tmp_path: Path, forbidden: set[str]) -> tuple[Path, dict[str, str]]:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    try:
        dataset, expected = make_hostile(tmp_path)
    except OSError as err:  # a filesystem that refuses non-UTF-8 names
        pytest.skip(f"cannot build the hostile folder here: {err}")
    forbidden |= {"/dev/zero", str((dataset / "Early" / "pipe.png").resolve())}
    forbidden.add(str((dataset / "Pro" / "huge.png").resolve()))  # refused from its size alone
    return dataset, expected


def test_hostile_folder_gives_named_errors(hostile) -> None:
    dataset, expected = hostile
    with pytest.raises(DataError) as err:
        scan(dataset, max_file_mb=HOSTILE_CAP_MB)
    msg = str(err.value)
    msg.encode("utf-8")  # printable: no lone surrogates from the undecodable name
    assert msg.startswith(f"{len(expected)} problem(s)")
    lines = {line.split(": ", 1)[0].strip(" -"): line for line in msg.splitlines()[1:]}
    for path, reason in expected.items():
        line = lines[str(dataset.resolve() / path)]
        assert reason in line, line
    assert "(points to /dev/zero)" in lines[str(dataset.resolve() / "Benign" / "zero.png")]


def test_hostile_folder_with_skip_bad_keeps_the_good_images(hostile) -> None:
    dataset, expected = hostile
    cat = scan(dataset, skip_bad=True, max_file_mb=HOSTILE_CAP_MB)
    assert label_counts(cat) == {c: 2 for c in KAGGLE_CLASSES}
    assert {s.path: s.reason for s in cat.skipped}.keys() == expected.keys()
    for item in cat.skipped:
        assert expected[item.path] in item.reason
    cat.class_table().encode("utf-8")
    assert all(not p.endswith(("zero.png", "outside.png")) for p in cat.table["path"].to_pylist())


def test_prepare_command_on_a_hostile_folder_finishes(tmp_path: Path) -> None:
    """End to end in a child process with a deadline: a hang on the FIFO or an endless read of
    /dev/zero is a timeout here, and non-UTF-8 names must print on a strict UTF-8 stdout."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    try:
        dataset, expected = make_hostile(tmp_path)
    except OSError as err:
        pytest.skip(f"cannot build the hostile folder here: {err}")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "PYTHONUTF8": "1"}
    command = [sys.executable, "-m", "fedray.cli", "data", "prepare", "--source", str(dataset),
               "--max-file-mb", str(HOSTILE_CAP_MB)]
    refused = subprocess.run([*command, "--output", str(tmp_path / "no")], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr
    for path in expected:
        assert str(dataset / path) in refused.stderr
    assert not (tmp_path / "no").exists()
    done = subprocess.run([*command, "--output", str(tmp_path / "out"), "--skip-bad"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"skipped {len(expected)} bad files/folders" in done.stdout
    assert f"Pro/{SHOWN_BAD_NAME}: name is not valid UTF-8" in done.stdout
    assert pq.read_table(tmp_path / "out" / "manifest.parquet").num_rows == 8


def test_size_cap_is_checked_before_reading(tmp_path: Path, forbidden: set[str]) -> None:
    make_plain(tmp_path)
    big = tmp_path / "Pro" / "big.png"
    with big.open("wb") as stream:  # sparse: 64 MiB + 1 byte, no disk used
        stream.truncate(int(DEFAULT_MAX_FILE_MB * 2**20) + 1)
    forbidden.add(str(big.resolve()))
    with pytest.raises(DataError, match=r"big\.png: file is 67,108,865 bytes \(64\.0 MiB\), over "
                                        r"the 64 MiB cap \(data\.max_file_mb, --max-file-mb\)"):
        scan(tmp_path)
    cat = scan(tmp_path, skip_bad=True)
    assert [s.path for s in cat.skipped] == ["Pro/big.png"] and cat.table.num_rows == 8
    assert DataConfig().max_file_mb == DEFAULT_MAX_FILE_MB


def test_read_stops_at_cap_plus_one_byte(tmp_path: Path, monkeypatch) -> None:
    """A file that grows after its stat (its stat says 0 bytes) is still read only to cap + 1."""
    make_plain(tmp_path)
    grown = tmp_path / "Pre" / "grown.png"
    grown.write_bytes(b"\0" * 50_000)
    grown_path = str(grown.resolve())
    real_stat, real_read = os.stat, os.read
    read = []

    def stat_says_empty(path, *args, **kwargs):
        result = real_stat(path, *args, **kwargs)
        if os.fspath(path) == grown_path:
            values = list(result[:10])
            values[stat.ST_SIZE] = 0
            return os.stat_result(values)
        return result

    def counted_read(fd, n):
        chunk = real_read(fd, n)
        read.append(len(chunk))
        return chunk

    monkeypatch.setattr(os, "stat", stat_says_empty)
    monkeypatch.setattr(os, "read", counted_read)
    cap_mb = 10_000 / 2**20
    cat = scan(tmp_path, skip_bad=True, max_file_mb=cap_mb)
    assert [(s.path, "file grew while being read" in s.reason) for s in cat.skipped] == [
        ("Pre/grown.png", True)
    ]
    assert max(read) <= 10_001


def test_symlinks_inside_the_source_are_followed(tmp_path: Path) -> None:
    dataset = make_plain(tmp_path / "ds")
    os.symlink(dataset / "Benign" / "img_000.png", dataset / "Pro" / "link.png")
    os.symlink("../Benign/img_001.jpg", dataset / "Pre" / "rel.jpg")
    cat = scan(dataset)
    assert cat.table.num_rows == 10
    assert cat.duplicates == [["Benign/img_000.png", "Pro/link.png"],
                              ["Benign/img_001.jpg", "Pre/rel.jpg"]]
    # the source may itself be a link: containment is judged on resolved paths
    os.symlink(dataset, tmp_path / "alias")
    assert scan(tmp_path / "alias").table.equals(cat.table)


def test_linked_folders_are_reported_not_followed(tmp_path: Path) -> None:
    dataset = make_plain(tmp_path / "ds")
    make_class_folders(tmp_path / "elsewhere", {"Early": 3})
    shutil.rmtree(dataset / "Early")
    os.symlink(tmp_path / "elsewhere" / "Early", dataset / "Early")  # a class folder outside
    os.symlink(dataset / "Benign", dataset / "Pro" / "loop")  # a folder link inside
    os.symlink("/", dataset / "Misc")  # an unknown folder: not walked
    with pytest.raises(DataError) as err:
        scan(dataset)
    msg = str(err.value)
    assert msg.startswith("3 problem(s)")
    assert f"{dataset / 'Early'}: symlink that leaves the source folder" in msg
    assert f"{dataset / 'Pro' / 'loop'}: symlink to a folder" in msg
    assert f"{dataset / 'Misc'}: unknown folder 'Misc' (a symlink to /, not followed)" in msg
    cat = scan(dataset, skip_bad=True)
    assert label_counts(cat) == {"Benign": 2, "Pre": 2, "Pro": 2}
    assert [s.path for s in cat.skipped] == ["Early/", "Misc/", "Pro/loop/"]


def test_dataset_reached_through_an_outside_link_is_refused(tmp_path: Path) -> None:
    make_plain(tmp_path / "real")
    (tmp_path / "source").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "source" / "data")
    with pytest.raises(DataError, match="reached through a symlink that leaves the source") as err:
        scan(tmp_path / "source", skip_bad=True)
    assert str(tmp_path / "real") in str(err.value)
    assert scan(tmp_path / "real").table.num_rows == 8


def test_socket_and_device_are_not_regular_files(tmp_path: Path) -> None:
    make_plain(tmp_path)
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "Pro" / "s.png"))  # a socket file only: nothing listens
    except OSError as err:
        pytest.skip(f"cannot make a unix socket here: {err}")
    finally:
        sock.close()
    with pytest.raises(DataError, match=r"s\.png: not a regular file: a socket; not read"):
        scan(tmp_path)
    assert catalog._kind(os.stat("/dev/zero").st_mode) == "a character device"
    assert catalog._kind(stat.S_IFBLK) == "a block device"


def test_non_utf8_names_are_escaped_everywhere(tmp_path: Path) -> None:
    make_plain(tmp_path)
    patient = os.path.join(os.fsencode(tmp_path / "Benign"), b"p\xff")
    try:
        os.mkdir(patient)
    except OSError as err:
        pytest.skip(f"this filesystem refuses non-UTF-8 names: {err}")
    make_image(Path(os.fsdecode(os.path.join(patient, b"ok.png"))))
    cat = scan(tmp_path, skip_bad=True)
    assert [s.path for s in cat.skipped] == ["Benign/p\\xff/ok.png"]
    assert cat.table.num_rows == 8
    pa.Table.from_pylist([{"path": s.path} for s in cat.skipped])  # storable as strings
    odd_root = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"root\xfe")))
    make_plain(odd_root)
    with pytest.raises(DataError, match=r"root\\xfe: the folder's path is not valid UTF-8") as err:
        scan(odd_root)
    str(err.value).encode("utf-8")


@pytest.mark.parametrize("cap", [0, -1, float("inf"), float("nan")])
def test_size_cap_must_be_positive(tmp_path: Path, cap: float) -> None:
    make_plain(tmp_path)
    with pytest.raises(DataError, match="max_file_mb must be a positive number"):
        scan(tmp_path, max_file_mb=cap)
