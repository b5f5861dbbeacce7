"""Generate the module catalogue from the installed timm: python scripts/build_catalogue.py [--cheap]

One entry per pretrained tag whose weights timm hosts on the Hugging Face Hub in its own format.
Everything comes from timm's metadata (``timm.list_pretrained``, ``get_pretrained_cfg``), offline;
the parameter count and the feature taps come from building each model on the meta device (no
memory, no weights), with a process pool of 2 and a per-tag cache under build/, because building
~1,800 models takes minutes. The label sets (ImageNet-1k/12k/21k/22k names, shipped with timm) are
written once each and named by the entries that use them.

``--cheap`` rebuilds only what needs no model build and compares it with the committed catalogue
(what tests/test_catalogue.py checks); it exits 1 when they differ.
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import timm
import torch
from timm.data import ImageNetInfo, infer_imagenet_subset
from timm.models import get_pretrained_cfg
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from make_builtin_manifests import features_of  # noqa: E402

from hubkit.hub.catalogue import (  # noqa: E402
    CATALOGUE_DIR,
    CATALOGUE_FILE,
    CATALOGUE_FORMAT,
    DEFAULT_HF_FILENAME,
    DEFAULTS,
    FEATURES_FILE,
    format_params,
)
from hubkit.hub.manifest import INTERPOLATIONS, NAME_PATTERN  # noqa: E402

CACHE = ROOT / "build" / "catalogue-cache.jsonl"
#: Name prefixes that say who trained or ported a model, not what it is (skipped to find its family).
PORT_PREFIXES = frozenset({"tf", "tv", "gluon", "legacy", "ig", "ssl", "swsl", "hf", "timm"})
SET_TITLES = {"imagenet-1k": "ImageNet-1k", "imagenet-12k": "ImageNet-12k", "imagenet-22k": "ImageNet-22k",
              "imagenet-21k-goog": "ImageNet-21k (Google)", "imagenet-22k-ms": "ImageNet-22k (Microsoft)",
              "imagenet-21k-miil": "ImageNet-21k-P (MIIL)"}
#: The label sets timm ships names for (``timm.data.ImageNetInfo``), by ``infer_imagenet_subset`` name.
LABEL_SETS = ("imagenet-1k", "imagenet-12k", "imagenet-22k", "imagenet-21k-goog", "imagenet-22k-ms", "imagenet-21k-miil")


def paper_url(cfg: dict) -> str | None:
    ids = cfg.get("paper_ids")
    first = (ids if isinstance(ids, (list, tuple)) else [ids])[0] if ids else None
    if isinstance(first, str) and first.lower().startswith("arxiv:"):
        return f"https://arxiv.org/abs/{first.split(':', 1)[1]}"
    return first


def why_left_out(tag: str, cfg: dict) -> str | None:
    """None when the tag can be a module, else the reason it cannot."""
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        return "weights not on the Hugging Face Hub"
    # Outside timm's organisation, only repositories published for timm (named after the tag, or *_timm)
    # hold timm's format; the others need timm's conversion code when they load.
    owner, _, repo = hub_id.partition("/")
    if owner != "timm" and repo != tag and not repo.endswith("_timm"):
        return f"{hub_id} is not in timm's format (timm converts it when it loads)"
    if not NAME_PATTERN.fullmatch(tag):
        return "name not usable as a module name"
    if cfg.get("interpolation") not in INTERPOLATIONS or not 0.1 <= float(cfg.get("crop_pct") or 1.0) <= 1.0:
        return f"preprocessing hubkit does not model ({cfg.get('interpolation')}, crop {cfg.get('crop_pct')})"
    return None


def cheap_record(tag: str, cfg: dict, default_tags: set[str]) -> dict:
    """The entry's fields that come straight from timm's pretrained config (no model build)."""
    record = {"tag": tag, "num_classes": int(cfg["num_classes"])}
    if cfg["hf_hub_id"] != f"timm/{tag}":
        record["hf"] = cfg["hf_hub_id"]
    if (cfg.get("hf_hub_filename") or DEFAULT_HF_FILENAME) != DEFAULT_HF_FILENAME:
        record["file"] = cfg["hf_hub_filename"]
    subset = infer_imagenet_subset(cfg)
    if subset in LABEL_SETS:
        record["labels"] = subset
    pre = {"input_size": list(cfg["input_size"]), "interpolation": cfg["interpolation"],
           "crop_pct": round(float(cfg["crop_pct"]), 4), "mean": [round(float(v), 6) for v in cfg["mean"]],
           "std": [round(float(v), 6) for v in cfg["std"]], "license": cfg.get("license") or "unknown"}
    record.update({k: v for k, v in pre.items() if DEFAULTS.get(k) != v})
    for key, value in (("paper", paper_url(cfg)), ("paper_name", cfg.get("paper_name")), ("origin", cfg.get("origin_url"))):
        if value:
            record[key] = value
    if tag in default_tags:
        record["default"] = True
    return record


def cheap_catalogue() -> tuple[list[dict], dict[str, str]]:
    """Every usable tag's cheap record, and the reason for each tag left out."""
    tags = timm.list_pretrained()
    configs = {t: get_pretrained_cfg(t).to_dict() for t in tags}
    default_tags = {f"{c['architecture']}.{get_pretrained_cfg(c['architecture']).tag}" for c in configs.values()}
    records, left_out = [], {}
    for tag in sorted(tags):
        reason = why_left_out(tag, configs[tag])
        if reason:
            left_out[tag] = reason
        else:
            records.append(cheap_record(tag, configs[tag], default_tags))
    return records, left_out


