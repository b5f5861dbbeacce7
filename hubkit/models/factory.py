"""Building the timm model a manifest describes: the architecture, its empty state, the loaded model.

A fine-tuned module exported with a head other than one linear layer (or a cut backbone)
describes it in ``architecture.head``; :func:`hubkit.models.classifier.build_exported` rebuilds it.
"""
from __future__ import annotations

import timm
import torch
from torch import nn

from ..errors import ManifestError
from ..hub.manifest import Manifest
from .classifier import build_exported


def check_architecture(manifest: Manifest) -> None:
    """Raise ``ManifestError`` when the installed timm does not know the architecture (or pretrained tag)
    a manifest names: a catalogue made with a newer timm can name models an older one lacks."""
    name = manifest.architecture
    arch, _, tag = name.partition(".")
    if timm.is_model(arch) and (not tag or name in timm.list_pretrained(f"{arch}.*")):
        return
    what = f"architecture '{arch}'" if not timm.is_model(arch) else f"pretrained tag '{name}'"
    raise ManifestError(f"the installed timm {timm.__version__} has no {what}", path=manifest.base or None,
                        field="architecture.timm_name",
                        hint=f"upgrade timm (pip install -U timm) to use {manifest.name}, or pick another module with hub search")


def create_architecture(manifest: Manifest, num_classes: int | None = None) -> nn.Module:
    """The timm model a manifest names, randomly initialised (no network access).

    A fine-tuned module exported with a head other than one linear layer (or a cut backbone)
    describes it in ``architecture.head``; hubkit.finetune rebuilds that model.
    """
    head = manifest.raw.get("architecture", {}).get("head") if isinstance(manifest.raw, dict) else None
    if head is not None:
        return build_exported(manifest, head, num_classes)
    check_architecture(manifest)
    kwargs = dict(manifest.architecture_kwargs)
    kwargs["num_classes"] = manifest.num_classes if num_classes is None else num_classes
    try:
        return timm.create_model(manifest.architecture, pretrained=False, **kwargs)
    except (TypeError, ValueError, KeyError, AssertionError) as exc:  # an argument this architecture does not take
        raise ManifestError(f"timm cannot build '{manifest.architecture}' with {kwargs}: {type(exc).__name__}: "
                            f"{str(exc)[:200]}", path=manifest.base or None, field="architecture.kwargs") from None


def empty_model_state(manifest: Manifest) -> dict[str, torch.Tensor]:
    """The model's state dict with shapes only (meta tensors): the target of a key mapping."""
    with torch.device("meta"):
        return create_architecture(manifest).state_dict()


def build_model(manifest: Manifest, state: dict[str, torch.Tensor]) -> nn.Module:
    """The timm model with ``state`` loaded, built without random initialisation.

    Built on the meta device and given the loaded tensors directly (no init, no second
    copy of the weights); an architecture that keeps state outside its state dict (buffers
    computed at construction) or reads tensor values while it is built is built the ordinary
    way instead.
    """
    try:
        with torch.device("meta"):
            model = create_architecture(manifest)
        model.load_state_dict(state, assign=True)
    except (RuntimeError, NotImplementedError):  # e.g. ``.item()`` on a meta tensor in a constructor
        model = None
    if model is None or any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = create_architecture(manifest)
        model.load_state_dict(state)
    return model
