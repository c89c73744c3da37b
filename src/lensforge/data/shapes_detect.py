"""``builtin:shapes?task=detect``: several seeded shapes per image, with boxes, for object detection.

Built on :mod:`lensforge.data.shapes` (the same classes, signed distances, backgrounds and
:class:`~lensforge.data.shapes.ShapesDomain`), with three changes for speed and for the task:

* each image holds 1-6 shapes of random classes, sizes and rotations, drawn in order so
  later ones occlude earlier ones (about 5% of the images hold none: negatives), over a
  background with distractor strokes (more with ``clutter``);
* shapes and strokes are evaluated only in a window around each, not on the whole image;
* the background, which is smooth (gradient, waves, blobs, illumination), is rendered at
  32x32 and enlarged by Pillow; only the sharp things are drawn at full resolution.

Targets: the box of a shape is the tight box of the whole shape (from its outline, exact
to float precision), clipped to the image. A shape less than 30% visible (hidden by later
shapes or by the image border) is dropped from the targets: its remaining sliver does
not show what it is or where its box would be. Visibility is counted on pixel centres.

Random streams (from ``seed``): geometry (objects, classes, places), appearance (colours,
backgrounds) and domain (strokes, blobs, noise); as in ``shapes``, a domain shift re-renders
the same scenes with the same targets.
"""

from __future__ import annotations

import math
import os
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter

from lensforge.data.shapes import (
    _SHAPES,
    SHAPE_CLASSES,
    ShapesDomain,
    _Appearance,
    _background,
    _boxes,
    _draw_appearance,
    _Geometry,
    _random_direction,
    _waves,
)
from lensforge.tasks.detection import BoxTarget

if TYPE_CHECKING:
    from lensforge.data.sources import Source

MAX_OBJECTS = 6  # shapes per image: uniform in 1..MAX_OBJECTS
NEGATIVE_FRACTION = 0.05  # images without any shape
SCALE_RANGE = (0.06, 0.18)  # unit frame -> pixels, as a fraction of the side (a shape spans ~1.6-2x this)
MIN_VISIBLE = 0.3  # fraction of a shape's pixels that must show for it to be a target
MIN_CONTRAST = 0.3  # RGB distance between a shape's fill and its image's mean background, [0, 1] units
BASE_STROKES = 2  # distractor strokes per image at clutter 0 (at most; uniform in 0..this)
CLUTTER_STROKES = 10  # more strokes at clutter 1
LOW_RES = 32  # side of the rendered background before enlarging
_PIXELS_PER_CHUNK = 1 << 21  # output pixels per chunk (and per thread); windows keep the float work small


def _draw_objects(rng: np.random.Generator, n: int, size: int) -> tuple[_Geometry, np.ndarray]:
    """The shapes of all images, flattened in drawing order, and the image of each."""
    counts = rng.integers(1, MAX_OBJECTS + 1, n)
    counts[rng.random(n) < NEGATIVE_FRACTION] = 0
    image_of = np.repeat(np.arange(n), counts)
    m = len(image_of)
    labels = rng.integers(0, len(SHAPE_CLASSES), m).astype(np.int64)
    scale = rng.uniform(*SCALE_RANGE, m) * size
    angle = rng.uniform(0, 2 * math.pi, m)
    # centres keep at least half of the shape's reach inside, so some shapes are cut by the border
    reach = scale * np.array([np.hypot(*_SHAPES[c].outline.T).max() for c in SHAPE_CLASSES])[labels]
    cx = 0.5 * reach + rng.random(m) * (size - reach)
    cy = 0.5 * reach + rng.random(m) * (size - reach)
    return _Geometry(labels, scale, np.cos(angle), np.sin(angle), cx, cy), image_of


