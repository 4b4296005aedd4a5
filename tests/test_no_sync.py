"""A training step never waits for the device: no host synchronisation inside a step.

On a GPU a step that reads a value back (`.item()`, `bool(t)`, `float(t)`) or produces a
tensor whose shape depends on the data (`nonzero`, `unique`, boolean indexing,
`repeat_interleave` without `output_size`) stalls the host until every queued kernel has run,
and cannot be captured as a CUDA graph. On the CPU the same calls leave their mark in the
profile: every read-back goes through `aten::_local_scalar_dense` and the data-sized ops
have their own names. So the test runs steps of every method in every mode on the CPU under
torch.profiler and asserts that none of those operations appears. The sampler's per-epoch
work (one permutation, one read of the block sizes) is outside the step and allowed.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from planted import planted_feedback

from ubo_core.config import Params
from ubo_core.engine import TrainingTensors, UnlabeledItems
from ubo_core.methods import METHODS, resolve_config
from ubo_core.trainer import build_method, make_sampler

# The operations that synchronise with the device or size their output by the data.
SYNCING = {
    "aten::_local_scalar_dense",  # .item(), bool(), float(), int() of a tensor
    "aten::item",
    "aten::is_nonzero",
    "aten::nonzero",
    "aten::nonzero_static",
    "aten::unique",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::masked_select",
    "aten::equal",
}
# The EM methods (sampling "full") take one step per epoch over the whole matrix; their
# steps are not part of the paper-mode/dense-mode engine this test is about.
STEPPED = sorted(name for name, cls in METHODS.items() if cls.sampling != "full")
CONFIGS = [("paper", "adam"), ("paper", "lazy_adam"), ("dense", "adam")]


@pytest.fixture(scope="module")
def tensors():
    data, _, _ = planted_feedback()
    return data, TrainingTensors(data, torch.device("cpu"))


def syncing_ops(name: str, mode: str, optimizer: str, tensors) -> list[str]:
    _, t = tensors
    overrides = {"device": "cpu", "dim": 4, "mode": mode, "optimizer": optimizer}
    overrides |= {"batch_size": 256, "block_users": 8, "val_batch_size": 64}
    train, hyper = resolve_config(Params(), "coat", name, overrides)
    method, generator = build_method(name, t, train, hyper, seed=0)
    sampler = make_sampler(METHODS[name].sampling, t, train, generator)
    batches = itertools.chain.from_iterable(sampler.epoch() for _ in itertools.count())
    for _ in range(3):  # warm-up: first-call work (lazy tables, allocations)
        method.step(next(batches))
    epoch = sampler.epoch()
    first = next(epoch)  # the epoch's own set-up happens here, outside the profile
    method.step(first)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for batch in itertools.islice(epoch, 3):
            method.step(batch)
    return sorted({event.name for event in prof.events() if syncs(event)})


def syncs(event) -> bool:
    """A synchronising op, except the fused Adam kernel's read of its step count: on the
    CPU that tensor is host memory (`aten::item` on it waits for nothing); the CUDA kernel
    reads it on the device."""
    if event.name not in SYNCING:
        return False
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == "aten::_fused_adam_":
            return False
        parent = parent.cpu_parent
    return True


@pytest.mark.parametrize(("mode", "optimizer"), CONFIGS)
@pytest.mark.parametrize("name", STEPPED)
def test_a_step_issues_no_host_synchronisation(tensors, name, mode, optimizer):
    assert syncing_ops(name, mode, optimizer, tensors) == []


def test_the_check_sees_a_synchronisation():
    """The detector itself: a read-back and a data-sized op are both seen."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        x = torch.arange(5)
        bool((x > 2).any())
        torch.unique(x)
    keys = {event.key for event in prof.key_averages()}
    assert "aten::_local_scalar_dense" in keys and keys & {"aten::_unique2", "aten::unique"}


def test_unlabeled_items_are_drawn_uniformly_from_each_users_unlabeled_training_items(tensors):
    """BPR's negatives: for every user, every unlabeled training item (R~ = 0, not held out)
    and nothing else, each about equally often (a chi-square bound per user)."""
    _, t = tensors
    unlabeled = UnlabeledItems(t)
    generator = torch.Generator().manual_seed(0)
    users = torch.arange(t.n_users).repeat_interleave(4000)
    drawn = unlabeled.sample(users, generator).view(t.n_users, 4000)
    allowed = (t.labels == 0) & t.in_train
    for user in range(t.n_users):
        counts = torch.bincount(drawn[user], minlength=t.n_items).double()
        assert bool((counts[~allowed[user]] == 0).all()), user
        expected = 4000 / int(allowed[user].sum())
        chi2 = float(((counts[allowed[user]] - expected) ** 2 / expected).sum())
        dof = int(allowed[user].sum()) - 1
        assert chi2 < dof + 6 * (2 * dof) ** 0.5, (user, chi2, dof)  # ~6 sigma
