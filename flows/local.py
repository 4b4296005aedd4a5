"""`make benchmark` / `make tune`: the study or the tuning on this machine, with real Prefect
and MLflow services.

    python -m flows.local [--flow benchmark|tune] [--smoke] [--cpu-workers N] [--param k=v ...]

If PREFECT_API_URL is not set it starts a local Prefect server (SQLite under .prefect/) and
stops it at the end; it creates the work pools, deploys prefect.yaml, starts workers (one per
GPU with CUDA_VISIBLE_DEVICES pinned, else `--cpu-workers` CPU workers), runs
`ubo/full-benchmark` (or `ubo/tune`), shows finished / running / failed children while it
waits, prints the result tables and stops everything it started, also on Ctrl-C or failure.
Runs train in params.yaml's `train.mode` (dense; `--param mode=paper` for the benchmark).
MLflow defaults to sqlite:///<repo>/mlflow.db with artifacts in <repo>/mlruns
(MLFLOW_TRACKING_URI overrides).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml

from flows.services import (
    REPO,
    STATE_DIR,
    Services,
    exclusive_run,
    free_port,
    prefect,
    report_leftovers,
    report_locked_database,
    service_env,
    start_server,
)
from flows.slot_gate import GATE_ENV, SLOT_WAIT_TAG
from flows.warm import RUN_THREADS_ENV
from ubo_core.errors import UboError

SMOKE = {"seeds": [0], "epochs": 3}  # and one data set: smoke_dataset()
CONTROL_POOL, CPU_POOL, GPU_POOL = "ubo-control", "ubo-cpu", "ubo-gpu"


def gpu_count() -> int:
    if shutil.which("nvidia-smi") is None:
        return 0
    done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(1 for line in done.stdout.splitlines() if line.startswith("GPU "))


def smoke_dataset() -> str:
    """Coat, or without it in params.yaml's catalog the catalog's first data set."""
    from ubo_core.config import load_params

    catalog = load_params(REPO / "params.yaml").catalog
    return "coat" if "coat" in catalog else next(iter(catalog))


def parse_params(pairs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RuntimeError(f"--param: expected key=value, got {pair!r}")
        try:
            params[key] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            problem = str(error).splitlines()[0]
            raise RuntimeError(
                f"--param: {pair!r}: the value is not valid YAML ({problem})"
            ) from None
    return params


# States a run of a stopped local run can be left in: none of them is final, and RUNNING,
# PENDING and CANCELLING runs hold a slot of the pool's concurrency limit.
STALE_STATES = ("RUNNING", "PENDING", "CANCELLING", "PAUSED")


def orphans(runs: list[tuple[str, str, list[str]]], parent_tag: str) -> tuple[list[str], list[str]]:
    """Of the non-final runs (id, state type, tags) on a server no worker serves yet: those
    to mark crashed (every RUNNING, PENDING, CANCELLING or PAUSED run: nothing runs them) and
    those to cancel (SCHEDULED children whose parent, named by `parent_tag` + its id, is not
    itself waiting to start: the new workers would train them for a parent that is gone)."""
    to_crash = [run_id for run_id, state, _ in runs if state in STALE_STATES]
    waiting = {run_id for run_id, state, _ in runs if state == "SCHEDULED"}
    to_cancel = [
        run_id
        for run_id, state, tags in runs
        if state == "SCHEDULED"
        and any(t.startswith(parent_tag) and t[len(parent_tag) :] not in waiting for t in tags)
    ]
    return to_crash, to_cancel


def clear_orphans(env: dict[str, str]) -> int:
    """Close what an earlier local run on this Prefect home left when it was stopped (its
    workers killed mid-run): a RUNNING child would hold a training slot for ever and its
    parent's SCHEDULED children would run again. Called only on the server this process
    started, under the Prefect-home lock, before any worker: nothing else can be running
    them. Returns how many runs it closed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelled, Crashed

    from flows.children import PARENT_TAG, read_all_flow_runs

    open_types = [StateType.SCHEDULED, *(StateType(state) for state in STALE_STATES)]
    flt = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=open_types)))
    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as client:
            runs = read_all_flow_runs(client, flt)
            to_crash, to_cancel = orphans(
                [(str(r.id), r.state_type.value, list(r.tags)) for r in runs if r.state_type],
                PARENT_TAG,
            )
            message = "left by a stopped `python -m flows.local`"
            for run_id in to_crash:
                client.set_flow_run_state(run_id, Crashed(message=message), force=True)
            for run_id in to_cancel:
                client.set_flow_run_state(run_id, Cancelled(message=message), force=True)
    return len(to_crash) + len(to_cancel)


