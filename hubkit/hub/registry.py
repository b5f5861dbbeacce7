"""Registries: indexes of modules, searched and resolved by name and version.

A registry is a JSON file (``registry.json``) listing modules with enough metadata to
search them, and where each one's manifest lives (a path or URL relative to the registry).
The built-in registry is generated from ``modules/`` (``python scripts/build_registry.py``); an extra
one can be named with ``HUBKIT_REGISTRY`` (a path or an http(s) URL) and is searched first. The last
good copy of a remote registry is kept in the cache, and used (with a warning) while it is unreachable.
After the registries comes the catalogue (:mod:`hubkit.hub.catalogue`, every pretrained timm weight on
the Hub): a registry module hides a catalogue module of the same name.
No torch import here: this is the fast path of ``hub search``.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urljoin

from .. import constants
from ..errors import (
    DownloadError,
    HubkitError,
    HubkitWarning,
    ManifestError,
    RegistryError,
    UnknownModuleError,
    UnknownVersionError,
)
from .catalogue import Catalogue, CatalogueRecord, gunzip, licence_terms
from .fs import atomic_write_text, read_capped
from .manifest import JSON_READ_ERRORS, NAME_PATTERN, VERSION_PATTERN, HasRef, Manifest, version_key

REGISTRY_FORMAT = 1
#: A registry fetched from these may only name manifests fetched from them too (never a local file).
REMOTE = ("http://", "https://")


def _is_url(location: str) -> bool:
    return bool(re.match(r"^(https?|file)://", location))


def is_remote(location: str) -> bool:
    """Whether ``location`` is fetched over the network (http/https), not read from this machine."""
    return location.startswith(REMOTE)


def _join(base: str, relative: str) -> str:
    if _is_url(relative) or Path(relative).is_absolute():
        return relative
    if _is_url(base):
        return urljoin(base if base.endswith("/") else base + "/", relative)
    return str(Path(base) / relative)


def read_text(location: str) -> str:
    """Read a small text file from a path or URL (registries, manifests, label lists), at most
    ``MAX_METADATA_BYTES``; ``.gz`` ones are unpacked."""
    if _is_url(location):
        from .download import fetch_bytes  # noqa: PLC0415 (its socket/subprocess/zipfile imports: hub search reads local files)

        data = fetch_bytes(location)
    else:
        data = read_capped(location)
    return (gunzip(data, location) if location.endswith(".gz") else data).decode("utf-8")


class _EntryTerms(HasRef):
    """What registry and catalogue entries derive alike from their task and licence."""

    task: str
    license: str

    @property
    def headless(self) -> bool:
        """No classifier with named classes: a feature extractor that ``hub run`` refuses."""
        return self.task == "feature_extraction"

    @property
    def licence_terms(self) -> str:
        return licence_terms(self.license)


@dataclass(frozen=True)
class RegistryEntry(_EntryTerms):
    """One module version as a registry lists it."""

    name: str
    version: str
    summary: str
    task: str
    tags: tuple[str, ...]
    manifest: str  # resolved location (path or URL) of the module.json
    license: str = "unknown"
    architecture: str = ""
    num_classes: int | None = None
    input_size: int | None = None  # the evaluation resolution (height)
    params: int | None = None
    aliases: tuple[str, ...] = ()  # other names that resolve to it (a bare timm architecture name)

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
                                path=self.manifest, hint="regenerate the registry: python scripts/build_registry.py")
        return manifest


class CatalogueEntry(_EntryTerms):
    """A module of the catalogue, with a :class:`RegistryEntry`'s fields taken from its record.

    ``hub search`` makes one per tag (~1,800): plain slots, nothing copied or checked; the
    manifest is made from the record, offline, and validated, only when it is loaded.
    """

    __slots__ = ("catalogue", "record", "aliases", "name", "version", "summary", "task", "tags", "license",
                 "architecture", "num_classes", "input_size", "params")

    def __init__(self, catalogue: Catalogue, record: CatalogueRecord, aliases: tuple[str, ...] = ()) -> None:
        self.catalogue, self.record, self.aliases = catalogue, record, aliases
        self.name, self.version, self.architecture = record.tag, catalogue.timm_version, record.architecture
        self.summary, self.task, self.tags = record["summary"], record.task, tuple(record["tags"])
        self.license, self.num_classes, self.params = record["license"], record["num_classes"], record.get("params")
        self.input_size = record["input_size"][1]

    def __repr__(self) -> str:
        return f"CatalogueEntry({self.ref!r})"

    @property
    def manifest(self) -> str:
        return f"{self.catalogue.location}:{self.record.tag}"

    def load_manifest(self) -> Manifest:
        return Manifest.from_dict(self.catalogue.manifest_data(self.record), path=self.manifest,
                                  base=str(Path(self.catalogue.location).parent))


@dataclass
class Registry:
    """A parsed registry file."""

    location: str
    entries: list[RegistryEntry] = field(default_factory=list)
    #: Why a remote registry could not be read (its entries are then those of its last good copy, or none).
    unreachable: DownloadError | None = None

    @classmethod
    def from_dict(cls, data: Any, location: str) -> "Registry":
        def bad(msg: str) -> RegistryError:
            return RegistryError(f"invalid registry {location}: {msg}",
                                 hint="regenerate it with `python scripts/build_registry.py` or fix the file")

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
            if is_remote(location) and not is_remote(manifest):
                raise bad(f"modules[{i}].manifest {item['manifest']!r} points at a local file from a remote registry")
            tags = item.get("tags", [])
            if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
                raise bad(f"modules[{i}].tags must be a list of strings")
            entries.append(RegistryEntry(item["name"], item["version"], str(item.get("summary", "")),
                                         str(item.get("task", "")), tuple(tags), manifest,
                                         str(item.get("license", "unknown")), str(item.get("architecture", "")),
                                         _optional_int(item.get("num_classes")), _optional_int(item.get("input_size"))))
        return cls(location, entries)

    @classmethod
    def load(cls, location: str | Path, text: str | None = None) -> "Registry":
        """Read and check the registry at ``location`` (``text``: its content, already read)."""
        location = str(location)
        try:
            data = json.loads(read_text(location) if text is None else text)
        except HubkitError:
            raise
        except FileNotFoundError:
            raise RegistryError(f"registry not found: {location}", hint="check HUBKIT_REGISTRY") from None
        except JSON_READ_ERRORS as exc:
            raise RegistryError(f"cannot read registry {location}: {type(exc).__name__}: {str(exc)[:200]}",
                                hint="fix or regenerate the file") from None
        return cls.from_dict(data, location)


def _optional_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def build_registry_index(modules_dir: str | Path) -> dict:
    """The registry.json content for every module folder under ``modules_dir`` (validated)."""
    modules_dir = Path(modules_dir)
    entries = []
    for path in sorted(modules_dir.glob(f"*/{constants.MANIFEST_FILENAME}")):
        m = Manifest.from_file(path)
        if m.name != path.parent.name:
            raise ManifestError(f"name '{m.name}' differs from its folder '{path.parent.name}'", path=str(path), field="name")
        entries.append({"name": m.name, "version": m.version, "summary": m.summary, "task": m.task,
                        "tags": list(m.tags), "license": m.license, "architecture": m.architecture,
                        "num_classes": m.num_classes, "input_size": m.preprocessing.input_size[1],
                        "manifest": path.relative_to(modules_dir.parent).as_posix()})
    return {"format": REGISTRY_FORMAT, "modules": entries}


def _remote_registry(url: str) -> Registry:
    """The registry at ``url``, kept in the cache when read; its last good copy when unreachable."""
    from .cache import Cache  # noqa: PLC0415 (only a remote registry is kept in the cache: keeps hub search off it)

    copy = Cache().registries_dir / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}.json"
    try:
        text = read_text(url)
    except DownloadError as exc:
        kept = copy.is_file()
        warnings.warn(f"registry {url} is unreachable ({exc.message}); "
                      + ("using its copy from " + _mtime(copy) if kept else "searching the built-in registry only"),
                      HubkitWarning, stacklevel=3)
        registry = Registry.load(url, text=copy.read_text(encoding="utf-8")) if kept else Registry(url)
        registry.unreachable = exc
        return registry
    registry = Registry.load(url, text=text)  # checked before it replaces the last good copy
    try:
        atomic_write_text(copy, text)
    except OSError:  # a read-only cache: the registry was read, only the fallback copy is not kept
        pass
    return registry


def _mtime(path: Path) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))


def default_registries() -> list[Registry]:
    """The registries in search order: ``HUBKIT_REGISTRY`` first, then the built-in one."""
    registries = []
    if constants.HUBKIT_REGISTRY and constants.HUBKIT_REGISTRY.startswith(REMOTE):
        registries.append(_remote_registry(constants.HUBKIT_REGISTRY))
    elif constants.HUBKIT_REGISTRY:
        registries.append(Registry.load(constants.HUBKIT_REGISTRY))
    if constants.BUILTIN_REGISTRY.is_file():
        registries.append(Registry.load(constants.BUILTIN_REGISTRY))
    return registries


def default_catalogue() -> Catalogue | None:
    """The catalogue searched after the registries (``HUBKIT_CATALOGUE``: another file, or ``off``)."""
    if constants.HUBKIT_CATALOGUE == "off":
        return None
    return Catalogue.load(constants.HUBKIT_CATALOGUE) if constants.HUBKIT_CATALOGUE else Catalogue.load()


def all_entries(registries: Iterable[Registry] | None = None, catalogue: Catalogue | None = None) -> list[RegistryEntry]:
    """Every entry of every registry, then of the catalogue (by default, when neither is given).

    An entry of an earlier registry hides the same ref later; a registry module hides the catalogue
    module of its name (the built-in, hand-checked modules win), and an alias that names one.
    A registry entry without a parameter count takes the catalogue's for its architecture.
    """
    if registries is None and catalogue is None:
        registries, catalogue = default_registries(), default_catalogue()
    seen, out = set(), []
    for registry in registries or ():
        for entry in registry.entries:
            if entry.ref not in seen:
                seen.add(entry.ref)
                out.append(entry)
    if catalogue is None:
        return out
    taken = {e.name for e in out}
    out = [_with_catalogue_params(e, catalogue) for e in out]
    aliases: dict[str, list[str]] = {}
    for alias, tag in catalogue.aliases.items():
        if alias not in taken:
            aliases.setdefault(tag, []).append(alias)
    out.extend(CatalogueEntry(catalogue, r, tuple(aliases.get(t, ()))) for t, r in catalogue.records.items() if t not in taken)
    return out


def _with_catalogue_params(entry: RegistryEntry, catalogue: Catalogue) -> RegistryEntry:
    if entry.params is not None or not entry.architecture:
        return entry
    record = catalogue.find(entry.architecture)
    if record is None or record["num_classes"] != entry.num_classes:
        record = next((r for r in catalogue.records.values() if r.architecture == entry.architecture
                       and r["num_classes"] == entry.num_classes), None)
    return entry if record is None else replace(entry, params=record.get("params"))


def resolve(name: str, version: str | None = None, entries: list[RegistryEntry] | None = None) -> RegistryEntry:
    """The registry entry for ``name`` (or an alias of it) at ``version`` (the newest when None). A name
    no registry lists while one was unreachable raises that registry's DownloadError: the likely reason."""
    registries = default_registries() if entries is None else []
    entries = all_entries(registries, default_catalogue()) if entries is None else entries
    candidates = [e for e in entries if e.name == name] or [e for e in entries if name in e.aliases]
    if not candidates:
        unreachable = [r.unreachable for r in registries if r.unreachable is not None]
        if unreachable:
            raise unreachable[0]
        raise UnknownModuleError(name, suggest(name, [e.name for e in entries]))
    if version is None:
        return max(candidates, key=lambda e: version_key(e.version))
    for entry in candidates:
        if entry.version == version:
            return entry
    raise UnknownVersionError(candidates[0].name, version, sorted({e.version for e in candidates}, key=version_key))


