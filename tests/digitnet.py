"""A one-hidden-layer digits model with timm's interface, and its exported bundle (shared by tests).

It fits 8x8 digits in about a second, so OOD, drift and serving tests get a real trained
bundle without paying for a lensforge training run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lensforge.data.preprocess import Preprocess

PRE = Preprocess(input_size=(8, 8), channels=1, mean=(0.5,), std=(0.5,))
FEATURES = 48


class DigitNet(nn.Module):
    """Flatten -> Linear(64, 48) -> ReLU -> Linear(48, 10), with forward_features/forward_head/get_classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, FEATURES), nn.ReLU())
        self.fc = nn.Linear(FEATURES, 10)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def digitnet_bundle(digits, path: Path, *, steps: int = 200) -> Path:
    """Train a DigitNet on the training split (the split fit_guardrails makes with seed 0) and export it."""
    from lensforge.data.splits import make_splits
    from lensforge.deploy.export import write_bundle
    from lensforge.models.normalize import Normalize

    torch.manual_seed(0)
    train = make_splits(digits, seed=0).train
    x = Normalize(PRE.mean, PRE.std)(torch.from_numpy(digits.images[train]))
    y = torch.from_numpy(digits.targets[train]).long()
    model = DigitNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return write_bundle(model.eval(), PRE, digits.class_names, path, model_name="digitnet",
                        sample_images=digits.images[:16])
