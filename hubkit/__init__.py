"""hubkit: a model hub and transfer-learning toolkit for PyTorch, built on timm.

The errors import at once; everything else (the torch-free hub functions: search, show, list,
uninstall, cache housekeeping; what needs torch: ``install``, ``Module``, the datasets, the
fine-tuning API; every subpackage) loads on first attribute access, so that ``import hubkit``
costs next to nothing and ``hub search`` or ``hub --help`` load only what they use.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import *  # noqa: F403  (the exception hierarchy is public API)
from .errors import __all__ as _error_names

__version__ = "0.1.0"

#: public name -> submodule that defines it; imported on first attribute access (keeps torch out of `hub search`)
_LAZY = {
    "search": "hub.operations",
    "show": "hub.operations",
    "list_modules": "hub.operations",
    "uninstall": "hub.operations",
    "verify_cache": "hub.operations",
    "clear_cache": "hub.operations",
    "install": "installer",
    "download": "installer",
    "Module": "inference.module",
    "ModuleContext": "inference.module",
    "Prediction": "inference.predict",
    "Manifest": "hub.manifest",
    "Cache": "hub.cache",
    "RunConfig": "finetune",
    "ImageClassifierTask": "finetune",
    "FinetuneResult": "finetune",
    "FeatureExtractionStrategy": "finetune",
    "FreezeFirstK": "finetune",
    "FullFineTune": "finetune",
    "FromScratch": "finetune",
    "ULMFiT": "finetune",
    "LPFT": "finetune",
    "FCHead": "finetune",
    "GAPLinearHead": "finetune",
    "SVMHead": "finetune",
    "LogisticHead": "finetune",
    "auto_finetune": "finetune",
    "rank_backbones": "finetune",
    "ImageFolder": "data.datasets",
    "ImageListDataset": "data.datasets",
    "CSVDataset": "data.datasets",
    "ArrayDataset": "data.datasets",
}

#: subpackages reachable as attributes (``hubkit.finetune.make_strategy``); ``datasets`` is the README's name
_SUBMODULES = {"hub": "hub", "models": "models", "data": "data", "inference": "inference", "finetune": "finetune",
               "serving": "serving", "cli": "cli", "fleet": "fleet", "datasets": "data.datasets"}

if TYPE_CHECKING:  # pragma: no cover
    from .hub.cache import Cache as Cache
    from .hub.manifest import Manifest as Manifest
    from .hub.operations import clear_cache as clear_cache
    from .hub.operations import list_modules as list_modules
    from .hub.operations import search as search
    from .hub.operations import show as show
    from .hub.operations import uninstall as uninstall
    from .hub.operations import verify_cache as verify_cache
    from .inference.module import Module as Module
    from .inference.module import ModuleContext as ModuleContext
    from .inference.predict import Prediction as Prediction
    from .installer import download as download
    from .installer import install as install


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{_SUBMODULES[name]}", __name__)
    else:
        raise AttributeError(f"module 'hubkit' has no attribute '{name}'")
    globals()[name] = value
    return value


__all__ = [*_LAZY, *_error_names]
