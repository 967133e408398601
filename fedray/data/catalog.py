"""Scan a folder of blood-smear images into a manifest table (one row per image).

The catalog is the only place that touches raw dataset folders: everything downstream
(splits, hospital shards, training) works from the manifest, so every decision about what
counts as an image, which class it belongs to and what is wrong with the input is made here,
once, and reported loudly.

Layouts are recognised by exact folder names (see ``LAYOUTS``); class folders are mapped with
:func:`fedray.data.labels.canonical_class`, which matches whole names only. Substring rules are
never used because "pre" is inside "early pre-b" and would merge two subtypes.

Decisions worth knowing:

* ``group`` (patient / capture-session proxy). Neither Kaggle dataset ships a patient id, and
  their file names carry no usable one either: ``WBC-Malignant-Early-001.jpg`` repeats the
  class and ``Snap_001.jpg`` is a camera counter that restarts per folder. Guessing sessions
  from such names would invent structure that is not there. So ``group`` is the empty string
  (unknown) for an image directly inside its class folder, as in both flat Kaggle layouts, and
  the subfolder path for a layout with per-patient subfolders (``Benign/patient7/x.png`` gives
  ``Benign/patient7``). Splits treat an empty group as "this image alone".
* Duplicates (byte-identical files, by sha256) are only *reported* in ``Catalog.duplicates``;
  removing or co-locating them is the split step's job, where it matters for leakage.
* Kaggle "ALL Images" ships ``Original/`` and ``Segmented/`` (the same smears with the
  background removed). Only ``Original/`` is scanned by default; ``include_segmented=True``
  scans ``Segmented/`` *instead* (never both, since they are the same cells twice).
* Hidden files and folders (name starts with ``.``), ``Thumbs.db``, ``desktop.ini`` and
  ``__MACOSX`` (zip-extraction debris holding only AppleDouble ``._*`` files) are ignored
  silently. Everything else inside a class folder must be a decodable image; any other
  problem is either an error or, with ``skip_bad=True``, an entry in ``Catalog.skipped``.
* Loose *non-image* files next to the class folders (README, LICENSE) are ignored; loose
  *image* files there are reported, since they would otherwise be dropped without a class.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from PIL import Image, ImageFile

from fedray.data.labels import CLASSES, FOLDER_ALIASES, canonical_class

__all__ = [
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "MANIFEST_SCHEMA",
    "Catalog",
    "DataError",
    "Skipped",
    "find_layout",
    "scan",
]

KAGGLE_ORIGINAL = "kaggle-original"
KAGGLE_BLOOD_CELL = "kaggle-blood-cell-cancer"
CLASS_FOLDERS = "class-folders"

#: Layout name -> what it looks like on disk (used in "no layout found" messages).
LAYOUTS: dict[str, str] = {
    KAGGLE_ORIGINAL: (
        'Kaggle "ALL (Acute Lymphoblastic Leukemia) Images": '
        "Original/{Benign,Early,Pre,Pro}/ and Segmented/{Benign,Early,Pre,Pro}/"
    ),
    KAGGLE_BLOOD_CELL: (
        'Kaggle "Blood cell Cancer [ALL]": Blood cell Cancer [ALL]/'
        "{Benign,[Malignant] early Pre-B,[Malignant] Pre-B,[Malignant] Pro-B}/"
    ),
    CLASS_FOLDERS: "one subfolder per class, e.g. Benign/ Early/ Pre/ Pro/",
}

BLOOD_CELL_FOLDER = "blood cell cancer [all]"  # compared lower-cased, whole name
ORIGINAL_FOLDER = "original"
SEGMENTED_FOLDER = "segmented"

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
# Decoders PIL may use. Restricting them keeps a mislabelled file from reaching exotic
# plugins (EPS would shell out to Ghostscript); a JPEG saved as .png is still accepted.
# (Multi-picture JPEGs open through the JPEG opener, which returns an MPO image.)
PIL_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "DIB", "TIFF")
IGNORED_NAMES: frozenset[str] = frozenset({"thumbs.db", "desktop.ini", "__macosx"})

MAX_SEARCH_DEPTH = 3  # levels below `source` searched for a layout (parent/top/dataset/...)
MAX_LISTED_PROBLEMS = 20
MAX_WORKERS = 8

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("group", pa.string(), nullable=False),
        pa.field("source_layout", pa.string(), nullable=False),
    ]
)


class DataError(ValueError):
    """Bad or unrecognised input data; the message names the file/folder at fault and the fix."""


@dataclass
class Skipped:
    """One file or folder left out of the manifest, and why (path relative to ``Catalog.root``)."""

    path: str
    reason: str


@dataclass
class Catalog:
    """The result of :func:`scan`: the manifest plus everything that was not put in it."""

    table: pa.Table
    layout: str
    root: Path
    skipped: list[Skipped] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)

    def class_table(self) -> str:
        """Image counts per class (all classes, zeros included) for logs and the CLI."""
        counts = Counter(self.table.column("label").to_pylist())
        width = max(len(name) for name in (*CLASSES, "total"))
        lines = [f"{self.layout} at {self.root}", f"{'class':<{width}}  images"]
        lines += [f"{name:<{width}}  {counts.get(name, 0):>6}" for name in CLASSES]
        lines.append(f"{'total':<{width}}  {self.table.num_rows:>6}")
        lines.append(f"skipped: {len(self.skipped)}  duplicate groups: {len(self.duplicates)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- layout search


@dataclass(frozen=True)
class _Located:
    """A recognised dataset: its layout, the root paths are relative to, and the class parent."""

    layout: str
    root: Path
    class_parent: Path | None  # folder holding the class folders; None if the variant is absent


def _is_ignored(name: str) -> bool:
    """Hidden entries and OS/zip debris are not data, so they are skipped without a record."""
    return name.startswith(".") or name.lower() in IGNORED_NAMES


def _subdirs(folder: Path) -> list[Path]:
    """Non-ignored subfolders, sorted; an unreadable folder simply has none (search only)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    dirs = [Path(e.path) for e in entries if not _is_ignored(e.name) and e.is_dir()]
    return sorted(dirs, key=lambda p: p.name)


