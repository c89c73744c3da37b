"""The corruption suite: contract (dtype, shape, determinism, monotone severities) for every
registered corruption, published magnitudes for the ones that have them, and bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lensforge.errors import UsageError
from lensforge.ops.corruptions import (
    CORRUPTIONS,
    FAMILIES,
    SEVERITIES,
    SUITES,
    corrupt,
    frost_textures,
    list_corruptions,
    suite_plan,
)
from lensforge.ops.corruptions.digital import CONTRAST_FACTOR, jpeg_round_trip, pixelate_sizes
from lensforge.ops.corruptions.noise import GAUSSIAN_STD, IMPULSE_AMOUNT, SHOT_PHOTONS
from lensforge.ops.corruptions.occlusion import OCCLUDED_SHARE
from lensforge.ops.corruptions.weather import BRIGHTNESS_SHIFT

NAMES = list_corruptions("full")
IMAGENET_C = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
              "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
              "jpeg_compression"]
EXTRA = ["speckle_noise", "gaussian_blur", "spatter", "saturate"]


def natural_batch(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Float images like photos at low resolution: smooth gradients, a disc, a rectangle, mild texture.

    Drawn at 4x and area-downsampled, so small sizes are thumbnails, not aliased patterns.
    """
    g = torch.Generator().manual_seed(seed)
    big = 4 * size
    ys = torch.linspace(0, 1, big).view(1, 1, big, 1)
    xs = torch.linspace(0, 1, big).view(1, 1, 1, big)

    def draw(*shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=g)

    image = 0.25 + 0.3 * draw(n, channels, 1, 1) + 0.3 * (draw(n, channels, 1, 1) - 0.5) * (xs - ys)
    disc = ((xs - draw(n, 1, 1, 1)) ** 2 + (ys - draw(n, 1, 1, 1)) ** 2) < (0.15 + 0.2 * draw(n, 1, 1, 1)) ** 2
    image = torch.where(disc, 0.15 + 0.7 * draw(n, channels, 1, 1), image)
    left, top = 0.6 * draw(n, 1, 1, 1), 0.6 * draw(n, 1, 1, 1)
    box = (xs > left) & (xs < left + 0.3) & (ys > top) & (ys < top + 0.25)
    image = torch.where(box, 0.15 + 0.7 * draw(n, channels, 1, 1), image)
    image = image + 0.05 * torch.sin(12 * xs + 10 * draw(n, 1, 1, 1)) * torch.cos(9 * ys)
    return F.avg_pool2d(image, 4).clamp(0, 1)


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return natural_batch(12, 3, 32)


def mean_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean())


# ---------------------------------------------------------------------------- registry and suites


def test_registry_holds_the_published_sets_and_the_extra_families():
    assert len(NAMES) == 28
    assert list_corruptions("imagenet-c") == IMAGENET_C  # the paper's order
    assert list_corruptions("extra") == EXTRA
    assert list_corruptions("common") == [n for n in NAMES if n in IMAGENET_C + EXTRA] and len(
        list_corruptions("common")) == 19
    assert list_corruptions("viewpoint") == ["rotation", "scale", "translation", "perspective"]
    assert list_corruptions("lighting") == ["low_light", "gamma", "color_temperature", "shadow"]
    assert list_corruptions("occlusion") == ["occlusion"]
    assert sorted(n for f in FAMILIES for n in list_corruptions(f)) == sorted(NAMES)
    for name in NAMES:
        entry = CORRUPTIONS.get(name)
        assert entry.name == name and entry.family in FAMILIES
        assert entry.imagenet_c == (name in IMAGENET_C) and entry.extra == (name in EXTRA)
    with pytest.raises(UsageError, match="unknown corruption set"):
        list_corruptions("weird")


def test_suites_cover_every_corruption_or_a_quick_sample_of_each_family():
    assert SUITES["full"] == [(n, s) for n in NAMES for s in SEVERITIES] and len(SUITES["full"]) == 140
    quick = suite_plan("quick")
    assert 20 <= len(quick) <= 30 and {s for _, s in quick} == {1, 3, 5}
    assert {CORRUPTIONS.get(n).family for n, _ in quick} == set(FAMILIES)
    assert suite_plan("quick") is not SUITES["quick"]  # a copy: callers may edit it
    with pytest.raises(UsageError, match="unknown corruption suite 'quik'"):
        suite_plan("quik")


