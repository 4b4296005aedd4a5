"""The validation stage: the unbiased validation set and the hyper-validation set.

PAPER.md "Data protocol" (the paper, Sec. 3.1):
- Unbiased validation set: the `active_user_fraction` most active users (most training
  positives; ties by lower user id). For each, the most popular training positive and the
  most popular negative (ties by lower item id); a user with no negative contributes only
  the positive. These items were almost surely exposed, so m = 1 on them. By default a
  negative is a rated negative and popularity n_i counts training positives of item i
  (`negative: unlabeled`: any item that is not a training positive of the user;
  `popularity: ratings`: n_i counts the users who rated i; ValidationConfig).
- Hyper-validation set (tuning only, with SNIPS): `hyper_fraction` of the remaining training
  positives, drawn uniformly, and for each of them one unlabeled pair (R~ = 0, not held out
  already) of the same user, drawn uniformly, so every hyper-validation user ranks as many
  unlabeled items as held-out positives.
Both sets leave the training data: their pairs are listed in `excluded_*`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ubo_core.config import ValidationConfig
from ubo_core.data import FeedbackData
from ubo_core.errors import DataError

_MAX_REJECTION_ROUNDS = 1000


def build_validation_sets(data: FeedbackData, config: ValidationConfig) -> FeedbackData:
    """Return `data` with val_*, hyper_* and excluded_* filled and those pairs out of train_*."""
    if data.has_validation:
        raise DataError("validation", "the input already has validation sets")
    rng = np.random.default_rng(config.seed)
    n_items = data.n_items
    if config.popularity == "positives":
        popularity = data.item_popularity()
    else:
        popularity = np.bincount(data.train_item, minlength=n_items)

    val_user, val_item, val_label = _unbiased_validation(data, popularity, config)
    train_keys = data.train_user.astype(np.int64) * n_items + data.train_item
    val_keys = val_user.astype(np.int64) * n_items + val_item
    remaining = ~np.isin(train_keys, val_keys)

    positive_rows = np.flatnonzero(remaining & (data.train_label == 1))
    n_hyper = _round_half_up(config.hyper_fraction * positive_rows.size)
    if n_hyper == 0:
        raise DataError("validation", "the hyper-validation set would be empty")
    hyper_rows = np.sort(rng.choice(positive_rows, size=n_hyper, replace=False))
    hyper_pos_user = data.train_user[hyper_rows]
    hyper_pos_item = data.train_item[hyper_rows]
    positive_keys = train_keys[data.train_label == 1]
    taken = np.union1d(positive_keys, val_keys)
    hyper_neg_item = _sample_unlabeled(hyper_pos_user, n_items, taken, rng)

    hyper_user = np.concatenate([hyper_pos_user, hyper_pos_user])
    hyper_item = np.concatenate([hyper_pos_item, hyper_neg_item])
    hyper_label = np.concatenate([np.ones(n_hyper, np.int8), np.zeros(n_hyper, np.int8)])
    order = np.lexsort((hyper_item, hyper_user))
    hyper_user, hyper_item, hyper_label = hyper_user[order], hyper_item[order], hyper_label[order]

    excluded_keys = np.union1d(val_keys, hyper_user.astype(np.int64) * n_items + hyper_item)
    keep = ~np.isin(train_keys, excluded_keys)
    result = dataclasses.replace(
        data,
        train_user=data.train_user[keep],
        train_item=data.train_item[keep],
        train_label=data.train_label[keep],
        val_user=val_user,
        val_item=val_item,
        val_label=val_label,
        hyper_user=hyper_user.astype(np.int32),
        hyper_item=hyper_item.astype(np.int32),
        hyper_label=hyper_label,
        excluded_user=(excluded_keys // n_items).astype(np.int32),
        excluded_item=(excluded_keys % n_items).astype(np.int32),
    )
    result.check("validation")
    return result


def _unbiased_validation(
    data: FeedbackData, popularity: np.ndarray, config: ValidationConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    activity = data.user_activity()
    n_active = _round_half_up(config.active_user_fraction * data.n_users)
    by_activity = np.lexsort((np.arange(data.n_users), -activity))
    active = by_activity[:n_active]
    active = active[activity[active] > 0]
    if active.size == 0:
        raise DataError("validation", "no active user with a training positive")
    picked = [_most_popular_per_user(data, popularity, active, 1)]
    if config.negative == "rated":
        negatives = _most_popular_per_user(data, popularity, active, 0)
        if negatives[0].size == 0:
            # Clicks only (a log without a rating or click column): a validation set of
            # positives alone would make the bi-level objective constant.
            raise DataError(
                "validation",
                "no active user has a rated negative (training feedback without a rating or "
                "click 0): set validation.negative: unlabeled in params.yaml, or give the "
                "training file a rating or click column",
            )
        picked.append(negatives)
    else:
        picked.append(_most_popular_unlabeled(data, popularity, active))
    user = np.concatenate([p[0] for p in picked])
    item = np.concatenate([p[1] for p in picked])
    label = np.concatenate([np.full(p[0].size, 1 - k, np.int8) for k, p in enumerate(picked)])
    order = np.lexsort((item, user))
    return user[order].astype(np.int32), item[order].astype(np.int32), label[order]


def _most_popular_per_user(
    data: FeedbackData, popularity: np.ndarray, users: np.ndarray, label: int
) -> tuple[np.ndarray, np.ndarray]:
    rows = np.flatnonzero((data.train_label == label) & np.isin(data.train_user, users))
    user, item = data.train_user[rows], data.train_item[rows]
    # Sort by user, then most popular first, then lower item id; keep each user's first row.
    order = np.lexsort((item, -popularity[item], user))
    user, item = user[order], item[order]
    first = np.ones(user.size, bool)
    first[1:] = user[1:] != user[:-1]
    return user[first], item[first]


def _most_popular_unlabeled(
    data: FeedbackData, popularity: np.ndarray, users: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per user, the most popular item that is not one of the user's training positives
    (R~ = 0: rated negative or never rated); ties by lower item id."""
    by_popularity = np.lexsort((np.arange(data.n_items), -popularity))
    pos_user, pos_item = data.train_positives()
    positive = np.zeros((users.size, data.n_items), bool)
    slot = np.full(data.n_users, -1)
    slot[users] = np.arange(users.size)
    mine = slot[pos_user] >= 0
    positive[slot[pos_user[mine]], pos_item[mine]] = True
    candidate = ~positive[:, by_popularity]  # (users, items) in popularity order
    has = candidate.any(axis=1)
    first = by_popularity[candidate.argmax(axis=1)]
    order = np.argsort(users[has], kind="stable")
    return users[has][order], first[has][order]


def _sample_unlabeled(
    users: np.ndarray, n_items: int, taken_keys: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """One uniformly drawn item per entry of `users`, never a taken pair nor drawn twice."""
    items = rng.integers(0, n_items, size=users.size)
    for _ in range(_MAX_REJECTION_ROUNDS):
        keys = users.astype(np.int64) * n_items + items
        clash = np.isin(keys, taken_keys)
        _, first = np.unique(keys, return_index=True)
        repeated = np.ones(keys.size, bool)
        repeated[first] = False
        redraw = clash | repeated
        if not redraw.any():
            return items.astype(np.int32)
        items[redraw] = rng.integers(0, n_items, size=int(redraw.sum()))
    raise DataError("validation", "could not draw enough unlabeled pairs (matrix too dense)")


def _round_half_up(x: float) -> int:
    # Python's round() rounds halves to even (round(2.5) == 2); sizes round halves up.
    return int(np.floor(x + 0.5))
