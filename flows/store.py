"""The MLflow store every flow shares: where it is, its experiments, metric-key naming and
the few client calls (paged search, batched logging) that the run, study and tuning modules
all need.

Every call goes through `MlflowClient` with an explicit run id, never the fluent
`mlflow.start_run` stack: a Prefect worker may run several tasks in one process or thread,
and a parent run lives in another process.

Metric naming: MLflow refuses '@' in metric names (only alphanumerics, `_`, `-`, `.`, ` `,
`:` and `/`), so the project's `dcg@1` is stored as `dcg_at_1`; `to_mlflow_key` and
`from_mlflow_key` convert. In Python, metrics keep the project's names.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException

from ubo_core.errors import UboError

DEFAULT_EXPERIMENT = "ubo"


# -- metric names ----------------------------------------------------------------------------
def to_mlflow_key(name: str) -> str:
    """The project's metric name as an MLflow metric key (`dcg@1` -> `dcg_at_1`)."""
    return name.replace("@", "_at_")


def from_mlflow_key(key: str) -> str:
    """Inverse of `to_mlflow_key` (`dcg_at_1` -> `dcg@1`)."""
    return key.replace("_at_", "@")


# -- store and experiment --------------------------------------------------------------------
def default_tracking_uri(repo: Path) -> str:
    """The repository's own store: `sqlite:///<repo>/mlflow.db` (absolute, so every process
    finds the same database whatever its working directory)."""
    return f"sqlite:///{Path(repo).resolve() / 'mlflow.db'}"


def configure(tracking_uri: str | None, repo: Path) -> str:
    """Point MLflow at `tracking_uri`, else `$MLFLOW_TRACKING_URI`, else the repo's default
    sqlite store; return the URI in use.

    With a sqlite store, experiments created by `get_experiment_id` keep their artifacts
    next to the database (`<repo>/mlruns/<experiment>` for the default store) instead of
    MLflow's `./mlruns` relative to whatever the working directory happens to be.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(repo)
    mlflow.set_tracking_uri(uri)
    return uri


class StoreError(UboError):
    """The MLflow store cannot be used: one line naming it and the problem."""


# sqlite's words for a store's faults, and what to do about each.
_STORE_PROBLEMS = (
    (
        "file is not a database",
        "not an SQLite database (corrupt, or another file): move it "
        "away, or point MLFLOW_TRACKING_URI at another store",
    ),
    (
        "database disk image is malformed",
        "corrupt (malformed database image): restore it from a backup, or move it away",
    ),
    (
        "database is locked",
        "locked by another process for longer than sqlite waits; stop the "
        "other process (another study, `make ui`?) or retry",
    ),
    ("readonly database", "read-only: give this user write access to the file and its folder"),
    ("unable to open database file", "cannot be opened (missing folder or no permission)"),
    ("disk i/o error", "disk I/O error (a full disk?)"),
    ("database or disk is full", "the disk is full"),
)


def open_store(tracking_uri: str | None, repo: Path) -> str:
    """`configure`, then one cheap query, so that a corrupt, locked or read-only store stops
    a command at once with one line naming it (StoreError), not a traceback mid-study."""
    uri = configure(tracking_uri, repo)
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as error:  # sqlalchemy, sqlite3, MLflow and HTTP errors alike
        text = " ".join(str(error).split())
        problem = next(
            (advice for words, advice in _STORE_PROBLEMS if words in text.lower()),
            text.split(" [SQL:")[0][:300],
        )
        where = sqlite_file(uri) or uri
        raise StoreError(f"MLflow store {where}: {problem}") from None
    return uri


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite store's URI, or None for other stores."""
    folder = sqlite_dir(uri)
    return None if folder is None else folder / Path(uri.split("?", 1)[0]).name


def ensure_configured(repo: Path) -> str:
    """The tracking URI in use, configuring the repo's default store if nobody set one."""
    # A worker process that nobody configured would otherwise write to MLflow's default,
    # ./mlflow.db in its working directory; an explicit set_tracking_uri or the env var wins.
    if not mlflow.is_tracking_uri_set():
        return configure(None, repo)
    return mlflow.get_tracking_uri()


def sqlite_dir(uri: str) -> Path | None:
    """Directory of a sqlite store's database file, or None for other stores."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    database = uri[len(prefix) :].split("?", 1)[0]
    if not database or database == ":memory:":
        return None
    return Path(database).resolve().parent


def get_experiment_id(name: str, repo: Path) -> str:
    """Id of experiment `name` in the current store, created if missing (and restored if it
    was deleted). On a sqlite store its artifacts go to `<database dir>/mlruns/<name>`, which
    is `<repo>/mlruns/<name>` for the default store; a tracking server keeps its own."""
    ensure_configured(repo)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        root = sqlite_dir(mlflow.get_tracking_uri())
        location = (root / "mlruns" / name).as_uri() if root is not None else None
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException:
            # Another worker created it between our lookup and create: use theirs.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


# -- searching and logging -------------------------------------------------------------------
def quote(value: str) -> str:
    """`value` as a quoted literal of an MLflow filter string."""
    # MLflow filter strings quote values with single quotes; keys/ids here never contain one.
    if "'" in value:
        raise ValueError(f"cannot search for a value with a quote: {value!r}")
    return f"'{value}'"


def search(experiment_id: str, filter_string: str, order_by: list[str] | None = None) -> list:
    """All active (not deleted) runs matching the filter, across result pages."""
    client = MlflowClient()
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=1000,
            order_by=order_by,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def log_batch(client: MlflowClient, run_id: str, **entities: Sequence) -> None:
    """`client.log_batch` of any number of metrics, params or tags, in allowed chunks."""
    # log_batch takes at most 1000 metrics / 100 params / 100 tags per call.
    limits = {"metrics": 1000, "params": 100, "tags": 100}
    for kind, items in entities.items():
        items = list(items)
        for start in range(0, len(items), limits[kind]):
            client.log_batch(run_id, **{kind: items[start : start + limits[kind]]})


def now_ms() -> int:
    """MLflow's timestamps: milliseconds since the epoch."""
    return int(time.time() * 1000)
