"""Seeded procedural images of geometric shapes: the built-in ``builtin:shapes`` data.

Hand-written because no maintained library generates seeded, parametric shape data
sets with domain controls (lighting, noise, clutter, blur, contrast), tight boxes and
masks in one call. Everything is NumPy: shapes are signed distance functions evaluated
on a pixel grid, vectorised over a chunk of images, with one pixel of anti-aliasing.

Three independent random streams are drawn from ``seed``: geometry (class, size,
position, rotation), appearance (colours, background, per-image lighting) and domain
(clutter, sensor noise). A domain shift therefore re-renders the *same* scenes: labels,
boxes and masks are identical across domains, and only the pixels change.

Coordinates: pixel ``(row i, column j)`` covers ``[j, j+1) x [i, i+1)``; boxes are
``[x0, y0, x1, y1]`` in those continuous pixel coordinates (x along columns).
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial

import numpy as np

from lensforge.errors import UsageError

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon")
EXTRA_SHAPE_CLASSES: tuple[str, ...] = ("ring", "ellipse")  # opt-in via ``classes=``

SIZE_RANGE = (8, 1024)  # image side in pixels
_PIXELS_PER_CHUNK = 1 << 20  # bounds the float32 working set to ~100 MB per chunk
_SCALE_RANGE = (0.22, 0.40)  # shape scale (unit frame -> pixels) as a fraction of the side
_INSIDE_FRACTION = 0.92  # at most 8% of a shape's reach may leave the frame
_MIN_OBJECT_CONTRAST = 0.3  # RGB distance between fill and background, in [0, 1] units
_WAVES = 3  # sinusoids in the background texture
_MAX_STROKES = 10  # distractor strokes per image at clutter=1


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class ShapesDomain:
    """Appearance of a domain; the defaults are the clean source domain.

    Attributes:
        lighting: global illumination multiplier (0.25 = dark).
        noise: sensor-noise std, in units of the [0, 1] pixel range.
        clutter: 0..1, amount of distractor strokes and blobs in the background.
        blur: Gaussian blur sigma in pixels.
        contrast: object/background contrast multiplier.
        color_cast: per-channel (R, G, B) gain, e.g. a camera's white balance.
    """

    lighting: float = 1.0
    noise: float = 0.0
    clutter: float = 0.0
    blur: float = 0.0
    contrast: float = 1.0
    color_cast: tuple[float, float, float] = (1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        limits = {"lighting": (0.0, 10.0), "noise": (0.0, 1.0), "clutter": (0.0, 1.0),
                  "blur": (0.0, 64.0), "contrast": (0.0, 10.0)}
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if not _is_real(value) or not low <= value <= high:  # also rejects NaN
                raise UsageError(f"ShapesDomain.{name} must be a number in [{low}, {high}], "
                                 f"not {value!r}")
        cast = self.color_cast
        if not isinstance(cast, (tuple, list)) or len(cast) != 3 or not all(_is_real(c) and 0 <= c <= 10 for c in cast):
            raise UsageError(f"ShapesDomain.color_cast must be three gains in [0, 10], not {cast!r}")

    @classmethod
    def preset(cls, name: str) -> ShapesDomain:
        """A named domain: ``"source"`` (the defaults) or ``"shifted"`` (dark, noisy, cluttered)."""
        if name not in DOMAIN_PRESETS:
            known = ", ".join(DOMAIN_PRESETS)
            raise UsageError(f"unknown shapes domain preset {name!r}; known presets: {known}")
        return cls(**DOMAIN_PRESETS[name])

    def to_dict(self) -> dict[str, object]:
        """Plain values for a manifest."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


DOMAIN_PRESETS: dict[str, dict[str, object]] = {
    "source": {},
    # A cheaper, badly lit camera: dark, noisy, cluttered, soft, slightly cool white balance.
    # Noise 0.08 and clutter 0.6 (the first preset) destroyed the label at 32 px: a model
    # trained on that domain itself reached 21% (chance 17%), a shift no method can undo.
    "shifted": {"lighting": 0.35, "noise": 0.03, "clutter": 0.15, "blur": 0.6,
                "color_cast": (0.9, 1.0, 1.15)},
}


