"""Intermediate features of a model: one way to capture named submodules' outputs, one pooling.

``capture`` hooks submodules by path while the caller runs the forward pass however it likes
(autocast, another device, a wrapper). With ``stop=True`` the forward ends as soon as every
tap has fired, so the layers after the last tap never run (a backbone cut at a layer).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Union

import torch
from torch import nn

#: A submodule of the model: its path (``"blocks.2"``) or the module object.
Where = Union[str, nn.Module]


class _TapsComplete(Exception):
    """Raised by the last tap's hook to end the forward pass there (caught by ``capture``)."""


@contextlib.contextmanager
def capture(model: nn.Module, outputs: Mapping[str, Where], *, inputs: Mapping[str, Where] | None = None,
            stop: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """While the block runs, store what the named submodules of ``model`` produce.

    ``outputs`` maps a name to a submodule (its path, like ``"blocks.2"``, or the module itself)
    whose output is stored under that name; ``inputs`` likewise for a submodule's first positional input (the classifier's
    input is the pooled feature vector). A submodule called twice keeps its last value. With
    ``stop`` the forward pass ends once every tap has fired: the rest of the block is skipped.
    """
    captured: dict[str, torch.Tensor] = {}
    expected = len(outputs) + len(inputs or {})

    def store(name: str, value: torch.Tensor) -> None:
        captured[name] = value
        if stop and len(captured) == expected:
            raise _TapsComplete

    def submodule(where: Where) -> nn.Module:
        return model.get_submodule(where) if isinstance(where, str) else where

    handles = [submodule(where).register_forward_hook(lambda _m, _i, out, n=name: store(n, out))
               for name, where in outputs.items()]
    handles += [submodule(where).register_forward_pre_hook(lambda _m, args, n=name: store(n, args[0]))
                for name, where in (inputs or {}).items()]
    try:
        yield captured
    except _TapsComplete:
        pass
    finally:
        for handle in handles:
            handle.remove()


def global_average_pool(features: torch.Tensor) -> torch.Tensor:
    """(N, C) from a feature map: (N, C, H, W) for convolutional layers, (N, tokens, C) for
    transformer ones; an (N, C) vector is returned as it is."""
    if features.ndim == 4:
        return features.mean(dim=(2, 3))
    if features.ndim == 3:
        return features.mean(dim=1)
    return features
