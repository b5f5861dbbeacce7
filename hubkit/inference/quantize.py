"""int8 post-training quantization of a module's OpenVINO model (NNCF), calibrated on the user's photos.

The result is a module folder, ``NAME-int8``, that ``hub install`` takes like any other: the
module's fp32 weights (torch and every other runtime use them) plus the int8 OpenVINO IR, which
its manifest ships (pinned by sha256) so that OpenVINO runs it instead of converting the weights.
The report says how much faster int8 is than the default runtime here (it may not be: on CPUs
without VNNI/AMX int8 gains little) and how often it agrees with it on the user's photos.
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import constants
from ..data.images import expand_inputs
from ..errors import ConfigError, HubkitError
from ..hub.fs import atomic_write_json, sha256_file
from ..hub.labels import class_names
from ..hub.runtime_imports import import_without_telemetry
from ..hub.signal_stack import kept_signal_stack
from ..installer import local_manifest
from .compiled import CompiledModel, ImagePreprocessor, resolve_precision
from .module import Module

#: The most calibration photos decoded (NNCF's own default subset is 300).
MAX_CALIBRATION_IMAGES = 300

#: The most labelled photos an evaluation decodes.
MAX_EVAL_IMAGES = 2000

#: int8 counts as faster only from this speed-up on: below it the output says it is not worth it here.
FASTER_THRESHOLD = 1.05


@dataclass(frozen=True)
class QuantizeReport:
    """What ``quantize`` made and measured: the variant's folder and name, speed against the default
    runtime, top-1 agreement with it, and accuracy on labelled photos when given."""

    folder: Path
    name: str
    calibration_images: int
    default_img_s: float
    int8_img_s: float
    compared_images: int
    top1_agreement: float
    accuracy_default: float | None = None
    accuracy_int8: float | None = None

    @property
    def speedup(self) -> float:
        return self.int8_img_s / self.default_img_s

    def lines(self) -> list[str]:
        """The report as the CLI prints it, one fact per line."""
        out = [f"calibrated on {self.calibration_images} images",
               f"speed (batch of 32): int8 {self.int8_img_s:.1f} img/s, default runtime {self.default_img_s:.1f} img/s "
               f"({self.speedup:.2f}x)"]
        if self.speedup < FASTER_THRESHOLD:
            out.append("int8 is not faster than the default runtime on this CPU: keep using the original module here")
        out.append(f"top-1 agreement with the default runtime on {self.compared_images} images: {self.top1_agreement:.1%}")
        if self.accuracy_default is not None:
            change = 100 * (self.accuracy_int8 - self.accuracy_default)
            out.append(f"accuracy on the labelled images: int8 {self.accuracy_int8:.1%}, default "
                       f"{self.accuracy_default:.1%} ({change:+.1f} points)")
        return out


def nncf_available() -> bool:
    return importlib.util.find_spec("nncf") is not None


def labelled_images(folder: str | Path, labels: list[str]) -> tuple[list[Path], list[int]]:
    """``folder/<class>/<image>`` as image paths and label indices; every class folder must name one of
    the module's labels (ConfigError naming those that do not). At most MAX_EVAL_IMAGES, spread over classes."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder", hint="give a folder with one subfolder of images per class")
    index = {label: i for i, label in enumerate(labels)}
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in classes if p.name not in index]
    if unknown or not classes:
        raise ConfigError(f"the class folders of {root} must be named after the module's labels; "
                          f"{', '.join(unknown[:5]) or 'none found'} {'is' if len(unknown) == 1 else 'are'} not",
                          hint="rename the folders to the labels `hub show NAME` lists")
    per_class = [expand_inputs(p) for p in classes]
    paths, targets = [], []
    for depth in range(max(map(len, per_class))):  # round-robin over classes, so a cap keeps them all
        for folder_index, files in enumerate(per_class):
            if depth < len(files) and len(paths) < MAX_EVAL_IMAGES:
                paths.append(files[depth])
                targets.append(index[classes[folder_index].name])
    return paths, targets


def _prepared(preprocessor: ImagePreprocessor, items: list) -> tuple[list[np.ndarray], list[int]]:
    """The readable inputs' pixels and their positions (unreadable photos are skipped)."""
    pixels, kept = [], []
    for i, item in enumerate(items):
        value = preprocessor.prepare(item)
        if not isinstance(value, HubkitError):
            pixels.append(value)
            kept.append(i)
    return pixels, kept


def _img_per_s(models: dict[str, CompiledModel], batch: np.ndarray, rounds: int = 3) -> dict[str, float]:
    """Images per second of each model on ``batch``, best of ``rounds`` interleaved rounds after a warm-up."""
    best = {name: float("inf") for name in models}
    for model in models.values():
        model.outputs(batch)
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model.outputs(batch)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(batch) / seconds for name, seconds in best.items()}


