"""MLflow tracking of training runs: one MLflow run per (data set, method, seed, config).

The science stays in `ubo_core`; this module wraps `ubo_core.trainer.fit` with logging,
de-duplication and aggregation, so that the orchestration (Prefect) only has to call
`train_and_log` once per cell of the 9 methods x 4 data sets x 5 seeds grid and
`aggregate` / `log_aggregate` once at the end.

Design choices (and why):

- Every call goes through `MlflowClient` with an explicit run id, never the fluent
  `mlflow.start_run` stack: a Prefect worker may run several tasks in one process or thread,
  and the parent run lives in another process. The parent link is the `mlflow.parentRunId`
  tag that MLflow's UI and `search_runs` understand.
- A run is identified by `run_key`: a hash of everything that determines its result (data
  set, method, seed, resolved config, code version, data version). A FINISHED run with the
  same key is reused instead of retrained, so re-running the benchmark after a crash or a
  change only trains what is missing or changed. Runs a crashed worker left behind
  (RUNNING / FAILED / KILLED) are deleted before retraining, leaving one run per key.

Metric naming scheme (MLflow refuses '@' in metric names: only alphanumerics, `_`, `-`, `.`,
` `, `:` and `/` are allowed, so `dcg@1` is stored as `dcg_at_1`; `to_mlflow_key` and
`from_mlflow_key` convert):

- per-epoch curves (step = epoch): `loss/<name>` for every training loss the method reports,
  `val/<name>` for every validation metric (e.g. `val/val_loss`, `val/hyper_snips_dcg_at_3`), and
  `pcc` (exposure estimate vs. true exposure, semi-synthetic data only);
- final values, unprefixed: `dcg_at_1..3`, `map_at_1..3`, `recall_at_1..3` (test set),
  `pcc` (its last point is the final PCC: it is not logged twice), `wall_seconds` (whole
  `fit` call), `train_seconds` (optimisation only, evaluation excluded), `peak_memory_mib`.

In Python (`ChildRun.metrics`, the `aggregate` table, `to_markdown`) metrics keep the
project's names (`dcg@1`, the same as `python -m ubo_core.train` prints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunStatus, ViewType
from mlflow.exceptions import MlflowException
from mlflow.tracking.context import registry as context_registry

from ubo_core import trainer
from ubo_core.config import DATASETS, Params, TrainConfig, build, load_params
from ubo_core.engine import TrainingTensors, resolve_device
from ubo_core.errors import DataError
from ubo_core.methods import METHODS, get_method, resolve_config
from ubo_core.methods.base import Method
from ubo_core.metrics import RankingTask, per_user_metrics
from ubo_core.train import DATASET_FILE, load_processed
from ubo_core.trainer import KS, UNEXPOSED_PREFIX, EpochReport

DEFAULT_EXPERIMENT = "ubo"

# Tags (the `ubo.` prefix keeps them apart from MLflow's own `mlflow.*` tags).
TAG_RUN_KEY = "ubo.run_key"
TAG_CODE = "ubo.code_version"
TAG_DATA = "ubo.data_version"
TAG_COMMIT = "ubo.git_commit"
TAG_MACHINE = "ubo.machine"  # CPU cores / GPU and torch version of the worker (the report)
TAG_REUSED_BY = "ubo.reused_by."  # + parent run id: a skipped run counts for that parent too
PARENT_TAG = "mlflow.parentRunId"

# Test-set metrics the trainer computes (`ubo_core.trainer.evaluate_test`).
TEST_METRICS: tuple[str, ...] = tuple(
    f"{name}@{k}" for name in ("dcg", "map", "recall") for k in KS
)
# The same on semi-synthetic data's second test protocol (relevant-but-unexposed items).
UNEXPOSED_TEST_METRICS: tuple[str, ...] = tuple(f"{UNEXPOSED_PREFIX}{m}" for m in TEST_METRICS)
# Every final (per-run) metric, in the project's names; `aggregate` averages these.
FINAL_METRICS: tuple[str, ...] = (
    *TEST_METRICS,
    *UNEXPOSED_TEST_METRICS,
    "pcc",
    "wall_seconds",
    "train_seconds",
    "peak_memory_mib",
)
# Train keys that do not change a run's result, so they stay out of `run_key`: the device
# (a run on CPU and one on GPU are the same experiment), the CPU thread count and how often
# the validation curves are evaluated (evaluation never draws from the training generator).
NON_RESULT_KEYS: frozenset[str] = frozenset({"device", "threads", "eval_every"})
# Bump when the meaning of a key changes, so that old runs are not reused by mistake.
RUN_KEY_VERSION = 1

MODEL_DIR = "model"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
EXPOSURE_PATH = "exposure/test_exposure.npz"
# Per-user test metrics (user ids + dcg_at_k, map_at_k, recall_at_k arrays): what the report's
# paired significance tests compare, user by user.
PER_USER_PATH = "test/per_user_metrics.npz"
# Run statuses a crashed or killed worker leaves behind.
UNFINISHED = ("RUNNING", "FAILED", "KILLED")


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


def _ensure_configured(repo: Path) -> str:
    # A worker process that nobody configured would otherwise write to MLflow's default,
    # ./mlflow.db in its working directory; an explicit set_tracking_uri or the env var wins.
    if not mlflow.is_tracking_uri_set():
        return configure(None, repo)
    return mlflow.get_tracking_uri()


def _sqlite_dir(uri: str) -> Path | None:
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
    _ensure_configured(repo)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        root = _sqlite_dir(mlflow.get_tracking_uri())
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


# -- versions and run key --------------------------------------------------------------------
def code_version(repo: Path) -> str:
    """Version of the code that decides results: a hash of the git tree of `ubo_core/` at HEAD
    (`git ls-tree`); `unknown` outside git.

    A content hash rather than the commit: a commit that only touches docs, flows or tests
    keeps the version, so runs of one study stay comparable while the report is written
    (`git_commit` records the commit itself). params.yaml is not part of it: the run key holds
    the resolved configuration of each run, so editing another method's or data set's entry
    (or a comment) keeps every other run valid. When `ubo_core/` has uncommitted changes the
    suffix is `+dirty.<hash of the changes>`: with a bare `+dirty`, two different uncommitted
    edits would share a run key and the second would silently reuse the first one's results.
    """
    paths = ("ubo_core",)

    def git(*args: str) -> bytes:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, check=True
        ).stdout

    try:
        objects = git("ls-tree", "HEAD", "--", *paths)
        version = "code-" + hashlib.sha256(objects).hexdigest()[:16]
        if not git("status", "--porcelain", "--", *paths).strip():
            return version
        digest = hashlib.sha256(git("diff", "HEAD", "--binary", "--", *paths))
        untracked = git("ls-files", "--others", "--exclude-standard", "-z", "--", *paths)
        for name in sorted(filter(None, untracked.split(b"\0"))):
            digest.update(b"\0" + name + b"\0" + (Path(repo) / name.decode()).read_bytes())
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{version}+dirty.{digest.hexdigest()[:12]}"


def machine_description(device: torch.device) -> str:
    """What ran a training run, for the report: e.g. `x86_64, 2 CPU cores, torch 2.13.0`."""
    text = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def git_commit(repo: Path) -> str:
    """HEAD's commit (what a report names), `unknown` outside git."""
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.decode().strip()


