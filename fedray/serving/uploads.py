"""An HTTP request -> the image uploads it carries, with every size and shape refused by name.

Bodies are read against a byte limit before anything is parsed (a declared Content-Length
over it is refused unread). A multipart body is parsed as it streams in, each part's bytes
gathered once and refused as soon as they pass max_image_bytes; a part is handed on when it
is complete, so a caller that decodes each part before asking for the next (the batch route)
holds one part's bytes at a time, never the whole body and never a second copy of it.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from fedray.serving.images import ACCEPTED_TYPES, Limits, RequestError, Upload, media_type

MULTIPART = "multipart/form-data"
MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around each part


def _check_declared_length(request: Request, limit: int, code: str) -> None:
    declared = request.headers.get("content-length")
    if declared is None:
        return
    if not declared.strip().isdigit():
        raise RequestError("bad_request", f"Content-Length {declared!r} is not a byte count")
    if int(declared) > limit:
        raise RequestError(code, f"request body of {declared} bytes, over the limit of {limit} "
                           "bytes", 413)


async def read_body(request: Request, limit: int, code: str = "request_too_large") -> bytes:
    """The whole body, or RequestError(413, code) as soon as it passes `limit` bytes."""
    _check_declared_length(request, limit, code)
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise RequestError(code, f"request body over the limit of {limit} bytes", 413)
        body += chunk
    return bytes(body)


@dataclass
class _Part:
    index: int
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str | None = None
    filename: str | None = None
    keep: bool = False  # a file part of the wanted field: its bytes are gathered
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0


class _PartReader:
    """python-multipart callbacks gathering the file parts named `wanted`, with the limits."""

    def __init__(self, wanted: str, charset: str, limits: Limits, max_parts: int,
                 max_files: int) -> None:
        self.wanted, self.charset, self.limits = wanted, charset, limits
        self.max_parts, self.max_files = max_parts, max_files
        self.parts = 0
        self.files = 0
        self.done: list[Upload] = []
        self.ended = False
        self._part: _Part | None = None
        self._field, self._value = b"", b""

    def callbacks(self) -> dict:
        return {"on_part_begin": self._begin, "on_part_data": self._data,
                "on_part_end": self._end, "on_header_field": self._header_field,
                "on_header_value": self._header_value, "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished, "on_end": self._finish}

    def _text(self, raw: bytes) -> str:
        try:
            return raw.decode(self.charset)
        except (UnicodeDecodeError, LookupError):
            return raw.decode("latin-1")

    def _label(self, part: _Part) -> str:
        label = f"{self.wanted}[{self.files - 1}]" if self.wanted == "files" else self.wanted
        return f"{label} ({part.filename!r})" if part.filename else label

    def _begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise RequestError("batch_too_large", f"more than {self.max_parts} parts in the "
                               "request", 413)
        self._part = _Part(self.parts)

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._part.headers[self._field.strip().lower()] = self._value.strip()
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        part = self._part
        _, options = parse_options_header(part.headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise RequestError("malformed_multipart", f"part {part.index} has no field name: "
                               "its Content-Disposition header field \"name\" must be provided")
        part.name = self._text(options[b"name"])
        if b"filename" in options:
            part.filename = self._text(options[b"filename"])
        if part.name != self.wanted:
            return  # another field: counted against max_parts, its bytes dropped
        if part.filename is None:
            raise RequestError("not_a_file", f"part {self.wanted!r} is a text field, not a file")
        self.files += 1
        if self.files > self.max_files:
            if self.wanted == "files":
                raise RequestError("batch_too_large", f"{self.files} images (or more), over "
                                   f"the limit of {self.max_files} per request", 413)
            raise RequestError("too_many_files", f"{self.files} {self.wanted!r} parts; send one, "
                               "or use /v1/predict/batch with 'files' parts")
        declared = media_type(self._text(part.headers.get(b"content-type", b"")))
        if declared and not (declared.startswith("image/") or
                             declared == "application/octet-stream"):
            raise RequestError("unsupported_media_type", f"{self._label(part)}: Content-Type "
                               f"{declared!r} is not an image; send {', '.join(ACCEPTED_TYPES)}",
                               415)
        part.keep = True

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        if part is None or not part.keep:
            return
        part.size += end - start
        if part.size > self.limits.max_image_bytes:
            raise RequestError("image_too_large", f"{self._label(part)}: over the limit of "
                               f"{self.limits.max_image_bytes} bytes", 413)
        part.chunks.append(data[start:end])

    def _end(self) -> None:
        part, self._part = self._part, None
        if part is not None and part.keep:
            # Joined once (the decoder reads these bytes in place), then the pieces go.
            data, part.chunks = b"".join(part.chunks), []
            self.done.append(Upload(self._label(part), data))

    def _finish(self) -> None:
        self.ended = True


async def stream_parts(request: Request, wanted: str, limits: Limits, *, max_files: int,
                       body_limit: int) -> AsyncIterator[Upload]:
    """The file parts named `wanted` of a multipart request, each as soon as it is complete."""
    _check_declared_length(request, body_limit, "request_too_large")
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestError("malformed_multipart", "multipart Content-Type without a boundary "
                           "parameter")
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        charset = codecs.lookup(charset).name
    except LookupError:
        charset = "latin-1"
    reader = _PartReader(wanted, charset, limits, max_parts=2 * max_files + 16,
                         max_files=max_files)
    try:
        parser = MultipartParser(boundary, reader.callbacks())
    except Exception as exc:  # noqa: BLE001 - a boundary the parser cannot use is the client's
        raise RequestError("malformed_multipart", f"bad multipart boundary ({exc})") from None
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > body_limit:
            raise RequestError("request_too_large", f"request body over the limit of "
                               f"{body_limit} bytes", 413)
        try:
            parser.write(chunk)
        except RequestError:
            raise
        except Exception as exc:  # noqa: BLE001 - parser errors on untrusted bytes are the client's
            raise RequestError("malformed_multipart", f"multipart body cannot be parsed "
                               f"({exc})") from None
        while reader.done:
            yield reader.done.pop(0)
    try:
        parser.finalize()
    except Exception as exc:  # noqa: BLE001
        raise RequestError("malformed_multipart", f"multipart body cannot be parsed ({exc})") \
            from None
    if reader._part is not None:
        raise RequestError("malformed_multipart", f"the body ends inside part "
                           f"{reader._part.index}, before its closing boundary")
    while reader.done:
        yield reader.done.pop(0)
    if reader.files == 0:
        raise RequestError("missing_file", f"no {wanted!r} part in the multipart body")


def _multipart_or_415(request: Request, what: str) -> str:
    declared = media_type(request.headers.get("content-type"))
    if declared != MULTIPART and declared not in ACCEPTED_TYPES:
        raise RequestError("unsupported_media_type", f"Content-Type {declared or '(none)'!r}: "
                           f"send {what}", 415)
    return declared


async def single_upload(request: Request, limits: Limits) -> Upload:
    """The one image of /v1/predict or /v1/explain: a multipart 'file' part or a raw image body."""
    declared = _multipart_or_415(request, f"{MULTIPART} with a 'file' part, or a raw "
                                          f"{', '.join(ACCEPTED_TYPES)} body")
    if declared in ACCEPTED_TYPES:
        return Upload("body", await read_body(request, limits.max_image_bytes, "image_too_large"))
    uploads = [u async for u in stream_parts(request, "file", limits, max_files=1,
                                             body_limit=limits.max_image_bytes
                                             + MULTIPART_OVERHEAD)]
    return uploads[0]


def batch_parts(request: Request, limits: Limits) -> AsyncIterator[Upload]:
    """The images of /v1/predict/batch (multipart 'files' parts), in order, one at a time."""
    declared = media_type(request.headers.get("content-type"))
    if declared != MULTIPART:
        raise RequestError("unsupported_media_type", f"Content-Type {declared or '(none)'!r}: send "
                           f"{MULTIPART} with one or more 'files' parts", 415)
    most = limits.max_batch_images
    return stream_parts(request, "files", limits, max_files=most,
                        body_limit=most * (limits.max_image_bytes + MULTIPART_OVERHEAD))
