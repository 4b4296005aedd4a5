"""Ending a run early and keeping it: `fit`'s StopTraining (a callback ends training after the
epoch it was handed; the result is the run trained to that epoch), and benchmarks/fidelity.py's
patience (a run stops once hyper-validation has not improved for `patience` epochs, at the
same epoch whether it ran straight through or was resumed from a checkpoint)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from planted import planted_feedback

from ubo_core.config import Params
from ubo_core.methods import resolve_config
from ubo_core.trainer import StopTraining, fit

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity.py"
OVERRIDES = {
    "device": "cpu",
    "dim": 4,
    "batch_size": 256,
    "block_users": 8,
    "lr": 0.05,
    "dense_lr": 0.05,
    "eval_every": 1,
    "mode": "dense",
}


@pytest.fixture(scope="module")
def fidelity():
    spec = importlib.util.spec_from_file_location("fidelity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fidelity"] = module  # its dataclasses look their module up while defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data():
    return planted_feedback(n_users=30, n_items=24, n_test_items=6, seed=3)[0]


def curve(result) -> list[tuple]:
    return [(r.epoch, r.step, r.losses, r.metrics, r.test) for r in result.history]


def test_stop_training_keeps_the_run_as_trained_to_that_epoch(data):
    train, hyper = resolve_config(Params(), "coat", "ubo", {**OVERRIDES, "epochs": 5})
    short, _ = resolve_config(Params(), "coat", "ubo", {**OVERRIDES, "epochs": 2})

    def stop_at_two(report):
        if report.epoch == 2:
            raise StopTraining

    stopped = fit("ubo", data, train, hyper, seed=1, progress=False, callback=stop_at_two)
    straight = fit("ubo", data, short, hyper, seed=1, progress=False)
    assert [r.epoch for r in stopped.history] == [1, 2]
    assert curve(stopped) == curve(straight)
    assert stopped.test_metrics == straight.test_metrics
    for name, value in straight.method.state().items():
        assert torch.equal(stopped.method.state()[name], value), name


def stopping_epoch(hypers: list[float], patience: int) -> int:
    """The rule, worked by hand on a curve: the first epoch `patience` after the best so far."""
    best, best_epoch = -float("inf"), 0
    for epoch, value in enumerate(hypers, 1):
        if value > best:
            best, best_epoch = value, epoch
        if epoch - best_epoch >= patience:
            return epoch
    return len(hypers)


def test_patience_stops_at_the_same_epoch_straight_or_resumed(fidelity, data, tmp_path):
    row = fidelity.Row("test", "", "", "", (), datasets=("coat",))
    variant = fidelity.Variant("p", OVERRIDES, epochs=40, patience=2)
    key = fidelity.run_key(Params(), row, variant, "coat", 0, "test")
    assert key["patience"] == 2
    full = fidelity.train_record({**key, "patience": None}, data)  # the same run, no stop
    hypers = [p["hyper"] for p in full["curve"]]
    expected = stopping_epoch(hypers, 2)
    assert expected < 40, "the planted run must stall for the test to check a stop"

    straight = fidelity.train_record(key, data)
    assert straight["stopped_early_at"] == expected
    assert straight["curve"] == full["curve"][:expected]

    # Killed after epoch expected - 1, with a checkpoint: the resumed run counts the epochs
    # before the checkpoint and stops where the straight one did.
    path = tmp_path / "run.pt"
    train = fidelity.TrainConfig(**key["train"])
    hyper = fidelity.get_method("ubo").Hyper(**key["hyper"])

    class Killed(Exception):
        pass

    def kill_at(report):
        if report.epoch == expected:
            raise Killed

    with pytest.raises(Killed):
        fit("ubo", data, train, hyper, 0, callback=kill_at, progress=False, track_test=True,
            checkpoint=path, checkpoint_seconds=0.0)  # fmt: skip
    resumed = fidelity.train_record(key, data, checkpoint=path)
    assert resumed["resumed"] and resumed["stopped_early_at"] == expected
    assert resumed["curve"] == straight["curve"]


def test_a_run_without_patience_keeps_the_key_it_was_recorded_with(fidelity):
    row = fidelity.Row("test", "", "", "", (), datasets=("coat",))
    key = fidelity.run_key(Params(), row, fidelity.Variant("p", OVERRIDES), "coat", 0, "test")
    assert "patience" not in key


def test_longest_stall_is_the_longest_wait_for_a_new_best(fidelity):
    # Bests at epochs 1, 2 and 5 (waits 1, 1, 3); the flat end after epoch 5 never ends in a
    # new best, so it is not a stall an early stop would have cut short.
    curve = [{"epoch": e, "hyper": h} for e, h in enumerate([1.0, 2.0, 1.0, 1.5, 3.0, 2.0, 2.0], 1)]
    assert fidelity.longest_stall(curve) == 3
