"""A module's class names: inline in the manifest or in its label file, checked against num_classes."""
from __future__ import annotations

from ..errors import HubkitError, ManifestError
from .fs import resolve_within
from .manifest import Manifest
from .registry import is_remote, read_text


def read_labels(manifest: Manifest) -> list[str]:
    """The class names of a module (inline or from its label file), checked against num_classes."""
    if manifest.labels is not None:
        return list(manifest.labels)
    location = f"{manifest.base.rstrip('/')}/{manifest.labels_file}"
    try:
        if not is_remote(manifest.base):  # a link must not lead outside the module folder
            location = str(resolve_within(manifest.base, manifest.labels_file))
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


def class_names(manifest: Manifest) -> list[str]:
    """The labels of a module; numbers ("0", "1", ...) for one that names no classes."""
    if manifest.labels is None and manifest.labels_file is None:
        return [str(i) for i in range(manifest.num_classes)]
    return read_labels(manifest)