@dataclass
class ShapesData:
    """A generated data set; arrays share the first axis.

    Attributes:
        images: (n, size, size, 3) uint8 RGB, or (n, size, size) uint8 when channels=1.
        labels: (n,) int64 index into ``class_names``.
        boxes: (n, 4) float32 tight ``[x0, y0, x1, y1]`` in pixels, clipped to the image.
        masks: (n, size, size) bool object masks (pixel centre inside), or None.
        class_names: the class of each label index.
    """

    images: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    masks: np.ndarray | None
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


# --- shapes as signed distances in a unit frame (negative inside, ~1 = circumradius) ------


def _sdf_circle(u: np.ndarray, v: np.ndarray, radius: float) -> np.ndarray:
    return np.hypot(u, v) - radius


def _sdf_ring(u: np.ndarray, v: np.ndarray, radius: float, half_width: float) -> np.ndarray:
    return np.abs(np.hypot(u, v) - radius) - half_width


def _sdf_box(u: np.ndarray, v: np.ndarray, half_w: float, half_h: float) -> np.ndarray:
    qx, qy = np.abs(u) - half_w, np.abs(v) - half_h
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0)


def _sdf_cross(u: np.ndarray, v: np.ndarray, half_len: float, half_width: float) -> np.ndarray:
    return np.minimum(_sdf_box(u, v, half_len, half_width), _sdf_box(u, v, half_width, half_len))


def _fold(u: np.ndarray, v: np.ndarray, sides: int) -> tuple[np.ndarray, np.ndarray]:
    """Fold the plane into one half-sector of an n-fold symmetric shape (angle in [0, pi/n])."""
    sector = 2 * math.pi / sides
    angle = np.mod(np.arctan2(v, u) + sector / 2, sector) - sector / 2
    rho = np.sqrt(u * u + v * v)
    return rho * np.cos(angle), rho * np.abs(np.sin(angle))


def _sdf_polygon(u: np.ndarray, v: np.ndarray, sides: int, circumradius: float) -> np.ndarray:
    x, y = _fold(u, v, sides)
    apothem = circumradius * math.cos(math.pi / sides)
    half_edge = circumradius * math.sin(math.pi / sides)
    # Past the half-edge the nearest boundary point is the vertex, not the edge.
    return np.where(y <= half_edge, x - apothem, np.hypot(x - apothem, y - half_edge))


def _sdf_star(u: np.ndarray, v: np.ndarray, points: int, outer: float, inner: float) -> np.ndarray:
    x, y = _fold(u, v, points)
    # In the half-sector the boundary is one segment, tip (outer, 0) -> notch vertex.
    ex = inner * math.cos(math.pi / points) - outer
    ey = inner * math.sin(math.pi / points)
    px, py = x - outer, y
    t = np.clip((px * ex + py * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    dist = np.hypot(px - t * ex, py - t * ey)
    return np.where(ex * py - ey * px > 0, -dist, dist)  # origin's side of the edge is inside


def _sdf_ellipse(u: np.ndarray, v: np.ndarray, semi_u: float, semi_v: float) -> np.ndarray:
    # First-order distance estimate: exact on the boundary, good within the 1 px AA band.
    k0 = np.hypot(u / semi_u, v / semi_v)
    k1 = np.hypot(u / semi_u**2, v / semi_v**2)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-6)


def _ring_points(radius_u: float, radius_v: float, count: int = 360) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, count, endpoint=False)
    return np.stack([radius_u * np.cos(t), radius_v * np.sin(t)], axis=1)


def _polygon_points(sides: int, circumradius: float, offset: float = 0.5) -> np.ndarray:
    t = (np.arange(sides) + offset) * 2 * math.pi / sides  # offset 0.5: edges face the axes
    return circumradius * np.stack([np.cos(t), np.sin(t)], axis=1)


def _cross_points(half_len: float, half_width: float) -> np.ndarray:
    a, b = half_len, half_width
    return np.array([[a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b],
                     [-a, -b], [-b, -b], [-b, -a], [b, -a], [b, -b], [a, -b]])


@dataclass(frozen=True)
class _ShapeSpec:
    sdf: Callable[[np.ndarray, np.ndarray], np.ndarray]  # unit frame, negative inside
    outline: np.ndarray  # (P, 2) unit-frame points whose hull is the shape: boxes, placement


