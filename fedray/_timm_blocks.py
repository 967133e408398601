"""DP-safe replacements for timm blocks; imported only when a timm backbone is in use."""

from __future__ import annotations

from timm.models.xception import Block as XceptionBlock
from torch import Tensor


class DPXceptionBlock(XceptionBlock):
    """timm Xception block with `x + skip` instead of the in-place `x += skip`."""

    def forward(self, inp: Tensor) -> Tensor:
        skip = inp if self.skip is None else self.skipbn(self.skip(inp))
        return self.rep(inp) + skip
