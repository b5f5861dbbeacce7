"""Making a module's compiled artefact (converted once, stored in its snapshot, hashed in the install
record), checking it against the torch model, and exporting it (``hub export``).

Running the artefact needs no torch (:mod:`hubkit.inference.compiled`); making it does.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import constants
from ..data.images import expand_inputs
from ..errors import ConfigError, ConversionError, HubkitError, IntegrityError, NotInstalledError
from ..hub.cache import Cache, InstalledModule, artefact_files
from ..hub.fs import atomic_write_json
from ..models.compile import convert
from .compiled import CompiledModel, ImagePreprocessor

#: ``hub export --format`` names -> the runtime whose artefact is written.
EXPORT_FORMATS = {"onnx": "onnxruntime", "openvino": "openvino"}

#: The most a compiled fp32 model's probability may differ from torch's fp32 one on a real photo
#: (measured: ~1e-6 for lite0 in OpenVINO and ONNX Runtime): beyond it the conversion is wrong.
PARITY_MAX_ABS_DIFF = 1e-3

#: At most this many photos are decoded for a parity check (it is a check, not an evaluation).
PARITY_MAX_IMAGES = 64


def ensure_artefact(installed: InstalledModule, runtime: str, make_model: Callable[[], torch.nn.Module],
                    cache: Cache, *, key: str | None = None, input_size: tuple[int, int, int] | None = None,
                    **info: Any) -> InstalledModule:
    """The installed module with an intact artefact for ``runtime``, converting the torch model
    ``make_model()`` into the snapshot folder when there is none or it was damaged.

    ``key`` records another model than the classifier (a features artefact: see
    :func:`hubkit.hub.cache.artefact_files`), made for ``input_size`` (default: the module's) and
    recorded with ``info``. Under the module's install lock: a process that waited for another's
    conversion uses its result. Raises ConversionError when the architecture does not convert.
    """
    key = key or runtime
    with cache.lock(installed.name):
        current = cache.get(installed.name, installed.version) or installed
        try:
            cache.artefact(current, key)
            return current
        except (NotInstalledError, IntegrityError):
            pass
        size = input_size or tuple(current.manifest.preprocessing.input_size)
        with tempfile.TemporaryDirectory(dir=current.path, prefix=".compile-") as tmp:
            files = convert(make_model(), size, Path(tmp), runtime, artefact_files(key))
            for path in files:
                os.replace(path, current.path / path.name)
        return cache.record_artefact(current, key, [current.path / p.name for p in files],
                                     converter=f"torch {torch.__version__.split('+')[0]}", **info)


def ensure_feature_model(installed: InstalledModule, runtime: str, extractor: torch.nn.Module,
                         input_size: tuple[int, int, int], precision: str, identity: dict,
                         cache: Cache) -> tuple[InstalledModule, CompiledModel]:
    """A compiled copy of ``extractor`` (a frozen backbone: image batch in, pooled features out) kept
    in the module's snapshot under a key hashed from ``identity`` (what its weights and cut are),
    checked against ``extractor`` on a random batch when made.

    Raises ConversionError when it does not convert or gives other features than torch.
    """
    digest = hashlib.sha256(json.dumps({"size": list(input_size), **identity}, sort_keys=True,
                                       default=str).encode()).hexdigest()[:12]
    key = f"{runtime}:features-{digest}"
    known = isinstance(installed.record.get("compiled"), dict) and key in installed.record["compiled"]
    installed = ensure_artefact(installed, runtime, lambda: extractor, cache, key=key, input_size=input_size,
                                made_from={"input_size": list(input_size), **identity})
    files, _ = cache.artefact(installed, key)
    if not known:  # just made: the conversion must give torch's features
        probe = np.random.default_rng(0).standard_normal((2, *input_size), dtype=np.float32)
        with torch.inference_mode():
            expected = extractor.eval()(torch.from_numpy(probe)).float().numpy()
        actual = CompiledModel(runtime, files, "fp32").outputs(probe)
        scale = max(1.0, float(np.abs(expected).max()))
        if actual.shape != expected.shape or float(np.abs(actual - expected).max()) > PARITY_MAX_ABS_DIFF * scale:
            raise ConversionError(f"its {runtime} features differ from torch's on a random batch")
    return installed, CompiledModel(runtime, files, precision)


@dataclass(frozen=True)
class Parity:
    """How a compiled model's answers compare with the torch fp32 model's on real photos."""

    images: int
    max_abs_diff: float
    top1_agreement: float

    @property
    def passed(self) -> bool:
        return self.top1_agreement == 1.0 and self.max_abs_diff <= PARITY_MAX_ABS_DIFF

    def describe(self) -> str:
        return (f"parity on {self.images} images: max |p_compiled - p_torch| = {self.max_abs_diff:.2e} "
                f"(limit {PARITY_MAX_ABS_DIFF:g}), top-1 agreement {self.top1_agreement:.1%}")


def parity_images(images: Any) -> Any:
    """The photos a parity check runs on: ``images``, else the examples beside the source checkout."""
    if images is not None:
        return images
    examples = constants.PACKAGE_ROOT.parent / "examples"
    if not examples.is_dir():
        raise ConfigError("no photos for the parity check", hint="give a folder of real photos (hub export --images DIR)")
    return examples


def parity(torch_model: torch.nn.Module, compiled: CompiledModel, preprocessor: ImagePreprocessor,
           images: Any) -> Parity:
    """Compare the fp32 torch model and a compiled model on the same preprocessed photos."""
    prepared = [p for p in map(preprocessor.prepare, expand_inputs(images)[:PARITY_MAX_IMAGES])
                if not isinstance(p, HubkitError)]
    if not prepared:
        raise ConfigError(f"no readable image in {images} for the parity check", hint="give a folder of photos")
    batch = preprocessor.normalise(prepared)
    with torch.inference_mode():
        reference = torch_model.eval()(torch.from_numpy(batch)).float().softmax(dim=1).numpy()
    probs = compiled.probabilities(batch)
    agree = float(np.mean(reference.argmax(1) == probs.argmax(1)))
    return Parity(len(prepared), float(np.abs(reference - probs).max()), agree)


def export_files(installed: InstalledModule, runtime: str, output: Path, checked: Parity, cache: Cache) -> Path:
    """Write a module folder that ``hub install`` takes (manifest, labels, weights) with the runtime's
    artefact and ``export.json`` (its sha256s and the parity figures) into ``output``."""
    files, _ = cache.artefact(installed, runtime, full=True)
    output.mkdir(parents=True, exist_ok=True)
    manifest = installed.manifest
    extra = [installed.path / manifest.labels_file] if manifest.labels_file else []
    for path in [installed.path / constants.MANIFEST_FILENAME, installed.weights_path, *extra, *files]:
        shutil.copyfile(path, output / path.name)
    record = installed.record["compiled"][runtime]["files"]
    atomic_write_json(output / "export.json", {
        "module": installed.ref, "runtime": runtime, "files": {p.name: record[p.name]["sha256"] for p in files},
        "parity": {"images": checked.images, "max_abs_diff": checked.max_abs_diff,
                   "top1_agreement": checked.top1_agreement}})
    return output
