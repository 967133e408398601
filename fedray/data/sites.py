"""A hospital's own data: its site folder, read, catalogued and split where it lives.

In a consortium each hospital's images sit on its own node. The hospital actor reads only its
folder (`read_site`), splits it locally (`split_site`: split first, stratified, group-aware,
byte-identical duplicates on one side) and sends the coordinator counts, never images.
`split_sites` is the simulation tool: it divides one pooled dataset into such folders, as the
partitioner used to divide a central training split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fedray.config import DataConfig
from fedray.data import partition
from fedray.data.labels import CLASSES
from fedray.data.pipeline import DataPrepError, _ensure_group, _owners, attach_images, load_prepared
from fedray.data.shards import class_counts
from fedray.data.split import SPLITS, assign_fold_splits, assign_splits, check_disjoint

MANIFEST = "manifest.parquet"


def read_site(path: Path, data: DataConfig) -> pa.Table:
    """The site's images with their bytes: a `fedray data prepare` (or `split-sites`) output,
    or a raw image folder in any layout the catalog recognises (Kaggle layouts, class folders,
    per-patient subfolders `Class/patient/x.png`)."""
    path = Path(path)
    if not path.is_dir():
        raise DataPrepError(f"site folder {path} does not exist or is not a folder")
    if (path / MANIFEST).is_file():
        return load_prepared(path)
    from fedray.data import catalog

    cat = catalog.scan(path, skip_bad=data.skip_bad, include_segmented=data.include_segmented,
                       max_file_mb=data.max_file_mb)
    return attach_images(cat.table, cat.root)


@dataclass
class SiteSplits:
    """One site's local train/val/test tables (image bytes included)."""

    parts: dict[str, pa.Table]
    leaks: dict[str, int]

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: class_counts(table) for name, table in self.parts.items()}

    def hashes(self) -> list[str]:
        """The sha256 of every image, for the opt-in cross-site duplicate check."""
        return sorted({h for t in self.parts.values() for h in t.column("sha256").to_pylist()})


def split_site(table: pa.Table, data: DataConfig, seed: int, where: str,
               fold: tuple[int, int] | None = None) -> SiteSplits:
    """Split a site's table before anything else touches it; `fold` = (k, folds) makes the
    local test split fold k of a k-fold cross-validation (validation carved from the rest).
    `data.split.seed`, when set, is the split's seed in place of `seed`."""
    table = _ensure_group(table)
    unknown = set(table.column("label").to_pylist()) - set(CLASSES)
    if unknown:
        raise DataPrepError(f"{where}: labels {sorted(unknown)} are not among {list(CLASSES)}")
    sp = data.split
    seed = seed if sp.seed is None else sp.seed
    try:
        if fold is None:
            splits = assign_splits(table, val=sp.val, test=sp.test, seed=seed,
                                   group_aware=sp.group_aware)
        else:
            splits = assign_fold_splits(table, folds=fold[1], fold=fold[0], val=sp.val,
                                        seed=seed, group_aware=sp.group_aware)
    except ValueError as exc:
        raise DataPrepError(f"{where}: cannot split {table.num_rows} images locally: {exc}") from exc
    leaks = check_disjoint(table, splits)
    if leaks.get("sha256", 0):
        raise DataPrepError(f"{where}: {leaks['sha256']} duplicate images span local splits")
    column = pa.array(np.asarray(splits).astype(str))
    parts = {name: table.filter(pc.equal(column, name)) for name in SPLITS}
    if not parts["train"].num_rows or not parts["test"].num_rows:
        raise DataPrepError(f"{where}: the local split left no training or no test images "
                            f"({table.num_rows} images); add data or change data.split")
    return SiteSplits(parts, leaks)


def split_sites(table: pa.Table, data: DataConfig, hospitals: int, seed: int, out_dir: Path,
                *, layout: str = "prepared") -> dict[str, Path]:
    """Divide one pooled dataset into one site folder per hospital (whole patients and
    duplicate groups stay together), by `data.partition` (iid, dirichlet label skew, by-group).

    `layout` "prepared" writes a manifest with the image bytes (what `data prepare` writes,
    fastest to read); "folder" writes only images, as `Class/patient/x.png` (or `Class/x.png`
    when the patient is unknown), which the hospital catalogues as a raw site folder.
    """
    table = _ensure_group(table)
    owner = _owners(table, data, hospitals, seed)
    out = {}
    for h, name in enumerate(partition.hospital_names(hospitals)):
        rows = table.take(pa.array(np.flatnonzero(owner == h), type=pa.int64()))
        folder = Path(out_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        if layout == "prepared":
            pq.write_table(rows, folder / MANIFEST, compression="none")
        elif layout == "folder":
            _write_images(rows, folder)
        else:
            raise ValueError(f"unknown site layout {layout!r} (prepared or folder)")
        out[name] = folder
    return out


def _write_images(rows: pa.Table, folder: Path) -> None:
    for label, group, sha, blob, source in zip(rows.column("label").to_pylist(),
                                               rows.column("group").to_pylist(),
                                               rows.column("sha256").to_pylist(),
                                               rows.column("image").to_pylist(),
                                               rows.column("path").to_pylist()):
        patient = "" if group in ("", sha) else str(group).replace("/", "_")
        suffix = Path(source).suffix or ".png"
        name = sha[:16] + suffix
        rel = Path(label) / patient / name if patient else Path(label) / name
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(blob)
