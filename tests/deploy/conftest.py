"""Shared fixtures: photo-like images, tiny timm-style models, and bundles exported once per session."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageDraw, ImageFilter

from lensforge.data.preprocess import Preprocess, resize_to_input
from lensforge.deploy.export import write_bundle

CLASS_NAMES = ["cat", "dog", "fox", "owl"]


def photo_like(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A smooth gradient with blurred shapes and sensor noise: closer to photos than uniform noise."""
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, 3) + rng.uniform(-1.5, 1.5, 3) * (xs[..., None] + ys[..., None])
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = rng.integers(0, width - 4), rng.integers(0, height - 4)
        box = (x0, y0, x0 + int(rng.integers(4, width)), y0 + int(rng.integers(4, height)))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(radius=0.8))
    noisy = np.asarray(img, np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def sample_batch(pre: Preprocess, n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, C, H, W): photo-like images of mixed sizes through the real resize step."""
    rng = np.random.default_rng(seed)
    sizes = [(48, 40), (64, 64), (37, 53), (96, 72)]
    images = [photo_like(rng, sizes[i % len(sizes)]) for i in range(n)]
    return np.stack([resize_to_input(img, pre) for img in images])


@dataclass
class Exported:
    """A bundle written by :func:`write_bundle` plus what made it."""

    path: Path
    model: torch.nn.Module
    pre: Preprocess
    images: np.ndarray


def make_timm(name: str, channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=len(CLASS_NAMES), in_chans=channels).eval()


def make_preprocess(channels: int, size: int) -> Preprocess:
    if channels == 1:
        return Preprocess(input_size=(size, size), channels=1, mean=(0.5,), std=(0.25,))
    return Preprocess(input_size=(size, size))


@pytest.fixture(scope="session")
def exported_bundle(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Exported]:
    """``exported_bundle(name, channels, size)``: each distinct bundle is exported once per session."""
    cache: dict[tuple[str, int, int], Exported] = {}
    root = tmp_path_factory.mktemp("bundles")

    def get(name: str = "resnet10t", channels: int = 3, size: int = 32) -> Exported:
        key = (name, channels, size)
        if key not in cache:
            model, pre = make_timm(name, channels), make_preprocess(channels, size)
            images = sample_batch(pre, 12)
            path = write_bundle(
                model, pre, CLASS_NAMES, root / f"{name}-{channels}ch-{size}",
                model_name=name, sample_images=images,
                metrics={"val_accuracy": 0.5}, extra={"run": "unit-test"},
            )  # fmt: skip
            cache[key] = Exported(path, model, pre, images)
        return cache[key]

    return get


def write_v1_bundle(exported: Exported, out_dir: Path) -> Path:
    """The version-1 bundle lensforge wrote before the graph took uint8: same model, float32 normalised input.

    The ONNX file is exported from the same PyTorch model without the normalisation in front,
    and the manifest is the version-2 one as version 1 had it (format_version 1, float32 input).
    """
    from lensforge.deploy.bundle import bundle_file_hashes
    from lensforge.deploy.export import LogitsAndFeatures, _quiet_exporter

    out_dir.mkdir(parents=True)
    pre = exported.pre
    example = torch.zeros(2, pre.channels, *pre.input_size)
    with _quiet_exporter():
        torch.onnx.export(
            LogitsAndFeatures(exported.model).eval(), (example,), str(out_dir / "model.onnx"), dynamo=True,
            external_data=False, input_names=["input"], output_names=["logits", "features"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
        )  # fmt: skip
    manifest = json.loads((exported.path / "manifest.json").read_text())
    manifest["format_version"] = 1
    manifest["inputs"][0]["dtype"] = "float32"
    manifest["files"] = bundle_file_hashes(out_dir)
    (out_dir / "manifest.json").write_text(json.dumps(manifest))
    return out_dir


@pytest.fixture(scope="session")
def v1_bundle(bundle: Exported, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default bundle's model as a version-1 bundle (read-only)."""
    return write_v1_bundle(bundle, tmp_path_factory.mktemp("v1") / "bundle")


@pytest.fixture(scope="session")
def bundle(exported_bundle: Callable[..., Exported]) -> Exported:
    """The default bundle (resnet10t, RGB, 32x32, 4 classes); copy it before altering it."""
    return exported_bundle()


class TinyNet(torch.nn.Module):
    """A timm-interface model small enough to export in about a second."""

    def __init__(self, channels: int = 3, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8, num_classes)
        self.num_features = 8

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> torch.nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="session")
def class_names() -> list[str]:
    return list(CLASS_NAMES)


@pytest.fixture(scope="session")
def images_for() -> Callable[..., np.ndarray]:
    """``images_for(pre, n, seed=0)``: uint8 (n, C, H, W) photo-like model inputs."""
    return sample_batch


@pytest.fixture(scope="session")
def make_photo() -> Callable[[np.random.Generator, tuple[int, int]], Image.Image]:
    """``make_photo(rng, (width, height))``: one photo-like RGB Pillow image."""
    return photo_like
