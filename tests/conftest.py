"""Shared fixtures: an isolated cache, real photos, a real HTTP server on loopback, the CLI."""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants
from hypothesis import settings

from hubkit import constants
from hubkit.serving import free_port, wait_until_ready

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
    """A cache with efficientnet_lite0 installed from the package-index dependency, and converted for
    both compiled runtimes (what the first use of each does), built once."""
    import hubkit
    from hubkit.hub.cache import Cache

    home = tmp_path_factory.mktemp("lite0home")
    hubkit.install("efficientnet_lite0", cache=Cache(home), progress=False)
    for runtime in constants.COMPILED_RUNTIMES:
        hubkit.Module(name="efficientnet_lite0", cache=Cache(home), device="cpu", runtime=runtime, precision="fp32").load()
    return home


@pytest.fixture
def lite0_home(_lite0_home, tmp_path, monkeypatch) -> Path:
    """A private copy of a cache where efficientnet_lite0 is installed (safe to modify). Features cached there by
    earlier tests are left out, so each test starts from the install alone, whatever ran before it."""
    home = tmp_path / "hubhome"
    shutil.copytree(_lite0_home, home, ignore=lambda folder, names: ["features"] if Path(folder) == _lite0_home else [])
    monkeypatch.setattr(constants, "HUBKIT_HOME", home)
    monkeypatch.setenv("HUBKIT_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def lite0(_lite0_home):
    """A loaded efficientnet_lite0 Module shared by read-only tests."""
    from hubkit import Module
    from hubkit.hub.cache import Cache

    return Module(name="efficientnet_lite0", cache=Cache(_lite0_home))


@pytest.fixture(scope="session")
def stage1_module_folder(_lite0_home, tmp_path_factory) -> Path:
    """efficientnet_lite0's stem and first stage exported as the module folder ``lite0_stage1``: a second
    real backbone for ranking tests, with fewer parameters, faster and weaker than lite0. Its features are
    computed by torch, so the shared install gains no compiled artefact that later tests would count."""
    import numpy as np

    from hubkit import Module
    from hubkit.data.datasets import ArrayDataset
    from hubkit.finetune import FeatureExtractionStrategy, ImageClassifierTask, RunConfig
    from hubkit.hub.cache import Cache

    lite0 = Module(name="efficientnet_lite0", cache=Cache(_lite0_home), runtime="torch")
    folder = tmp_path_factory.mktemp("stage1")
    config = RunConfig(num_epoch=1, max_steps=1, input_size=32, progress=False, checkpoint_dir=folder / "ckpt")
    task = ImageClassifierTask(lite0, ArrayDataset(np.zeros((8, 32, 32, 3), np.uint8), [0, 1] * 4, ["a", "b"]),
                               config=config, strategy=FeatureExtractionStrategy("gap_linear", cut_at="stage1"))
    task.finetune_and_eval()
    return task.export(folder / "lite0_stage1")


#: How the `digits` fixture splits its 300 images (7 batches of 32 per training epoch).
DIGITS_SPLIT = (0.7, 0.15, 0.15)


@pytest.fixture(scope="session")
def digits():
    """300 of scikit-learn's real 8x8 handwritten digits, 10 classes, split 70/15/15 (an ArrayDataset)."""
    import numpy as np  # noqa: PLC0415
    from sklearn.datasets import load_digits  # noqa: PLC0415 (scikit-learn takes seconds to import)

    from hubkit.data.datasets import ArrayDataset  # noqa: PLC0415

    d = load_digits()
    images = (d.images * 16).clip(0, 255).astype(np.uint8)
    return ArrayDataset(images[:300], d.target[:300], [str(i) for i in range(10)], seed=0, split_ratio=DIGITS_SPLIT)


@pytest.fixture(scope="session")
def digit_features(lite0) -> dict:
    """efficientnet_lite0 pooled features (1280-d) of 600 of scikit-learn's real handwritten digits
    upsampled to 32 px: {"train": (x, y) of 400, "test": (x, y) of 200}, numpy arrays."""
    # imported here, like the fixtures above: torch-free tests do not pay for torch and scikit-learn
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from sklearn.datasets import load_digits  # noqa: PLC0415

    from hubkit.data.datasets import ArrayDataset, ImageSamples  # noqa: PLC0415
    from hubkit.data.transforms import build_transform  # noqa: PLC0415
    from hubkit.hub.manifest import Preprocessing  # noqa: PLC0415

    digits = load_digits()
    data = ArrayDataset(digits.images[:600], digits.target[:600], [str(i) for i in range(10)], value_range=(0, 16),
                        splits={"train": range(400), "test": range(400, 600)})
    pre = lite0.manifest.preprocessing
    transform = build_transform(Preprocessing((3, 32, 32), pre.interpolation, pre.crop_pct, pre.mean, pre.std))
    backbone = lite0.context(trainable=False).backbone.eval()
    out = {}
    for split in ("train", "test"):
        images, labels = zip(*ImageSamples(data.samples(split), transform))
        with torch.inference_mode():
            out[split] = (backbone(torch.stack(images)).float().numpy(), np.asarray(labels))
    return out


# --- real photos ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def real_photos(tmp_path_factory) -> list[Path]:
    """Every real photo at hand: examples/*.jpg and scikit-image's colour and grey photographs saved as
    JPEG and PNG (portrait, landscape, square, small), for preprocessing and accuracy checks."""
    import numpy as np
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("real_photos")
    paths = sorted(EXAMPLES.glob("*.jpg"))
    for name in ("astronaut", "rocket", "coffee", "chelsea", "camera", "immunohistochemistry", "hubble_deep_field",
                 "retina", "coins"):
        array = np.asarray(getattr(data, name)())
        image = Image.fromarray(array[..., :3] if array.ndim == 3 else array)
        paths.append(folder / f"{name}.jpg")
        image.save(paths[-1], quality=92)
        paths.append(folder / f"{name}_portrait.png")
        image.crop((0, 0, image.width // 2, image.height)).save(paths[-1])
    return paths


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
    endless: str | None = None  # this path: no Content-Length, and after the file bytes until the client hangs up
    hang_after: int | None = None  # send this many body bytes, then go silent (the client's read times out)
    sent: int = 0  # body bytes written so far (what an endless body cost)
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
        if faults.endless == self.path:
            self._send_endless(bytes(body))
            return
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if faults.hang_after is not None:
            self.wfile.write(bytes(body[: faults.hang_after]))
            self.wfile.flush()
            time.sleep(3)
            self.close_connection = True
            return
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


    def _send_endless(self, body: bytes) -> None:
        """The file, then zeros forever, with no Content-Length (HTTP/1.0 style: the body ends at close)."""
        faults: ServerFaults = self.server.faults
        self.protocol_version = "HTTP/1.0"
        self.send_response(200)
        self.end_headers()
        self.close_connection = True
        try:
            self.wfile.write(body)
            faults.sent += len(body)
            zeros = bytes(64 << 10)
            while faults.sent < 1 << 30:  # a safety stop for the test machine: 1 GiB
                self.wfile.write(zeros)
                faults.sent += len(zeros)
        except OSError:  # the client hung up: what a fixed client does
            pass


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


# --- a Hugging Face Hub on loopback ----------------------------------------------------------------
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


class _HubHandler(http.server.BaseHTTPRequestHandler):
    """Enough of the Hub's file API for huggingface_hub: HEAD and GET of /{repo}/resolve/{revision}/{file},
    with the commit and ETag headers it requires (the ETag of an LFS file is its sha256) and Range."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(send_body=False)

    def do_GET(self):
        self._answer(send_body=True)

    def _answer(self, send_body: bool):
        hub: HubServer = self.server.hub
        hub.faults.requests.append((self.command, self.path, self.headers.get("Range")))
        match = re.fullmatch(r"/(?P<repo>[\w.\-]+/[\w.\-]+)/resolve/(?P<revision>[\w.\-]+)/(?P<file>[\w.\-/]+)",
                             self.path.split("?")[0])
        data = hub.files.get((match["repo"], match["file"])) if match and match["revision"] in ("main", HUB_COMMIT) else None
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
        body = bytearray(data[start:])
        if hub.faults.corrupt and body:
            body[len(body) // 2] ^= 0xFF
        self.send_response(206 if start else 200)
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        for key, value in (("X-Repo-Commit", HUB_COMMIT), ("ETag", etag), ("X-Linked-Etag", etag),
                           ("X-Linked-Size", str(len(data))), ("Accept-Ranges", "bytes"), ("Content-Length", str(len(body)))):
            self.send_header(key, value)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if send_body:
            self.wfile.write(bytes(body))


@dataclass
class HubServer:
    url: str
    faults: ServerFaults
    files: dict = field(default_factory=dict)  # (repo, filename) -> bytes

    def env(self, home: Path) -> dict:
        """Environment for a subprocess that uses this Hub (and its own caches under ``home``)."""
        return {"HF_ENDPOINT": self.url, "HF_HOME": str(home / "hf-home"), "HUBKIT_HOME": str(home),
                "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}


@pytest.fixture
def hf_hub(monkeypatch):
    """A Hugging Face Hub on 127.0.0.1 serving ``files``; huggingface_hub in this process points at it."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
    hub = HubServer(f"http://127.0.0.1:{server.server_address[1]}", ServerFaults())
    server.hub, server.daemon_threads = hub, True
    monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Server:
    url: str
    process: subprocess.Popen


@pytest.fixture
def lite0_server(lite0_home):
    """``hub serving start -m efficientnet_lite0`` as a real subprocess on a free loopback port, offline,
    ready when yielded; stopped afterwards, and its stderr must hold no traceback."""
    url = f"http://127.0.0.1:{free_port()}"
    process = subprocess.Popen([sys.executable, "-m", "hubkit.cli", "serving", "start", "-m", "efficientnet_lite0",
                                "-p", url.rsplit(":", 1)[1]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HUBKIT_OFFLINE": "1", "HUBKIT_DISABLE_PROGRESS": "1"})
    try:
        wait_until_ready(url, timeout=120, process=process)
        yield Server(url, process)
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert "Traceback" not in stderr, stderr


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


@pytest.fixture
def two_version_registry(tmp_path, monkeypatch):
    """A local registry listing `mylite` 1.1.0 and 1.2.0 (efficientnet_lite0's manifest and package-index weights);
    ``publish("1.1.0")`` lists only the versions given."""
    root = tmp_path / "registry"
    manifest = json.loads((REPO / "modules/efficientnet_lite0/module.json").read_text())

    def publish(*versions: str) -> None:
        entries = []
        for version in versions:
            folder = root / "modules" / f"mylite-{version}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "module.json").write_text(json.dumps({**manifest, "name": "mylite", "version": version}))
            shutil.copy(REPO / "modules/efficientnet_lite0/labels.txt", folder / "labels.txt")
            entries.append({"name": "mylite", "version": version, "summary": "lite0 again", "task": manifest["task"],
                            "manifest": f"modules/mylite-{version}/module.json"})
        (root / "registry.json").write_text(json.dumps({"format": 1, "modules": entries}))

    root.mkdir()
    publish("1.1.0", "1.2.0")
    monkeypatch.setattr(constants, "HUBKIT_REGISTRY", str(root / "registry.json"))
    monkeypatch.setenv("HUBKIT_REGISTRY", str(root / "registry.json"))
    return publish


# --- a real headless browser -------------------------------------------------------------------
@pytest.fixture(scope="session")
def browser():
    """Headless Chromium driven by selenium (Debian's chromium + chromium-driver, which .ci/run installs);
    skips, saying why, where neither can be found."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        pytest.skip("no headless browser here: install chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=900,620"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for driver.get_log("browser")
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()