@contextlib.contextmanager
def services_running(
    env: dict[str, str],
    cpu_workers: int,
    run_threads: int | None = None,
    claim_ahead: bool = False,
) -> Iterator[tuple[dict[str, str], str]]:
    """Server (if needed), pools, deployments and workers; yields (env, training deployment).
    `run_threads`: the thread count every training run will set, when known (the CPU
    workers' warm servers then compile dense kernels for it alone). `claim_ahead`: each
    worker claims its next cell while one trains, behind its slot's gate (flows/slot_gate.py)."""
    lock = exclusive_run(Path(env["PREFECT_HOME"]))  # first: a refusal leaves nothing to undo
    report_leftovers(Path(env["PREFECT_HOME"]))  # a killed run's workers would train beside ours
    services = Services(STATE_DIR, env)
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        if not env.get("PREFECT_API_URL"):
            port = free_port()
            api_url = f"http://127.0.0.1:{port}/api"
            print(
                f"starting a local Prefect server on {api_url} (UI: {api_url[:-4]}, SQLite in "
                f"{STATE_DIR}); submit more work to it with PREFECT_API_URL={api_url}"
            )
            lock.write(f"its server: {api_url}\n")
            lock.flush()
            env = start_server(services, env, port)
            if closed := clear_orphans(env):
                print(f"closed {closed} run(s) left open by an earlier, stopped local run")
        gpus = gpu_count()
        train_pool = GPU_POOL if gpus else CPU_POOL
        # All three pools exist so that every deployment of prefect.yaml can be created.
        for pool in (CONTROL_POOL, CPU_POOL, GPU_POOL):
            prefect(env, "work-pool", "create", pool, "--type", "process", "--overwrite")
        slots = gpus or cpu_workers
        if claim_ahead:  # each worker's own --limit 2 bounds it; the gate keeps one training
            # (the report then counts the pool's live workers as its slots)
            prefect(env, "work-pool", "clear-concurrency-limit", train_pool)
        else:
            prefect(env, "work-pool", "set-concurrency-limit", train_pool, str(slots))
        print("deploying prefect.yaml")
        prefect(env, "--no-prompt", "deploy", "--all")
        services.start("worker-control", ["worker", "start", "--pool", CONTROL_POOL])
        for index in range(slots):
            worker_env = env | ({"CUDA_VISIBLE_DEVICES": str(index)} if gpus else {})
            if run_threads and not gpus:  # the warm server compiles for that count only
                worker_env[RUN_THREADS_ENV] = str(run_threads)
            if claim_ahead:
                worker_env[GATE_ENV] = str(STATE_DIR / "slots" / f"{train_pool}-{index}.lock")
            limit = "2" if claim_ahead else "1"
            services.start_training_worker(
                f"{train_pool}-{index}",
                ["--pool", train_pool, "--limit", limit, "--name", f"{train_pool}-{index}"],
                env=worker_env,
            )
        print(f"started {slots} {'GPU' if gpus else 'CPU'} worker(s) on pool {train_pool}")
        yield env, "ubo-train/gpu" if gpus else "ubo-train/cpu"
    finally:
        print("stopping the workers and server this run started")
        services.stop()
        report_locked_database(STATE_DIR / "prefect-server.log")
        signal.signal(signal.SIGTERM, previous)
        lock.close()  # releases the lock


DEPLOYMENTS = {"benchmark": "ubo/full-benchmark", "tune": "ubo/tune"}


def check_flows_installed(env: dict[str, str], repo: Path = REPO) -> None:
    """Raise unless `flows` imports from this checkout in a process like a flow run's.

    A worker starts each flow run (`python -m flows.warm start`) in a directory of Prefect's
    own, so `flows` comes from the environment's install (or PYTHONPATH), not from the
    current directory. An editable install made from another clone or a removed worktree
    crashes every run with "No module named 'flows'", or runs that clone's code, and the study
    would only show failed children; this says so before any service starts."""
    import tempfile

    probe = "import flows, sys; sys.stdout.write(flows.__file__)"
    with tempfile.TemporaryDirectory(prefix="ubo-probe-") as elsewhere:
        found = subprocess.run(
            [sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True
        )
    where = Path(found.stdout).resolve().parent if found.returncode == 0 else None
    if where != (repo / "flows").resolve():
        seen = f"is {where}" if where else "does not import"
        raise RuntimeError(
            f"this environment's `flows` package {seen} outside this checkout's "
            f"{repo / 'flows'}: the workers' flow runs would not run this code; reinstall it "
            f"from here: {sys.executable} -m pip install --no-deps -e {repo}"
        )


def run_benchmark(
    env: dict[str, str], parameters: dict[str, Any], deployment: str = DEPLOYMENTS["benchmark"]
) -> int:
    os.environ.update(
        {k: v for k, v in env.items() if k.startswith(("PREFECT_", "MLFLOW_", "UBO_"))}
    )
    from prefect.settings import temporary_settings

    # Prefect reads its settings once, at import (clear_orphans imported it before the API
    # URL was known): the environment set above no longer reaches this process's client.
    with temporary_settings(
        updates={"api.url": env["PREFECT_API_URL"], "server.ephemeral.enabled": False}
    ):
        return _submit_and_wait(env, parameters, deployment)


# The progress line's groups of children: state types, and a tag they must carry too.
# Counted by the server (one COUNT a group per poll): reading every child's whole flow run
# every 5 s was a share of the SQLite server's load that the trainings feel, and a read stops
# at the API's page of 200. A worker with --claim-ahead starts its next cell beside the one
# that trains; the cell waits RUNNING at its slot's gate (flows/slot_gate.py) with
# SLOT_WAIT_TAG, and is counted as waiting for a slot, not as running.
PROGRESS_GROUPS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "finished": (("COMPLETED",), None),
    "running": (("RUNNING",), None),
    "waiting for a slot": (("RUNNING",), SLOT_WAIT_TAG),
    "queued": (("SCHEDULED", "PENDING"), None),
    "failed": (("FAILED", "CRASHED"), None),
}


