"""Untrusted upload bytes -> the RGB arrays a model takes, or a RequestError that says why not.

The model-size array is made by the decoder training used on its shards (fedray.data.decode:
one frame only, EXIF orientation applied, 16-bit and float pixels scaled, never clipped, then
bilinear resize), so a served prediction equals an in-process one on the same file. Size
limits (too many pixels, a side under min_image_side) are checked on the header, before any
pixel is decoded; only JPEG, PNG and TIFF decoders are ever tried on the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedray.data.decode import DecodeError, open_rgb, resized

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
    min_side: int = 1


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


INLINE_DECODE_PIXELS = 128 * 128


class _Larger(Exception):
    """The image has more pixels than the caller decodes in place."""


def decode_small(upload: Upload, limits: Limits, size: int,
                 most_pixels: int = INLINE_DECODE_PIXELS) -> Decoded | None:
    """decode_upload for an image of at most `most_pixels`, cheap enough to decode on an
    event loop (about 0.2 ms for a 64 px PNG); None, nothing decoded, for a larger one (hand
    it to decode_upload in a thread). Anything unusable is refused as decode_upload refuses it.
    """
    try:
        return decode_upload(upload, limits, size, _most_pixels=most_pixels)
    except _Larger:
        return None


def decode_upload(upload: Upload, limits: Limits, size: int,
                  display_max: int | None = None, *, _most_pixels: int | None = None) -> Decoded:
    """The upload as model input (and a display copy); RequestError for anything unusable."""
    name, data = upload.name, upload.data
    if not data:
        raise RequestError("empty_image", f"{name}: zero bytes; send a JPEG, PNG or TIFF image")
    if len(data) > limits.max_image_bytes:
        raise RequestError("image_too_large", f"{name}: {len(data)} bytes, over the limit of "
                           f"{limits.max_image_bytes} bytes", 413)

    def check(img: Image.Image) -> None:
        width, height = img.size
        if width < 1 or height < 1:
            raise RequestError("corrupt_image", f"{name}: image of size {width}x{height}")
        if width * height > limits.max_pixels:
            raise RequestError("too_many_pixels", f"{name}: {width}x{height} = "
                               f"{width * height} pixels, over the limit of "
                               f"{limits.max_pixels}", 413)
        if min(width, height) < limits.min_side:
            raise RequestError("image_too_small", f"{name}: {width}x{height} pixels, a side "
                               f"under the minimum of {limits.min_side}: too little of a smear "
                               "to classify", 422)
        if _most_pixels is not None and width * height > _most_pixels:
            raise _Larger

    try:
        rgb = open_rgb(data, formats=PIL_FORMATS, check=check)
    except (RequestError, _Larger):
        raise
    except DecodeError as exc:
        raise RequestError(exc.code, f"{name}: {exc.detail}", 422) from None
    except Image.DecompressionBombError as exc:
        raise RequestError("decompression_bomb", f"{name}: refused as a decompression bomb "
                           f"({exc})", 413) from None
    except UnidentifiedImageError:
        raise RequestError("not_an_image", f"{name}: not a JPEG, PNG or TIFF image") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure on untrusted bytes is the input's
        code = "truncated_image" if "truncat" in str(exc).lower() else "corrupt_image"
        raise RequestError(code, f"{name}: image data cannot be decoded ({exc})") from None
    display = None
    if display_max is not None:
        display = rgb.copy()
        display.thumbnail((display_max, display_max), Image.Resampling.BILINEAR)
        display = np.asarray(display, dtype=np.uint8)
    return Decoded(name, resized(rgb, size), display)
