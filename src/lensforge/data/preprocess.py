"""Model-input preprocessing shared by training and the deployed bundle.

Kept free of torch so that ``lensforge predict`` and the server run it with
NumPy and Pillow only. Training uses the same two steps: :func:`resize_to_input`
once when the data set is decoded (images are then held as uint8 tensors), and
normalisation per batch with the same mean/std (:func:`normalize_affine`). A bundle's
model (format version 2) applies that normalisation inside its ONNX graph and takes the
uint8 pixels :func:`resize_to_input` makes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

FITS = ("squash", "letterbox")
LETTERBOX_PAD = 114  # grey padding of letterboxed inputs, as YOLO-family detectors use

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes a model input; stored in every run and bundle manifest.

    Attributes:
        input_size: (height, width) in pixels.
        channels: 3 for RGB, 1 for grayscale ("L").
        mean, std: per-channel normalisation, applied to pixels scaled to [0, 1].
        interpolation: resize filter name (see ``INTERPOLATIONS``).
    """

    input_size: tuple[int, int] = (32, 32)
    channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"
    crop_pct: float = 1.0  # < 1: resize the short side to size / crop_pct, then centre-crop (timm eval)
    fit: str = "squash"  # "squash" to the input size, or "letterbox": keep the aspect, pad right and bottom
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}")
        if not 0.1 <= self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in [0.1, 1], not {self.crop_pct}")
        if self.fit not in FITS:
            raise ValueError(f"fit must be one of {', '.join(FITS)}, not {self.fit!r}")

    @property
    def mode(self) -> str:
        return "RGB" if self.channels == 3 else "L"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["color_mode"] = self.mode  # "RGB" or "L", for readers that do not know our channel convention
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        return cls(
            input_size=tuple(d["input_size"]),
            channels=int(d["channels"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            interpolation=d.get("interpolation", "bilinear"),
            crop_pct=float(d.get("crop_pct", 1.0)),
            fit=str(d.get("fit", "squash")),
            extra=dict(d.get("extra", {})),
        )


def letterbox_scale(original_size: tuple[int, int], input_size: tuple[int, int]) -> float:
    """The one factor that fits an image of (width, height) into an input of (height, width)."""
    width, height = original_size
    return min(input_size[0] / max(1, height), input_size[1] / max(1, width))


def resize_to_input(img: Image.Image, pre: Preprocess) -> np.ndarray:
    """Convert to the colour mode and resize (squash, letterbox, or short side + centre crop); uint8 (C, H, W)."""
    if img.mode != pre.mode:
        img = img.convert(pre.mode)
    height, width = pre.input_size
    resample = INTERPOLATIONS[pre.interpolation]
    if pre.fit == "letterbox":
        scale = letterbox_scale(img.size, pre.input_size)
        inner = (min(width, max(1, round(img.size[0] * scale))), min(height, max(1, round(img.size[1] * scale))))
        canvas = Image.new(pre.mode, (width, height), (LETTERBOX_PAD,) * pre.channels if pre.channels == 3
                           else LETTERBOX_PAD)
        canvas.paste(img.resize(inner, resample) if inner != img.size else img, (0, 0))
        img = canvas
    elif pre.crop_pct < 1.0:
        scale = max(height, width) / pre.crop_pct / min(img.size)
        resized = (max(width, round(img.size[0] * scale)), max(height, round(img.size[1] * scale)))
        img = img.resize(resized, resample)
        left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
        img = img.crop((left, top, left + width, top + height))
    elif img.size != (width, height):
        img = img.resize((width, height), resample)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def array_to_image(arr: np.ndarray) -> Image.Image:
    """uint8 (H, W), (H, W, C) or (C, H, W) with C in {1, 3} -> Pillow image."""
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(arr.astype(np.uint8)))


def normalize_affine(
    mean: Sequence[float], std: Sequence[float], pixel_max: float = 255.0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel float32 ``(scale, shift)`` with ``(x / pixel_max - mean) / std == x * scale + shift``.

    The one statement of the normalisation: :func:`normalize` (NumPy), the torch module in
    :mod:`lensforge.models.normalize` and the Mul + Add at the head of a bundle's ONNX graph
    all apply these constants, so the three agree to the last bit. ``pixel_max`` is 255 for
    uint8 pixels, 1 for pixels already scaled to [0, 1].
    """
    mean64, std64 = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    scale = 1.0 / (pixel_max * std64)
    shift = -mean64 / std64
    return scale.astype(np.float32), shift.astype(np.float32)


def normalize(batch_uint8: np.ndarray, pre: Preprocess) -> np.ndarray:
    """uint8 (N, C, H, W) -> float32 normalised model input (what a version-1 bundle's model takes)."""
    scale, shift = normalize_affine(pre.mean, pre.std)
    return batch_uint8.astype(np.float32) * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
