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
import textwrap
import time
from importlib import metadata
from pathlib import Path

import pytest
from filelock import FileLock

from hubkit import api, constants
from hubkit._cache import Cache
from hubkit._download import download_file, fetch_bytes
from hubkit._fs import atomic_write_text, sha256_file
from hubkit.errors import DownloadError, IntegrityError, OfflineError

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


@pytest.mark.parametrize("fault", ["corrupt", "wrong_size"])
def test_bad_download_removes_its_temporary_file_and_never_appears(file_server, fault, blobs):
    url, data, sha = serve_blob(file_server)
    if fault == "corrupt":
        file_server.faults.corrupt = True
    else:
        (file_server.root / "blob.bin").write_bytes(data + b"extra")
    target = blobs / sha
    with pytest.raises(IntegrityError) as err:
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
    from hubkit._download import download_file
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


def test_unreachable_server_is_a_download_error(blobs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket is closed
    url = f"http://127.0.0.1:{port}/x.bin"
    with pytest.raises(DownloadError) as err:
        download_file(url, blobs / ("0" * 64), sha256="0" * 64, size=10, progress=False)
    assert url in str(err.value)
    with pytest.raises(DownloadError):
        fetch_bytes(url)
