"""Every environment variable hubkit reads, read once, here.

Other modules read these attributes at call time (``constants.HUBKIT_HOME``), never
copy them at import, so a test or an embedding application can point them elsewhere.
"""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _default_home() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "hubkit"


#: Root of the local cache: installed modules, downloaded blobs, locks, feature caches.
HUBKIT_HOME: Path = Path(os.environ["HUBKIT_HOME"]).expanduser() if os.environ.get("HUBKIT_HOME") else _default_home()

#: When true, hubkit never opens a network connection and says so when something is missing.
HUBKIT_OFFLINE: bool = _env_flag("HUBKIT_OFFLINE")

#: An extra registry (a path or an http(s) URL to a registry.json) searched before the built-in one.
HUBKIT_REGISTRY: str | None = os.environ.get("HUBKIT_REGISTRY") or None

#: The catalogue of timm's pretrained weights searched after the registries: unset for the one shipped
#: with hubkit, a path to another ``catalogue.json.gz``, or ``off`` to search the registries only.
HUBKIT_CATALOGUE: str | None = os.environ.get("HUBKIT_CATALOGUE") or None

#: Seconds to wait for a server to answer before giving up on it.
HUBKIT_HTTP_TIMEOUT: float = float(os.environ.get("HUBKIT_HTTP_TIMEOUT", "20"))

#: How many times a failed download is retried (with exponential backoff) before it is reported.
HUBKIT_HTTP_RETRIES: int = int(os.environ.get("HUBKIT_HTTP_RETRIES", "3"))

#: Largest download accepted when its source declares no size (a declared size is itself the cap):
#: a server that keeps sending is cut off here instead of filling the disk. Default 20 GiB.
HUBKIT_MAX_DOWNLOAD_BYTES: int = int(os.environ.get("HUBKIT_MAX_DOWNLOAD_BYTES", str(20 << 30)))

#: Most bytes an archive (a module .tar.gz/.zip, a `hub pack` bundle) may unpack to, counted while it is
#: unpacked: a small archive of zeros cannot fill the disk. Default 20 GiB; raise it for huge bundles.
HUBKIT_MAX_EXTRACT_BYTES: int = int(os.environ.get("HUBKIT_MAX_EXTRACT_BYTES", str(20 << 30)))

#: Most members (files and folders) an archive may hold; a module has four files, a bundle four per module.
HUBKIT_MAX_ARCHIVE_MEMBERS: int = int(os.environ.get("HUBKIT_MAX_ARCHIVE_MEMBERS", "10000"))

#: Hide progress bars (also hidden when stderr is not a terminal).
HUBKIT_DISABLE_PROGRESS: bool = _env_flag("HUBKIT_DISABLE_PROGRESS")

#: Set by torchrun in each process it starts: this process's global rank, how many processes take
#: part, and its rank on this node (hubkit.finetune.distributed joins the process group when > 1).
DIST_RANK: int = int(os.environ.get("RANK") or 0)
DIST_WORLD_SIZE: int = int(os.environ.get("WORLD_SIZE") or 1)
DIST_LOCAL_RANK: int = int(os.environ.get("LOCAL_RANK") or 0)

#: Seconds a rank waits for the others (e.g. while rank 0 installs a module or builds a feature cache
#: and the rest wait at a barrier) before the distributed job fails.
HUBKIT_DIST_TIMEOUT: float = float(os.environ.get("HUBKIT_DIST_TIMEOUT", "3600"))

PACKAGE_ROOT: Path = Path(__file__).resolve().parent


def _builtin_registry() -> Path:
    """The built-in ``registry.json``: in the source checkout, else where the wheel's data files went."""
    source_tree = PACKAGE_ROOT.parent / "registry.json"
    if source_tree.is_file():
        return source_tree
    return Path(sysconfig.get_path("data")) / "share" / "hubkit" / "registry.json"


#: The index of the modules shipped with hubkit (``modules/`` beside it).
BUILTIN_REGISTRY: Path = _builtin_registry()

MANIFEST_FILENAME = "module.json"
WEIGHTS_FILENAME = "weights.safetensors"
INSTALL_RECORD_FILENAME = "install.json"

#: The compiled runtimes hubkit can run a module with besides torch, and the files of each one's
#: artefact in the module's snapshot (beside the weights, hashed in the install record).
COMPILED_RUNTIMES = ("openvino", "onnxruntime")
COMPILED_FILES = {"openvino": ("model.xml", "model.bin"), "onnxruntime": ("model.onnx",)}

#: The runtime ``runtime="auto"`` picks on a CPU (docs/performance.md says why); torch on CUDA.
DEFAULT_CPU_RUNTIME = "openvino"
