"""Shared fixtures of the data-module tests: tiny, hand-checkable inputs built in memory."""

from __future__ import annotations

import numpy as np
import pytest

from ubo_core.data import FeedbackData


@pytest.fixture
def tiny_feedback() -> FeedbackData:
    """A valid 3 users x 4 items data set, small enough to work out by hand.

    train (user, item, label): (0,0,1) (0,1,0) (1,0,1) (1,1,1) (2,2,1) (2,3,0)
      -> item popularity (training positives per item) [2, 1, 1, 0], user activity [1, 2, 1]
    test  (user, item, label): (0,2,1) (0,3,0) (1,0,1) (1,2,1) (2,1,0)
      -> user 0 has a test positive, a test negative and a training positive: eval_users [0]
         (user 1 has no test negative, user 2 no test positive)
    """
    return FeedbackData(
        n_users=3,
        n_items=4,
        train_user=np.array([0, 0, 1, 1, 2, 2], np.int32),
        train_item=np.array([0, 1, 0, 1, 2, 3], np.int32),
        train_label=np.array([1, 0, 1, 1, 1, 0], np.int8),
        test_user=np.array([0, 0, 1, 1, 2], np.int32),
        test_item=np.array([2, 3, 0, 2, 1], np.int32),
        test_label=np.array([1, 0, 1, 1, 0], np.int8),
        eval_users=np.array([0], np.int32),
    )


def pytest_configure(config: pytest.Config) -> None:
    """One test process compiles each fused kernel (ubo_core/fused.py) for many more inputs
    than a run does: float64 references, float and byte cell tables, blocks under 4,096
    cells (which inductor specialises). Dynamo stops at 8 compilations of one function and
    raises; a run compiles each kernel once or twice."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = 64


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The suite's tensors are tiny: on a busy 2-core machine torch's intra-op threads spend
    ~100x longer handing work over than computing (measured: 15 ms against 0.005 ms for one
    small matmul). One thread per test, restored afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