# ---------------------------------------------------------------------------- contract, per registered corruption


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [8, 32])
def test_keeps_dtype_shape_and_range(name, size):
    for channels in (1, 3):
        clean = natural_batch(2, channels, size)
        for images in (clean, (clean * 255).round().to(torch.uint8), clean.double()):
            out = corrupt(images, name, 3, seed=1)
            assert out.dtype == images.dtype and out.shape == images.shape
            if images.is_floating_point():
                assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_per_seed(name):
    images = natural_batch(8, 3, 16, seed=2)  # 8 images: binary draws (signs) differ somewhere
    first = corrupt(images, name, 4, seed=7)
    assert torch.equal(first, corrupt(images.clone(), name, 4, seed=7))
    other = corrupt(images, name, 4, seed=8)
    assert torch.equal(first, other) != CORRUPTIONS.get(name).stochastic  # the flag tells the truth


def changed_share(images: torch.Tensor, name: str, severity: int) -> float:
    """Share of uint8 values that severity moves by at least one grey level."""
    as_uint8 = (images * 255).round().to(torch.uint8)
    return float((corrupt(as_uint8, name, severity) != as_uint8).float().mean())


@pytest.mark.parametrize("name", NAMES)
def test_severities_grow_and_severity_one_already_changes_pixels(name, photos):
    changes = [mean_change(corrupt(photos, name, s), photos) for s in SEVERITIES]
    assert all(later > earlier for earlier, later in zip(changes, changes[1:])), (name, changes)
    assert changed_share(photos, name, 1) > 0.005, f"{name}: severity 1 leaves the images unchanged"


@pytest.mark.parametrize("name", NAMES)
def test_grey_images(name):
    # the same scenes as `photos`: mean change of colour-replacing corruptions (spatter's dark mud
    # vs its bright water) depends on scene brightness; see the spatter parameters
    grey = natural_batch(12, 1, 32)
    changes = [mean_change(corrupt(grey, name, s), grey) for s in SEVERITIES]
    if CORRUPTIONS.get(name).color_only:
        assert changes == [0.0] * 5  # documented: a grey image has no colour to shift
    else:
        assert all(later > earlier for earlier, later in zip(changes, changes[1:])), (name, changes)
        assert changed_share(grey, name, 1) > 0.005


def test_works_at_the_minimum_size_and_on_non_square_images():
    for name in NAMES:
        out = corrupt(natural_batch(2, 3, 8)[..., :8, :8].repeat(1, 1, 1, 2), name, 5)  # 8 x 16
        assert out.shape == (2, 3, 8, 16)


def test_big_batches_are_corrupted_block_by_block(monkeypatch):
    from lensforge.ops.corruptions import registry

    images = (natural_batch(10, 3, 16) * 255).round().to(torch.uint8)
    whole = {name: corrupt(images, name, 3) for name in ("contrast", "gaussian_noise")}
    monkeypatch.setattr(registry, "BLOCK_VALUES", 4 * 3 * 16 * 16)  # 4 images per block: 3 blocks
    assert torch.equal(corrupt(images, "contrast", 3), whole["contrast"])  # per-image maths: blocks invisible
    noisy = corrupt(images, "gaussian_noise", 3)
    assert torch.equal(noisy, corrupt(images, "gaussian_noise", 3))  # still deterministic
    noise = noisy.int() - images.int()
    assert not torch.equal(noise[4:8], noise[:4])  # each block draws fresh noise, not the first block's again
    assert mean_change(noisy, images) == pytest.approx(mean_change(whole["gaussian_noise"], images), rel=0.1)


def test_empty_batch_passes_through():
    empty = torch.zeros(0, 3, 16, 16, dtype=torch.uint8)
    assert corrupt(empty, "fog", 2).shape == (0, 3, 16, 16)


# ---------------------------------------------------------------------------- published magnitudes


@pytest.mark.parametrize("size, published", [(32, (0.04, 0.06, 0.08, 0.09, 0.10)),
                                             (224, (0.08, 0.12, 0.18, 0.26, 0.38))])
