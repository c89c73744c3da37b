from __future__ import annotations

import json

import pytest

from lensforge.errors import UsageError
from lensforge.select import Budget, BudgetNotMet, Candidate, Option, _mark, explain_failure, parse_candidates, select


def _opt(name, accuracy, latency, size, status="accepted"):
    return Option("cand", name, f"/b/{name}", accuracy, latency, size, status, "")


def test_pick_is_most_accurate_that_fits_and_pareto_is_right():
    options = [_opt("big", 0.99, 5.0, 10.0), _opt("mid", 0.97, 1.0, 2.0), _opt("small", 0.95, 0.5, 0.5),
               _opt("bad", 0.98, 0.8, 1.0, status="rejected"), _opt("dominated", 0.94, 2.0, 3.0)]
    chosen = _mark(options, Budget(max_latency_ms=1.5, max_size_mb=3.0))
    assert chosen.variant == "mid"  # "bad" is more accurate and fits but failed its guard
    assert {o.variant for o in options if o.pareto} == {"big", "mid", "small"}  # "bad" failed its guard
    assert {o.variant for o in options if o.fits} == {"mid", "small"}


def test_failure_names_constraint_and_gap():
    options = [_opt("a", 0.9, 2.0, 1.0), _opt("b", 0.8, 4.0, 0.4)]
    assert _mark(options, Budget(max_latency_ms=1.0, max_size_mb=0.2)) is None
    message = explain_failure(options, Budget(max_latency_ms=1.0, max_size_mb=0.2))
    assert "latency" in message and "2 ms > 1 ms (2.00x over)" in message
    assert "size" in message and "0.4 MB > 0.2 MB (2.00x over)" in message


def test_parse_candidates():
    assert parse_candidates("tinycnn_s@16, resnet18") == [Candidate("tinycnn_s", 16), Candidate("resnet18", 0)]
    with pytest.raises(UsageError):
        parse_candidates("tinycnn_s@big")


def test_select_end_to_end_and_budget_not_met(tmp_path):
    candidates = [Candidate("tinycnn_xs", 8), Candidate("tinycnn_s", 8)]
    result = select("builtin:digits", Budget(max_latency_ms=1000, max_size_mb=100), out=tmp_path / "ok",
                    candidates=candidates, epochs=2)
    saved = json.loads((tmp_path / "ok" / "selection.json").read_text())
    assert len(saved["options"]) == 4 and saved["chosen"]["bundle"] == result.chosen.bundle
    assert result.chosen.accuracy == max(o.accuracy for o in result.options if o.fits)
    splits = [json.loads((tmp_path / "ok" / "candidates" / c.name / "splits.json").read_text())["test"]
              for c in candidates]
    assert splits[0] == splits[1]  # every candidate is judged on the same test images
    with pytest.raises(BudgetNotMet, match=r"latency: the fastest artifact .*x over"):
        select("builtin:digits", Budget(max_latency_ms=1e-6), out=tmp_path / "no", candidates=candidates[:1],
               epochs=1, allow_chance=True)  # one epoch is still at chance; this checks the budget message
    assert json.loads((tmp_path / "no" / "selection.json").read_text())["chosen"] is None
