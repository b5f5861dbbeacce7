"""The hub's operations as library functions: search, show, install, download, list, uninstall.

The ``hub`` CLI is a thin layer over these. They return values and raise typed errors;
they never print. Nothing here imports torch until weights are actually converted.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import constants
from ._archive import is_archive, pack_folder, safe_extract
from ._cache import Cache, InstalledModule, VerifyResult
from ._fs import atomic_write_json, sha256_file
from .errors import DownloadError, HubkitError, ManifestError, NotInstalledError
from .manifest import Manifest
from .registry import RegistryEntry, parse_ref, read_text, resolve
from .registry import search as _search_entries


@dataclass(frozen=True)
class ModuleInfo:
    """What ``hub show`` prints: the manifest plus where it comes from and whether it is installed."""

    manifest: Manifest
    origin: str
    installed: InstalledModule | None


def search(keyword: str | None = None) -> list[RegistryEntry]:
    """Registry entries matching ``keyword`` (substring or regex), best first."""
    return _search_entries(keyword)


def list_modules(cache: Cache | None = None) -> list[InstalledModule]:
    """Installed modules, by name then version."""
    return (cache or Cache()).installed()


def show(ref: str, cache: Cache | None = None) -> ModuleInfo:
    """The manifest of ``name[==version]``: the installed copy if there is one, else the registry's."""
    cache = cache or Cache()
    name, version = parse_ref(ref)
    installed = cache.get(name, version)
    if installed is not None:
        return ModuleInfo(installed.manifest, str(installed.path), installed)
    entry = resolve(name, version)
    return ModuleInfo(entry.load_manifest(), entry.manifest, None)


def read_labels(manifest: Manifest) -> list[str]:
    """The class names of a module (inline or from its label file), checked against num_classes."""
    if manifest.labels is not None:
        return list(manifest.labels)
    location = f"{manifest.base.rstrip('/')}/{manifest.labels_file}"
    try:
        labels = [line.rstrip("\r") for line in read_text(location).split("\n")]
    except HubkitError:
        raise
    except (OSError, ValueError) as exc:  # missing, unreadable, not UTF-8
        raise ManifestError(f"cannot read the label file {location}: {type(exc).__name__}: {str(exc)[:200]}",
                            field="labels") from None
    while labels and not labels[-1]:
        labels.pop()
    if len(labels) != manifest.num_classes:
        raise ManifestError(f"{location} has {len(labels)} labels, the manifest says num_classes={manifest.num_classes}",
                            field="labels")
    return labels


def local_manifest(manifest: Manifest, weights_sha256: str, weights_size: int, **changes) -> dict:
    """The manifest of a self-contained module folder: weights in ``weights.safetensors``, labels in ``labels.txt``."""
    data = manifest.to_dict()
    data.update(changes)
    data["weights"] = {"sources": [{"kind": "path", "path": constants.WEIGHTS_FILENAME,
                                    "sha256": weights_sha256, "size": weights_size}],
                       "key_map": {"kind": "identical"}}
    if manifest.task == "image_classification":
        data["labels"] = "labels.txt"
    return data


def _fetch_weights(manifest: Manifest, cache: Cache, progress: bool) -> tuple[Path, str]:
    errors = []
    for source in manifest.weights:
        try:
            return _download_source(source, manifest.base, cache, progress), source.describe()
        except HubkitError as exc:  # unreachable, damaged, missing: try the next mirror, report all
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    tried = "; ".join(f"{s.describe()}: {e.message}" for s, e in zip(manifest.weights, errors))
    raise DownloadError(f"no weight source of {manifest.ref} worked ({tried})", hint="check the network or the mirrors")


def _download_source(source, base, cache, progress):
    from ._download import fetch_source

    return fetch_source(source, base, cache.blobs_dir, progress=progress)


