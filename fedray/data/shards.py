"""Hospital shards: one Parquet file of encoded images and labels per hospital.

A shard is decoded once when its hospital starts and kept as one uint8 tensor for the whole run,
so rounds never touch the disk or the JPEG/PNG decoder again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from fedray.data.decode import decode_rgb
from fedray.data.labels import CLASS_INDEX, CLASSES

SHARD_COLUMNS = ("path", "label", "group", "sha256", "image")


@dataclass
class ShardSet:
    """Where every shard of a run lives, and what it holds."""

    root: Path
    hospitals: dict[str, str]
    val: str | None
    test: str
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    local_val: dict[str, str] = field(default_factory=dict)  # hospital -> its validation slice

    def path(self, name: str) -> Path:
        return self.root / name

    def save(self) -> Path:
        out = self.root / "shards.json"
        data = asdict(self)
        data["root"] = "."
        out.write_text(json.dumps(data, indent=2))
        return out

    @classmethod
    def load(cls, root: Path) -> ShardSet:
        data = json.loads((root / "shards.json").read_text())
        data["root"] = root
        return cls(**data)


def write_shard(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.select(list(SHARD_COLUMNS)), path, compression="none")


def class_counts(table: pa.Table) -> dict[str, int]:
    labels = table.column("label").to_pylist()
    return {c: labels.count(c) for c in CLASSES}


def decode_image(data: bytes, size: int) -> np.ndarray:
    """RGB uint8 HxWx3 at size x size, by the decoder serving uses too (fedray.data.decode);
    raises ValueError naming nothing (callers add the row)."""
    return decode_rgb(data, size)


class ShardDataset(torch.utils.data.Dataset):
    """Decoded images held in memory as one uint8 tensor, with an optional per-sample transform.

    Each record also knows its source row (`sources`: the flip_x4 copies of an image share one)
    and its group (`groups`: the patient, or the image's sha256 when the data names no patient),
    which privacy units are made of.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        groups: Sequence[str] | None = None,
        sources: torch.Tensor | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, 3, H, W)")
        self.images = images
        self.labels = labels
        self.transform = transform
        self.sources = sources if sources is not None else torch.arange(len(labels))
        self.groups = list(groups) if groups is not None else None
        if len(self.sources) != len(labels) or (
                self.groups is not None and len(self.groups) != len(labels)):
            raise ValueError("sources and groups need one entry per record")

    @classmethod
    def from_parquet(
        cls,
        path: Path,
        image_size: int,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        expand_flips: bool = False,
    ) -> ShardDataset:
        table = pq.read_table(path, columns=["path", "label", "group", "image"])
        return cls.from_table(table, image_size, transform, expand_flips, where=str(path))

    @classmethod
    def from_table(
        cls,
        table: pa.Table,
        image_size: int,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        expand_flips: bool = False,
        where: str = "shard",
    ) -> ShardDataset:
        """Decode a manifest table's images once (`where` names it in errors)."""
        arrays = []
        for row_path, blob in zip(table.column("path").to_pylist(), table.column("image").to_pylist()):
            try:
                arrays.append(decode_image(blob, image_size))
            except Exception as exc:  # noqa: BLE001 - re-raised with the row named
                raise ValueError(f"{where}: cannot decode image {row_path!r}: {exc}") from exc
        if not arrays:
            raise ValueError(f"{where}: no images")
        images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
        labels = torch.tensor([CLASS_INDEX[x] for x in table.column("label").to_pylist()])
        groups = [str(g) for g in table.column("group").to_pylist()]
        sources = torch.arange(len(labels))
        if expand_flips:
            images, labels = flip_expand(images, labels)
            groups, sources = groups * 4, sources.repeat(4)  # flip_expand's order
        return cls(images, labels, transform, groups=groups, sources=sources)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=len(CLASSES))

    def unit_ids(self, unit: str) -> torch.Tensor:
        """Each record's privacy unit as 0..U-1: `record` (itself), `image` (its source image,
        shared by its flip_x4 copies) or `patient` (its group)."""
        if unit == "record":
            return torch.arange(len(self.labels))
        if unit == "image":
            return torch.unique(self.sources, return_inverse=True)[1]
        if unit == "patient":
            if self.groups is None:
                raise ValueError("privacy.unit: patient needs the shard's group column")
            index: dict[str, int] = {}
            return torch.tensor([index.setdefault(g, len(index)) for g in self.groups])
        raise ValueError(f"unknown privacy unit {unit!r}: image, patient or record")

    def num_units(self, unit: str) -> int:
        ids = self.unit_ids(unit)
        return int(ids.max()) + 1 if len(ids) else 0


def flip_expand(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The papers' offline x4 expansion (identity, h-flip, v-flip, both); training rows only."""
    stacked = torch.cat(
        [images, images.flip(-1), images.flip(-2), images.flip(-1).flip(-2)], dim=0
    )
    return stacked, labels.repeat(4)
