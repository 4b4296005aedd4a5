"""The implicit-feedback data set every stage after `download` reads and writes.

One container for real and semi-synthetic sets. "Rated" pairs are the exposed ones whose
label we know: real ratings (label = rating >= threshold) or, semi-synthetically, pairs
with O = 1 (label = R). Training sees every (user, item) pair of the N x M matrix with
R~ = 1 on training positives and 0 elsewhere (Saito et al. 2020's dense protocol), minus
the pairs held out for validation (`excluded_*`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ubo_core.errors import DataError
from ubo_core.fileio import load_npz, save_npz

# Every stage writes, and training reads, `<folder>/<dataset>/dataset.npz`.
DATASET_FILE = "dataset.npz"
_PAIR_GROUPS = ("train", "test", "unexposed_test", "val", "hyper")
# What `FeedbackData.load(with_test=False)` never reads: tuning must not see the test set.
# true_relevance is the gamma the semi-synthetic test labels are drawn from, and the
# unexposed test lists are semi-synthetic's second test set: test information.
TEST_ARRAYS = ("test_user", "test_item", "test_label", "eval_users")
UNEXPOSED_TEST_ARRAYS = ("unexposed_test_user", "unexposed_test_item", "unexposed_test_label")
TEST_DERIVED = ("true_relevance", *UNEXPOSED_TEST_ARRAYS)
_OPTIONAL_GROUPS = ("val", "hyper")


@dataclass(frozen=True)
class FeedbackData:
    """Implicit feedback with a random-exposure test set. All ids are 0-based.

    train_*: rated (exposed) training pairs, (n_train,) int32/int8; label 1 = positive.
    test_*: the random-exposure test pairs, evaluated per user (eval_users).
    val_*, hyper_*: unbiased validation pairs and hyper-validation pairs (after the
      validation stage), both removed from training; excluded_*: every pair removed from
      the dense training matrix (val and hyper pairs, positives and unlabeled).
    true_relevance / true_exposure: (n_users, n_items) gamma and m, semi-synthetic only.
    unexposed_test_*: semi-synthetic only, the second test protocol (Saito et al.'s): each
      user's relevant but unclicked pairs against sampled non-relevant items
      (ubo_core/datasets/semisynthetic.py, `unexposed_test_lists`).
    """

    n_users: int
    n_items: int
    train_user: np.ndarray
    train_item: np.ndarray
    train_label: np.ndarray
    test_user: np.ndarray
    test_item: np.ndarray
    test_label: np.ndarray
    eval_users: np.ndarray
    true_relevance: np.ndarray | None = None
    true_exposure: np.ndarray | None = None
    val_user: np.ndarray | None = None
    val_item: np.ndarray | None = None
    val_label: np.ndarray | None = None
    hyper_user: np.ndarray | None = None
    hyper_item: np.ndarray | None = None
    hyper_label: np.ndarray | None = None
    excluded_user: np.ndarray | None = None
    excluded_item: np.ndarray | None = None
    unexposed_test_user: np.ndarray | None = None
    unexposed_test_item: np.ndarray | None = None
    unexposed_test_label: np.ndarray | None = None

    @property
    def is_semisynthetic(self) -> bool:
        return self.true_exposure is not None

    @property
    def has_validation(self) -> bool:
        return self.val_user is not None

    def train_positives(self) -> tuple[np.ndarray, np.ndarray]:
        """(users, items) of the training positives, R~ = 1."""
        positive = self.train_label == 1
        return self.train_user[positive], self.train_item[positive]

    def item_popularity(self) -> np.ndarray:
        """n_i: number of training positives of each item, (n_items,) int64."""
        _, items = self.train_positives()
        return np.bincount(items, minlength=self.n_items)

    def user_activity(self) -> np.ndarray:
        """Number of training positives of each user, (n_users,) int64."""
        users, _ = self.train_positives()
        return np.bincount(users, minlength=self.n_users)

    def counts(self) -> dict[str, Any]:
        """The summary counts every stage reports (summary.json)."""
        summary: dict[str, Any] = {
            "n_users": self.n_users,
            "n_items": self.n_items,
            "n_train_ratings": int(self.train_label.size),
            "n_train_pos": int((self.train_label == 1).sum()),
            "n_test_ratings": int(self.test_label.size),
            "n_test_pos": int((self.test_label == 1).sum()),
            "n_eval_users": int(self.eval_users.size),
        }
        if self.true_exposure is not None:
            summary["mean_true_exposure"] = round(float(self.true_exposure.mean()), 6)
            assert self.true_relevance is not None
            summary["mean_true_relevance"] = round(float(self.true_relevance.mean()), 6)
        if self.unexposed_test_label is not None:
            assert self.unexposed_test_user is not None
            summary["n_unexposed_test_pos"] = int((self.unexposed_test_label == 1).sum())
            summary["n_unexposed_test_pairs"] = int(self.unexposed_test_label.size)
            summary["n_unexposed_test_users"] = int(np.unique(self.unexposed_test_user).size)
        if self.has_validation:
            assert self.val_label is not None and self.hyper_label is not None
            assert self.excluded_user is not None
            summary.update(
                n_val_pairs=int(self.val_label.size),
                n_val_pos=int((self.val_label == 1).sum()),
                n_val_users=int(np.unique(self.val_user).size),
                n_hyper_pairs=int(self.hyper_label.size),
                n_hyper_pos=int((self.hyper_label == 1).sum()),
                n_hyper_users=int(np.unique(self.hyper_user).size),
                n_excluded_pairs=int(self.excluded_user.size),
                n_dense_train_pairs=self.n_users * self.n_items - int(self.excluded_user.size),
            )
        return summary

    def save(self, path: Path) -> None:
        arrays = {
            f.name: np.asarray(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }
        save_npz(path, arrays)

    @property
    def has_test(self) -> bool:
        return self.eval_users.size > 0

    @classmethod
    def load(cls, path: Path, with_test: bool = True) -> FeedbackData:
        """Read and check a saved data set. With `with_test=False` the test arrays are not
        read at all (they come back empty): what hyperparameter tuning uses."""
        required = tuple(
            f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
        )
        skip = () if with_test else TEST_ARRAYS + TEST_DERIVED
        arrays = load_npz(path, required, skip=skip)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(arrays) - known)
        if unknown:
            raise DataError(path, f"unexpected arrays {unknown}")
        values: dict[str, Any] = dict(arrays)
        values["n_users"] = int(values["n_users"])
        values["n_items"] = int(values["n_items"])
        for name in skip:
            if name in TEST_ARRAYS:
                values[name] = np.zeros(0, dtype=np.int32)
        data = cls(**values)
        data.check(path, with_test=with_test)
        return data

    def check(self, where: str | Path, with_test: bool = True) -> None:
        """Validate shapes, id ranges, labels and duplicates; raise DataError naming `where`.
        `with_test=False`: the test arrays are known to be empty (not read) and not checked."""
        if self.n_users <= 0 or self.n_items <= 0:
            raise DataError(where, f"empty matrix {self.n_users} x {self.n_items}")
        validation_arrays = [
            f"{group}_{k}" for group in _OPTIONAL_GROUPS for k in ("user", "item", "label")
        ] + ["excluded_user", "excluded_item"]
        present = [name for name in validation_arrays if getattr(self, name) is not None]
        if present and len(present) != len(validation_arrays):
            missing = sorted(set(validation_arrays) - set(present))
            raise DataError(where, f"incomplete validation sets: missing {missing}")
        unexposed = [getattr(self, name) is not None for name in UNEXPOSED_TEST_ARRAYS]
        if any(unexposed) and not all(unexposed):
            raise DataError(where, f"incomplete unexposed test set: need {UNEXPOSED_TEST_ARRAYS}")
        if any(unexposed) and self.true_exposure is None:
            raise DataError(where, "unexposed_test_* arrays belong to semi-synthetic data only")
        for group in _PAIR_GROUPS:
            if group in ("test", "unexposed_test") and not with_test:
                continue
            user, item, label = (getattr(self, f"{group}_{k}") for k in ("user", "item", "label"))
            if user is None and group in (*_OPTIONAL_GROUPS, "unexposed_test"):
                continue
            _check_pairs(where, group, user, item, self.n_users, self.n_items)
            if label.shape != user.shape:
                raise DataError(
                    where, f"{group}_label has shape {label.shape}, expected {user.shape}"
                )
            if not np.isin(label, (0, 1)).all():
                raise DataError(where, f"{group}_label has values other than 0 and 1")
            if user.size == 0:
                raise DataError(where, f"the {group} split is empty")
        if with_test and self.test_label.sum() == 0:
            raise DataError(where, "the test split has no positive")
        if self.train_label.sum() == 0:
            raise DataError(where, "the training split has no positive")
        if with_test and self.eval_users.size == 0:
            raise DataError(where, "no user qualifies for evaluation")
        if (self.eval_users < 0).any() or (self.eval_users >= self.n_users).any():
            raise DataError(where, "eval_users out of range")
        for name in ("true_relevance", "true_exposure"):
            matrix = getattr(self, name)
            if matrix is None:
                continue
            if matrix.shape != (self.n_users, self.n_items):
                raise DataError(
                    where,
                    f"{name} has shape {matrix.shape}, expected {(self.n_users, self.n_items)}",
                )
            if not np.isfinite(matrix).all() or matrix.min() < 0 or matrix.max() > 1:
                raise DataError(where, f"{name} must be probabilities in [0, 1] without NaN")
        if self.excluded_user is not None:
            assert self.excluded_item is not None
            _check_pairs(
                where,
                "excluded",
                self.excluded_user,
                self.excluded_item,
                self.n_users,
                self.n_items,
            )


def _check_pairs(
    where: str | Path, group: str, user: np.ndarray, item: np.ndarray, n_users: int, n_items: int
) -> None:
    if user.ndim != 1 or item.shape != user.shape:
        raise DataError(where, f"{group}_user/{group}_item shapes {user.shape} and {item.shape}")
    if user.size and (user.min() < 0 or user.max() >= n_users):
        raise DataError(where, f"{group}_user ids out of range [0, {n_users})")
    if item.size and (item.min() < 0 or item.max() >= n_items):
        raise DataError(where, f"{group}_item ids out of range [0, {n_items})")
    keys = user.astype(np.int64) * n_items + item
    if np.unique(keys).size != keys.size:
        raise DataError(where, f"duplicate (user, item) pairs in {group}")


def evaluable_users(
    n_users: int,
    train_positive_users: np.ndarray,
    test_user: np.ndarray,
    test_label: np.ndarray,
) -> np.ndarray:
    """Users with >= 1 test positive, >= 1 test negative and >= 1 training positive.

    Ranking metrics are undefined without a positive, trivial without a negative, and a user
    with no training positive is a cold-start user the protocol leaves out (CJMF's protocol;
    gives Yahoo 2,374 and Coat 237 users).
    """
    test_pos = np.bincount(test_user[test_label == 1], minlength=n_users)
    test_neg = np.bincount(test_user[test_label == 0], minlength=n_users)
    train_pos = np.bincount(train_positive_users, minlength=n_users)
    return np.flatnonzero((test_pos > 0) & (test_neg > 0) & (train_pos > 0)).astype(np.int32)


def load_processed(processed_dir: Path, dataset: str, with_test: bool = True) -> FeedbackData:
    """The processed data set; `with_test=False` never reads its test split (tuning)."""
    path = Path(processed_dir) / dataset / DATASET_FILE
    if not path.is_file():
        raise DataError(path, f"not found; build it with `dvc repro validation@{dataset}`")
    return FeedbackData.load(path, with_test=with_test)