def suggest(name: str, names: Iterable[str]) -> list[str]:
    """Close names to offer after a typo."""
    names = sorted(set(names))
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    return close or [n for n in names if name and (name in n or n in name)][:3]


def _score(entry: RegistryEntry, kw: str, pattern: re.Pattern | None) -> int:
    """How well ``entry`` matches the lower-case keyword ``kw`` (names are lower case: NAME_PATTERN)."""
    name = entry.name
    if name == kw:
        return 100
    if kw in entry.aliases:
        return 95
    if kw in name:
        return 80 if name.startswith(kw) else 60
    if pattern is not None and pattern.search(name):
        return 50
    tags = [t.lower() for t in entry.tags]
    if kw in tags:
        return 40
    if kw in entry.task or any(kw in t for t in tags):
        return 30
    if kw in entry.summary.lower() or (pattern is not None and pattern.search(entry.summary)):
        return 20
    return 0


def _compile(keyword: str) -> re.Pattern | None:
    """The keyword as a regex, or None when it is plain text (substring tests already cover it) or invalid."""
    if re.escape(keyword) == keyword:
        return None
    try:
        return re.compile(keyword, re.IGNORECASE)
    except re.error:
        return None


def _keyword_score(entry: RegistryEntry, keyword: str, patterns: list[tuple[str, re.Pattern | None]]) -> int:
    """How well ``entry`` matches: the whole keyword, else every one of its words (their mean score)."""
    whole = _score(entry, keyword.lower(), patterns[0][1])
    if whole or len(patterns) == 1:
        return whole
    scores = [_score(entry, word.lower(), pattern) for word, pattern in patterns[1:]]
    return sum(scores) // len(scores) if all(scores) else 0


