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
* Hidden files and folders (name starts with ``.``), ``Thumbs.db``, ``desktop.ini``,
  ``__MACOSX`` (zip-extraction debris holding only AppleDouble ``._*`` files) and ``lost+found``
  (the root folder of an ext4 volume, as a Kubernetes site volume mounts it) are ignored
  silently. Everything else inside a class folder must be a decodable image; any other
  problem is either an error or, with ``skip_bad=True``, an entry in ``Catalog.skipped``.
* Loose *non-image* files next to the class folders (README, LICENSE) are ignored; loose
  *image* files there are reported, since they would otherwise be dropped without a class.
* Hostile folders. Only regular files are read: FIFOs, devices and sockets are refused from
  ``stat`` before anything is opened (and the opened file is checked again, without blocking).
  Symlinks are resolved and refused when they leave the source folder; symlinked folders
  below a class folder are reported, not followed (they could loop or count files twice).
  Each file has a size cap (``max_file_mb``, 64 MiB by default) and at most cap + 1 bytes are
  ever read. A name that is not valid UTF-8 cannot go into the manifest; it is reported with
  its undecodable bytes escaped (``caf\\xe9.png``), as is every name in every message.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pyarrow as pa
from PIL import Image, ImageFile

from fedray.data.labels import CLASSES, FOLDER_ALIASES, canonical_class

__all__ = [
    "DEFAULT_MAX_FILE_MB",
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
IGNORED_NAMES: frozenset[str] = frozenset({"thumbs.db", "desktop.ini", "__macosx",
                                           "lost+found"})

MAX_SEARCH_DEPTH = 3  # levels below `source` searched for a layout (parent/top/dataset/...)
MAX_LISTED_PROBLEMS = 20
MAX_WORKERS = 8
DEFAULT_MAX_FILE_MB = 64.0  # the largest Kaggle ALL image is under 1 MiB
_READ_CHUNK = 1 << 20
# Never block on open (a FIFO swapped in after the stat), never follow a final symlink.
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))

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
    """One file or folder left out of the manifest, and why (path relative to ``Catalog.root``,
    bytes that are not UTF-8 shown as ``\\xNN``)."""

    path: str
    reason: str


def _show(path: str | os.PathLike[str]) -> str:
    """A path as it can always be printed and stored: bytes that are not UTF-8 (kept by Python
    as surrogate escapes) are shown as ``\\xNN``; valid names are unchanged."""
    text = os.fspath(path)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _inside(path: Path, source: Path) -> bool:
    """Whether `path`, with every symlink resolved, is `source` or below it."""
    return Path(os.path.realpath(path)).is_relative_to(source)


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
        lines = [f"{self.layout} at {_show(self.root)}", f"{'class':<{width}}  images"]
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
        raise DataError(
            f"{_show(source)}: no such folder; pass the folder you extracted the dataset into"
        )
    if not source.is_dir():
        raise DataError(
            f"{_show(source)}: is a file, not a folder; extract the archive and pass the folder "
            "instead"
        )
    resolved = source.resolve()
    if not _is_utf8(str(resolved)):
        raise DataError(
            f"{_show(resolved)}: the folder's path is not valid UTF-8 (undecodable bytes shown "
            "as \\xNN), so the manifest cannot record it; rename it or move the dataset"
        )
    return resolved


