"""benchmarks/cell_overhead.py's per-slot account of a study's wall time (issue 15, part 5),
against a hand-worked timeline: its parts must add up to the wall time on every slot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cell_overhead.py"


@pytest.fixture(scope="module")
def cell_overhead():
    spec = importlib.util.spec_from_file_location("cell_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cell(pending: float, running: float, completed: float) -> dict:
    return {"SCHEDULED": 0.0, "PENDING": pending, "RUNNING": running, "COMPLETED": completed}


def test_two_slots_by_hand(cell_overhead):
    # The parent runs from 0 to 20 s. A and B are claimed at once; C takes B's slot (free at
    # 8) at 9, D takes A's (free at 10) at 11.
    cells = [cell(1, 2, 10), cell(1.5, 2.5, 8), cell(9, 9.5, 15), cell(11, 12, 18)]
    parts, slots, gaps = cell_overhead.slot_accounts(cells, 0.0, 20.0)
    assert slots == 2
    assert sorted(gaps) == [1.0, 1.0]  # 9 - 8 and 11 - 10
    assert list(parts.values()) == pytest.approx(
        [
            8 + 5.5 + 5.5 + 6,  # runs
            1 + 1 + 0.5 + 1,  # starts
            2.0,  # gaps
            1 + 1.5,  # head: each slot's first claim
            (20 - 18) + (20 - 15),  # tail: each slot's last completion to the end
        ]
    )
    assert sum(parts.values()) == pytest.approx(2 * 20.0)  # every second of both slots


def test_a_claim_at_the_instant_another_cell_completes_reuses_its_slot(cell_overhead):
    cells = [cell(0, 1, 5), cell(5, 6, 9)]
    parts, slots, gaps = cell_overhead.slot_accounts(cells, 0.0, 10.0)
    assert slots == 1 and gaps == [0.0]
    assert sum(parts.values()) == pytest.approx(10.0)
