"""flows/benchmark.py end to end: a real Prefect server, real workers, a throwaway MLflow store.

One module-scoped stack (started once, ~30 s): a Prefect server subprocess on 127.0.0.1
(SQLite under the test's tmp dir, analytics off), the work pools, the deployments of the
repository's prefect.yaml (`prefect --no-prompt deploy --all`), one worker on `ubo-control`
for the parent and two workers (`--limit 1` each) on `ubo-cpu` for the children. Workers run
a copy of the repository's code (UBO_REPO = <tmp>/repo, the deployments' pull step
`set_working_directory`) whose params.yaml points at a tiny processed Coat; MLflow is
sqlite:///<tmp>/mlflow.db for every process. The repository's own data and store are never
touched. Each scenario uses its own MLflow experiment.

Scenarios: (1) `ubo` on umf, ubo x seeds 0, 1 (2 epochs, CPU) and everything it records;
(2) the two training workers share the children; (3) a child that crashes fails the parent,
which names it, and a re-run after the fix trains only that child.

How a single child is made to fail: a test-only `sitecustomize` (tests/flow_helpers.py,
FAULT_HOOK) on the training workers' PYTHONPATH wraps `ubo_core.trainer.fit` when the flow
run imports it; while the file $UBO_TEST_FAULT_FILE holds "ubo 1", training ubo with seed 1
raises after its first epoch was logged. Everything else in that process, the parent's
checks before submitting, the run key and the data are untouched, so deleting the file is
the whole fix and the re-run sees the same run keys.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import psutil
import pytest
from flow_helpers import FAULT_HOOK, REPO, make_repo_copy
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType
from test_tracking import write_processed

from flows import run_identity, study
from flows.local import clear_orphans, orphans
from flows.services import (
    Services,
    exclusive_run,
    free_port,
    prefect,
    service_env,
    start_server,
    wait_healthy,
)
from flows.store import to_mlflow_key
from flows.tracked_run import TEST_METRICS, load_model
from ubo_core.methods import METHODS as METHOD_REGISTRY
from ubo_core.trainer import evaluate_test, pair_exposure

CONTROL_POOL, TRAIN_POOL, GPU_POOL = "ubo-control", "ubo-cpu", "ubo-gpu"
TRAIN_WORKERS = ("cpu-0", "cpu-1")
PARENT_DEPLOYMENT = "ubo/full-benchmark"
METHODS, SEEDS, EPOCHS = ("umf", "ubo"), (0, 1), 2
PARAMETERS: dict[str, Any] = {
    "datasets": ["coat"],
    "methods": list(METHODS),
    "seeds": list(SEEDS),
    "epochs": EPOCHS,
    # Two training workers share the (CI) cores: one torch thread each.
    "overrides": {"device": "cpu", "threads": 1, "lr": 0.05},
    "poll_seconds": 1.0,
}
FINAL_KEYS = [f"{name}_at_{k}" for name in ("dcg", "map") for k in (1, 2, 3)]
PARENT_TIMEOUT = 240.0  # seconds; a parent of 4 children takes ~1 min on 2 cores


@dataclass
class Stack:
    root: Path
    repo: Path  # UBO_REPO of every worker: the copy of the code, params.yaml and tiny data
    tracking_uri: str
    api_url: str
    fault_file: Path
    services: Services
    token: str  # makes experiment names unique (they must not show up in the repo's store)
    worker_env: dict[str, str]  # the training workers' environment (to restart one)

    def experiment(self, scenario: str) -> str:
        return f"test-flows-{scenario}-{self.token}"


# -- the stack ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("flows")
    repo = make_repo_copy(root)
    write_processed(repo / "data", "coat")
    hook_dir = root / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(FAULT_HOOK)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    # Create the store here, once: processes that find a new sqlite file all migrate it.
    mlflow.set_tracking_uri(tracking_uri)
    MlflowClient().search_experiments()

    port = free_port(preferred=None)
    api_url = f"http://127.0.0.1:{port}/api"
    env = dict(os.environ) | {
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "DO_NOT_TRACK": "1",
        "DVC_NO_ANALYTICS": "1",
        "UBO_REPO": str(repo),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "GIT_CEILING_DIRECTORIES": str(root),  # the copy is no git repo: code version unknown
    }
    services = Services(root / "logs", env)
    try:
        services.start(
            "server",
            ["server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            cwd=root,
            stop_last=True,  # the workers first (flows/services.py)
        )
        wait_healthy(api_url, services)
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            create_pools()
            prefect(env, "--no-prompt", "deploy", "--all", cwd=repo)
            services.start("worker-control", ["worker", "start", "--pool", CONTROL_POOL], repo)
            fault_file = root / "fault"
            train_env = env | {"PYTHONPATH": str(hook_dir), "UBO_TEST_FAULT_FILE": str(fault_file)}
            for name in TRAIN_WORKERS:
                start_training_worker(services, name, repo, train_env)
            yield Stack(
                root,
                repo,
                tracking_uri,
                api_url,
                fault_file,
                services,
                uuid.uuid4().hex[:8],
                train_env,
            )
    finally:
        services.stop()
        mlflow.set_tracking_uri(None)  # it also exported MLFLOW_TRACKING_URI: undo both
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before


def start_training_worker(services: Services, name: str, repo: Path, env: dict[str, str]):
    return services.start_training_worker(
        name, ["--pool", TRAIN_POOL, "--limit", "1", "--name", name], repo, env=env
    )


def create_pools() -> None:
    """The three pools of prefect.yaml (every deployment needs its pool to deploy)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client:
        for pool in (CONTROL_POOL, TRAIN_POOL, GPU_POOL):
            client.create_work_pool(
                WorkPoolCreate(name=pool, type="process", base_job_template=template)
            )


