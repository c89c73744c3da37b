"""Image classification: the torch half (training entry point)."""

from __future__ import annotations

from typing import Any


class ClassificationTorch:
    def train(self, cfg: Any, **kwargs: Any) -> Any:
        from lensforge.train.trainer import train_classifier

        return train_classifier(cfg, **kwargs)


TASK = ClassificationTorch()
