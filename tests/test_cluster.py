"""The several-machines setup, for real (issue 14, part 2): PostgreSQL, a Prefect server and
an MLflow tracking server on it, and three worker hosts that share nothing but the two URLs
(separate clones, data and Prefect homes; separate network namespaces where the machine
allows it, which the test then checks). A small study runs across the hosts while one
host is killed (its worker and the training it started) and PostgreSQL restarts; every
(data set, method, seed) must end in MLflow exactly once, with its artifacts.

About 6 minutes on 2 cores, so it is not part of `make test`: run it with
`make cluster-test` (pytest -m cluster) before every change to flows/children.py,
flows/cluster.py or the deployments."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest

from flows import cluster

MIRROR = Path(
    os.environ.get("UBO_DATA_MIRROR", Path(__file__).resolve().parents[2] / "shared" / "datasets")
)
METHODS, SEEDS = ["umf", "ubo", "relmf"], [0, 1, 2]
pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        not list(Path("/").glob("usr/lib/postgresql/*/bin/initdb")),
        reason="needs PostgreSQL (Debian: apt-get install postgresql)",
    ),
    pytest.mark.skipif(not MIRROR.is_dir(), reason="needs the data mirror (UBO_DATA_MIRROR)"),
]


def trainings_of(root: Path, host: str) -> list[psutil.Process]:
    home = str(root / host / "home")
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            command = " ".join(process.cmdline())  # a cold flow run's, or a warm one's start
            if process.environ().get("PREFECT_HOME") == home and (
                "prefect.engine" in command or "flows.warm start" in command
            ):
                found.append(process)
    return found


def check_hosts_are_network_namespaces_that_reach_the_servers_only(state) -> None:
    assert state.network is not None
    spaces = {os.readlink(f"/proc/{state.pids[f'{host}/worker']}/ns/net") for host in state.hosts}
    assert len(spaces) == len(state.hosts) and os.readlink("/proc/self/ns/net") not in spaces

    def reach(host: str, address: str, port: int) -> bool:
        namespace = state.network["namespaces"][host]
        probe = f"import socket; socket.create_connection(({address!r}, {port}), 3)"
        command = ["ip", "netns", "exec", namespace, sys.executable, "-c", probe]
        return subprocess.run(command, capture_output=True).returncode == 0

    prefect = urlsplit(state.prefect_url)
    assert reach("host-1", prefect.hostname, prefect.port)
    assert not reach("host-1", "127.0.0.1", state.pg_port)  # PostgreSQL: the servers' only


def test_a_study_across_three_hosts_survives_a_lost_host_and_a_database_restart(
    tmp_path, monkeypatch
):
    from mlflow import MlflowClient
    from mlflow.entities import ViewType
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("UBO_DATA_MIRROR", str(MIRROR))
    root = tmp_path / "cluster"
    state = cluster.up(root, hosts=3, datasets=["coat"])
    try:
        if cluster.netns_available():
            check_hosts_are_network_namespaces_that_reach_the_servers_only(state)
        with temporary_settings({PREFECT_API_URL: state.prefect_url}):
            parent = run_deployment(
                "ubo/full-benchmark",
                parameters={
                    "datasets": ["coat"],
                    "methods": METHODS,
                    "seeds": SEEDS,
                    "epochs": 15,
                    "overrides": {"threads": 1, "device": "cpu"},
                    "poll_seconds": 2.0,
                    "stall_seconds": 75.0,
                    "experiment": "cluster-test",
                },
                timeout=0,
            )
            # Lose host-2 while it trains (or starts) a run, then restart PostgreSQL.
            deadline = time.monotonic() + 300
            while not trainings_of(root, "host-2"):
                assert time.monotonic() < deadline, "host-2 never got a run"
                time.sleep(0.5)
            assert cluster.kill_host(state, "host-2") >= 1
            time.sleep(5)
            cluster.pg_ctl(root, "-m", "fast", "restart")
            with get_client(sync_client=True) as client:
                deadline = time.monotonic() + 600
                while not (final := client.read_flow_run(parent.id)).state.is_final():
                    assert time.monotonic() < deadline, cluster.status(root)
                    time.sleep(2)
        assert final.state.is_completed(), final.state.message
        client = MlflowClient(state.mlflow_url)
        experiment = client.get_experiment_by_name("cluster-test")
        runs = [
            run
            for run in client.search_runs(
                [experiment.experiment_id], run_view_type=ViewType.ACTIVE_ONLY
            )
            if run.data.tags.get("ubo.role") != "parent"
        ]
        names = sorted(run.info.run_name for run in runs)
        expected = sorted(f"coat/{m}/seed{s}" for m in METHODS for s in SEEDS)
        assert names == expected  # every cell, exactly once
        for run in runs:
            assert run.info.status == "FINISHED", run.info.run_name
            artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert {"config.json", "model", "test"} <= artifacts, (run.info.run_name, artifacts)
        assert not trainings_of(root, "host-2")
    finally:
        cluster.down(root)
        shutil.rmtree(root, ignore_errors=True)