@pytest.fixture(autouse=True)
def tracking_store(request):
    """Tests read the stack's store (test_tracking.py's fixtures reset the URI between
    modules)."""
    if "stack" in request.fixturenames:
        mlflow.set_tracking_uri(request.getfixturevalue("stack").tracking_uri)
    yield


# -- Prefect and MLflow helpers ----------------------------------------------------------------
def run_parent(stack: Stack, experiment: str):
    """Submit ubo/full-benchmark like `flows.local` does and wait until it is final."""
    return run_and_wait(stack, PARENT_DEPLOYMENT, PARAMETERS | {"experiment": experiment})


def run_and_wait(stack: Stack, deployment: str, parameters: dict[str, Any]):
    """Submit a flow run of `deployment` and wait until it is final (fails the test if not)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    flow_run = run_deployment(deployment, parameters=parameters, timeout=0)
    deadline = time.monotonic() + PARENT_TIMEOUT
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            stack.services.check_alive()
            flow_run = client.read_flow_run(flow_run.id)
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run
            time.sleep(1)
    pytest.fail(
        f"{deployment} not final after {PARENT_TIMEOUT:.0f} s "
        f"({flow_run.state.name if flow_run.state else '?'}):\n{stack.services.tail()}"
    )


def children_of(parent) -> dict[str, Any]:
    """name -> flow run of the children the parent submitted (they carry its tag)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    from flows.children import PARENT_TAG

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"{PARENT_TAG}{parent.id}"]))
        )
    return {run.name: run for run in runs}


def state_of(flow_run) -> str:
    return f"{flow_run.state.name}: {flow_run.state.message}" if flow_run.state else "no state"


def experiment_id(name: str) -> str:
    experiment = MlflowClient().get_experiment_by_name(name)
    assert experiment is not None, f"no MLflow experiment {name}"
    return experiment.experiment_id


def runs_of(experiment: str, view: int = ViewType.ACTIVE_ONLY) -> list[Run]:
    return MlflowClient().search_runs([experiment_id(experiment)], run_view_type=view)


def training_runs(experiment: str, view: int = ViewType.ACTIVE_ONLY) -> dict[str, Run]:
    """run name -> run, for the training (non-parent) runs; names are unique or it fails."""
    runs = [r for r in runs_of(experiment, view) if r.data.tags.get("ubo.role") != "parent"]
    names = [r.info.run_name for r in runs]
    assert len(names) == len(set(names)), f"duplicated training runs: {sorted(names)}"
    return {r.info.run_name: r for r in runs}


