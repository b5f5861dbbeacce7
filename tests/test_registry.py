"""Registry and manifests: the generated index matches modules/, validation names file and field."""
from __future__ import annotations

import copy
import json

import pytest
from conftest import REPO

from hubkit import constants
from hubkit.errors import ManifestError, RegistryError, UnknownModuleError, UnknownVersionError
from hubkit.hub.manifest import Manifest
from hubkit.hub.registry import Registry, build_registry_index, resolve, search

BUILTIN = sorted(p.parent.name for p in (REPO / "modules").glob("*/module.json"))


def test_registry_json_is_generated_from_modules():
    on_disk = json.loads((REPO / "registry.json").read_text())
    assert on_disk == build_registry_index(REPO / "modules"), \
        "registry.json is stale: run python scripts/build_registry.py"


def test_catalogue_has_the_promised_modules():
    required = {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "mobilenetv3_large_100",
                "convnext_tiny", "vit_small_patch16_224", "efficientnet_b0", "regnety_016"}
    assert required <= set(BUILTIN)


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_manifest_is_valid_and_complete(name):
    m = Manifest.from_file(REPO / "modules" / name / "module.json")
    assert m.name == name and m.task == "image_classification"
    labels = (REPO / "modules" / name / m.labels_file).read_text().rstrip("\n").split("\n")
    assert len(labels) == m.num_classes == 1000
    assert labels[281] == "tabby, tabby cat" and labels[967] == "espresso"
    assert m.features.taps and m.features.pooled_channels > 0
    for source in m.weights:
        if source.kind != "hf":
            assert len(source.sha256) == 64 and source.size > 0


@pytest.fixture
def lite0_manifest_data() -> dict:
    return json.loads((REPO / "modules/efficientnet_lite0/module.json").read_text())


@pytest.mark.parametrize("path, expected_field", [
    (("version",), "version"),
    (("architecture", "timm_name"), "architecture.timm_name"),
    (("preprocessing", "mean"), "preprocessing.mean"),
    (("weights", "sources", 0, "sha256"), "weights.sources[0].sha256"),
    (("features", "pooled"), "features.pooled"),
])
def test_manifest_missing_field_names_file_and_field(tmp_path, lite0_manifest_data, path, expected_field):
    data = copy.deepcopy(lite0_manifest_data)
    target = data
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    file = tmp_path / "module.json"
    file.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as err:
        Manifest.from_file(file)
    assert err.value.field == expected_field
    assert str(file) in str(err.value) and expected_field in str(err.value)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(version="one"), "does not match"),
    (lambda d: d["preprocessing"].update(mean=[0.5, 0.5]), "list of 3 finite numbers"),
    (lambda d: d["preprocessing"].update(crop_pct=3), "between 0.1 and 1.0"),
    (lambda d: d["weights"]["sources"][0].update(kind="ftp"), "not one of"),
    (lambda d: d["weights"]["sources"][0].update(size="big"), "expected int"),
    (lambda d: d.update(task="segmentation"), "not one of"),
    (lambda d: d["weights"].update(sources=[]), "at least one"),
])
def test_manifest_wrong_values_are_refused(tmp_path, lite0_manifest_data, mutate, message):
    mutate(lite0_manifest_data)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_dict(lite0_manifest_data, path="module.json")


def test_manifest_that_is_not_json(tmp_path):
    file = tmp_path / "module.json"
    file.write_text("{name: lite")
    with pytest.raises(ManifestError, match="not valid JSON") as err:
        Manifest.from_file(file)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize("content, message", [
    ("not json", "cannot read registry"),
    ('{"modules": 3}', "'modules' list"),
    ('{"format": 9, "modules": []}', "unsupported format"),
    ('{"modules": [{"name": "x"}]}', "version is missing"),
    ('{"modules": [{"name": "Bad Name", "version": "1.0", "manifest": "m.json"}]}', "invalid name"),
])
def test_malformed_registry_is_refused_with_its_path(tmp_path, content, message):
    file = tmp_path / "registry.json"
    file.write_text(content)
    with pytest.raises(RegistryError, match=message) as err:
        Registry.load(file)
    assert str(file) in str(err.value)


def test_search_ranks_names_before_tags_and_summaries(monkeypatch):
    monkeypatch.setattr(constants, "HUBKIT_CATALOGUE", "off")  # the built-in registry alone (the catalogue: test_catalogue.py)
    names = [e.name for e in search("lite")]
    assert names[:3] == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    assert [e.name for e in search("efficientnet_lite0")][0] == "efficientnet_lite0"
    assert {e.name for e in search("mobile")} >= {"efficientnet_lite0", "mobilenetv3_large_100"}
    assert [e.name for e in search(r"^efficientnet_lite[12]$")] == ["efficientnet_lite1", "efficientnet_lite2"]
    assert {e.name for e in search("transformer")} == {"vit_small_patch16_224"}
    assert search("no-such-thing-anywhere") == []
    assert len(search(None)) == len(BUILTIN)


def test_unknown_module_suggests_close_names():
    with pytest.raises(UnknownModuleError) as err:
        resolve("efficientnet_lit0")
    assert "efficientnet_lite0" in err.value.suggestions
    assert isinstance(err.value, LookupError)


def test_unknown_version_lists_available():
    with pytest.raises(UnknownVersionError, match="available: 1.0.0"):
        resolve("efficientnet_lite0", "9.9.9")


def test_extra_registry_is_searched_first(tmp_path, monkeypatch, lite0_manifest_data):
    folder = tmp_path / "mods" / "efficientnet_lite0"
    folder.mkdir(parents=True)
    lite0_manifest_data["version"] = "1.1.0"
    (folder / "module.json").write_text(json.dumps(lite0_manifest_data))
    (folder / "labels.txt").write_text((REPO / "modules/efficientnet_lite0/labels.txt").read_text())
    index = build_registry_index(tmp_path / "mods")
    (tmp_path / "registry.json").write_text(json.dumps(index))
    monkeypatch.setattr(constants, "HUBKIT_REGISTRY", str(tmp_path / "registry.json"))
    entry = resolve("efficientnet_lite0")
    assert entry.version == "1.1.0" and entry.load_manifest().version == "1.1.0"
    assert resolve("efficientnet_lite0", "1.0.0").version == "1.0.0"


def test_every_module_folder_ships_in_the_wheel():
    """A non-editable install finds the registry through setup.cfg's data_files: none may be forgotten."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    shipped = {key: {f.strip() for f in value.split(",") if f.strip()} for key, value in cfg["options.data_files"].items()}
    assert shipped["share/hubkit"] == {"registry.json"}
    for name in BUILTIN:
        assert shipped[f"share/hubkit/modules/{name}"] == {f"modules/{name}/module.json", f"modules/{name}/labels.txt"}
