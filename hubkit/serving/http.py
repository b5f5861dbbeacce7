"""The HTTP side of serving: reading a prediction request, its limits, and its 4xx answers.

Every bad request (not an image, bad base64, missing field, too large) becomes a
:class:`RequestError` with a status and a message; nothing a client sends takes the server down.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
from typing import TYPE_CHECKING, Any

from PIL import Image, UnidentifiedImageError

from ..data.images import image_size_problem
from ..errors import ImageError
from .limits import DEFAULT_TOP_K, MAX_IMAGE_PIXELS

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from ..inference.module import Module


LOG = logging.getLogger("hubkit.serving")


class RequestError(Exception):
    """A client mistake: answered with ``status`` and a JSON ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        self.status, self.message = status, message
        super().__init__(message)


async def _read_body(request, read):
    """``await read()`` (the body, the form); a client that hung up mid-request is one log line and a
    400 nobody receives, not an "Exception in ASGI application" traceback."""
    from starlette.requests import ClientDisconnect  # noqa: PLC0415 - serving's optional extra, loaded with the app

    try:
        return await read()
    except ClientDisconnect:
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        LOG.warning("%s disconnected before sending its whole request to %s", client, request.url.path)
        raise RequestError(400, "the client disconnected before sending the whole request") from None


def check_upload(data: bytes) -> None:
    """Refuse an upload that is empty, not an image, more than ``MAX_IMAGE_PIXELS`` or too elongated to
    resize with bounded work, from its header alone (a small compressed file can decode to gigabytes):
    a 4xx ``RequestError``."""
    if not data:
        raise RequestError(400, "the image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except UnidentifiedImageError:
        raise RequestError(400, "the upload is not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise RequestError(413, f"the image is too large to decode safely ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise RequestError(400, f"the image is corrupt or truncated ({exc})") from None
    if width * height > MAX_IMAGE_PIXELS:
        raise RequestError(413, f"the image is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS:,} are accepted")
    problem = image_size_problem(width, height)  # the work after resizing, not only the pixels decoded
    if problem:
        raise RequestError(413, problem)


def preprocess_upload(module: "Module", data: bytes) -> "torch.Tensor":
    """The model input for uploaded image bytes: checked by :func:`check_upload`, then decoded and
    preprocessed by ``module.preprocess``, exactly as ``Module.predict`` would (large JPEGs at
    reduced scale included); a 400 ``RequestError`` when the image turns out unreadable."""
    check_upload(data)
    try:
        return module.preprocess(data)
    except ImageError as exc:
        raise RequestError(400, f"cannot read the image: {exc.reason}") from None


def parse_top_k(value: Any, num_classes: int) -> int:
    if value is None or value == "":
        return min(DEFAULT_TOP_K, num_classes)
    try:
        top_k = int(value)
        if isinstance(value, float) or str(top_k) != str(value).strip():
            raise ValueError
    except (TypeError, ValueError):
        raise RequestError(422, f"top_k must be an integer, got {value!r}") from None
    if not 1 <= top_k <= num_classes:
        raise RequestError(422, f"top_k must be between 1 and {num_classes}, got {top_k}")
    return top_k


async def read_request(request) -> tuple[bytes, Any]:
    """The image bytes and the raw ``top_k`` of a JSON or multipart prediction request."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            payload = json.loads(await _read_body(request, request.body))
        except RecursionError:
            raise RequestError(400, "the body is not valid JSON (nested too deeply)") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"the body is not valid JSON ({exc})") from None
        if not isinstance(payload, dict):
            raise RequestError(400, 'the JSON body must be an object: {"image": "<base64>", "top_k": 5}')
        if "image" not in payload:
            raise RequestError(400, 'missing field "image" (the image file, base64-encoded)')
        if not isinstance(payload["image"], str):
            raise RequestError(400, 'field "image" must be a base64 string')
        try:
            data = base64.b64decode(payload["image"].split(",", 1)[-1] if payload["image"].startswith("data:")
                                    else payload["image"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(400, f'field "image" is not valid base64 ({exc})') from None
        return data, payload.get("top_k")
    if content_type == "multipart/form-data":
        try:
            form = await _read_body(request, request.form)
        except (_BodyTooLarge, RequestError):
            raise
        except Exception as exc:  # the multipart parser's errors have no common public base
            raise RequestError(400, f"the multipart body cannot be parsed ({exc})") from None
        upload = form.get("file") or form.get("image")
        if upload is None or isinstance(upload, str):
            raise RequestError(400, 'missing file field "file" (or "image") in the multipart form')
        return await upload.read(), form.get("top_k")
    raise RequestError(415, f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data "
                            'with a "file" field, or application/json {"image": "<base64>"}')


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuses request bodies over ``max_bytes`` with 413, by header or while streaming."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({"error": f"request body is larger than the limit of {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