def _has_class_folder(folder: Path) -> bool:
    """Whether any subfolder is a known class name (whole-name match)."""
    return any(canonical_class(d.name) is not None for d in _subdirs(folder))


def _recognise(folder: Path, include_segmented: bool) -> _Located | None:
    """The layout `folder` is the root of, if any; exact names only, most specific first."""
    if folder.name.strip().lower() == BLOOD_CELL_FOLDER and _has_class_folder(folder):
        return _Located(KAGGLE_BLOOD_CELL, folder, folder)
    children = {d.name.strip().lower(): d for d in _subdirs(folder)}
    original, segmented = children.get(ORIGINAL_FOLDER), children.get(SEGMENTED_FOLDER)
    if any(d is not None and _has_class_folder(d) for d in (original, segmented)):
        chosen = segmented if include_segmented else original
        return _Located(KAGGLE_ORIGINAL, folder, chosen)
    if _has_class_folder(folder):
        return _Located(CLASS_FOLDERS, folder, folder)
    return None


def _search(source: Path, include_segmented: bool) -> list[_Located]:
    """Breadth-first search below `source`; a recognised dataset is not searched further."""
    found: list[_Located] = []
    frontier = [source]
    for depth in range(MAX_SEARCH_DEPTH + 1):
        deeper: list[Path] = []
        for folder in frontier:
            located = _recognise(folder, include_segmented)
            if located is not None:
                found.append(located)
            elif depth < MAX_SEARCH_DEPTH:
                deeper.extend(_subdirs(folder))
        frontier = deeper
    return found


