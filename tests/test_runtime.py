"""The compiled CPU runtimes: timm-equal preprocessing without torch, accuracy against fp32 torch on real
photos, the artefact's integrity (rebuilt when damaged), `hub run` without torch, and `hub export`."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CAT_CLASSES, ESPRESSO_CLASS, REPO
from PIL import Image

from hubkit import Module
from hubkit.cli.options import RUNTIMES as CLI_RUNTIMES
from hubkit.constants import COMPILED_FILES, COMPILED_RUNTIMES, DEFAULT_CPU_RUNTIME
from hubkit.data.images import load_image
from hubkit.data.transforms import build_transform
from hubkit.errors import ConfigError
from hubkit.hub.cache import Cache
from hubkit.hub.manifest import Manifest, Preprocessing
from hubkit.inference.compiled import RUNTIMES, ImagePreprocessor, open_compiled, resolve_runtime

LITE0 = Manifest.from_file(REPO / "modules" / "efficientnet_lite0" / "module.json")


@pytest.mark.parametrize("pre", [
    LITE0.preprocessing,
    Preprocessing((3, 240, 240), "bilinear", 0.9, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    Preprocessing((3, 224, 224), "bicubic", 1.0, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
], ids=["lite0", "bilinear-240-imagenet-stats", "crop_pct-1"])
def test_numpy_preprocessing_equals_timms_transform_bit_for_bit(pre, real_photos):
    transform, ours = build_transform(pre), ImagePreprocessor.for_preprocessing(pre, optimize=False)
    for path in real_photos:
        image = load_image(path)
        expected = transform(image).numpy()
        got = ours.normalise([ours.prepare(path)])[0]
        assert got.dtype == np.float32 and got.shape == expected.shape, path
        assert np.array_equal(got, expected), f"{path.name}: max diff {np.abs(got - expected).max()}"


def test_a_preprocessing_the_compiled_runtimes_cannot_match_is_refused():
    wide = Preprocessing((3, 224, 320), "bicubic", 0.875, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="square"):
        ImagePreprocessor.for_preprocessing(wide)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", COMPILED_RUNTIMES)
def test_compiled_fp32_gives_torch_fp32_top1_on_real_photos(runtime, lite0_home, real_photos):
    reference = Module(name="efficientnet_lite0", runtime="torch", precision="fp32", optimize=False)
    compiled = Module(name="efficientnet_lite0", runtime=runtime, precision="fp32", optimize=False)
    assert compiled.runtime == runtime and reference.runtime == "torch"
    expected, got = reference.predict(real_photos, top_k=5), compiled.predict(real_photos, top_k=5)
    top1 = [a.top_k[0].index == b.top_k[0].index for a, b in zip(expected, got)]
    overlap = np.mean([len({c.index for c in a.top_k} & {c.index for c in b.top_k}) / 5 for a, b in zip(expected, got)])
    assert len(top1) >= 20 and np.mean(top1) >= 0.985, f"top-1 agreement {np.mean(top1):.3f}, top-5 overlap {overlap:.3f}"
    assert overlap >= 0.95
    for a, b in zip(expected, got):
        assert b.top_k[0].probability == pytest.approx(a.top_k[0].probability, abs=1e-3)


def test_auto_runs_the_default_compiled_runtime_on_the_cpu(lite0_home, photos):
    module = Module(name="efficientnet_lite0", device="cpu")
    assert module.runtime == DEFAULT_CPU_RUNTIME and module.compiled is not None
    cat, espresso = module.predict([photos["cat"], photos["espresso"]], top_k=3)
    assert cat.top_k[0].index in CAT_CLASSES and espresso.top_k[0].index == ESPRESSO_CLASS
    assert Module(name="efficientnet_lite0", device="cpu", runtime="torch").compiled is None


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete"])
def test_a_damaged_artefact_is_rebuilt_with_a_notice(damage, lite0_home, photos, caplog):
    installed = Cache().get("efficientnet_lite0")
    weights_file = installed.path / COMPILED_FILES["onnxruntime"][0]
    data = bytearray(weights_file.read_bytes())
    if damage == "corrupt":
        data[len(data) // 2] ^= 0xFF
        weights_file.write_bytes(bytes(data))
    elif damage == "truncate":
        weights_file.write_bytes(bytes(data[: len(data) // 2]))
    else:
        weights_file.unlink()
    assert open_compiled("efficientnet_lite0", runtime="onnxruntime") is None  # `hub run` goes through Module
    (verified,) = Cache().verify()
    assert not verified.ok and "model.onnx" in verified.problem
    with caplog.at_level(logging.WARNING, logger="hubkit"):
        module = Module(name="efficientnet_lite0", runtime="onnxruntime", precision="fp32")
        (espresso,) = module.predict([photos["espresso"]], top_k=1)
    assert espresso.top_k[0].index == ESPRESSO_CLASS
    notices = [r.getMessage() for r in caplog.records if r.name == "hubkit"]
    assert len(notices) == 1 and "rebuilding" in notices[0] and "model.onnx" in notices[0]
    Cache().artefact(Cache().get("efficientnet_lite0"), "onnxruntime", full=True)  # intact again
    assert open_compiled("efficientnet_lite0", runtime="onnxruntime") is not None


@pytest.mark.slow
def test_an_architecture_that_does_not_convert_keeps_working_on_torch_with_one_notice(lite0_home, photos, monkeypatch,
                                                                                    caplog):
    def refuse(*args, **kwargs):  # what the exporter does with an operator ONNX has no counterpart for
        raise RuntimeError("Exporting the operator 'aten::made_up' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    installed = Cache().get("efficientnet_lite0")
    (installed.path / COMPILED_FILES["openvino"][1]).unlink()  # damaged, and it cannot be rebuilt
    with caplog.at_level(logging.WARNING, logger="hubkit"):
        module = Module(name="efficientnet_lite0", device="cpu")
        cat, espresso = module.predict([photos["cat"], photos["espresso"]], top_k=1)
        module.predict([photos["cat"]], top_k=1)  # said once, not per call
    assert module.runtime == "torch" and module.compiled is None
    assert cat.top_k[0].index in CAT_CLASSES and espresso.top_k[0].index == ESPRESSO_CLASS
    notices = [r.getMessage() for r in caplog.records if r.name == "hubkit"]
    assert len(notices) == 2 and "rebuilding" in notices[0], notices  # the damage, then the fallback
    assert "does not convert" in notices[1] and "aten::made_up" in notices[1] and "running with torch" in notices[1]
    assert all("\n" not in n for n in notices)


def test_a_missing_runtime_package_is_a_config_error_naming_it(lite0_home, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="'onnxruntime' package"):
        Module(name="efficientnet_lite0", runtime="onnxruntime")
    with pytest.raises(ConfigError, match="'onnxruntime' package"):
        open_compiled("efficientnet_lite0", device="cpu", runtime="onnxruntime")
    with pytest.raises(ConfigError, match="runs on the CPU"):
        resolve_runtime("openvino", "cuda")
    assert resolve_runtime("auto", "cuda") == "torch"


def test_the_cli_knows_every_runtime():
    assert CLI_RUNTIMES == RUNTIMES


def _printed_scores(stdout: str) -> list[tuple[str, float]]:
    """``(label, percent)`` of each prediction line `hub run` prints (``  40.65%  Egyptian cat  (285)``)."""
    rows = [line.split("%", 1) for line in stdout.splitlines() if "%" in line]
    return [(label.strip(), float(percent)) for percent, label in rows]


@pytest.mark.slow
def test_hub_run_prints_the_same_without_torch(lite0_home, run_hub, photos):
    """The same classes in the same order, scores equal to the printed precision's rounding (both in fp32:
    on a CPU with native bf16 each runtime's own bf16 kernels round differently)."""
    args = ("run", "efficientnet_lite0", "--input_path", str(photos["cat"]), "--device", "cpu", "--precision", "fp32")
    fast = run_hub(*args, env={"PYTHONPROFILEIMPORTTIME": "1"}, check=True)
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in fast.stderr.splitlines() if "|" in line}
    assert DEFAULT_CPU_RUNTIME in imported and not imported & {"torch", "timm", "torchvision"}
    compiled, eager = (_printed_scores(out) for out in (fast.stdout, run_hub(*args, "--runtime", "torch", check=True).stdout))
    assert [label for label, _ in compiled] == [label for label, _ in eager] and len(compiled) == 5
    assert all(abs(a - b) <= 0.02 for (_, a), (_, b) in zip(compiled, eager)), (compiled, eager)
    as_json = json.loads(run_hub(*args, "--json", check=True).stdout)
    assert set(as_json) == {"module", "device", "precision", "predictions"} and as_json["device"] == "cpu"


