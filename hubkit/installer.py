"""Installing a module: resolve -> download -> convert -> commit a snapshot to the cache.

This sits above :mod:`hubkit.hub` (resolving, downloading, the cache) and :mod:`hubkit.models`
(converting weights onto the timm architecture needs torch). Functions return values and
raise typed errors; they never print.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from . import constants
from .errors import DownloadError, HubkitError, IntegrityError, ManifestError, NotInstalledError
from .hub.archive import is_archive, pack_folder, safe_extract
from .hub.cache import Cache, InstalledModule, check_file
from .hub.download import fetch_source, pinned_origin
from .hub.fs import atomic_write_json, sha256_file
from .hub.labels import read_labels
from .hub.manifest import NAME_PATTERN, VERSION_PATTERN, Manifest, format_ref, parse_ref
from .hub.registry import resolve


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


def _fetch_weights(manifest: Manifest, cache: Cache, progress: bool) -> tuple[Path, str, str | None]:
    """The verified weights file, where it came from (pinned: an hf:// revision becomes its commit), its sha256."""
    errors = []
    for source in manifest.weights:
        try:
            path = fetch_source(source, manifest.base, cache.blobs_dir, progress=progress)
            return (path, *pinned_origin(source, path))
        except HubkitError as exc:  # unreachable, damaged, missing: try the next mirror, report all
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    tried = "; ".join(f"{s.describe()}: {e.message}" for s, e in zip(manifest.weights, errors))
    raise DownloadError(f"no weight source of {manifest.ref} worked ({tried})", hint="check the network or the mirrors")


def _build_snapshot(manifest: Manifest, labels: list[str], raw_weights: Path, staging: Path, origin: str,
                    origin_sha256: str | None, cache: Cache) -> None:
    from .models.factory import empty_model_state  # noqa: PLC0415 (timm takes seconds to import: only a conversion needs it)
    from .models.weights import load_state_dict, map_state_dict, save_state_dict  # noqa: PLC0415 (torch, as above)

    state = map_state_dict(load_state_dict(raw_weights), empty_model_state(manifest), manifest.key_map,
                           what=f"{manifest.ref} weights from {origin}")
    weights = staging / constants.WEIGHTS_FILENAME
    save_state_dict(state, weights, {"hubkit_module": manifest.ref})
    if labels:
        (staging / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")
    digest = sha256_file(weights)  # once: the manifest and the install record both pin it
    data = local_manifest(manifest, digest, weights.stat().st_size)
    atomic_write_json(staging / constants.MANIFEST_FILENAME, data)
    shipped = _copy_shipped_artefacts(manifest, staging)  # recorded as artefacts (as a conversion's are)
    cache.write_record(staging, weights, weights_sha256=digest, compiled=shipped, source=origin,
                       **({"source_sha256": origin_sha256} if origin_sha256 else {}))


def _copy_shipped_artefacts(manifest: Manifest, staging: Path) -> dict:
    """Copy the artefacts the manifest ships (an int8 model) from its folder into the snapshot, each
    checked against its pinned size and sha256; their install-record entries (as ``record_artefact``'s)."""
    recorded = {}
    for runtime, entry in manifest.compiled.items():
        files = {}
        for name, pin in entry["files"].items():
            source, target = Path(manifest.base) / name, staging / name
            fix = "the module folder is incomplete or damaged: copy or unpack it again"
            if not source.is_file():
                raise IntegrityError(f"{name} of {manifest.ref} is missing", path=str(source), hint=fix)
            shutil.copyfile(source, target)
            check_file(target, pin, f"{name} of {manifest.ref}", fix, full=True)  # the bytes the snapshot holds
            st = target.stat()
            files[name] = {**pin, "mtime_ns": st.st_mtime_ns}
        recorded[runtime] = {"files": files, "precision": entry["precision"], "shipped": True}
    return recorded


def installed_intact(cache: Cache, name: str, version: str | None, *, full: bool = False) -> InstalledModule | None:
    """The "already installed?" question of every install: the installed module when every file of
    its snapshot still matches its install record, else None (missing or damaged: install it again)."""
    existing = cache.get(name, version)
    if existing is None:
        return None
    try:
        cache.check(existing, full=full)
    except IntegrityError:
        return None
    return existing


def install_manifest(manifest: Manifest, *, force: bool = False, cache: Cache | None = None,
                     progress: bool = True, full_check: bool = False) -> InstalledModule:
    """Install the module a validated manifest describes (fetch, verify, convert, publish)."""
    cache = cache or Cache()
    labels = read_labels(manifest) if manifest.task == "image_classification" else []
    with cache.lock(manifest.name):
        existing = None if force else installed_intact(cache, manifest.name, manifest.version, full=full_check)
        if existing is not None:
            return existing
        from .models.factory import check_architecture  # noqa: PLC0415 (timm takes seconds to import: a reuse needs none)

        check_architecture(manifest)  # before a download that could not be used
        raw, origin, origin_sha256 = _fetch_weights(manifest, cache, progress)
        staging = cache.new_staging(manifest.name)
        try:
            _build_snapshot(manifest, labels, raw, staging, origin, origin_sha256, cache)
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


def install(target: str, *, force: bool = False, cache: Cache | None = None, progress: bool = True,
            full_check: bool = False) -> InstalledModule:
    """Install ``name[==version]`` from the registries, a module folder, or a module archive.

    Whatever the kind, an installed copy is reused only after :func:`installed_intact` checked it
    (``full_check``: hash every file, weights included); a damaged one is installed again.
    """
    cache = cache or Cache()
    options = dict(force=force, cache=cache, progress=progress, full_check=full_check)
    path = Path(target).expanduser()
    if path.is_dir():
        return install_manifest(Manifest.from_file(_find_module_folder(path) / constants.MANIFEST_FILENAME), **options)
    if is_archive(target) and path.is_file():
        cache.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache.root, prefix=".unpack-") as tmp:
            folder = _find_module_folder(safe_extract(path, tmp))
            return install_manifest(Manifest.from_file(folder / constants.MANIFEST_FILENAME), **options)
    if is_archive(target) or "/" in target or target.startswith("."):
        raise NotInstalledError(f"no module folder or archive at {target}",
                                hint="give a registry name, an existing folder, or a .tar.gz/.zip file")
    name, version = parse_ref(target)
    if not NAME_PATTERN.fullmatch(name) or (version is not None and not VERSION_PATTERN.fullmatch(version)):
        raise NotInstalledError(f"'{target}' is not a module name or NAME==VERSION",
                                hint="give a registry name, an existing folder, or a .tar.gz/.zip file")
    existing = None if force else installed_intact(cache, name, version, full=full_check)
    if existing is not None:  # checked: installed and intact, no registry or network needed
        return existing
    return install_manifest(resolve(name, version).load_manifest(), **options)


def ensure_installed(name: str, version: str | None = None, cache: Cache | None = None) -> InstalledModule:
    """The installed module, installing it first when it is missing (what ``hub run`` does)."""
    cache = cache or Cache()
    found = cache.get(name, version)
    if found is not None:
        return found
    return install(format_ref(name, version), cache=cache)


def download(ref: str, output_path: str | Path = ".", cache: Cache | None = None, progress: bool = True) -> Path:
    """Write ``name[==version]`` as an installable ``<name>-<version>.tar.gz`` into ``output_path``."""
    cache = cache or Cache()
    module = install(ref, cache=cache, progress=progress, full_check=True)  # never pack files that changed since install
    output = Path(output_path)
    archive = output if is_archive(output) else output / f"{module.name}-{module.version}.tar.gz"
    with tempfile.TemporaryDirectory() as tmp:
        for item in module.path.iterdir():
            if item.name != constants.INSTALL_RECORD_FILENAME:
                shutil.copy2(item, Path(tmp) / item.name)
        return pack_folder(tmp, archive, module.name)


__all__ = ["install", "install_manifest", "installed_intact", "ensure_installed", "download", "local_manifest"]
