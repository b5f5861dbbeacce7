"""Converting a module's torch model into a compiled-runtime artefact (ONNX, OpenVINO IR).

The conversion needs torch; running the artefact does not (:mod:`hubkit.inference.compiled`).
The graph takes a float32 NCHW batch of any size and returns the logits; BatchNorm folding
and the rest of graph optimisation are the runtime's own.
"""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import constants
from ..errors import ConfigError, ConversionError, HubkitError
from ..hub.runtime_imports import import_without_telemetry

#: ONNX operator set of exported graphs: supported by every ONNX Runtime and OpenVINO release since 2022.
ONNX_OPSET = 17


def export_onnx(model: nn.Module, input_size: tuple[int, int, int], path: Path) -> Path:
    """Write ``model`` (in eval mode, on the CPU, fp32) as an ONNX graph with a dynamic batch size."""
    example = torch.zeros(1, *input_size)
    model = model.eval().float().to("cpu", memory_format=torch.contiguous_format)
    with warnings.catch_warnings():  # the TorchScript-based exporter announces its successor on every call
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=ONNX_OPSET,
                          dynamo=False)
    return path


def convert(model: nn.Module, input_size: tuple[int, int, int], folder: Path, runtime: str,
            names: tuple[str, ...] | None = None) -> list[Path]:
    """The artefact files of ``model`` for ``runtime``, written into ``folder`` (named ``names``, by
    default the runtime's ``model.*``).

    ONNX Runtime gets the ONNX graph; OpenVINO gets its IR (``model.xml`` + ``model.bin``, fp32
    weights) read from that graph, which loads twice as fast as the ONNX file on a cold start.
    Raises ConversionError when the exporter or the converter refuses the model.
    """
    if runtime not in constants.COMPILED_FILES:
        raise ConfigError(f"no compiled runtime named {runtime!r}", hint=f"use one of {', '.join(constants.COMPILED_RUNTIMES)}")
    names = names or constants.COMPILED_FILES[runtime]
    try:
        if runtime == "onnxruntime":
            return [export_onnx(model, input_size, folder / names[0])]
        openvino = import_without_telemetry("openvino")  # an optional runtime, imported when asked for
        with tempfile.TemporaryDirectory(dir=folder, prefix=".onnx-") as tmp:
            # the runtime's own ONNX reader: the same graph as openvino.convert_model, fifty times faster
            graph = openvino.Core().read_model(str(export_onnx(model, input_size, Path(tmp) / "model.onnx")))
            openvino.save_model(graph, str(folder / names[0]), compress_to_fp16=False)
        return [folder / name for name in names]
    except HubkitError:
        raise
    except Exception as exc:  # noqa: BLE001 - any exporter failure means "this architecture does not convert"
        raise ConversionError(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}") from exc
