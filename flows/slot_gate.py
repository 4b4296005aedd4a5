"""One cell at a time per training slot, with the next cell already started beside it.

Between two cells of a worker, about 2.9 s pass with nothing training (docs/PERFORMANCE.md,
orchestration): the finished run's engine shuts down, the worker polls, claims the next run,
forks its process, and the engine loads the run and its deployment. A worker started with
`--limit 2` claims the next cell while the current one trains, so all of that happens
during training; the gate then keeps the slot to one trainer: the cell's body
(`ubo_train`, `ubo_tune_study`) waits here until the cell before it on the same slot is
done.

The gate is an exclusive `flock` on a file named by $UBO_SLOT_GATE, one per worker
(`python -m flows.local --claim-ahead` sets it). The kernel releases it when its holder
exits however it exits (SIGKILL included), so a killed cell never blocks its slot, and a
waiting cell stays RUNNING with its heartbeats going (the lock is waited for with the GIL
released): the parent's dead-child rule (flows/children.py) is unchanged. `on_wait` hears
when a cell starts and stops waiting, so the progress line can tell it from a training one
(`flows.children.mark_waiting_for_slot`). Without $UBO_SLOT_GATE the gate is open: a worker
with `--limit 1` needs none.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

GATE_ENV = "UBO_SLOT_GATE"
# A cell carries this flow run tag while it waits at its gate: RUNNING to Prefect, but not
# training (`flows.children.mark_waiting_for_slot`; the progress line of `flows.local`).
SLOT_WAIT_TAG = "ubo-waiting-for-slot"


@contextlib.contextmanager
def slot_gate(
    log: Callable[[str], None] | None = None, on_wait: Callable[[bool], None] | None = None
) -> Iterator[float]:
    """Hold this worker's slot for the block; yields the seconds waited for it (0.0 with no
    gate). The slot is released when the block ends, before the run's engine reports it
    done, so the next cell's body starts while this one's process winds down. If the slot is
    taken, `on_wait(True)` is called before waiting and `on_wait(False)` once it is ours."""
    path = os.environ.get(GATE_ENV)
    if not path:
        yield 0.0
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        started = time.monotonic()
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # the cell before it on this slot still trains
            if on_wait is not None:
                on_wait(True)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            if on_wait is not None:
                on_wait(False)
        waited = time.monotonic() - started
        if log is not None and waited >= 1.0:
            log(f"waited {waited:.0f} s for this worker's slot ({path})")
        yield waited
    finally:
        os.close(descriptor)  # releases the lock