def _expected_layouts() -> str:
    """The 'expected one of' block for messages about unrecognised folders."""
    known = ", ".join(sorted(FOLDER_ALIASES))
    lines = [f"  - {name}: {desc}" for name, desc in LAYOUTS.items()]
    lines.append(f"  (class folder names are matched whole, case-insensitive: {known})")
    return "\n".join(lines)


def _check_source(source: Path) -> Path:
    """Fail early, naming the path, when `source` cannot be a dataset folder."""
    source = Path(source).expanduser()
    if not source.exists():
        raise DataError(f"{source}: no such folder; pass the folder you extracted the dataset into")
    if not source.is_dir():
        raise DataError(
            f"{source}: is a file, not a folder; extract the archive and pass the folder instead"
        )
    return source.resolve()


def _locate(source: Path, include_segmented: bool) -> _Located:
    """The single dataset under `source`, or a DataError saying what was expected/found."""
    source = _check_source(source)
    found = _search(source, include_segmented)
    if not found:
        raise DataError(
            f"{source}: no recognisable dataset layout within {MAX_SEARCH_DEPTH} folder levels. "
            f"Expected one of:\n{_expected_layouts()}\n"
            "Pass the dataset folder (or a parent holding exactly one dataset)."
        )
    if len(found) > 1:
        listed = "\n".join(f"  - {loc.root} ({loc.layout})" for loc in found)
        raise DataError(
            f"{source}: holds {len(found)} datasets; pass exactly one of these folders:\n{listed}"
        )
    located = found[0]
    if located.class_parent is None or not _has_class_folder(located.class_parent):
        wanted, other, flag = (
            ("Segmented", "Original", "include_segmented=False")
            if include_segmented
            else ("Original", "Segmented", "include_segmented=True")
        )
        raise DataError(
            f"{located.root}: kaggle-original layout without class folders in {wanted}/; "
            f"add {wanted}/{{Benign,Early,Pre,Pro}}/ or pass {flag} to scan {other}/ instead"
        )
    return located


def _class_folders(class_parent: Path) -> list[Path]:
    """Subfolders of `class_parent` whose whole name is a known class, sorted by name."""
    return [d for d in _subdirs(class_parent) if canonical_class(d.name) is not None]


def find_layout(source: Path, *, include_segmented: bool = False) -> tuple[str, list[Path]]:
    """Recognise the dataset layout under `source`: its name and its (known) class folders.

    `source` may be the dataset folder itself or a parent up to ``MAX_SEARCH_DEPTH`` levels
    above it holding exactly one dataset. Raises :class:`DataError` when there is none, more
    than one, or (kaggle-original) the selected Original/Segmented variant is missing.
    Unknown or empty class folders are not errors here; :func:`scan` reports them.
    """
    located = _locate(source, include_segmented)
    assert located.class_parent is not None  # guaranteed by _locate
    return located.layout, _class_folders(located.class_parent)


# --------------------------------------------------------------------------- folder walk


@dataclass(frozen=True)
class _Candidate:
    """An image-extension file inside a class folder, waiting to be hashed and decoded."""

    path: Path
    label: str
    group: str


def _rel(path: Path, root: Path) -> str:
    """Manifest spelling of a path: relative to the catalog root, POSIX separators."""
    return path.relative_to(root).as_posix()


def _walk_files(folder: Path, root: Path, problems: list[Skipped]) -> list[Path]:
    """All non-ignored files below `folder`, sorted; unreadable subfolders become problems."""

    def on_error(err: OSError) -> None:
        where = Path(err.filename) if err.filename else folder
        problems.append(Skipped(_rel(where, root), _cannot_list(err)))

    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=on_error):
        dirnames[:] = sorted(d for d in dirnames if not _is_ignored(d))
        files.extend(Path(dirpath, f) for f in filenames if not _is_ignored(f))
    return sorted(files)