def _locate(source: Path, include_segmented: bool) -> _Located:
    """The single dataset under `source`, or a DataError saying what was expected/found."""
    source = _check_source(source)
    found = _search(source, include_segmented)
    if not found:
        raise DataError(
            f"{_show(source)}: no recognisable dataset layout within {MAX_SEARCH_DEPTH} folder "
            "levels. "
            f"Expected one of:\n{_expected_layouts()}\n"
            "Pass the dataset folder (or a parent holding exactly one dataset)."
        )
    if len(found) > 1:
        listed = "\n".join(f"  - {_show(loc.root)} ({loc.layout})" for loc in found)
        raise DataError(
            f"{_show(source)}: holds {len(found)} datasets; pass exactly one of these folders:"
            f"\n{listed}"
        )
    located = found[0]
    for folder in (located.root, located.class_parent):
        if folder is not None and not _inside(folder, source):
            raise DataError(
                f"{_show(folder)}: reached through a symlink that leaves the source folder "
                f"{_show(source)} (it points to {_show(os.path.realpath(folder))}); pass the "
                "dataset folder itself"
            )
        if folder is not None and not _is_utf8(str(folder)):
            raise DataError(
                f"{_show(folder)}: the dataset folder's path is not valid UTF-8 (undecodable "
                "bytes shown as \\xNN), so the manifest cannot record it; rename it"
            )
    if located.class_parent is None or not _has_class_folder(located.class_parent):
        wanted, other, flag = (
            ("Segmented", "Original", "include_segmented=False")
            if include_segmented
            else ("Original", "Segmented", "include_segmented=True")
        )
        raise DataError(
            f"{_show(located.root)}: kaggle-original layout without class folders in {wanted}/; "
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
    """Manifest spelling of a path: relative to the catalog root, POSIX separators; bytes that
    are not UTF-8 escaped (such a file never reaches the manifest, only messages)."""
    return _show(path.relative_to(root).as_posix())


def _walk_files(folder: Path, root: Path, problems: list[Skipped]) -> list[Path]:
    """All non-ignored files below `folder`, sorted; unreadable subfolders become problems."""

    def on_error(err: OSError) -> None:
        where = Path(err.filename) if err.filename else folder
        problems.append(Skipped(_rel(where, root), _cannot_list(err)))

    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=on_error):
        kept = []
        for name in sorted(d for d in dirnames if not _is_ignored(d)):
            sub = Path(dirpath, name)
            if sub.is_symlink():
                problems.append(Skipped(_rel(sub, root) + "/", _linked_folder(sub)))
            else:
                kept.append(name)
        dirnames[:] = kept
        files.extend(Path(dirpath, f) for f in filenames if not _is_ignored(f))
    return sorted(files)


def _linked_folder(folder: Path) -> str:
    """Reason text for a symlinked folder below a class folder (never followed)."""
    target = _show(os.path.realpath(folder))
    return (
        f"symlink to a folder (points to {target}); not followed, since a link can loop or "
        "count images twice. Replace it with the folder itself or delete it"
    )


def _outside(folder: Path, source: Path) -> str:
    """Reason text for a folder whose resolved path leaves the source folder."""
    return (
        f"symlink that leaves the source folder {_show(source)} (points to "
        f"{_show(os.path.realpath(folder))}); not followed. Copy the folder into the dataset or "
        "delete the link"
    )


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
    """Record an unknown subfolder, saying how many files it holds so nothing vanishes unseen
    (a symlinked one is not walked: it could point anywhere)."""
    name = _show(folder.name)
    if folder.is_symlink():
        contents = f"a symlink to {_show(os.path.realpath(folder))}, not followed"
    else:
        contents = f"{sum(len(files) for _, _, files in os.walk(folder))} files not scanned"
    return Skipped(
        _rel(folder, root) + "/",
        f"unknown folder {name!r} ({contents}); expected {expected}. "
        "Rename it to a class name or move it out of the dataset",
    )


def _collect(located: _Located, source: Path) -> tuple[list[_Candidate], list[Skipped]]:
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
        if not _inside(folder, source):
            problems.append(Skipped(_rel(folder, root) + "/", _outside(folder, source)))
            continue
        files = _walk_files(folder, root, problems)
        if not files:
            reason = "empty class folder (no image files); add its images or delete the folder"
            problems.append(Skipped(_rel(folder, root) + "/", reason))
        for path in files:
            if not _is_utf8(str(path)):
                problems.append(
                    Skipped(
                        _rel(path, root),
                        "name is not valid UTF-8 (undecodable bytes shown as \\xNN), so the "
                        "manifest cannot record it; rename it to UTF-8",
                    )
                )
                continue
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


_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a folder"),
)


def _kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _too_big(what: str, max_file_mb: float) -> str:
    return (
        f"{what}, over the {max_file_mb:g} MiB cap (data.max_file_mb, --max-file-mb); "
        "not read. Raise the cap if it is a real image, or delete it"
    )