@pytest.mark.slow
@pytest.mark.parametrize("fmt, files", [("onnx", COMPILED_FILES["onnxruntime"]), ("openvino", COMPILED_FILES["openvino"])])
def test_hub_export_checks_parity_on_real_photos_and_writes_an_installable_folder(fmt, files, lite0_home, run_hub,
                                                                                  tmp_path, photos):
    out = tmp_path / "exported"
    proc = run_hub("export", "efficientnet_lite0", "--format", fmt, "--output", str(out), "--images", str(photos["cat"].parent),
                   check=True)
    assert "top-1 agreement 100.0%" in proc.stdout and str(out) in proc.stdout
    record = json.loads((out / "export.json").read_text())
    assert set(record["files"]) == set(files) and record["parity"]["max_abs_diff"] < 1e-3
    assert {"module.json", "labels.txt", "weights.safetensors", *files} <= {p.name for p in out.iterdir()}
    refused = run_hub("export", "efficientnet_lite0", "--format", fmt, "--output", str(tmp_path / "x"), "--images",
                      str(tmp_path / "nothing_here"))
    assert refused.returncode == 1 and refused.stderr.startswith("error:") and "Traceback" not in refused.stderr


@pytest.mark.slow
def test_openvino_sends_no_usage_telemetry_when_running_or_converting(lite0_home, run_hub, photos, tmp_path):
    """`import openvino` reports usage to Google Analytics unless opted out, and first writes its client id
    under ~/intel: with a fresh home, that folder must not appear."""
    home = tmp_path / "home"
    home.mkdir()
    run_hub("run", "efficientnet_lite0", "--input_path", str(photos["cat"]), env={"HOME": str(home)}, check=True)
    run_hub("export", "efficientnet_lite0", "--format", "openvino", "--output", str(tmp_path / "ir"), "--images",
            str(photos["cat"].parent), env={"HOME": str(home)}, check=True)
    assert (tmp_path / "ir" / COMPILED_FILES["openvino"][0]).is_file()
    assert not (home / "intel").exists(), sorted(p.name for p in (home / "intel").iterdir())


