"""From a data config to hospital shards: load, split first, then partition the training split.

This is the only place that knows the order of those steps, and the order is the point:
splitting happens before any augmentation or expansion, so no test image leaks into training.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fedray.config import DataConfig
from fedray.data import partition
from fedray.data.labels import CLASSES
from fedray.data.shards import ShardSet, class_counts, write_shard
from fedray.data.split import assign_splits, check_disjoint, split_units


class DataPrepError(ValueError):
    """Data that cannot be turned into shards; the message names the file or field."""


def load_source(config: DataConfig, seed: int) -> pa.Table:
    """A manifest table with an `image` column of encoded bytes, from the configured source."""
    if config.source == "synth":
        from fedray.data import synth

        s = config.synth
        return synth.generate(n=s.n, size=s.size, seed=seed, patients_per_class=s.patients_per_class)
    if config.source == "folder":
        from fedray.data import catalog

        cat = catalog.scan(Path(config.path), skip_bad=config.skip_bad,
                           include_segmented=config.include_segmented,
                           max_file_mb=config.max_file_mb)
        return attach_images(cat.table, cat.root)
    return load_prepared(Path(config.path))


def load_prepared(directory: Path) -> pa.Table:
    """Read the manifest written by `fedray data prepare` (or `fedray data synth`)."""
    manifest = directory / "manifest.parquet"
    if not manifest.is_file():
        raise DataPrepError(
            f"{manifest} not found: run `fedray data prepare --source <images> --output {directory}`"
        )
    table = pq.read_table(manifest)
    missing = {"path", "label", "sha256"} - set(table.column_names)
    if missing:
        raise DataPrepError(f"{manifest}: missing columns {sorted(missing)}")
    if "image" in table.column_names:
        return table
    meta = table.schema.metadata or {}
    root = Path(directory)
    if b"fedray.root" in meta:  # where the images are, relative to the manifest's folder
        recorded = Path(meta[b"fedray.root"].decode())
        root = recorded if recorded.is_absolute() else Path(directory) / recorded
    return attach_images(table, root)


def attach_images(table: pa.Table, root: Path) -> pa.Table:
    blobs = []
    for rel in table.column("path").to_pylist():
        file = root / rel
        try:
            blobs.append(file.read_bytes())
        except OSError as exc:
            raise DataPrepError(f"cannot read image {file}: {exc.strerror}") from exc
    return table.append_column("image", pa.array(blobs, type=pa.binary()))


def _ensure_group(table: pa.Table) -> pa.Table:
    if "group" in table.column_names:
        return table.set_column(
            table.schema.get_field_index("group"), "group", pc.cast(table.column("group"), pa.string())
        )
    return table.append_column("group", table.column("sha256"))


def _owners(train: pa.Table, config: DataConfig, hospitals: int, seed: int) -> np.ndarray:
    labels = np.asarray(train.column("label").to_pylist())
    groups = train.column("group").to_pylist() if config.split.group_aware else None
    units = split_units(groups, train.column("sha256").to_pylist())
    p = config.partition
    if p.scheme == "iid":
        owner = partition.iid(labels, units, hospitals, seed)
    elif p.scheme == "dirichlet":
        owner = partition.dirichlet(labels, units, hospitals, p.alpha, seed, p.min_per_hospital)
    else:
        if p.group_column not in train.column_names:
            raise DataPrepError(
                f"data.partition.scheme is by-group but the manifest has no "
                f"'{p.group_column}' column (data.partition.group_column)"
            )
        owner = partition.by_group([str(s) for s in train.column(p.group_column).to_pylist()], hospitals)
    sizes = np.bincount(owner, minlength=hospitals)
    if sizes.min() < p.min_per_hospital:
        raise DataPrepError(
            f"a hospital got {int(sizes.min())} training images, below "
            f"data.partition.min_per_hospital={p.min_per_hospital}"
        )
    return owner


def _local_val_shards(val: pa.Table, train: pa.Table, owner: np.ndarray, config: DataConfig,
                      names: list[str], seed: int, out_dir: Path) -> dict[str, str]:
    """Each hospital's own slice of the validation split, for cross-site evaluation.

    The global validation shard stays whole for the coordinator; these slices follow each
    hospital's training mix (or its site, for by-group partitions).
    """
    p = config.partition
    if p.scheme == "by-group" and p.group_column in val.column_names:
        sites = sorted(set(str(s) for s in train.column(p.group_column).to_pylist()))
        index = {s: i for i, s in enumerate(sites)}
        val_owner = np.array([index.get(str(s), -1) for s in val.column(p.group_column).to_pylist()])
    else:
        groups = val.column("group").to_pylist() if config.split.group_aware else None
        units = split_units(groups, val.column("sha256").to_pylist())
        val_owner = partition.follow(np.asarray(val.column("label").to_pylist()), units,
                                     np.asarray(train.column("label").to_pylist()), owner,
                                     len(names), seed + 17)
    files = {}
    for h, name in enumerate(names):
        rows = val.take(pa.array(np.flatnonzero(val_owner == h), type=pa.int64()))
        if rows.num_rows:
            write_shard(rows, out_dir / f"val_{name}.parquet")
            files[name] = f"val_{name}.parquet"
    return files


def _check_given_splits(table: pa.Table, splits: np.ndarray) -> np.ndarray:
    splits = np.asarray(splits, dtype=object)
    if splits.shape != (table.num_rows,):
        raise DataPrepError(f"splits has shape {splits.shape}, expected ({table.num_rows},): "
                            f"one of 'train'/'val'/'test' per row")
    bad = set(splits.tolist()) - {"train", "val", "test"}
    if bad:
        raise DataPrepError(f"splits holds {sorted(map(str, bad))}; "
                            f"only 'train', 'val', 'test' allowed")
    if not (splits == "test").any() or not (splits == "train").any():
        raise DataPrepError("splits must put at least one row in 'train' and one in 'test'")
    return splits


def build_shards(table: pa.Table, config: DataConfig, hospitals: int, seed: int, out_dir: Path,
                 splits: np.ndarray | None = None) -> ShardSet:
    """Split, partition and write one Parquet shard per hospital plus val/test shards.

    `splits` (one 'train'/'val'/'test' per row of `table`, e.g. from
    `split.assign_fold_splits`) replaces the configured split; partitioning is unchanged.
    """
    table = _ensure_group(table)
    unknown = set(table.column("label").to_pylist()) - set(CLASSES)
    if unknown:
        raise DataPrepError(f"labels {sorted(unknown)} are not among {list(CLASSES)}")
    sp = config.split
    if splits is None:
        splits = assign_splits(table, val=sp.val, test=sp.test, seed=seed,
                               group_aware=sp.group_aware)
        origin = "internal error"
    else:
        splits = _check_given_splits(table, splits)
        origin = "given splits"
    leaks = check_disjoint(table, splits)
    if leaks.get("sha256", 0):
        raise DataPrepError(f"{origin}: {leaks['sha256']} duplicate images span splits")
    split_col = pa.array(splits.astype(str))
    parts = {name: table.filter(pc.equal(split_col, name)) for name in ("train", "val", "test")}
    train = parts["train"]
    owner = _owners(train, config, hospitals, seed)
    names = partition.hospital_names(hospitals)

    out_dir.mkdir(parents=True, exist_ok=True)
    shard_files: dict[str, str] = {}
    counts: dict[str, dict[str, int]] = {}
    for h, name in enumerate(names):
        rows = train.take(pa.array(np.flatnonzero(owner == h)))
        write_shard(rows, out_dir / f"{name}.parquet")
        shard_files[name] = f"{name}.parquet"
        counts[name] = class_counts(rows)
    val_file, local_val = None, {}
    if parts["val"].num_rows:
        write_shard(parts["val"], out_dir / "val.parquet")
        val_file = "val.parquet"
        counts["val"] = class_counts(parts["val"])
        local_val = _local_val_shards(parts["val"], train, owner, config, names, seed, out_dir)
    write_shard(parts["test"], out_dir / "test.parquet")
    counts["test"] = class_counts(parts["test"])
    shard_set = ShardSet(root=out_dir, hospitals=shard_files, val=val_file, test="test.parquet",
                         counts=counts, local_val=local_val)
    shard_set.save()
    (out_dir / "leakage.json").write_text(json.dumps({"spanning_splits": leaks}, indent=2))
    return shard_set


def counts_table(shards: ShardSet) -> str:
    """Per-hospital (and val/test) class counts, for the console and the report."""
    rows = list(shards.counts.items())
    width = max(len(n) for n, _ in rows) + 2
    lines = ["shard".ljust(width) + "".join(c.rjust(8) for c in CLASSES) + "total".rjust(8)]
    for name, c in rows:
        lines.append(name.ljust(width) + "".join(str(c[k]).rjust(8) for k in CLASSES)
                     + str(sum(c.values())).rjust(8))
    return "\n".join(lines)