def _read_regular(path: Path, source: Path, max_file_mb: float) -> bytearray | str:
    """The bytes of `path`, or why it was not read: only a regular file inside `source`, at
    most the cap, checked with ``stat`` before opening and with ``fstat`` on the open file."""
    cap = int(max_file_mb * 2**20)
    target = Path(os.path.realpath(path))
    via = "" if target == path else f" (through a symlink to {_show(target)})"
    if not target.is_relative_to(source):
        return (
            f"symlink that leaves the source folder {_show(source)} (points to {_show(target)}); "
            "not followed. Copy the file into the dataset or delete the link"
        )
    try:
        before = os.stat(target)
    except FileNotFoundError:
        if via:
            return (
                f"broken symlink (points to {_show(target)}, which does not exist); fix it or "
                "delete it"
            )
        return "file disappeared during the scan; scan again"
    except OSError as err:
        return f"cannot read file{via} ({err.strerror}); fix it or delete it"
    if not stat.S_ISREG(before.st_mode):
        return (
            f"not a regular file: {_kind(before.st_mode)}{via}; not read. Replace it with the "
            "image file or delete it"
        )
    if before.st_size > cap:
        size = before.st_size
        return _too_big(f"file is {size:,} bytes ({size / 2**20:.1f} MiB)", max_file_mb)
    try:
        fd = os.open(target, _OPEN_FLAGS)
    except OSError as err:
        return f"cannot read file{via} ({err.strerror}); fix its permissions or delete it"
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (
            before.st_dev,
            before.st_ino,
        ):
            return f"file was replaced while being scanned{via}; not read. Scan again"
        data = bytearray()
        while len(data) <= cap:
            chunk = os.read(fd, min(_READ_CHUNK, cap + 1 - len(data)))
            if not chunk:
                break
            data += chunk
    except OSError as err:
        return f"cannot read file{via} ({err.strerror}); fix it or delete it"
    finally:
        os.close(fd)
    if len(data) > cap:
        return _too_big("file grew while being read", max_file_mb)
    return data


def _decode(path: Path, source: Path, max_file_mb: float) -> _Decoded:
    """Read the file once (a regular file inside `source`, within the cap), hash those bytes
    and fully decode them (catches truncation)."""
    data = _read_regular(path, source, max_file_mb)
    if isinstance(data, str):
        return _Decoded(error=data)
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


def _decode_all(paths: list[Path], source: Path, max_file_mb: float) -> list[_Decoded]:
    """Decode in a small thread pool (file reads and hashing release the GIL); order kept."""
    decode = partial(_decode, source=source, max_file_mb=max_file_mb)
    if len(paths) < 2 * MAX_WORKERS:
        return [decode(p) for p in paths]
    workers = min(MAX_WORKERS, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(decode, paths, chunksize=16))


# --------------------------------------------------------------------------- scan


def _problems_message(root: Path, layout: str, problems: list[Skipped]) -> str:
    """One error listing the first problems with full paths, and how many there are in all."""
    shown = problems[:MAX_LISTED_PROBLEMS]
    lines = [f"{len(problems)} problem(s) in {layout} dataset at {_show(root)}:"]
    lines += [f"  - {_show(root / p.path.rstrip('/'))}: {p.reason}" for p in shown]
    if len(problems) > len(shown):
        lines.append(f"  ... and {len(problems) - len(shown)} more")
    lines.append(
        "Fix them, or pass skip_bad=True (--skip-bad) to skip them (listed in Catalog.skipped)."
    )
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


def scan(
    source: Path,
    *,
    skip_bad: bool = False,
    include_segmented: bool = False,
    max_file_mb: float = DEFAULT_MAX_FILE_MB,
) -> Catalog:
    """Catalog every image of the single dataset found under `source`.

    Every file in a class folder is hashed and fully decoded from one read of its bytes; only
    regular files inside `source` (symlinks resolved) of at most `max_file_mb` MiB are read,
    and names that are not valid UTF-8 are refused (see the module docstring).
    All problems are collected first; without `skip_bad` they are raised together as one
    :class:`DataError` (first 20 listed, plus the total), with it they land in
    ``Catalog.skipped``. Fewer than two usable classes, a missing source and an unrecognised
    layout always raise. `include_segmented` scans Kaggle's ``Segmented/`` instead of
    ``Original/`` (only meaningful for the kaggle-original layout).
    """
    if not 0 < max_file_mb < float("inf"):
        raise DataError(f"max_file_mb must be a positive number of MiB, got {max_file_mb!r}")
    source = _check_source(source)
    located = _locate(source, include_segmented)
    candidates, problems = _collect(located, source)
    with _strict_decoding():
        decoded = _decode_all([c.path for c in candidates], source, max_file_mb)

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
            f"{_show(located.root)}: only {len(present)} class with usable images ({found}); "
            f"training needs at least two of {', '.join(CLASSES)}. Add class folders with "
            f"images{skipped}"
        )
    duplicates = _duplicates(table.column("path").to_pylist(), table.column("sha256").to_pylist())
    return Catalog(table, located.layout, located.root, problems, duplicates)