@dataclass(frozen=True)
class SearchFilters:
    """What ``hub search`` narrows the results to; None (or empty) leaves a criterion out.

    ``license`` is a comma-separated list of licence ids (``apache-2.0``) or terms (``permissive``,
    ``non-commercial``, ``custom``, ``unknown``); ``max_params`` drops modules of unknown size;
    ``input_size`` is the evaluation resolution in pixels; ``headless`` keeps only feature
    extractors (True) or only classifiers (False).
    """

    task: str | None = None
    tags: tuple[str, ...] = ()
    license: str | None = None
    max_params: int | None = None
    input_size: int | None = None
    headless: bool | None = None

    def accepts(self, entry: RegistryEntry) -> bool:
        if self.task and entry.task != self.task:
            return False
        if self.tags and not {t.lower() for t in self.tags} <= {t.lower() for t in entry.tags}:
            return False
        if self.license:
            wanted = {w.strip().lower() for w in self.license.split(",")}
            if entry.license.lower() not in wanted and entry.licence_terms not in wanted:
                return False
        if self.max_params is not None and (entry.params is None or entry.params > self.max_params):
            return False
        if self.input_size is not None and entry.input_size != self.input_size:
            return False
        return self.headless is None or entry.headless == self.headless


def search(keyword: str | None = None, entries: list[RegistryEntry] | None = None, *,
           filters: SearchFilters | None = None, limit: int | None = None) -> list[RegistryEntry]:
    """Modules matching a keyword or regex and ``filters``, best match first (newest version of each).

    Ties go to registry modules before catalogue ones, then to an architecture's default weights,
    then by name; several words must each match somewhere. ``limit`` keeps the first ones.
    """
    entries = all_entries() if entries is None else entries
    filters = filters or SearchFilters()
    newest: dict[str, RegistryEntry] = {}
    for e in entries:
        if filters.accepts(e) and (e.name not in newest or version_key(e.version) > version_key(newest[e.name].version)):
            newest[e.name] = e
    if keyword and keyword.strip():
        keyword = keyword.strip()
        patterns = [(keyword, _compile(keyword))] + [(w, _compile(w)) for w in keyword.split()][: 8 if " " in keyword else 0]
        scored = [(_keyword_score(e, keyword, patterns), e) for e in newest.values()]
    else:
        scored = [(1, e) for e in newest.values()]
    ranked = sorted(((s, e) for s, e in scored if s > 0),
                    key=lambda se: (-se[0], isinstance(se[1], CatalogueEntry), not se[1].aliases, se[1].name))
    return [e for _, e in ranked[:limit]]
