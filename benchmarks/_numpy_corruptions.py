"""Per-image NumPy / SciPy / Pillow versions of the 19 common corruptions, for ``corruption_speed.py``.

The way corruptions are usually written (Hendrycks' ``make_cifar_c.py``, the ``imagecorruptions``
package): one image at a time, HWC float arrays, SciPy filters, Pillow for resizing and JPEG.
Each function follows the *same definition* as lensforge's batched one (it reads the very
parameter tables from ``lensforge.ops.corruptions``), so the benchmark compares two
implementations of one thing; where SciPy has an exact tool the reference uses it (Euclidean
distance transform for spatter, ``map_coordinates`` for warps). Reference only: not tested
for equality with lensforge (random streams differ), only timed.

Every function: ``fn(image HxWxC float32 in [0, 1], severity, rng) -> HxWxC float32`` (unclipped).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from lensforge.ops.corruptions import _ops as ops
from lensforge.ops.corruptions import blur, digital, frost_textures, noise, weather

Reference = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
REFERENCES: dict[str, Reference] = {}


def reference(name: str) -> Callable[[Reference], Reference]:
    def add(fn: Reference) -> Reference:
        REFERENCES[name] = fn
        return fn

    return add


def _side(image: np.ndarray) -> int:
    return min(image.shape[:2])


def _per_channel(image: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    return np.stack([fn(image[..., c]) for c in range(image.shape[2])], -1)


def _luma(image: np.ndarray) -> np.ndarray:
    return image @ np.array(ops.LUMA_WEIGHTS, dtype=np.float32) if image.shape[2] == 3 else image[..., 0]


# ---------------------------------------------------------------------------- noise


@reference("gaussian_noise")
def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(scale=noise.GAUSSIAN_STD.at(severity, _side(x)), size=x.shape)


@reference("shot_noise")
def shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    photons = noise.SHOT_PHOTONS.at(severity, _side(x))
    return rng.poisson(x * photons) / photons


@reference("impulse_noise")
def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    amount = noise.IMPULSE_AMOUNT.at(severity, _side(x))
    u = rng.random(x.shape)
    out = x.copy()
    out[u < amount / 2] = 0
    out[(u >= amount / 2) & (u < amount)] = 1
    return out


@reference("speckle_noise")
def speckle_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return x + x * rng.normal(scale=noise.SPECKLE_STD.at(severity, _side(x)), size=x.shape)


# ---------------------------------------------------------------------------- blur


@reference("defocus_blur")
def defocus_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    side = _side(x)
    kernel = blur.disk_kernel(round(blur.DEFOCUS_RADIUS.at(severity, side), 4),
                              round(blur.DEFOCUS_ALIAS_SIGMA.at(severity, side), 4)).numpy()
    return _per_channel(x, lambda plane: ndimage.correlate(plane, kernel, mode="mirror"))


def _gaussian(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    sigmas = (sigma, sigma, 0) if x.ndim == 3 else sigma
    return ndimage.gaussian_filter(x, sigmas, mode=mode, truncate=truncate)


@reference("glass_blur")
def glass_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    side = _side(x)
    sigma = blur.GLASS_SIGMA.at(severity, side)
    steps = blur.GLASS_STEPS.at(severity, side)
    h, w = x.shape[:2]
    blurred = _gaussian(x, sigma)
    rows, cols = np.mgrid[0:h, 0:w]
    for step in range(math.ceil(steps - 1e-6)):
        move = rng.integers(0, 9, (h, w))
        if step + 1 > steps:
            move[rng.random((h, w)) >= steps - step] = 4
        rows = np.clip(rows + move // 3 - 1, 0, h - 1)
        cols = np.clip(cols + move % 3 - 1, 0, w - 1)
    return _gaussian(blurred[rows, cols], sigma)


def _line_kernel(radius: float, sigma: float, angle_deg: float) -> np.ndarray:
    """ImageMagick's motion-blur taps, rasterised into a square kernel for ``ndimage.correlate``."""
    taps = 2 * math.ceil(radius) + 1
    weights = np.exp(-np.arange(taps) ** 2 / (2 * max(sigma, 1e-6) ** 2))
    keep = int((weights >= 1e-4 * weights[0]).sum())
    weights = (weights / weights.sum())[:keep]
    kernel = np.zeros((2 * len(weights) - 1,) * 2)
    centre = len(weights) - 1
    angle = math.radians(angle_deg)
    for i, weight in enumerate(weights):
        kernel[centre + round(i * math.sin(angle)), centre + round(i * math.cos(angle))] += weight
    return kernel


@reference("motion_blur")
def motion_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    side = _side(x)
    kernel = _line_kernel(blur.MOTION_RADIUS.at(severity, side), blur.MOTION_SIGMA.at(severity, side),
                          rng.uniform(*blur.MOTION_ANGLE_DEG))
    return _per_channel(x, lambda plane: ndimage.correlate(plane, kernel, mode="nearest"))


