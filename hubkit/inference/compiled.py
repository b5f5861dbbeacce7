"""Running a module's compiled artefact (OpenVINO IR or ONNX) with numpy + PIL, without torch or timm.

``hub run`` comes here first: when the installed module has a verified artefact for the runtime,
nothing imports torch (a cold run is a fraction of a torch start-up). The artefact itself is made
from the torch model by :mod:`hubkit.models.compile`, at first use through :class:`hubkit.Module`.
The preprocessing equals timm's eval transform (shorter side resized to ``size / crop_pct`` with
the module's interpolation, centre crop, ToTensor + Normalize), which ``tests/test_runtime.py`` proves
on real photos.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from .. import constants
from ..data.images import load_image
from ..errors import ConfigError, HubkitError, IntegrityError, NotInstalledError
from ..hub.cache import Cache, InstalledModule
from ..hub.labels import class_names
from ..hub.machine import cpu_has_native_bf16, nvidia_driver_present
from ..hub.manifest import Manifest, Preprocessing
from ..hub.runtime_imports import import_without_telemetry
from ..hub.signal_stack import kept_signal_stack
from .predict import Prediction, iter_prediction_batches, mirror_averaged

log = logging.getLogger("hubkit")

#: What ``Module(runtime=...)``, ``hub run --runtime`` and ``hub serving --runtime`` accept.
RUNTIMES = ("auto", "torch", *constants.COMPILED_RUNTIMES)

#: PIL's filter for each interpolation name timm uses.
INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                  "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}

#: Each runtime's precision names (OpenVINO's INFERENCE_PRECISION_HINT); ONNX Runtime runs fp32 on the CPU.
_PRECISION_HINTS = {"openvino": {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}, "onnxruntime": {"fp32": None}}


def runtime_available(runtime: str) -> bool:
    """True when the runtime's package is installed (checked without importing it)."""
    return importlib.util.find_spec(runtime) is not None


def resolve_runtime(runtime: str, device_type: str) -> str:
    """``"torch"`` or a compiled runtime for a resolved device type (``"cpu"``/``"cuda"``).

    ``"auto"`` is :data:`hubkit.constants.DEFAULT_CPU_RUNTIME` on a CPU and torch on CUDA (and torch, with
    a notice, where the package is missing). A compiled runtime asked for by name must be installed and
    runs on the CPU only: anything else is a ConfigError that names the fix.
    """
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}", hint=f"use one of {', '.join(RUNTIMES)}")
    if runtime == "auto":
        if device_type != "cpu":
            return "torch"
        if not runtime_available(constants.DEFAULT_CPU_RUNTIME):
            log.warning("hubkit: the %s package is not installed; running with torch (pip install %s)",
                        constants.DEFAULT_CPU_RUNTIME, constants.DEFAULT_CPU_RUNTIME)
            return "torch"
        return constants.DEFAULT_CPU_RUNTIME
    if runtime == "torch":
        return runtime
    if device_type != "cpu":
        raise ConfigError(f"the {runtime} runtime runs on the CPU, not on {device_type}",
                          hint="use --device cpu, or --runtime torch for the GPU")
    if not runtime_available(runtime):
        raise ConfigError(f"the {runtime} runtime needs the '{runtime}' package, which is not installed",
                          hint=f"pip install {runtime}, or use --runtime torch")
    return runtime


def resolve_precision(precision: str, runtime: str) -> str:
    """The precision a compiled runtime runs in: ``auto`` is bf16 where the CPU computes it natively
    (OpenVINO), else fp32; ONNX Runtime runs fp32 only."""
    if precision == "auto":
        return "bf16" if runtime == "openvino" and cpu_has_native_bf16() else "fp32"
    if precision not in _PRECISION_HINTS[runtime]:
        raise ConfigError(f"the {runtime} runtime cannot run in {precision}",
                          hint=f"use --precision {' or '.join(_PRECISION_HINTS[runtime])}, or another --runtime")
    return precision


@dataclass(frozen=True)
class ImagePreprocessor:
    """timm's eval transform for a square input in PIL + numpy: decode (reduced-scale for large
    JPEGs), resize the shorter side to ``resize_to``, centre-crop ``size``, normalise."""

    size: int
    resize_to: int
    resample: int
    mean: np.ndarray
    std: np.ndarray
    draft_size: int | None

    @classmethod
    def for_preprocessing(cls, pre: Preprocessing, *, optimize: bool = True) -> "ImagePreprocessor":
        """The preprocessor of a module's preprocessing; ConfigError where it cannot match timm
        (a non-square input or an interpolation PIL does not have)."""
        _, height, width = pre.input_size
        if height != width or pre.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"the compiled runtimes need a square input and one of {', '.join(INTERPOLATIONS)} "
                              f"(this module: {height}x{width}, {pre.interpolation})", hint="use --runtime torch")
        resize_to = math.floor(height / pre.crop_pct)  # timm's scale_size
        column = lambda v: np.asarray(v, dtype=np.float32).reshape(1, 3, 1, 1)  # noqa: E731
        draft = 2 * math.ceil(height / pre.crop_pct) if optimize else None  # as Module: >= 2x the resize target
        return cls(height, resize_to, INTERPOLATIONS[pre.interpolation], column(pre.mean), column(pre.std), draft)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """Resize and centre-crop an RGB image as torchvision does: an HxWx3 uint8 array."""
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_long = int(self.resize_to * long / short)
        new_w, new_h = (self.resize_to, new_long) if w <= h else (new_long, self.resize_to)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), self.resample)
        top, left = int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))
        return np.asarray(image.crop((left, top, left + self.size, top + self.size)), dtype=np.uint8)

    def prepare(self, item: Any) -> "np.ndarray | HubkitError":
        """One input (path, PIL image, array) as uint8 pixels, or the HubkitError that reading it raised."""
        try:
            return self.pixels(load_image(item, draft_size=self.draft_size))
        except HubkitError as exc:
            return exc

    def normalise(self, images: list[np.ndarray]) -> np.ndarray:
        """A float32 NCHW batch, as ToTensor + Normalize make it (bit for bit)."""
        return normalise_pixels(images, self.mean, self.std)