def _build_snapshot(manifest: Manifest, labels: list[str], raw_weights: Path, staging: Path, origin: str, cache: Cache) -> None:
    from ._weights import load_state_dict, map_state_dict, save_state_dict
    from .module import empty_model_state

    state = map_state_dict(load_state_dict(raw_weights), empty_model_state(manifest), manifest.key_map,
                           what=f"{manifest.ref} weights from {origin}")
    weights = staging / constants.WEIGHTS_FILENAME
    save_state_dict(state, weights, {"hubkit_module": manifest.ref})
    if labels:
        (staging / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    data = local_manifest(manifest, sha256_file(weights), weights.stat().st_size)
    atomic_write_json(staging / constants.MANIFEST_FILENAME, data)
    cache.write_record(staging, weights, source=origin)


def install_manifest(manifest: Manifest, *, force: bool = False, cache: Cache | None = None,
                     progress: bool = True) -> InstalledModule:
    """Install the module a validated manifest describes (fetch, verify, convert, publish)."""
    cache = cache or Cache()
    labels = read_labels(manifest) if manifest.task == "image_classification" else []
    with cache.lock(manifest.name):
        existing = cache.get(manifest.name, manifest.version)
        if existing is not None and not force:
            try:
                cache.check(existing)
                return existing
            except HubkitError:
                pass  # damaged: rebuild it below
        raw, origin = _fetch_weights(manifest, cache, progress)
        staging = cache.new_staging(manifest.name)
        try:
            _build_snapshot(manifest, labels, raw, staging, origin, cache)
            return cache.commit(manifest.name, manifest.version, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _find_module_folder(root: Path) -> Path:
    if (root / constants.MANIFEST_FILENAME).is_file():
        return root
    children = [p for p in root.iterdir() if (p / constants.MANIFEST_FILENAME).is_file()]
    if len(children) != 1:
        raise ManifestError(f"no {constants.MANIFEST_FILENAME} at the top of {root} or in exactly one subfolder",
                            path=str(root), hint="a module folder holds module.json, labels.txt and its weights")
    return children[0]


def install(target: str, *, force: bool = False, cache: Cache | None = None, progress: bool = True) -> InstalledModule:
    """Install ``name[==version]`` from the registries, a module folder, or a module archive."""
    cache = cache or Cache()
    path = Path(target).expanduser()
    if path.is_dir():
        manifest = Manifest.from_file(_find_module_folder(path) / constants.MANIFEST_FILENAME)
        return install_manifest(manifest, force=force, cache=cache, progress=progress)
    if is_archive(target) and path.is_file():
        cache.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache.root, prefix=".unpack-") as tmp:
            folder = _find_module_folder(safe_extract(path, tmp))
            return install_manifest(Manifest.from_file(folder / constants.MANIFEST_FILENAME),
                                    force=force, cache=cache, progress=progress)
    if is_archive(target) or "/" in target or target.startswith("."):
        raise NotInstalledError(f"no module folder or archive at {target}",
                                hint="give a registry name, an existing folder, or a .tar.gz/.zip file")
    name, version = parse_ref(target)
    if not force:
        existing = cache.get(name, version)
        if existing is not None:
            return existing
    return install_manifest(resolve(name, version).load_manifest(), force=force, cache=cache, progress=progress)


def ensure_installed(name: str, version: str | None = None, cache: Cache | None = None) -> InstalledModule:
    """The installed module, installing it first when it is missing (what ``hub run`` does)."""
    cache = cache or Cache()
    found = cache.get(name, version)
    if found is not None:
        return found
    return install(f"{name}=={version}" if version else name, cache=cache)


def uninstall(ref: str, cache: Cache | None = None) -> list[str]:
    """Remove an installed module (one version, or all when none is named)."""
    name, version = parse_ref(ref)
    return (cache or Cache()).remove(name, version)


def download(ref: str, output_path: str | Path = ".", cache: Cache | None = None, progress: bool = True) -> Path:
    """Write ``name[==version]`` as an installable ``<name>-<version>.tar.gz`` into ``output_path``."""
    cache = cache or Cache()
    module = install(ref, cache=cache, progress=progress)
    output = Path(output_path)
    archive = output if is_archive(output) else output / f"{module.name}-{module.version}.tar.gz"
    with tempfile.TemporaryDirectory() as tmp:
        for item in module.path.iterdir():
            if item.name != constants.INSTALL_RECORD_FILENAME:
                shutil.copy2(item, Path(tmp) / item.name)
        return pack_folder(tmp, archive, module.name)


def verify_cache(*, full: bool = True, cache: Cache | None = None) -> list[VerifyResult]:
    """Check every installed module's weights against the hash recorded at install."""
    return (cache or Cache()).verify(full=full)


def clear_cache(*, downloads_only: bool = False, cache: Cache | None = None) -> int:
    """Free disk space: downloaded source files only, or the whole cache. Returns bytes freed."""
    return (cache or Cache()).clear(downloads_only=downloads_only)


def describe(info: ModuleInfo) -> dict:
    """A JSON-ready summary of a module for ``hub show --json``."""
    m = info.manifest
    return {"name": m.name, "version": m.version, "summary": m.summary, "task": m.task, "tags": list(m.tags),
            "license": m.license, "source": dict(m.source), "architecture": m.architecture,
            "num_classes": m.num_classes, "preprocessing": m.preprocessing.to_dict(),
            "features": m.features.to_dict(), "weights": [s.describe() for s in m.weights],
            "installed": str(info.installed.path) if info.installed else None, "origin": info.origin}


__all__ = ["ModuleInfo", "search", "list_modules", "show", "install", "install_manifest", "ensure_installed",
           "uninstall", "download", "verify_cache", "clear_cache", "describe", "local_manifest", "read_labels"]
