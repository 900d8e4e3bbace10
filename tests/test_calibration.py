"""Calibration arithmetic against hand computations (no model)."""

from __future__ import annotations

import math

import pytest

from dlngraph.runtime import calibration


def test_estimate_is_the_mean_log_prob_per_label() -> None:
    d1 = {"a": math.log(0.9), "b": math.log(0.1)}
    d2 = {"a": math.log(0.5), "b": math.log(0.5)}
    bias = calibration.estimate([d1, d2])
    assert bias["a"] == pytest.approx((math.log(0.9) + math.log(0.5)) / 2)
    assert bias["b"] == pytest.approx((math.log(0.1) + math.log(0.5)) / 2)
    assert calibration.estimate([]) == {}


def test_apply_divides_the_prior_out_and_renormalizes() -> None:
    # prior 0.8 / 0.2; an input scored 0.6 / 0.4 is, relative to the prior, evidence for b:
    # 0.6/0.8 = 0.75, 0.4/0.2 = 2.0 -> normalized 0.75/2.75, 2/2.75
    bias = {"a": math.log(0.8), "b": math.log(0.2)}
    out = calibration.apply({"a": math.log(0.6), "b": math.log(0.4)}, bias)
    assert math.exp(out["a"]) == pytest.approx(0.75 / 2.75)
    assert math.exp(out["b"]) == pytest.approx(2.0 / 2.75)
    assert max(out, key=out.__getitem__) == "b"


def test_apply_flips_a_constant_prediction_into_a_balanced_one() -> None:
    # The model says "a" for everything; batch calibration on the same inputs
    # makes the less "a"-leaning half come out "b".
    batch = [{"a": math.log(p), "b": math.log(1 - p)} for p in (0.95, 0.9, 0.7, 0.6)]
    bias = calibration.estimate(batch)
    predictions = [max(d, key=d.__getitem__) for d in calibration.apply_all(batch, bias)]
    assert predictions == ["a", "a", "b", "b"]


def test_no_bias_and_infinite_priors_leave_scores_alone() -> None:
    d = {"a": math.log(0.3), "b": math.log(0.7)}
    assert calibration.apply(d, {}) == d
    out = calibration.apply(d, {"a": -math.inf, "b": math.log(0.7)})
    assert sum(math.exp(v) for v in out.values()) == pytest.approx(1.0)


def test_content_free_rows_cover_every_field() -> None:
    rows = calibration.content_free_rows(["input", "context"])
    assert rows == [
        {"context": "N/A", "input": "N/A"},
        {"context": "", "input": ""},
        {"context": "[MASK]", "input": "[MASK]"},
    ]