# Sizes are chosen so the classes cover similar areas; areas still differ a little, which
# is a real (weak) cue like in natural data.
_SHAPES: dict[str, _ShapeSpec] = {
    "circle": _ShapeSpec(partial(_sdf_circle, radius=0.8), _ring_points(0.8, 0.8)),
    "square": _ShapeSpec(partial(_sdf_box, half_w=0.66, half_h=0.66),
                         _polygon_points(4, 0.66 * math.sqrt(2))),
    "triangle": _ShapeSpec(partial(_sdf_polygon, sides=3, circumradius=1.0),
                           _polygon_points(3, 1.0)),
    "star": _ShapeSpec(partial(_sdf_star, points=5, outer=1.0, inner=0.5),
                       _polygon_points(5, 1.0, offset=0.0)),
    "cross": _ShapeSpec(partial(_sdf_cross, half_len=0.9, half_width=0.3), _cross_points(0.9, 0.3)),
    "hexagon": _ShapeSpec(partial(_sdf_polygon, sides=6, circumradius=0.85),
                          _polygon_points(6, 0.85)),
    "ring": _ShapeSpec(partial(_sdf_ring, radius=0.7, half_width=0.17), _ring_points(0.87, 0.87)),
    "ellipse": _ShapeSpec(partial(_sdf_ellipse, semi_u=0.95, semi_v=0.5),
                          _ring_points(0.95, 0.5)),
}


# --- argument checks ----------------------------------------------------------------------


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"generate_shapes: {name} must be an integer, not {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise UsageError(f"generate_shapes: {name} must be {bound}, not {value}")
    return int(value)


def _check_classes(classes: object) -> tuple[str, ...]:
    if isinstance(classes, str) or not classes:
        raise UsageError(f"generate_shapes: classes must be a non-empty tuple of names, "
                         f"not {classes!r}")
    names = tuple(classes)  # type: ignore[arg-type]
    for name in names:
        if name not in _SHAPES:
            close = difflib.get_close_matches(str(name), list(_SHAPES), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UsageError(f"generate_shapes: unknown shape class {name!r} in classes{hint} "
                             f"(known: {', '.join(_SHAPES)})")
    if len(set(names)) != len(names):
        raise UsageError(f"generate_shapes: classes has duplicates: {names!r}")
    return names


# --- random parameters ----------------------------------------------------------------------


@dataclass
class _Geometry:
    labels: np.ndarray  # (n,) int64
    scale: np.ndarray  # (n,) pixels per unit-frame unit
    cos: np.ndarray  # (n,) rotation
    sin: np.ndarray
    cx: np.ndarray  # (n,) centre in pixels
    cy: np.ndarray


def _draw_geometry(rng: np.random.Generator, n: int, size: int,
                   class_names: tuple[str, ...]) -> _Geometry:
    labels = rng.permutation(np.arange(n) % len(class_names)).astype(np.int64)
    scale = rng.uniform(*_SCALE_RANGE, n) * size
    angle = rng.uniform(0, 2 * math.pi, n)
    reach_unit = np.array([np.hypot(*_SHAPES[c].outline.T).max() for c in class_names])
    margin = scale * reach_unit[labels] * _INSIDE_FRACTION
    cx = margin + rng.random(n) * (size - 2 * margin)
    cy = margin + rng.random(n) * (size - 2 * margin)
    return _Geometry(labels, scale, np.cos(angle), np.sin(angle), cx, cy)


def _boxes(geo: _Geometry, size: int, class_names: tuple[str, ...]) -> np.ndarray:
    boxes = np.empty((len(geo.labels), 4), dtype=np.float64)
    for index, name in enumerate(class_names):
        sel = geo.labels == index
        pu, pv = _SHAPES[name].outline.T  # (P,)
        s, c, sn = geo.scale[sel, None], geo.cos[sel, None], geo.sin[sel, None]
        xs = geo.cx[sel, None] + s * (c * pu - sn * pv)  # inverse of the rotation in _coverage
        ys = geo.cy[sel, None] + s * (sn * pu + c * pv)
        boxes[sel] = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1)
    return np.clip(boxes, 0, size).astype(np.float32)


