"""An HTTP request -> the image uploads it carries, with every size and shape refused by name.

Bodies are read against a byte limit before anything is parsed (a declared Content-Length
over it is refused unread), so one request never holds more than its images' worth of memory.
"""

from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.requests import Request

from fedray.serving.images import ACCEPTED_TYPES, Limits, RequestError, Upload, media_type

MULTIPART = "multipart/form-data"
MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around each part


async def read_body(request: Request, limit: int, code: str = "request_too_large") -> bytes:
    """The whole body, or RequestError(413, code) as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError("bad_request", f"Content-Length {declared!r} is not a byte count")
        if int(declared) > limit:
            raise RequestError(code, f"request body of {declared} bytes, over the limit of "
                               f"{limit} bytes", 413)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise RequestError(code, f"request body over the limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _form_parts(request: Request, body: bytes, field: str, max_parts: int) -> list[Upload]:
    """The file parts named `field` of a multipart body already read into memory."""

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    replay = Request(request.scope, receive)
    try:
        form = await replay.form(max_files=max_parts, max_fields=max_parts)
    except Exception as exc:  # noqa: BLE001 - parser errors on untrusted bytes are the client's
        message = str(getattr(exc, "detail", None) or getattr(exc, "message", None) or exc)
        if "too many files" in message.lower():
            raise RequestError("batch_too_large", f"more than {max_parts} parts in the request",
                               413) from None
        raise RequestError("malformed_multipart", f"multipart body cannot be parsed ({message})") \
            from None
    try:
        uploads = []
        values = form.getlist(field)
        for i, value in enumerate(values):
            part = f"{field}[{i}]" if len(values) > 1 or field == "files" else field
            if not isinstance(value, UploadFile):
                raise RequestError("not_a_file", f"part {part!r} is a text field, not a file")
            if value.filename:
                part = f"{part} ({value.filename!r})"
            declared = media_type(value.content_type)
            if declared and not (declared.startswith("image/")
                                 or declared == "application/octet-stream"):
                raise RequestError("unsupported_media_type", f"{part}: Content-Type {declared!r} "
                                   f"is not an image; send {', '.join(ACCEPTED_TYPES)}", 415)
            uploads.append(Upload(part, await value.read()))
        return uploads
    finally:
        await form.close()


async def single_upload(request: Request, limits: Limits) -> Upload:
    """The one image of /v1/predict or /v1/explain: a multipart 'file' part or a raw image body."""
    declared = media_type(request.headers.get("content-type"))
    if declared in ACCEPTED_TYPES:
        return Upload("body", await read_body(request, limits.max_image_bytes, "image_too_large"))
    if declared != MULTIPART:
        raise RequestError("unsupported_media_type", f"Content-Type {declared or '(none)'!r}: send "
                           f"{MULTIPART} with a 'file' part, or a raw {', '.join(ACCEPTED_TYPES)} "
                           "body", 415)
    body = await read_body(request, limits.max_image_bytes + MULTIPART_OVERHEAD)
    uploads = await _form_parts(request, body, "file", max_parts=16)
    if not uploads:
        raise RequestError("missing_file", "no 'file' part in the multipart body")
    if len(uploads) > 1:
        raise RequestError("too_many_files", f"{len(uploads)} 'file' parts; send one, or use "
                           "/v1/predict/batch with 'files' parts")
    return uploads[0]


async def batch_uploads(request: Request, limits: Limits) -> list[Upload]:
    """The images of /v1/predict/batch: one or more multipart 'files' parts, in order."""
    declared = media_type(request.headers.get("content-type"))
    if declared != MULTIPART:
        raise RequestError("unsupported_media_type", f"Content-Type {declared or '(none)'!r}: send "
                           f"{MULTIPART} with one or more 'files' parts", 415)
    most = limits.max_batch_images
    body = await read_body(request, most * (limits.max_image_bytes + MULTIPART_OVERHEAD))
    uploads = await _form_parts(request, body, "files", max_parts=2 * most + 16)
    if not uploads:
        raise RequestError("missing_file", "no 'files' part in the multipart body")
    if len(uploads) > most:
        raise RequestError("batch_too_large", f"{len(uploads)} images, over the limit of {most} "
                           "per request", 413)
    return uploads