class _SkipInitOnMeta(TorchFunctionMode):
    """Makes in-place ops on meta tensors (weight initialisation) no-ops: they cost most of a meta build."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by keyword
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def meta_model(tag: str) -> torch.nn.Module:
    """The model of a timm tag on the meta device, without its weight initialisation (shapes only)."""
    with torch.device("meta"), _SkipInitOnMeta():
        return timm.create_model(tag, pretrained=False)


def family(architecture: str) -> str:
    """The model family of a timm architecture name: ``tf_efficientnetv2_s`` -> ``efficientnet``."""
    tokens = [t for t in architecture.split("_") if t not in PORT_PREFIXES] or [architecture]
    return re.sub(r"(v\d+)?[\d.]*$", "", tokens[0]) or tokens[0]


def described(record: dict) -> dict:
    """The record with the summary and search tags people see (derived here once, not at every search)."""
    arch, _, pretrained = record["tag"].partition(".")
    n, labels = record["num_classes"], record.get("labels")
    what = (f"{SET_TITLES[labels]} classifier" if labels
            else "feature extractor, no classifier head" if n == 0 else f"feature extractor, {n}-wide output head")
    paper = f" ({record['paper_name']})" if record.get("paper_name") else ""
    size = record.get("input_size", DEFAULTS["input_size"])[1]
    summary = f"{arch} '{pretrained}' weights: {what}, {format_params(record['params'])} params, {size}px{paper}"
    words = ["catalogue", family(arch), *(t for t in pretrained.split("_") if t and t != "ft"), labels or "headless"]
    return {**record, "summary": summary, "tags": list(dict.fromkeys(words))}


def measure(tag: str) -> dict:
    """Parameter count and feature taps of one tag's model, built on the meta device."""
    torch.set_num_threads(1)
    try:
        model = meta_model(tag)
    except Exception as exc:  # noqa: BLE001 - any model that cannot be built is reported, not fatal
        return {"tag": tag, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {"tag": tag, "params": sum(p.numel() for p in model.parameters()), "features": features_of(model)}


def measured(tags: list[str], jobs: int) -> dict[str, dict]:
    """Measurements of ``tags``, from build/ where this timm version made them already."""
    done: dict[str, dict] = {}
    if CACHE.is_file():
        for line in CACHE.read_text().splitlines():
            item = json.loads(line)
            if item.get("timm") == timm.__version__:
                done[item["tag"]] = item
    todo = [t for t in tags if t not in done]
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with ProcessPoolExecutor(jobs) as pool, open(CACHE, "a") as cache:
        for i, item in enumerate(pool.map(measure, todo, chunksize=4), 1):
            item["timm"] = timm.__version__
            cache.write(json.dumps(item) + "\n")
            cache.flush()
            done[item["tag"]] = item
            if i % 50 == 0:
                sys.stderr.write(f"  built {i}/{len(todo)} in {time.time() - started:.0f}s\n")
    return done


def write_label_sets(used: set[str]) -> dict:
    out = {}
    for subset in sorted(used):
        info = ImageNetInfo(subset)
        names = [info.index_to_description(i).replace("\n", " ").strip() for i in range(info.num_classes())]
        path = CATALOGUE_DIR / "labels" / f"{subset}.txt.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(("\n".join(names) + "\n").encode("utf-8"), mtime=0))
        out[subset] = {"file": f"labels/{subset}.txt.gz", "count": len(names)}
    return out


def build(jobs: int) -> tuple[dict, dict]:
    """The catalogue (what search reads) and the feature taps by architecture (read to show or install)."""
    records, left_out = cheap_catalogue()
    found = measured([r["tag"] for r in records], jobs)
    architectures: dict[str, dict] = {}
    modules = []
    for record in records:
        item = found[record["tag"]]
        if "error" in item:
            left_out[record["tag"]] = f"cannot be built on the meta device: {item['error']}"
            continue
        arch = record["tag"].split(".", 1)[0]
        features = architectures.setdefault(arch, {"features": item["features"]})["features"]
        record = described({**record, "params": item["params"]})
        if item["features"] != features:
            record["features"] = item["features"]
        modules.append(record)
    labels = write_label_sets({m["labels"] for m in modules if "labels" in m})
    catalogue = {"format": CATALOGUE_FORMAT, "timm": timm.__version__, "defaults": DEFAULTS, "label_sets": labels,
                 "modules": modules, "left_out": dict(sorted(left_out.items()))}
    return catalogue, {"timm": timm.__version__, "architectures": dict(sorted(architectures.items()))}


CHEAP_KEYS = ("tag", "num_classes", "hf", "file", "labels", "input_size", "interpolation", "crop_pct", "mean", "std",
              "license", "paper", "paper_name", "origin", "default")


def cheap_view(modules: list[dict]) -> list[dict]:
    """The fields of catalogue records that ``cheap_catalogue`` makes (what the sync check compares)."""
    return [{k: m[k] for k in CHEAP_KEYS if k in m} for m in modules]


def check_cheap() -> list[str]:
    """Differences between the committed catalogue and what this timm says now (empty when in sync)."""
    committed = json.loads(gzip.decompress(CATALOGUE_FILE.read_bytes()))
    if committed["timm"] != timm.__version__:
        return [f"catalogue made with timm {committed['timm']}, installed timm is {timm.__version__}"]
    records, _ = cheap_catalogue()
    now = {r["tag"]: r for r in cheap_view(records)}
    built_ok = {m["tag"] for m in committed["modules"]} | {t for t, why in committed["left_out"].items() if "meta device" in why}
    stored = {r["tag"]: r for r in cheap_view(committed["modules"])}
    problems = [f"{t}: new in timm" for t in sorted(set(now) - built_ok)]
    problems += [f"{t}: no longer in timm" for t in sorted(set(stored) - set(now))]
    problems += [f"{t}: differs ({stored[t]} vs {now[t]})" for t in sorted(set(stored) & set(now)) if stored[t] != now[t]]
    return problems


def catalogue_text(catalogue: dict) -> str:
    """The catalogue as JSON with one module, architecture or left-out tag per line (greppable with zcat)."""
    parts = []
    for key, value in catalogue.items():
        if isinstance(value, list):
            inner = ",\n".join(json.dumps(v) for v in value)
            parts.append(f"{json.dumps(key)}: [\n{inner}\n]")
        elif key in ("architectures", "left_out"):
            inner = ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
            parts.append(f"{json.dumps(key)}: {{\n{inner}\n}}")
        else:
            parts.append(f"{json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cheap", action="store_true", help="only compare the metadata fields with the committed file")
    parser.add_argument("--jobs", type=int, default=2, help="processes building models (default 2)")
    args = parser.parse_args()
    if args.cheap:
        problems = check_cheap()
        sys.stdout.write("\n".join(problems[:20]) + ("\n" if problems else "catalogue in sync with timm\n"))
        return 1 if problems else 0
    catalogue, features = build(args.jobs)
    CATALOGUE_FILE.write_bytes(gzip.compress(catalogue_text(catalogue).encode("utf-8"), mtime=0))
    FEATURES_FILE.write_bytes(gzip.compress(catalogue_text(features).encode("utf-8"), mtime=0))
    sys.stdout.write(f"wrote {CATALOGUE_FILE}: {len(catalogue['modules'])} modules, "
                     f"{len(catalogue['left_out'])} tags left out\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
