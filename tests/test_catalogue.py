"""The catalogue: every pretrained timm weight on the Hub as a module, searched offline, installed from a loopback Hub."""
from __future__ import annotations

import hashlib
import json
import random
import socket
import sys
import time

import pytest
import timm
import torch
from conftest import EXAMPLES, HUB_COMMIT, REPO
from huggingface_hub import constants as hf_constants
from PIL import Image
from safetensors.torch import load, save

import hubkit
from hubkit import constants
from hubkit.errors import IntegrityError, ManifestError, OfflineError
from hubkit.hub.cache import Cache
from hubkit.hub.catalogue import Catalogue, licence_terms, parse_params
from hubkit.hub.labels import read_labels
from hubkit.hub.registry import CatalogueEntry, SearchFilters, all_entries, resolve, search
from hubkit.installer import install_manifest

sys.path.insert(0, str(REPO / "scripts"))
import build_catalogue  # noqa: E402  (a script, not a package: found through the path above)

TINY = "test_resnet.r160_in1k"  # a real catalogue entry: timm's 0.5M-parameter test ResNet, 160 px
TINY_REPO = f"timm/{TINY}"


@pytest.fixture(scope="session")
def tiny_weights() -> bytes:
    """The tiny model's weights as the Hub would serve them (safetensors), random but decisive."""

    torch.manual_seed(0)
    model = timm.create_model(TINY, pretrained=False)
    torch.nn.init.normal_(model.fc.weight, std=0.5)  # a zero-initialised head would tie every class
    return save({k: v.contiguous() for k, v in model.state_dict().items()})


@pytest.fixture
def tiny_hub(hf_hub, tiny_weights, hub_home):
    hf_hub.files[(TINY_REPO, "model.safetensors")] = tiny_weights
    return hf_hub


# --- the catalogue as shipped ------------------------------------------------------------------
def test_catalogue_lists_the_timm_hub_weights_and_builtins_win():
    entries = all_entries()
    catalogue = [e for e in entries if isinstance(e, CatalogueEntry)]
    assert len(catalogue) >= 1700 and len({e.name for e in entries}) == len(entries)
    assert not isinstance(resolve("resnet50"), CatalogueEntry)  # the built-in module, not resnet50's default tag
    assert resolve("resnet50.a1_in1k").name == "resnet50.a1_in1k"
    default = resolve("convnext_small")  # a bare architecture name resolves to timm's default tag
    assert isinstance(default, CatalogueEntry) and default.name.startswith("convnext_small.")
    assert "convnext_small" in default.aliases


def test_catalogue_manifests_are_real_manifests_with_shared_label_sets():
    catalogue = Catalogue.load()
    by_set = {}
    for entry in all_entries():
        if isinstance(entry, CatalogueEntry) and entry.task == "image_classification":
            by_set.setdefault(catalogue.records[entry.name].labels, entry)
    assert {"imagenet-1k", "imagenet-12k", "imagenet-22k"} <= set(by_set)
    for subset, entry in by_set.items():
        manifest = entry.load_manifest()
        labels = read_labels(manifest)
        assert len(labels) == manifest.num_classes == catalogue.label_sets[subset]["count"]
        assert manifest.labels_file == catalogue.label_sets[subset]["file"]  # by reference, stored once
    lite = resolve("tf_efficientnet_lite0.in1k").load_manifest()
    assert read_labels(lite)[281] == "tabby, tabby cat"
    dino = resolve("vit_small_patch14_dinov2.lvd142m").load_manifest()
    assert dino.task == "feature_extraction" and dino.num_classes == 0 and dino.labels_file is None
    assert dino.weights[0].url == "hf://timm/vit_small_patch14_dinov2.lvd142m@main/model.safetensors"
    assert dino.preprocessing.input_size == (3, 518, 518) and dino.features.taps[-1].stride == 14


def test_committed_catalogue_is_in_sync_with_timm():

    assert build_catalogue.check_cheap() == [], "run python scripts/build_catalogue.py"


def test_show_prints_preprocessing_taps_licence_and_size_offline(run_hub, hub_home):
    shown = run_hub("show", "vit_small_patch14_dinov2.lvd142m", env={"HUBKIT_OFFLINE": "1"}, check=True).stdout
    assert "518x518, bicubic, crop 1.0" in shown and "22.1M parameters" in shown
    assert "licence       apache-2.0" in shown and "blocks.11: 384 channels, stride 14" in shown
    assert "labels        none: a feature extractor" in shown
    nc = run_hub("show", "convnextv2_atto.fcmae", env={"HUBKIT_OFFLINE": "1"}, check=True).stdout
    assert "cc-by-nc-4.0  (NON-COMMERCIAL" in nc


