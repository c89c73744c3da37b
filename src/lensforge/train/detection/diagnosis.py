"""A simplified fit diagnosis for detection runs, from the epoch rows.

Classification's :func:`lensforge.train.diagnosis.diagnose_fit` reasons about accuracy against
chance level; mAP has no chance level, so detection gets three plain rules on the validation
mAP and losses: still improving at the end, overfitting (the best epoch long past while the
training loss keeps falling), and underfitting (mAP@0.5 stays low).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lensforge.train.diagnosis import FitDiagnosis

LOW_MAP50 = 0.3  # a best val mAP@0.5 below this is called underfitting
STILL_RISING = 0.01  # val mAP gained over the last two epochs above which training is still improving
STALE_EPOCHS = 3  # epochs after the best one, with the train loss still falling, that call it overfitting


def diagnose_detection_fit(history: Sequence[Mapping[str, Any]]) -> list[FitDiagnosis]:
    """Findings about a detection run's curves (keys ``train_loss``, ``val_map``, ``val_map50``)."""
    if not history:
        return []
    maps = [float(row.get("val_map") or 0.0) for row in history]
    best = max(range(len(maps)), key=maps.__getitem__)
    best_map50 = max(float(row.get("val_map50") or 0.0) for row in history)
    findings = []
    if best_map50 < LOW_MAP50:
        findings.append(FitDiagnosis("underfitting", f"best val mAP@0.5 is {best_map50:.3f}",
                                     ("train for more epochs", "raise --image-size if objects are small",
                                      "check that the boxes line up with the objects")))
    if len(maps) >= 3 and maps[-1] - maps[-3] > STILL_RISING and best == len(maps) - 1:
        findings.append(FitDiagnosis("still_improving", f"val mAP rose {maps[-3]:.3f} -> {maps[-1]:.3f} over the "
                                     "last two epochs", ("train for more epochs",)))
    stale = len(maps) - 1 - best
    if stale >= STALE_EPOCHS and history[-1]["train_loss"] < history[best]["train_loss"]:
        findings.append(FitDiagnosis("overfitting", f"val mAP peaked at epoch {best + 1} ({maps[best]:.3f}) while "
                                     "the training loss kept falling", ("use --augment strong", "get more data")))
    return findings or [FitDiagnosis("healthy", f"val mAP {maps[best]:.3f} at epoch {best + 1} of {len(maps)}")]
