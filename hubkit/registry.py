"""Registries: indexes of modules, searched and resolved by name and version.

A registry is a JSON file (``registry.json``) listing modules with enough metadata to
search them, and where each one's manifest lives (a path or URL relative to the registry).
The built-in registry is generated from ``modules/`` (``python -m hubkit.registry``); an extra
one can be named with ``HUBKIT_REGISTRY`` (a path or an http(s) URL) and is searched first.
No torch import here: this is the fast path of ``hub search``.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urljoin

from . import constants
from .errors import HubkitError, ManifestError, RegistryError, UnknownModuleError, UnknownVersionError
from .manifest import JSON_READ_ERRORS, NAME_PATTERN, VERSION_PATTERN, Manifest, version_key

REGISTRY_FORMAT = 1
#: A registry fetched from these may only name manifests fetched from them too (never a local file).
REMOTE = ("http://", "https://")


def _is_url(location: str) -> bool:
    return bool(re.match(r"^(https?|file)://", location))


def _join(base: str, relative: str) -> str:
    if _is_url(relative) or Path(relative).is_absolute():
        return relative
    if _is_url(base):
        return urljoin(base if base.endswith("/") else base + "/", relative)
    return str(Path(base) / relative)


def read_text(location: str) -> str:
    """Read a small text file from a path or URL (registries, manifests, label lists)."""
    if _is_url(location):
        from ._download import fetch_bytes

        return fetch_bytes(location).decode("utf-8")
    return Path(location).read_text(encoding="utf-8")


@dataclass(frozen=True)
class RegistryEntry:
    """One module version as a registry lists it."""

    name: str
    version: str
    summary: str
    task: str
    tags: tuple[str, ...]
    manifest: str  # resolved location (path or URL) of the module.json
    registry: str = ""

    @property
    def ref(self) -> str:
        return f"{self.name}=={self.version}"

    def load_manifest(self) -> Manifest:
        try:
            data = json.loads(read_text(self.manifest))
        except HubkitError:
            raise
        except JSON_READ_ERRORS as exc:
            raise ManifestError(f"cannot read: {type(exc).__name__}: {str(exc)[:200]}", path=self.manifest) from None
        manifest = Manifest.from_dict(data, path=self.manifest, base=self.manifest.rsplit("/", 1)[0])
        if (manifest.name, manifest.version) != (self.name, self.version):
            raise ManifestError(f"declares {manifest.ref} but the registry lists it as {self.ref}",
                                path=self.manifest, hint="regenerate the registry: python -m hubkit.registry")
        return manifest


@dataclass
class Registry:
    """A parsed registry file."""

    location: str
    entries: list[RegistryEntry] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Any, location: str) -> "Registry":
        def bad(msg: str) -> RegistryError:
            return RegistryError(f"invalid registry {location}: {msg}",
                                 hint="regenerate it with `python -m hubkit.registry` or fix the file")

        if not isinstance(data, dict) or not isinstance(data.get("modules"), list):
            raise bad("expected an object with a 'modules' list")
        if data.get("format", REGISTRY_FORMAT) != REGISTRY_FORMAT:
            raise bad(f"unsupported format {data.get('format')!r} (this hubkit reads format {REGISTRY_FORMAT})")
        base = location.rsplit("/", 1)[0] if _is_url(location) else str(Path(location).parent)
        entries = []
        for i, item in enumerate(data["modules"]):
            if not isinstance(item, dict):
                raise bad(f"modules[{i}] is not an object")
            for key in ("name", "version", "manifest"):
                if not isinstance(item.get(key), str):
                    raise bad(f"modules[{i}].{key} is missing or not a string")
            if not NAME_PATTERN.fullmatch(item["name"]) or not VERSION_PATTERN.fullmatch(item["version"]):
                raise bad(f"modules[{i}] has an invalid name or version: {item['name']!r} {item['version']!r}")
            manifest = _join(base, item["manifest"])
            if location.startswith(REMOTE) and not manifest.startswith(REMOTE):
                raise bad(f"modules[{i}].manifest {item['manifest']!r} points at a local file from a remote registry")
            tags = item.get("tags", [])
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise bad(f"modules[{i}].tags must be a list of strings")
            entries.append(RegistryEntry(item["name"], item["version"], str(item.get("summary", "")),
                                         str(item.get("task", "")), tuple(tags), manifest, location))
        return cls(location, entries)

    @classmethod
    def load(cls, location: str | Path) -> "Registry":
        location = str(location)
        try:
            data = json.loads(read_text(location))
        except HubkitError:
            raise
        except FileNotFoundError:
            raise RegistryError(f"registry not found: {location}", hint="check HUBKIT_REGISTRY") from None
        except JSON_READ_ERRORS as exc:
            raise RegistryError(f"cannot read registry {location}: {type(exc).__name__}: {str(exc)[:200]}",
                                hint="fix or regenerate the file") from None
        return cls.from_dict(data, location)


def build_registry_index(modules_dir: str | Path) -> dict:
    """The registry.json content for every module folder under ``modules_dir`` (validated)."""
    modules_dir = Path(modules_dir)
    entries = []
    for path in sorted(modules_dir.glob(f"*/{constants.MANIFEST_FILENAME}")):
        m = Manifest.from_file(path)
        if m.name != path.parent.name:
            raise ManifestError(f"name '{m.name}' differs from its folder '{path.parent.name}'", path=str(path), field="name")
        entries.append({"name": m.name, "version": m.version, "summary": m.summary, "task": m.task,
                        "tags": list(m.tags), "manifest": path.relative_to(modules_dir.parent).as_posix()})
    return {"format": REGISTRY_FORMAT, "modules": entries}


def default_registries() -> list[Registry]:
    """The registries in search order: ``HUBKIT_REGISTRY`` first, then the built-in one."""
    registries = []
    if constants.HUBKIT_REGISTRY:
        registries.append(Registry.load(constants.HUBKIT_REGISTRY))
    if constants.BUILTIN_REGISTRY.is_file():
        registries.append(Registry.load(constants.BUILTIN_REGISTRY))
    return registries


def all_entries(registries: Iterable[Registry] | None = None) -> list[RegistryEntry]:
    """Every entry of every registry; an entry of an earlier registry hides the same ref later."""
    seen, out = set(), []
    for registry in default_registries() if registries is None else registries:
        for entry in registry.entries:
            if entry.ref not in seen:
                seen.add(entry.ref)
                out.append(entry)
    return out


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split ``name==version`` (or ``name``) into its parts."""
    name, _, version = ref.partition("==")
    return name.strip(), (version.strip() or None)


