from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from lensforge.errors import UsageError
from lensforge.train.detection.augment import DetectionAugment, augment_detection


def _uint8_batch(source):
    images = torch.from_numpy(source.arrays).permute(0, 3, 1, 2).contiguous()
    targets = [(torch.from_numpy(r.target.boxes), torch.from_numpy(r.target.labels)) for r in source.records]
    return images, targets


@pytest.mark.parametrize("policy", ["light", "strong"])
def test_boxes_stay_on_their_objects(make_rectangles, rectangle_colours, policy):
    """One solid rectangle per image: after augmentation the box still frames pixels of its class colour."""
    images, targets = _uint8_batch(make_rectangles(n=48, size=64, seed=3, max_objects=1))
    out, out_targets = augment_detection(images, targets, DetectionAugment(policy, (64, 64)).pipeline(),
                                         torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    checked, moved = 0, 0
    for image, (boxes, labels), (before, _) in zip(out, out_targets, targets):
        assert boxes.shape[1:] == (4,) and len(boxes) == len(labels)
        for box, label in zip(boxes, labels):
            x0, y0, x1, y1 = box.round().int().tolist()
            inner = image[:, y0 + 1:y1 - 1, x0 + 1:x1 - 1].float()  # one pixel in: resampling blurs the edges
            if inner.shape[1] < 2 or inner.shape[2] < 2:
                continue
            mean = inner.mean((1, 2))
            assert int(mean.argmax()) == int(np.argmax(rectangle_colours[label])), (policy, box.tolist())
            # the frame is tight: the ring just outside the box is not all object colour
            assert mean.max() - mean.min() > 60
            checked += 1
            moved += not torch.allclose(box, before[0], atol=0.5) if len(before) else 0
    assert checked >= 30 and moved >= 10


def test_same_generator_same_batch_and_global_rng_untouched(make_rectangles):
    images, targets = _uint8_batch(make_rectangles(n=8, size=64))
    pipeline = DetectionAugment("light", (64, 64)).pipeline()
    before = torch.get_rng_state()
    a, a_targets = augment_detection(images, targets, pipeline, torch.Generator().manual_seed(7))
    b, b_targets = augment_detection(images, targets, pipeline, torch.Generator().manual_seed(7))
    c, _ = augment_detection(images, targets, pipeline, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and all(torch.equal(x[0], y[0]) for x, y in zip(a_targets, b_targets))
    assert not torch.equal(a, c)
    assert torch.equal(torch.get_rng_state(), before)


def test_flips_off_when_they_change_meaning_and_unknown_policies_refused():
    kinds = {type(t) for t in DetectionAugment("light", (64, 64), hflip=False).pipeline().transforms}
    assert v2.RandomHorizontalFlip not in kinds
    assert v2.RandomHorizontalFlip in {type(t) for t in DetectionAugment("light", (64, 64)).pipeline().transforms}
    assert DetectionAugment("none", (64, 64)).pipeline() is None
    with pytest.raises(UsageError, match="detection supports none, light, strong"):
        DetectionAugment("augmix", (64, 64))


def test_grey_images_augment(make_rectangles):
    images, targets = _uint8_batch(make_rectangles(n=4, size=64))
    grey = images[:, :1].contiguous()
    out, _ = augment_detection(grey, targets, DetectionAugment("strong", (64, 64), channels=1).pipeline(),
                               torch.Generator().manual_seed(0))
    assert out.shape == grey.shape
