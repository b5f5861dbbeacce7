"""Reading images from files, bytes, PIL images and arrays, with clear errors for bad ones."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import ImageError

#: Longest side over shortest side accepted. Preprocessing resizes the short side to the model's size
#: (e.g. 256 px), so the work grows with the aspect ratio, not with the file: a 275-byte 1x100000 PNG
#: would become 256 x 25,600,000 pixels. At 100:1 a 256 px short side resizes to at most 6.6 megapixels.
MAX_ASPECT_RATIO = 100


def image_size_problem(width: int, height: int) -> str | None:
    """Why an image of this size is refused before it is decoded, or None: empty, or too elongated
    for preprocessing to resize it with bounded work (see :data:`MAX_ASPECT_RATIO`)."""
    if width < 1 or height < 1:
        return f"the image is {width}x{height} pixels (empty)"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return (f"the image is {width}x{height} pixels, more than {MAX_ASPECT_RATIO}:1; resizing it for the model "
                "would take unbounded memory")
    return None


def load_image(source: Any, *, draft_size: int | None = None):
    """An RGB ``PIL.Image`` from a path, the bytes of an image file, a PIL image or an HxW / HxWxC array.

    ``draft_size``: a JPEG file (or bytes) may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling,
    what ``Image.thumbnail`` uses) as long as both sides stay >= ``draft_size`` pixels. A
    12-megapixel photo then decodes several times faster, and the resize after it is cheaper.
    """
    if isinstance(source, Image.Image):
        _check_size(source, "<image>")
        return _to_rgb(source)
    if hasattr(source, "__array__") and not isinstance(source, (str, Path)):
        image = Image.fromarray(_to_uint8(np.asarray(source)))
        _check_size(image, "<array>")
        return _to_rgb(image)
    if isinstance(source, (bytes, bytearray)):
        where, opened = f"<{len(source)} bytes>", io.BytesIO(source)
    else:
        opened = Path(source)
        where = str(opened)
    try:
        with Image.open(opened) as img:
            _check_size(img, where)
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            return _to_rgb(img)
    except FileNotFoundError:
        raise ImageError(where, "no such file") from None
    except IsADirectoryError:
        raise ImageError(where, "is a directory") from None
    except UnidentifiedImageError:
        raise ImageError(where, "not an image file (unrecognised format)") from None
    except Image.DecompressionBombError as exc:  # over PIL's pixel limit: refused before decoding
        raise ImageError(where, f"too large to decode safely ({exc})") from None
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(where, f"corrupt or truncated image ({exc})") from None


def _check_size(img, where: str) -> None:
    problem = image_size_problem(*img.size)
    if problem:
        raise ImageError(where, problem)


def _to_uint8(array):
    """uint8 pixels from an array: uint8 as is, 0..1 values (floats, bools) times 255, anything else
    (0..16 digits, 0..255 floats, 16-bit) stretched linearly so that max(value) is white and
    min(0, value) black. Pass uint8 to control the mapping exactly."""
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
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def expand_inputs(inputs: Any, *, recursive: bool = False) -> list:
    """A flat list of inputs: a folder becomes its files (sorted, hidden ones skipped), and with
    ``recursive`` the files of its subfolders too (e.g. a data set's class folders)."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    elif not isinstance(inputs, (list, tuple)):
        inputs = [inputs]
    out = []
    for item in inputs:
        if isinstance(item, (str, Path)) and Path(item).is_dir():
            out.extend(_folder_files(Path(item), recursive))
        else:
            out.append(item)
    return out


def _folder_files(folder: Path, recursive: bool) -> list[Path]:
    children = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    files = [p for p in children if p.is_file()]
    if recursive:
        files += [f for p in children if p.is_dir() and not p.is_symlink() for f in _folder_files(p, True)]
    return files
