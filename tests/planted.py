"""Builders of small data sets with a planted, known structure (imported by the tests).

pytest's default "prepend" import mode puts tests/ (it has no __init__.py) on sys.path, so
the test modules import this one as `from planted import ...`.
"""

from __future__ import annotations

import numpy as np

from ubo_core.config import ValidationConfig
from ubo_core.data import FeedbackData, evaluable_users
from ubo_core.datasets.validation import build_validation_sets


def planted_feedback(
    n_users: int = 60,
    n_items: int = 40,
    n_test_items: int = 10,
    in_group: float = 0.9,
    across: float = 0.05,
    seed: int = 0,
) -> tuple[FeedbackData, np.ndarray, np.ndarray]:
    """Two user groups x two item groups, popularity-biased exposure, random-exposure test.

    - user u is in group u % 2, item i in group i % 2 (interleaved, so popularity below is
      independent of the group);
    - relevance gamma_ui = `in_group` when the groups match, `across` otherwise;
    - exposure m_ui = m_i = 0.15 + 0.8 * (i / (M - 1)) ** 2, from 0.15 to 0.95 (known,
      popularity-biased: high-index items are shown far more often);
    - R ~ Bern(gamma), O ~ Bern(m); the rated training pairs are the exposed ones (O = 1,
      label R), so training positives are R~ = O R;
    - test: for each user `n_test_items` items drawn uniformly among the unexposed ones
      (O = 0, so no test pair is a training positive), label R (random exposure).

    Returns the processed data set (build_validation_sets, default ValidationConfig) with
    gamma (N, M) and m (N, M).
    """
    rng = np.random.default_rng(seed)
    same = (np.arange(n_users)[:, None] % 2) == (np.arange(n_items)[None, :] % 2)
    gamma = np.where(same, in_group, across)
    item_exposure = 0.15 + 0.8 * (np.arange(n_items) / (n_items - 1)) ** 2
    exposure = np.broadcast_to(item_exposure, (n_users, n_items)).copy()
    relevant = rng.random((n_users, n_items)) < gamma
    exposed = rng.random((n_users, n_items)) < exposure

    train_user, train_item = np.nonzero(exposed)
    train_label = relevant[train_user, train_item]

    test_user, test_item = [], []
    for user in range(n_users):
        unexposed = np.flatnonzero(~exposed[user])
        picked = rng.choice(unexposed, size=min(n_test_items, unexposed.size), replace=False)
        test_user.append(np.full(picked.size, user))
        test_item.append(np.sort(picked))
    test_user_arr = np.concatenate(test_user)
    test_item_arr = np.concatenate(test_item)
    test_label = relevant[test_user_arr, test_item_arr]

    eval_users = evaluable_users(
        n_users, train_user[train_label], test_user_arr, test_label.astype(np.int8)
    )
    data = FeedbackData(
        n_users=n_users,
        n_items=n_items,
        train_user=train_user.astype(np.int32),
        train_item=train_item.astype(np.int32),
        train_label=train_label.astype(np.int8),
        test_user=test_user_arr.astype(np.int32),
        test_item=test_item_arr.astype(np.int32),
        test_label=test_label.astype(np.int8),
        eval_users=eval_users,
    )
    data.check("planted")
    return build_validation_sets(data, ValidationConfig()), gamma, exposure
