"""hubkit: a model hub and transfer-learning toolkit for PyTorch, built on timm.

The hub functions (search, install, ...) and the errors import without torch; ``Module``,
the datasets and the fine-tuning API are loaded on first use, so ``hub search`` stays fast.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .api import clear_cache, download, install, list_modules, search, show, uninstall, verify_cache
from .errors import *  # noqa: F401,F403  (the exception hierarchy is public API)
from .errors import __all__ as _error_names

__version__ = "0.1.0"

#: public name -> submodule that defines it; imported on first attribute access
_LAZY = {
    "Module": "module",
    "ModuleContext": "module",
    "Prediction": "module",
    "Manifest": "manifest",
    "Cache": "_cache",
    "RunConfig": "finetune",
    "ImageClassifierTask": "finetune",
    "FinetuneResult": "finetune",
    "FeatureExtractionStrategy": "finetune",
    "FreezeFirstK": "finetune",
    "FullFineTune": "finetune",
    "FromScratch": "finetune",
    "ULMFiT": "finetune",
    "FCHead": "finetune",
    "GAPLinearHead": "finetune",
    "SVMHead": "finetune",
    "ImageFolder": "datasets",
    "ImageListDataset": "datasets",
    "CSVDataset": "datasets",
    "ArrayDataset": "datasets",
}

if TYPE_CHECKING:  # pragma: no cover
    from ._cache import Cache
    from .manifest import Manifest
    from .module import Module, ModuleContext, Prediction


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in ("datasets",):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'hubkit' has no attribute '{name}'")


__all__ = ["search", "install", "uninstall", "download", "list_modules", "show", "verify_cache", "clear_cache",
           *_LAZY, *_error_names]
