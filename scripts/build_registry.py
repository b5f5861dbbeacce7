"""Regenerate registry.json from the module folders: python scripts/build_registry.py"""
import json
import sys
from pathlib import Path

from hubkit.hub.registry import build_registry_index

ROOT = Path(__file__).resolve().parent.parent

if __name__ == "__main__":
    output = ROOT / "registry.json"
    output.write_text(json.dumps(build_registry_index(ROOT / "modules"), indent=2) + "\n", encoding="utf-8")
    sys.stdout.write(f"wrote {output}\n")
