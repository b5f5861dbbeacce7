"""The catalogue: every pretrained weight timm hosts on the Hugging Face Hub, as hub modules.

``catalogue_data/`` is generated from timm's own metadata by ``python scripts/build_catalogue.py``
and ships with hubkit: ``catalogue.json.gz`` holds one compact record per timm tag (only what
differs from ``defaults``; all that search needs), ``features.json.gz`` the feature taps once per
architecture (read only to show or install a module), and ``labels/<set>.txt.gz`` each label set
once, named by the records.
:func:`manifest_data` turns a record into an ordinary module manifest, so a catalogue module
is installed, verified and loaded exactly like a built-in one.

A catalogue module's version is the timm version whose metadata described it; its weights are
the Hub's ``main`` revision at install time, and the commit and sha256 they resolved to are
recorded in the install record (and so pinned by ``hub lock``). Torch-free, like all of hub/.
"""
from __future__ import annotations

import functools
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RegistryError

CATALOGUE_DIR = Path(__file__).resolve().parent / "catalogue_data"
CATALOGUE_FILE = CATALOGUE_DIR / "catalogue.json.gz"
FEATURES_FILE = CATALOGUE_DIR / "features.json.gz"
CATALOGUE_FORMAT = 1
#: A catalogue (or label set) larger than this once decompressed is refused: the shipped one is ~2 MiB.
MAX_CATALOGUE_BYTES = 64 << 20
DEFAULT_HF_FILENAME = "model.safetensors"
#: What a record leaves out takes these values (timm's most common pretrained config).
DEFAULTS: dict[str, Any] = {"input_size": [3, 224, 224], "interpolation": "bicubic", "crop_pct": 0.875,
                            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "license": "unknown"}
