"""Where a study cell's seconds go besides training (issue 15, part 5).

    python benchmarks/cell_overhead.py imports
    python benchmarks/cell_overhead.py timeline --parent <flow run id> [--api <PREFECT_API_URL>]
    python benchmarks/cell_overhead.py load [--seconds 300]      # while a study runs here

`imports`: a fresh Python process per line, timing the start of the interpreter and each
import a child flow run's process makes before its flow starts (best of 3, so the disk cache
is warm as it is for a worker's second run).

`timeline`: for every child flow run of a finished parent, the time from its creation
(SCHEDULED) to a worker claiming it (PENDING: the worker's poll), from there to the flow
starting in its new process (RUNNING: process start, imports, loading the flow), and the run
itself (RUNNING to COMPLETED: training, evaluation, MLflow logging), from Prefect's state
history; then the means and what share of a worker's busy time the run itself was.

`load`: what the orchestration itself costs in CPU while a study runs on this machine: over
`--seconds`, the CPU time of the Prefect server, the workers, their warm servers, the parent
flow run and everything else (the runs: training, evaluation, MLflow logging), from /proc,
in cores. The long-lived processes are read at both ends of the window; the runs come and
go, so they are the machine's busy time less the rest.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPORTS = {
    "python (no imports)": "pass",
    "import torch": "import torch",
    "import prefect": "import prefect",
    "import mlflow": "import mlflow",
    "import prefect.flow_engine": "import prefect.flow_engine",
    "the child's flow module (flows.benchmark)": "import flows.benchmark",
}


def imports() -> None:
    print("| what a fresh process does | seconds (best of 3) |")
    print("|---|---:|")
    for label, code in IMPORTS.items():
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
            best = min(best, time.perf_counter() - started)
        print(f"| {label} | {best:.2f} |")


def timeline(parent: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from flows.children import PARENT_TAG, read_all_flow_runs

    cells: list[dict] = []  # first timestamp of each state type, per completed child
    with get_client(sync_client=True) as client:
        flt = FlowRunFilter(tags=FlowRunFilterTags(all_=[f"{PARENT_TAG}{parent}"]))
        children = read_all_flow_runs(client, flt)
        parent_run = client.read_flow_run(parent)
        for child in sorted(children, key=lambda run: run.expected_start_time):
            first: dict = {}
            for state in sorted(client.read_flow_run_states(child.id), key=lambda s: s.timestamp):
                first.setdefault(state.type.value, state.timestamp.timestamp())
            if not {"SCHEDULED", "PENDING", "RUNNING", "COMPLETED"} <= first.keys():
                continue
            cells.append(first)
            print(
                f"{child.name:28s} queued {first['PENDING'] - first['SCHEDULED']:6.1f} s  "
                f"start {first['RUNNING'] - first['PENDING']:5.1f} s  "
                f"run {first['COMPLETED'] - first['RUNNING']:6.1f} s"
            )
    if not cells:
        raise SystemExit(f"no completed child of {parent}")
    starts = [cell["RUNNING"] - cell["PENDING"] for cell in cells]
    runs = [cell["COMPLETED"] - cell["RUNNING"] for cell in cells]
    start, run = statistics.mean(starts), statistics.mean(runs)
    print(
        f"\n{len(runs)} children: mean start {start:.1f} s (claimed to flow running), mean run "
        f"{run:.1f} s; the run is {run / (start + run):.0%} of a worker's time per cell, before "
        "its wait for the next poll"
    )
    if parent_run.start_time and parent_run.end_time:
        begin, end = parent_run.start_time.timestamp(), parent_run.end_time.timestamp()
        print_slot_accounts(*slot_accounts(cells, begin, end), len(cells), end - begin)


def slot_accounts(
    cells: list[dict], begin: float, end: float
) -> tuple[dict[str, float], int, list[float]]:
    """Where the parent's wall time went, per slot: each claim (PENDING) is given to the slot
    whose last cell finished first (the workers are not named in the states; with equal
    workers this is how a free one takes the next cell), so a slot's time splits into the
    runs (RUNNING to COMPLETED), the starts (PENDING to RUNNING), the gaps between one cell's
    COMPLETED and its slot's next claim (process exit, the worker's poll), the head (the
    parent's start to the slot's first claim) and the tail (its last COMPLETED to the
    parent's end)."""
    # The most cells claimed at once; at equal times a completion (-1) frees its slot first.
    events = [(cell["PENDING"], +1) for cell in cells] + [(cell["COMPLETED"], -1) for cell in cells]
    busy = slots = 0
    for _, step in sorted(events):
        busy += step
        slots = max(slots, busy)
    free = [begin] * slots  # when each slot's last cell completed
    gaps, head = [], 0.0
    started = [False] * slots
    for cell in sorted(cells, key=lambda c: c["PENDING"]):
        slot = min(range(slots), key=free.__getitem__)
        if started[slot]:
            gaps.append(cell["PENDING"] - free[slot])
        else:
            head += cell["PENDING"] - begin
            started[slot] = True
        free[slot] = cell["COMPLETED"]
    tail = sum(end - done for done in free)
    parts = {
        "runs (RUNNING to COMPLETED)": sum(c["COMPLETED"] - c["RUNNING"] for c in cells),
        "starts (claim to RUNNING)": sum(c["RUNNING"] - c["PENDING"] for c in cells),
        "gaps (COMPLETED to the slot's next claim)": sum(gaps),
        "head (parent start to each slot's first claim)": head,
        "tail (each slot's last COMPLETED to the parent's end)": tail,
    }
    return parts, slots, gaps


def print_slot_accounts(
    parts: dict[str, float], slots: int, gaps: list[float], cells: int, wall: float
) -> None:
    print(f"\nthe parent flow run's {wall:.0f} s on {slots} slot(s), per slot:")
    print("| part | seconds per slot | per cell |")
    print("|---|---:|---:|")
    for label, seconds in parts.items():
        print(f"| {label} | {seconds / slots:.0f} | {seconds / cells:.2f} |")
    accounted = sum(parts.values()) / slots
    print(f"| sum (the wall time, if the slots never overlapped) | {accounted:.0f} | |")
    if gaps:
        print(f"gap per cell: median {statistics.median(gaps):.2f} s, largest {max(gaps):.1f} s")


# Long-lived processes of a local study, by their command line (flows/local.py starts them).
ROLES = {
    "Prefect server": "prefect server start",
    "workers (prefect worker)": "prefect worker start",
    "warm servers": "flows.warm serve",
    # Alive at both ends of a window: the parent flow run, which polls its children.
    "the parent flow run": "-m prefect.engine",
}


def _cpu_ticks(pid: int) -> int | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15)


