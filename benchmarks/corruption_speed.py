"""Corruption throughput: lensforge's batched corruptions vs a per-image NumPy/SciPy/Pillow loop.

Workload (issue aim: at most 60 s on 2 cores): the 19 "common" corruptions (ImageNet-C's 15
and its 4 extras) x 5 severities on 10,000 RGB 32x32 uint8 images, photo-like (smooth
gradients, a disc, a rectangle, mild texture).

- *lensforge*: ``corrupt(chunk, name, severity)`` on chunks of ``--chunk`` images, uint8 in
  and out, the way ``lensforge stress`` and the training augmentation call it.
- *reference*: the same definitions written per image, the usual way (``_numpy_corruptions``:
  NumPy, SciPy ``ndimage``, Pillow resize and JPEG), HWC uint8 in and out. It is timed on
  ``--reference-images`` images and its time extrapolated linearly to ``--images`` (per-image
  cost does not depend on the number of images); the output says so.

Both sides are timed per corruption, alternating (lensforge then reference on even
repetitions, the reverse on odd), ``--repeats`` times; the figures are medians over
repetitions, the ratio is reference / lensforge per corruption and for the totals.

    .venv/bin/python benchmarks/corruption_speed.py                       # full: ~4-6 min
    .venv/bin/python benchmarks/corruption_speed.py --images 1000 --repeats 1 --reference-images 50
"""

from __future__ import annotations

import _common  # first: sets OMP_WAIT_POLICY before torch loads  # isort: skip

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from lensforge.ops.corruptions import SEVERITIES, corrupt, list_corruptions

AIM_TOTAL_S = 60.0  # lensforge, whole workload, 2 cores


def photo_like(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) uint8 images with smooth gradients, a disc, a rectangle and mild texture."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, size).view(1, 1, size, 1)
    xs = torch.linspace(0, 1, size).view(1, 1, 1, size)

    def draw(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=g)

    image = 0.25 + 0.3 * draw(n, 3, 1, 1) + 0.3 * (draw(n, 3, 1, 1) - 0.5) * (xs - ys)
    disc = ((xs - draw(n, 1, 1, 1)) ** 2 + (ys - draw(n, 1, 1, 1)) ** 2) < (0.15 + 0.2 * draw(n, 1, 1, 1)) ** 2
    image = torch.where(disc, 0.15 + 0.7 * draw(n, 3, 1, 1), image)
    left, top = 0.6 * draw(n, 1, 1, 1), 0.6 * draw(n, 1, 1, 1)
    box = (xs > left) & (xs < left + 0.3) & (ys > top) & (ys < top + 0.25)
    image = torch.where(box, 0.15 + 0.7 * draw(n, 3, 1, 1), image)
    image = image + 0.05 * torch.sin(12 * xs + 10 * draw(n, 1, 1, 1)) * torch.cos(9 * ys)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def time_lensforge(images: torch.Tensor, name: str, chunk: int, seed: int) -> float:
    start = time.perf_counter()
    for severity in SEVERITIES:
        for first in range(0, len(images), chunk):
            corrupt(images[first:first + chunk], name, severity, seed=seed)
    return time.perf_counter() - start


def time_reference(images: list[np.ndarray], name: str, seed: int) -> float:
    from _numpy_corruptions import REFERENCES

    fn, rng = REFERENCES[name], np.random.default_rng(seed)
    start = time.perf_counter()
    for severity in SEVERITIES:
        for image in images:  # uint8 in, uint8 out, as lensforge's side
            np.uint8(np.clip(fn(image.astype(np.float32) / 255, severity, rng), 0, 1) * 255)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=2000, help="images per corrupt() call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-images", type=int, default=500, help="images the per-image loop is timed on")
    parser.add_argument("--only", nargs="*", help="corruption names (default: the 19 common ones)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(_common.THREADS)
    info = _common.machine()
    _common.print_header("Corruptions: lensforge batched vs per-image NumPy/SciPy/Pillow", info)

    names = args.only or list_corruptions("common")
    images = photo_like(args.images, args.size)
    subset = [np.ascontiguousarray(img.permute(1, 2, 0).numpy()) for img in images[:args.reference_images]]
    scale = args.images / len(subset)
    for name in names:  # warm-up: cached textures, operators and matrices, allocator
        corrupt(images[:64], name, 3)
        time_reference(subset[:2], name, 0)

    ours: dict[str, list[float]] = {n: [] for n in names}
    ref: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.repeats):
        for name in names:
            for side in ("ours", "ref") if rep % 2 == 0 else ("ref", "ours"):
                if side == "ours":
                    ours[name].append(time_lensforge(images, name, args.chunk, rep))
                else:
                    ref[name].append(time_reference(subset, name, rep) * scale)
        print(f"repetition {rep + 1}/{args.repeats} done (load {_common.load_average()})", flush=True)

    print(f"\n{args.images:,} images {args.size}x{args.size} RGB uint8, {len(names)} corruptions x 5 severities, "
          f"chunks of {args.chunk}; reference timed on {len(subset)} images and extrapolated x{scale:g}; "
          f"medians of {args.repeats}")
    print(f"{'corruption':18s} {'lensforge s':>12s} {'reference s':>12s} {'ratio':>8s}")
    rows = {}
    for name in names:
        mine, theirs = statistics.median(ours[name]), statistics.median(ref[name])
        rows[name] = {"lensforge_s": mine, "reference_s": theirs, "ratio": theirs / mine}
        print(f"{name:18s} {mine:12.2f} {theirs:12.1f} {theirs / mine:7.1f}x")
    total_ours = sum(r["lensforge_s"] for r in rows.values())
    total_ref = sum(r["reference_s"] for r in rows.values())
    print(f"{'total':18s} {total_ours:12.2f} {total_ref:12.1f} {total_ref / total_ours:7.1f}x")
    verdict = "meets" if total_ours <= AIM_TOTAL_S else "misses"
    print(f"lensforge: {total_ours:.1f} s for the workload ({verdict} the {AIM_TOTAL_S:.0f} s aim); "
          f"per-image loop: {total_ref:.0f} s (extrapolated); {total_ref / total_ours:.1f}x; "
          f"load average now {_common.load_average()}")
    _common.write_json(args.json, {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                                   "per_corruption": rows, "total_lensforge_s": total_ours,
                                   "total_reference_s": total_ref, "ratio": total_ref / total_ours})


if __name__ == "__main__":
    main()
