"""Export a fine-tuned model as a module folder: ``hub install DIR`` and ``Module`` accept it.

A plain linear head on the pooled feature (``gap_linear``, the SVM, an ``fc`` head without
hidden layers) becomes the timm model's own classifier, so the exported architecture is just
the backbone's timm name with the new class count. Other heads, and cut backbones, are
described in ``architecture.head`` (rebuilt by :func:`hubkit.models.classifier.build_exported`).
"""
from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import torch

from .. import constants
from ..errors import ConfigError
from ..hub.fs import atomic_write_json, follow_umask, fsync_dir, sha256_file
from ..hub.manifest import NAME_PATTERN, Manifest
from ..installer import local_manifest
from ..models.classifier import ClassifierModel
from ..models.factory import create_architecture
from ..models.heads import plain_linear
from ..models.weights import save_state_dict


def _module_name_for(directory: Path) -> str:
    name = re.sub(r"[^a-z0-9_.\-]+", "_", directory.resolve().name.lower()).strip("_.-") or "finetuned"
    return name if NAME_PATTERN.match(name) else f"m_{name}"[:100]


def exported_state(task) -> tuple[dict, dict[str, torch.Tensor]]:
    """The manifest ``architecture`` object and the state dict that goes with it."""
    model: ClassifierModel = task.model
    source = task.module.manifest
    source_head = source.raw.get("architecture", {}).get("head")
    linear = plain_linear(model.head)
    if linear is not None and model.cut_at is None and source_head is None:
        timm_model = create_architecture(source, num_classes=len(task.labels))
        classifier = timm_model.get_classifier()
        prefix = next(n for n, m in timm_model.named_modules() if m is classifier)
        state = {k: v for k, v in model.backbone.state_dict().items()}
        state[f"{prefix}.weight"], state[f"{prefix}.bias"] = linear.weight, linear.bias
        arch = {"timm_name": source.architecture, "kwargs": dict(source.architecture_kwargs)}
        return arch, {k: state[k] for k in timm_model.state_dict()}
    spec = {"head": task.strategy.head.spec(), "in_features": task.in_features}
    if model.cut_at is not None:
        spec["cut_at"] = model.cut_at
    if source_head is not None:
        spec["base"] = source_head
    if linear is not None:
        spec["head"] = {"kind": "gap_linear"}
        head_state = {"head.weight": linear.weight, "head.bias": linear.bias}
        state = {f"backbone.{k}": v for k, v in model.backbone.state_dict().items()}
        state.update(head_state)
    else:
        state = model.state_dict()
    arch = {"timm_name": source.architecture, "kwargs": dict(source.architecture_kwargs), "head": spec}
    return arch, dict(state)


def _features(task, nested: bool) -> dict:
    """The exported module's feature description: pooled width at the cut, taps up to the cut."""
    spec = task.features_spec
    taps = list(spec.taps)
    stride = spec.stride
    cut = task.model.cut_at
    if cut is not None:
        order = [n for n, _ in task.model.backbone.named_modules()]
        cut_index = order.index(cut)
        taps = [t for t in taps if t.module in order and order.index(t.module) <= cut_index]
        stride = next((t.stride for t in spec.taps if t.module == cut), taps[-1].stride if taps else stride)
    prefix = "backbone." if nested else ""
    return {"pooled": {"channels": task.in_features, "stride": stride},
            "taps": {t.name: {"module": prefix + t.module, "channels": t.channels, "stride": t.stride} for t in taps}}


def export_module(task, directory: str | Path, *, name: str | None = None, version: str = "1.0.0",
                  summary: str | None = None) -> Path:
    """Write ``module.json``, ``labels.txt`` and ``weights.safetensors`` into ``directory``.

    The folder is built beside the target and moved into place, so a failed export never
    leaves a half-written module; the result is checked by rebuilding it from its manifest."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise ConfigError(f"{directory} exists and is not empty", hint="export into a new folder")
    name = name or _module_name_for(directory)
    if not NAME_PATTERN.match(name):
        raise ConfigError(f"{name!r} is not a valid module name", hint="lower-case letters, digits, '_', '-', '.'")
    arch, state = exported_state(task)
    source = task.module.manifest
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    follow_umask(staging, directory=True)  # mkdtemp makes it 0700: an exported module is meant to be shared
    try:
        weights = staging / constants.WEIGHTS_FILENAME
        save_state_dict(state, weights, {"hubkit_module": f"{name}=={version}", "finetuned_from": source.ref})
        (staging / "labels.txt").write_text("\n".join(task.labels) + "\n", encoding="utf-8")
        manifest = local_manifest(
            source, sha256_file(weights), weights.stat().st_size, name=name, version=version,
            summary=summary or f"{source.name} fine-tuned on {len(task.labels)} classes ({task.strategy.name}, "
                               f"{task.strategy.head.kind} head)",
            task="image_classification", architecture=arch, num_classes=len(task.labels),
            preprocessing={**task.preprocessing.to_dict(), **({"tta": task.tta} if task.tta else {})}, features=_features(task, "head" in arch),
            tags=sorted({*source.tags, "finetuned"}),
            source={**{k: v for k, v in source.source.items()}, "finetuned_from": source.ref})
        atomic_write_json(staging / constants.MANIFEST_FILENAME, manifest)
        check = Manifest.from_file(staging / constants.MANIFEST_FILENAME)
        create_architecture(check).load_state_dict(state, strict=True)
        if directory.exists():
            directory.rmdir()
        staging.rename(directory)
        fsync_dir(directory.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory
