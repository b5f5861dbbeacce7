"""Air-gapped fleets: pin installed modules in a lockfile, bundle them, install the bundle offline.

``lock`` describes what is installed (name, version, where the weights came from, and the
sha256 and size of every file of each snapshot). ``pack`` writes those snapshots plus the
lockfile into one tar archive; ``unpack`` installs a bundle with no network at all, after
checking every file against the lockfile (the bundle's own, or a trusted copy given
separately), so a bundle changed in transit is refused before anything is installed.

Bundle layout::

    hub.lock
    modules/<name>/<version>/module.json
    modules/<name>/<version>/labels.txt
    modules/<name>/<version>/weights.safetensors
"""
from __future__ import annotations

import io
import json
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from . import __version__, constants
from .errors import IntegrityError, ManifestError, NotInstalledError
from .hub.archive import safe_extract
from .hub.cache import Cache, InstalledModule
from .hub.fs import MAX_METADATA_BYTES, atomic_output, atomic_write_json, read_capped, sha256_file
from .hub.manifest import HasRef, Manifest, parse_ref
from .installer import install

LOCK_FORMAT = 1
LOCK_FILENAME = "hub.lock"
#: The files of an installed snapshot that travel in a bundle (install.json is machine-specific), with the
#: artefacts its manifest ships (not those converted on this machine: they are rebuilt where needed).
SNAPSHOT_FILES = (constants.MANIFEST_FILENAME, "labels.txt", constants.WEIGHTS_FILENAME)


@dataclass(frozen=True)
class LockedModule(HasRef):
    """One module pinned by a lockfile."""

    name: str
    version: str
    source: str
    weights_sha256: str
    weights_size: int
    files: dict  # file name -> sha256, for every file of the snapshot that travels

    @property
    def bundle_folder(self) -> str:
        return f"modules/{self.name}/{self.version}"

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "source": self.source,
                "weights_sha256": self.weights_sha256, "weights_size": self.weights_size, "files": dict(self.files)}


def _select(cache: Cache, refs: Iterable[str]) -> list[InstalledModule]:
    refs = list(refs)
    if not refs:
        modules = cache.installed()
        if not modules:
            raise NotInstalledError(f"no module is installed in {cache.root}", hint="install some first: hub install NAME")
        return modules
    selected = []
    for ref in refs:
        name, version = parse_ref(ref)
        versions = [version] if version else cache.versions(name)
        found = [m for m in (cache.get(name, v) for v in versions) if m is not None]
        if not found:
            raise NotInstalledError(f"module '{ref}' is not installed", hint="`hub list` shows what is")
        selected.extend(m for m in found if m not in selected)
    return selected


def _lock_entry(module: InstalledModule, cache: Cache) -> LockedModule:
    hashes = cache.file_hashes(module)  # every file re-hashed: never pin files that no longer match their install
    files = {f: hashes[f] if f in hashes else sha256_file(module.path / f)
             for f in SNAPSHOT_FILES if (module.path / f).is_file()}
    files.update(_shipped_artefacts(module, cache))
    return LockedModule(module.name, module.version, str(module.record.get("source", "")),
                        module.record["weights_sha256"], int(module.record["weights_size"]), files)


def _shipped_artefacts(module: InstalledModule, cache: Cache) -> dict[str, str]:
    """``{file name: sha256}`` of the artefacts the module's manifest ships (an int8 model from ``hub quantize``),
    fully re-hashed: they travel with the module, unlike artefacts converted on this machine."""
    compiled = module.record.get("compiled")
    shipped = {}
    for runtime, entry in (compiled.items() if isinstance(compiled, dict) else ()):
        if isinstance(entry, dict) and entry.get("shipped"):
            paths, _ = cache.artefact(module, runtime, full=True)
            shipped.update({p.name: entry["files"][p.name]["sha256"] for p in paths})
    return shipped


def lock(names: Iterable[str] = (), *, output: str | Path | None = None, cache: Cache | None = None) -> dict:
    """The lockfile (a JSON-ready dict) of installed modules: all, or ``names`` (NAME or NAME==VERSION).

    Every pinned weights file is re-hashed first; with ``output`` the lockfile is also written there.
    """
    cache = cache or Cache()
    entries = [_lock_entry(m, cache) for m in _select(cache, names)]
    data = {"format": LOCK_FORMAT, "hubkit": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "modules": [e.to_dict() for e in entries]}
    if output is not None:
        atomic_write_json(output, data)
    return data


