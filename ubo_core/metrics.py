"""Ranking metrics for implicit-feedback evaluation (numpy only).

Evaluation follows the paper's protocol: every evaluated user ranks only their own test
candidates by the model's score. Candidates are stored as a padded rectangle
(:class:`RankingTask`) so every metric is computed for all users at once, without a Python loop
over users.

Ties are broken pessimistically (negatives before positives, then by ascending item id) so that a
model can never gain from predicting equal scores, and the result never depends on the order in
which candidates happen to be stored.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ubo_core.errors import UboError

__all__ = [
    "MetricError",
    "RankingTask",
    "expected_random_dcg",
    "exposure_pcc",
    "per_user_metrics",
    "ranking_metrics",
    "snips_metrics",
    "snips_per_user_metrics",
]

# How many offending ids an error message lists before it only gives a count.
_MAX_LISTED = 5


class MetricError(UboError, ValueError):
    """Bad input to a metric; the message names the problem."""


def _listed(ids: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:_MAX_LISTED])
    return shown + (", ..." if len(ids) > _MAX_LISTED else "")


def _as_int_array(name: str, values: object, ndim: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != ndim:
        raise MetricError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    # An empty list comes in as float64; it holds no value that could be a non-integer.
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_):
        raise MetricError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _as_binary_array(name: str, values: object, ndim: int, dtype: type) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != ndim:
        raise MetricError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.size and not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise MetricError(f"{name} must be numeric or bool, got dtype {arr.dtype}")
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise MetricError(f"{name} must hold only 0/1 values")
    return arr.astype(dtype)


def _as_real_array(name: str, values: object) -> np.ndarray:
    arr = np.asarray(values)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise MetricError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    # float64 holds every float32/float16 value exactly, so ties and order are unchanged.
    return arr.astype(np.float64)


@dataclass(frozen=True, eq=False)
class RankingTask:
    """Each evaluated user's candidate items, padded to a rectangle.

    Attributes:
        user_ids: (n_users,) int64, the evaluated users (unique, >= 0).
        item_ids: (n_users, L) int64, the candidates of each user, padded with -1.
        labels: (n_users, L) int8 in {0, 1}, 1 for a positive (relevant) candidate, 0 at padding.
        mask: (n_users, L) bool, True where a real candidate.

    The arrays are copied, converted to the dtypes above and made read-only on construction.
    Every user must have at least one candidate.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    labels: np.ndarray
    mask: np.ndarray

    def __post_init__(self) -> None:
        user_ids = _as_int_array("user_ids", self.user_ids, 1)
        item_ids = _as_int_array("item_ids", self.item_ids, 2)
        labels = _as_binary_array("labels", self.labels, 2, np.int8)
        mask = _as_binary_array("mask", self.mask, 2, np.bool_)
        if user_ids.shape[0] == 0:
            raise MetricError("a RankingTask needs at least one user")
        shape = (user_ids.shape[0], item_ids.shape[1])
        for name, arr in (("item_ids", item_ids), ("labels", labels), ("mask", mask)):
            if arr.shape != shape:
                raise MetricError(f"{name} has shape {arr.shape}, expected (n_users, L) = {shape}")
        if (user_ids < 0).any():
            raise MetricError("user_ids must be >= 0")
        if np.unique(user_ids).size != user_ids.size:
            raise MetricError("user_ids must be unique")
        empty = np.flatnonzero(~mask.any(axis=1))
        if empty.size:
            raise MetricError(
                f"{empty.size} user(s) have no candidate (user_ids: {_listed(user_ids[empty])})"
            )
        if (item_ids[mask] < 0).any():
            raise MetricError("item_ids must be >= 0 where mask is True")
        if (item_ids[~mask] != -1).any():
            raise MetricError("item_ids must be -1 at padding (where mask is False)")
        if (labels[~mask] != 0).any():
            raise MetricError("labels must be 0 at padding (where mask is False)")
        # Padding is -1 and real ids are >= 0, so equal neighbours >= 0 after sorting are repeats.
        srt = np.sort(item_ids, axis=1)
        dup_rows = np.flatnonzero(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(axis=1))
        if dup_rows.size:
            raise MetricError(
                f"{dup_rows.size} user(s) have a duplicate candidate item "
                f"(user_ids: {_listed(user_ids[dup_rows])})"
            )
        for name, arr in (
            ("user_ids", user_ids),
            ("item_ids", item_ids),
            ("labels", labels),
            ("mask", mask),
        ):
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)

    @classmethod
    def from_pairs(
        cls,
        users: np.ndarray,
        items: np.ndarray,
        labels: np.ndarray,
        eval_users: np.ndarray | None = None,
    ) -> RankingTask:
        """Build a task from flat (user, item, label) arrays, each of shape (n_pairs,).

        Users are in ascending id order and each user's candidates in ascending item id order.
        If ``eval_users`` is given, only pairs of those users are kept; an evaluated user with no
        pair has no candidate and so does not appear in the task.

        Raises:
            MetricError: on length mismatch, a duplicate (user, item) pair, negative ids, labels
                outside {0, 1}, or if no user is left.
        """
        u = _as_int_array("users", users, 1)
        it = _as_int_array("items", items, 1)
        lab = _as_binary_array("labels", labels, 1, np.int8)
        if not (u.shape == it.shape == lab.shape):
            raise MetricError(
                f"users, items and labels must have the same length, got "
                f"{u.shape[0]}, {it.shape[0]} and {lab.shape[0]}"
            )
        if (u < 0).any() or (it < 0).any():
            raise MetricError("users and items must be >= 0")
        if eval_users is not None:
            keep = np.isin(u, _as_int_array("eval_users", eval_users, 1))
            u, it, lab = u[keep], it[keep], lab[keep]
        if u.size == 0:
            raise MetricError("no (user, item) pair left: the task would have no user")
        order = np.lexsort((it, u))
        u, it, lab = u[order], it[order], lab[order]
        same = (u[1:] == u[:-1]) & (it[1:] == it[:-1])
        if same.any():
            dup_users = np.unique(u[1:][same])
            raise MetricError(
                f"duplicate (user, item) pairs for {dup_users.size} user(s) "
                f"(user_ids: {_listed(dup_users)})"
            )
        user_ids, starts, counts = np.unique(u, return_index=True, return_counts=True)
        row = np.repeat(np.arange(user_ids.size), counts)
        col = np.arange(u.size) - np.repeat(starts, counts)
        shape = (user_ids.size, int(counts.max()))
        item_ids = np.full(shape, -1, dtype=np.int64)
        label_mat = np.zeros(shape, dtype=np.int8)
        mask = np.zeros(shape, dtype=bool)
        item_ids[row, col] = it
        label_mat[row, col] = lab
        mask[row, col] = True
        return cls(user_ids=user_ids, item_ids=item_ids, labels=label_mat, mask=mask)

    @property
    def n_users(self) -> int:
        """Number of evaluated users."""
        return int(self.user_ids.shape[0])

    @property
    def list_length(self) -> int:
        """L, the padded width of the candidate lists."""
        return int(self.item_ids.shape[1])

    def gather(self, score_matrix: np.ndarray) -> np.ndarray:
        """Pick the candidates' scores out of a full score matrix.

        Args:
            score_matrix: (n_all_users, n_items) scores, indexed by user id and item id.

        Returns:
            (n_users, L) float64 scores of the candidates; nan at padding.
        """
        full = np.asarray(score_matrix)
        if full.ndim != 2:
            raise MetricError(f"score_matrix must be 2-D, got shape {full.shape}")
        if int(self.user_ids.max()) >= full.shape[0]:
            raise MetricError(
                f"score_matrix has {full.shape[0]} rows but user id {int(self.user_ids.max())} "
                "is evaluated"
            )
        if int(self.item_ids.max()) >= full.shape[1]:
            raise MetricError(
                f"score_matrix has {full.shape[1]} columns but item id "
                f"{int(self.item_ids.max())} is a candidate"
            )
        cols = np.where(self.mask, self.item_ids, 0)
        picked = _as_real_array("score_matrix", full[self.user_ids[:, None], cols])
        picked[~self.mask] = np.nan
        return picked


