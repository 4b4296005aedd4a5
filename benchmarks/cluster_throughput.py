"""Study throughput on the several-machines setup (flows.cluster: PostgreSQL, Prefect and
MLflow servers, worker hosts), for docs/SCALING.md.

    pip install -e '.[cluster]'       # PostgreSQL's driver for the MLflow server
    python benchmarks/cluster_throughput.py [--workers 1 2 4] [--out docs/scaling.json]

Two measurements, in one run on this machine:
1. Small real runs: a study of `--cells` Coat runs (umf and ubo, `--epochs` epochs) through
   `ubo/full-benchmark` with 1, 2 and 4 worker hosts alive: wall time, cells per minute,
   and the utilisation sum(child run times) / (workers x wall).
2. What the servers sustain: `--clients` threads replay a cell's API traffic against the
   two servers, without training (create the child flow run from its deployment, its
   Pending/Running/Completed states; an MLflow run with the params,
   tags, 30 epochs of 4 curves, 20 final metrics and a small artifact, then FINISHED):
   cells per minute. Dividing by a real cell's rate gives how many workers the servers can
   feed before they, not the workers, set the pace.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flows import cluster  # noqa: E402


def run_study(state: cluster.ClusterState, experiment: str, seeds: int, epochs: int) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.deployments import run_deployment

    from flows.children import PARENT_TAG

    started = time.monotonic()
    parent = run_deployment(
        "ubo/full-benchmark",
        parameters={
            "datasets": ["coat"],
            "methods": ["umf", "ubo"],
            "seeds": list(range(seeds)),
            "epochs": epochs,
            "overrides": {"threads": 1, "device": "cpu"},
            "poll_seconds": 1.0,
            "experiment": experiment,
        },
        timeout=0,
    )
    with get_client(sync_client=True) as client:
        while not (final := client.read_flow_run(parent.id)).state.is_final():
            time.sleep(1)
        wall = time.monotonic() - started
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"{PARENT_TAG}{parent.id}"]))
        )
    assert final.state.is_completed(), final.state.message
    busy = sum(child.total_run_time.total_seconds() for child in children)
    return {"cells": len(children), "wall_s": wall, "child_run_s": busy}


def replay_cells(state: cluster.ClusterState, clients: int, seconds: float) -> dict:
    """`clients` threads replaying a cell's API traffic for `seconds`; cells per minute."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Completed, Pending, Running

    deployment_id = None
    with get_client(sync_client=True) as client:
        deployment_id = client.read_deployment_by_name("ubo-train/cpu").id
    tracking = MlflowClient(state.mlflow_url)
    experiment = tracking.create_experiment(f"replay-{time.time_ns()}")
    done, errors, stop = [], [], time.monotonic() + seconds
    artifact = Path(tempfile.mkdtemp()) / "config.json"
    artifact.write_text(json.dumps({"k": list(range(100))}))

    def worker() -> None:
        # Settings are per thread (a context variable): without its own, a thread's client
        # would start a temporary local server instead of talking to the cluster's.
        with (
            temporary_settings({PREFECT_API_URL: state.prefect_url}),
            get_client(sync_client=True) as client,
        ):
            while time.monotonic() < stop:
                try:
                    run = client.create_flow_run_from_deployment(
                        deployment_id, parameters={"dataset": "coat", "method": "umf", "seed": 0}
                    )
                    # No worker is alive, so nothing trains it: the states are set as a
                    # worker's and the engine's would be.
                    for new_state in (Pending(), Running()):
                        client.set_flow_run_state(run.id, new_state, force=True)
                    mlflow_run = tracking.create_run(experiment, run_name="replay")
                    run_id = mlflow_run.info.run_id
                    tracking.log_batch(
                        run_id,
                        params=[Param(f"p{i}", str(i)) for i in range(25)],
                        tags=[RunTag(f"t{i}", str(i)) for i in range(10)],
                    )
                    now = int(time.time() * 1000)
                    for epoch in range(1, 31):
                        tracking.log_batch(
                            run_id,
                            metrics=[Metric(f"curve{i}", 0.5, now, epoch) for i in range(4)],
                        )
                    tracking.log_batch(
                        run_id, metrics=[Metric(f"final{i}", 0.5, now, 0) for i in range(20)]
                    )
                    tracking.log_artifact(run_id, str(artifact))
                    tracking.set_terminated(run_id, "FINISHED")
                    client.set_flow_run_state(run.id, Completed(), force=True)
                    done.append(time.monotonic())
                except Exception as error:  # a server that cannot keep up: count it
                    errors.append(repr(error)[:200])

    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - started
    shutil.rmtree(artifact.parent, ignore_errors=True)
    return {
        "clients": clients,
        "cells": len(done),
        "seconds": elapsed,
        "cells_per_min": 60 * len(done) / elapsed,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seeds", type=int, default=6, help="cells = 2 methods x seeds")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--replay-seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "scaling.json")
    args = parser.parse_args()
    import importlib.util

    if importlib.util.find_spec("psycopg2") is None:  # else MLflow's server dies at start
        raise SystemExit(
            "cluster_throughput: the MLflow server needs PostgreSQL's driver: "
            "pip install -e '.[cluster]' (docs/SCALING.md)"
        )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = Path(tempfile.mkdtemp(prefix="ubo-scaling-"))
    hosts = max(args.workers)
    state = cluster.up(root, hosts=hosts, datasets=["coat"])
    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "command": "python benchmarks/cluster_throughput.py " + " ".join(sys.argv[1:]),
        "studies": [],
        "replay": [],
    }
    try:
        with temporary_settings({PREFECT_API_URL: state.prefect_url}):
            for count in sorted(args.workers):
                for name in state.hosts[count:]:
                    cluster.kill_host(state, name)
                for name in state.hosts[:count]:
                    if f"{name}/worker" not in state.pids:
                        cluster.start_worker(state, name)
                time.sleep(5)  # the workers' first poll
                study = run_study(state, f"scaling-{count}", args.seeds, args.epochs)
                study |= {
                    "workers": count,
                    "cells_per_min": 60 * study["cells"] / study["wall_s"],
                    "utilisation": study["child_run_s"] / (count * study["wall_s"]),
                }
                results["studies"].append(study)
                print(json.dumps(study), flush=True)
            for name in list(state.hosts):  # the replay alone on the servers
                cluster.kill_host(state, name)
            for clients in args.clients:
                replay = replay_cells(state, clients, args.replay_seconds)
                results["replay"].append(replay)
                print(json.dumps(replay), flush=True)
    finally:
        cluster.down(root)
        shutil.rmtree(root, ignore_errors=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
