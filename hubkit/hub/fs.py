"""Small file-system primitives: hashing, atomic writes (temporary file, fsync, rename), bounded
reads of small files, and paths that must stay inside a folder."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import UnsafeContentError

if TYPE_CHECKING:  # pragma: no cover
    from filelock import FileLock

CHUNK = 1 << 20
#: Largest metadata file read whole (a registry, a manifest, a label list, a lockfile): 16 MiB is
#: hundreds of times the largest real one, and bounds what a hostile or wrong path (``/dev/zero``) costs.
MAX_METADATA_BYTES = 16 << 20


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_lock(path: str | Path) -> FileLock:
    """An inter-process lock on ``path`` (released by the OS if its holder dies: ``flock``)."""
    from filelock import FileLock  # noqa: PLC0415 (filelock's import costs a third of `hub search`, which never locks)

    return FileLock(str(path))


#: The process umask, read once: files hubkit creates get ``0o666 & ~UMASK`` like any ``open()``
#: (``mkstemp`` makes them 0600, which would hide a shared cache or checkpoint folder from other users).
UMASK = _current_umask()


def follow_umask(path: str | Path, *, directory: bool = False) -> None:
    """Give ``path`` (made by ``mkstemp``/``mkdtemp``) the permissions ``open``/``mkdir`` would have."""
    os.chmod(path, (0o777 if directory else 0o666) & ~UMASK)


def read_capped(path: str | Path, max_bytes: int = MAX_METADATA_BYTES) -> bytes:
    """The bytes of a small file; ``ValueError`` when it holds more than ``max_bytes`` (never reads more)."""
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path} is larger than {max_bytes} bytes, too large for a metadata file")
    return data


def resolve_within(root: str | Path, *parts: str) -> Path:
    """``root/parts...`` with symbolic links resolved, refused unless it stays inside ``root``.

    The one gate for every path that a file (a manifest, a ref) names: ``..``, absolute paths and links
    that lead elsewhere raise ``UnsafeContentError`` instead of reaching outside the folder.
    """
    base = Path(root).resolve()
    target = base.joinpath(*parts).resolve()
    if target != base and base not in target.parents:
        shown = "/".join(parts)
        raise UnsafeContentError(f"'{shown}' leads outside {root}; refusing to use it",
                                 hint="a module's files must be inside its folder, the cache's inside HUBKIT_HOME")
    return target


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either its old content or all of the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; on success it is fsynced and renamed onto
    ``path``, on any error removed, so ``path`` never holds a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".incomplete")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
