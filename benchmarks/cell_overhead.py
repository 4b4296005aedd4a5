"""Where a study cell's seconds go besides training (issue 15, part 5).

    python benchmarks/cell_overhead.py imports
    python benchmarks/cell_overhead.py timeline --parent <flow run id> [--api <PREFECT_API_URL>]

`imports`: a fresh Python process per line, timing the start of the interpreter and each
import a child flow run's process makes before its flow starts (best of 3, so the disk cache
is warm as it is for a worker's second run).

`timeline`: for every child flow run of a finished parent, the time from its creation
(SCHEDULED) to a worker claiming it (PENDING: the worker's poll), from there to the flow
starting in its new process (RUNNING: process start, imports, loading the flow), and the run
itself (RUNNING to COMPLETED: training, evaluation, MLflow logging), from Prefect's state
history; then the means and what share of a worker's busy time the run itself was.
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

    from flows.children import PARENT_TAG

    waits, starts, runs = [], [], []
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"{PARENT_TAG}{parent}"]))
        )
        for child in sorted(children, key=lambda run: run.expected_start_time):
            first: dict = {}
            for state in sorted(client.read_flow_run_states(child.id), key=lambda s: s.timestamp):
                first.setdefault(state.type.value, state.timestamp)
            if not {"SCHEDULED", "PENDING", "RUNNING", "COMPLETED"} <= first.keys():
                continue
            waits.append((first["PENDING"] - first["SCHEDULED"]).total_seconds())
            starts.append((first["RUNNING"] - first["PENDING"]).total_seconds())
            runs.append((first["COMPLETED"] - first["RUNNING"]).total_seconds())
            print(
                f"{child.name:28s} queued {waits[-1]:6.1f} s  start {starts[-1]:5.1f} s  "
                f"run {runs[-1]:6.1f} s"
            )
    if not runs:
        raise SystemExit(f"no completed child of {parent}")
    start, run = statistics.mean(starts), statistics.mean(runs)
    print(
        f"\n{len(runs)} children: mean start {start:.1f} s (claimed to flow running), mean run "
        f"{run:.1f} s; the run is {run / (start + run):.0%} of a worker's time per cell, before "
        "its wait for the next poll"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["imports", "timeline"])
    parser.add_argument("--parent", help="the parent flow run id (timeline)")
    args = parser.parse_args()
    if args.what == "imports":
        imports()
    else:
        if not args.parent:
            parser.error("timeline needs --parent")
        timeline(args.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