def _cannot_list(err: OSError) -> str:
    """Reason text for a folder the OS will not list."""
    return f"cannot list folder ({err.strerror}); fix its permissions"


def _is_image_name(path: Path) -> bool:
    """Image files are recognised by extension (case-insensitive); decoding confirms it."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _loose_images(folder: Path, root: Path) -> list[Skipped]:
    """Images sitting next to the class folders: they have no class, so they are reported."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as err:
        return [Skipped(_rel(folder, root), _cannot_list(err))]
    reason = "image outside any class folder; move it into the folder of its class"
    return [
        Skipped(_rel(Path(e.path), root), reason)
        for e in entries
        if not _is_ignored(e.name) and e.is_file() and _is_image_name(Path(e.name))
    ]


def _unknown_folder(folder: Path, root: Path, expected: str) -> Skipped:
    """Record an unknown subfolder, saying how many files it holds so nothing vanishes unseen."""
    n_files = sum(len(files) for _, _, files in os.walk(folder))
    return Skipped(
        _rel(folder, root) + "/",
        f"unknown folder {folder.name!r} ({n_files} files not scanned); expected {expected}. "
        "Rename it to a class name or move it out of the dataset",
    )


def _collect(located: _Located) -> tuple[list[_Candidate], list[Skipped]]:
    """Walk the class folders: image candidates to decode, plus folder/file-level problems."""
    root, class_parent = located.root, located.class_parent
    assert class_parent is not None
    problems: list[Skipped] = []
    candidates: list[_Candidate] = []
    class_names = "a class folder (" + ", ".join(sorted(FOLDER_ALIASES)) + ")"

    if located.layout == KAGGLE_ORIGINAL:
        # Only Original/ and Segmented/ belong at the dataset root; anything else is unexpected.
        allowed = {ORIGINAL_FOLDER, SEGMENTED_FOLDER}
        for d in _subdirs(root):
            if d.name.strip().lower() not in allowed:
                problems.append(_unknown_folder(d, root, "Original/ or Segmented/"))
        problems.extend(_loose_images(root, root))

    problems.extend(_loose_images(class_parent, root))
    for folder in _subdirs(class_parent):
        label = canonical_class(folder.name)
        if label is None:
            problems.append(_unknown_folder(folder, root, class_names))
            continue
        files = _walk_files(folder, root, problems)
        if not files:
            reason = "empty class folder (no image files); add its images or delete the folder"
            problems.append(Skipped(_rel(folder, root) + "/", reason))
        for path in files:
            if not _is_image_name(path):
                problems.append(
                    Skipped(
                        _rel(path, root),
                        f"not an image file (extension {path.suffix.lower() or 'none'!r}); "
                        "delete it or move it out of the class folder",
                    )
                )
                continue
            group = path.parent.relative_to(class_parent).as_posix()
            if path.parent == folder:
                group = ""  # directly in the class folder: patient unknown
            candidates.append(_Candidate(path, label, group))
    return candidates, problems


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class _Decoded:
    """What one file contributes: a manifest row's measurements, or a problem."""

    sha256: str = ""
    width: int = 0
    height: int = 0
    error: str | None = None


@contextmanager
def _strict_decoding() -> Iterator[None]:
    """Force PIL to raise on truncated files for the scan; restore the caller's setting."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _decode(path: Path) -> _Decoded:
    """Read the file once, hash those bytes and fully decode them (catches truncation)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        reason = f"cannot read file ({err.strerror}); fix its permissions or delete it"
        return _Decoded(error=reason)
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as image:
            image.load()
            width, height = image.size
    except Exception as err:  # noqa: BLE001 - any decoder failure means "bad image"
        return _Decoded(
            sha256=digest,
            error=f"unreadable or truncated image ({type(err).__name__}: {err}); "
            "re-download it or delete it",
        )
    return _Decoded(digest, width, height)


