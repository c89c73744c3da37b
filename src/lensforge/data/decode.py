"""Safe image decoding with Pillow (no torch import: the ONNX predict path uses it).

Decompression bombs are refused, EXIF orientation is applied, and palette, CMYK,
16-bit, alpha and other modes are converted to RGB or L. Every failure is a
:class:`DataError` naming the file and the reason.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lensforge.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEFAULT_MAX_PIXELS = 64_000_000  # about 8000x8000; beyond this we refuse rather than decode


def decode_image(
    source: str | Path | bytes,
    *,
    mode: str = "RGB",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Decode ``source`` (a path or raw bytes) into a fully loaded ``mode`` ("RGB" or "L") image."""
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', not {mode!r}")
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as e:
        raise DataError(f"{label}: cannot read file ({e.strerror or e})") from None
    if not raw:
        raise DataError(f"{label}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise DataError(
                        f"{label}: image is {width}x{height} = {width * height:,} pixels, "
                        f"over the limit of {max_pixels:,} (decompression bomb?)"
                    )
                if width < 1 or height < 1:
                    raise DataError(f"{label}: image has no pixels ({width}x{height})")
                img.seek(0)  # first frame of an animation
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_mode(img, mode)
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError(f"{label}: not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{label}: refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{label}: corrupt or truncated image ({e})") from None


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert any Pillow mode (P, PA, LA, RGBA, CMYK, I;16, I, F, 1, ...) to RGB or L."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # composite on white, the usual convention for transparent backgrounds
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != mode:
        img = img.convert(mode)
    return img


def find_images(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand folders (recursively, image suffixes only, sorted); explicit files are kept as given.

    Shared by local ``predict`` and the HTTP client (this module needs neither ONNX Runtime nor torch).

    Raises:
        DataError: a path does not exist, or a folder holds no image files.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not images:
                raise DataError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            found.extend(images)
        elif path.exists():
            found.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    return found