def _zoom_about_centre(plane: np.ndarray, zoom: float) -> np.ndarray:
    centre = (np.array(plane.shape) - 1) / 2
    return ndimage.affine_transform(plane, np.full(2, 1 / zoom), offset=centre - centre / zoom, order=1,
                                    mode="nearest")


@reference("zoom_blur")
def zoom_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    zooms = blur.zoom_factors(severity, _side(x))
    total = x.copy()
    for zoom in zooms:
        total += _per_channel(x, lambda plane, z=zoom: _zoom_about_centre(plane, z))
    return total / (len(zooms) + 1)


@reference("gaussian_blur")
def gaussian_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    return _gaussian(x, blur.GAUSSIAN_SIGMA.at(severity, _side(x)))


# ---------------------------------------------------------------------------- weather


@reference("snow")
def snow(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    side = _side(x)  # images of >= 32 px: the layer is drawn at the image size
    w = weather
    layer = rng.normal(w.SNOW_LOC.at(severity, side), w.SNOW_SCALE.at(severity, side), x.shape[:2])
    layer = _zoom_about_centre(layer, max(1.0, w.SNOW_ZOOM.at(severity, side)))
    layer[layer < w.SNOW_THRESHOLD.at(severity, side)] = 0
    kernel = _line_kernel(w.SNOW_BLUR_RADIUS.at(severity, side), w.SNOW_BLUR_SIGMA.at(severity, side),
                          rng.uniform(*w.SNOW_ANGLE_DEG))
    layer = ndimage.correlate(np.clip(layer, 0, 1), kernel, mode="nearest")[..., None]
    mix = w.SNOW_MIX.at(severity, side)
    whitened = np.maximum(x, _luma(x)[..., None] * 1.5 + 0.5)
    return mix * x + (1 - mix) * whitened + layer + layer[::-1, ::-1]


@reference("frost")
def frost(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[:2]
    textures = _frost_bank(h, w)
    top = rng.integers(0, textures.shape[1] - h + 1)
    left = rng.integers(0, textures.shape[2] - w + 1)
    crop = textures[rng.integers(0, len(textures)), top:top + h, left:left + w]
    side = _side(x)
    return weather.FROST_IMAGE_WEIGHT.at(severity, side) * x + weather.FROST_TEXTURE_WEIGHT.at(severity, side) * crop


_FROST: dict[tuple[int, int], np.ndarray] = {}


def _frost_bank(h: int, w: int) -> np.ndarray:
    if (h, w) not in _FROST:  # lensforge's textures, HWC: the reference times the blend, as the original
        _FROST[(h, w)] = frost_textures(h, w).permute(0, 2, 3, 1).numpy()
    return _FROST[(h, w)]


def plasma_fractal(rng: np.random.Generator, map_size: int, wibble_decay: float) -> np.ndarray:
    """Hendrycks' diamond-square ``plasma_fractal``, as published."""
    maps = np.zeros((map_size, map_size))
    step, wibble = map_size, 100.0

    def wibbled_mean(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = maps[0:map_size:step, 0:map_size:step]
        square = corners + np.roll(corners, -1, 0)
        square += np.roll(square, -1, 1)
        maps[half:map_size:step, half:map_size:step] = wibbled_mean(square)
        centres = maps[half:map_size:step, half:map_size:step]
        maps[0:map_size:step, half:map_size:step] = wibbled_mean(
            centres + np.roll(centres, 1, 0) + corners + np.roll(corners, -1, 1))
        maps[half:map_size:step, 0:map_size:step] = wibbled_mean(
            centres + np.roll(centres, 1, 1) + corners + np.roll(corners, -1, 0))
        step //= 2
        wibble /= wibble_decay
    maps -= maps.min()
    return maps / maps.max()


@reference("fog")
def fog(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[:2]
    side = _side(x)
    intensity = weather.FOG_INTENSITY.at(severity, side)
    plasma = plasma_fractal(rng, 1 << (max(h, w) - 1).bit_length(), weather.FOG_DECAY.at(severity, side))
    peak = x.max()
    return (x + intensity * plasma[:h, :w, None]) * peak / (peak + intensity)


@reference("brightness")
def brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    value = x.max(2, keepdims=True)
    lifted = np.minimum(value + weather.BRIGHTNESS_SHIFT.at(severity, _side(x)), 1)
    return np.where(value > 0, x * lifted / np.maximum(value, 1e-12), lifted)


@reference("spatter")
def spatter(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    side, w = _side(x), weather
    liquid = rng.normal(w.SPATTER_LOC.at(severity, side), w.SPATTER_SCALE.at(severity, side), x.shape[:2])
    liquid = _gaussian(liquid, w.SPATTER_SIGMA.at(severity, side))
    threshold = w.SPATTER_THRESHOLD.at(severity, side)
    liquid[liquid < threshold] = 0
    if w.SPATTER_IS_MUD[severity - 1]:
        mud = _gaussian((liquid > threshold).astype(np.float32), w.SPATTER_MUD_SIGMA.at(severity, side))
        mud[mud < 0.8] = 0
        return x * (1 - mud[..., None]) + mud[..., None] * np.array(w.MUD_RGB)
    layer = np.floor(np.clip(liquid, 0, 1) * 255)
    wet = layer > 0
    outline = wet & ~ndimage.binary_erosion(wet, np.ones((3, 3)), border_value=1)
    distance = np.minimum(ndimage.distance_transform_edt(~outline), w.RIM_DISTANCE_PX) if outline.any() \
        else np.full(wet.shape, float(w.RIM_DISTANCE_PX))
    distance = np.floor(ndimage.uniform_filter(distance, 3, mode="mirror"))
    distance = _equalize(distance.astype(np.int64))
    emboss = np.clip(np.round(ndimage.correlate(distance, np.array(w.EMBOSS), mode="mirror")), 0, 255)
    mask = layer * ndimage.uniform_filter(emboss, 3, mode="mirror")
    mask = mask / max(mask.max(), 1e-12) * w.SPATTER_WATER_OPACITY.at(severity, side)
    return x + mask[..., None] * np.array(w.WATER_RGB)


def _equalize(values: np.ndarray) -> np.ndarray:
    hist = np.bincount(values.ravel(), minlength=256).astype(float)
    first = hist[np.flatnonzero(hist)[0]]
    if first == values.size:
        return values.astype(float)
    lut = np.clip(np.round((np.cumsum(hist) - first) * 255 / (values.size - first)), 0, 255)
    return lut[values]


# ---------------------------------------------------------------------------- digital


@reference("contrast")
def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    mean = x.mean((0, 1), keepdims=True)
    return (x - mean) * digital.CONTRAST_FACTOR.at(severity, _side(x)) + mean


@reference("elastic_transform")
def elastic_transform(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[:2]  # 32 px images: the field is drawn at the image size
    side = min(h, w)
    i = severity - 1
    dy = dx = np.zeros((h, w))
    if digital.ELASTIC_ALPHA[i] > 0:
        dx, dy = (_gaussian(rng.uniform(-1, 1, (h, w)), digital.ELASTIC_SIGMA[i] * side, mode="reflect", truncate=3)
                  * digital.ELASTIC_ALPHA[i] * side for _ in range(2))
    cy, cx, half = h // 2, w // 2, side // 3
    source = np.array([[cx + half, cy + half], [cx - half, cy + half], [cx - half, cy - half]], dtype=float)
    jitter = digital.ELASTIC_AFFINE[i] * side
    target = source + rng.uniform(-jitter, jitter, source.shape)
    forward = np.linalg.solve(np.c_[source, np.ones(3)], target).T
    inverse = np.linalg.inv(forward[:, :2])
    shift = -inverse @ forward[:, 2]
    rows, cols = np.mgrid[0:h, 0:w].astype(float)
    px, py = cols + dx, rows + dy
    src_x = inverse[0, 0] * px + inverse[0, 1] * py + shift[0]
    src_y = inverse[1, 0] * px + inverse[1, 1] * py + shift[1]
    return _per_channel(x, lambda plane: ndimage.map_coordinates(plane, [src_y, src_x], order=1, mode="mirror"))


def _pil(x: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.round(x * 255), 0, 255).astype(np.uint8).squeeze(-1) if x.shape[2] == 1
                           else np.clip(np.round(x * 255), 0, 255).astype(np.uint8))


def _from_pil(image: Image.Image, channels: int) -> np.ndarray:
    return np.asarray(image, dtype=np.float32).reshape(image.size[1], image.size[0], channels) / 255


@reference("pixelate")
def pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    h, w, c = x.shape
    low_h = digital.pixelate_sizes(h, min(h, w))[severity - 1]
    low_w = digital.pixelate_sizes(w, min(h, w))[severity - 1]
    return _from_pil(_pil(x).resize((low_w, low_h), Image.BOX).resize((w, h), Image.BOX), c)


@reference("jpeg_compression")
def jpeg_compression(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    _pil(x).save(buffer, "JPEG", quality=round(digital.JPEG_QUALITY.at(severity, _side(x))))
    return _from_pil(Image.open(buffer), x.shape[2])


@reference("saturate")
def saturate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    side = _side(x)
    value = x.max(2, keepdims=True)
    sat = np.where(value > 0, (value - x.min(2, keepdims=True)) / np.maximum(value, 1e-12), 0)
    new_sat = np.clip(sat * digital.SATURATE_FACTOR.at(severity, side) + digital.SATURATE_OFFSET.at(severity, side),
                      0, 1)
    scaled = value - (value - x) * new_sat / np.maximum(sat, 1e-12)
    return np.where(sat > 0, scaled, value * (1 - new_sat * np.array([0.0, 1.0, 1.0])))
