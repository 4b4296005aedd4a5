"""flows/slot_gate.py: one cell at a time per slot. A second holder of the same gate waits
until the first leaves (or is killed: the kernel drops a dead process's lock at once); other
slots' gates do not wait on it; without $UBO_SLOT_GATE the gate is open."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.slot_gate import GATE_ENV, slot_gate

ROOT = Path(__file__).resolve().parents[1]
HOLDER = """
import sys, time
from flows.slot_gate import slot_gate
with slot_gate():
    print("holding", flush=True)
    time.sleep(float(sys.argv[1]))
"""


def hold(gate: Path, seconds: float) -> subprocess.Popen:
    """A process that holds `gate` for `seconds`, started once it holds it."""
    env = os.environ | {GATE_ENV: str(gate), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(seconds)], env=env, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "holding"
    return process


def test_without_a_gate_nothing_waits(monkeypatch, tmp_path):
    monkeypatch.delenv(GATE_ENV, raising=False)
    with slot_gate() as waited:
        assert waited == 0.0
    assert list(tmp_path.iterdir()) == []


def test_a_second_cell_waits_for_the_first_to_leave(monkeypatch, tmp_path):
    gate = tmp_path / "slots" / "ubo-cpu-0.lock"
    first = hold(gate, 1.5)
    monkeypatch.setenv(GATE_ENV, str(gate))
    lines: list[str] = []
    with slot_gate(lines.append) as waited:
        assert first.poll() is not None or waited >= 1.0  # entered only once the first left
    assert first.wait() == 0
    assert 1.0 <= waited < 10.0
    assert lines and "waited" in lines[0] and str(gate) in lines[0]


def test_on_wait_hears_a_wait_begin_and_end_and_nothing_when_the_slot_is_free(
    monkeypatch, tmp_path
):
    """The progress line counts a cell waiting at the gate apart from a training one
    (flows.children.mark_waiting_for_slot): on_wait(True) before the wait, (False) after."""
    gate = tmp_path / "ubo-cpu-0.lock"
    monkeypatch.setenv(GATE_ENV, str(gate))
    heard: list[tuple[bool, float]] = []  # (waiting, when)
    first = hold(gate, 3.0)  # 2 s of slack for a loaded machine
    with slot_gate(on_wait=lambda waiting: heard.append((waiting, time.monotonic()))) as waited:
        assert [waiting for waiting, _ in heard] == [True, False]
        assert heard[1][1] - heard[0][1] >= 1.0 and waited >= 1.0  # False once the first left
    assert first.wait() == 0
    heard.clear()
    with slot_gate(on_wait=lambda waiting: heard.append((waiting, time.monotonic()))):
        pass
    assert heard == []


def test_a_killed_holder_frees_its_slot_at_once(monkeypatch, tmp_path):
    gate = tmp_path / "ubo-cpu-0.lock"
    holder = hold(gate, 60.0)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    monkeypatch.setenv(GATE_ENV, str(gate))
    started = time.monotonic()
    with slot_gate():
        pass
    assert time.monotonic() - started < 1.0


def test_other_slots_do_not_wait(monkeypatch, tmp_path):
    holder = hold(tmp_path / "ubo-cpu-0.lock", 30.0)
    try:
        monkeypatch.setenv(GATE_ENV, str(tmp_path / "ubo-cpu-1.lock"))
        with slot_gate() as waited:
            assert waited < 1.0
    finally:
        holder.kill()
        holder.wait()


def test_the_gate_is_released_when_the_block_raises(monkeypatch, tmp_path):
    monkeypatch.setenv(GATE_ENV, str(tmp_path / "gate.lock"))
    with pytest.raises(RuntimeError), slot_gate():
        raise RuntimeError("a failed cell")
    holder = hold(tmp_path / "gate.lock", 0.0)  # would block if the lock were kept
    assert holder.wait(timeout=10) == 0
