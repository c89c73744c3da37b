"""Image classification: the torch half (training entry point, model builder, export module)."""

from __future__ import annotations

from typing import Any


class ClassificationTorch:
    def train(self, cfg: Any, **kwargs: Any) -> Any:
        from lensforge.train.trainer import train_classifier

        return train_classifier(cfg, **kwargs)

    def build_model(self, name: str, num_classes: int, in_chans: int = 3, pretrained: str | None = None) -> Any:
        from lensforge.models.registry import create_model

        return create_model(name, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained)

    def evaluate(self, artifact: Any, data: str | None = None, **kwargs: Any) -> Any:
        from lensforge.evaluate.runner import evaluate_classifier

        return evaluate_classifier(artifact, data, **kwargs)

    def stress(self, artifact: Any, data: str | None = None, **kwargs: Any) -> Any:
        from lensforge.stress.suite import stress_classifier

        return stress_classifier(artifact, data, **kwargs)

    def export_module(self, model: Any, info: dict[str, Any] | None = None) -> Any:
        """``(logits, penultimate features)`` from a timm-style classifier."""
        from lensforge.deploy.export import LogitsAndFeatures

        return LogitsAndFeatures(model)


TASK = ClassificationTorch()
