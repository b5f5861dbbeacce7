"""Module archives: pack a module folder, and unpack strangers' archives safely.

Every member is checked before anything is written: absolute paths, ``..`` components,
links (symbolic or hard) and device or fifo entries are refused, so an archive can never
write outside the folder it is unpacked into.
"""
from __future__ import annotations

import gzip
import lzma
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from ._fs import atomic_output
from .errors import UnsafeContentError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
#: What a truncated or corrupted archive raises while it is listed or read (a file that is no
#: archive at all fails in tarfile.open with a TarError).
DAMAGED_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)


def is_archive(path: str | Path) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


def _check_name(archive: Path, name: str) -> None:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeContentError(f"{archive.name}: member '{name}' has an absolute path; refusing to unpack")
    if ".." in pure.parts:
        raise UnsafeContentError(f"{archive.name}: member '{name}' points outside the archive ('..'); refusing to unpack")


def safe_extract(archive: str | Path, dest: str | Path) -> Path:
    """Unpack ``archive`` into ``dest`` after checking every member; returns ``dest``.

    A damaged archive (truncated, bad compression) is reported as such; what it wrote before the
    damage was found stays in ``dest``, so callers unpack into a temporary folder.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest)
        else:
            _extract_tar(archive, dest)
    except DAMAGED_ARCHIVE_ERRORS as exc:
        raise UnsafeContentError(f"{archive.name} is damaged or not a tar or zip archive: {type(exc).__name__}: {exc}",
                                 hint="download or export it again") from None
    return dest


def _extract_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            _check_name(archive, info.filename)
            mode = info.external_attr >> 16
            if mode and (stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))):
                raise UnsafeContentError(f"{archive.name}: member '{info.filename}' is a link or special file; refusing to unpack")
        zf.extractall(dest)


def _extract_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        for m in members:
            _check_name(archive, m.name)
            if m.issym() or m.islnk():
                raise UnsafeContentError(f"{archive.name}: member '{m.name}' is a link; refusing to unpack")
            if not (m.isfile() or m.isdir()):
                raise UnsafeContentError(f"{archive.name}: member '{m.name}' is a device or special file; refusing to unpack")
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
