"""flows.local's check that the workers' flow runs will import this checkout's `flows`: a
worker starts them outside the repository, so the environment's install decides (a stale
editable install from another clone crashed every child of a study with "No module named
'flows'" before this check)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from flows.local import check_flows_installed, main

REPO = Path(__file__).resolve().parents[1]


def test_this_checkouts_install_passes():
    check_flows_installed(dict(os.environ))


def test_another_clones_flows_stops_with_one_line_naming_both(tmp_path):
    other = tmp_path / "other-clone"
    (other / "flows").mkdir(parents=True)
    (other / "flows" / "__init__.py").write_text("")
    env = dict(os.environ) | {"PYTHONPATH": str(other)}  # found before the install
    with pytest.raises(RuntimeError) as error:
        check_flows_installed(env)
    message = str(error.value)
    assert "\n" not in message
    assert str(other / "flows") in message and str(REPO / "flows") in message
    assert f"{sys.executable} -m pip install --no-deps -e {REPO}" in message


def test_an_environment_without_the_project_is_named(monkeypatch):
    """The system Python (no venv) stands in for an environment where the project was never
    installed."""
    bare = shutil.which("python3", path="/usr/bin:/bin")
    if bare is None:
        pytest.skip("no system python3")
    monkeypatch.setattr(sys, "executable", bare)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    with pytest.raises(RuntimeError, match="does not import outside this checkout"):
        check_flows_installed(env)


def test_main_stops_before_any_service_starts(tmp_path, monkeypatch, capsys):
    other = tmp_path / "other-clone"
    (other / "flows").mkdir(parents=True)
    (other / "flows" / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(other))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    started = []
    monkeypatch.setattr("flows.local.services_running", lambda *a, **k: started.append(a))
    assert main(["--smoke"]) == 1
    assert not started
    ours = [line for line in capsys.readouterr().err.splitlines() if "mlflow" not in line[:40]]
    assert len(ours) == 1 and ours[0].startswith("error: this environment's `flows` package is ")
