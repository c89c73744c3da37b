"""Deployment trade-offs: the budget, one measured artifact, the Pareto front, why nothing fits.

Shared by :mod:`lensforge.select` (which measures the artifacts) and the report (which
explains a selection from ``selection.json``); torch-free and below both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from lensforge.defaults import MAX_DROP_POINTS


class Budget(BaseModel):
    """Deployment limits, measured on this machine at batch 1."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_latency_ms: float | None = Field(None, gt=0)  # p50 latency of one image, ONNX Runtime
    max_size_mb: float | None = Field(None, gt=0)  # model.onnx on disk
    max_drop: float = Field(MAX_DROP_POINTS, ge=0, le=100)  # points a compressed variant may lose vs its parent


@dataclass
class Option:
    """One measured artifact: a candidate's baseline or one of its variants."""

    candidate: str
    variant: str
    bundle: str
    accuracy: float
    latency_ms: float
    size_mb: float
    status: str
    reason: str
    fits: bool = False
    pareto: bool = False


def pareto_mask(accuracy: list[float | None], latency_ms: list[float | None], size_mb: list[float | None],
                accepted: list[bool] | None = None) -> list[bool]:
    """True where no other accepted point is at least as good on all three and better on one.

    A point that failed its guard is never on the front (it is not a real trade-off);
    a missing number counts as the worst.
    """
    accepted = accepted if accepted is not None else [True] * len(accuracy)
    points = [(-math.inf if a is None else a, math.inf if t is None else t, math.inf if s is None else s)
              for a, t, s in zip(accuracy, latency_ms, size_mb)]
    rivals = [p for p, ok in zip(points, accepted) if ok]
    return [ok and not any(a2 >= a and t2 <= t and s2 <= s and (a2, t2, s2) != (a, t, s) for a2, t2, s2 in rivals)
            for (a, t, s), ok in zip(points, accepted)]


def explain_failure(options: list[Option], budget: Budget) -> str:
    """Which constraint failed and by how much, for the closest artifacts."""
    accepted = [o for o in options if o.status == "accepted"] or options
    parts = []
    if budget.max_latency_ms is not None:
        fastest = min(accepted, key=lambda o: o.latency_ms)
        if fastest.latency_ms > budget.max_latency_ms:
            parts.append(f"latency: the fastest artifact ({fastest.candidate}/{fastest.variant}) takes "
                         f"{fastest.latency_ms:.3g} ms > {budget.max_latency_ms:g} ms "
                         f"({fastest.latency_ms / budget.max_latency_ms:.2f}x over)")
    if budget.max_size_mb is not None:
        smallest = min(accepted, key=lambda o: o.size_mb)
        if smallest.size_mb > budget.max_size_mb:
            parts.append(f"size: the smallest artifact ({smallest.candidate}/{smallest.variant}) is "
                         f"{smallest.size_mb:.3g} MB > {budget.max_size_mb:g} MB "
                         f"({smallest.size_mb / budget.max_size_mb:.2f}x over)")
    return "; ".join(parts) or "each artifact meets one limit but none meets all of them together"


__all__ = ["Budget", "Option", "explain_failure", "pareto_mask"]