def _object_colours(rng: np.random.Generator, app: _Appearance, image_of: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fill (m, 3) in [0, 1], pushed away from the image's mean background, and shading slopes (m, 2)."""
    fill = rng.uniform(0, 1, (len(image_of), 3))
    bg_mean = ((app.bg_start + app.bg_end) / 2)[image_of]
    diff = fill - bg_mean
    norm = np.linalg.norm(diff, axis=1, keepdims=True)
    fill = np.clip(bg_mean + diff / np.maximum(norm, 1e-6) * np.maximum(norm, MIN_CONTRAST), 0, 1)
    return fill, _random_direction(rng, len(image_of), 0.0, 0.5)


def _light(app: _Appearance, domain: ShapesDomain, images: np.ndarray, x: np.ndarray, y: np.ndarray,
           size: int) -> np.ndarray:
    """Illumination (exposure, falloff, domain lighting) at pixel centres x, y broadcast with (m, 1, 1)."""
    slope = app.light_slope[images].astype(np.float32)
    ramp = 1 + slope[:, 0, None, None] * (x / size - 0.5) + slope[:, 1, None, None] * (y / size - 0.5)
    return ramp * (app.gain[images] * domain.lighting).astype(np.float32)[:, None, None]


def _render_background(app: _Appearance, domain: ShapesDomain, sl: slice, size: int, out: np.ndarray,
                       app_rng: np.random.Generator, dom_rng: np.random.Generator) -> None:
    """Smooth background (gradient, waves, grain, blobs, light) at LOW_RES, enlarged into ``out``."""
    low = min(size, LOW_RES)
    img = _background(app, sl, app_rng, low)
    b = img.shape[0]
    field = _waves(dom_rng.uniform(1.0, 5.0, (b, 2, 2)) * dom_rng.choice([-1, 1], (b, 2, 2)),
                   dom_rng.uniform(0, 2 * math.pi, (b, 2)), np.full((b, 2), 0.5), low)
    if domain.clutter > 0:  # irregular blobs, as in shapes' clutter
        alpha = np.clip((field - (0.8 - 0.6 * domain.clutter)) * 6, 0, 1) * domain.clutter
        img += alpha[..., None] * (dom_rng.uniform(0, 1, (b, 1, 1, 3)).astype(np.float32) - img)
    centres = (np.arange(low, dtype=np.float32) + 0.5) * (size / low)
    light = _light(app, domain, np.arange(sl.start, sl.stop), centres[None, None, :], centres[None, :, None], size)
    img *= light[..., None] * np.asarray(domain.color_cast, dtype=np.float32)
    pixels = np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)
    if low == size:
        out[...] = pixels
        return
    # One Pillow call for the chunk: the images stacked, each with its edge rows repeated so that
    # the filter does not blend neighbours; then the repeated rows are cut off again.
    factor = size // low if size % low == 0 else None
    if factor is None:
        for i in range(b):
            out[i] = np.asarray(Image.fromarray(pixels[i]).resize((size, size), Image.Resampling.BILINEAR))
        return
    stacked = np.pad(pixels, ((0, 0), (1, 1), (0, 0), (0, 0)), mode="edge").reshape(b * (low + 2), low, 3)
    large = Image.fromarray(stacked).resize((size, b * (low + 2) * factor), Image.Resampling.BILINEAR)
    out[...] = np.asarray(large).reshape(b, (low + 2) * factor, size, 3)[:, factor:factor + size]