def test_search_filters_and_ranks_the_whole_catalogue():
    every = search(filters=SearchFilters())
    assert len(every) >= 1700
    assert search("convnext_small")[0].name.startswith("convnext_small.")  # the default tag first
    assert search("resnet50")[0].name == "resnet50"  # the built-in first
    small_headless = search(filters=SearchFilters(headless=True, max_params=parse_params("30M")))
    assert small_headless and all(e.headless and e.params <= 30e6 for e in small_headless)
    assert any(e.name == "vit_small_patch14_dinov2.lvd142m" for e in small_headless)
    nc = search(filters=SearchFilters(license="non-commercial"))
    assert nc and all(licence_terms(e.license) == "non-commercial" for e in nc)
    assert {e.license for e in search(filters=SearchFilters(license="apache-2.0,mit"))} == {"apache-2.0", "mit"}
    at_384 = search("vit", filters=SearchFilters(input_size=384, task="image_classification", tags=("in21k",)))
    assert at_384 and all(e.input_size == 384 and "in21k" in e.tags and not e.headless for e in at_384)
    assert len(search("vit", limit=5)) == 5
    words = search("dinov2 small")
    assert words[0].name.startswith("vit_small_patch14") and "dinov2" in words[0].name


def test_search_cli_maps_every_filter(run_hub, hub_home):
    out = run_hub("search", "vit", "--headless", "--max-params", "25M", "--license", "permissive", "--input-size", "518",
                  "--limit", "0", "--json", check=True).stdout
    found = json.loads(out)
    assert any(e["name"] == "vit_small_patch14_dinov2.lvd142m" for e in found)
    assert all(e["headless"] and e["params"] <= 25e6 and e["input_size"] == 518 and e["licence_terms"] == "permissive"
               for e in found)
    table = run_hub("search", "fcmae", "--limit", "3", check=True).stdout
    assert "(non-commercial)" in table and "more of" in table
    bad = run_hub("search", "--max-params", "lots")
    assert bad.returncode == 2 and "not a parameter count" in bad.stderr


# --- installing from a Hub on loopback ---------------------------------------------------------
@pytest.mark.slow
def test_install_run_lock_pack_unpack_from_the_hub(tiny_hub, tiny_weights, run_hub, hub_home, tmp_path):
    env = tiny_hub.env(hub_home)
    installed = run_hub("install", TINY, env=env, check=True)
    assert f"installed {TINY}==" in installed.stdout
    module = Cache(hub_home).get(TINY)
    assert module.record["source"] == f"hf://{TINY_REPO}@{HUB_COMMIT}/model.safetensors"  # main, pinned to its commit
    assert module.record["source_sha256"] == hashlib.sha256(tiny_weights).hexdigest()
    run_hub("cache", "verify", env=env, check=True)

    ran = json.loads(run_hub("run", TINY, "--input_path", str(EXAMPLES / "chelsea.jpg"), "--json", "--top_k", "3",
                             env=env, check=True).stdout)
    top = ran["predictions"][0]["top_k"]
    assert top[0]["index"] == _reference_top1(tiny_weights) and top[0]["label"] == read_labels(
        resolve(TINY).load_manifest())[top[0]["index"]]

    lock, bundle = tmp_path / "hub.lock", tmp_path / "bundle.tar"
    run_hub("lock", TINY, "-o", str(lock), env=env, check=True)
    assert json.loads(lock.read_text())["modules"][0]["source"] == module.record["source"]
    run_hub("pack", "--lock", str(lock), "-o", str(bundle), env=env, check=True)
    served = len(tiny_hub.faults.requests)
    airgapped = {**env, "HUBKIT_HOME": str(tmp_path / "airgapped"), "HUBKIT_OFFLINE": "1"}
    run_hub("unpack", str(bundle), "--lock", str(lock), env=airgapped, check=True)
    again = Cache(tmp_path / "airgapped").get(TINY)
    assert again.record["weights_sha256"] == module.record["weights_sha256"]
    assert again.record["source"] == module.record["source"]
    assert len(tiny_hub.faults.requests) == served  # the air-gapped side never asked the Hub


def _reference_top1(weights: bytes) -> int:
    """timm's own prediction for the cat photo with these weights and timm's own eval transform."""

    model = timm.create_model(TINY, pretrained=False)
    model.load_state_dict(load(weights))
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.inference_mode():
        return int(model.eval()(transform(Image.open(EXAMPLES / "chelsea.jpg").convert("RGB"))[None]).argmax())


@pytest.mark.slow
def test_a_corrupted_download_is_refused_then_fetched_again(tiny_hub, hub_home):

    tiny_hub.faults.corrupt = True
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        hubkit.install(TINY, progress=False)
    assert Cache(hub_home).get(TINY) is None
    tiny_hub.faults.corrupt = False  # the damaged file was discarded: the next install downloads it again
    assert hubkit.install(TINY, progress=False).record["source"].endswith("/model.safetensors")


