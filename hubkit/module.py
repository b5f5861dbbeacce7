"""``Module``: an installed model you can predict with or build on.

``Module(name="efficientnet_lite0")`` installs on demand, verifies the installed weights,
and builds the timm architecture lazily. ``predict`` runs batched inference on the fast
path for the machine; ``context`` exposes the backbone and its feature map for transfer
learning.
"""
from __future__ import annotations

import functools
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import api
from ._cache import Cache, InstalledModule
from ._images import expand_inputs, load_image
from ._optimize import fold_batchnorm_for_input
from ._runtime import autocast, resolve_device, resolve_precision, use_channels_last
from .errors import ConfigError, HubkitError
from .manifest import FeatureSpec, Manifest, Preprocessing


def create_architecture(manifest: Manifest, num_classes: int | None = None) -> nn.Module:
    """The timm model a manifest names, randomly initialised (no network access).

    A fine-tuned module exported with a head other than one linear layer (or a cut backbone)
    describes it in ``architecture.head``; hubkit.finetune rebuilds that model.
    """
    import timm

    head = manifest.raw.get("architecture", {}).get("head") if isinstance(manifest.raw, dict) else None
    if head is not None:
        from .finetune.model import build_exported

        return build_exported(manifest, head, num_classes)
    kwargs = dict(manifest.architecture_kwargs)
    kwargs["num_classes"] = manifest.num_classes if num_classes is None else num_classes
    return timm.create_model(manifest.architecture, pretrained=False, **kwargs)


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


def build_transform(pre: Preprocessing, *, training: bool = False, augment: dict | None = None):
    """timm's eval (or training) transform for a module's preprocessing."""
    from timm.data import create_transform

    kwargs = dict(input_size=tuple(pre.input_size), interpolation=pre.interpolation, mean=tuple(pre.mean),
                  std=tuple(pre.std), crop_pct=pre.crop_pct)
    if training:
        kwargs.update(is_training=True, **(augment or {}))
    return create_transform(**kwargs)


@dataclass(frozen=True)
class ClassScore:
    label: str
    index: int
    probability: float


@dataclass
class Prediction:
    """The top-k classes for one input, or the reason it could not be read."""

    source: str
    top_k: list[ClassScore] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        return {"source": self.source, "error": self.error,
                "top_k": [{"label": c.label, "index": c.index, "probability": round(c.probability, 6)} for c in self.top_k]}


