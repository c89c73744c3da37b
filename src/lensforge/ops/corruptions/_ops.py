"""Tensor helpers shared by the corruption families: size rule, random draws, filters, resampling.

Every helper takes and returns float32 batches ``(N, C, H, W)`` (values in [0, 1] unless
said otherwise) and works on the whole batch at once. Fixed linear operators (filter
matrices, resize matrices, the zoom-blur operator) are cached per image size on the CPU and
moved to the batch's device at use, so repeated calls at one size pay for them once.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

# The two sizes Hendrycks & Dietterich published severity parameters for.
SMALL_REFERENCE_PX = 32  # CIFAR-10-C
LARGE_REFERENCE_PX = 224  # ImageNet-C
# Weather layers (snow, spatter, frost, fog) and glass blur's shuffles work at no less than this
# side and are area-resized down: the layers' thresholds were tuned on noise fields of at least
# 32 px (one drawn at 8 px crosses them far more often: less blur, more variance, covering the
# image), and a shuffle cannot move a pixel by less than one pixel.
MIN_LAYER_PX = 32
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, as OpenCV's RGB2GRAY and JPEG's Y
DISPLAY_GAMMA = 2.2  # simple power law standing in for sRGB where light is modelled linearly


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' text: the same in every process (unlike ``hash``)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------------------- parameters by size


def size_weight(side: int) -> float:
    """0 at <= 32 px (CIFAR-10-C), 1 at >= 224 px (ImageNet-C), linear in log(side) between."""
    t = math.log(side / SMALL_REFERENCE_PX) / math.log(LARGE_REFERENCE_PX / SMALL_REFERENCE_PX)
    return min(max(t, 0.0), 1.0)


@dataclass(frozen=True)
class Published:
    """One parameter per severity as published for 32 px (CIFAR-10-C) and 224 px (ImageNet-C).

    At another image side the value is interpolated between the two, linearly in log(side),
    and held at the nearer one outside [32, 224] px. A ``spatial`` parameter is a length in
    pixels: between 32 and 224 px it is interpolated as a fraction of the side, above 224 px
    it grows with the side (ImageNet-C's share of the image), and below 32 px it keeps
    CIFAR-10-C's pixel value, because a blur radius or shift shrunk below a pixel would
    vanish into the pixel grid and severities 1-3 would all become the identity.
    """

    small: tuple[float, ...]
    large: tuple[float, ...]
    spatial: bool = False

    def at(self, severity: int, side: int) -> float:
        t = size_weight(side)
        small, large = self.small[severity - 1], self.large[severity - 1]
        if self.spatial:
            side = max(side, SMALL_REFERENCE_PX)
            return side * ((1 - t) * small / SMALL_REFERENCE_PX + t * large / LARGE_REFERENCE_PX)
        return (1 - t) * small + t * large


def side_of(x: torch.Tensor) -> int:
    return min(x.shape[-2:])


# ---------------------------------------------------------------------------- random draws


def uniform(generator: torch.Generator, shape: tuple[int, ...], low: float | torch.Tensor = 0.0,
            high: float | torch.Tensor = 1.0, *, device: torch.device) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


def normal(generator: torch.Generator, shape: tuple[int, ...], mean: float = 0.0, std: float = 1.0, *,
           device: torch.device) -> torch.Tensor:
    return mean + std * torch.randn(shape, generator=generator, device=device)


def random_sign(generator: torch.Generator, n: int, *, device: torch.device) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=generator, device=device).float() * 2 - 1


POISSON_EXACT_BELOW = 10.0  # rates under this: exact CDF inversion; above: corrected normal quantile
POISSON_MAX_STEPS = 60  # inversion steps; P(k > 60 | rate < 10) is below 1e-25


def poisson(rate: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Poisson draws, vectorised: exact below rate 10, a corrected normal quantile above.

    Above 10 the draw is floor(rate + sqrt(rate) z + (z^2 + 2) / 6), the Cornish-Fisher
    quantile with continuity correction: within 0.25% total variation of the Poisson law at
    rate 10 and 0.1% at 60 (a rounded normal is 4% and 1.6% off), and ~10x faster on CPU than
    exact rejection sampling or ``torch.poisson``, which dominated the whole noise family.
    """
    flat = rate.reshape(-1)
    z = torch.randn(flat.shape, generator=generator, device=flat.device)
    out = torch.floor(flat + flat.clamp(min=0).sqrt() * z + (z * z + 2) / 6).clamp(min=0)
    small = torch.nonzero(flat < POISSON_EXACT_BELOW).flatten()
    if small.numel():
        out[small] = _poisson_inversion(flat[small], generator)
    return out.view_as(rate)


def _poisson_inversion(rate: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Sequential search of the CDF; the still-searching values are compacted once few are left."""
    u = torch.rand(rate.shape, generator=generator, device=rate.device)
    k = torch.zeros_like(rate)
    term = torch.exp(-rate)
    cdf = term.clone()
    index = None  # positions (into rate) of the values still searched, once compacted
    lam, draws = rate, u
    for step in range(1, POISSON_MAX_STEPS):
        below = draws > cdf
        count = int(below.sum())
        if not count:
            break
        if index is None:
            k += below
        else:
            k[index[below]] += 1
        if count < below.numel() // 4:  # compact: keep only the values still below their draw
            keep = torch.nonzero(below).flatten()
            index = keep if index is None else index[keep]
            lam, draws, term, cdf = lam[keep], draws[keep], term[keep], cdf[keep]
        term = term * lam / step
        cdf = cdf + term
    return k


# ---------------------------------------------------------------------------- borders and filters


def border_index(index: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Map indices outside [0, size) back inside, like OpenCV / SciPy border modes.

    ``replicate`` (aaa|abc|ccc, SciPy "nearest"), ``reflect101`` (cb|abc|ba, OpenCV's default),
    ``symmetric`` (ba|abc|cb, SciPy "reflect"); repeated reflection handles any distance.
    """
    if mode == "replicate":
        return index.clamp(0, size - 1)
    if mode == "reflect101":
        period = 2 * (size - 1)
        index = torch.remainder(index, period)
        return torch.where(index >= size, period - index, index)
    if mode == "symmetric":
        period = 2 * size
        index = torch.remainder(index, period)
        return torch.where(index >= size, period - 1 - index, index)
    raise ValueError(f"unknown border mode {mode!r}")


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> tuple[float, ...]:
    """Normalised Gaussian taps, radius ``int(truncate * sigma + 0.5)`` as SciPy/scikit-image."""
    if sigma <= 1e-6:
        return (1.0,)
    radius = max(int(truncate * sigma + 0.5), 1)
    taps = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float64) ** 2) / (2 * sigma * sigma))
    return tuple((taps / taps.sum()).tolist())


