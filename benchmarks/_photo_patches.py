"""A real-photo ImageFolder for the pretrained-backbone benchmarks, cut from photos that ship offline.

No real photo folder of ~1,500 small images ships with lensforge or can be downloaded here, so
this cuts one from the colour photos bundled inside the scikit-image wheel (astronaut,
chelsea, coffee, rocket) and scikit-learn (china.jpg, flower.jpg): the class of a patch is
the photo it comes from. Patches are squares of random side (``SCALE`` x the photo's short
side, clipped to the region) at random positions, randomly mirrored, resized to ``--size`` px.
Training patches come from the left ``TRAIN_WIDTH`` of each photo; validation patches from
the top half of the rest and test patches from its bottom half. No validation or test pixel
was seen in training, so the model must recognise *other parts* of a scene (sky, fur, wood,
cloth) from the parts it saw; and validation is not a set of near-copies of training crops
(it would read 100% from the first epoch and could not pick an epoch). It is a proxy for a
real photo folder (real camera pixels, textures and colours, but six scenes rather than
thousands of photos), not one.

    python benchmarks/_photo_patches.py OUT [--n 1524] [--size 96] [--seed 0]

Needs ``pip install scikit-image`` (its sample photos are inside the wheel: nothing is fetched).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

SCALE = (0.15, 0.5)  # patch side as a fraction of the photo's short side (before clipping to the region)
TRAIN_WIDTH = 0.6  # training patches from the left 60% of each photo; val (top) and test (bottom) from the rest
VAL_FRACTION = 0.15
TEST_FRACTION = 0.2


def photos() -> dict[str, np.ndarray]:
    """The offline colour photos, RGB uint8, by name."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    found = {name: getattr(skimage.data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}
    sample = load_sample_images()
    for path, image in zip(sample.filenames, sample.images):
        found[Path(path).stem] = image
    return {name: image[..., :3] for name, image in sorted(found.items())}


def cut_patch(image: np.ndarray, box: tuple[int, int, int, int], size: int,
              rng: np.random.Generator) -> Image.Image:
    """A random square inside ``box`` = (left, top, right, bottom) of ``image``, resized to ``size`` px."""
    left, top, right, bottom = box
    side = int(rng.uniform(*SCALE) * min(image.shape[:2]))
    side = max(16, min(side, right - left, bottom - top))
    x = int(rng.integers(left, right - side + 1))
    y = int(rng.integers(top, bottom - side + 1))
    patch = Image.fromarray(np.ascontiguousarray(image[y:y + side, x:x + side]))
    if rng.random() < 0.5:
        patch = patch.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return patch.resize((size, size), Image.Resampling.BICUBIC)


def make_photo_patches(out: str | Path, *, n: int = 1524, size: int = 96, seed: int = 0) -> Path:
    """Write ``out/{train,val,test}/<photo>/*.png`` (``n`` patches in all) and return ``out``."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    images = photos()
    per_class = n // len(images)
    n_val, n_test = int(round(per_class * VAL_FRACTION)), int(round(per_class * TEST_FRACTION))
    for name, image in images.items():
        height, width = image.shape[:2]
        cut = int(width * TRAIN_WIDTH)
        regions = {"train": (per_class - n_val - n_test, (0, 0, cut, height)),
                   "val": (n_val, (cut, 0, width, height // 2)),
                   "test": (n_test, (cut, height // 2, width, height))}
        for split, (count, box) in regions.items():
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                cut_patch(image, box, size, rng).save(folder / f"{i:04d}.png")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=1524, help="patches in all (train + val + test)")
    parser.add_argument("--size", type=int, default=96, help="patch side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = make_photo_patches(args.out, n=args.n, size=args.size, seed=args.seed)
    counts = {split: sum(1 for _ in (out / split).rglob("*.png")) for split in ("train", "val", "test")}
    print(f"{out}: {counts['train']} train + {counts['val']} val + {counts['test']} test patches of {args.size} px")


if __name__ == "__main__":
    main()
