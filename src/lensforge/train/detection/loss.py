"""The FCOS loss: focal loss on classes, GIoU on positives' boxes, BCE on centre-ness.

* classes: sigmoid focal loss over every point and class (Lin et al. 2017, alpha 0.25,
  gamma 2), summed and divided by the number of positives, so the ~1,000 easy background
  points of an image do not drown its few objects;
* boxes: generalized IoU loss (Rezatofighi et al. 2019) of the predicted vs target
  distances, on positives only, weighted by the centre-ness target so that points near a
  box's edge, which see little of the object, pull less (FCOS TPAMI);
* centre-ness: binary cross-entropy with logits against the centre-ness target, on positives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from lensforge.train.detection.assign import Assignment

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0  # RetinaNet's values, which FCOS keeps
BOX_WEIGHT = 1.0  # of the GIoU term against the focal term (FCOS: 1)


def _around_origin(ltrb: torch.Tensor) -> torch.Tensor:
    """Distances (l, t, r, b) -> the xyxy box they describe around a point at the origin."""
    return torch.stack([-ltrb[..., 0], -ltrb[..., 1], ltrb[..., 2], ltrb[..., 3]], -1)


def detection_loss(cls_logits: torch.Tensor, box_ltrb: torch.Tensor, centerness: torch.Tensor,
                   targets: Assignment) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of a batch's raw outputs against its FCOS targets, and its parts (floats, for the log)."""
    cls_logits, box_ltrb, centerness = cls_logits.float(), box_ltrb.float(), centerness.float()
    positive = targets.positive
    num_pos = positive.sum().clamp(min=1).float()
    one_hot = torch.zeros_like(cls_logits)
    one_hot[positive, targets.labels[positive]] = 1.0
    loss_cls = sigmoid_focal_loss(cls_logits, one_hot, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA,
                                  reduction="sum") / num_pos
    if positive.any():
        weight = targets.centerness[positive]
        giou = generalized_box_iou_loss(_around_origin(box_ltrb[positive]),
                                        _around_origin(targets.box_ltrb[positive]), reduction="none")
        loss_box = (giou * weight).sum() / weight.sum().clamp(min=1e-6)
        loss_ctr = F.binary_cross_entropy_with_logits(centerness[positive], weight, reduction="sum") / num_pos
    else:  # no objects in the batch: zero, but still part of the graph
        loss_box, loss_ctr = box_ltrb.sum() * 0.0, centerness.sum() * 0.0
    total = loss_cls + BOX_WEIGHT * loss_box + loss_ctr
    parts = {"loss_cls": float(loss_cls.detach()), "loss_box": float(loss_box.detach()),
             "loss_ctr": float(loss_ctr.detach())}
    return total, parts
