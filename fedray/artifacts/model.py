"""A model loaded from a run folder or a package, with what its inputs and outputs mean."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


@dataclass
class LoadedModel:
    """A model ready to explain, with what its inputs and outputs mean."""

    model: nn.Module
    backbone: str
    image_size: int
    classes: tuple[str, ...]
    source: Path
