"""Rankings that need no training: the ceiling and the floor of a semi-synthetic table.

On a semi-synthetic set the truth is known, so the test set can be ranked by it:
- `true_relevance`: by gamma_ui, the probability a test label is 1 (the oracle: no method can
  do better in expectation; the test labels are Bernoulli draws, so it scores below the
  maximum);
- `true_exposure`: by m_ui (how a ranking by exposure alone would do);
- `popularity`: by n_i, the item's positives in the (simulated) training clicks, the
  popularity theta_i of Eq. 12 (the floor any exposure-aware method should clear).
Each gives the test metrics and the per-user DCG@3, whose standard error over users is the
test draw's noise (one fixed draw of `n_test_items` Bernoulli labels per user). The same
rankings on the second protocol's lists (`protocol="unexposed"`: relevant but unexposed items
against sampled non-relevant ones, ubo_core/datasets/semisynthetic.py) show its ceiling too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ubo_core.config import check_choice
from ubo_core.data import FeedbackData
from ubo_core.errors import DataError
from ubo_core.metrics import RankingTask, per_user_metrics

KS = (1, 2, 3)


@dataclass(frozen=True)
class ReferenceRanking:
    name: str
    metrics: dict[str, float]  # mean over the evaluated users
    per_user_dcg3: np.ndarray

    @property
    def dcg3_standard_error(self) -> float:
        """Standard error of the mean DCG@3 over users (sample std / sqrt(n))."""
        values = self.per_user_dcg3
        return float(values.std(ddof=1) / np.sqrt(values.size))


def _score_matrices(data: FeedbackData) -> dict[str, Callable[[], np.ndarray]]:
    assert data.true_relevance is not None and data.true_exposure is not None
    positives = data.item_popularity().astype(np.float64)
    return {
        "true_relevance": lambda: data.true_relevance,
        "true_exposure": lambda: data.true_exposure,
        "popularity": lambda: np.broadcast_to(positives, (data.n_users, data.n_items)),
    }


REFERENCE_RANKINGS = ("true_relevance", "true_exposure", "popularity")
TEST_PROTOCOLS = ("random", "unexposed")


def reference_rankings(data: FeedbackData, protocol: str = "random") -> list[ReferenceRanking]:
    """The three rankings of the module docstring on `data`'s test set of `protocol`:
    "random" (the random-exposure test items) or "unexposed" (the second protocol's lists)."""
    if not data.is_semisynthetic:
        raise DataError("reference rankings", "need a semi-synthetic data set (true gamma, m)")
    if not data.has_test:
        raise DataError("reference rankings", "the data set was loaded without its test split")
    check_choice("protocol", protocol, TEST_PROTOCOLS)
    if protocol == "random":
        task = RankingTask.from_pairs(
            data.test_user, data.test_item, data.test_label, data.eval_users
        )
    elif data.unexposed_test_user is None:
        raise DataError("reference rankings", "the data set has no unexposed test lists")
    else:
        task = RankingTask.from_pairs(
            data.unexposed_test_user, data.unexposed_test_item, data.unexposed_test_label
        )
    results = []
    for name, matrix in _score_matrices(data).items():
        scores = task.gather(np.asarray(matrix(), dtype=np.float64))
        per_user = per_user_metrics(scores, task, KS)
        metrics = {key: float(values.mean()) for key, values in per_user.items()}
        results.append(ReferenceRanking(name, metrics, per_user["dcg@3"]))
    return results
