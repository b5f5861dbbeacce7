"""``Module``: an installed model you can predict with or build on.

``Module(name="efficientnet_lite0")`` installs on demand, verifies the installed weights,
and builds the timm architecture lazily. ``predict`` runs batched inference on the fast
path for the machine (on a CPU a compiled runtime, converted once and kept in the snapshot);
``context`` exposes the backbone and its feature map for transfer learning.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from ..data.images import load_image
from ..data.transforms import PixelPipeline, build_transform
from ..errors import ConfigError, ConversionError, HubkitError, IntegrityError, NotInstalledError
from ..hub.cache import Cache, InstalledModule
from ..hub.labels import class_names
from ..hub.manifest import FeatureSpec, Manifest, Preprocessing
from ..installer import ensure_installed, install
from ..models.device import autocast, resolve_device, resolve_precision, use_channels_last
from ..models.factory import build_model, create_architecture
from ..models.features import capture
from ..models.optimize import fold_batchnorm_for_input
from ..models.weights import load_state_dict
from . import compiled as compiled_runtime
from .compiled import CompiledModel, CompiledModule, ImagePreprocessor, normalise_pixels
from .predict import Prediction, iter_prediction_batches, mirror_averaged
from .runtime import EXPORT_FORMATS, Parity, ensure_artefact, ensure_feature_model, export_files, parity, parity_images

log = logging.getLogger("hubkit")


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
        with capture(self.backbone, {name: self.features.tap(name).module for name in names}) as captured:
            pooled = self.backbone(x)
        return {**captured, "pooled": pooled}


class Module:
    """A hub module, installed on demand.

    >>> m = Module(name="efficientnet_lite0")
    >>> m.predict(["cat.jpg"], top_k=3)[0].top_k[0].label

    ``device``, ``precision`` and ``runtime`` default to the fastest the machine has (``"auto"``):
    on a CPU a compiled runtime (``"openvino"`` or ``"onnxruntime"``; the model is converted at first
    use and the artefact kept, hashed, in the snapshot), ``"torch"`` on CUDA, for training and for an
    architecture that does not convert (with a one-line notice). ``optimize=False`` keeps the torch
    model exactly as timm builds it (no BatchNorm folding) and decodes every JPEG at full size.
    """

    def __init__(self, name: str | None = None, version: str | None = None, *, directory: str | Path | None = None,
                 device: str | None = None, precision: str = "auto", optimize: bool = True, cache: Cache | None = None,
                 runtime: str = "auto"):
        if (name is None) == (directory is None):
            raise ConfigError("give a module name or a module directory, not both or neither")
        self.cache = cache or Cache()
        if directory is not None:
            self.installed: InstalledModule = install(str(directory), cache=self.cache)
        else:
            self.installed = ensure_installed(name, version, cache=self.cache)
        self.cache.check(self.installed)
        self.manifest: Manifest = self.installed.manifest
        self.labels: list[str] = class_names(self.manifest)
        self.device = resolve_device(device)
        self.optimize = optimize
        self._model: nn.Module | None = None
        self._transform = None
        self._pixels: PixelPipeline | None = None
        self._compiled: CompiledModule | None = None
        self._select_runtime(runtime, precision)

    def __repr__(self) -> str:
        return f"Module({self.manifest.ref}, device={self.device}, precision={self.precision}, runtime={self.runtime})"

    def _select_runtime(self, runtime: str, precision: str) -> None:
        """Set ``runtime`` and ``precision``; ``auto`` takes torch where the compiled runtime cannot
        preprocess this module exactly as timm does (a non-square input), a named runtime refuses it."""
        self._precision_asked = precision
        self.runtime = compiled_runtime.resolve_runtime(runtime, self.device.type)
        if self.runtime != "torch":
            try:
                ImagePreprocessor.for_preprocessing(self.manifest.preprocessing)
                self.precision = compiled_runtime.resolve_precision(precision, self.runtime)
                return
            except ConfigError as exc:
                if runtime != "auto":
                    raise
                log.warning("hubkit: %s; running with torch", exc.message)
                self.runtime = "torch"
        self.precision = resolve_precision(precision, self.device)

    @property
    def compiled(self) -> CompiledModule | None:
        """The module on its compiled runtime (None with ``runtime="torch"``), loaded once.

        The artefact is made at first use and kept in the snapshot; a damaged one is rebuilt, and a
        model that does not convert runs with torch from then on: each with a one-line notice.
        """
        if self._compiled is None and self.runtime != "torch":
            try:
                self._compiled = self._open_compiled()
            except ConversionError as exc:
                log.warning("hubkit: %s does not convert for %s (%s); running with torch", self.manifest.ref,
                            self.runtime, exc.message)
                self.runtime, self.precision = "torch", resolve_precision(self._precision_asked, self.device)
        return self._compiled

    def _open_compiled(self) -> CompiledModule:
        try:
            return CompiledModule(self.installed, self.runtime, self.precision, optimize=self.optimize, cache=self.cache)
        except NotInstalledError:
            pass  # first use: convert below
        except IntegrityError as exc:
            if self.runtime in self.manifest.compiled:  # shipped (int8): converting the weights would not give it back
                raise IntegrityError(f"{exc.message}; it came with the module and cannot be rebuilt",
                                     hint="install the module folder again (hub install FOLDER --force), or use "
                                          "--runtime torch") from None
            log.warning("hubkit: %s; rebuilding it", exc.message)
        self.installed = ensure_artefact(self.installed, self.runtime, self.create_model, self.cache)
        return CompiledModule(self.installed, self.runtime, self.precision, optimize=self.optimize, cache=self.cache)

    def load(self) -> None:
        """Load (and at first use convert) the model of the module's runtime now, not on the first request."""
        if self.compiled is None:
            _ = self.model

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The installed weights (verified at construction)."""
        return dict(load_state_dict(self.installed.weights_path))

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
        """The eval transform (PIL image -> normalised tensor): timm's for the module's preprocessing.

        Assign another callable to preprocess differently; ``predict`` and ``preprocess`` use it.
        timm's own is split into per-image PIL steps and one batched normalisation
        (:class:`~hubkit.data.transforms.PixelPipeline`); any other runs image by image.
        """
        if self._transform is None:
            self.transform = build_transform(self.manifest.preprocessing)
        return self._transform

    @transform.setter
    def transform(self, transform) -> None:
        self._pixels = PixelPipeline.split(transform)  # first: a decoding thread that sees the transform sees its split
        self._transform = transform

    def preprocess(self, item: Any) -> torch.Tensor:
        """One input as the model sees it: a normalised (C, H, W) float32 tensor.

        ``item`` is what ``predict`` takes (a path, a PIL image, an array) or the bytes of an
        encoded image file; it is decoded and transformed exactly as ``predict`` does, large
        JPEGs at reduced scale included. Raises :class:`~hubkit.errors.ImageError` for an
        unreadable image.
        """
        prepared = self._prepare(item)
        if isinstance(prepared, HubkitError):
            raise prepared
        return self._collate([prepared], channels_last=False)[0]

    def _prepare(self, item: Any):
        """Decode, resize and crop one input in a worker thread: an HxWx3 uint8 array (or the
        normalised tensor when the transform cannot be split), or the HubkitError it raised."""
        transform = self.transform
        pixels = self._pixels
        try:
            image = load_image(item, draft_size=self._draft_size)
        except HubkitError as exc:
            return exc
        if pixels is None:
            return transform(image)
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

    def _collate(self, prepared: list, *, channels_last: bool) -> torch.Tensor:
        """One input batch from what ``_prepare`` made: uint8 images are normalised together
        (one tensor op for the batch) instead of image by image; in numpy for a compiled runtime
        (serving collates one image per request, and a torch op starts its thread team each time)."""
        if self._pixels is None:
            return torch.stack(prepared)
        if self.runtime != "torch":
            return torch.from_numpy(normalise_pixels(prepared, self._pixels.mean.numpy(), self._pixels.std.numpy()))
        return self._pixels.normalise(prepared, channels_last=channels_last)

    def predict(self, inputs: Any, *, top_k: int = 5, batch_size: int = 32, errors: str = "raise") -> list[Prediction]:
        """Top-k labels with probabilities for images (paths, folders, PIL images or arrays).

        ``errors="raise"`` stops at the first unreadable input; ``"collect"`` reports it in
        its ``Prediction.error`` and predicts the rest. Images are decoded and resized in
        threads (PIL releases the GIL) while the previous batch runs through the model.
        """
        return [p for batch in self.iter_predict(inputs, top_k=top_k, batch_size=batch_size, errors=errors) for p in batch]

    def iter_predict(self, inputs: Any, *, top_k: int = 5, batch_size: int = 32,
                     errors: str = "raise") -> Iterator[list[Prediction]]:
        """``predict`` batch by batch, each batch's predictions as soon as they are done (memory stays flat)."""
        if self.manifest.task != "image_classification":
            raise ConfigError(f"{self.manifest.ref} is a feature extractor: it has no classifier with named classes "
                              "to predict", hint="use Module.context() for its features, or fine-tune a classifier on it")
        channels_last = use_channels_last(self.device, self.precision)
        return iter_prediction_batches(inputs, prepare=self._prepare, forward=self.forward_probabilities,
                                       collate=lambda prepared: self._collate(prepared, channels_last=channels_last),
                                       labels=self.labels, top_k=top_k, batch_size=batch_size, errors=errors,
                                       on_first_batch=self.load)

    def forward_probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Softmax class probabilities (float32, on the CPU) for a preprocessed batch; averaged with its
        mirror image's when the module declares the flip test-time augmentation (``preprocessing.tta``)."""
        if self.manifest.preprocessing.tta == "flip":
            return mirror_averaged(self._probabilities, lambda b: b.flip(-1))(batch)
        return self._probabilities(batch)

    def _probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            return torch.from_numpy(self.compiled.model.probabilities(batch.numpy()))
        batch = batch.to(self.device, non_blocking=True)
        if use_channels_last(self.device, self.precision):
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.precision):
            logits = self.model(batch)
        return logits.float().softmax(dim=1).cpu()

    def feature_model(self, extractor: nn.Module, input_size: tuple[int, int, int], precision: str,
                      identity: dict) -> CompiledModel | None:
        """``extractor`` (a frozen copy of this module's backbone: images in, pooled features out) on the
        module's compiled runtime, converted once and kept in the snapshot under a key hashed from
        ``identity`` (its cut, custom weights...). None with ``runtime="torch"``, and None with a one-line
        notice where it does not convert: the caller then runs ``extractor`` with torch."""
        if self.runtime == "torch":
            return None
        precision = precision if precision in ("fp32", "bf16", "fp16") and self.runtime == "openvino" else "fp32"
        try:
            self.installed, model = ensure_feature_model(self.installed, self.runtime, extractor, input_size, precision,
                                                         identity, self.cache)
            return model
        except ConversionError as exc:
            log.warning("hubkit: the frozen backbone of %s does not convert for %s (%s); computing its features "
                        "with torch", self.manifest.ref, self.runtime, exc.message)
            return None

    def context(self, trainable: bool = True, pretrained: bool = True) -> ModuleContext:
        """The backbone (classifier removed) and its feature map, for transfer learning."""
        backbone = self.create_model(pretrained=pretrained)
        backbone.reset_classifier(0)
        backbone.requires_grad_(trainable)
        backbone.train(trainable)
        return ModuleContext(backbone, self.manifest.features, self.manifest.preprocessing, self.labels, self.manifest)

    def export(self, format: str, output: str | Path, images: Any = None) -> tuple[Path, Parity]:
        """Write this module with its ``format`` (``"onnx"``/``"openvino"``) artefact into ``output``,
        after checking the fp32 artefact against the fp32 torch model on ``images`` (real photos; by
        default the examples shipped with hubkit).

        Raises ConversionError, writing nothing, when the conversion fails or the parity check does.
        """
        if format not in EXPORT_FORMATS:
            raise ConfigError(f"unknown export format {format!r}", hint=f"use one of {', '.join(EXPORT_FORMATS)}")
        runtime = compiled_runtime.resolve_runtime(EXPORT_FORMATS[format], "cpu")
        torch_model = self.create_model()
        self.installed = ensure_artefact(self.installed, runtime, lambda: torch_model, self.cache)
        files, _ = self.cache.artefact(self.installed, runtime)
        preprocessor = ImagePreprocessor.for_preprocessing(self.manifest.preprocessing, optimize=self.optimize)
        checked = parity(torch_model, CompiledModel(runtime, files, "fp32"), preprocessor, parity_images(images))
        if not checked.passed:
            raise ConversionError(f"the {format} export of {self.manifest.ref} disagrees with torch: {checked.describe()}",
                                  hint="report it; `hub run --runtime torch` is unaffected")
        return export_files(self.installed, runtime, Path(output), checked, self.cache), checked