def _check_scores(scores: np.ndarray, task: RankingTask) -> np.ndarray:
    arr = _as_real_array("scores", scores)
    expected = task.item_ids.shape
    if arr.shape != expected:
        raise MetricError(f"scores has shape {arr.shape}, expected (n_users, L) = {expected}")
    bad = np.isnan(arr) & task.mask
    if bad.any():
        bad_rows = np.flatnonzero(bad.any(axis=1))
        all_nan = int(((bad | ~task.mask).all(axis=1)).sum())
        raise MetricError(
            f"scores are NaN for {int(bad.sum())} candidate(s) of {bad_rows.size} user(s), "
            f"{all_nan} of them with only NaN scores (user_ids: "
            f"{_listed(task.user_ids[bad_rows])})"
        )
    return arr


def _rank_order(scores: np.ndarray, task: RankingTask) -> np.ndarray:
    """(n_users, L) column indices of each user's candidates from rank 1 down, padding last.

    By descending score; ties are broken pessimistically and deterministically: among equal
    scores negatives (label 0) come before positives, then ascending item id, so a model never
    gains from ties and a constant scorer gets the worst possible metrics. +/-inf scores are
    allowed; a real candidate's NaN score is a MetricError."""
    arr = _check_scores(scores, task)
    # Padding shares the +inf score key with real -inf scores; its label key 2 still puts it last.
    score_key = np.where(task.mask, -arr, np.inf)
    label_key = np.where(task.mask, task.labels, 2)
    # lexsort: the last key is the primary one.
    return np.lexsort((task.item_ids, label_key, score_key), axis=-1)


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    out = tuple(ks)
    if not out:
        raise MetricError("ks must name at least one cutoff")
    for k in out:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise MetricError(f"every cutoff in ks must be an integer >= 1, got {k!r}")
    return tuple(int(k) for k in out)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, and 0 where den == 0."""
    out = np.zeros(np.broadcast_shapes(num.shape, den.shape), dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _weighted_metrics(
    scores: np.ndarray,
    task: RankingTask,
    ks: Iterable[int],
    weights: np.ndarray | None,
    prefix: str,
) -> dict[str, np.ndarray]:
    """DCG/MAP/Recall@K per user, with per-positive weights (None: every positive weighs 1).

    The plain metrics are this computation with unit weights, so SNIPS with uniform propensities
    runs the very same arithmetic and equals them bit for bit.
    """
    cutoffs = _check_ks(ks)
    order = _rank_order(scores, task)
    hit = np.take_along_axis(task.labels, order, axis=1).astype(np.float64)
    if weights is None:
        w = hit
    else:
        w = np.take_along_axis(weights, order, axis=1) * hit
    length = hit.shape[1]
    positions = np.arange(1, length + 1, dtype=np.float64)
    discount = 1.0 / np.log2(positions + 1.0)
    precision = np.cumsum(hit, axis=1) / positions
    n_pos = hit.sum(axis=1)
    w_total = w.sum(axis=1)
    cum_w = np.cumsum(w, axis=1)
    cum_dcg = np.cumsum(w * discount, axis=1)
    cum_ap = np.cumsum(w * precision, axis=1)
    # SNIPS-DCG rescales to n_pos positives; with unit weights the factor is exactly 1.
    dcg_scale = _safe_div(n_pos, w_total)
    dcg: dict[str, np.ndarray] = {}
    ap: dict[str, np.ndarray] = {}
    recall: dict[str, np.ndarray] = {}
    for k in cutoffs:
        c = min(k, length) - 1
        dcg[f"{prefix}dcg@{k}"] = cum_dcg[:, c] * dcg_scale
        ap[f"{prefix}map@{k}"] = _safe_div(cum_ap[:, c], cum_w[:, c])
        recall[f"{prefix}recall@{k}"] = _safe_div(cum_w[:, c], w_total)
    return {**dcg, **ap, **recall}


def per_user_metrics(
    scores: np.ndarray, task: RankingTask, ks: Iterable[int] = (1, 2, 3)
) -> dict[str, np.ndarray]:
    """DCG@K, MAP@K and Recall@K of every user.

    With hit_k = 1 if the candidate at rank k is positive and n_pos the user's positives:

    - DCG@K = sum_{k<=K} hit_k / log2(k+1), not normalised (so DCG@1 = MAP@1);
    - MAP@K = (1/hits@K) sum_{k<=K} hit_k precision@k, precision@k = hits@k / k; 0 without a hit;
    - Recall@K = hits@K / n_pos; 0 if n_pos = 0.

    A K beyond a user's list length just means fewer ranks. Ties are pessimistic: among equal
    scores negatives rank first, then ascending item id (`_rank_order`).

    Args:
        scores: (n_users, L) candidate scores, e.g. from :meth:`RankingTask.gather`.
        task: the candidates.
        ks: cutoffs, each an integer >= 1.

    Returns:
        'dcg@K', 'map@K', 'recall@K' for each K -> (n_users,) float64 arrays.
    """
    return _weighted_metrics(scores, task, ks, None, "")


def ranking_metrics(
    scores: np.ndarray, task: RankingTask, ks: Iterable[int] = (1, 2, 3)
) -> dict[str, float]:
    """Mean over users of :func:`per_user_metrics`."""
    return {name: float(v.mean()) for name, v in per_user_metrics(scores, task, ks).items()}


def _snips_weights(propensity: np.ndarray, task: RankingTask) -> np.ndarray:
    """(n_users, L) weights proportional to 1/propensity on positives, 0 elsewhere."""
    p = _as_real_array("propensity", propensity)
    if p.shape != task.item_ids.shape:
        raise MetricError(
            f"propensity has shape {p.shape}, expected (n_users, L) = {task.item_ids.shape}"
        )
    positive = task.labels.astype(bool)
    bad = positive & ~(np.isfinite(p) & (p > 0))
    if bad.any():
        bad_rows = np.flatnonzero(bad.any(axis=1))
        raise MetricError(
            f"propensity must be finite and > 0 on positive candidates; {int(bad.sum())} are "
            f"not, for {bad_rows.size} user(s) (user_ids: {_listed(task.user_ids[bad_rows])})"
        )
    # SNIPS is invariant to rescaling a user's weights; scaling by the user's smallest positive
    # propensity keeps the weights in (0, 1] and makes equal propensities weigh exactly 1.
    p_pos = np.where(positive, p, np.inf)
    p_min = p_pos.min(axis=1, keepdims=True)
    weights = np.zeros_like(p)
    np.divide(np.broadcast_to(p_min, p.shape), p_pos, out=weights, where=positive)
    return weights


def snips_per_user_metrics(
    scores: np.ndarray,
    task: RankingTask,
    propensity: np.ndarray,
    ks: Iterable[int] = (1, 2, 3),
) -> dict[str, np.ndarray]:
    """Self-normalised IPS DCG/MAP/Recall@K of every user (Yang et al., RecSys 2018).

    Used to tune on a biased hold-out. With w_i = 1/propensity_i and pos the user's positives:

    - SNIPS-DCG@K = n_pos sum_{i in pos, rank_i<=K} w_i / log2(rank_i+1) / sum_{i in pos} w_i;
    - SNIPS-Recall@K = sum_{i in pos, rank_i<=K} w_i / sum_{i in pos} w_i;
    - SNIPS-MAP@K = sum_{i in pos, rank_i<=K} w_i precision@rank_i / sum_{i in pos, rank_i<=K} w_i,
      0 without a hit.

    With all propensities equal these equal the plain metrics exactly. Users without a positive
    score 0.

    Args:
        scores: (n_users, L) candidate scores.
        task: the candidates.
        propensity: (n_users, L) P(exposed) of each candidate, e.g. item popularity broadcast;
            must be finite and > 0 on positives (other entries are ignored).
        ks: cutoffs, each an integer >= 1.

    Returns:
        'snips_dcg@K', 'snips_map@K', 'snips_recall@K' for each K -> (n_users,) float64 arrays.
    """
    weights = _snips_weights(propensity, task)
    return _weighted_metrics(scores, task, ks, weights, "snips_")


def snips_metrics(
    scores: np.ndarray,
    task: RankingTask,
    propensity: np.ndarray,
    ks: Iterable[int] = (1, 2, 3),
) -> dict[str, float]:
    """Mean over users of :func:`snips_per_user_metrics`."""
    per_user = snips_per_user_metrics(scores, task, propensity, ks)
    return {name: float(v.mean()) for name, v in per_user.items()}


def expected_random_dcg(task: RankingTask, k: int) -> float:
    """E[DCG@k] under a uniformly random ranking of each user's candidates, averaged over users.

    Per user with L_u candidates of which n_pos are positive, every rank holds a positive with
    probability n_pos / L_u, so E[DCG@k] = (n_pos / L_u) sum_{j <= min(k, L_u)} 1 / log2(j + 1).
    """
    (k,) = _check_ks((k,))
    length = task.mask.sum(axis=1)
    n_pos = task.labels.sum(axis=1, dtype=np.float64)
    positions = np.arange(1, task.list_length + 1, dtype=np.float64)
    cum_discount = np.cumsum(1.0 / np.log2(positions + 1.0))
    per_user = n_pos / length * cum_discount[np.minimum(k, length) - 1]
    return float(per_user.mean())


def exposure_pcc(m_hat: np.ndarray, m_true: np.ndarray, users: np.ndarray | None = None) -> float:
    """Mean over users of the Pearson correlation between learned and true exposure.

    Each row (a user) is correlated over all items. A row where ``m_hat`` is constant has no
    linear association with anything and contributes 0 by convention; a constant ``m_true`` row
    makes the correlation meaningless and is an error.

    Args:
        m_hat: (n_users, n_items) learned exposure.
        m_true: (n_users, n_items) true exposure.
        users: optional rows to average over, as integer indices (1-D) or a boolean mask of
            length n_users; default all rows.

    Returns:
        The mean per-row correlation, in [-1, 1].

    Raises:
        MetricError: on shape mismatch, non-finite values, empty or out-of-range ``users``, or a
            constant ``m_true`` row among the rows used.
    """
    hat = _as_real_array("m_hat", m_hat)
    true = _as_real_array("m_true", m_true)
    if hat.ndim != 2 or hat.shape != true.shape:
        raise MetricError(
            f"m_hat and m_true must be 2-D of the same shape, got {hat.shape} and {true.shape}"
        )
    if users is not None:
        rows = np.asarray(users)
        if rows.dtype == np.bool_:
            if rows.shape != (hat.shape[0],):
                raise MetricError(
                    f"a boolean users mask must have shape ({hat.shape[0]},), got {rows.shape}"
                )
            rows = np.flatnonzero(rows)
        else:
            rows = _as_int_array("users", rows, 1)
        if rows.size and (rows.min() < 0 or rows.max() >= hat.shape[0]):
            raise MetricError(f"users must index rows 0..{hat.shape[0] - 1}")
        hat, true = hat[rows], true[rows]
    if hat.shape[0] == 0 or hat.shape[1] == 0:
        raise MetricError(f"no row or no column to correlate (shape {hat.shape})")
    for name, arr in (("m_hat", hat), ("m_true", true)):
        if not np.isfinite(arr).all():
            raise MetricError(f"{name} has non-finite values (NaN or inf)")
    # Exact max == min detects a constant row; a std threshold would also catch real signals.
    const_true = np.flatnonzero(true.max(axis=1) == true.min(axis=1))
    if const_true.size:
        raise MetricError(
            f"m_true is constant in {const_true.size} row(s) (rows: {_listed(const_true)}); "
            "the correlation is undefined"
        )
    const_hat = hat.max(axis=1) == hat.min(axis=1)
    hat_c = hat - hat.mean(axis=1, keepdims=True)
    true_c = true - true.mean(axis=1, keepdims=True)
    cov = np.einsum("ij,ij->i", hat_c, true_c)
    norm = np.sqrt(np.einsum("ij,ij->i", hat_c, hat_c) * np.einsum("ij,ij->i", true_c, true_c))
    pcc = _safe_div(cov, norm)
    pcc[const_hat] = 0.0
    return float(np.clip(pcc, -1.0, 1.0).mean())
