"""The LR range test: a real curve on real batches, a suggestion inside it, the plot, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import run

from lensforge.errors import UsageError
from lensforge.train import resolve_config
from lensforge.train.lr_find import lr_find, suggest


def test_range_test_on_digits_suggests_a_rate_where_the_loss_falls(tmp_path):
    cfg = resolve_config(None, data="builtin:digits", model="tinycnn_xs", image_size=8, batch_size=64)
    result = lr_find(cfg, steps=40, min_lr=1e-5, max_lr=1.0, out=tmp_path)
    lrs = np.asarray(result.lrs)
    assert len(lrs) >= 10 and np.all(np.diff(lrs) > 0) and lrs[0] == pytest.approx(1e-5)
    assert result.losses[int(np.argmin(result.losses))] < result.losses[0]  # it learned along the way
    assert lrs[0] <= result.suggested_lr <= result.min_loss_lr
    saved = json.loads((tmp_path / "lr_find.json").read_text())
    assert saved["suggested_lr"] == result.suggested_lr
    assert (tmp_path / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = list(np.logspace(-5, 0, 50))
    losses = [2.0 - 1.5 / (1 + np.exp(-(np.log10(lr) + 3) * 3)) for lr in lrs[:40]] + [3.0] * 10
    suggested, at_min = suggest(lrs, losses)
    assert suggested == pytest.approx(1e-3, rel=0.3)  # the sigmoid's steepest point
    assert at_min == pytest.approx(lrs[39])


@pytest.mark.parametrize("kw, words", [({"min_lr": 1.0, "max_lr": 0.1}, "--min-lr"), ({"steps": 3}, "steps")])
def test_bad_ranges_are_refused(kw, words):
    with pytest.raises(UsageError, match=words):
        lr_find(resolve_config(None, data="builtin:digits"), **kw)


def test_cli_lr_find_writes_the_plot(tmp_path):
    result = run("lr-find", "--data", "builtin:digits", "--model", "tinycnn_xs", "--steps", "20",
                 "--out", str(tmp_path / "lr"))
    assert result.returncode == 0, result.stderr
    assert "suggested peak learning rate" in result.stdout and (tmp_path / "lr" / "lr_find.png").exists()