def _windows(cx: np.ndarray, cy: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Integer window origins (m,) and pixel-centre coordinates x (m, 1, side), y (m, side, 1)."""
    x0 = np.floor(cx - side / 2).astype(np.int64)
    y0 = np.floor(cy - side / 2).astype(np.int64)
    steps = np.arange(side, dtype=np.float32) + 0.5
    return x0, y0, (x0[:, None] + steps)[:, None, :], (y0[:, None] + steps)[:, :, None]


def _roi(box: np.ndarray, x0: int, y0: int, side: int, size: int) -> tuple[slice, slice]:
    """Image rows and columns of ``box`` (x1, y1, x2, y2) plus the anti-aliasing pixel, inside image and window."""
    x1, y1 = max(int(box[0]) - 1, x0, 0), max(int(box[1]) - 1, y0, 0)
    x2, y2 = min(int(math.ceil(box[2])) + 1, x0 + side, size), min(int(math.ceil(box[3])) + 1, y0 + side, size)
    return slice(y1, max(y1, y2)), slice(x1, max(x1, x2))


def _composite(out: np.ndarray, i: int, roi: tuple[slice, slice], x0: int, y0: int, alpha: np.ndarray,
               rgb: np.ndarray, light: np.ndarray | None = None) -> tuple[slice, slice]:
    """``out[i] += alpha * (colour - out[i])`` on ``roi``; colour = rgb (0..255), times ``light`` where given."""
    ys, xs = roi
    wy, wx = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
    colour = rgb if light is None else light[wy, wx, None] * rgb
    region = out[i, ys, xs].astype(np.float32)
    region += alpha[wy, wx, None] * (colour - region)
    out[i, ys, xs] = np.clip(region + 0.5, 0, 255).astype(np.uint8)  # +0.5 then truncate: rounding
    return wy, wx


def _shape_alpha(geo: _Geometry, rows: np.ndarray, name: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage (m, side, side) of shapes ``rows`` of one class at x, y."""
    scale = geo.scale[rows, None, None].astype(np.float32)
    dx = (x - geo.cx[rows, None, None].astype(np.float32)) / scale
    dy = (y - geo.cy[rows, None, None].astype(np.float32)) / scale
    c = geo.cos[rows, None, None].astype(np.float32)
    s = geo.sin[rows, None, None].astype(np.float32)
    return np.clip(0.5 - _SHAPES[name].sdf(c * dx + s * dy, c * dy - s * dx) * scale, 0, 1)


def _draw_strokes(app: _Appearance, domain: ShapesDomain, sl: slice, size: int, out: np.ndarray,
                  rng: np.random.Generator) -> None:
    """Distractor capsules (never class shapes), under the shapes; lit by the light at their middle."""
    b = sl.stop - sl.start
    counts = rng.integers(0, BASE_STROKES + math.ceil(CLUTTER_STROKES * domain.clutter) + 1, b)
    owner = np.repeat(np.arange(sl.start, sl.stop), counts)
    m = len(owner)
    if m == 0:
        return
    start = rng.uniform(0, size, (m, 2))
    seg = _random_direction(rng, m, 0.08 * size, 0.25 * size)
    half_width = np.maximum(rng.uniform(0.008, 0.025, m) * size, 0.6)
    opacity = rng.uniform(0.5, 1.0, m)
    middle = start + seg / 2
    side = int(math.ceil(0.25 * size + 2 * half_width.max())) + 3
    x0, y0, x, y = _windows(middle[:, 0], middle[:, 1], side)
    px, py = x - start[:, 0, None, None], y - start[:, 1, None, None]
    ex, ey = seg[:, 0, None, None], seg[:, 1, None, None]
    t = np.clip((px * ex + py * ey) / (ex * ex + ey * ey), 0, 1)
    alpha = np.clip(0.5 - (np.hypot(px - t * ex, py - t * ey) - half_width[:, None, None]), 0, 1)
    alpha = (alpha * opacity[:, None, None]).astype(np.float32)
    light = _light(app, domain, owner, middle[:, 0, None, None], middle[:, 1, None, None], size)[:, 0, 0]
    rgb = rng.uniform(0, 1, (m, 3)) * np.asarray(domain.color_cast) * (255 * light[:, None])
    reach = np.abs(seg) / 2 + half_width[:, None]
    boxes = np.concatenate([middle - reach, middle + reach], axis=1)
    for k in range(m):
        roi = _roi(boxes[k], x0[k], y0[k], side, size)
        _composite(out, owner[k] - sl.start, roi, x0[k], y0[k], alpha[k], rgb[k].astype(np.float32))


_BUCKET = 16  # window sides are rounded up to a multiple of this: a few batches per class, little waste


def _draw_shapes(geo: _Geometry, image_of: np.ndarray, fills: tuple[np.ndarray, np.ndarray], boxes: np.ndarray,
                 app: _Appearance, domain: ShapesDomain, sl: slice, size: int, out: np.ndarray) -> np.ndarray:
    """Draw the shapes of images ``sl`` in order; the fraction of each that stays visible (pixel centres)."""
    rows_all = np.flatnonzero((image_of >= sl.start) & (image_of < sl.stop))
    owner = np.full((sl.stop - sl.start, size, size), -1, dtype=np.int32)
    drawn: dict[int, tuple[np.ndarray, np.ndarray, int, int]] = {}
    area = np.zeros(len(geo.labels))
    fill, shade = fills
    for index, name in enumerate(SHAPE_CLASSES):
        rows = rows_all[geo.labels[rows_all] == index]
        sides = (np.ceil((2 * geo.scale[rows] * np.hypot(*_SHAPES[name].outline.T).max() + 3) / _BUCKET)
                 * _BUCKET).astype(int)
        for side in np.unique(sides):
            sub = rows[sides == side]
            x0, y0, x, y = _windows(geo.cx[sub], geo.cy[sub], int(side))
            alpha = _shape_alpha(geo, sub, name, x, y)
            slope = shade[sub].astype(np.float32)
            light = (1 + slope[:, 0, None, None] * (x / size - 0.5) + slope[:, 1, None, None] * (y / size - 0.5))
            light *= _light(app, domain, image_of[sub], x, y, size)
            area[sub] = (alpha >= 0.5).sum(axis=(1, 2))
            for k, row in enumerate(sub):
                drawn[int(row)] = (alpha[k], light[k], int(x0[k]), int(y0[k]))
    rgb = (fill * np.asarray(domain.color_cast) * 255).astype(np.float32)
    for row in rows_all:  # drawing order: later shapes cover earlier ones
        alpha, light, x0, y0 = drawn[int(row)]
        i = image_of[row] - sl.start
        roi = _roi(boxes[row], x0, y0, alpha.shape[0], size)
        wy, wx = _composite(out, i, roi, x0, y0, np.minimum(alpha * domain.contrast, 1), rgb[row], light)
        owner[i][roi][alpha[wy, wx] >= 0.5] = row
    visible = np.bincount(owner[owner >= 0], minlength=len(geo.labels))[rows_all]
    return visible / np.maximum(area[rows_all], 1)


def _finish(chunk: np.ndarray, domain: ShapesDomain, rng: np.random.Generator) -> None:
    """Optics and sensor: blur, then noise, in place."""
    if domain.blur > 0.05:  # Pillow's radius is the Gaussian's standard deviation
        for i in range(len(chunk)):
            chunk[i] = np.asarray(Image.fromarray(chunk[i]).filter(ImageFilter.GaussianBlur(domain.blur)))
    if domain.noise > 0:
        noisy = rng.standard_normal(chunk.shape, dtype=np.float32)
        noisy *= domain.noise * 255
        noisy += chunk
        noisy += 0.5  # then truncation: rounding
        chunk[...] = np.clip(noisy, 0, 255, out=noisy)


@dataclass
class _Scene:
    """Everything drawn before rendering: shapes (flattened, in drawing order) and appearance."""

    geo: _Geometry
    image_of: np.ndarray  # (m,) the image of each shape, non-decreasing
    fills: tuple[np.ndarray, np.ndarray]  # (m, 3) colour in [0, 1] and (m, 2) shading slope
    boxes: np.ndarray  # (m, 4) tight boxes of the whole shapes, clipped to the image
    app: _Appearance
    domain: ShapesDomain
    size: int


def _render_chunk(scene: _Scene, sl: slice, out: np.ndarray, seeds: tuple[np.random.SeedSequence, ...]) -> np.ndarray:
    """Render images ``sl`` into ``out``; the visible fraction of their shapes."""
    app_rng, dom_rng = (np.random.default_rng(s) for s in seeds)
    _render_background(scene.app, scene.domain, sl, scene.size, out, app_rng, dom_rng)
    _draw_strokes(scene.app, scene.domain, sl, scene.size, out, dom_rng)
    visible = _draw_shapes(scene.geo, scene.image_of, scene.fills, scene.boxes, scene.app, scene.domain, sl,
                           scene.size, out)
    _finish(out, scene.domain, dom_rng)
    return visible


def generate_shapes_detect(n: int, *, size: int = 128, seed: int = 0,
                           domain: ShapesDomain = ShapesDomain()) -> tuple[np.ndarray, list[BoxTarget]]:
    """``n`` RGB images (n, size, size, 3) uint8 and one BoxTarget each; a pure function of the arguments.

    Targets depend on ``(n, size, seed)`` only: two domains render the same scenes. Chunks of
    images render in threads (NumPy and Pillow release the GIL), each from its own seeds, so
    the result does not depend on the number of threads.
    """
    geo_seed, app_seed, dom_seed = np.random.SeedSequence(seed).spawn(3)
    geo, image_of = _draw_objects(np.random.default_rng(geo_seed), n, size)
    app_rng = np.random.default_rng(app_seed)
    app = _draw_appearance(app_rng, n)
    scene = _Scene(geo, image_of, _object_colours(app_rng, app, image_of), _boxes(geo, size, SHAPE_CLASSES),
                   app, domain, size)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    chunk = max(1, _PIXELS_PER_CHUNK // (size * size))
    slices = [slice(start, min(start + chunk, n)) for start in range(0, n, chunk)]
    seeds = zip(app_seed.spawn(len(slices)), dom_seed.spawn(len(slices)))
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        visible = np.concatenate(list(pool.map(lambda job: _render_chunk(scene, job[0], images[job[0]], job[1]),
                                               zip(slices, seeds))) or [np.zeros(0)])
    keep = visible >= MIN_VISIBLE
    bounds = np.searchsorted(image_of, np.arange(n + 1))
    return images, [BoxTarget(scene.boxes[lo:hi][keep[lo:hi]], geo.labels[lo:hi][keep[lo:hi]])
                    for lo, hi in zip(bounds[:-1], bounds[1:])]


def shapes_detect_source(n: int, *, size: int = 128, seed: int = 0, domain: ShapesDomain = ShapesDomain()) -> Source:
    """The ``builtin:shapes?task=detect`` Source; its spec recreates it."""
    from lensforge.data.sources import SampleRecord, Source

    images, targets = generate_shapes_detect(n, size=size, seed=seed, domain=domain)
    domain_fields = {k: ",".join(map(str, v)) if isinstance(v, tuple) else v for k, v in domain.__dict__.items()}
    query = urllib.parse.urlencode({"task": "detect", "n": n, "size": size, "seed": seed, **domain_fields}, safe=",")
    records = [SampleRecord(target, f"builtin:shapes#{i}", None, i) for i, target in enumerate(targets)]
    return Source(f"builtin:shapes?{query}", "detection", list(SHAPE_CLASSES), records, "RGB", images)
