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

#: Seconds to wait for a server to answer before giving up on it.
HUBKIT_HTTP_TIMEOUT: float = float(os.environ.get("HUBKIT_HTTP_TIMEOUT", "20"))

#: How many times a failed download is retried (with exponential backoff) before it is reported.
HUBKIT_HTTP_RETRIES: int = int(os.environ.get("HUBKIT_HTTP_RETRIES", "3"))

#: Hide progress bars (also hidden when stderr is not a terminal).
HUBKIT_DISABLE_PROGRESS: bool = _env_flag("HUBKIT_DISABLE_PROGRESS")

#: Tests only: ``step:N`` or ``save:N`` makes a training run kill itself (SIGKILL) at that point,
#: to prove that checkpoints resume exactly. Never set it outside the test suite.
HUBKIT_TEST_KILL_AT: str | None = os.environ.get("HUBKIT_TEST_KILL_AT") or None

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
