"""ubo_core.reference_rankings: oracle and popularity rankings of a semi-synthetic test set."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ubo_core.data import FeedbackData
from ubo_core.errors import DataError
from ubo_core.reference_rankings import REFERENCE_RANKINGS, reference_rankings


def tiny() -> FeedbackData:
    """2 users x 3 items. Training positives: item 2 twice, item 0 once (popularity 1, 0, 2).
    Test: user 0 ranks items 0, 1, 2 with labels 1, 0, 0; user 1 items 0, 1 with 0, 1."""
    gamma = np.array([[0.9, 0.1, 0.2], [0.1, 0.8, 0.3]], np.float32)
    m = np.array([[0.2, 0.7, 0.5], [0.9, 0.1, 0.4]], np.float32)
    return FeedbackData(
        n_users=2,
        n_items=3,
        train_user=np.array([0, 1, 1], np.int32),
        train_item=np.array([2, 0, 2], np.int32),
        train_label=np.array([1, 1, 1], np.int8),
        test_user=np.array([0, 0, 0, 1, 1], np.int32),
        test_item=np.array([0, 1, 2, 0, 1], np.int32),
        test_label=np.array([1, 0, 0, 0, 1], np.int8),
        eval_users=np.array([0, 1], np.int32),
        true_relevance=gamma,
        true_exposure=m,
    )


def test_the_three_rankings_hand_worked():
    """By gamma both users put their positive first: DCG@3 = 1 each. By m: user 0 ranks
    1, 2, 0 (positive third: 1/log2 4 = 0.5), user 1 ranks 0, 1 (second: 1/log2 3). By
    popularity (1, 0, 2): user 0 ranks 2, 0, 1 (second), user 1 ranks 0, 1 (second)."""
    results = {r.name: r for r in reference_rankings(tiny())}
    assert tuple(results) == REFERENCE_RANKINGS
    second = 1 / math.log2(3)
    expected = {
        "true_relevance": [1.0, 1.0],
        "true_exposure": [0.5, second],
        "popularity": [second, second],
    }
    for name, per_user in expected.items():
        np.testing.assert_allclose(results[name].per_user_dcg3, per_user)
        assert results[name].metrics["dcg@3"] == pytest.approx(np.mean(per_user))
    assert results["true_relevance"].metrics["dcg@1"] == 1.0
    assert results["popularity"].dcg3_standard_error == pytest.approx(0.0)
    spread = np.std([0.5, second], ddof=1) / math.sqrt(2)
    assert results["true_exposure"].dcg3_standard_error == pytest.approx(spread)


def test_real_data_is_refused():
    data = tiny()
    real = FeedbackData(**{**data.__dict__, "true_relevance": None, "true_exposure": None})
    with pytest.raises(DataError, match="semi-synthetic"):
        reference_rankings(real)


def test_the_unexposed_protocol_ranks_its_own_lists():
    """User 0's list: items 1 (positive) and 2; user 1's: items 0 and 2 (positive). By gamma
    user 0 ranks 2 (0.2) over 1 (0.1): positive second; user 1 ranks 2 (0.3) over 0 (0.1):
    positive first."""
    data = FeedbackData(
        **{
            **tiny().__dict__,
            "unexposed_test_user": np.array([0, 0, 1, 1], np.int32),
            "unexposed_test_item": np.array([1, 2, 0, 2], np.int32),
            "unexposed_test_label": np.array([1, 0, 0, 1], np.int8),
        }
    )
    results = {r.name: r for r in reference_rankings(data, "unexposed")}
    np.testing.assert_allclose(results["true_relevance"].per_user_dcg3, [1 / math.log2(3), 1.0])
    with pytest.raises(DataError, match="no unexposed test lists"):
        reference_rankings(tiny(), "unexposed")
