"""Encoded image bytes -> the RGB uint8 array a model sees: one decoder for training and serving.

Shards are decoded with it when a hospital starts, and uploads when the service receives
them, so a served image reaches the model exactly as a training image of the same file did.
The rules, each a refusal with a code rather than a silent guess:

- one frame only: a multi-page TIFF or animated PNG is refused (`multi_frame`), never read as
  its first frame. A camera's MPO (JPEG with a preview) is read as its primary image, which
  the format defines as frame 0.
- EXIF orientation is applied (a phone photo taken sideways is turned upright).
- 8-bit modes (L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, 1) become RGB by PIL's conversion: alpha
  is dropped, a palette is expanded, CMYK is converted.
- 16-bit images are scaled by their bit depth (value * 255 / 65535), never clipped to white;
  32-bit integer images are scaled the same way when their values fit 16 bits, else refused.
  Float images are scaled from [0, 1]; values outside it, or not finite, are refused
  (`unsupported_pixel_format`): their meaning cannot be known from the file.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
UINT16_MAX = 65535


class DecodeError(ValueError):
    """An image this decoder refuses to guess about; `code` names the rule (multi_frame, ...)."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


def _frames(img: Image.Image) -> int:
    return int(getattr(img, "n_frames", 1) or 1)


def _scaled_gray(values: np.ndarray, full_scale: float) -> np.ndarray:
    gray = np.clip(np.rint(values.astype(np.float64) * (255.0 / full_scale)), 0, 255)
    return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=2)


def _high_depth_rgb(img: Image.Image) -> np.ndarray:
    """RGB uint8 of a 16-bit, 32-bit integer or float (single-channel) image, or DecodeError."""
    values = np.asarray(img)
    if img.mode in SIXTEEN_BIT_MODES:
        return _scaled_gray(values, UINT16_MAX)
    if img.mode == "I":
        low, high = int(values.min()), int(values.max())
        if low < 0 or high > UINT16_MAX:
            raise DecodeError("unsupported_pixel_format", f"32-bit integer pixels in "
                              f"[{low}, {high}]: only values that fit 16 bits can be scaled")
        return _scaled_gray(values, UINT16_MAX)
    if not np.isfinite(values).all():
        raise DecodeError("unsupported_pixel_format", "float pixels that are NaN or infinite")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise DecodeError("unsupported_pixel_format", f"float pixels in [{low:g}, {high:g}]; "
                          "only [0, 1] float images can be scaled to 8 bits")
    return _scaled_gray(values, 1.0)


def to_rgb(img: Image.Image) -> Image.Image:
    """An opened, single-frame image as 8-bit RGB, upright (the rules above)."""
    upright = ImageOps.exif_transpose(img) or img
    if upright.mode in (*SIXTEEN_BIT_MODES, "I", "F"):
        return Image.fromarray(_high_depth_rgb(upright), "RGB")
    try:
        return upright if upright.mode == "RGB" else upright.convert("RGB")
    except ValueError as exc:  # a mode PIL cannot turn into RGB (LAB, HSV, ...)
        raise DecodeError("unsupported_pixel_format", f"pixel mode {upright.mode!r} cannot be "
                          f"converted to RGB ({exc})") from None


def open_rgb(data: bytes | bytearray | memoryview, *, formats: Sequence[str] | None = None,
             check: Callable[[Image.Image], None] | None = None) -> Image.Image:
    """The image in `data` as full-size 8-bit RGB (the rules above).

    `check(img)` sees the opened image before any pixel is decoded (size limits go there);
    `formats` restricts the decoders PIL may try. PIL's own errors pass through for the caller
    to name the file; the rules above raise DecodeError.
    """
    with Image.open(io.BytesIO(data), formats=formats) as img:
        if check is not None:
            check(img)
        frames = _frames(img)
        if frames > 1 and img.format != "MPO":
            raise DecodeError("multi_frame", f"{img.format} image with {frames} frames (pages); "
                              "send each frame as its own image")
        img.load()
        return to_rgb(img)


def resized(rgb: Image.Image, size: int) -> np.ndarray:
    """size x size RGB uint8 by PIL bilinear resize: how every model input is made."""
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def decode_rgb(data: bytes | bytearray | memoryview, size: int, *,
               formats: Sequence[str] | None = None,
               check: Callable[[Image.Image], None] | None = None) -> np.ndarray:
    """RGB uint8 size x size x 3 of an encoded image: open_rgb, then resized."""
    return resized(open_rgb(data, formats=formats, check=check), size)