def test_gaussian_noise_has_the_published_std(size, published):
    grey = torch.full((2, 3, size, size), 0.5)
    for severity in SEVERITIES:
        std = float((corrupt(grey, "gaussian_noise", severity) - grey).std())
        assert GAUSSIAN_STD.at(severity, size) == pytest.approx(published[severity - 1])
        if published[severity - 1] <= 0.12:  # beyond, clipping at 0 and 1 shrinks it
            assert std == pytest.approx(published[severity - 1], rel=0.03)


def test_shot_noise_is_poisson():
    grey = torch.full((4, 3, 32, 32), 0.3)
    for severity in SEVERITIES:
        photons = SHOT_PHOTONS.at(severity, 32)
        out = corrupt(grey, "shot_noise", severity)
        assert float(out.mean()) == pytest.approx(0.3, abs=0.01)
        assert float(out.var()) == pytest.approx(0.3 / photons, rel=0.1)  # variance = mean for counts


def test_impulse_noise_sets_the_published_share_of_values_to_black_or_white():
    grey = torch.full((4, 3, 32, 32), 0.5)
    out = corrupt(grey, "impulse_noise", 5)
    assert float((out != 0.5).float().mean()) == pytest.approx(IMPULSE_AMOUNT.at(5, 32), abs=0.01)
    assert float((out == 0).float().mean()) == pytest.approx(float((out == 1).float().mean()), abs=0.01)


def test_brightness_raises_hsv_value_by_the_published_shift():
    dim = natural_batch(6, 3, 32) * 0.6  # V below 0.6: no clipping even at +0.3
    for severity in SEVERITIES:
        out = corrupt(dim, "brightness", severity)
        lift = float(out.amax(1).mean() - dim.amax(1).mean())
        assert lift == pytest.approx(BRIGHTNESS_SHIFT.at(severity, 32), abs=1e-4)
        hue_kept = out / out.amax(1, keepdim=True) - dim / dim.amax(1, keepdim=True)
        assert float(hue_kept.abs().max()) < 1e-4  # channel ratios (hue, saturation) unchanged


def test_contrast_shrinks_each_channel_std_by_the_published_factor(photos):
    for severity in SEVERITIES:
        out = corrupt(photos, "contrast", severity)
        ratio = out.std((2, 3)) / photos.std((2, 3))
        assert torch.allclose(ratio, torch.full_like(ratio, CONTRAST_FACTOR.at(severity, 32)), atol=1e-4)
        assert torch.allclose(out.mean((2, 3)), photos.mean((2, 3)), atol=1e-5)
    assert [CONTRAST_FACTOR.at(s, 32) for s in SEVERITIES] == [0.75, 0.5, 0.4, 0.3, 0.15]  # CIFAR-10-C


def test_occlusion_covers_the_stated_share_of_the_image():
    plain = torch.full((16, 3, 32, 32), 0.123)
    for severity in SEVERITIES:
        covered = (corrupt(plain, "occlusion", severity) != 0.123).any(1).float().mean((1, 2))
        assert torch.allclose(covered, torch.full_like(covered, OCCLUDED_SHARE[severity - 1]), atol=0.02), covered


def test_pixelate_yields_constant_blocks_like_pillow_box_resizing(photos):
    as_uint8 = (photos[:2] * 255).round().to(torch.uint8)
    for severity in SEVERITIES:
        low = pixelate_sizes(32, 32)[severity - 1]
        out = corrupt(as_uint8, "pixelate", severity)
        # low distinct columns / rows, each repeated: blocks
        column_steps = (out[..., 1:] != out[..., :-1]).any(2).any(1).sum(-1)
        row_steps = (out[..., 1:, :] != out[..., :-1, :]).any(3).any(1).sum(-1)
        assert (column_steps <= low - 1).all() and (row_steps <= low - 1).all()
        pil = np.asarray(Image.fromarray(as_uint8[0].permute(1, 2, 0).numpy()).resize((low, low), Image.BOX)
                         .resize((32, 32), Image.BOX))
        assert np.abs(out[0].permute(1, 2, 0).numpy().astype(int) - pil).max() <= 1  # Pillow rounds between
    assert pixelate_sizes(8, 8) == [7, 6, 5, 4, 3]  # strictly smaller at every severity, even at 8 px


def pillow_jpeg(image: torch.Tensor, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).squeeze(-1).numpy()).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(buffer)).astype(float).reshape(image.shape[1], image.shape[2], -1)


