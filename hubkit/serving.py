"""An HTTP prediction server for installed modules, with dynamic micro-batching.

``create_app(modules)`` returns a FastAPI app; ``hub serving start`` runs it with uvicorn.
Concurrent requests for one module are gathered by a :class:`MicroBatcher` (up to
``max_batch`` requests, or whatever arrived within ``max_wait_ms`` of the first) and run as
one forward pass in a worker thread, so the event loop keeps accepting requests while the
model computes and a busy server does fewer, larger forwards.

Every bad request (unknown module, not an image, bad base64, missing field, too large)
gets a 4xx JSON answer ``{"error": "..."}``; nothing a client sends takes the server down.
"""
import asyncio
import base64
import binascii
import io
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from .errors import ConfigError, ServerNotReadyError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from fastapi import FastAPI

    from .module import Module

DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_WAIT_MS = 5.0
DEFAULT_MAX_BODY_BYTES = 10 * 2**20
DEFAULT_TOP_K = 5
#: Larger images are refused before decoding (a small compressed file can expand to gigabytes).
MAX_IMAGE_PIXELS = 40_000_000


class RequestError(Exception):
    """A client mistake: answered with ``status`` and a JSON ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        self.status, self.message = status, message
        super().__init__(message)


@dataclass
class BatchStats:
    """What a batcher has run: how many requests, in how many forwards, of which sizes."""

    requests: int = 0
    batches: int = 0
    failed_batches: int = 0
    batch_sizes: Counter = field(default_factory=Counter)

    def record(self, size: int) -> None:
        self.requests += size
        self.batches += 1
        self.batch_sizes[size] += 1

    def to_dict(self) -> dict:
        return {"requests": self.requests, "batches": self.batches, "failed_batches": self.failed_batches,
                "largest_batch": max(self.batch_sizes, default=0),
                "mean_batch": round(self.requests / self.batches, 3) if self.batches else 0.0,
                "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}


class MicroBatcher:
    """Gathers single-image requests for one module into batched forwards.

    ``submit`` queues one preprocessed image and waits for its probability row. A worker
    task (started on first use, in the running event loop) takes the first waiting request,
    waits up to ``max_wait_ms`` for more (at most ``max_batch`` in all), runs
    ``module.forward_probabilities`` on the stacked batch in a dedicated thread and hands
    every caller its row. ``max_batch=1`` turns batching off.
    """

    def __init__(self, module: "Module", *, max_batch: int = DEFAULT_MAX_BATCH, max_wait_ms: float = DEFAULT_MAX_WAIT_MS):
        if max_batch < 1:
            raise ConfigError(f"max_batch must be at least 1, not {max_batch}")
        if max_wait_ms < 0:
            raise ConfigError(f"max_wait_ms must be 0 or more, not {max_wait_ms}")
        self.module = module
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._pending: list[tuple["torch.Tensor", asyncio.Future]] = []
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"forward-{module.name}")

    async def submit(self, image: "torch.Tensor") -> tuple["torch.Tensor", int]:
        """The class probabilities of one preprocessed image, and the size of the batch it ran in."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():  # first use, or a new event loop
            self._pending = [(image, fut) for image, fut in self._pending if fut.get_loop() is loop]
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._run(), name=f"batcher-{self.module.name}")
        future = loop.create_future()
        self._pending.append((image, future))
        self._arrived.set()
        return await future

    async def _gather(self) -> list[tuple["torch.Tensor", asyncio.Future]]:
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(self._pending) < self.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        taken, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
        return [(image, fut) for image, fut in taken if not fut.done()]  # a cancelled caller is gone

    async def _run(self) -> None:
        import torch

        loop = asyncio.get_running_loop()
        while True:
            items = await self._gather()
            if not items:
                continue
            try:
                batch = torch.stack([image for image, _ in items])
                probs = await loop.run_in_executor(self._executor, self.module.forward_probabilities, batch)
            except Exception as exc:  # a failed forward fails its requests, never the worker
                self.stats.failed_batches += 1
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.stats.record(len(items))
            for row, (_, fut) in enumerate(items):
                if not fut.done():
                    fut.set_result((probs[row], len(items)))

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=False)