@lru_cache(maxsize=64)
def _file_md5(path: str, size: int, mtime_ns: int) -> str:
    # Cached on (path, size, mtime) so that 45 runs of one data set hash its file once.
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_md5(path: Path) -> str:
    """md5 of a file's bytes (what DVC 3 records for a file output with `hash: md5`)."""
    stat = path.stat()
    return _file_md5(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _dvc_lock_md5s(repo: Path) -> dict[str, str]:
    """path -> md5 of every output recorded in `<repo>/dvc.lock` ({} if none)."""
    lock = Path(repo) / "dvc.lock"
    if not lock.is_file():
        return {}
    try:
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    except yaml.YAMLError:
        return {}
    return {
        str(out["path"]): str(out["md5"])
        for stage in stages.values()
        if isinstance(stage, dict)
        for out in stage.get("outs", []) or []
        if isinstance(out, dict) and "path" in out and "md5" in out
    }


def data_version(processed_dir: Path, dataset: str, repo: Path) -> str:
    """Content hash of `<processed_dir>/<dataset>/dataset.npz`.

    The md5 that `dvc.lock` records for it (so the version can be looked up in DVC) when the
    file really has that md5; otherwise `md5:<md5 of the file>` (a file DVC did not produce,
    or one changed since `dvc repro`). Either way the same bytes give the same version.
    """
    path = Path(processed_dir) / dataset / DATASET_FILE
    if not path.is_file():
        raise DataError(path, f"not found; build it with `dvc repro validation@{dataset}`")
    actual = file_md5(path)
    recorded = _dvc_lock_md5s(repo)
    candidates = [f"data/processed/{dataset}/{DATASET_FILE}"]
    try:
        candidates.append(path.resolve().relative_to(Path(repo).resolve()).as_posix())
    except ValueError:
        pass  # outside the repo: only the conventional DVC path can name it
    if any(recorded.get(candidate) == actual for candidate in candidates):
        return actual
    return f"md5:{actual}"


def resolved_config(train: TrainConfig, hyper: Any) -> dict[str, dict[str, Any]]:
    """`{"train": {...}, "hyper": {...}}`: the resolved config as plain JSON-able dicts."""
    return {"train": dataclasses.asdict(train), "hyper": dataclasses.asdict(hyper)}


def _result_config(config: dict[str, Any]) -> dict[str, Any]:
    # Non-result keys may sit at the top level (a flat config) or in the "train" section.
    kept = {k: v for k, v in config.items() if k not in NON_RESULT_KEYS}
    if isinstance(kept.get("train"), dict):
        kept["train"] = {k: v for k, v in kept["train"].items() if k not in NON_RESULT_KEYS}
    return kept


def run_key(dataset: str, method: str, seed: int, config: dict, code: str, data: str) -> str:
    """sha256 (hex) of the canonical JSON of everything that determines a run's result.

    `config` is the resolved config (`resolved_config(train, hyper)`); `device`, `threads`
    and `eval_every` are left out (at the top level and in `config["train"]`) since they do
    not change the trained model. Keys are sorted, so dict order does not matter.
    """
    payload = {
        "version": RUN_KEY_VERSION,
        "dataset": dataset,
        "method": method,
        "seed": int(seed),
        "config": _result_config(config),
        "code": code,
        "data": data,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# -- finding runs ----------------------------------------------------------------------------
def _quote(value: str) -> str:
    # MLflow filter strings quote values with single quotes; keys/ids here never contain one.
    if "'" in value:
        raise ValueError(f"cannot search for a value with a quote: {value!r}")
    return f"'{value}'"


def _search(experiment_id: str, filter_string: str, order_by: list[str] | None = None) -> list:
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


def find_finished_run(experiment_id: str, key: str) -> Run | None:
    """The FINISHED, not deleted run tagged `ubo.run_key = key` (the latest if several)."""
    runs = _search(
        experiment_id,
        f"tags.`{TAG_RUN_KEY}` = {_quote(key)} and attributes.status = 'FINISHED'",
        ["attributes.start_time DESC"],
    )
    return runs[0] if runs else None


def discard_unfinished_runs(experiment_id: str, key: str) -> int:
    """Delete the runs with this key that are RUNNING, FAILED or KILLED; return how many.

    They are what a crashed or killed worker leaves behind; deleting them before retraining
    leaves exactly one run per key. This assumes one worker per key at a time (the
    orchestrator never trains the same cell twice concurrently): a RUNNING run is taken to
    be dead. Deletion is MLflow's soft delete (`mlflow gc` purges).
    """
    # Status is filtered here, not in the search: MLflow's search grammar accepts IN (...)
    # only for run_id, and a key has a handful of runs at most.
    runs = [
        run
        for run in _search(experiment_id, f"tags.`{TAG_RUN_KEY}` = {_quote(key)}")
        if run.info.status in UNFINISHED
    ]
    client = MlflowClient()
    for run in runs:
        client.delete_run(run.info.run_id)
    return len(runs)


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested dicts -> `{"a.b": str(value)}` (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = str(value)
    return flat


# -- one training run ------------------------------------------------------------------------
@dataclass
class ChildRun:
    """What `train_and_log` returns: the MLflow run and its final metrics (project names)."""

    run_id: str
    metrics: dict[str, float]
    skipped: bool  # True when an identical FINISHED run was reused instead of training


def final_metrics(run: Run) -> dict[str, float]:
    """A run's final metrics in the project's names (`dcg@1`, `pcc`, `wall_seconds`, ...)."""
    values = {from_mlflow_key(key): value for key, value in run.data.metrics.items()}
    return {name: values[name] for name in FINAL_METRICS if name in values}


def _log_batch(client: MlflowClient, run_id: str, **entities: Sequence) -> None:
    # log_batch takes at most 1000 metrics / 100 params / 100 tags per call.
    limits = {"metrics": 1000, "params": 100, "tags": 100}
    for kind, items in entities.items():
        items = list(items)
        for start in range(0, len(items), limits[kind]):
            client.log_batch(run_id, **{kind: items[start : start + limits[kind]]})


def _now_ms() -> int:
    return int(time.time() * 1000)


def _epoch_metrics(report: EpochReport) -> list[Metric]:
    timestamp = _now_ms()
    values = {f"loss/{name}": value for name, value in report.losses.items()}
    for name, value in report.metrics.items():
        values["pcc" if name == "pcc" else f"val/{name}"] = value
    return [
        Metric(to_mlflow_key(key), float(value), timestamp, report.epoch)
        for key, value in values.items()
    ]


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is the process's peak resident set (KiB on Linux, bytes on macOS): an upper
    # bound for this run when a worker trains several runs in one process.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


@torch.no_grad()
def pair_exposure(
    method: Method, users: np.ndarray, items: np.ndarray, block: int = 4096
) -> np.ndarray | None:
    """The method's exposure estimate m_bar at each (user, item) pair, float64, or None for
    methods without one. Computed per block of users so that memory stays O(block x M)."""
    out = np.empty(users.shape, dtype=np.float64)
    unique = np.unique(users)
    for start in range(0, unique.size, block):
        chunk = unique[start : start + block]
        rows = method.exposure(torch.as_tensor(chunk, dtype=torch.long, device=method.device))
        if rows is None:
            return None
        selected = np.isin(users, chunk)
        row = torch.as_tensor(np.searchsorted(chunk, users[selected]), device=method.device)
        col = torch.as_tensor(items[selected].astype(np.int64), device=method.device)
        out[selected] = rows[row, col].double().cpu().numpy()
    return out


def _write_artifacts(directory: Path, method: Method, data: Any, document: dict[str, Any]) -> None:
    """The run's artifact tree, written locally then uploaded in one `log_artifacts`."""
    model_dir = directory / MODEL_DIR
    model_dir.mkdir(parents=True)
    state = {name: value.detach().cpu().clone() for name, value in method.state().items()}
    torch.save(state, model_dir / STATE_FILE)
    text = json.dumps(document, indent=2, sort_keys=True, default=str)
    (model_dir / CONFIG_FILE).write_text(text)
    (directory / CONFIG_FILE).write_text(text)
    task = RankingTask.from_pairs(data.test_user, data.test_item, data.test_label, data.eval_users)
    per_user = per_user_metrics(trainer.task_scores(method, task), task, KS)
    path = directory / PER_USER_PATH
    path.parent.mkdir(parents=True)
    arrays = {to_mlflow_key(name): values for name, values in per_user.items()}
    np.savez_compressed(path, user=task.user_ids, **arrays)
    users = np.asarray(data.test_user)
    items = np.asarray(data.test_item)
    exposure = pair_exposure(method, users, items)
    if exposure is not None:
        path = directory / EXPOSURE_PATH
        path.parent.mkdir(parents=True)
        np.savez_compressed(path, user=users, item=items, exposure=exposure)


def _processed_dir(path: Path, repo: Path) -> Path:
    # params.yaml paths are relative to the repo (DVC runs there); a worker's cwd may differ.
    return path if path.is_absolute() else Path(repo) / path


@dataclass(frozen=True)
class _Identity:
    """Everything that names a run, resolved once."""

    train: TrainConfig
    hyper: Any
    config: dict[str, Any]
    processed_dir: Path
    code: str
    data: str
    key: str


def _identity(
    params: Params,
    repo: Path,
    dataset: str,
    method: str,
    seed: int,
    overrides: dict | None,
    code: str | None = None,
) -> _Identity:
    train, hyper = resolve_config(params, dataset, method, overrides)
    config = resolved_config(train, hyper)
    processed_dir = _processed_dir(params.data.processed_dir, repo)
    code = code or code_version(repo)
    data = data_version(processed_dir, dataset, repo)
    key = run_key(dataset, method, seed, config, code, data)
    return _Identity(train, hyper, config, processed_dir, code, data, key)


def train_and_log(
    *,
    dataset: str,
    method: str,
    seed: int,
    overrides: dict,
    params_path: Path,
    repo: Path,
    experiment: str,
    parent_run_id: str | None,
    progress: bool = False,
) -> ChildRun:
    """Train one (dataset, method, seed) and log it as an MLflow run, or reuse an identical
    FINISHED run.

    Uses the tracking URI set in this process (`configure`, `mlflow.set_tracking_uri` or
    `$MLFLOW_TRACKING_URI`), else the repo's default store. The run is named
    `<dataset>/<method>/seed<seed>` and, with `parent_run_id`, nested under that run (tag
    `mlflow.parentRunId`; works from any process). A reused run is tagged
    `ubo.reused_by.<parent_run_id>` so that `aggregate(parent_run_id=...)` counts it.
    On any exception the run ends FAILED (KILLED on Ctrl-C) and the exception propagates;
    the next call with the same key deletes it and trains afresh.
    """
    repo = Path(repo)
    _ensure_configured(repo)
    identity = _identity(load_params(params_path), repo, dataset, method, seed, overrides)
    key = identity.key
    experiment_id = get_experiment_id(experiment, repo)
    client = MlflowClient()

    existing = find_finished_run(experiment_id, key)
    if existing is not None:
        run_id = existing.info.run_id
        if parent_run_id and existing.data.tags.get(PARENT_TAG) != parent_run_id:
            client.set_tag(run_id, TAG_REUSED_BY + parent_run_id, "true")
        return ChildRun(run_id, final_metrics(existing), skipped=True)

    discard_unfinished_runs(experiment_id, key)
    device = resolve_device(identity.train.device)
    tags = {
        "dataset": dataset,
        "method": method,
        "seed": str(seed),
        TAG_RUN_KEY: key,
        TAG_CODE: identity.code,
        TAG_DATA: identity.data,
        TAG_COMMIT: git_commit(repo),
        TAG_MACHINE: machine_description(device),
        "device": str(device),
    }
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    # resolve_tags adds what the fluent API would (mlflow.user, mlflow.source.*).
    run = client.create_run(
        experiment_id,
        tags=context_registry.resolve_tags(tags),
        run_name=f"{dataset}/{method}/seed{seed}",
    )
    run_id = run.info.run_id
    try:
        metrics = _train_logged(client, run_id, dataset, method, seed, identity, device, progress)
    except KeyboardInterrupt:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    return ChildRun(run_id, metrics, skipped=False)


def _train_logged(
    client: MlflowClient,
    run_id: str,
    dataset: str,
    method: str,
    seed: int,
    identity: _Identity,
    device: torch.device,
    progress: bool,
) -> dict[str, float]:
    """The body of `train_and_log` once its run exists: params, curves, metrics, artifacts."""
    train, hyper, config = identity.train, identity.hyper, identity.config
    processed_dir = identity.processed_dir
    params = flatten(config) | {"dataset": dataset, "method": method, "seed": str(seed)}
    _log_batch(client, run_id, params=[Param(k, v) for k, v in params.items()])
    data = load_processed(processed_dir, dataset)

    def log_epoch(report: EpochReport) -> None:
        client.log_batch(run_id, metrics=_epoch_metrics(report))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    # trainer.fit through the module, so tests (and profilers) can patch it.
    result = trainer.fit(method, data, train, hyper, seed, callback=log_epoch, progress=progress)
    metrics = dict(result.test_metrics)
    if result.history and "pcc" in result.history[-1].metrics:
        metrics["pcc"] = result.history[-1].metrics["pcc"]  # already the curve's last point
    metrics["wall_seconds"] = time.perf_counter() - started
    metrics["train_seconds"] = result.seconds
    metrics["peak_memory_mib"] = _peak_memory_mib(device)
    timestamp, step = _now_ms(), train.epochs
    _log_batch(
        client,
        run_id,
        metrics=[
            Metric(to_mlflow_key(name), float(value), timestamp, step)
            for name, value in metrics.items()
            if name != "pcc"
        ],
    )
    document = {
        "dataset": dataset,
        "method": method,
        "seed": seed,
        "train": config["train"],
        "hyper": config["hyper"],
        "method_class": f"{type(result.method).__module__}.{type(result.method).__qualname__}",
        "code_version": identity.code,
        "data_version": identity.data,
        "run_key": identity.key,
        "processed_dir": str(Path(processed_dir).resolve()),
    }
    with tempfile.TemporaryDirectory(prefix="ubo-run-") as tmp:
        _write_artifacts(Path(tmp), result.method, data, document)
        client.log_artifacts(run_id, tmp)
    return metrics


# -- reloading a model -----------------------------------------------------------------------
def _load_device(requested: str) -> torch.device:
    # CPU unless the run asked for CUDA (or auto) and this machine has it.
    if requested != "cpu" and torch.cuda.is_available():
        return resolve_device(requested)
    return torch.device("cpu")


def load_model(run_id: str, processed_dir: Path | None = None) -> tuple[Method, TrainingTensors]:
    """Rebuild a logged run's trained method on its processed data.

    Reads `model/config.json` and `model/state.pt`; the data come from `processed_dir` (by
    default the directory the run trained on) and must have the md5 the run recorded (else
    DataError). Runs on CPU unless the run's device is auto/cuda and CUDA is available.
    `ubo_core.trainer.evaluate_test(method, tensors)` then reproduces the run's logged test
    metrics (exactly on the same device type: the method is constructed as `fit` does, with
    a generator seeded by the run's seed, so any random structure outside `state()` matches).
    """
    with tempfile.TemporaryDirectory(prefix="ubo-model-") as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=MODEL_DIR, dst_path=tmp
            )
        )
        document = json.loads((local / CONFIG_FILE).read_text())
        state = torch.load(local / STATE_FILE, map_location="cpu", weights_only=True)
    cls = get_method(document["method"])
    train = build(TrainConfig, document["train"], "train.")
    hyper = build(cls.Hyper, document["hyper"], f"methods.{document['method']}.")
    directory = (
        Path(processed_dir) if processed_dir is not None else Path(document["processed_dir"])
    )
    dataset = document["dataset"]
    path = directory / dataset / DATASET_FILE
    if not path.is_file():
        raise DataError(path, f"not found; run {run_id} trained on it")
    recorded = str(document["data_version"]).removeprefix("md5:")
    if file_md5(path) != recorded:
        raise DataError(path, f"its md5 differs from the one run {run_id} trained on ({recorded})")
    device = _load_device(train.device)
    tensors = TrainingTensors(load_processed(directory, dataset), device)
    # fork_rng: seed like fit does without changing the caller's global RNG state.
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(document["seed"]))
        generator = torch.Generator(device=device).manual_seed(int(document["seed"]))
        method = cls(tensors, train, hyper, generator)
    method.load_state(state)
    return method, tensors