#: Two OpenVINO models made, freed first-made-first, then a subprocess exits while a SIGCHLD handler is set
#: (as torch's DataLoader sets one): the process must survive it.
_MODELS_FREED_OUT_OF_ORDER = """
import gc, signal, subprocess, sys
from hubkit import Module
first = Module("efficientnet_lite0", runtime="openvino", device="cpu")
first.predict([sys.argv[1]])
second = Module("efficientnet_lite0", runtime="openvino", device="cpu")
second.predict([sys.argv[1]])
del first
gc.collect()
del second
gc.collect()
signal.signal(signal.SIGCHLD, lambda signum, frame: None)
subprocess.run(["true"], check=True)
print("alive")
"""


@pytest.mark.slow
def test_openvino_models_freed_in_any_order_leave_signal_handling_working(lite0_home, photos):
    """OpenVINO's CPU plugin leaves a freed alternate signal stack behind when its models are freed in
    another order than made; the next handled signal then killed the process with SIGSEGV (pytest too,
    after a frozen-backbone run with DataLoader workers and any `hub` subprocess)."""
    proc = subprocess.run([sys.executable, "-c", _MODELS_FREED_OUT_OF_ORDER, str(photos["cat"])], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.strip().endswith("alive")


def test_open_compiled_never_chooses_for_cuda_or_torch(lite0_home):
    assert open_compiled("efficientnet_lite0", device="cuda") is None
    assert open_compiled("efficientnet_lite0", runtime="torch") is None
    assert open_compiled("no_such_module") is None
    module = open_compiled("efficientnet_lite0", device="cpu", runtime="onnxruntime")
    assert module is not None and module.runtime == "onnxruntime" and module.precision == "fp32"
    with pytest.raises(ConfigError, match="cannot run in bf16"):
        open_compiled("efficientnet_lite0", device="cpu", runtime="onnxruntime", precision="bf16")
    image = np.asarray(Image.open(REPO / "examples" / "coffee.jpg"))
    assert module.predict([image], top_k=1)[0].top_k[0].index == ESPRESSO_CLASS


def test_hub_run_output_streams_json_lines_and_reports_bad_files(lite0_home, run_hub, photos, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for n in range(3):
        (folder / f"{n}_cat.jpg").write_bytes(photos["cat"].read_bytes())
    (folder / "3_espresso.jpg").write_bytes(photos["espresso"].read_bytes())
    (folder / "4_truncated.jpg").write_bytes(photos["espresso"].read_bytes()[:1500])
    out = tmp_path / "preds.jsonl"
    proc = run_hub("run", "efficientnet_lite0", "--input_path", str(folder), "--output", str(out), "--batch_size", "2",
                   "--top_k", "2")
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert "4_truncated.jpg" in proc.stderr and "4 of 5 inputs predicted, 1 could not be read" in proc.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["source"].rsplit("/", 1)[-1] for line in lines] == sorted(p.name for p in folder.iterdir())
    assert all(line["top_k"][0]["index"] in CAT_CLASSES for line in lines[:3])
    assert lines[3]["top_k"][0]["index"] == ESPRESSO_CLASS and len(lines[3]["top_k"]) == 2
    assert lines[4]["error"] and not lines[4]["top_k"]


@pytest.mark.slow
def test_hub_run_under_torchrun_shards_the_files_and_rank0_merges_them_in_order(lite0_home, run_hub, photos,
                                                                                tmp_path):
    work = tmp_path / "work"
    folder = work / "in"
    folder.mkdir(parents=True)
    for n in range(5):
        photo = photos["cat"] if n % 2 else photos["espresso"]
        (folder / f"{n}.jpg").write_bytes(photo.read_bytes())
    (folder / "5_truncated.jpg").write_bytes(photos["espresso"].read_bytes()[:1500])
    alone, merged = work / "alone.jsonl", work / "merged.jsonl"
    run_hub("run", "efficientnet_lite0", "--input_path", str(folder), "--output", str(alone), "--batch_size", "2")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "hubkit.cli", "run", "efficientnet_lite0", "--input_path", str(folder),
                           "--output", str(merged), "--batch_size", "2"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "HUBKIT_DISABLE_PROGRESS": "1"})
    # rank 0 exits 1 as one process does (a file could not be read); torchrun's own report follows, none of ours
    assert proc.returncode != 0 and "/hubkit/" not in proc.stderr
    assert "5 of 6 inputs predicted by 2 ranks, 1 could not be read" in proc.stderr
    assert merged.read_text() == alone.read_text()  # every line, in input order, as one process writes them
    assert sorted(p.name for p in work.iterdir()) == ["alone.jsonl", "in", "merged.jsonl"]  # parts removed
    without_output = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                     "2", "-m", "hubkit.cli", "run", "efficientnet_lite0", "--input_path", str(folder)],
                                    capture_output=True, text=True, timeout=600)
    assert without_output.returncode != 0 and "under torchrun, give --output" in without_output.stderr