#: Licences that allow commercial use as they stand; anything else is flagged in ``hub show``/``search``.
PERMISSIVE_LICENCES = frozenset({"apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "cc-by-4.0", "cc0-1.0"})
_NON_COMMERCIAL = re.compile(r"^cc-by-nc|non-?commercial|^apple-amlr$")
def licence_terms(licence: str) -> str:
    """``permissive``, ``non-commercial``, ``custom`` (read its terms) or ``unknown``."""
    licence = licence.lower()
    if licence in PERMISSIVE_LICENCES:
        return "permissive"
    if _NON_COMMERCIAL.search(licence):
        return "non-commercial"
    return "unknown" if licence in ("", "unknown") else "custom"


def gunzip(data: bytes, where: str, limit: int = MAX_CATALOGUE_BYTES) -> bytes:
    """Decompressed gzip ``data`` (from ``where``, one gzip member), refused when it would be more than
    ``limit`` bytes. zlib alone (the gzip module's import costs a tenth of the catalogue's read)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # 16 +: the gzip header and trailer
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:  # not gzip, damaged
        raise RegistryError(f"{where} is not a readable gzip file: {str(exc)[:200]}",
                            hint="reinstall hubkit or fix the file") from None
    if len(out) > limit:
        raise RegistryError(f"{where} decompresses to more than {limit} bytes", hint="reinstall hubkit or fix the file")
    if not inflater.eof or inflater.unused_data.strip(b"\0"):
        raise RegistryError(f"{where} is not a readable gzip file: it is truncated or has trailing data",
                            hint="reinstall hubkit or fix the file")
    return out


def format_params(params: int | None) -> str:
    if params is None:
        return "?"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if params >= scale:
            return f"{params / scale:.1f}{unit}"
    return str(params)


def parse_params(text: str) -> int:
    """A parameter count as people write it: ``25557032``, ``30M``, ``1.5B``, ``500k``."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMbBgG]?)\s*", text)
    if not match:
        raise ValueError(f"{text!r} is not a parameter count (e.g. 25000000, 30M, 1.5B)")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[match[2].lower()]
    return int(float(match[1]) * scale)


class CatalogueRecord:
    """One catalogue entry: its row as stored, read through the catalogue's ``defaults``.

    Making one copies and checks nothing (``hub search`` makes one per tag, ~1,800, and reads a few
    fields of each); the row is validated where it is used, as the manifest :meth:`Catalogue.manifest_data`
    makes of it.
    """

    __slots__ = ("tag", "row", "defaults")

    def __init__(self, tag: str, row: dict, defaults: dict) -> None:
        self.tag, self.row, self.defaults = tag, row, defaults

    def __repr__(self) -> str:
        return f"CatalogueRecord({self.tag!r})"

    def __getitem__(self, key: str) -> Any:
        return self.row[key] if key in self.row else self.defaults[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.row[key] if key in self.row else self.defaults.get(key, default)

    @property
    def data(self) -> dict:
        """Every field, the defaults filled in."""
        return {**self.defaults, **self.row}

    @property
    def architecture(self) -> str:
        return self.tag.split(".", 1)[0]

    @property
    def labels(self) -> str | None:
        return self.get("labels")

    @property
    def task(self) -> str:
        return "image_classification" if self.get("labels") else "feature_extraction"


@dataclass(frozen=True)
class Catalogue:
    """The parsed catalogue; the feature taps are read from ``features.json.gz`` beside it when first needed."""

    timm_version: str
    label_sets: dict
    records: dict  # tag -> CatalogueRecord
    aliases: dict  # bare architecture name -> its default tag
    location: str
    given_architectures: dict | None = None

    @classmethod
    def from_dict(cls, data: Any, location: str, architectures: dict | None = None) -> "Catalogue":
        if not isinstance(data, dict) or data.get("format") != CATALOGUE_FORMAT or not isinstance(data.get("modules"), list):
            raise RegistryError(f"{location} is not a hubkit catalogue of format {CATALOGUE_FORMAT}",
                                hint="regenerate it: python scripts/build_catalogue.py")
        defaults = {**DEFAULTS, **data.get("defaults", {})}
        records, aliases = {}, {}
        for item in data["modules"]:
            record = CatalogueRecord(item["tag"], item, defaults)
            records[record.tag] = record
            if item.get("default"):
                aliases[record.architecture] = record.tag
        return cls(str(data.get("timm", "0")), data.get("label_sets", {}), records, aliases, location, architectures)

    @classmethod
    def load(cls, path: str | Path = CATALOGUE_FILE) -> "Catalogue":
        return _load(str(path))

    @property
    def architectures(self) -> dict:
        """Feature taps by architecture (``features.json.gz`` beside the catalogue, read once)."""
        if self.given_architectures is not None:
            return self.given_architectures
        return _read_gzip_json(str(Path(self.location).with_name(FEATURES_FILE.name)))["architectures"]

    def find(self, name: str) -> CatalogueRecord | None:
        """The record for a timm tag, or for a bare architecture name with a default tag."""
        return self.records.get(name) or self.records.get(self.aliases.get(name, ""))

    def manifest_data(self, record: CatalogueRecord) -> dict:
        """The module manifest (``module.json`` content) of a catalogue record; labels stay a reference."""
        d = record.data
        hub_id = d.get("hf", f"timm/{record.tag}")
        features = d.get("features") or self.architectures.get(record.architecture, {}).get("features")
        source = {"weights": f"https://huggingface.co/{hub_id}"}
        source.update({k: d[k] for k in ("paper", "paper_name", "origin") if d.get(k)})
        data = {"format": 1, "name": record.tag, "version": self.timm_version, "summary": d["summary"],
                "task": record.task, "tags": d["tags"], "license": d["license"], "source": source,
                "architecture": {"timm_name": record.tag, "kwargs": {}},
                "weights": {"sources": [{"kind": "hf", "url": f"hf://{hub_id}@main/{d.get('file', DEFAULT_HF_FILENAME)}"}],
                            "key_map": {"kind": "identical"}},
                "preprocessing": {k: d[k] for k in ("input_size", "interpolation", "crop_pct", "mean", "std")},
                "num_classes": d["num_classes"], "features": features, "params": d.get("params")}
        if record.labels:
            data["labels"] = self.label_sets[record.labels]["file"]
        return data


@functools.lru_cache(maxsize=8)
def _read_gzip_json(location: str) -> Any:
    try:
        return json.loads(gunzip(Path(location).read_bytes(), location))
    except FileNotFoundError:
        raise RegistryError(f"{location} is missing", hint="reinstall hubkit") from None
    except RegistryError:
        raise
    except (OSError, ValueError) as exc:
        raise RegistryError(f"cannot read {location}: {type(exc).__name__}: {str(exc)[:200]}",
                            hint="reinstall hubkit, or regenerate it: python scripts/build_catalogue.py") from None


@functools.lru_cache(maxsize=4)
def _load(location: str) -> Catalogue:
    return Catalogue.from_dict(_read_gzip_json(location), location)
