"""The hub's torch-free operations: search, show, list, uninstall, verify and clear the cache.

Installing (which converts weights with torch) lives one layer up, in :mod:`hubkit.installer`.
"""
from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, DownloadError, HubkitError, UnknownModuleError
from .cache import Cache, InstalledModule, VerifyResult
from .catalogue import licence_terms
from .labels import read_labels
from .manifest import NAME_PATTERN, Manifest, parse_ref, version_key
from .registry import RegistryEntry, SearchFilters, resolve
from .registry import search as _search_entries


@dataclass(frozen=True)
class ModuleInfo:
    """What ``hub show`` prints: the manifest plus where it comes from and whether it is installed."""

    manifest: Manifest
    origin: str
    installed: InstalledModule | None
    params: int | None = None  # the manifest's, else the catalogue's for its architecture
    label_names: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """A JSON-ready summary (what ``hub show --json`` prints)."""
        m = self.manifest
        return {"name": m.name, "version": m.version, "summary": m.summary, "task": m.task, "tags": list(m.tags),
                "license": m.license, "licence_terms": licence_terms(m.license), "source": dict(m.source),
                "architecture": m.architecture, "params": m.params or self.params, "num_classes": m.num_classes,
                "labels": m.num_classes if m.task == "image_classification" else 0, "label_names": self.label_names,
                "preprocessing": m.preprocessing.to_dict(), "features": m.features.to_dict(),
                "weights": [s.describe() for s in m.weights],
                "installed": str(self.installed.path) if self.installed else None,
                "installed_from": self.installed.record.get("source") if self.installed else None, "origin": self.origin}


def search(keyword: str | None = None, *, filters: SearchFilters | None = None,
           limit: int | None = None) -> list[RegistryEntry]:
    """Modules (registries, then the catalogue) matching ``keyword`` (words or a regex) and ``filters``, best first."""
    return _search_entries(keyword, filters=filters, limit=limit)


def list_modules(cache: Cache | None = None) -> list[InstalledModule]:
    """Installed modules, by name then version."""
    return (cache or Cache()).installed()


def show(ref: str, cache: Cache | None = None) -> ModuleInfo:
    """The manifest of ``name[==version]``: the installed copy if there is one, else the registry's."""
    cache = cache or Cache()
    name, version = parse_ref(ref)
    installed = cache.get(name, version)
    if installed is not None:
        return ModuleInfo(installed.manifest, str(installed.path), installed, label_names=_label_names(installed.manifest))
    entry = resolve(name, version)
    manifest = entry.load_manifest()
    return ModuleInfo(manifest, entry.manifest, None, entry.params, _label_names(manifest))


def _label_names(manifest: Manifest) -> list[str]:
    """The class names, when the manifest has them (inline or in its label file) and they can be read."""
    if manifest.labels is None and manifest.labels_file is None:
        return []
    try:
        return read_labels(manifest)
    except HubkitError:  # e.g. a remote label file while offline: `hub show` still describes the module
        return []


def newer_version(name: str, version: str) -> str | None:
    """The registries' newest version of ``name`` when it is newer than ``version``, else None
    (also for a module no registry lists, e.g. one installed from a folder, or none can be read)."""
    try:
        newest = resolve(name).version
    except (UnknownModuleError, DownloadError):
        return None
    return newest if version_key(newest) > version_key(version) else None


def upgrade_target(target: str) -> str:
    """What ``hub install --upgrade`` installs for ``target``: a bare NAME becomes NAME==<the
    registries' newest>; NAME==VERSION, a module folder or an archive stays as given."""
    if NAME_PATTERN.fullmatch(target) and not Path(target).exists():
        return f"{target}=={resolve(target).version}"
    return target


def uninstall(ref: str, cache: Cache | None = None) -> list[str]:
    """Remove an installed module (one version, or all when none is named)."""
    name, version = parse_ref(ref)
    return (cache or Cache()).remove(name, version)


def verify_cache(*, full: bool = True, cache: Cache | None = None) -> list[VerifyResult]:
    """Check every installed module's weights against the hash recorded at install."""
    return (cache or Cache()).verify(full=full)