def _decode_all(paths: list[Path]) -> list[_Decoded]:
    """Decode in a small thread pool (file reads and hashing release the GIL); order kept."""
    if len(paths) < 2 * MAX_WORKERS:
        return [_decode(p) for p in paths]
    workers = min(MAX_WORKERS, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_decode, paths, chunksize=16))


# --------------------------------------------------------------------------- scan


def _problems_message(root: Path, layout: str, problems: list[Skipped]) -> str:
    """One error listing the first problems with full paths, and how many there are in all."""
    shown = problems[:MAX_LISTED_PROBLEMS]
    lines = [f"{len(problems)} problem(s) in {layout} dataset at {root}:"]
    lines += [f"  - {root / p.path.rstrip('/')}: {p.reason}" for p in shown]
    if len(problems) > len(shown):
        lines.append(f"  ... and {len(problems) - len(shown)} more")
    lines.append("Fix them, or pass skip_bad=True to skip them (listed in Catalog.skipped).")
    return "\n".join(lines)


def _duplicates(paths: list[str], hashes: list[str]) -> list[list[str]]:
    """Groups (sorted, len >= 2) of paths with identical sha256, ordered by first path."""
    by_hash: dict[str, list[str]] = defaultdict(list)
    for path, digest in zip(paths, hashes):
        by_hash[digest].append(path)
    return sorted(sorted(group) for group in by_hash.values() if len(group) > 1)


def _build_table(rows: list[tuple[_Candidate, _Decoded]], root: Path, layout: str) -> pa.Table:
    """The manifest, sorted by path so the same folder always gives the same table."""
    rows = sorted(rows, key=lambda r: _rel(r[0].path, root))
    columns = {
        "path": [_rel(c.path, root) for c, _ in rows],
        "label": [c.label for c, _ in rows],
        "sha256": [d.sha256 for _, d in rows],
        "width": [d.width for _, d in rows],
        "height": [d.height for _, d in rows],
        "group": [c.group for c, _ in rows],
        "source_layout": [layout] * len(rows),
    }
    return pa.table(columns, schema=MANIFEST_SCHEMA)


def scan(source: Path, *, skip_bad: bool = False, include_segmented: bool = False) -> Catalog:
    """Catalog every image of the single dataset found under `source`.

    Every file in a class folder is hashed and fully decoded from one read of its bytes.
    All problems are collected first; without `skip_bad` they are raised together as one
    :class:`DataError` (first 20 listed, plus the total), with it they land in
    ``Catalog.skipped``. Fewer than two usable classes, a missing source and an unrecognised
    layout always raise. `include_segmented` scans Kaggle's ``Segmented/`` instead of
    ``Original/`` (only meaningful for the kaggle-original layout).
    """
    located = _locate(source, include_segmented)
    candidates, problems = _collect(located)
    with _strict_decoding():
        decoded = _decode_all([c.path for c in candidates])

    rows: list[tuple[_Candidate, _Decoded]] = []
    for cand, result in zip(candidates, decoded):
        if result.error is None:
            rows.append((cand, result))
        else:
            problems.append(Skipped(_rel(cand.path, located.root), result.error))
    problems.sort(key=lambda p: p.path)
    if problems and not skip_bad:
        raise DataError(_problems_message(located.root, located.layout, problems))

    table = _build_table(rows, located.root, located.layout)
    present = sorted(set(table.column("label").to_pylist()))
    if len(present) < 2:
        found = ", ".join(present) or "none"
        skipped = f" ({len(problems)} file(s)/folder(s) were skipped as bad)" if problems else ""
        raise DataError(
            f"{located.root}: only {len(present)} class with usable images ({found}); training "
            f"needs at least two of {', '.join(CLASSES)}. Add class folders with images{skipped}"
        )
    duplicates = _duplicates(table.column("path").to_pylist(), table.column("sha256").to_pylist())
    return Catalog(table, located.layout, located.root, problems, duplicates)
