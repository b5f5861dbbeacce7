"""The model being fine-tuned: a backbone (optionally cut at a named layer) and a head.

``ClassifierModel`` is also what an exported module with a non-plain head (hidden layers,
a cut backbone) is rebuilt as: the manifest's ``architecture.head`` spec describes it and
:func:`build_exported` turns that spec back into the same module tree.
"""
from __future__ import annotations

from typing import Any, Mapping

import timm
import torch
from torch import nn

from ..errors import ConfigError, ManifestError
from .features import capture, global_average_pool
from .heads import make_head


class ClassifierModel(nn.Module):
    """``head(pool(backbone(x)))``; with ``cut_at`` the backbone stops after that submodule."""

    def __init__(self, backbone: nn.Module, head: nn.Module, cut_at: str | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.cut_at = cut_at

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature vector (at the cut layer when there is one)."""
        if self.cut_at is None:
            return self.backbone(x)
        with capture(self.backbone, {"cut": self.cut_at}, stop=True) as captured:
            self.backbone(x)
        return global_average_pool(captured["cut"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int = 0) -> None:
        """timm's interface: ``0`` leaves the pooled features as the output (what ``Module.context`` uses)."""
        if num_classes:
            raise ConfigError("an exported fine-tuned module can only drop its head (reset_classifier(0))")
        self.head = nn.Identity()


def cut_channels(backbone: nn.Module, cut_at: str, input_size: tuple[int, int, int]) -> int:
    """How wide the pooled feature at ``cut_at`` is (one forward pass of a blank image)."""
    probe = ClassifierModel(backbone, nn.Identity(), cut_at)
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        out = probe(torch.zeros(1, *input_size))
    backbone.train(was_training)
    return int(out.shape[1])


def build_exported(manifest: Any, spec: Any, num_classes: int | None = None) -> ClassifierModel:
    """Rebuild the model an exported manifest's ``architecture.head`` describes (random weights)."""
    path = getattr(manifest, "base", None)

    def fail(message: str) -> None:
        raise ManifestError(message, path=path, field="architecture.head")

    def build(spec: Any, classes: int) -> ClassifierModel:
        if not isinstance(spec, Mapping):
            fail("expected an object with 'head' and 'in_features'")
        unknown = set(spec) - {"head", "in_features", "cut_at", "base"}
        if unknown:
            fail(f"unknown keys {sorted(unknown)}")
        in_features = spec.get("in_features")
        if not isinstance(in_features, int) or isinstance(in_features, bool) or in_features < 1:
            fail("'in_features' must be a positive integer")
        cut_at = spec.get("cut_at")
        if cut_at is not None and not isinstance(cut_at, str):
            fail("'cut_at' must be a module path like 'blocks.2'")
        if spec.get("base") is not None:
            backbone = build(spec["base"], 0)
        else:
            backbone = timm.create_model(manifest.architecture, pretrained=False, num_classes=0,
                                         **dict(manifest.architecture_kwargs))
        if cut_at is not None:
            try:
                backbone.get_submodule(cut_at)
            except AttributeError:
                fail(f"'cut_at' names no submodule of {manifest.architecture}: {cut_at!r}")
        try:
            head = make_head(spec.get("head")).build(in_features, classes) if classes else nn.Identity()
        except ConfigError as exc:
            fail(exc.message)
        return ClassifierModel(backbone, head, cut_at)

    return build(spec, manifest.num_classes if num_classes is None else num_classes)