# -- aggregation -----------------------------------------------------------------------------
def _runs_of(experiment_id: str, parent_run_id: str | None) -> list[Run]:
    finished = "attributes.status = 'FINISHED'"
    if parent_run_id is None:
        return _search(experiment_id, finished)
    parent = _quote(parent_run_id)
    children = _search(experiment_id, f"{finished} and tags.`{PARENT_TAG}` = {parent}")
    reused = _search(
        experiment_id, f"{finished} and tags.`{TAG_REUSED_BY}{parent_run_id}` = 'true'"
    )
    unique = {run.info.run_id: run for run in [*children, *reused]}
    return list(unique.values())


def _order(values: Iterable[str], known: Sequence[str]) -> dict[str, tuple[int, str]]:
    # Paper order for known names (data sets, methods), then the rest alphabetically.
    return {v: (known.index(v) if v in known else len(known), v) for v in values}


def aggregate(experiment_id: str, parent_run_id: str | None = None) -> pd.DataFrame:
    """One row per (dataset, method): `n_seeds` and `<metric>_mean`, `<metric>_std` (ddof=1,
    NaN for one seed) over seeds of every metric in FINAL_METRICS (NaN where no run has it,
    e.g. pcc on real data).

    Only FINISHED training runs (those tagged with a dataset and a method) count: the children
    of `parent_run_id` (tag `mlflow.parentRunId`, plus runs that call reused) when given, else
    all. Should one seed have several runs (e.g. configs changed between benchmark runs), the
    latest-started counts, so `n_seeds` counts seeds, not runs.
    """
    return _aggregate(_runs_of(experiment_id, parent_run_id))