def decode_image(data: bytes):
    """An RGB PIL image from uploaded bytes; a 400 ``RequestError`` saying why when it is not one."""
    from PIL import Image, UnidentifiedImageError

    from ._images import load_image

    if not data:
        raise RequestError(400, "the image is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise RequestError(413, f"the image is {width}x{height} pixels; at most {MAX_IMAGE_PIXELS:,} are accepted")
            img.load()
            return load_image(img)
    except UnidentifiedImageError:
        raise RequestError(400, "the upload is not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise RequestError(413, f"the image is too large to decode safely ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise RequestError(400, f"the image is corrupt or truncated ({exc})") from None


def _parse_top_k(value: Any, num_classes: int) -> int:
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


async def _read_request(request) -> tuple[bytes, Any]:
    """The image bytes and the raw ``top_k`` of a JSON or multipart prediction request."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            payload = json.loads(await request.body())
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
            form = await request.form()
        except _BodyTooLarge:
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


def describe_module(module: "Module") -> dict:
    """What ``GET /v1/modules`` says about a loaded module."""
    m = module.manifest
    return {"name": m.name, "version": m.version, "task": m.task, "num_labels": len(module.labels),
            "input_size": list(m.preprocessing.input_size), "device": str(module.device), "precision": module.precision}


def create_app(modules: "Module | Iterable[Module]", *, max_batch: int = DEFAULT_MAX_BATCH,
               max_wait_ms: float = DEFAULT_MAX_WAIT_MS, batching: bool = True,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> "FastAPI":
    """A FastAPI app serving predictions for ``modules`` (loaded :class:`~hubkit.Module` objects).

    ``batching=False`` runs every request as its own forward (``max_batch=1``).
    """
    try:
        from fastapi import FastAPI, Request
    except ModuleNotFoundError:
        raise ConfigError("serving needs FastAPI and uvicorn", hint="pip install 'hubkit[serving]'") from None
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from . import __version__

    loaded = [modules] if hasattr(modules, "forward_probabilities") else list(modules)
    if not loaded:
        raise ConfigError("serving needs at least one module")
    by_name = {m.name: m for m in loaded}
    if len(by_name) != len(loaded):
        raise ConfigError("each module can be served once; the names given repeat")
    if max_body_bytes < 1:
        raise ConfigError(f"max_body_bytes must be positive, not {max_body_bytes}")
    batchers = {name: MicroBatcher(m, max_batch=max_batch if batching else 1, max_wait_ms=max_wait_ms if batching else 0)
                for name, m in by_name.items()}

    @asynccontextmanager
    async def lifespan(_app):
        yield
        for batcher in batchers.values():
            await batcher.close()

    app = FastAPI(title="hubkit serving", version=__version__, lifespan=lifespan)
    app.state.batchers = batchers
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)

    @app.exception_handler(RequestError)
    async def _request_error(_request, exc: RequestError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _server_error(_request, exc: Exception):
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc: RequestValidationError):
        return JSONResponse({"error": f"invalid request: {exc.errors()}"}, status_code=422)

    def stats() -> dict:
        return {name: b.stats.to_dict() for name, b in batchers.items()}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "modules": sorted(by_name), "batching": batching, "max_batch": max_batch if batching else 1,
                "max_wait_ms": max_wait_ms if batching else 0, "stats": stats()}

    @app.get("/v1/stats")
    async def batch_stats() -> dict:
        return stats()

    @app.get("/v1/modules")
    async def list_loaded() -> dict:
        return {"modules": [describe_module(m) for m in by_name.values()]}

    @app.post("/v1/modules/{name}/predict")
    async def predict(name: str, request: Request) -> dict:
        module = by_name.get(name)
        if module is None:
            raise RequestError(404, f"no module named {name!r} is served here; loaded: {', '.join(sorted(by_name))}")
        data, raw_top_k = await _read_request(request)
        top_k = _parse_top_k(raw_top_k, len(module.labels))
        image = await asyncio.to_thread(lambda: module.transform(decode_image(data)))
        probs, batch_size = await batchers[name].submit(image)
        values, indices = probs.topk(top_k)
        return {"module": module.manifest.ref, "batch_size": batch_size,
                "top_k": [{"label": module.labels[int(i)], "index": int(i), "probability": round(float(v), 6)}
                          for v, i in zip(values, indices)]}

    return app


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now: for ``hub serving start --port`` (or torchrun's
    ``--master_port``) beside other servers, e.g. in deployment scripts and tests."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until_ready(base_url: str, *, timeout: float = 120.0, process=None) -> dict:
    """Poll ``GET /health`` until the server answers; returns its JSON.

    For scripts that start ``hub serving start`` and must wait for the model to load. Raises
    :class:`ServerNotReadyError` after ``timeout`` s, or at once when ``process`` (the server's
    ``subprocess.Popen``) exits first.
    """
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise ServerNotReadyError(f"the server exited with status {process.returncode} before answering "
                                      f"{base_url}/health", hint="read its error output (stderr)")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise ServerNotReadyError(f"{base_url} did not answer /health within {timeout:g} s",
                                          hint="check the server's output; a large model may need a longer timeout") from None
            time.sleep(0.2)


__all__ = ["free_port", "wait_until_ready", "create_app", "MicroBatcher", "BatchStats", "RequestError", "decode_image", "describe_module",
           "DEFAULT_MAX_BATCH", "DEFAULT_MAX_WAIT_MS", "DEFAULT_MAX_BODY_BYTES"]