@dataclass
class ModuleContext:
    """The backbone of a module for transfer learning, with its feature map description.

    ``backbone(x)`` returns the pooled feature vector (``features.pooled_channels`` wide);
    ``extract(x, taps)`` also returns the named intermediate feature maps.
    """

    backbone: nn.Module
    features: FeatureSpec
    preprocessing: Preprocessing
    labels: list[str]
    manifest: Manifest

    def extract(self, x: torch.Tensor, taps: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        names = [t.name for t in self.features.taps] if taps is None else list(taps)
        captured: dict[str, torch.Tensor] = {}
        handles = []
        for name in names:
            tap = self.features.tap(name)
            sub = self.backbone.get_submodule(tap.module)
            handles.append(sub.register_forward_hook(lambda _m, _i, out, n=name: captured.__setitem__(n, out)))
        try:
            captured["pooled"] = self.backbone(x)
        finally:
            for h in handles:
                h.remove()
        return captured


@dataclass(frozen=True)
class PixelPipeline:
    """A timm eval transform split in two: the PIL steps (decode-side, per image, in threads)
    and ToTensor+Normalize, applied to a whole uint8 batch at once.

    Per-image tensor ops are slow on a few cores (each one starts the intra-op thread
    team); one op over the batch is not. The result equals the per-image transform.
    """

    pil_steps: tuple
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def split(cls, transform) -> "PixelPipeline | None":
        """The split of a ``Compose([...PIL steps, ToTensor, Normalize])``, else None."""
        from torchvision import transforms as T

        steps = list(getattr(transform, "transforms", ()))
        if len(steps) < 2 or not isinstance(steps[-1], T.Normalize) or type(steps[-2]).__name__ not in ("ToTensor",
                                                                                                       "MaybeToTensor"):
            return None
        pil_steps = steps[:-2]
        if not all(isinstance(s, (T.Resize, T.CenterCrop)) for s in pil_steps):
            return None
        norm = steps[-1]
        as_column = lambda v: torch.as_tensor(v, dtype=torch.float32).reshape(1, -1, 1, 1)  # noqa: E731
        return cls(tuple(pil_steps), as_column(norm.mean), as_column(norm.std))

    def normalise(self, images: list, *, channels_last: bool) -> torch.Tensor:
        """A float32 NCHW batch from HxWx3 uint8 arrays, as ToTensor+Normalize would make it."""
        import numpy as np

        batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # a channels_last view, no copy
        batch = batch.float().div_(255).sub_(self.mean).div_(self.std)
        return batch.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


class Module:
    """A hub module, installed on demand.

    >>> m = Module(name="efficientnet_lite0")
    >>> m.predict(["cat.jpg"], top_k=3)[0].top_k[0].label

    ``device`` and ``precision`` default to the fastest the machine has (``"auto"``);
    ``optimize=False`` keeps the inference model exactly as timm builds it (no BatchNorm folding)
    and decodes every JPEG at full size (no reduced-scale decoding of large photos).
    """

    def __init__(self, name: str | None = None, version: str | None = None, *, directory: str | Path | None = None,
                 device: str | None = None, precision: str = "auto", optimize: bool = True, cache: Cache | None = None):
        if (name is None) == (directory is None):
            raise ConfigError("give a module name or a module directory, not both or neither")
        self.cache = cache or Cache()
        if directory is not None:
            self.installed: InstalledModule = api.install(str(directory), cache=self.cache)
        else:
            self.installed = api.ensure_installed(name, version, cache=self.cache)
        self.cache.check(self.installed)
        self.manifest: Manifest = self.installed.manifest
        self.labels: list[str] = self._read_labels()
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.optimize = optimize
        self._model: nn.Module | None = None
        self._transform = None

    def __repr__(self) -> str:
        return f"Module({self.manifest.ref}, device={self.device}, precision={self.precision})"

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def _read_labels(self) -> list[str]:
        if self.manifest.labels is None and self.manifest.labels_file is None:
            return [str(i) for i in range(self.manifest.num_classes)]
        return api.read_labels(self.manifest)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The installed weights (verified at construction)."""
        from safetensors.torch import load_file

        return load_file(str(self.installed.weights_path))

    def create_model(self, pretrained: bool = True) -> nn.Module:
        """A new timm model with this module's weights (or random ones), on the CPU, in eval mode."""
        model = build_model(self.manifest, self.state_dict()) if pretrained else create_architecture(self.manifest)
        return model.eval()

    @property
    def model(self) -> nn.Module:
        """The classifier on its device, prepared for fast inference (built once).

        With ``optimize`` (the default) BatchNorms are folded into their convolutions, which is
        checked to keep the outputs; the model is then for inference only (``create_model`` gives
        one to train).
        """
        if self._model is None:
            model = self.create_model().to(self.device)
            if self.optimize:  # feature taps keep their outputs: hooks on them (advise, serving) see the same
                fold_batchnorm_for_input(model, self.manifest.preprocessing.input_size, self.device,
                                         keep={tap.module for tap in self.manifest.features.taps})
            if use_channels_last(self.device, self.precision):
                model = model.to(memory_format=torch.channels_last)
            self._model = model
        return self._model

    @property
    def transform(self):
        if self._transform is None:
            self._transform = build_transform(self.manifest.preprocessing)
        return self._transform

    def _prepare(self, item: Any):
        """Decode, resize and crop one input in a worker thread: an HxWx3 uint8 array (or the
        normalised tensor when the transform cannot be split), or the HubkitError it raised."""
        try:
            image = load_image(item, draft_size=self._draft_size)
        except HubkitError as exc:
            return exc
        pixels = self._pixel_pipeline
        if pixels is None:
            return self.transform(image)
        import numpy as np

        for step in pixels.pil_steps:
            image = step(image)
        return np.asarray(image, dtype=np.uint8)

    @functools.cached_property
    def _draft_size(self) -> int | None:
        """With ``optimize``: JPEGs decode at reduced scale while both sides stay >= twice the
        resize target (e.g. 2 x 256 for 224 px at crop 0.875), so the bicubic resize that follows
        still sees at least twice its output resolution."""
        if not self.optimize:
            return None
        pre = self.manifest.preprocessing
        return 2 * math.ceil(max(pre.input_size[1:]) / pre.crop_pct)

    @functools.cached_property
    def _pixel_pipeline(self) -> "PixelPipeline | None":
        return PixelPipeline.split(self.transform)

    def _batch(self, prepared: list) -> torch.Tensor:
        """One input batch: uint8 images are normalised together (one tensor op for the batch,
        in the model's memory format) instead of image by image."""
        pixels = self._pixel_pipeline
        if pixels is None:
            return torch.stack(prepared)
        return pixels.normalise(prepared, channels_last=use_channels_last(self.device, self.precision))

    def predict(self, inputs: Any, *, top_k: int = 5, batch_size: int = 32, errors: str = "raise") -> list[Prediction]:
        """Top-k labels with probabilities for images (paths, folders, PIL images or arrays).

        ``errors="raise"`` stops at the first unreadable input; ``"collect"`` reports it in
        its ``Prediction.error`` and predicts the rest. Images are decoded and resized in
        threads (PIL releases the GIL) while the previous batch runs through the model.
        """
        _ = self._pixel_pipeline  # imports timm here: two threads importing it at once trip its circular imports
        return predict_batches(inputs, prepare=self._prepare, collate=self._batch, forward=self.forward_probabilities,
                               labels=self.labels, top_k=top_k, batch_size=batch_size, errors=errors,
                               on_first_batch=lambda: self.model)

    def forward_probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax class probabilities (float32, on the CPU) for a preprocessed batch."""
        batch = batch.to(self.device, non_blocking=True)
        if use_channels_last(self.device, self.precision):
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.precision):
            logits = self.model(batch)
        return logits.float().softmax(dim=1).cpu()

    def context(self, trainable: bool = True, pretrained: bool = True) -> ModuleContext:
        """The backbone (classifier removed) and its feature map, for transfer learning."""
        backbone = self.create_model(pretrained=pretrained)
        backbone.reset_classifier(0)
        backbone.requires_grad_(trainable)
        backbone.train(trainable)
        return ModuleContext(backbone, self.manifest.features, self.manifest.preprocessing, self.labels, self.manifest)


def predict_batches(inputs: Any, *, prepare: Callable[[Any], Any], collate: Callable[[list], torch.Tensor],
                    forward: Callable[[torch.Tensor], torch.Tensor], labels: list[str], top_k: int, batch_size: int,
                    errors: str = "raise", on_first_batch: Callable[[], Any] | None = None) -> list[Prediction]:
    """The batched prediction loop shared by ``Module.predict`` and fine-tuned tasks.

    ``prepare`` turns one input into what ``collate`` batches (or returns the HubkitError it
    raised); it runs in threads, the next batch decoding while ``forward`` (a batch to class
    probabilities) runs the current one. ``on_first_batch`` runs while the first batch decodes.
    """
    if errors not in ("raise", "collect"):
        raise ConfigError(f"errors must be 'raise' or 'collect', not {errors!r}")
    if batch_size < 1 or top_k < 1:
        raise ConfigError("batch_size and top_k must be at least 1")
    items = expand_inputs(inputs)
    names = [str(i) if isinstance(i, (str, Path)) else f"<{type(i).__name__} #{n}>" for n, i in enumerate(items)]
    results = [Prediction(name) for name in names]
    if not items:
        return results
    k = min(top_k, len(labels))
    chunks = [range(start, min(start + batch_size, len(items))) for start in range(0, len(items), batch_size)]
    workers = max(1, min(len(items), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="hubkit-decode") as pool:
        submit = lambda chunk: [pool.submit(prepare, items[i]) for i in chunk]  # noqa: E731
        pending: list[Future] = submit(chunks[0])
        if on_first_batch is not None:
            on_first_batch()
        for n, chunk in enumerate(chunks):
            prepared = [f.result() for f in pending]
            if n + 1 < len(chunks):
                pending = submit(chunks[n + 1])
            kept = []
            for idx, value in zip(chunk, prepared):
                if isinstance(value, HubkitError):
                    if errors == "raise":
                        for f in pending:
                            f.cancel()
                        raise value
                    results[idx].error = value.message
                else:
                    kept.append(idx)
            if not kept:
                continue
            probs = forward(collate([v for v in prepared if not isinstance(v, HubkitError)]))
            values, indices = probs.topk(k, dim=1)
            for row, idx in enumerate(kept):
                results[idx].top_k = [ClassScore(labels[int(i)], int(i), float(v))
                                      for v, i in zip(values[row].tolist(), indices[row].tolist())]
    return results
