"""scripts/ui_screenshots.py: the MLflow and Prefect web UIs show a small study, as a user
sees it in (headless) Chromium.

Skipped without `chromium` on PATH (Debian: `apt-get install chromium`). Everything lives in
tmp_path: an MLflow store with one parent and two child runs of 3 epochs (real
`flows.tracked_run.train_and_log` on a 30 x 12 data set), a Prefect database holding one flow
run of a tiny parent flow with two subflow runs, and the screenshots. Each test starts the
servers and the browser through the script's own functions and checks that they are all
stopped afterwards.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import mlflow
import pytest
from params_file import write_params
from test_tracking import write_processed

from flows.store import configure, get_experiment_id
from flows.study import end_parent_run, start_parent_run
from flows.tracked_run import train_and_log

REPO = Path(__file__).resolve().parents[1]
CHILDREN = ["coat/ubo/seed0", "coat/umf/seed0"]

pytestmark = pytest.mark.skipif(
    shutil.which("chromium") is None,
    reason="needs chromium on PATH (Debian: apt-get install chromium)",
)


@pytest.fixture(scope="module")
def ui():
    """scripts/ui_screenshots.py as a module (scripts/ is not a package)."""
    path = REPO / "scripts" / "ui_screenshots.py"
    spec = importlib.util.spec_from_file_location("ui_screenshots", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """sqlite store in tmp_path: experiment `ubo`, a parent run and two children (umf, ubo;
    seed 0; 3 epochs, so every per-epoch metric is a curve of 3 points)."""
    root = tmp_path / "repo"
    write_processed(root, "coat")
    write_params(root / "params.yaml", f"data:\n  processed_dir: {root / 'processed'}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    uri = configure(f"sqlite:///{root / 'mlflow.db'}", root)
    try:
        experiment_id = get_experiment_id("ubo", root)
        parent = start_parent_run(experiment_id, ["coat"], ["umf", "ubo"], [0])
        for method in ("umf", "ubo"):
            train_and_log(
                dataset="coat",
                method=method,
                seed=0,
                overrides={"epochs": 3, "device": "cpu", "lr": 0.05},
                params_path=root / "params.yaml",
                repo=root,
                experiment="ubo",
                parent_run_id=parent,
            )
        end_parent_run(parent)
    finally:
        # configure() also exports MLFLOW_TRACKING_URI: leave no trace for later tests.
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = before
    return uri


TINY_FLOW = textwrap.dedent(
    """
    from prefect import flow

    @flow(name="ubo-train")
    def child() -> int:
        return 1

    @flow(name="ubo", flow_run_name="ui-check-parent")
    def parent() -> None:
        for name in {children!r}:
            child.with_options(flow_run_name=name)()

    parent()
    """
)


@pytest.fixture
def prefect_home(tmp_path) -> Path:
    """A Prefect home whose database holds one finished parent flow run with two subflow
    runs, made by Prefect's temporary server (no PREFECT_API_URL), ~10 s."""
    home = tmp_path / "prefect"
    home.mkdir()
    env = dict(os.environ)
    env.pop("PREFECT_API_URL", None)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # The temporary server's 20 s default ran out on a loaded 2-core machine.
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        DO_NOT_TRACK="1",
    )
    done = subprocess.run(
        [sys.executable, "-c", TINY_FLOW.format(children=CHILDREN[::-1])],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return home


def test_mlflow_runs_table_lists_children_and_run_page_draws_a_curve(ui, mlflow_store, tmp_path):
    out = tmp_path / "figures"
    with tempfile.TemporaryDirectory() as tmp, ui.Processes(Path(tmp)) as processes:
        base = ui.start_mlflow(processes, ui.check_store(mlflow_store), Path(tmp))
        started = [process for _, process, _ in processes.started]
        target = ui.mlflow_target(base, "ubo")
        assert target.child_names == CHILDREN
        assert (target.run_name, target.metric) == ("coat/ubo/seed0", "loss/train_loss")
        with ui.Browser(shutil.which("chromium"), Path(tmp)) as browser:
            browser_process = browser.process
            result = ui.check_mlflow(browser, base, target, out)
            # The check reads the page: a run that is not in the store is not "seen".
            missing = dataclasses.replace(target, child_names=["coat/nomethod/seed9"])
            with pytest.raises(ui.CheckFailed, match="nomethod"):
                ui.check_mlflow(browser, base, missing, tmp_path / "unused", timeout=5)

    assert sorted(result.names_shown) == CHILDREN
    assert result.chart["label"] == "coat/ubo/seed0 (loss/train_loss)"
    assert result.chart["lines"] >= 1 and result.chart["svg"]
    assert result.runs_png == out / "mlflow_runs.png"
    assert result.metric_png == out / "mlflow_metric.png"
    for png in (result.runs_png, result.metric_png):
        assert png_size(png) == ui.WINDOW
    assert all(process.poll() is not None for process in [*started, browser_process])


def test_a_fresh_profile_reaches_dcg3_of_every_method_in_three_clicks(ui, mlflow_store, tmp_path):
    """What the README promises: from MLflow's home page, "Model training", the experiment
    `make report` writes ("ubo results: Coat"), the chart view: one dcg_at_3 bar per method."""
    from flows import results_runs, study
    from flows.report_runs import METHOD_DISPLAY

    configure(mlflow_store, tmp_path)
    try:
        table = study.aggregate(get_experiment_id("ubo", tmp_path)).set_index(["dataset", "method"])
        results_runs.publish(table, {"coat": "Coat"}, METHOD_DISPLAY, "code-test")
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    out = tmp_path / "figures"
    with tempfile.TemporaryDirectory() as tmp, ui.Processes(Path(tmp)) as processes:
        base = ui.start_mlflow(processes, ui.check_store(mlflow_store), Path(tmp))
        assert ui.results_target(base) == ("ubo results: Coat", 2)
        with ui.Browser(shutil.which("chromium"), Path(tmp)) as browser:
            result = ui.check_results(browser, base, "ubo results: Coat", 2, out)
            with pytest.raises(ui.CheckFailed, match="clicking 'ubo results: Nowhere'"):
                ui.check_results(browser, base, "ubo results: Nowhere", 2, out, timeout=5)
    assert result.clicks == ["Model training", "ubo results: Coat", "chart view"]
    assert result.bars == 2 and "compareRunsMode=CHART" in result.url
    assert png_size(result.png) == ui.WINDOW


def test_prefect_runs_page_lists_parent_and_child_flow_runs(ui, prefect_home, tmp_path):
    out = tmp_path / "figures"
    with tempfile.TemporaryDirectory() as tmp, ui.Processes(Path(tmp)) as processes:
        api_url = ui.start_prefect(processes, prefect_home, Path(tmp))
        started = [process for _, process, _ in processes.started]
        family = ui.prefect_target(api_url)
        assert family.parent_name == "ui-check-parent"
        assert sorted(family.child_names) == CHILDREN
        with ui.Browser(shutil.which("chromium"), Path(tmp)) as browser:
            browser_process = browser.process
            result = ui.check_prefect(browser, api_url.removesuffix("/api"), family, out)

    assert sorted(result.names_shown) == sorted(["ui-check-parent", *CHILDREN])
    assert result.runs_png == out / "prefect_runs.png"
    assert png_size(result.runs_png) == ui.WINDOW
    assert all(process.poll() is not None for process in [*started, browser_process])