def parent_run(experiment: str, flow_run_id: Any) -> Run:
    (run,) = [
        r for r in runs_of(experiment) if r.data.tags.get("prefect.flow_run_id") == str(flow_run_id)
    ]
    return run


def artifact_paths(run_id: str, path: str | None = None) -> set[str]:
    return {info.path for info in MlflowClient().list_artifacts(run_id, path)}


def child_names() -> set[str]:
    return {f"coat/{method}/seed{seed}" for method in METHODS for seed in SEEDS}


# -- 1. end to end -----------------------------------------------------------------------------
@dataclass
class Benchmark:
    experiment: str
    parent: Any  # the parent's Prefect flow run (final)
    children: dict[str, Any]  # name -> child flow run
    runs: dict[str, Run]  # name -> child MLflow run


@pytest.fixture(scope="module")
def benchmark(stack) -> Benchmark:
    """One run of ubo/full-benchmark: coat x (umf, ubo) x seeds (0, 1), 2 epochs on CPU."""
    mlflow.set_tracking_uri(stack.tracking_uri)
    experiment = stack.experiment("e2e")
    parent = run_parent(stack, experiment)
    assert parent.state.is_completed(), f"{state_of(parent)}\n{stack.services.tail()}"
    return Benchmark(experiment, parent, children_of(parent), training_runs(experiment))


def test_parent_completes_after_one_child_flow_run_per_cell(benchmark, stack):
    from prefect.client.orchestration import get_client

    assert benchmark.parent.work_pool_name == CONTROL_POOL
    assert set(benchmark.children) == child_names()
    with get_client(sync_client=True) as client:
        train = client.read_deployment_by_name("ubo-train/cpu")
    for name, child in benchmark.children.items():
        assert child.state.is_completed(), f"{name}: {state_of(child)}"
        assert child.deployment_id == train.id and child.work_pool_name == TRAIN_POOL
        assert child.parent_task_run_id is not None  # submitted as a subflow of the parent
        assert child.run_count == 1  # no retry was needed
        assert child.parameters["overrides"] == PARAMETERS["overrides"] | {"epochs": EPOCHS}


def test_every_child_is_logged_with_params_tags_metrics_curves_and_artifacts(benchmark, stack):
    assert set(benchmark.runs) == child_names()
    parent = parent_run(benchmark.experiment, benchmark.parent.id)
    data_md5 = run_identity.file_md5(stack.repo / "data" / "processed" / "coat" / "dataset.npz")
    client = MlflowClient()
    for name, run in benchmark.runs.items():
        _, method, seed = name.split("/")
        seed = seed.removeprefix("seed")
        assert run.info.status == "FINISHED", name

        params = run.data.params
        assert (params["dataset"], params["method"], params["seed"]) == ("coat", method, seed)
        assert params["train.epochs"] == str(EPOCHS) and params["train.device"] == "cpu"
        assert params["train.lr"] == "0.05" and params["train.threads"] == "1"

        tags = run.data.tags
        assert (tags["dataset"], tags["method"], tags["seed"]) == ("coat", method, seed)
        assert len(tags["ubo.run_key"]) == 64
        assert tags["ubo.code_version"] == "unknown"  # the copy is not a git repository
        assert tags["ubo.data_version"] == f"md5:{data_md5}"  # the copy's tiny data, no dvc.lock
        assert tags["mlflow.parentRunId"] == parent.info.run_id

        for key in FINAL_KEYS:
            assert math.isfinite(run.data.metrics[key]), (name, key)
        assert run.data.metrics["dcg_at_1"] == run.data.metrics["map_at_1"]
        curves = [key for key in run.data.metrics if key.startswith(("loss/", "val/"))]
        assert any(key.startswith("loss/") for key in curves) and "val/val_loss" in curves
        for key in curves:
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), (name, key)

        # umf and ubo both estimate an exposure: every artifact is there.
        assert artifact_paths(run.info.run_id) == {"config.json", "model", "exposure", "test"}
        assert artifact_paths(run.info.run_id, "model") == {"model/state.pt", "model/config.json"}
        assert artifact_paths(run.info.run_id, "exposure") == {"exposure/test_exposure.npz"}
        config = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/config.json")
        assert config["run_key"] == tags["ubo.run_key"]
        # The workers read the copy's params.yaml (relative processed_dir, resolved in UBO_REPO).
        assert config["processed_dir"] == str((stack.repo / "data" / "processed").resolve())
    keys = [run.data.tags["ubo.run_key"] for run in benchmark.runs.values()]
    assert len(set(keys)) == len(keys)


