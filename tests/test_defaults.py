"""The default learning rate: log-linear in the parameter count between its two anchors."""

import math

import pytest

from jacobi_engine.training.recipe import LR_ANCHORS, default_learning_rate


def test_anchors_and_clipping():
    (small, small_lr), (large, large_lr) = LR_ANCHORS
    assert default_learning_rate(int(small)) == pytest.approx(small_lr)
    assert default_learning_rate(int(large)) == pytest.approx(large_lr)
    assert default_learning_rate(10) == pytest.approx(small_lr)  # clipped below the small anchor
    assert default_learning_rate(10**12) == pytest.approx(large_lr)


def test_log_linear_between_anchors():
    # Geometric midpoint of the parameter counts -> geometric mean of the rates.
    (small, small_lr), (large, large_lr) = LR_ANCHORS
    assert default_learning_rate(int(math.sqrt(small * large))) == pytest.approx(
        math.sqrt(small_lr * large_lr), rel=1e-4
    )
    # The shipped GSM8K CLLM (2,447,808 parameters) was trained at 1e-3: the rule gives the same order.
    assert 1e-3 < default_learning_rate(2_447_808) < 2e-3


def test_bad_count():
    with pytest.raises(ValueError, match="num_parameters"):
        default_learning_rate(0)