@pytest.mark.parametrize("quality", [80, 40, 10])
@pytest.mark.parametrize("channels", [3, 1])
def test_jpeg_matches_pillow_and_is_near_idempotent(quality, channels):
    images = (natural_batch(3, channels, 40, seed=4) * 255).round().to(torch.uint8)  # 40 px: partial blocks
    ours = (jpeg_round_trip(images.float() / 255, quality) * 255).round()
    for i in range(3):
        reference = pillow_jpeg(images[i], quality)
        assert np.abs(ours[i].permute(1, 2, 0).numpy() - reference).mean() < 1.0  # grey levels
    first_error = mean_change(ours, images)
    second = (jpeg_round_trip(ours / 255, quality) * 255).round()
    assert mean_change(second, ours) < 0.35 * first_error  # re-encoding changes far less than encoding


def test_frost_textures_are_deterministic_bright_ice():
    textures = frost_textures(32, 32)
    assert textures.shape == (5, 3, 48, 48)
    frost_textures.cache_clear()
    assert torch.equal(frost_textures(32, 32), textures)  # regenerated, not just cached
    assert 0.35 < float(textures.mean()) < 0.8 and float(textures.min()) >= 0 and float(textures.max()) <= 1
    assert (textures[:, 2].mean() > textures[:, 0].mean())  # tinted blue
    assert float((textures[0] - textures[1]).abs().mean()) > 0.02  # five different textures


def test_translation_moves_content_by_the_stated_share():
    dot = torch.zeros(8, 1, 32, 32)
    dot[..., 14:18, 14:18] = 1.0
    coords = torch.arange(32.0)
    for severity in (1, 3, 5):
        out = corrupt(dot, "translation", severity)[:, 0]
        mass = out.sum((1, 2))
        cy = (out.sum(2) * coords).sum(1) / mass
        cx = (out.sum(1) * coords).sum(1) / mass
        moved = torch.hypot(cx - 15.5, cy - 15.5)
        assert torch.allclose(moved, torch.full_like(moved, (0.04, 0.08, 0.12, 0.16, 0.2)[severity - 1] * 32),
                              atol=0.1), moved


def test_lighting_darkens_or_tints_as_named(photos):
    for severity in SEVERITIES:
        assert float(corrupt(photos, "low_light", severity).mean()) < float(photos.mean()) - 0.05
        assert (corrupt(photos, "shadow", severity) <= photos + 1e-6).all()  # shadows never brighten
    shifted = corrupt(photos, "color_temperature", 5)
    red_blue = shifted[:, 0].mean((1, 2)) / shifted[:, 2].mean((1, 2)) - photos[:, 0].mean((1, 2)) / photos[:, 2].mean(
        (1, 2))
    assert (red_blue.abs() > 0.1).all() and (red_blue > 0).any() and (red_blue < 0).any()  # warmer and cooler


# ---------------------------------------------------------------------------- bad input


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UsageError, match="did you mean gaussian_noise"):
        corrupt(torch.zeros(1, 3, 8, 8), "gausian_noise", 1)


@pytest.mark.parametrize("severity", [0, 6, -1, True, 2.0, "3"])
def test_severity_outside_one_to_five(severity):
    with pytest.raises(UsageError, match="severity must be an integer from 1 to 5"):
        corrupt(torch.zeros(1, 3, 8, 8), "fog", severity)


@pytest.mark.parametrize("images, message", [
    (torch.zeros(1, 3, 7, 7), "at least 8x8"),
    (torch.zeros(1, 3, 8, 7), "at least 8x8"),
    (torch.zeros(1, 2, 8, 8), "1 \\(grey\\) or 3 \\(RGB\\) channels, got 2"),
    (torch.zeros(1, 8, 8, 3), "1 \\(grey\\) or 3 \\(RGB\\) channels, got 8"),
    (torch.zeros(3, 8, 8), "shape \\(N, C, H, W\\)"),
    (torch.zeros(1, 3, 8, 8, dtype=torch.int32), "uint8 or float"),
    (torch.full((1, 3, 8, 8), 2.0), "must lie in \\[0, 1\\]"),
    (np.zeros((1, 3, 8, 8), dtype=np.uint8), "torch.Tensor"),
])
def test_bad_images(images, message):
    with pytest.raises(UsageError, match=message):
        corrupt(images, "contrast", 1)
