"""An HTTP prediction server for installed modules: ``create_app(modules)`` returns a FastAPI app.

``hub serving start`` runs it with uvicorn. Requests for one module are gathered by a
:class:`~hubkit.serving.batcher.MicroBatcher`; every bad request gets a 4xx JSON answer
``{"error": "..."}``.
"""
# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) at runtime.
import asyncio
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Iterable

from .. import __version__
from ..errors import ConfigError
from ..inference.predict import top_k_scores
from .batcher import MicroBatcher
from .http import BodyLimitMiddleware, RequestError, parse_top_k, preprocess_upload, read_request
from .limits import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_WAIT_MS
from .page import PAGE

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

    from ..inference.module import Module


def module_summary(module: "Module") -> dict:
    """What ``GET /v1/modules`` says about a loaded module."""
    m = module.manifest
    return {"name": m.name, "version": m.version, "task": m.task, "num_labels": len(module.labels),
            "input_size": list(m.preprocessing.input_size), "device": str(module.device), "precision": module.precision}


def _by_name(modules: "Module | Iterable[Module]") -> "dict[str, Module]":
    """The modules to serve by name: at least one, each name once."""
    loaded = [modules] if hasattr(modules, "forward_probabilities") else list(modules)
    if not loaded:
        raise ConfigError("serving needs at least one module")
    by_name = {m.name: m for m in loaded}
    if len(by_name) != len(loaded):
        raise ConfigError("each module can be served once; the names given repeat")
    return by_name


def _answer_errors_as_json(app: "FastAPI") -> None:
    """Every error becomes ``{"error": "..."}`` with its status: a client's 4xx, a bug's 500."""
    from fastapi.exceptions import RequestValidationError  # noqa: PLC0415 (the optional `serving` extra)
    from fastapi.responses import JSONResponse  # noqa: PLC0415
    from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: PLC0415

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


def create_app(modules: "Module | Iterable[Module]", *, max_batch: int = DEFAULT_MAX_BATCH,
               max_wait_ms: float = DEFAULT_MAX_WAIT_MS, batching: bool = True,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> "FastAPI":
    """A FastAPI app serving predictions for ``modules`` (loaded :class:`~hubkit.Module` objects).

    ``batching=False`` runs every request as its own forward (``max_batch=1``). A little over 60
    lines because FastAPI routes are declared inside: each closes over the served modules and their
    batchers; the request handling itself lives in :mod:`hubkit.serving.http`.
    """
    # FastAPI is the optional `serving` extra: imported here so that the rest of hubkit.serving works without it
    try:
        from fastapi import FastAPI, Request  # noqa: PLC0415
        from fastapi.responses import HTMLResponse  # noqa: PLC0415
    except ModuleNotFoundError:
        raise ConfigError("serving needs FastAPI and uvicorn", hint="pip install 'hubkit[serving]'") from None

    by_name = _by_name(modules)
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
    _answer_errors_as_json(app)

    def stats() -> dict:
        return {name: b.stats.to_dict() for name, b in batchers.items()}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "modules": sorted(by_name), "batching": batching, "max_batch": max_batch if batching else 1,
                "max_wait_ms": max_wait_ms if batching else 0, "stats": stats()}

    @app.get("/v1/stats")
    async def batch_stats() -> dict:
        return stats()

    @app.get("/v1/modules")
    async def list_loaded() -> dict:
        return {"modules": [module_summary(m) for m in by_name.values()]}

    @app.post("/v1/modules/{name}/predict")
    async def predict(name: str, request: Request) -> dict:
        module = by_name.get(name)
        if module is None:
            raise RequestError(404, f"no module named {name!r} is served here; loaded: {', '.join(sorted(by_name))}")
        data, raw_top_k = await read_request(request)
        top_k = parse_top_k(raw_top_k, len(module.labels))
        image = await asyncio.to_thread(preprocess_upload, module, data)
        probs, batch_size = await batchers[name].submit(image)
        scores = top_k_scores(probs.unsqueeze(0), module.labels, top_k)[0]
        return {"module": module.manifest.ref, "batch_size": batch_size, "top_k": [c.to_dict() for c in scores]}

    return app
