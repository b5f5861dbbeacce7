"""Serving modules over HTTP: the app, its micro-batcher, request handling, and client helpers.

FastAPI is imported only by :func:`create_app`, so ``free_port`` and ``wait_until_ready`` work
without the serving extra installed.
"""
from __future__ import annotations

import importlib

from .client import free_port, wait_until_ready
from .limits import DEFAULT_MAX_BATCH, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_WAIT_MS

_LAZY = {"create_app": "app", "module_summary": "app", "MicroBatcher": "batcher", "BatchStats": "batcher",
         "RequestError": "http", "check_upload": "http", "preprocess_upload": "http"}


def __getattr__(name: str):
    # torch and FastAPI load only when the app is built, not for the client helpers
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hubkit.serving' has no attribute '{name}'")


__all__ = ["free_port", "wait_until_ready", *_LAZY, "DEFAULT_MAX_BATCH", "DEFAULT_MAX_WAIT_MS", "DEFAULT_MAX_BODY_BYTES"]