def _aggregate(runs: Iterable[Run]) -> pd.DataFrame:
    latest: dict[tuple[str, str, str], Run] = {}
    for run in runs:
        tags = run.data.tags
        if run.info.status != "FINISHED" or "dataset" not in tags or "method" not in tags:
            continue  # unfinished, a parent or an unrelated run
        cell = (tags["dataset"], tags["method"], tags.get("seed", run.info.run_id))
        if cell not in latest or run.info.start_time > latest[cell].info.start_time:
            latest[cell] = run
    rows = []
    for (dataset, method, seed), run in latest.items():
        values = final_metrics(run)
        rows.append({"dataset": dataset, "method": method, "seed": seed} | values)
    columns = ["dataset", "method", "n_seeds"]
    columns += [f"{name}_{stat}" for name in FINAL_METRICS for stat in ("mean", "std")]
    if not rows:
        return pd.DataFrame(columns=columns)
    runs_table = pd.DataFrame(rows).reindex(columns=["dataset", "method", "seed", *FINAL_METRICS])
    runs_table[list(FINAL_METRICS)] = runs_table[list(FINAL_METRICS)].astype(float)
    grouped = runs_table.groupby(["dataset", "method"], sort=False)
    table = grouped[list(FINAL_METRICS)].agg(["mean", "std"])  # pandas std: ddof=1
    table.columns = [f"{name}_{stat}" for name, stat in table.columns]
    table.insert(0, "n_seeds", grouped.size())
    table = table.reset_index()
    dataset_rank = _order(table["dataset"], DATASETS)
    method_rank = _order(table["method"], list(METHODS))
    table["_order"] = [
        (dataset_rank[d], method_rank[m])
        for d, m in zip(table["dataset"], table["method"], strict=True)
    ]
    table = table.sort_values("_order").drop(columns="_order").reset_index(drop=True)
    return table[columns]


