"""One contract every registered method keeps, on a planted-structure data set.

The data (tests/planted.py): 60 users x 40 items, two user groups x two item groups,
relevance 0.9 within a group and 0.05 across; training clicks = exposure x relevance with a
known popularity-biased exposure m_i from 0.15 to 0.95 that is independent of the groups; a
random-exposure test set of 10 unexposed items per user. Ranking a user's test items by the
group structure is learnable from the clicks; popularity alone is worth nothing there, so
a trained model must beat a random ranking clearly.

Margin: the expected DCG@3 of a random ranking is ~0.98 here (about 46% of the test items are
positive: 0.46 * (1 + 1/log2 3 + 1/2) = 0.98); a perfect ranking of a user with >= 3
positives scores 2.13. With the config below every method and mode scored at least
random + 0.55 for seeds 0..4 (worst: AlterOpt, paper mode, seed 2, +0.558), so the test asks
for random + 0.4; the suite runs seed 0 only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from planted import planted_feedback

from ubo_core.config import Params
from ubo_core.engine import TrainingTensors
from ubo_core.methods import METHODS, resolve_config
from ubo_core.metrics import expected_random_dcg
from ubo_core.trainer import fit, score_matrix

MARGIN = 0.4
MODES = ("paper", "dense")
# Small and fast: 2282 training pairs, batch 256 (9 steps an epoch) or blocks of 8 users
# (8 steps), lr 0.05 so that 20 epochs converge; evaluation only after the last epoch.
OVERRIDES = {
    "device": "cpu",
    "dim": 4,
    "epochs": 20,
    "batch_size": 256,
    "block_users": 8,
    "lr": 0.05,
    "dense_lr": 0.05,
    "eval_every": 20,
}


@pytest.fixture(scope="module")
def planted():
    data, _, _ = planted_feedback()
    task = TrainingTensors(data, torch.device("cpu")).test_task
    return data, expected_random_dcg(task, 3)


def train(name: str, mode: str, data, seed: int):
    config, hyper = resolve_config(Params(), "coat", name, {**OVERRIDES, "mode": mode})
    return fit(name, data, config, hyper, seed, progress=False)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract(planted, name, mode):
    """For every registered method and engine mode:
    - test DCG@3 > expected random DCG@3 + MARGIN on the planted data (seed 0);
    - the same seed gives a bitwise identical score matrix;
    - another seed gives a different one.
    EM methods (sampling "full") ignore mode; they still keep the contract."""
    data, random_dcg = planted
    assert 0.9 < random_dcg < 1.1  # the closed form of the module docstring
    users = np.arange(data.n_users)

    first = train(name, mode, data, seed=0)
    scores = score_matrix(first.method, users)
    assert scores.shape == (data.n_users, data.n_items)
    assert np.isfinite(scores).all()
    dcg = first.test_metrics["dcg@3"]
    assert dcg > random_dcg + MARGIN, f"{name}/{mode}: DCG@3 {dcg:.3f} vs random {random_dcg:.3f}"

    again = score_matrix(train(name, mode, data, seed=0).method, users)
    assert again.tobytes() == scores.tobytes()

    other = score_matrix(train(name, mode, data, seed=1).method, users)
    assert not np.array_equal(other, scores)