def clear_cache(*, downloads_only: bool = False, cache: Cache | None = None) -> int:
    """Free disk space: downloaded source files only, or the whole cache. Returns bytes freed."""
    return (cache or Cache()).clear(downloads_only=downloads_only)


# --- sizes and pruning -------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheItem:
    """One thing in the cache that can be sized, and (unless it is a module) pruned on its own.

    ``kind`` is ``module`` (an installed module, every version), ``download`` (a downloaded source
    file, or one Hugging Face repository) or ``features`` (one feature cache entry); ``last_used``
    is the newest modification time inside it (feature entries are touched when read).
    """

    kind: str
    name: str
    path: Path
    size: int
    last_used: float


@dataclass(frozen=True)
class PruneResult:
    removed: list[CacheItem]
    size_after: int

    @property
    def freed(self) -> int:
        return sum(item.size for item in self.removed)


def _measure(kind: str, name: str, path: Path) -> CacheItem:
    """Bytes and newest mtime of a file or a folder (links counted once, never followed)."""
    paths = [path, *path.rglob("*")] if path.is_dir() and not path.is_symlink() else [path]
    stats = [p.lstat() for p in paths]
    size = sum(st.st_size for p, st in zip(paths, stats) if not p.is_dir() or p.is_symlink())
    return CacheItem(kind, name, path, size, max(st.st_mtime for st in stats))


def cache_items(cache: Cache | None = None) -> list[CacheItem]:
    """Everything in the cache by kind: installed modules, downloads (blobs, hf/), feature cache entries."""
    cache = cache or Cache()
    listing = [("module", cache.modules_dir), ("download", cache.blobs_dir), ("download", cache.root / "hf"),
               ("features", cache.features_dir)]
    return [_measure(kind, child.name, child) for kind, folder in listing if folder.is_dir()
            for child in sorted(folder.iterdir())]


def prune_cache(*, older_than: float | None = None, max_size: int | None = None, cache: Cache | None = None
                ) -> PruneResult:
    """Free space by deleting what can be fetched or computed again: downloads and feature cache entries.

    First every such item unused for ``older_than`` seconds, then the least recently used ones until
    the whole cache holds at most ``max_size`` bytes. Installed modules are never pruned (``hub
    uninstall`` removes them), so ``size_after`` may stay above ``max_size``.
    """
    if older_than is None and max_size is None:
        raise ConfigError("nothing to prune by", hint="give --older-than (e.g. 30d) and/or --max-size (e.g. 5G)")
    items = cache_items(cache)
    total = sum(item.size for item in items)
    cutoff = time.time() - (older_than if older_than is not None else float("inf"))
    removed = []
    for item in sorted((i for i in items if i.kind != "module"), key=lambda i: i.last_used):
        growing = item.name.endswith(".incomplete")  # being written (or resumable): only pruned by age
        if item.last_used < cutoff or (max_size is not None and total > max_size and not growing):
            if item.path.is_dir() and not item.path.is_symlink():
                shutil.rmtree(item.path, ignore_errors=True)
            else:
                item.path.unlink(missing_ok=True)
            removed.append(item)
            total -= item.size
    return PruneResult(removed, total)


_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_DURATIONS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """Bytes in a size such as ``5G``, ``500M``, ``1.5GiB`` or ``1024`` (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise ConfigError(f"'{text}' is not a size", hint="write it like 500M or 5G")
    return int(float(match[1]) * _UNITS[match[2]])


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``30d``, ``12h``, ``2w`` or ``90m``."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text.lower())
    if not match:
        raise ConfigError(f"'{text}' is not a duration", hint="write it like 30d, 12h or 2w")
    return float(match[1]) * _DURATIONS[match[2]]


__all__ = ["ModuleInfo", "SearchFilters", "search", "list_modules", "show", "newer_version", "upgrade_target", "uninstall", "verify_cache", "clear_cache",
           "CacheItem", "PruneResult", "cache_items", "prune_cache", "parse_size", "parse_duration"]