def children_filter(parent_id: UUID, types: tuple[str, ...], tag: str | None = None) -> Any:
    """The parent's children (by PARENT_TAG) in one of the state `types`, carrying `tag`."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType

    from flows.children import PARENT_TAG

    tags = [f"{PARENT_TAG}{parent_id}", *([tag] if tag else [])]
    kinds = [StateType(kind) for kind in types]
    return FlowRunFilter(
        tags=FlowRunFilterTags(all_=tags),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=kinds)),
    )


def children_counts(client: Any, parent_id: UUID) -> dict[str, int]:
    """How many of the parent's children are in each of PROGRESS_GROUPS."""
    counts = {
        group: client.count_flow_runs(flow_run_filter=children_filter(parent_id, types, tag))
        for group, (types, tag) in PROGRESS_GROUPS.items()
    }
    # Separate queries: a child that starts and reaches its gate between the two counts would
    # make the difference -1 for one poll.
    counts["running"] = max(0, counts["running"] - counts["waiting for a slot"])
    return counts


def _submit_and_wait(env: dict[str, str], parameters: dict[str, Any], deployment: str) -> int:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows.children import read_all_flow_runs

    parent = run_deployment(deployment, parameters=parameters, timeout=0)
    print(f"flow run {parent.name} ({parent.id}) of {deployment}: {json.dumps(parameters)}")
    started, last = time.monotonic(), ""
    with get_client(sync_client=True) as client:
        while True:
            state = client.read_flow_run(parent.id).state
            counts = children_counts(client, parent.id)
            line = f"[{time.monotonic() - started:6.0f} s] parent {state.name if state else '?'}; "
            line += "children: " + ", ".join(f"{n} {group}" for group, n in counts.items())
            if line.split("]", 1)[1] != last:
                print(line, flush=True)
                last = line.split("]", 1)[1]
            if state is not None and state.is_final():
                break
            time.sleep(5)
        failed_filter = children_filter(parent.id, *PROGRESS_GROUPS["failed"])
        failed = [child.name for child in read_all_flow_runs(client, failed_filter)]
    from flows import study

    if deployment == DEPLOYMENTS["benchmark"]:
        table = study.results_for_flow_run(str(parent.id), REPO)
        print(table or "(no results recorded)")
    if failed:
        print(f"failed children: {', '.join(sorted(failed))}", file=sys.stderr)
    if not state.is_completed():
        print(f"{deployment} ended {state.name}: {state.message or ''}", file=sys.stderr)
        return 1
    print(f"done in {time.monotonic() - started:.0f} s; compare runs with `make ui`")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.local", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--flow", choices=sorted(DEPLOYMENTS), default="benchmark", help="what to run"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="Coat (or the catalog's first), 1 seed, 3 epochs"
    )
    parser.add_argument("--cpu-workers", type=int, default=max(1, (os.cpu_count() or 1)))
    parser.add_argument(
        "--claim-ahead",
        action="store_true",
        help="each worker claims and starts its next cell while one trains; a per-worker "
        "gate keeps one training (flows/slot_gate.py)",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a parameter of the ubo flow (YAML value), e.g. methods=[ubo,umf]",
    )
    args = parser.parse_args(argv)
    parameters: dict[str, Any] = {}
    try:
        if args.smoke:
            parameters = {"datasets": [smoke_dataset()]}
            parameters |= SMOKE if args.flow == "benchmark" else {"n_trials": 2}
        parameters |= parse_params(args.param)
    except (RuntimeError, UboError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    # Several CPU workers share the cores: one torch thread each unless told otherwise.
    if args.cpu_workers > 1:
        parameters.setdefault("overrides", {}).setdefault("threads", 1)
    try:
        from flows.store import open_store

        # The store first: a corrupt, locked or read-only one stops here, in one line,
        # before any service starts (every run of the study would fail on it).
        env = service_env()
        open_store(env["MLFLOW_TRACKING_URI"], REPO)
        check_flows_installed(env)
        overrides = parameters.get("overrides")
        threads = overrides.get("threads") if isinstance(overrides, dict) else None
        positive = isinstance(threads, int) and not isinstance(threads, bool) and threads > 0
        run_threads = threads if positive else None
        with services_running(env, args.cpu_workers, run_threads, args.claim_ahead) as (
            env,
            train_deployment,
        ):
            on_gpu = train_deployment.endswith("/gpu")
            if args.flow == "tune":
                parameters.setdefault(
                    "study_deployment", f"ubo-tune-study/{'gpu' if on_gpu else 'cpu'}"
                )
            else:
                parameters.setdefault("train_deployment", train_deployment)
            return run_benchmark(env, parameters, DEPLOYMENTS[args.flow])
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, UboError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