def _processes() -> dict[int, str]:
    """pid -> role of the study's long-lived processes. A warm server's forked runs carry its
    command line: a warm server is one whose parent is a worker."""
    found: dict[int, tuple[str, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        for role, pattern in ROLES.items():
            if pattern in args:
                found[int(entry.name)] = (role, parent)
    workers = {pid for pid, (role, _) in found.items() if role.startswith("workers")}
    return {
        pid: role
        for pid, (role, parent) in found.items()
        if role != "warm servers" or parent in workers
    }


def _busy_ticks() -> int:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def load(seconds: float) -> None:
    import os

    processes = _processes()
    if not any(role == "Prefect server" for role in processes.values()):
        raise SystemExit("load: no Prefect server on this machine (start a study first)")
    start = {pid: _cpu_ticks(pid) for pid in processes}
    busy, started = _busy_ticks(), time.monotonic()
    time.sleep(seconds)
    end = {pid: _cpu_ticks(pid) for pid in processes}
    busy, elapsed = _busy_ticks() - busy, time.monotonic() - started
    hz = os.sysconf("SC_CLK_TCK")
    per_role: dict[str, float] = {}
    for pid, role in processes.items():
        if start[pid] is not None and end[pid] is not None:
            per_role[role] = per_role.get(role, 0.0) + (end[pid] - start[pid]) / hz / elapsed
    cores = os.cpu_count() or 1
    print(f"over {elapsed:.0f} s on {cores} cores: machine busy {busy / hz / elapsed:.2f} cores")
    print("| process | cores used |")
    print("|---|---:|")
    for role in ROLES:
        print(f"| {role} | {per_role.get(role, 0.0):.3f} |")
    rest = busy / hz / elapsed - sum(per_role.values())
    print(f"| the rest (the runs, this sampler) | {rest:.3f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["imports", "timeline", "load"])
    parser.add_argument("--parent", help="the parent flow run id (timeline)")
    parser.add_argument("--seconds", type=float, default=300.0, help="the window (load)")
    args = parser.parse_args()
    if args.what == "imports":
        imports()
    elif args.what == "load":
        load(args.seconds)
    else:
        if not args.parent:
            parser.error("timeline needs --parent")
        timeline(args.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