def _top1(model: CompiledModel, pixels: list[np.ndarray], preprocessor: ImagePreprocessor) -> np.ndarray:
    return np.concatenate([model.outputs(preprocessor.normalise(pixels[i:i + 32])).argmax(1)
                           for i in range(0, len(pixels), 32)])


def quantize(module: Module, calibration: Any, output: str | Path, *, evaluation: str | Path | None = None,
             name: str | None = None) -> QuantizeReport:
    """Quantize ``module``'s OpenVINO model to int8 with NNCF on the ``calibration`` photos (a folder,
    searched recursively, or a list) and write the variant module (``name``, default ``NAME-int8``)
    into ``output``; measure it against the default runtime, on ``evaluation``
    (``class/image`` folders named after the module's labels) when given, else on the calibration photos.

    Raises ConfigError when nncf is missing or no calibration photo is readable.
    """
    if not nncf_available():
        raise ConfigError("int8 quantization needs the 'nncf' package, which is not installed",
                          hint="pip install nncf (or pip install 'hubkit[quantize]')")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # nncf's import: "No CUDA runtime"
    nncf = import_without_telemetry("nncf")  # NNCF reports usage like OpenVINO: blocked the same way
    openvino = import_without_telemetry("openvino")

    fp32 = Module(module.name, module.version, cache=module.cache, device="cpu", runtime="openvino", precision="fp32")
    fp32.load()  # the fp32 IR, converted at first use
    files, _ = fp32.cache.artefact(fp32.installed, "openvino")
    preprocessor = ImagePreprocessor.for_preprocessing(fp32.manifest.preprocessing)
    pixels, _ = _prepared(preprocessor, expand_inputs(calibration, recursive=True)[:MAX_CALIBRATION_IMAGES])
    if not pixels:
        raise ConfigError(f"no readable image in {calibration} to calibrate on", hint="give a folder of your photos")
    calibration_set = nncf.Dataset(pixels, lambda image: preprocessor.normalise([image]))
    with kept_signal_stack():  # NNCF compiles the model to collect its statistics
        quantized = nncf.quantize(openvino.Core().read_model(str(files[0])), calibration_set,
                                  subset_size=len(pixels), target_device=nncf.TargetDevice.CPU)

    variant = name or f"{fp32.name}-int8"
    folder = _write_variant(fp32, quantized, Path(output), variant)
    precision = resolve_precision("auto", "openvino")
    default = CompiledModel("openvino", files, precision)
    int8 = CompiledModel("openvino", [folder / n for n in constants.COMPILED_FILES["openvino"]], precision)
    speed = _img_per_s({"default": default, "int8": int8}, preprocessor.normalise((pixels * 32)[:32]))
    accuracy: dict[str, float] = {}
    if evaluation is not None:
        paths, targets = labelled_images(evaluation, class_names(fp32.manifest))
        compared, kept = _prepared(preprocessor, paths)
        truth = np.asarray(targets)[kept]
    else:
        compared, truth = pixels, None
    answers = {key: _top1(model, compared, preprocessor) for key, model in (("default", default), ("int8", int8))}
    if truth is not None:
        accuracy = {key: float(np.mean(answers[key] == truth)) for key in answers}
    return QuantizeReport(folder, variant, len(pixels), speed["default"], speed["int8"], len(compared),
                          float(np.mean(answers["default"] == answers["int8"])),
                          accuracy.get("default"), accuracy.get("int8"))


def _write_variant(module: Module, quantized: Any, output: Path, name: str) -> Path:
    """A module folder ``hub install`` takes: the fp32 weights and labels, the int8 IR its manifest ships."""
    openvino = import_without_telemetry("openvino")
    output.mkdir(parents=True, exist_ok=True)
    names = constants.COMPILED_FILES["openvino"]
    openvino.save_model(quantized, str(output / names[0]), compress_to_fp16=False)
    weights = output / constants.WEIGHTS_FILENAME
    shutil.copyfile(module.installed.weights_path, weights)
    manifest = module.manifest
    if manifest.task == "image_classification":
        (output / "labels.txt").write_text("\n".join(class_names(manifest)) + "\n", encoding="utf-8")
    shipped = {n: {"sha256": sha256_file(output / n), "size": (output / n).stat().st_size} for n in names}
    data = local_manifest(manifest, sha256_file(weights), weights.stat().st_size, name=name,
                          summary=f"{manifest.summary} (int8 for OpenVINO, quantized from {manifest.ref})",
                          compiled={"openvino": {"precision": "int8", "files": shipped}})
    atomic_write_json(output / constants.MANIFEST_FILENAME, data)
    return output
