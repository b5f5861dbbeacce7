"""The local cache: where installed modules and downloaded files live.

Layout under ``HUBKIT_HOME`` (default ``~/.cache/hubkit``)::

    modules/<name>/refs/<version>      one line: the snapshot id installed for that version
    modules/<name>/snapshots/<id>/     module.json, labels.txt, weights.safetensors, install.json
    modules/<name>/.staging-*/         an install being built (removed or renamed when done)
    blobs/<sha256>[.incomplete]        downloaded source files, content-addressed
    hf/                                huggingface_hub's own cache, for hf:// sources
    locks/<name>.lock                  one lock per module name: installs never interleave
    features/                          cached backbone features for frozen fine-tuning
    registries/<hash>.json             the last good copy of each remote registry (HUBKIT_REGISTRY)

A snapshot is complete before its ref points at it, and a ref is replaced atomically, so an
install killed at any point leaves the old version or the new one, never neither.

Nothing read back is trusted: module names and versions must match the manifest patterns, a ref
must hold a snapshot id, and every path goes through :meth:`Cache.path`, which refuses to leave
the cache root. ``install.json`` records the sha256 and size of every file of its snapshot, and
:meth:`Cache.check` compares them all.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import constants
from ..errors import IntegrityError, NotInstalledError, UnsafeContentError
from .fs import (
    MAX_METADATA_BYTES,
    atomic_write_json,
    atomic_write_text,
    file_lock,
    fsync_dir,
    read_capped,
    resolve_within,
    sha256_file,
)
from .manifest import NAME_PATTERN, VERSION_PATTERN, HasRef, Manifest, version_key

if TYPE_CHECKING:  # pragma: no cover
    from filelock import FileLock

#: What :meth:`Cache.commit` names snapshots: a timestamp and 8 random hex digits.
SNAPSHOT_ID_PATTERN = re.compile(r"^[0-9]{14}-[0-9a-f]{8}\Z")


@dataclass(frozen=True)
class InstalledModule(HasRef):
    """An installed module version: its snapshot folder, manifest and install record."""

    name: str
    version: str
    path: Path
    record: dict

    @property
    def manifest(self) -> Manifest:
        return Manifest.from_file(self.path / constants.MANIFEST_FILENAME)

    @property
    def weights_path(self) -> Path:
        return self.path / constants.WEIGHTS_FILENAME

    @property
    def files(self) -> dict[str, dict]:
        """``{file name: {"sha256", "size"}}`` for every file of the snapshot, as recorded at install
        (only the weights for an install made by a hubkit that recorded no more)."""
        files = self.record.get("files")
        if isinstance(files, dict) and files:
            return files
        return {constants.WEIGHTS_FILENAME: {"sha256": self.record.get("weights_sha256"),
                                             "size": self.record.get("weights_size")}}


@dataclass(frozen=True)
class VerifyResult:
    """One line of ``hub cache verify``: an installed version (``module`` is None when even its
    record cannot be read) or a stray entry of a ``refs/`` folder."""

    ref: str
    ok: bool
    problem: str = ""
    module: InstalledModule | None = None


class Cache:
    """Access to one cache root; every path hubkit writes to is derived here."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else Path(constants.HUBKIT_HOME)

    # --- layout ------------------------------------------------------------------------
    @property
    def modules_dir(self) -> Path:
        return self.root / "modules"

    @property
    def blobs_dir(self) -> Path:
        return self.root / "blobs"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    def path(self, name: str, *parts: str) -> Path:
        """``modules/<name>/<parts...>``: the one way to a module's files. ``name`` must be a module
        name, and the path (links resolved) must stay inside the cache root, else UnsafeContentError."""
        if not NAME_PATTERN.fullmatch(name):
            raise UnsafeContentError(f"'{name}' is not a module name (lowercase letters, digits, '_', '.', '-')",
                                     hint="`hub list` shows the installed modules")
        return resolve_within(self.root, "modules", name, *parts)

    @property
    def registries_dir(self) -> Path:
        return self.root / "registries"

    def lock(self, name: str) -> FileLock:
        """The per-module install lock (released by the OS if its holder dies)."""
        self.path(name)  # validates the name
        path = self.root / "locks" / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return file_lock(path)

    def _refs(self, name: str) -> Path:
        return self.path(name, "refs")

    def _snapshot_id(self, name: str, version: str) -> str | None:
        """The snapshot a ref names, or None when the ref is missing or holds anything but a snapshot id."""
        try:
            snapshot_id = read_capped(self._refs(name) / version, 256).decode("ascii").strip()
        except (OSError, ValueError):
            return None
        return snapshot_id if SNAPSHOT_ID_PATTERN.fullmatch(snapshot_id) else None

    # --- reading -----------------------------------------------------------------------
    def get(self, name: str, version: str | None = None) -> InstalledModule | None:
        """The installed module (newest version when ``version`` is None), or None.

        A name that is no module name, a ref that names no snapshot, a snapshot outside the cache or
        an unreadable record all read as "not installed": an install rebuilds it.
        """
        versions = self.versions(name)
        if not versions:
            return None
        version = version or versions[-1]
        if version not in versions:
            return None
        snapshot_id = self._snapshot_id(name, version)
        if snapshot_id is None:
            return None
        try:
            path = self.path(name, "snapshots", snapshot_id)
            record = json.loads(read_capped(path / constants.INSTALL_RECORD_FILENAME, MAX_METADATA_BYTES))
        except (OSError, ValueError, RecursionError, UnsafeContentError):  # damaged by hand or disk
            return None
        if not isinstance(record, dict):
            return None
        return InstalledModule(name, version, path, record)

    def versions(self, name: str) -> list[str]:
        """The versions of ``name`` that have a ref (none for a name that is not a module name)."""
        if not NAME_PATTERN.fullmatch(name):
            return []
        refs = self._refs(name)
        if not refs.is_dir():
            return []
        return sorted((p.name for p in refs.iterdir() if VERSION_PATTERN.fullmatch(p.name)), key=version_key)

    def strays(self, name: str) -> list[str]:
        """Entries of ``refs/`` that are no version (a stray file): skipped everywhere, reported by verify."""
        refs = self._refs(name)
        if not refs.is_dir():
            return []
        return sorted(p.name for p in refs.iterdir() if not p.name.startswith(".") and not VERSION_PATTERN.fullmatch(p.name))

    def names(self) -> list[str]:
        """The module folders of the cache (only those named like modules)."""
        if not self.modules_dir.is_dir():
            return []
        return sorted(p.name for p in self.modules_dir.iterdir() if NAME_PATTERN.fullmatch(p.name) and p.is_dir())

    def installed(self) -> list[InstalledModule]:
        out = []
        for name in self.names():
            for version in self.versions(name):
                module = self.get(name, version)
                if module is not None:
                    out.append(module)
        return out

    # --- writing (callers hold ``lock(name)``) ----------------------------------------------
    def new_staging(self, name: str) -> Path:
        """A fresh folder to build an install in; stale ones from killed runs are swept first."""
        parent = self.path(name)
        parent.mkdir(parents=True, exist_ok=True)
        for old in parent.glob(".staging-*"):
            shutil.rmtree(old, ignore_errors=True)
        path = parent / f".staging-{uuid.uuid4().hex[:12]}"
        path.mkdir()
        return path

    def commit(self, name: str, version: str, staging: Path) -> InstalledModule:
        """Publish a complete staging folder as the installed ``version`` (atomic switch)."""
        for f in staging.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        snapshots = self.path(name, "snapshots")
        snapshots.mkdir(parents=True, exist_ok=True)
        snapshot_id = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
        os.replace(staging, snapshots / snapshot_id)
        fsync_dir(snapshots)
        atomic_write_text(self._refs(name) / version, snapshot_id + "\n")
        self._sweep_orphans(name)  # the version's previous snapshot too: no ref points at it any more
        return self.get(name, version)

    def _sweep_orphans(self, name: str) -> None:
        """Remove snapshots no ref points at (left by an install killed after its rename)."""
        snapshots = self.path(name, "snapshots")
        live = {self._snapshot_id(name, v) for v in self.versions(name)}
        for path in snapshots.iterdir() if snapshots.is_dir() else ():
            if path.name not in live:
                shutil.rmtree(path, ignore_errors=True)

    def remove(self, name: str, version: str | None = None) -> list[str]:
        """Uninstall one version (or all); returns the versions removed."""
        self.path(name)  # a name with '/' or '..' is refused before anything is touched
        versions = self.versions(name)
        if not versions:
            raise NotInstalledError(f"module '{name}' is not installed", hint="`hub list` shows what is")
        targets = [version] if version else versions
        for v in targets:
            if v not in versions:
                raise NotInstalledError(f"module '{name}' is not installed in version {v}",
                                        hint=f"installed: {', '.join(versions)}")
        with self.lock(name):
            for v in targets:
                (self._refs(name) / v).unlink(missing_ok=True)
            self._sweep_orphans(name)
            if not self.versions(name):
                shutil.rmtree(self.path(name), ignore_errors=True)
        return targets

    def write_record(self, folder: Path, weights: Path, *, weights_sha256: str | None = None,
                     compiled: dict | None = None, **extra) -> dict:
        """Write ``folder``'s install record: when and from where, and the sha256 and size of every file of
        ``folder`` (what ``check`` compares them with later).

        ``weights_sha256`` is the hash of ``weights`` when the caller has just computed it (an
        install hashes the file it wrote once); otherwise the file is hashed here. ``compiled``: the
        artefacts the folder already holds (as ``record_artefact`` records them), kept out of its files.
        """
        st = weights.stat()
        artefacts = {name for entry in (compiled or {}).values() for name in entry["files"]}
        files = {p.name: {"sha256": weights_sha256 if p == weights and weights_sha256 else sha256_file(p),
                          "size": p.stat().st_size}
                 for p in sorted(folder.iterdir())
                 if p.is_file() and p.name != constants.INSTALL_RECORD_FILENAME and p.name not in artefacts}
        record = {"weights_sha256": files[weights.name]["sha256"], "weights_size": st.st_size,
                  "weights_mtime_ns": st.st_mtime_ns, "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "files": files, **({"compiled": compiled} if compiled else {}), **extra}
        atomic_write_json(folder / constants.INSTALL_RECORD_FILENAME, record)
        return record

    # --- integrity -------------------------------------------------------------------------
    def check(self, module: InstalledModule, *, full: bool = False) -> None:
        """Raise IntegrityError if any file of the snapshot differs from what was installed.

        Every recorded file must exist with its size. The weights are hashed when ``full`` or when
        their mtime changed since install (cheap by default: they are the large file); the small files
        (manifest, labels) are always hashed.
        """
        fix = f"reinstall it: hub install {module.name}=={module.version} --force"
        for filename, expected in module.files.items():
            if not isinstance(expected, dict) or filename in ("", ".", "..") or "/" in filename or "\\" in filename:
                raise IntegrityError(f"the install record of {module.ref} is malformed", path=str(module.path), hint=fix)
            # the weights are the large file: hashed when their mtime changed (or with full); small files always
            mtime = module.record.get("weights_mtime_ns") if filename == constants.WEIGHTS_FILENAME else None
            check_file(module.path / filename, {**expected, "mtime_ns": mtime}, f"{filename} of {module.ref}", fix,
                        full=full)

    def file_hashes(self, module: InstalledModule) -> dict[str, str]:
        """``{file name: sha256}`` of every file of a snapshot, checked against the files first (full hash)."""
        self.check(module, full=True)
        return {name: entry["sha256"] for name, entry in module.files.items()}

    # --- compiled-runtime artefacts (callers hold ``lock(name)`` to record one) -------------------
    def record_artefact(self, module: InstalledModule, runtime: str, files: list[Path], **info) -> InstalledModule:
        """Add a compiled artefact (files in the snapshot folder) to the install record, hashed like the weights."""
        entries = {}
        for path in files:
            st = path.stat()
            entries[path.name] = {"sha256": sha256_file(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        compiled = dict(module.record.get("compiled") or {})
        compiled[runtime] = {"files": entries, **info}
        record = {**module.record, "compiled": compiled}
        atomic_write_json(module.path / constants.INSTALL_RECORD_FILENAME, record)
        return InstalledModule(module.name, module.version, module.path, record)

    def artefact(self, module: InstalledModule, runtime: str, *, full: bool = False) -> tuple[list[Path], dict]:
        """The files of the module's artefact recorded under ``runtime`` (a runtime's name, or a features
        key: :func:`artefact_files`) and what was recorded with them, checked like the weights.
        NotInstalledError when none was recorded; IntegrityError when a file changed."""
        compiled = module.record.get("compiled")
        entry = compiled.get(runtime) if isinstance(compiled, dict) else None
        names = artefact_files(runtime)
        files = entry.get("files") if isinstance(entry, dict) else None
        if not names or not isinstance(files, dict) or sorted(files) != sorted(names):  # only known names: nothing outside the folder
            raise NotInstalledError(f"{module.ref} has no {runtime} artefact recorded")
        fix = f"it is rebuilt at its next use (e.g. hub run {module.name} --runtime {runtime.split(':')[0]})"
        for name in names:
            if not isinstance(files[name], dict):
                raise IntegrityError(f"the install record of {module.ref} is damaged", hint=fix)
            check_file(module.path / name, files[name], f"{runtime} artefact {name} of {module.ref}", fix, full=full)
        return [module.path / name for name in names], {k: v for k, v in entry.items() if k != "files"}

    def verify(self, *, full: bool = True) -> list[VerifyResult]:
        """Check every installed version; also report refs that name no snapshot and stray ``refs/`` entries."""
        results = []
        for name in self.names():
            for version in self.versions(name):
                ref = f"{name}=={version}"
                module = self.get(name, version)
                if module is None:
                    results.append(VerifyResult(ref, False, "its ref, snapshot or install record is missing or damaged"))
                    continue
                try:
                    self.check(module, full=full)
                    compiled = module.record.get("compiled")
                    for runtime in compiled if isinstance(compiled, dict) else ():
                        self.artefact(module, runtime, full=full)
                    results.append(VerifyResult(ref, True, module=module))
                except (IntegrityError, NotInstalledError) as exc:
                    results.append(VerifyResult(ref, False, exc.message, module))
            for stray in self.strays(name):
                results.append(VerifyResult(f"{name}/refs/{stray}", False, "not a version: a stray file, skipped"))
        return results

    def clear(self, *, downloads_only: bool = False) -> int:
        """Delete downloaded blobs (and, unless ``downloads_only``, everything); returns bytes freed."""
        targets = [self.blobs_dir, self.root / "hf"] if downloads_only else [self.root]
        freed = 0
        for target in targets:
            if target.is_dir():
                freed += sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
                shutil.rmtree(target, ignore_errors=True)
        return freed


#: The key of a features artefact: ``<runtime>:features-<12 hex digits>`` (a hash of what it was made from).
_FEATURES_KEY = re.compile(r"^([a-z]+):(features-[0-9a-f]{12})$")


def artefact_files(key: str) -> tuple[str, ...]:
    """The file names in a snapshot of the artefact recorded under ``key``: a runtime's name for the
    classifier (``model.xml``, ``model.bin``), or ``<runtime>:features-<id>`` for a backbone's pooled
    features, which frozen fine-tuning computes (``features-<id>.xml``...); () for any other key."""
    if key in constants.COMPILED_FILES:
        return constants.COMPILED_FILES[key]
    match = _FEATURES_KEY.match(key)
    if match is None or match.group(1) not in constants.COMPILED_FILES:
        return ()
    return tuple(match.group(2) + Path(name).suffix for name in constants.COMPILED_FILES[match.group(1)])


def check_file(path: Path, expected: dict, what: str, fix: str, *, full: bool) -> None:
    """Raise IntegrityError unless ``path`` has the recorded size and sha256 (hashed only when its
    mtime changed, or always with ``full``): every check of a cached file against its record."""
    if not path.is_file():
        raise IntegrityError(f"{what} is missing ({path})", path=str(path), hint=fix)
    st = path.stat()
    if st.st_size != expected.get("size"):
        raise IntegrityError(f"{what} is {st.st_size} bytes, {expected.get('size')} were recorded", path=str(path),
                             hint=fix)
    if full or st.st_mtime_ns != expected.get("mtime_ns"):
        digest = sha256_file(path)
        if digest != expected.get("sha256"):
            raise IntegrityError(f"{what} does not match its sha256 (corrupted: {digest[:12]}…, recorded {str(expected.get('sha256'))[:12]}…)",
                                 path=str(path), expected=expected.get("sha256"), actual=digest, hint=fix)