@dataclass
class _Appearance:
    bg_start: np.ndarray  # (n, 3) background gradient end colours
    bg_end: np.ndarray
    bg_dir: np.ndarray  # (n, 2) gradient direction, units per image side
    wave_freq: np.ndarray  # (n, K, 2) texture cycles per image side, (x, y)
    wave_phase: np.ndarray  # (n, K)
    wave_amp: np.ndarray  # (n, K)
    grain: np.ndarray  # (n,) per-pixel texture std
    fill: np.ndarray  # (n, 3) object colour
    fill_shade: np.ndarray  # (n, 2) shading slope across the object, per image side
    gain: np.ndarray  # (n,) per-image exposure
    light_slope: np.ndarray  # (n, 2) illumination gradient, per image side


def _random_direction(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    angle = rng.uniform(0, 2 * math.pi, n)
    return rng.uniform(low, high, n)[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)


def _draw_appearance(rng: np.random.Generator, n: int) -> _Appearance:
    bg_start = rng.uniform(0.05, 0.95, (n, 3))
    bg_end = np.clip(bg_start + rng.normal(0, 0.2, (n, 3)), 0, 1)
    fill = rng.uniform(0, 1, (n, 3))
    # Keep the object visible: push the fill away from the mean background colour. The sign
    # of the difference stays random, so neither "light" nor "dark" identifies objects.
    bg_mean = (bg_start + bg_end) / 2
    diff = fill - bg_mean
    norm = np.linalg.norm(diff, axis=1, keepdims=True)
    fill = np.clip(bg_mean + diff / np.maximum(norm, 1e-6) * np.maximum(norm, _MIN_OBJECT_CONTRAST),
                   0, 1)
    return _Appearance(
        bg_start=bg_start, bg_end=bg_end, bg_dir=_random_direction(rng, n, 0.0, 1.0),
        wave_freq=rng.uniform(0.5, 4.0, (n, _WAVES, 2)) * rng.choice([-1, 1], (n, _WAVES, 2)),
        wave_phase=rng.uniform(0, 2 * math.pi, (n, _WAVES)),
        wave_amp=rng.uniform(0, 0.06, (n, _WAVES)),
        grain=rng.uniform(0, 0.03, n),
        fill=fill, fill_shade=_random_direction(rng, n, 0.0, 0.5),
        gain=rng.uniform(0.7, 1.15, n), light_slope=_random_direction(rng, n, 0.0, 0.6),
    )


# --- rendering ------------------------------------------------------------------------------


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, shaped to broadcast over (batch, rows, cols)."""
    centres = np.arange(size, dtype=np.float32) + 0.5
    return centres[None, None, :], centres[None, :, None]


def _linear_ramp(slope: np.ndarray, size: int) -> np.ndarray:
    """(b, H, W) ramp through 0 at the image centre with ``slope`` (b, 2) per image side."""
    x, y = _grid(size)
    rel_x, rel_y = x / size - 0.5, y / size - 0.5
    return (slope[:, 0, None, None] * rel_x + slope[:, 1, None, None] * rel_y).astype(np.float32)


def _waves(freq: np.ndarray, phase: np.ndarray, amp: np.ndarray, size: int) -> np.ndarray:
    """Sum of sinusoids, (b, H, W); cos(a+b) is split so no trig runs per pixel."""
    x, y = _grid(size)
    out = np.zeros((freq.shape[0], size, size), dtype=np.float32)
    for k in range(freq.shape[1]):
        ax = ((2 * math.pi / size) * freq[:, k, 0, None, None] * x).astype(np.float32)
        ay = (2 * math.pi / size) * freq[:, k, 1, None, None] * y + phase[:, k, None, None]
        ay = ay.astype(np.float32)
        a = amp[:, k, None, None].astype(np.float32)
        out += np.cos(ax) * (a * np.cos(ay)) - np.sin(ax) * (a * np.sin(ay))
    return out


def _background(app: _Appearance, sl: slice, rng: np.random.Generator, size: int) -> np.ndarray:
    t = np.clip(0.5 + _linear_ramp(app.bg_dir[sl], size), 0, 1)[..., None]
    start = app.bg_start[sl, None, None, :].astype(np.float32)
    end = app.bg_end[sl, None, None, :].astype(np.float32)
    texture = _waves(app.wave_freq[sl], app.wave_phase[sl], app.wave_amp[sl], size)
    grain = rng.standard_normal((t.shape[0], size, size), dtype=np.float32)
    texture += grain * app.grain[sl, None, None].astype(np.float32)
    return start + t * (end - start) + texture[..., None]


def _coverage(geo: _Geometry, sl: slice, size: int,
              class_names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Anti-aliased coverage in [0, 1] and signed distance in pixels, both (b, H, W)."""
    x, y = _grid(size)
    labels = geo.labels[sl]
    dist = np.empty((len(labels), size, size), dtype=np.float32)
    for index, name in enumerate(class_names):
        sel = np.flatnonzero(labels == index)
        if sel.size == 0:
            continue
        rows = sel + sl.start
        scale = geo.scale[rows, None, None].astype(np.float32)
        dx = (x - geo.cx[rows, None, None].astype(np.float32)) / scale
        dy = (y - geo.cy[rows, None, None].astype(np.float32)) / scale
        c = geo.cos[rows, None, None].astype(np.float32)
        s = geo.sin[rows, None, None].astype(np.float32)
        u, v = c * dx + s * dy, c * dy - s * dx
        dist[sel] = _SHAPES[name].sdf(u, v) * scale
    # Distance 0 at a pixel centre -> half covered: a box filter one pixel wide.
    return np.clip(0.5 - dist, 0, 1), dist


def _add_clutter(img: np.ndarray, clutter: float, rng: np.random.Generator) -> None:
    """Paint distractor blobs and strokes (never class shapes) onto the background in place."""
    b, size = img.shape[0], img.shape[1]
    # Irregular blobs: a thresholded low-frequency wave field.
    field = _waves(rng.uniform(1.0, 5.0, (b, 2, 2)) * rng.choice([-1, 1], (b, 2, 2)),
                   rng.uniform(0, 2 * math.pi, (b, 2)), np.full((b, 2), 0.5), size)
    blob_alpha = np.clip((field - (0.8 - 0.6 * clutter)) * 6, 0, 1) * clutter
    blob_colour = rng.uniform(0, 1, (b, 1, 1, 3)).astype(np.float32)
    img += blob_alpha[..., None] * (blob_colour - img)
    # Strokes: capsules (thick line segments) of random length, width and colour.
    x, y = _grid(size)
    for _ in range(math.ceil(_MAX_STROKES * clutter)):
        start = rng.uniform(0, size, (b, 2))
        seg = _random_direction(rng, b, 0.15 * size, 0.6 * size)
        half_width = np.maximum(rng.uniform(0.01, 0.035, b) * size, 0.5)
        opacity = rng.uniform(0.5, 1.0, b) * (rng.random(b) < 0.75)
        colour = rng.uniform(0, 1, (b, 1, 1, 3)).astype(np.float32)
        start, seg = start.astype(np.float32), seg.astype(np.float32)
        px, py = x - start[:, 0, None, None], y - start[:, 1, None, None]  # (b, 1, W), (b, H, 1)
        ex, ey = seg[:, 0, None, None], seg[:, 1, None, None]
        t = np.clip((px * ex + py * ey) * (1 / (ex * ex + ey * ey)), 0, 1)
        dx, dy = px - t * ex, py - t * ey
        dist = np.sqrt(dx * dx + dy * dy) - half_width[:, None, None].astype(np.float32)
        alpha = np.clip(0.5 - dist, 0, 1) * opacity[:, None, None].astype(np.float32)
        _paint_sparse(img, alpha, colour)


def _paint_sparse(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """``img += alpha * (colour - img)`` on the pixels with alpha > 0 only (strokes are thin)."""
    hit = np.flatnonzero(alpha)
    pixels = img.reshape(-1, img.shape[-1])  # a view: img is C-contiguous by construction
    per_image = alpha.shape[1] * alpha.shape[2]
    weight = alpha.reshape(-1)[hit, None]
    pixels[hit] += weight * (colour.reshape(len(colour), -1)[hit // per_image] - pixels[hit])


def _gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over axes 1 and 2 (rows, cols), edges replicated."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    for axis in (1, 2):
        pad = [(0, 0)] * img.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(img, pad, mode="edge")
        window = [slice(None)] * img.ndim
        img = np.zeros_like(img)
        for offset, weight in enumerate(taps):
            window[axis] = slice(offset, offset + img.shape[axis])
            img += weight * padded[tuple(window)]  # slices are views: no copy per tap
    return img


def _render_chunk(geo: _Geometry, app: _Appearance, domain: ShapesDomain, sl: slice, size: int,
                  class_names: tuple[str, ...], channels: int,
                  app_rng: np.random.Generator, dom_rng: np.random.Generator,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Render images[sl]: uint8 images and bool masks."""
    img = _background(app, sl, app_rng, size)
    if domain.clutter > 0:
        _add_clutter(img, domain.clutter, dom_rng)
    alpha, dist = _coverage(geo, sl, size, class_names)
    shade = 1 + _linear_ramp(app.fill_shade[sl], size)[..., None]
    fill = app.fill[sl, None, None, :].astype(np.float32) * shade
    img += (domain.contrast * alpha)[..., None] * (fill - img)
    # Illumination multiplies the whole scene: per-image exposure and falloff, then domain.
    light = app.gain[sl, None, None].astype(np.float32) * (1 + _linear_ramp(app.light_slope[sl],
                                                                             size))
    img *= (light * domain.lighting)[..., None]
    img *= np.asarray(domain.color_cast, dtype=np.float32)
    if channels == 1:
        # Saturate per channel first, so a gray image is the luma of its RGB twin.
        img = np.clip(img, 0, 1) @ np.array([[0.299], [0.587], [0.114]], dtype=np.float32)
    if domain.blur > 0.05:  # below this the kernel is a delta anyway
        img = _gaussian_blur(img, domain.blur)
    if domain.noise > 0:  # sensor noise comes last, after the optics
        img += domain.noise * dom_rng.standard_normal(img.shape, dtype=np.float32)
    pixels = np.rint(np.clip(img, 0, 1) * 255).astype(np.uint8)
    return (pixels[..., 0] if channels == 1 else pixels), dist <= 0


def generate_shapes(n: int, *, size: int = 32, seed: int = 0,
                    domain: ShapesDomain = ShapesDomain(),  # frozen, so a shared default is safe
                    classes: tuple[str, ...] = SHAPE_CLASSES, channels: int = 3,
                    return_masks: bool = False) -> ShapesData:
    """Generate ``n`` images, one shape each, with balanced labels, tight boxes and masks.

    The output is a pure function of the arguments. Labels, boxes and masks depend on
    ``(n, size, seed, classes)`` only, so two domains render the same scenes.

    Raises:
        UsageError: an argument out of range or an unknown class name.
    """
    n = _check_int("n", n, 1)
    size = _check_int("size", size, *SIZE_RANGE)
    seed = _check_int("seed", seed, 0)
    if channels not in (1, 3) or isinstance(channels, bool):
        raise UsageError(f"generate_shapes: channels must be 1 or 3, not {channels!r}")
    if not isinstance(domain, ShapesDomain):
        raise UsageError(f"generate_shapes: domain must be a ShapesDomain, not {domain!r}")
    class_names = _check_classes(classes)

    geo_rng, app_rng, dom_rng = (np.random.default_rng(s)
                                 for s in np.random.SeedSequence(seed).spawn(3))
    geo = _draw_geometry(geo_rng, n, size, class_names)
    app = _draw_appearance(app_rng, n)
    shape = (n, size, size) if channels == 1 else (n, size, size, 3)
    images = np.empty(shape, dtype=np.uint8)
    masks = np.empty((n, size, size), dtype=bool) if return_masks else None
    chunk = max(1, _PIXELS_PER_CHUNK // (size * size))
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        images[sl], chunk_masks = _render_chunk(geo, app, domain, sl, size, class_names,
                                                channels, app_rng, dom_rng)
        if masks is not None:
            masks[sl] = chunk_masks
    return ShapesData(images=images, labels=geo.labels, boxes=_boxes(geo, size, class_names),
                      masks=masks, class_names=class_names)