def test_offline_install_fails_fast_naming_the_source_and_never_asks_the_hub(tiny_hub, monkeypatch, run_hub, hub_home):

    monkeypatch.setattr(constants, "HUBKIT_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(OfflineError, match=f"hf://{TINY_REPO}@main/model.safetensors"):
        hubkit.install(TINY, progress=False)
    assert time.perf_counter() - started < 1.0
    cli = run_hub("install", TINY, env={**tiny_hub.env(hub_home), "HUBKIT_OFFLINE": "1"})
    assert cli.returncode == 1 and cli.stderr.startswith("error: offline mode is on") and TINY_REPO in cli.stderr
    assert tiny_hub.faults.requests == []


def test_an_unreachable_hub_fails_fast(hub_home, monkeypatch):

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(hf_constants, "ENDPOINT", closed)
    started = time.perf_counter()
    with pytest.raises(OfflineError, match=f"cannot reach the Hugging Face Hub.*{TINY_REPO}"):
        hubkit.install(TINY, progress=False)
    assert time.perf_counter() - started < 1.0


def test_an_architecture_missing_from_timm_is_named_before_any_download(tiny_hub, hub_home):

    catalogue = Catalogue.load()
    record = catalogue.records[TINY]
    future = Catalogue.from_dict({"format": 1, "timm": "99.0.0", "label_sets": catalogue.label_sets,
                                  "architectures": catalogue.architectures,
                                  "modules": [{**record.data, "tag": "resnet1000.from_the_future", "hf": TINY_REPO,
                                               "features": catalogue.architectures["test_resnet"]["features"]}]},
                                 catalogue.location)
    entry = CatalogueEntry(future, future.records["resnet1000.from_the_future"])
    with pytest.raises(ManifestError, match="has no architecture 'resnet1000'.*upgrade timm"):
        install_manifest(entry.load_manifest(), progress=False)
    assert tiny_hub.faults.requests == []


@pytest.mark.slow
def test_headless_module_gives_features_and_hub_run_refuses_it(hf_hub, hub_home, run_hub):
    """A feature extractor (no classifier head) installs and gives features through context(); hub run says why not."""

    tag = "convnextv2_atto.fcmae"  # the smallest headless entry with taps: 3.4M parameters
    model = timm.create_model(tag, pretrained=False)
    hf_hub.files[(f"timm/{tag}", "model.safetensors")] = save({k: v.contiguous() for k, v in model.state_dict().items()})
    context = hubkit.Module(name=tag, device="cpu").context(trainable=False)
    features = context.extract(torch.rand(1, 3, 224, 224), taps=["stage3"])
    assert features["pooled"].shape == (1, context.features.pooled_channels) and features["stage3"].shape[1] == 320
    refused = run_hub("run", tag, "--input_path", str(EXAMPLES / "chelsea.jpg"), env=hf_hub.env(hub_home))
    assert refused.returncode == 1 and refused.stderr.startswith(f"error: {tag}==") and "feature extractor" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


# --- taps declared by the catalogue match the models ------------------------------------------------
@pytest.mark.slow
def test_twenty_random_entries_build_on_meta_and_their_taps_match_real_feature_shapes():

    catalogue = Catalogue.load()
    tags = random.Random(11).sample(sorted(catalogue.records), 20)
    for tag in tags:
        manifest = resolve(tag).load_manifest()
        model = build_catalogue.meta_model(tag)
        assert sum(p.numel() for p in model.parameters()) == manifest.params, tag
        shapes = _record_output_shapes(model, {tap.name: tap.module for tap in manifest.features.taps})
        _, height, width = manifest.preprocessing.input_size
        with torch.no_grad():
            model.forward_features(torch.empty(1, 3, height, width, device="meta"))
        for tap in manifest.features.taps:
            shape = shapes[tap.name]
            assert tap.channels in (shape[1], shape[-1]), (tag, tap, shape)
            if len(shape) == 4:  # a feature map (NCHW or NHWC): its size is the input's over the stride
                spatial = shape[2:] if shape[1] == tap.channels else shape[1:3]
                assert abs(spatial[0] - height / tap.stride) <= 1, (tag, tap, shape)
            else:  # tokens (N, L, C): one per stride x stride patch, plus a few class/register tokens
                assert 0 <= shape[1] - (height // tap.stride) * (width // tap.stride) <= 16, (tag, tap, shape)


def _record_output_shapes(model: torch.nn.Module, modules: dict[str, str]) -> dict[str, tuple]:
    """Forward hooks that record, by tap name, the output shape of each named submodule."""
    shapes: dict[str, tuple] = {}
    for name, module in modules.items():
        def hook(_module, _inputs, out, name=name):
            shapes[name] = tuple((out[0] if isinstance(out, (tuple, list)) else out).shape)
        model.get_submodule(module).register_forward_hook(hook)
    return shapes
