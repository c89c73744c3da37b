"""Classify one image with a lensforge bundle, using only NumPy, Pillow and ONNX Runtime.

    python examples/predict_onnxruntime.py BUNDLE IMAGE

Prints the label and its probability, tab-separated, as ``lensforge predict`` computes them.
Everything the script needs is in ``BUNDLE/manifest.json``: the input size, colour mode,
resize filter and crop of ``preprocess``, the class names, and the ``temperature`` that
calibrates the probabilities. The model (``format_version`` 2) takes the resized uint8
pixels and normalises them itself, so mean and std are not needed here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
           "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}


def load_image(path: Path, mode: str) -> Image.Image:
    """First frame, EXIF orientation applied, transparency composited on white, then RGB or L."""
    with Image.open(path) as img:
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit and float images: scaled to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert(mode) if img.mode != mode else img


def resize(img: Image.Image, pre: dict) -> np.ndarray:
    """Squash to the input size, or (crop_pct < 1) resize the short side and centre-crop; uint8 (C, H, W)."""
    height, width = pre["input_size"]
    resample = FILTERS[pre.get("interpolation", "bilinear")]
    crop_pct = float(pre.get("crop_pct", 1.0))
    if crop_pct < 1.0:
        scale = max(height, width) / crop_pct / min(img.size)
        size = (max(width, round(img.size[0] * scale)), max(height, round(img.size[1] * scale)))
        img = img.resize(size, resample)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        img = img.crop((left, top, left + width, top + height))
    elif img.size != (width, height):
        img = img.resize((width, height), resample)
    pixels = np.asarray(img, dtype=np.uint8)
    return (pixels[:, :, None] if pixels.ndim == 2 else pixels).transpose(2, 0, 1)


def main(bundle: Path, image: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    pre, model_input = manifest["preprocess"], manifest["inputs"][0]
    mode = "RGB" if pre["channels"] == 3 else "L"
    batch = resize(load_image(image, mode), pre)[None]  # (1, C, H, W) uint8, channels RGB or L
    if model_input.get("dtype", "float32") == "float32":  # a format_version 1 bundle: normalise here
        mean, std = (np.asarray(pre[k], np.float32).reshape(1, -1, 1, 1) for k in ("mean", "std"))
        batch = (batch.astype(np.float32) / 255.0 - mean) / std
    session = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {model_input["name"]: batch})[0][0].astype(np.float64)
    scaled = logits / float(manifest.get("temperature", 1.0))
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    best = int(probs.argmax())
    print(f"{manifest['class_names'][best]}\t{probs[best]:.8f}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python examples/predict_onnxruntime.py BUNDLE IMAGE")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
