"""Reading images from files, PIL images and arrays, with clear errors for bad ones."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def load_image(source: Any, *, draft_size: int | None = None):
    """An RGB ``PIL.Image`` from a path, a PIL image or an HxW / HxWxC uint8 array.

    ``draft_size``: a JPEG file may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
    what ``Image.thumbnail`` uses) as long as both sides stay >= ``draft_size`` pixels. A
    12-megapixel photo then decodes several times faster, and the resize after it is cheaper.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return _to_rgb(source)
    if hasattr(source, "__array__") and not isinstance(source, (str, Path)):
        import numpy as np

        return _to_rgb(Image.fromarray(_to_uint8(np.asarray(source))))
    path = Path(source)
    try:
        with Image.open(path) as img:
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
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


def _to_uint8(array):
    """uint8 pixels from an array: uint8 as is, 0..1 values (floats, bools) times 255, anything else
    (0..16 digits, 0..255 floats, 16-bit) stretched linearly so that max(value) is white and
    min(0, value) black. Pass uint8 to control the mapping exactly."""
    import numpy as np

    if array.dtype == np.uint8:
        return array
    if array.size == 0:
        raise ImageError("<array>", "empty array")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ImageError("<array>", "array holds NaN or infinite values")
    low, high = min(0.0, float(array.min())), float(array.max())
    if low >= 0.0 and high <= 1.0:
        scaled = array * 255.0
    else:
        scaled = (array - low) * (255.0 / (high - low))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


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
