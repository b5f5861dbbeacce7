"""Reading images from files, PIL images and arrays, with clear errors for bad ones."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def load_image(source: Any):
    """An RGB ``PIL.Image`` from a path, a PIL image or an HxW / HxWxC uint8 array."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return _to_rgb(source)
    if hasattr(source, "__array__") and not isinstance(source, (str, Path)):
        import numpy as np

        array = np.asarray(source)
        if array.dtype != np.uint8:
            array = np.clip(array * (255.0 if array.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return _to_rgb(Image.fromarray(array))
    path = Path(source)
    try:
        with Image.open(path) as img:
            img.load()
            return _to_rgb(img)
    except FileNotFoundError:
        raise ImageError(str(path), "no such file") from None
    except IsADirectoryError:
        raise ImageError(str(path), "is a directory") from None
    except UnidentifiedImageError:
        raise ImageError(str(path), "not an image file (unrecognised format)") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(str(path), f"corrupt or truncated image ({exc})") from None


def _to_rgb(img):
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        from PIL import Image

        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def expand_inputs(inputs: Any) -> list:
    """A flat list of inputs: a folder becomes its files (sorted, hidden ones skipped)."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    elif not isinstance(inputs, (list, tuple)):
        inputs = [inputs]
    out = []
    for item in inputs:
        if isinstance(item, (str, Path)) and Path(item).is_dir():
            out.extend(sorted(p for p in Path(item).iterdir() if p.is_file() and not p.name.startswith(".")))
        else:
            out.append(item)
    return out