def test_parent_run_logs_the_aggregate_and_the_result_tables(benchmark, stack):
    parent = parent_run(benchmark.experiment, benchmark.parent.id)
    assert parent.info.status == "FINISHED" and parent.data.tags["ubo.role"] == "parent"
    assert "ubo.failed_children" not in parent.data.tags
    assert parent.data.params["datasets"] == "coat"
    assert parent.data.params["methods"] == "umf,ubo" and parent.data.params["seeds"] == "0,1"
    metrics = parent.data.metrics
    for method in METHODS:
        for key in FINAL_KEYS:
            values = [benchmark.runs[f"coat/{method}/seed{s}"].data.metrics[key] for s in SEEDS]
            assert metrics[f"coat/{method}/{key}_mean"] == pytest.approx(np.mean(values))
            assert metrics[f"coat/{method}/{key}_std"] == pytest.approx(np.std(values, ddof=1))
    assert artifact_paths(parent.info.run_id) == {"results.csv", "results.md"}
    markdown = Path(
        mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="results.md")
    ).read_text()
    # The registry's order: the paper's tables, UMF before UBO.
    assert markdown.startswith("### coat\n") and "| metric | umf | ubo |" in markdown
    assert "| seeds | 2 | 2 |" in markdown
    # What `make benchmark` prints: found from the Prefect flow run id alone.
    assert study.results_for_flow_run(str(benchmark.parent.id), stack.repo) == markdown
    csv = Path(
        mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="results.csv")
    ).read_text()
    assert csv.splitlines()[0].startswith("dataset,method,n_seeds,")


def test_load_model_reproduces_every_childs_logged_metrics(benchmark):
    for name, run in benchmark.runs.items():
        loaded, tensors = load_model(run.info.run_id)
        assert (
            type(loaded) is METHOD_REGISTRY[run.data.tags["method"]]
            and tensors.device.type == "cpu"
        )
        reproduced = evaluate_test(loaded, tensors)
        assert {to_mlflow_key(m): reproduced[m] for m in TEST_METRICS} == {
            to_mlflow_key(m): run.data.metrics[to_mlflow_key(m)] for m in TEST_METRICS
        }, name
        local = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="exposure/test_exposure.npz"
        )
        with np.load(local) as logged:
            again = pair_exposure(loaded, logged["user"], logged["item"])
            np.testing.assert_array_equal(again, logged["exposure"])


# -- 2. two workers share the children --------------------------------------------------------
def test_both_training_workers_ran_children_one_at_a_time(benchmark):
    by_worker: dict[str, list] = {}
    for child in benchmark.children.values():
        # The worker that submits a flow run labels it (prefect.worker.name, Prefect >= 3.1).
        assert child.labels["prefect.work-pool.name"] == TRAIN_POOL
        by_worker.setdefault(child.labels["prefect.worker.name"], []).append(child)
    assert set(by_worker) == set(TRAIN_WORKERS), {w: len(c) for w, c in by_worker.items()}
    for worker, runs in by_worker.items():
        spans = sorted((run.start_time, run.end_time) for run in runs)
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end <= start, f"{worker} (--limit 1) ran two children at once"
    assert benchmark.parent.labels["prefect.worker.name"] not in TRAIN_WORKERS


