"""Importing the optional OpenVINO-family packages without their usage telemetry.

``import openvino`` (and NNCF) report usage to Google Analytics unless the user has opted out,
by way of the ``openvino_telemetry`` package. hubkit sends nothing anywhere but to the sources a
user names, so it blocks that package for the process before the first import: OpenVINO's own
fallback, a no-op stub, takes its place. Blocking it also saves about a second of every cold
``hub run``.
"""
from __future__ import annotations

import importlib
import sys
from types import ModuleType

#: The package through which OpenVINO and NNCF send usage reports.
TELEMETRY_PACKAGE = "openvino_telemetry"


def import_without_telemetry(name: str) -> ModuleType:
    """``importlib.import_module(name)`` with :data:`TELEMETRY_PACKAGE` unimportable in this process.

    The block stays for the life of the process: these packages also import it lazily, at conversion
    or quantization time, not only when they are first imported.
    """
    sys.modules[TELEMETRY_PACKAGE] = None  # an import of a None entry raises ImportError
    return importlib.import_module(name)
