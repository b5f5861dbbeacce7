"""The local cache: where installed modules and downloaded files live.

Layout under ``HUBKIT_HOME`` (default ``~/.cache/hubkit``)::

    modules/<name>/refs/<version>      one line: the snapshot id installed for that version
    modules/<name>/snapshots/<id>/     module.json, labels.txt, weights.safetensors, install.json
    modules/<name>/.staging-*/         an install being built (removed or renamed when done)
    blobs/<sha256>[.incomplete]        downloaded source files, content-addressed
    hf/                                huggingface_hub's own cache, for hf:// sources
    locks/<name>.lock                  one lock per module name: installs never interleave
    features/                          cached backbone features for frozen fine-tuning

A snapshot is complete before its ref points at it, and a ref is replaced atomically, so an
install killed at any point leaves the old version or the new one, never neither.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from . import constants
from ._fs import atomic_write_json, atomic_write_text, fsync_dir, sha256_file
from .errors import IntegrityError, NotInstalledError
from .manifest import Manifest, version_key



@dataclass(frozen=True)
class InstalledModule:
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
    def ref(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class VerifyResult:
    module: InstalledModule
    ok: bool
    problem: str = ""


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

    def lock(self, name: str) -> FileLock:
        """The per-module install lock (released by the OS if its holder dies)."""
        path = self.root / "locks" / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path))

    def _refs(self, name: str) -> Path:
        return self.modules_dir / name / "refs"

    # --- reading -----------------------------------------------------------------------
    def get(self, name: str, version: str | None = None) -> InstalledModule | None:
        """The installed module (newest version when ``version`` is None), or None."""
        versions = self.versions(name)
        if not versions:
            return None
        version = version or versions[-1]
        if version not in versions:
            return None
        try:
            snapshot_id = (self._refs(name) / version).read_text().strip()
            path = self.modules_dir / name / "snapshots" / snapshot_id
            record = json.loads((path / constants.INSTALL_RECORD_FILENAME).read_text())
        except (OSError, ValueError):  # missing or damaged (by hand or disk): not installed; install rebuilds it
            return None
        if not isinstance(record, dict):
            return None
        return InstalledModule(name, version, path, record)

    def versions(self, name: str) -> list[str]:
        refs = self._refs(name)
        if not refs.is_dir():
            return []
        return sorted((p.name for p in refs.iterdir() if not p.name.startswith(".")), key=version_key)

    def installed(self) -> list[InstalledModule]:
        out = []
        if self.modules_dir.is_dir():
            for folder in sorted(self.modules_dir.iterdir()):
                for version in self.versions(folder.name):
                    module = self.get(folder.name, version)
                    if module is not None:
                        out.append(module)
        return out

    # --- writing (callers hold ``lock(name)``) ----------------------------------------------
    def new_staging(self, name: str) -> Path:
        """A fresh folder to build an install in; stale ones from killed runs are swept first."""
        parent = self.modules_dir / name
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
        snapshots = self.modules_dir / name / "snapshots"
        snapshots.mkdir(parents=True, exist_ok=True)
        snapshot_id = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:8]}"
        os.replace(staging, snapshots / snapshot_id)
        fsync_dir(snapshots)
        previous = self.get(name, version)
        atomic_write_text(self._refs(name) / version, snapshot_id + "\n")
        if previous is not None:
            shutil.rmtree(previous.path, ignore_errors=True)
        self._sweep_orphans(name)
        return self.get(name, version)

    def _sweep_orphans(self, name: str) -> None:
        """Remove snapshots no ref points at (left by an install killed after its rename)."""
        snapshots = self.modules_dir / name / "snapshots"
        live = {(self._refs(name) / v).read_text().strip() for v in self.versions(name)}
        for path in snapshots.iterdir() if snapshots.is_dir() else ():
            if path.name not in live:
                shutil.rmtree(path, ignore_errors=True)

    def remove(self, name: str, version: str | None = None) -> list[str]:
        """Uninstall one version (or all); returns the versions removed."""
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
                shutil.rmtree(self.modules_dir / name, ignore_errors=True)
        return targets

    def write_record(self, folder: Path, weights: Path, **extra) -> dict:
        st = weights.stat()
        record = {"weights_sha256": sha256_file(weights), "weights_size": st.st_size,
                  "weights_mtime_ns": st.st_mtime_ns, "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
        atomic_write_json(folder / constants.INSTALL_RECORD_FILENAME, record)
        return record

    # --- integrity -------------------------------------------------------------------------
    def check(self, module: InstalledModule, *, full: bool = False) -> None:
        """Raise IntegrityError if the installed weights differ from what was installed.

        Cheap by default (size and mtime as recorded; sha256 only when those changed);
        ``full`` always hashes.
        """
        weights = module.weights_path
        fix = f"reinstall it: hub install {module.name}=={module.version} --force"
        if not weights.is_file():
            raise IntegrityError(f"weights of {module.ref} are missing ({weights})", path=str(weights), hint=fix)
        st = weights.stat()
        rec = module.record
        if st.st_size != rec.get("weights_size"):
            raise IntegrityError(f"weights of {module.ref} are {st.st_size} bytes, {rec.get('weights_size')} were installed",
                                 path=str(weights), hint=fix)
        if full or st.st_mtime_ns != rec.get("weights_mtime_ns"):
            digest = sha256_file(weights)
            if digest != rec.get("weights_sha256"):
                raise IntegrityError(f"weights of {module.ref} are corrupted (sha256 {digest[:12]}…, "
                                     f"installed {str(rec.get('weights_sha256'))[:12]}…)", path=str(weights),
                                     expected=rec.get("weights_sha256"), actual=digest, hint=fix)

    def verify(self, *, full: bool = True) -> list[VerifyResult]:
        results = []
        for module in self.installed():
            try:
                self.check(module, full=full)
                results.append(VerifyResult(module, True))
            except IntegrityError as exc:
                results.append(VerifyResult(module, False, exc.message))
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