def test_the_children_ran_forked_from_their_workers_warm_servers(benchmark, stack):
    """Issue 15, part 5: each training worker (`python -m flows.warm worker`) started its warm
    server, and no child fell back to a cold start."""
    for worker in TRAIN_WORKERS:
        log = stack.services.tail(f"worker-{worker}", lines=100_000)
        assert "flows.warm: serving @ubo-warm-" in log, log[-2000:]
        assert "starting the flow run cold" not in log, log[-2000:]


# -- 3. a failing child, then the fix ----------------------------------------------------------
def test_failed_child_fails_the_parent_and_a_rerun_trains_only_that_child(stack):
    experiment = stack.experiment("faults")
    stack.fault_file.write_text("ubo 1")
    try:
        first = run_parent(stack, experiment)
    finally:
        stack.fault_file.unlink()

    assert first.state.is_failed(), state_of(first)
    message = first.state.message or ""
    assert "coat/ubo/seed1" in message, message
    assert not any(other in message for other in child_names() - {"coat/ubo/seed1"}), message
    children = children_of(first)
    assert set(children) == child_names()
    for name, child in children.items():
        assert child.state.is_failed() == (name == "coat/ubo/seed1"), (name, state_of(child))
    assert children["coat/ubo/seed1"].run_count == 2  # ubo-train retries once, same fault
    assert "injected fault" in (children["coat/ubo/seed1"].state.message or "")

    before = training_runs(experiment)
    assert {name: run.info.status for name, run in before.items()} == {
        name: "FAILED" if name == "coat/ubo/seed1" else "FINISHED" for name in child_names()
    }
    crashed = before["coat/ubo/seed1"]
    history = MlflowClient().get_metric_history(crashed.info.run_id, "val/val_loss")
    assert [m.step for m in history] == [1]  # logged epoch 1, crashed before epoch 2
    parent = parent_run(experiment, first.id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["ubo.failed_children"] == "coat/ubo/seed1 (Failed)"

    second = run_parent(stack, experiment)  # the fault file is gone: the cause is fixed
    assert second.state.is_completed(), f"{state_of(second)}\n{stack.services.tail()}"
    rerun = children_of(second)
    assert list(rerun) == ["coat/ubo/seed1"]  # the three finished children were skipped
    assert rerun["coat/ubo/seed1"].state.is_completed()

    after = training_runs(experiment)  # fails on two active runs with one name
    assert set(after) == child_names()
    assert all(run.info.status == "FINISHED" for run in after.values())
    trained = {run.info.run_id for run in after.values()} - {
        run.info.run_id for run in before.values()
    }
    assert trained == {after["coat/ubo/seed1"].info.run_id}
    for name in child_names() - {"coat/ubo/seed1"}:
        assert after[name].info.run_id == before[name].info.run_id, name
    keys = [run.data.tags["ubo.run_key"] for run in after.values()]
    assert len(set(keys)) == len(keys)
    assert after["coat/ubo/seed1"].data.tags["ubo.run_key"] == crashed.data.tags["ubo.run_key"]
    # The crashed attempts were deleted (soft) by the next attempt with their run key: the
    # retry deleted the first one, the re-run the retry's.
    deleted = runs_of(experiment, ViewType.DELETED_ONLY)
    assert crashed.info.run_id in {run.info.run_id for run in deleted}
    assert {(run.info.run_name, run.info.status) for run in deleted} == {
        ("coat/ubo/seed1", "FAILED")
    }

    rerun_parent = parent_run(experiment, second.id)
    assert rerun_parent.info.status == "FINISHED"
    assert rerun_parent.data.metrics.keys() >= {
        f"coat/{method}/{key}_mean" for method in METHODS for key in FINAL_KEYS
    }
    markdown = study.results_for_flow_run(str(second.id), stack.repo)
    assert markdown is not None and "| seeds | 2 | 2 |" in markdown  # skipped runs count


@pytest.mark.cluster
def test_a_child_whose_worker_dies_is_trained_again_on_a_live_worker_exactly_once(stack):
    """Fault 1: a worker killed with SIGKILL (with the training it ran) left its child
    RUNNING for ever and the study waiting for ever. The parent now declares a child without
    a heartbeat for `stall_seconds` dead and submits it again.

    Marked `cluster` (`make cluster-test`, beside the lost host of tests/test_cluster.py): it
    waits out Prefect's 30 s minimum heartbeat twice, 100 s that `make test` cannot afford.
    The dead-child rule itself is checked in tests/test_children.py on every `make test`."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    experiment = stack.experiment("dead-worker")
    stall = 75.0  # heartbeats come every 30 s (Prefect's minimum; prefect.yaml)
    stack.fault_file.write_text("umf 0 hang")  # hangs after its first epoch
    parameters = PARAMETERS | {"experiment": experiment, "methods": ["umf"]}
    parent = run_deployment(
        PARENT_DEPLOYMENT, parameters=parameters | {"stall_seconds": stall}, timeout=0
    )
    victim = None
    try:
        deadline = time.monotonic() + PARENT_TIMEOUT
        while victim is None:
            assert time.monotonic() < deadline, stack.services.tail()
            hanging = children_of(parent).get("coat/umf/seed0")
            runs = training_runs(experiment) if hanging is not None else {}
            run = runs.get("coat/umf/seed0")
            if (
                run is not None
                and MlflowClient().get_metric_history(run.info.run_id, "val/val_loss")
                and hanging.infrastructure_pid
            ):
                victim = psutil.Process(int(hanging.infrastructure_pid.rsplit(":", 1)[-1]))
            time.sleep(1)
        worker = victim.parent()
        name = next(n for n, p, *_ in stack.services.processes if p.pid == worker.pid)
        worker.kill()
        victim.kill()  # the machine is gone: its worker and the training on it
        stack.services.processes[:] = [e for e in stack.services.processes if e[0] != name]
        stack.fault_file.unlink()  # what is trained again, trains
        start_training_worker(
            stack.services, name.removeprefix("worker-"), stack.repo, stack.worker_env
        )
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + PARENT_TIMEOUT + 2 * stall
            while not (final := client.read_flow_run(parent.id)).state.is_final():
                assert time.monotonic() < deadline, stack.services.tail()
                time.sleep(1)
    finally:
        stack.fault_file.unlink(missing_ok=True)
    assert final.state.is_completed(), f"{state_of(final)}\n{stack.services.tail()}"
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

        from flows.children import PARENT_TAG

        attempts = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"{PARENT_TAG}{parent.id}"]))
        )
    seed0 = sorted(
        (r for r in attempts if r.name == "coat/umf/seed0"), key=lambda r: r.expected_start_time
    )
    assert [r.state.type.value for r in seed0] == ["CRASHED", "COMPLETED"]
    assert "declared dead: no heartbeat" in (seed0[0].state.message or "")
    runs = training_runs(experiment)  # fails on two active runs with one name
    assert set(runs) == {"coat/umf/seed0", "coat/umf/seed1"}
    assert all(run.info.status == "FINISHED" for run in runs.values())


# -- 4. the repository was left alone ----------------------------------------------------------
def test_the_repositorys_own_store_saw_none_of_this(stack, benchmark):
    """Workers, parent and children wrote to the throwaway store only."""
    database = REPO / "mlflow.db"
    if not database.exists():
        return
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        names = {row[0] for row in connection.execute("SELECT name FROM experiments")}
    assert not any(stack.token in name for name in names)


# -- 4. tuning ---------------------------------------------------------------------------------
def test_tune_fans_studies_out_to_the_workers_and_records_every_trial(stack):
    """ubo/tune on coat x (umf, ubo), 3 trials each (the copy's params.yaml `tuning`)."""
    from flows.tune_study import TAG_CHOSEN, TAG_KIND

    experiment = stack.experiment("tune")
    parameters = {
        "datasets": ["coat"],
        "methods": list(METHODS),
        "experiment": experiment,
        "overrides": {"device": "cpu", "threads": 1},
        "poll_seconds": 1.0,
    }
    flow_run = run_and_wait(stack, "ubo/tune", parameters)
    assert flow_run.state.is_completed(), f"{state_of(flow_run)}\n{stack.services.tail()}"
    children = children_of(flow_run)
    assert set(children) == {f"tune coat/{method}" for method in METHODS}
    assert all(child.state.is_completed() for child in children.values())
    runs = runs_of(experiment)
    kinds = [r.data.tags.get(TAG_KIND) for r in runs]
    assert (kinds.count("tune"), kinds.count("study"), kinds.count("trial")) == (1, 2, 6)
    (parent,) = [r for r in runs if r.data.tags.get(TAG_KIND) == "tune"]
    assert parent.info.status == "FINISHED"
    block = mlflow.artifacts.load_text(f"runs:/{parent.info.run_id}/tuned_defaults.yaml")
    for study_run in (r for r in runs if r.data.tags.get(TAG_KIND) == "study"):
        assert study_run.data.tags[run_identity.PARENT_TAG] == parent.info.run_id
        chosen = json.loads(study_run.data.tags[TAG_CHOSEN])
        assert set(chosen) == {"lr", "epochs"} and 1 <= chosen["epochs"] <= 4
        assert f"    {study_run.data.tags['method']}:" in block


def test_a_second_local_run_on_the_same_prefect_home_is_refused(tmp_path):
    """Two `python -m flows.local` runs on one .prefect/ would share one SQLite database with
    two servers and reset each other's pool limits: the second stops with a clear message."""
    first = exclusive_run(tmp_path)
    try:
        with pytest.raises(RuntimeError, match=r"flows-local\.lock is locked by .*pid \d+"):
            exclusive_run(tmp_path)
    finally:
        first.close()
    exclusive_run(tmp_path).close()  # released with the first run's file


def test_orphans_are_the_stale_runs_and_the_waiting_children_of_gone_parents():
    runs = [
        ("p-dead", "CRASHED", []),  # not passed in practice (final), harmless
        ("p-running", "RUNNING", []),
        ("p-waiting", "SCHEDULED", []),
        ("c-running", "RUNNING", ["ubo-parent:p-running"]),
        ("c-of-running", "SCHEDULED", ["ubo-parent:p-running", "other"]),
        ("c-of-dead", "SCHEDULED", ["ubo-parent:p-dead"]),
        ("c-of-waiting", "SCHEDULED", ["ubo-parent:p-waiting"]),
        ("queued-by-hand", "SCHEDULED", ["x"]),
        ("c-cancelling", "CANCELLING", []),
    ]
    to_crash, to_cancel = orphans(runs, "ubo-parent:")
    assert to_crash == ["p-running", "c-running", "c-cancelling"]
    assert to_cancel == ["c-of-running", "c-of-dead"]


def test_a_new_local_run_closes_what_a_stopped_one_left_open(stack):
    """A local run stopped mid-study leaves its parent and a child RUNNING (the running child
    holds a training slot: the next run trained one child at a time) and the parent's other
    children SCHEDULED. clear_orphans, which flows.local calls on its own server before
    starting workers, closes exactly those; work queued for a parent still waiting stays."""
    import datetime

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Running, Scheduled

    @flow(name="orphan-probe")
    def probe() -> None:
        pass

    later = Scheduled(scheduled_time=datetime.datetime.now(datetime.UTC) + datetime.timedelta(1))
    tag = f"ubo-parent:{stack.token}"  # matches no real run: stands for a gone parent
    with get_client(sync_client=True) as client:
        stale = client.create_flow_run(probe, state=Running())
        orphan = client.create_flow_run(probe, state=later, tags=[f"{tag}-gone"])
        waiting_parent = client.create_flow_run(probe, state=later)
        kept = client.create_flow_run(probe, state=later, tags=[f"ubo-parent:{waiting_parent.id}"])

        closed = clear_orphans({"PREFECT_API_URL": stack.api_url})

        states = {
            name: client.read_flow_run(run.id).state.type.value
            for name, run in [
                ("stale", stale),
                ("orphan", orphan),
                ("waiting_parent", waiting_parent),
                ("kept", kept),
            ]
        }
        for run in (waiting_parent, kept):  # leave nothing scheduled behind
            client.delete_flow_run(run.id)
    assert states == {
        "stale": "CRASHED",
        "orphan": "CANCELLED",
        "waiting_parent": "SCHEDULED",
        "kept": "SCHEDULED",
    }
    assert closed >= 2


def test_a_cell_waiting_at_its_slot_gate_is_counted_apart_from_the_training_ones(stack):
    """A worker with --claim-ahead starts its next cell beside the one that trains, and the
    cell waits RUNNING at its slot's gate: the progress line said "4 running" on 2 slots.
    While it waits it carries SLOT_WAIT_TAG (slot_gate's on_wait), and the progress line
    counts it as waiting for a slot; once it has the slot, as running."""
    from prefect import flow, tags
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    from flows.children import PARENT_TAG, mark_waiting_for_slot
    from flows.local import children_counts
    from flows.slot_gate import SLOT_WAIT_TAG

    parent_id = uuid.uuid4()  # stands for a parent: its children carry its tag
    parent_tag = f"{PARENT_TAG}{parent_id}"

    @flow(name="slot-wait-probe")
    def probe() -> list[tuple[list[str], dict[str, int]]]:
        seen = []
        with get_client(sync_client=True) as client:
            for waiting in (True, False):
                mark_waiting_for_slot(waiting)
                run = client.read_flow_run(flow_run.id)
                seen.append((sorted(run.tags), children_counts(client, parent_id)))
        return seen

    with tags(parent_tag):
        (tags_waiting, at_gate), (tags_training, training) = probe()
    assert tags_waiting == sorted([parent_tag, SLOT_WAIT_TAG])
    assert tags_training == [parent_tag]
    none = {"finished": 0, "running": 0, "waiting for a slot": 0, "queued": 0, "failed": 0}
    assert at_gate == none | {"waiting for a slot": 1}
    assert training == none | {"running": 1}


def test_the_local_runner_submits_to_its_own_server_never_a_temporary_one(tmp_path):
    """Prefect reads its settings at import; flows.local imports it (clear_orphans) before the
    server's URL is known. Its client must still use that URL, not start a temporary server
    of its own on the same database (the "Starting temporary server" of earlier runs)."""
    import subprocess
    import sys

    script = """
import sys
import prefect.settings  # read now, with no API URL, as clear_orphans does
from flows import local

def probe(env, parameters, deployment):
    from prefect.client.orchestration import get_client
    with get_client(sync_client=True) as client:
        print(client.api_url)
    return 0

local._submit_and_wait = probe
sys.exit(local.run_benchmark({"PREFECT_API_URL": "http://127.0.0.1:4999/api"}, {}, "x"))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "http://127.0.0.1:4999/api/"
    assert "temporary server" not in done.stdout + done.stderr


def test_a_server_on_another_port_serves_a_ui_that_talks_to_itself(tmp_path):
    import urllib.request

    port = free_port(preferred=None)
    env = service_env() | {"PREFECT_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    services = Services(tmp_path / "logs", env)
    try:
        start_server(services, env, port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui-settings", timeout=10) as reply:
            settings = json.load(reply)
    finally:
        services.stop()
    assert settings["api_url"] == f"http://127.0.0.1:{port}/api"


def test_make_ui_on_a_taken_port_fails_at_once_naming_it(tmp_path):
    import socket
    import subprocess
    import sys

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "flows.ui", "--port", str(port)],
            cwd=REPO,
            env=os.environ | {"PREFECT_HOME": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: port {port} is taken")
    assert time.monotonic() - started < 30


def test_a_bad_param_of_the_local_runner_is_one_line_naming_the_flag(tmp_path):
    """Issue 14, fault 8: a YAML error in --param printed a traceback."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "flows.local", "--param", "methods=[ubo,"],
        cwd=REPO,
        env=os.environ | {"PREFECT_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: --param: 'methods=[ubo,': the value is not valid YAML")
    assert done.stderr.count("\n") == 1
