"""Module archives: pack a module folder, and unpack strangers' archives safely.

Every member is checked before anything is written: absolute paths, ``..`` components,
links (symbolic or hard) and device or fifo entries are refused, so an archive can never
write outside the folder it is unpacked into. The member count and the unpacked bytes are
capped (``HUBKIT_MAX_ARCHIVE_MEMBERS``, ``HUBKIT_MAX_EXTRACT_BYTES``): declared sizes are
checked first, and the bytes really written are counted while unpacking.
"""
from __future__ import annotations

import gzip
import lzma
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from .. import constants
from ..errors import UnsafeContentError
from .fs import CHUNK, atomic_output

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
#: What a truncated or corrupted archive raises while it is listed or read (a file that is no
#: archive at all fails in tarfile.open with a TarError).
DAMAGED_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


def is_archive(path: str | Path) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def _check_name(archive: Path, name: str) -> None:
    if not name or "\x00" in name:
        raise UnsafeContentError(f"{archive.name}: a member has an empty name or a NUL byte in it; refusing to unpack")
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeContentError(f"{archive.name}: member '{name}' has an absolute path; refusing to unpack")
    if ".." in pure.parts:
        raise UnsafeContentError(f"{archive.name}: member '{name}' points outside the archive ('..'); refusing to unpack")


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    """Unpack ``archive`` into ``dest`` after checking every member; returns ``dest``.

    A damaged archive (truncated, bad compression) is reported as such; what it wrote before the
    damage was found stays in ``dest``, so callers unpack into a temporary folder. An archive over
    the size or member limits is refused, and what it wrote before that is removed.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    budget = _Budget(archive)
    existing = set(dest.iterdir())
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest, budget)
        else:
            _extract_tar(archive, dest, budget)
    except DAMAGED_ARCHIVE_ERRORS as exc:
        raise UnsafeContentError(f"{archive.name} is damaged or not a tar or zip archive: {type(exc).__name__}: {exc}",
                                 hint="download or export it again") from None
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
        raise UnsafeContentError(f"{archive.name} has members that collide (a file and a folder of one name): {exc}",
                                 hint="download or export it again") from None
    except _TooLarge as exc:
        for child in set(dest.iterdir()) - existing:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        raise UnsafeContentError(str(exc), hint="raise HUBKIT_MAX_EXTRACT_BYTES / HUBKIT_MAX_ARCHIVE_MEMBERS "
                                                "if you trust this archive") from None
    return dest


class _TooLarge(Exception):
    pass


class _Budget:
    """What an archive may still unpack: members and bytes, from the limits in ``constants``."""

    def __init__(self, archive: Path):
        self.archive = archive
        self.members, self.bytes = constants.HUBKIT_MAX_ARCHIVE_MEMBERS, constants.HUBKIT_MAX_EXTRACT_BYTES

    def declare(self, count: int, total: int) -> None:
        """Refuse before writing when the members or their declared sizes are already over the limits."""
        if count > self.members:
            raise _TooLarge(f"{self.archive.name} has {count} members, more than the limit of {self.members}; "
                            "refusing to unpack")
        self.spend(total)
        self.bytes += total  # declared only: the bytes are counted again as they are written

    def spend(self, n: int) -> None:
        if n > self.bytes:
            raise _TooLarge(f"{self.archive.name} unpacks to more than {constants.HUBKIT_MAX_EXTRACT_BYTES} bytes "
                            "(HUBKIT_MAX_EXTRACT_BYTES); refusing to unpack")
        self.bytes -= n


def _extract_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            _check_name(archive, info.filename)
            # Only the file-type bits count: zip tools that store no Unix mode (or ZipFile.writestr,
            # which stores 0o600 without them) write plain files, and a plain file is safe.
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise UnsafeContentError(f"{archive.name}: member '{info.filename}' is a link or special file; refusing to unpack")
        budget.declare(len(infos), sum(i.file_size for i in infos))
        for info in infos:
            target = dest.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(CHUNK):
                    budget.spend(len(chunk))  # counted as written: a declared size may lie
                    out.write(chunk)


def _extract_tar(archive: Path, dest: Path, budget: _Budget) -> None:
    with tarfile.open(archive) as tf:
        members = []
        for m in tf:  # one pass, stopped at the member limit: never lists an endless archive whole
            members.append(m)
            if len(members) > budget.members:
                budget.declare(len(members), 0)
        for m in members:
            _check_name(archive, m.name)
            if m.issym() or m.islnk():
                raise UnsafeContentError(f"{archive.name}: member '{m.name}' is a link; refusing to unpack")
            if not (m.isfile() or m.isdir()) or m.issparse():
                raise UnsafeContentError(f"{archive.name}: member '{m.name}' is a device or special file; refusing to unpack")
        # A tar member holds exactly its header's size (tarfile reads no more), so the sum is what is written.
        budget.declare(len(members), sum(m.size for m in members if m.isfile()))
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - Python < 3.11.4; the checks above already cover what 'data' refuses
            tf.extractall(dest, members=members)


def pack_folder(folder: str | Path, archive: str | Path, arcname: str) -> Path:
    """Write ``folder`` as a ``.tar.gz`` whose single top-level folder is ``arcname``."""
    folder, archive = Path(folder), Path(archive)
    with atomic_output(archive) as tmp, tarfile.open(tmp, "w:gz") as tf:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                tf.add(path, arcname=f"{arcname}/{path.name}")
    return archive