# --- int8 quantization -------------------------------------------------------------------------
@pytest.mark.slow
def test_hub_quantize_installs_an_int8_variant_that_hub_run_uses(lite0_home, run_hub, real_photos, photos, tmp_path):
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for path in real_photos:
        (calibration / path.name).write_bytes(path.read_bytes())
    labelled = tmp_path / "labelled"
    for folder, photo in (("tabby, tabby cat", "cat"), ("espresso", "espresso")):
        (labelled / folder).mkdir(parents=True)
        (labelled / folder / photos[photo].name).write_bytes(photos[photo].read_bytes())
    out = tmp_path / "lite0-int8"
    proc = run_hub("quantize", "efficientnet_lite0", "--calibration", str(calibration), "--eval", str(labelled),
                   "--output", str(out), timeout=900, check=True)
    assert f"calibrated on {len(list(calibration.iterdir()))} images" in proc.stdout
    assert "top-1 agreement with the default runtime on 2 images" in proc.stdout
    assert "accuracy on the labelled images: int8" in proc.stdout
    assert ("int8 is not faster" in proc.stdout) == (float(proc.stdout.split("x)")[0].rsplit("(", 1)[1]) < 1.05)
    assert "installed efficientnet_lite0-int8==1.0.0" in proc.stdout

    # the variant ships its int8 IR (pinned in its manifest); hub run uses it, without torch
    installed = Cache().get("efficientnet_lite0-int8")
    assert installed.record["compiled"]["openvino"]["precision"] == "int8"
    assert "FakeQuantize" in (installed.path / "model.xml").read_text()
    args = ("run", "efficientnet_lite0-int8", "--input_path", str(photos["espresso"]), "--json")
    fast = run_hub(*args, env={"PYTHONPROFILEIMPORTTIME": "1"}, check=True)
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in fast.stderr.splitlines() if "|" in line}
    assert "torch" not in imported
    assert json.loads(fast.stdout)["predictions"][0]["top_k"][0]["index"] == ESPRESSO_CLASS

    # lock / pack / unpack carry the int8 model to an air-gapped machine: the same bytes, run there without torch
    bundle, elsewhere = tmp_path / "fleet.tar", {"HUBKIT_HOME": str(tmp_path / "elsewhere")}
    run_hub("pack", "efficientnet_lite0-int8", "-o", str(bundle), check=True)
    run_hub("unpack", str(bundle), env=elsewhere, check=True)
    moved = Cache(tmp_path / "elsewhere").get("efficientnet_lite0-int8")
    assert (moved.path / "model.bin").read_bytes() == (installed.path / "model.bin").read_bytes()
    assert moved.record["compiled"]["openvino"]["precision"] == "int8" and "model.bin" not in moved.files
    there = run_hub(*args, env=elsewhere, check=True)
    assert json.loads(there.stdout)["predictions"] == json.loads(fast.stdout)["predictions"]

    # a damaged shipped artefact cannot be rebuilt from the fp32 weights: one line saying so
    with open(installed.path / "model.bin", "r+b") as f:
        f.seek(1000)
        f.write(b"\x00" * 16)
    damaged = run_hub(*args)
    assert damaged.returncode == 1 and damaged.stderr.startswith("error:") and "cannot be rebuilt" in damaged.stderr
    assert "Traceback" not in damaged.stderr

    # a folder whose shipped file does not match its manifest is refused at install
    (out / "model.xml").write_text((out / "model.xml").read_text().replace("FakeQuantize", "FakeQuantizx", 1))
    refused = run_hub("install", str(out), "--force")
    assert refused.returncode == 1 and "does not match its sha256" in refused.stderr


def test_quantize_without_nncf_names_the_package(lite0, monkeypatch):
    import importlib.util

    from hubkit.inference.quantize import quantize

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match="needs the 'nncf' package") as caught:
        quantize(lite0, REPO / "examples", "unused")
    assert "pip install nncf" in caught.value.hint
