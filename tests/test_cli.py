"""The hub CLI run as a user runs it: real subprocesses, real weights, real photos."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import CAT_CLASSES, ESPRESSO_CLASS


def one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_search_show_list_without_anything_installed(hub_home, run_hub):
    found = run_hub("search", "lite", check=True)
    rows = found.stdout.splitlines()
    assert rows[0].split() == ["NAME", "VERSION", "TASK", "SUMMARY"]
    assert [r.split()[0] for r in rows[2:5]] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    as_json = json.loads(run_hub("search", "resnet", "--json", check=True).stdout)
    assert as_json[0]["name"] == "resnet50"
    shown = run_hub("show", "efficientnet_lite0", check=True).stdout
    assert "tf_efficientnet_lite0" in shown and "stage4" in shown and "installed     no" in shown
    assert json.loads(run_hub("show", "efficientnet_lite1", "--json", check=True).stdout)["preprocessing"]["input_size"] == [3, 240, 240]
    assert "no module installed" in run_hub("list", check=True).stdout


def test_install_run_list_uninstall_end_to_end(hub_home, run_hub, photos):
    assert "installed efficientnet_lite0==1.0.0" in run_hub("install", "efficientnet_lite0", check=True).stdout
    listed = run_hub("list", "--json", check=True)
    assert [m["name"] for m in json.loads(listed.stdout)] == ["efficientnet_lite0"]
    out = run_hub("run", "efficientnet_lite0", "--input_path", str(photos["espresso"]), "--top_k", "3", check=True).stdout
    lines = out.splitlines()
    assert lines[0] == str(photos["espresso"]) and "espresso" in lines[1] and "(967)" in lines[1] and len(lines) == 4
    result = json.loads(run_hub("run", "efficientnet_lite0", "--input_path", str(photos["cat"]), "--json", check=True).stdout)
    assert result["module"] == "efficientnet_lite0==1.0.0"
    assert result["predictions"][0]["top_k"][0]["index"] in CAT_CLASSES
    assert len(result["predictions"][0]["top_k"]) == 5
    assert "uninstalled efficientnet_lite0 1.0.0" in run_hub("uninstall", "efficientnet_lite0", check=True).stdout
    assert "no module installed" in run_hub("list", check=True).stdout


def test_run_installs_a_missing_module_first(hub_home, run_hub, photos):
    out = run_hub("run", "efficientnet_lite0", "--input_path", str(photos["espresso"]), "--top_k", "1", check=True)
    assert "espresso" in out.stdout
    assert "efficientnet_lite0" in run_hub("list", check=True).stdout


def test_run_on_a_folder_reports_bad_files_and_predicts_the_rest(lite0_home, run_hub, photos, tmp_path):
    shutil.copy(photos["cat"], tmp_path / "a_cat.jpg")
    shutil.copy(photos["espresso"], tmp_path / "b_espresso.jpg")
    (tmp_path / "c_readme.txt").write_text("hello")
    (tmp_path / "d_corrupt.jpg").write_bytes(photos["espresso"].read_bytes()[:1500])
    proc = run_hub("run", "efficientnet_lite0", "--input_path", str(tmp_path), "--json")
    assert proc.returncode == 1
    predictions = {Path(p["source"]).name: p for p in json.loads(proc.stdout)["predictions"]}
    assert predictions["a_cat.jpg"]["top_k"][0]["index"] in CAT_CLASSES
    assert predictions["b_espresso.jpg"]["top_k"][0]["index"] == ESPRESSO_CLASS
    assert "c_readme.txt" in proc.stderr and "d_corrupt.jpg" in proc.stderr
    assert "2 of 4 inputs could not be read" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, expected", [
    (("run", "efficientnet_lit0", "--input_path", "x.jpg"), "did you mean: efficientnet_lite0"),
    (("install", "efficientnet_lite0==9.0"), "has no version 9.0 (available: 1.0.0)"),
    (("show", "nonexistent_model"), "no module named 'nonexistent_model'"),
    (("uninstall", "efficientnet_lite2"), "is not installed"),
])
def test_expected_failures_print_one_line_and_exit_1(lite0_home, run_hub, args, expected):
    proc = run_hub(*args)
    assert proc.returncode == 1
    assert expected in one_error_line(proc)


def test_non_image_and_missing_inputs_to_run(lite0_home, run_hub, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not really a jpeg")
    proc = run_hub("run", "efficientnet_lite0", "--input_path", str(text))
    assert proc.returncode == 1 and "notes.jpg: not an image file" in one_error_line(proc)
    proc = run_hub("run", "efficientnet_lite0", "--input_path", str(tmp_path / "missing.jpg"))
    assert proc.returncode == 1 and "no such file" in one_error_line(proc)


def test_a_cache_the_machine_cannot_write_is_one_line_not_a_traceback(run_hub, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("HUBKIT_HOME points below a file")
    proc = run_hub("install", "efficientnet_lite0", env={"HUBKIT_HOME": str(blocker / "home")})
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert "Not a directory" in line and str(blocker) in line and "HUBKIT_HOME" in line


def test_usage_errors_exit_2(run_hub):
    assert run_hub("run", "efficientnet_lite0").returncode == 2  # --input_path missing
    assert run_hub("run", "efficientnet_lite0", "--input_path", "x", "--top_k", "0").returncode == 2
    assert run_hub("no-such-command").returncode == 2


def test_download_then_install_the_archive(lite0_home, run_hub, tmp_path):
    out = run_hub("download", "efficientnet_lite0", "--output_path", str(tmp_path), check=True).stdout
    archive = tmp_path / "efficientnet_lite0-1.0.0.tar.gz"
    assert str(archive) in out and archive.is_file()
    run_hub("uninstall", "efficientnet_lite0", check=True)
    assert "installed efficientnet_lite0==1.0.0" in run_hub("install", str(archive), check=True).stdout


def test_cache_verify_finds_a_damaged_install(lite0_home, run_hub):
    assert "1 modules verified" in run_hub("cache", "verify", check=True).stdout
    weights = next(lite0_home.glob("modules/efficientnet_lite0/snapshots/*/weights.safetensors"))
    with open(weights, "r+b") as f:
        f.seek(4096)
        f.write(b"\x00" * 16)
    proc = run_hub("cache", "verify")
    assert proc.returncode == 1 and "BAD  efficientnet_lite0==1.0.0" in proc.stdout
    assert "hub install --force efficientnet_lite0==1.0.0" in one_error_line(proc)
    assert str(lite0_home) == run_hub("cache", "dir", check=True).stdout.strip()


def test_the_hub_console_script_is_installed():
    script = Path(sys.executable).parent / "hub"
    assert script.exists() or shutil.which("hub"), "the `hub` console script is not installed"