def resolve(name: str, version: str | None = None, entries: list[RegistryEntry] | None = None) -> RegistryEntry:
    """The registry entry for ``name`` at ``version`` (the newest when None)."""
    entries = all_entries() if entries is None else entries
    candidates = [e for e in entries if e.name == name]
    if not candidates:
        raise UnknownModuleError(name, suggest(name, [e.name for e in entries]))
    if version is None:
        return max(candidates, key=lambda e: version_key(e.version))
    for entry in candidates:
        if entry.version == version:
            return entry
    raise UnknownVersionError(name, version, sorted({e.version for e in candidates}, key=version_key))


def suggest(name: str, names: Iterable[str]) -> list[str]:
    """Close names to offer after a typo."""
    names = sorted(set(names))
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return close or [n for n in names if name and (name in n or n in name)][:3]


def _score(entry: RegistryEntry, keyword: str, pattern: re.Pattern | None) -> int:
    kw = keyword.lower()
    name = entry.name.lower()
    if name == kw:
        return 100
    if name.startswith(kw):
        return 80
    if kw in name:
        return 60
    if pattern is not None and pattern.search(entry.name):
        return 50
    if any(kw == t.lower() for t in entry.tags):
        return 40
    if kw in entry.task.lower() or any(kw in t.lower() for t in entry.tags):
        return 30
    if kw in entry.summary.lower() or (pattern is not None and pattern.search(entry.summary)):
        return 20
    return 0


def search(keyword: str | None = None, entries: list[RegistryEntry] | None = None) -> list[RegistryEntry]:
    """Modules matching a keyword or regex, best match first (newest version of each)."""
    entries = all_entries() if entries is None else entries
    newest: dict[str, RegistryEntry] = {}
    for e in entries:
        if e.name not in newest or version_key(e.version) > version_key(newest[e.name].version):
            newest[e.name] = e
    if not keyword:
        return sorted(newest.values(), key=lambda e: e.name)
    try:
        pattern = re.compile(keyword, re.IGNORECASE)
    except re.error:
        pattern = None
    scored = [(_score(e, keyword, pattern), e) for e in newest.values()]
    return [e for s, e in sorted(scored, key=lambda se: (-se[0], se[1].name)) if s > 0]

