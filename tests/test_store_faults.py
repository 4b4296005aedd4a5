"""A corrupt or locked MLflow store stops every command at once, in one line naming it
(issue 14, fault 7): `make benchmark` (before any service starts), `make report`, flows.tune
and `make ui`."""

from __future__ import annotations

import sqlite3

import pytest

from flows import local, report, tune, ui
from flows.store import StoreError, open_store


@pytest.fixture
def corrupt_store(tmp_path, monkeypatch):
    database = tmp_path / "mlflow.db"
    database.write_bytes(b"this is not an SQLite database, " * 200)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{database}")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    return database


@pytest.mark.parametrize(
    "command",
    [
        lambda: local.main(["--smoke"]),
        lambda: report.main(["--out", "/nonexistent/never-written"]),
        lambda: tune.main(["show"]),
        lambda: ui.main(["--port", "5999"]),
    ],
    ids=["flows.local", "flows.report", "flows.tune", "flows.ui"],
)
def test_a_corrupt_store_is_one_line_naming_it(corrupt_store, capsys, command):
    assert command() == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: MLflow store {corrupt_store}: not an SQLite database (corrupt, or another "
        "file): move it away, or point MLFLOW_TRACKING_URI at another store\n"
    )
    assert not (corrupt_store.parent / "prefect").exists()  # nothing was started


def test_a_locked_store_is_one_line_naming_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    open_store(uri, tmp_path)  # a good store, created and migrated
    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process's long write
    try:
        with pytest.raises(StoreError) as caught:
            open_store(uri, tmp_path)
    finally:
        holder.close()
    assert str(caught.value).startswith(f"MLflow store {tmp_path / 'mlflow.db'}: locked by ")
    assert "\n" not in str(caught.value)
    assert open_store(uri, tmp_path) == uri  # free again: usable