def _cell(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def to_markdown(
    table: pd.DataFrame,
    metrics: Sequence[str] = ("dcg@1", "dcg@2", "dcg@3", "map@1", "map@2", "map@3"),
) -> str:
    """One markdown table per data set (rows = metrics, columns = methods, cells
    `mean ± std` to 3 decimals; mean alone for one seed, `–` where missing), plus a row with
    the number of seeds. Built by hand: no `tabulate` dependency."""
    blocks = []
    for dataset, part in table.groupby("dataset", sort=False):
        methods = list(part["method"])
        lines = [
            f"### {dataset}",
            "",
            "| metric | " + " | ".join(methods) + " |",
            "|---|" + "---:|" * len(methods),
        ]
        for name in metrics:
            cells = [
                _cell(float(row[f"{name}_mean"]), float(row[f"{name}_std"]))
                for _, row in part.iterrows()
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("| seeds | " + " | ".join(str(int(n)) for n in part["n_seeds"]) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def _aggregate_metrics(table: pd.DataFrame) -> Iterator[tuple[str, float]]:
    for _, row in table.iterrows():
        for name in FINAL_METRICS:
            for stat in ("mean", "std"):
                value = float(row[f"{name}_{stat}"])
                if not math.isnan(value):  # one seed (std) or a metric the data lack (pcc)
                    yield f"{row['dataset']}/{row['method']}/{to_mlflow_key(name)}_{stat}", value


def log_aggregate(parent_run_id: str, table: pd.DataFrame) -> None:
    """Log the aggregate on the parent run: metrics `<dataset>/<method>/<metric>_mean` and
    `_std` (MLflow keys, e.g. `coat/ubo/dcg_at_1_mean`; NaN values are left out) and the
    artifacts `results.csv` (the table) and `results.md` (`to_markdown`)."""
    client = MlflowClient()
    timestamp = _now_ms()
    metrics = [Metric(key, value, timestamp, 0) for key, value in _aggregate_metrics(table)]
    _log_batch(client, parent_run_id, metrics=metrics)
    with tempfile.TemporaryDirectory(prefix="ubo-results-") as tmp:
        csv_path, md_path = Path(tmp) / "results.csv", Path(tmp) / "results.md"
        table.to_csv(csv_path, index=False)
        md_path.write_text(to_markdown(table))
        client.log_artifact(parent_run_id, str(csv_path))
        client.log_artifact(parent_run_id, str(md_path))


# -- helpers of the benchmark flow (flows/benchmark.py, flows/local.py) ----------------------
# The parent flow checks for finished runs itself before submitting children (a skipped child
# then costs no Prefect flow run at all), so these wrap the functions above.
TAG_ROLE = "ubo.role"
TAG_FAILED = "ubo.failed_children"
TAG_FLOW_RUN = "prefect.flow_run_id"


def _prefect_flow_run_id() -> str | None:
    # Imported here: prefect is slow to import and this module is used outside Prefect too.
    try:
        from prefect.runtime import flow_run
    except ImportError:  # pragma: no cover - prefect is a project dependency
        return None
    run_id = flow_run.id
    return str(run_id) if run_id else None


def start_parent_run(
    experiment_id: str,
    datasets: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    overrides: dict[str, Any] | None = None,
    method_overrides: dict[str, dict[str, Any]] | None = None,
) -> str:
    """Create the (RUNNING) parent run of one benchmark and return its id.

    Params: the grid (comma-separated) and the overrides (`overrides.<key>`,
    `method_overrides.<method>.<key>`). Tags: `ubo.role = parent`, and inside a Prefect flow
    run `prefect.flow_run_id`, so that `results_for_flow_run` finds it from the flow run id.
    """
    client = MlflowClient()
    tags = {TAG_ROLE: "parent"}
    flow_run_id = _prefect_flow_run_id()
    if flow_run_id:
        tags[TAG_FLOW_RUN] = flow_run_id
    run = client.create_run(
        experiment_id,
        tags=context_registry.resolve_tags(tags),
        run_name=f"benchmark {time.strftime('%Y-%m-%d %H:%M:%S')}",
    )
    params = {
        "datasets": ",".join(datasets),
        "methods": ",".join(methods),
        "seeds": ",".join(str(seed) for seed in seeds),
    }
    params |= flatten(overrides or {}, "overrides.")
    params |= flatten(method_overrides or {}, "method_overrides.")
    _log_batch(client, run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return run.info.run_id


def finished_run_for(
    params: Params,
    repo: Path,
    experiment_id: str,
    dataset: str,
    method: str,
    seed: int,
    overrides: dict | None,
    code: str | None = None,
) -> str | None:
    """Id of the FINISHED run `train_and_log` would reuse for these arguments, else None (the
    same run key: resolved config, code version and data version). `code` names another code
    version than the checkout's (`code_version`), e.g. the one a committed report was made of."""
    key = _identity(params, Path(repo), dataset, method, seed, overrides, code).key
    run = find_finished_run(experiment_id, key)
    return run.info.run_id if run is not None else None


def aggregate_runs(
    experiment_id: str, run_ids: Iterable[str], parent_run_id: str | None = None
) -> pd.DataFrame:
    """`aggregate` over the given runs plus, with `parent_run_id`, that run's children (so a
    child whose id the caller did not get back still counts). Same table as `aggregate`."""
    client = MlflowClient()
    runs = {run_id: client.get_run(run_id) for run_id in dict.fromkeys(run_ids)}
    if parent_run_id is not None:
        for run in _runs_of(experiment_id, parent_run_id):
            runs.setdefault(run.info.run_id, run)
    return _aggregate(runs.values())


def end_parent_run(parent_run_id: str, failed: Sequence[str] = ()) -> None:
    """End the parent run: FINISHED, or FAILED with tag `ubo.failed_children` naming them."""
    client = MlflowClient()
    if failed:
        client.set_tag(parent_run_id, TAG_FAILED, ", ".join(failed))  # MLflow truncates long tags
    status = RunStatus.FAILED if failed else RunStatus.FINISHED
    client.set_terminated(parent_run_id, RunStatus.to_string(status))


def results_for_flow_run(flow_run_id: str, repo: Path) -> str | None:
    """`results.md` of the parent run started by Prefect flow run `flow_run_id` (in any
    experiment of the configured store, else the repo's default), or None if there is none
    (yet)."""
    _ensure_configured(Path(repo))
    client = MlflowClient()
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return None
    runs = client.search_runs(
        experiment_ids,
        f"tags.`{TAG_FLOW_RUN}` = {_quote(str(flow_run_id))}",
        run_view_type=ViewType.ACTIVE_ONLY,
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return None
    run_id = runs[0].info.run_id
    if "results.md" not in {info.path for info in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory(prefix="ubo-results-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="results.md", dst_path=tmp
        )
        return Path(local).read_text()


__all__ = [
    "DEFAULT_EXPERIMENT",
    "FINAL_METRICS",
    "TEST_METRICS",
    "UNEXPOSED_TEST_METRICS",
    "ChildRun",
    "aggregate",
    "aggregate_runs",
    "code_version",
    "configure",
    "data_version",
    "default_tracking_uri",
    "discard_unfinished_runs",
    "end_parent_run",
    "find_finished_run",
    "finished_run_for",
    "flatten",
    "from_mlflow_key",
    "get_experiment_id",
    "load_model",
    "log_aggregate",
    "resolved_config",
    "results_for_flow_run",
    "run_key",
    "start_parent_run",
    "to_markdown",
    "to_mlflow_key",
    "train_and_log",
]