def read_lock(path: str | Path) -> list[LockedModule]:
    """The modules a lockfile pins; ``ManifestError`` naming the file when it is malformed."""
    path = Path(path)
    try:
        text = read_capped(path).decode("utf-8")
    except FileNotFoundError:
        raise NotInstalledError(f"no lockfile at {path}", hint="write one with `hub lock -o hub.lock`") from None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read the lockfile: {exc}", path=str(path)) from None
    return parse_lock(text, str(path))


def read_bundle_lock(bundle: str | Path) -> list[LockedModule]:
    """The modules a bundle's own lockfile pins, read without unpacking the bundle."""
    where = f"{bundle}:{LOCK_FILENAME}"
    try:
        with tarfile.open(bundle) as tf:
            member = tf.extractfile(LOCK_FILENAME)
            text = member.read(MAX_METADATA_BYTES + 1).decode("utf-8") if member is not None else ""
        if len(text) > MAX_METADATA_BYTES:
            raise ManifestError(f"the lockfile is larger than {MAX_METADATA_BYTES} bytes", path=where)
    except KeyError:
        raise ManifestError(f"bundle has no {LOCK_FILENAME}", path=str(bundle), hint="make bundles with `hub pack`") from None
    except (tarfile.TarError, OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read the bundle's lockfile: {exc}", path=where) from None
    return parse_lock(text, where)


def parse_lock(text: str, where: str) -> list[LockedModule]:
    """The entries of lockfile text (``where`` names it in errors)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ManifestError(f"the lockfile is not JSON ({exc})", path=where) from None
    if not isinstance(data, dict) or data.get("format") != LOCK_FORMAT or not isinstance(data.get("modules"), list):
        raise ManifestError(f"not a hubkit lockfile of format {LOCK_FORMAT}", path=where, field="format")
    entries = []
    for i, item in enumerate(data["modules"]):
        try:
            entry = LockedModule(str(item["name"]), str(item["version"]), str(item.get("source", "")),
                                 str(item["weights_sha256"]), int(item["weights_size"]), dict(item["files"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"entry {i} is incomplete or malformed ({exc})", path=where, field=f"modules[{i}]") from None
        for part in (entry.name, entry.version, *entry.files):
            if not part or "/" in part or "\\" in part or part in (".", ".."):
                raise ManifestError(f"entry {i} has an unsafe name {part!r}", path=where, field=f"modules[{i}]")
        entries.append(entry)
    return entries


def pack(names: Iterable[str] = (), *, output: str | Path, lock_path: str | Path | None = None,
         cache: Cache | None = None) -> Path:
    """Bundle installed modules and their lockfile into one archive (``.tar``, or ``.tar.gz``); returns its path.

    With ``lock_path`` the bundle holds exactly the modules that lockfile pins, and each installed
    copy must match it; otherwise it holds ``names`` (default: everything installed) as locked now.
    """
    cache = cache or Cache()
    output = Path(output)
    if lock_path is not None:
        pinned = read_lock(lock_path)
        if names:
            wanted = {parse_ref(n) for n in names}
            pinned = [e for e in pinned if (e.name, None) in wanted or (e.name, e.version) in wanted]
        data = json.loads(Path(lock_path).read_text(encoding="utf-8"))
        data["modules"] = [e.to_dict() for e in pinned]
        current = {e.ref: e for e in (_lock_entry(m, cache) for m in _select(cache, [e.ref for e in pinned]))}
        for entry in pinned:
            if current[entry.ref].files != entry.files:
                raise IntegrityError(f"installed {entry.ref} differs from {lock_path}",
                                     hint=f"install the locked version, or re-lock: hub lock -o {lock_path}")
    else:
        data = lock(names, cache=cache)
        pinned = [LockedModule(**m) for m in data["modules"]]
    if not pinned:
        raise NotInstalledError("nothing to pack: no module matches", hint="check the names against `hub list`")
    mode = "w:gz" if output.name.endswith((".tar.gz", ".tgz")) else "w"
    with atomic_output(output) as tmp, tarfile.open(tmp, mode) as tf:
        lock_bytes = (json.dumps(data, indent=2) + "\n").encode("utf-8")
        info = tarfile.TarInfo(LOCK_FILENAME)
        info.size, info.mtime, info.mode = len(lock_bytes), int(time.time()), 0o644
        tf.addfile(info, io.BytesIO(lock_bytes))
        for entry in pinned:
            installed = cache.get(entry.name, entry.version)
            for filename in entry.files:
                tf.add(installed.path / filename, arcname=f"{entry.bundle_folder}/{filename}", recursive=False,
                       filter=_anonymous)
    return output


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """A member without this machine's owner names and ids, readable by whoever unpacks it."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    return info


def _verify_bundle(root: Path, bundle: Path, entries: list[LockedModule]) -> None:
    for entry in entries:
        folder = root / entry.bundle_folder
        where = f"bundle {bundle.name}: module {entry.ref}"
        if constants.WEIGHTS_FILENAME not in entry.files or constants.MANIFEST_FILENAME not in entry.files:
            raise IntegrityError(f"{where}: the lockfile pins no {constants.WEIGHTS_FILENAME} or {constants.MANIFEST_FILENAME}")
        if entry.files[constants.WEIGHTS_FILENAME] != entry.weights_sha256:
            raise IntegrityError(f"{where}: the lockfile contradicts itself about the weights' sha256")
        for filename, expected in entry.files.items():
            path = folder / filename
            if not path.is_file():
                raise IntegrityError(f"{where}: {filename} is missing", path=str(path),
                                     hint="the bundle is incomplete; pack it again")
            actual = sha256_file(path)
            if actual != expected:
                raise IntegrityError(f"{where}: {filename} does not match the lockfile (sha256 {actual[:12]}…, "
                                     f"locked {expected[:12]}…); refusing to install a tampered or damaged bundle",
                                     path=str(path), expected=expected, actual=actual,
                                     hint="get the bundle again from its source")
        size = (folder / constants.WEIGHTS_FILENAME).stat().st_size
        if size != entry.weights_size:
            raise IntegrityError(f"{where}: weights are {size} bytes, the lockfile says {entry.weights_size}")
        manifest = Manifest.from_file(folder / constants.MANIFEST_FILENAME)
        if (manifest.name, manifest.version) != (entry.name, entry.version):
            raise IntegrityError(f"{where}: its module.json describes {manifest.ref}")


def unpack(bundle: str | Path, *, lock_path: str | Path | None = None, force: bool = False,
           cache: Cache | None = None) -> list[InstalledModule]:
    """Install every module of a bundle, offline; returns the installed modules.

    Each file is checked against the lockfile (``lock_path`` when given, a copy you trust,
    else the bundle's own) before anything is installed; a mismatch raises ``IntegrityError``
    naming the module, and unsafe archive members raise ``UnsafeContentError``.
    """
    cache = cache or Cache()
    bundle = Path(bundle)
    if not bundle.is_file():
        raise NotInstalledError(f"no bundle at {bundle}", hint="make one with `hub pack -o bundle.tar`")
    cache.root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache.root, prefix=".unpack-") as tmp:
        root = safe_extract(bundle, tmp)
        if lock_path is None and not (root / LOCK_FILENAME).is_file():
            raise ManifestError(f"bundle {bundle.name} has no {LOCK_FILENAME}", path=str(bundle),
                                hint="make bundles with `hub pack`")
        entries = read_lock(lock_path if lock_path is not None else root / LOCK_FILENAME)
        _verify_bundle(root, bundle, entries)
        installed = []
        for entry in entries:
            module = install(str(root / entry.bundle_folder), force=force, cache=cache, progress=False)
            if module.record.get("weights_sha256") != entry.weights_sha256:
                raise IntegrityError(f"{module.ref} is already installed with other weights than bundle {bundle.name} pins",
                                     path=str(module.weights_path), expected=entry.weights_sha256,
                                     actual=module.record.get("weights_sha256"),
                                     hint="replace it with: hub unpack --force " + str(bundle))
            with cache.lock(entry.name):  # keep where the weights first came from, for `hub lock` here
                cache.write_record(module.path, module.weights_path, weights_sha256=entry.weights_sha256,
                                   compiled=module.record.get("compiled"), source=entry.source,
                                   installed_from=str(bundle.resolve()))
            installed.append(cache.get(entry.name, entry.version))
    return installed


__all__ = ["lock", "read_lock", "read_bundle_lock", "parse_lock", "pack", "unpack", "LockedModule", "LOCK_FILENAME", "LOCK_FORMAT"]