@lru_cache(maxsize=128)
def filter_matrix(size: int, kernel: tuple[float, ...], mode: str) -> torch.Tensor:
    """(size, size) matrix M with (M @ v)[i] = sum_k kernel[k] * v[i + k - r], borders folded in."""
    radius = len(kernel) // 2
    rows = torch.arange(size)[:, None].expand(size, len(kernel))
    cols = border_index(rows + torch.arange(-radius, radius + 1)[None], size, mode)
    weights = torch.tensor(kernel, dtype=torch.float32)[None].expand(size, len(kernel))
    return torch.zeros(size, size).index_put_((rows, cols), weights, accumulate=True)


def separable(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Apply a row-operator (H_out, H) and a column-operator (W_out, W) to every image: R @ x @ C^T."""
    return rows.to(x) @ x @ cols.to(x).T


def separable_filter(x: torch.Tensor, kernel: tuple[float, ...], mode: str) -> torch.Tensor:
    h, w = x.shape[-2:]
    return separable(x, filter_matrix(h, kernel, mode), filter_matrix(w, kernel, mode))


def gaussian_blur(x: torch.Tensor, sigma: float, mode: str = "replicate", truncate: float = 4.0) -> torch.Tensor:
    """scikit-image's ``gaussian`` (mode "nearest" = replicate) as two matrix products."""
    if sigma <= 1e-6:
        return x
    return separable_filter(x, gaussian_kernel1d(sigma, truncate), mode)


def box_blur(x: torch.Tensor, size: int, mode: str = "reflect101") -> torch.Tensor:
    """OpenCV's ``blur`` with a size x size box."""
    return separable_filter(x, (1.0 / size,) * size, mode)


FFT_ABOVE_TAPS = 15  # kernels wider than this are applied through the FFT, smaller by grouped conv
SEPARABLE_MAX_RANK = 2  # kernels of rank <= 2 (Gaussian, small disks) become matrix products ...
SEPARABLE_MAX_SIDE = 96  # ... on images up to this side, where the dense (side x side) products win


def filter2d(x: torch.Tensor, kernel: torch.Tensor, mode: str = "reflect101") -> torch.Tensor:
    """Correlate every channel with one odd-sized 2-D kernel (OpenCV ``filter2D``)."""
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    terms = _separable_terms(kernel)
    if len(terms) <= SEPARABLE_MAX_RANK and max(h, w) <= SEPARABLE_MAX_SIDE:
        out = separable(x, filter_matrix(h, terms[0][0], mode), filter_matrix(w, terms[0][1], mode))
        for column, row in terms[1:]:
            out = out + separable(x, filter_matrix(h, column, mode), filter_matrix(w, row, mode))
        return out
    rows = border_index(torch.arange(-(kh // 2), h + kh // 2, device=x.device), h, mode)
    cols = border_index(torch.arange(-(kw // 2), w + kw // 2, device=x.device), w, mode)
    padded = x.index_select(2, rows).index_select(3, cols)
    kernel = kernel.to(x)
    if max(kh, kw) <= FFT_ABOVE_TAPS:
        # one group per image-channel: ~20x faster on CPU than a 1-channel conv over N*C images
        weight = kernel.expand(n * c, 1, kh, kw)
        return F.conv2d(padded.reshape(1, n * c, *padded.shape[2:]), weight, groups=n * c).view(n, c, h, w)
    size = padded.shape[2:]
    spectrum = torch.fft.rfft2(padded) * torch.fft.rfft2(kernel.flip(0, 1), s=size)
    return torch.fft.irfft2(spectrum, s=size)[..., kh - 1:kh - 1 + h, kw - 1:kw - 1 + w]


def _separable_terms(kernel: torch.Tensor) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
    """The kernel as a sum of outer products (column taps, row taps), by SVD, dropping < 1e-7."""
    u, s, vh = torch.linalg.svd(kernel.double())
    rank = int((s > 1e-7 * s[0]).sum())
    return [(tuple((u[:, i] * s[i].sqrt()).tolist()), tuple((vh[i] * s[i].sqrt()).tolist())) for i in range(rank)]


# ---------------------------------------------------------------------------- resizing


@lru_cache(maxsize=64)
def box_resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """(size_out, size_in) matrix of Pillow's BOX resampling (down: area means, up: nearest)."""
    scale = size_in / size_out
    filter_scale = max(scale, 1.0)
    support = 0.5 * filter_scale
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    for out in range(size_out):
        centre = (out + 0.5) * scale
        low = max(int(centre - support + 0.5), 0)
        high = min(int(centre + support + 0.5), size_in)
        for src in range(low, high):
            offset = (src - centre + 0.5) / filter_scale
            matrix[out, src] = 1.0 if -0.5 < offset <= 0.5 else 0.0  # Pillow's box_filter
        matrix[out] /= matrix[out].sum()
    return matrix.float()


def box_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    return separable(x, box_resize_matrix(h, height), box_resize_matrix(w, width))


def layer_shape(height: int, width: int) -> tuple[int, int]:
    """Size at which a weather layer is drawn: the image's, scaled up to >= ``MIN_LAYER_PX``."""
    scale = max(1.0, MIN_LAYER_PX / min(height, width))
    return round(height * scale), round(width * scale)


def zoom_taps(size: int, zoom: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices (size, 2) and weights of a zoom by ``zoom`` about the centre along one axis.

    Hendrycks' ``clipped_zoom`` crops ``ceil(size / zoom)`` centre pixels and zooms them with
    SciPy; the integer crop quantises the zoom (at 8 px every zoom below 1.14 is the identity),
    so this samples the continuous zoom instead (linear interpolation, the same order).
    """
    centre = (size - 1) / 2
    pos = (centre + (torch.arange(size, dtype=torch.float64) - centre) / zoom).clamp(0, size - 1)
    low = pos.floor().clamp(max=size - 1)
    frac = pos - low
    high = (low + 1).clamp(max=size - 1)
    return torch.stack([low, high], 1).long(), torch.stack([1 - frac, frac], 1).float()


def zoom_matrix(size: int, zoom: float) -> torch.Tensor:
    index, weight = zoom_taps(size, zoom)
    return torch.zeros(size, size).index_put_((torch.arange(size)[:, None].expand(-1, 2), index), weight,
                                              accumulate=True)


@lru_cache(maxsize=8)
def zoom_average_operator(height: int, width: int, zooms: tuple[float, ...]) -> torch.Tensor:
    """Sparse (HW, HW) operator: the mean of the image and its clipped zooms (zoom blur).

    One sparse product replaces ``len(zooms)`` resamplings: at 32 px and 26 zooms it is ~15x
    faster than ``grid_sample`` per zoom, because the taps of nearby zooms coincide.
    """
    rows, cols, vals = [torch.arange(height * width)], [torch.arange(height * width)], [torch.ones(height * width)]
    out_index = (torch.arange(height)[:, None] * width + torch.arange(width)[None]).reshape(-1)
    for zoom in zooms:
        (iy, wy), (ix, wx) = zoom_taps(height, zoom), zoom_taps(width, zoom)
        src = iy[:, None, :, None] * width + ix[None, :, None, :]  # (H, W, 2, 2)
        weight = wy[:, None, :, None] * wx[None, :, None, :]
        rows.append(out_index.repeat_interleave(4))
        cols.append(src.reshape(-1))
        vals.append(weight.reshape(-1))
    indices = torch.stack([torch.cat(rows), torch.cat(cols)])
    values = torch.cat(vals) / (len(zooms) + 1)
    size = height * width
    return torch.sparse_coo_tensor(indices, values, (size, size), check_invariants=False).coalesce()


def apply_operator(x: torch.Tensor, operator: torch.Tensor) -> torch.Tensor:
    """Apply a sparse (HW_out, HW_in) operator to every channel of every image (same size out)."""
    n, c, h, w = x.shape
    columns = x.reshape(n * c, h * w).T.contiguous()  # sparse @ dense wants the pixels as rows
    return torch.sparse.mm(operator.to(x.device), columns).T.reshape(n, c, h, w)


# ---------------------------------------------------------------------------- warps


def pixel_grid(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(H, W, 2) pixel coordinates (x = column, y = row) of every pixel centre."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                            torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    return torch.stack([xs, ys], -1)


def sample(x: torch.Tensor, coords: torch.Tensor, *, padding: str = "reflection",
           mode: str = "bilinear") -> torch.Tensor:
    """Read x at pixel coordinates ``coords`` (N, H_out, W_out, 2) in (x, y) order.

    ``align_corners=True`` makes integer coordinates hit pixel centres exactly, and makes
    "reflection" mirror about the edge pixels' centres (OpenCV's REFLECT_101).
    """
    h, w = x.shape[-2:]
    scale = coords.new_tensor([2.0 / (w - 1), 2.0 / (h - 1)])
    return F.grid_sample(x, coords * scale - 1, mode=mode, padding_mode=padding, align_corners=True)


def warp_projective(x: torch.Tensor, matrices: torch.Tensor, *, padding: str = "reflection") -> torch.Tensor:
    """Warp each image by a 3x3 matrix mapping output pixel coordinates to input ones.

    Coordinates are centred on the image centre, so rotations and scalings are about it.
    """
    n, _, h, w = x.shape
    centre = x.new_tensor([(w - 1) / 2, (h - 1) / 2])
    grid = (pixel_grid(h, w, x.device) - centre).reshape(1, h * w, 2)
    homogeneous = torch.cat([grid.expand(n, -1, -1), grid.new_ones(n, h * w, 1)], -1)
    mapped = homogeneous @ matrices.transpose(1, 2)
    coords = mapped[..., :2] / mapped[..., 2:].clamp(min=1e-6) + centre
    return sample(x, coords.view(n, h, w, 2), padding=padding)


def line_blur(x: torch.Tensor, radius: float, sigma: float, angles_deg: torch.Tensor) -> torch.Tensor:
    """ImageMagick's ``-motion-blur radius x sigma + angle``, one angle per image.

    A one-sided half-Gaussian of ``2 * ceil(radius) + 1`` taps along the angle, at
    integer-rounded offsets, edge pixels repeated; taps below 1e-4 of the first are skipped.
    Each tap is one gather of the whole batch (integer offsets need no interpolation).
    """
    taps = 2 * math.ceil(radius) + 1
    steps = torch.arange(taps, dtype=torch.float64)
    weights = torch.exp(-(steps**2) / (2 * max(sigma, 1e-6) ** 2))
    keep = int((weights >= 1e-4 * weights[0]).sum())
    weights = (weights / weights.sum())[:keep].tolist()
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w)
    angle = torch.deg2rad(angles_deg.to(x)).view(n, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    out = x * weights[0]
    for step in range(1, keep):
        dy = torch.round(step * torch.sin(angle)).long()
        dx = torch.round(step * torch.cos(angle)).long()
        index = ((rows + dy).clamp(0, h - 1) * w + (cols + dx).clamp(0, w - 1)).view(n, 1, h * w)
        out.add_(flat.gather(2, index.expand(n, c, h * w)).view(n, c, h, w), alpha=weights[step])
    return out


# ---------------------------------------------------------------------------- colour


def luminance(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) BT.601 luma of RGB, or the single channel of a grey batch."""
    if x.shape[1] == 1:
        return x
    return torch.einsum("nchw,c->nhw", x, x.new_tensor(LUMA_WEIGHTS)).unsqueeze(1)


def to_linear(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1) ** DISPLAY_GAMMA


def from_linear(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0, 1) ** (1 / DISPLAY_GAMMA)


def plasma_fractal(generator: torch.Generator, n: int, map_size: int, wibble_decay: float, *,
                   device: torch.device) -> torch.Tensor:
    """(n, map_size, map_size) diamond-square height maps in [0, 1], Hendrycks' ``plasma_fractal``.

    The same steps as the original (``wibble`` starts at 100 and is divided by the decay each
    level), with the batch as a leading axis; ``map_size`` must be a power of two.
    """
    maps = torch.zeros(n, map_size, map_size, device=device)
    step, wibble = map_size, 100.0

    def wibbled_mean(total: torch.Tensor) -> torch.Tensor:
        noise = torch.rand(total.shape, generator=generator, device=device)
        return total / 4 + wibble * (wibble * (2 * noise - 1))

    while step >= 2:
        half = step // 2
        corners = maps[:, 0::step, 0::step]
        square = corners + corners.roll(-1, 1)
        square = square + square.roll(-1, 2)
        maps[:, half::step, half::step] = wibbled_mean(square)
        centres = maps[:, half::step, half::step]
        corners = maps[:, 0::step, 0::step]
        left = centres + centres.roll(1, 1) + corners + corners.roll(-1, 2)
        maps[:, 0::step, half::step] = wibbled_mean(left)
        top = centres + centres.roll(1, 2) + corners + corners.roll(-1, 1)
        maps[:, half::step, 0::step] = wibbled_mean(top)
        step //= 2
        wibble /= wibble_decay
    low = maps.amin((1, 2), keepdim=True)
    high = maps.amax((1, 2), keepdim=True)
    return (maps - low) / (high - low).clamp(min=1e-12)
