"""Untrusted upload bytes -> the RGB arrays a model takes, or a RequestError that says why not.

The model-size array is made exactly as training decoded its shards (PIL, convert to RGB,
bilinear resize: fedray.data.shards.decode_image), so a served prediction equals an in-process
one on the same file. Size limits are checked on the header, before any pixel is decoded; only
JPEG, PNG and TIFF decoders are ever tried on the bytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

ACCEPTED_TYPES: tuple[str, ...] = ("image/jpeg", "image/png", "image/tiff")
PIL_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "TIFF")  # JPEG also opens cameras' MPO files


class RequestError(ValueError):
    """A request the service refuses: `code` for programs, `detail` for people, HTTP `status`.

    Raised for bad uploads here, and by the Ingress for auth and overload; always a 4xx or 503.
    """

    def __init__(self, code: str, detail: str, status: int = 400) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int
    max_pixels: int
    max_batch_images: int


@dataclass(frozen=True)
class Upload:
    """One image as received: `name` says where it came from (part and file name, or body)."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Decoded:
    name: str
    model_input: np.ndarray  # size x size x 3 uint8
    display: np.ndarray | None  # RGB at most display_max on a side, for overlays


def media_type(header: str | None) -> str:
    """"image/png; q=1" -> "image/png"; "" when absent."""
    return (header or "").split(";", 1)[0].strip().lower()


def decode_upload(upload: Upload, limits: Limits, size: int,
                  display_max: int | None = None) -> Decoded:
    """The upload as model input (and a display copy); RequestError for anything unusable."""
    name, data = upload.name, upload.data
    if not data:
        raise RequestError("empty_image", f"{name}: zero bytes; send a JPEG, PNG or TIFF image")
    if len(data) > limits.max_image_bytes:
        raise RequestError("image_too_large", f"{name}: {len(data)} bytes, over the limit of "
                           f"{limits.max_image_bytes} bytes", 413)
    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as img:
            width, height = img.size
            if width < 1 or height < 1:
                raise RequestError("corrupt_image", f"{name}: image of size {width}x{height}")
            if width * height > limits.max_pixels:
                raise RequestError("too_many_pixels", f"{name}: {width}x{height} = "
                                   f"{width * height} pixels, over the limit of "
                                   f"{limits.max_pixels}", 413)
            img.load()
            rgb = img.convert("RGB")
    except RequestError:
        raise
    except Image.DecompressionBombError as exc:
        raise RequestError("decompression_bomb", f"{name}: refused as a decompression bomb "
                           f"({exc})", 413) from None
    except UnidentifiedImageError:
        raise RequestError("not_an_image", f"{name}: not a JPEG, PNG or TIFF image") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted bytes is the input's
        code = "truncated_image" if "truncat" in str(exc).lower() else "corrupt_image"
        raise RequestError(code, f"{name}: image data cannot be decoded ({exc})") from None
    small = rgb if rgb.size == (size, size) else rgb.resize((size, size), Image.Resampling.BILINEAR)
    display = None
    if display_max is not None:
        display = rgb.copy()
        display.thumbnail((display_max, display_max), Image.Resampling.BILINEAR)
        display = np.asarray(display, dtype=np.uint8)
    return Decoded(name, np.asarray(small, dtype=np.uint8), display)