def normalise_pixels(images: list[np.ndarray], mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """A float32 NCHW batch from HxWx3 uint8 arrays, bit for bit what ToTensor + Normalize make
    (``mean``/``std`` shaped 1x3x1x1), in numpy: no intra-op thread team per call."""
    batch = np.stack(images).transpose(0, 3, 1, 2).astype(np.float32)
    batch /= np.float32(255)
    return np.ascontiguousarray((batch - mean) / std)


class CompiledModel:
    """A loaded artefact: float32 NCHW batches in, its first output (logits, or features) out.
    Thread-safe (one call at a time)."""

    def __init__(self, runtime: str, files: list[Path], precision: str):
        self.runtime, self.precision = runtime, precision
        self._lock = threading.Lock()
        if runtime == "openvino":
            openvino = import_without_telemetry("openvino")  # a runtime is imported only when it is used
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": _PRECISION_HINTS[runtime][precision]}
            with kept_signal_stack():
                compiled = openvino.Core().compile_model(str(files[0]), "CPU", config)
            request = compiled.create_infer_request()
            self._run = lambda batch: request.infer({0: batch})[0].copy()
        else:
            import onnxruntime  # noqa: PLC0415 - a runtime is imported only when it is used

            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3  # errors only: its warnings are about graph rewrites, not results
            session = onnxruntime.InferenceSession(str(files[0]), options, providers=["CPUExecutionProvider"])
            self._run = lambda batch: session.run(None, {"input": batch})[0]

    def outputs(self, batch: np.ndarray) -> np.ndarray:
        """The model's output (float32) for a preprocessed batch."""
        with self._lock:
            return self._run(np.ascontiguousarray(batch, dtype=np.float32)).astype(np.float32, copy=False)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Softmax class probabilities (float32) of a preprocessed batch."""
        logits = self.outputs(batch)
        logits -= logits.max(axis=1, keepdims=True)
        np.exp(logits, out=logits)
        return logits / logits.sum(axis=1, keepdims=True)


class CompiledModule:
    """An installed module run by a compiled runtime: preprocessing, forward pass and labels, no torch.

    Raises NotInstalledError when no artefact was made for ``runtime`` and IntegrityError when its files
    changed (:class:`hubkit.Module` then rebuilds it); ConfigError for a runtime or precision that cannot work.
    """

    def __init__(self, installed: InstalledModule, runtime: str, precision: str = "auto", *,
                 optimize: bool = True, cache: Cache | None = None):
        cache = cache or Cache()
        if runtime not in constants.COMPILED_RUNTIMES:
            raise ConfigError(f"{runtime!r} is not a compiled runtime", hint=f"use {' or '.join(constants.COMPILED_RUNTIMES)}")
        self.precision = resolve_precision(precision, runtime)
        files, _ = cache.artefact(installed, runtime)
        self.installed = installed
        self.manifest: Manifest = installed.manifest
        self.labels: list[str] = class_names(self.manifest)
        self.runtime = runtime
        self.device = "cpu"
        self.preprocessor = ImagePreprocessor.for_preprocessing(self.manifest.preprocessing, optimize=optimize)
        self.model = CompiledModel(runtime, files, self.precision)

    def predict(self, inputs: Any, *, top_k: int = 5, batch_size: int = 32, errors: str = "raise") -> list[Prediction]:
        """Top-k labels with probabilities, as :meth:`hubkit.Module.predict` gives them."""
        return [p for batch in self.iter_predict(inputs, top_k=top_k, batch_size=batch_size, errors=errors) for p in batch]

    def iter_predict(self, inputs: Any, *, top_k: int = 5, batch_size: int = 32,
                     errors: str = "raise") -> Iterator[list[Prediction]]:
        """``predict`` batch by batch, as :meth:`hubkit.Module.iter_predict` gives them."""
        return iter_prediction_batches(inputs, prepare=self.preprocessor.prepare, collate=self.preprocessor.normalise,
                                       forward=self.probabilities, labels=self.labels, top_k=top_k,
                                       batch_size=batch_size, errors=errors)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities of a preprocessed batch, with the module's test-time augmentation (if any)."""
        if self.manifest.preprocessing.tta == "flip":
            return mirror_averaged(self.model.probabilities, lambda b: np.ascontiguousarray(b[..., ::-1]))(batch)
        return self.model.probabilities(batch)


def open_compiled(name: str, version: str | None = None, *, device: str = "auto", runtime: str = "auto",
                  precision: str = "auto", cache: Cache | None = None) -> CompiledModule | None:
    """The installed module on its compiled runtime when that is the choice for ``device`` and ``runtime``
    and an intact artefact is there; else None: the caller goes through :class:`hubkit.Module`, which
    installs, converts, rebuilds or runs torch as needed (and says why). Never imports torch."""
    if runtime == "torch" or device not in ("auto", "cpu") or (device == "auto" and nvidia_driver_present()):
        return None
    chosen = resolve_runtime(runtime, "cpu")
    if chosen == "torch":
        return None
    cache = cache or Cache()
    installed = cache.get(name, version)
    if installed is None:
        return None
    try:
        cache.check(installed)
        return CompiledModule(installed, chosen, precision, cache=cache)
    except (NotInstalledError, IntegrityError):
        return None
