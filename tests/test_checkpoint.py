"""Resumable training (ubo_core/checkpoint.py, `fit(checkpoint=...)`): a run stopped after an
epoch and resumed from its checkpoint ends with exactly the parameters and curves of the same
run uninterrupted, for every registered method in both modes (state the checkpoint missed,
an optimiser's moments, a step count, a generator, a counter a method keeps, would show as a
difference); a checkpoint of another run, or a damaged one, stops with one line naming the
file; a kill while saving leaves the previous checkpoint whole."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from planted import planted_feedback

from ubo_core import checkpoint as checkpoints
from ubo_core.config import Params
from ubo_core.errors import UboError
from ubo_core.methods import METHODS, resolve_config
from ubo_core.trainer import fit

ROOT = Path(__file__).resolve().parents[1]

OVERRIDES = {
    "device": "cpu",
    "dim": 4,
    "epochs": 4,
    "batch_size": 256,
    "block_users": 8,
    "lr": 0.05,
    "dense_lr": 0.05,
    "eval_every": 1,
}


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def data():
    return planted_feedback(n_users=30, n_items=24, n_test_items=6, seed=3)[0]


def config(name: str, mode: str, **extra):
    return resolve_config(Params(), "coat", name, {**OVERRIDES, "mode": mode, **extra})


def stop_after(epoch: int):
    def callback(report):
        if report.epoch == epoch:
            raise Stop

    return callback


def curve(result) -> list[tuple]:
    return [(r.epoch, r.step, r.losses, r.metrics, r.test) for r in result.history]


@pytest.mark.parametrize("mode", ["paper", "dense"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_stopped_run_resumes_to_the_same_numbers(data, tmp_path, name, mode):
    train, hyper = config(name, mode)
    straight = fit(name, data, train, hyper, seed=1, progress=False, track_test=True)
    path = tmp_path / "run.ckpt"
    with pytest.raises(Stop):  # killed during epoch 3: epochs 1-2 are saved
        fit(
            name, data, train, hyper, seed=1, progress=False, track_test=True,
            checkpoint=path, checkpoint_seconds=0.0, callback=stop_after(3),
        )  # fmt: skip
    assert path.is_file()
    resumed = fit(
        name, data, train, hyper, seed=1, progress=False, track_test=True,
        checkpoint=path, checkpoint_seconds=0.0,
    )  # fmt: skip
    assert curve(resumed) == curve(straight)
    assert resumed.test_metrics == straight.test_metrics
    for key, value in straight.method.state().items():
        assert torch.equal(resumed.method.state()[key], value), key


def test_a_checkpoint_of_another_run_or_a_damaged_one_stops_naming_the_file(data, tmp_path):
    train, hyper = config("umf", "paper")
    path = tmp_path / "run.ckpt"
    fit("umf", data, train, hyper, seed=1, progress=False, checkpoint=path)
    other, _ = config("umf", "paper", lr=0.01)
    with pytest.raises(UboError, match=r"run\.ckpt: a checkpoint of another run .*train"):
        fit("umf", data, other, hyper, seed=1, progress=False, checkpoint=path)
    with pytest.raises(UboError, match="seed"):
        fit("umf", data, train, hyper, seed=2, progress=False, checkpoint=path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UboError, match=r"run\.ckpt: not a readable checkpoint"):
        fit("umf", data, train, hyper, seed=1, progress=False, checkpoint=path)


def test_a_kill_while_saving_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    train, hyper = config("umf", "paper")
    path = tmp_path / "run.ckpt"
    with pytest.raises(Stop):
        fit(
            "umf", data, train, hyper, seed=1, progress=False, checkpoint=path,
            checkpoint_seconds=0.0, callback=stop_after(2),
        )  # fmt: skip
    before = path.read_bytes()

    def killed(*_, **__):
        raise KeyboardInterrupt  # as a SIGINT mid-write would

    monkeypatch.setattr(checkpoints.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        fit("umf", data, train, hyper, seed=1, progress=False, checkpoint=path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]  # no temporary left


def test_a_killed_command_resumes_to_the_output_of_an_uninterrupted_one(tmp_path):
    """`python -m ubo_core.train --checkpoint`, killed with SIGKILL once its first checkpoint
    exists, then run again: it resumes in a new process (nothing carried over in memory) and
    prints what the uninterrupted command printed; the checkpoint is gone afterwards."""
    from test_train_cli import tiny_processed

    params = tiny_processed(tmp_path)
    argv = [sys.executable, "-m", "ubo_core.train", "--dataset", "coat", "--method", "ubo"]
    argv += ["--mode", "paper", "--epochs", "100", "--device", "cpu", "--no-progress"]
    argv += ["--params", str(params), "--set", "lr=0.05"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def output(done: subprocess.CompletedProcess) -> dict:
        assert done.returncode == 0, done.stderr[-2000:]
        line = json.loads(done.stdout)
        line.pop("seconds")
        return line

    straight = output(subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600))
    checkpoint = tmp_path / "ubo.ckpt"
    resumable = [*argv, "--checkpoint", str(checkpoint), "--checkpoint-seconds", "0"]
    process = subprocess.Popen(resumable, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL and checkpoint.is_file()
    resumed = subprocess.run(resumable, env=env, capture_output=True, text=True, timeout=600)
    assert "ubo: resuming from" in resumed.stderr and "after epoch" in resumed.stderr
    assert output(resumed) == straight
    assert not checkpoint.exists()
