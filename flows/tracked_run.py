"""One tracked training run: `train_and_log` wraps `ubo_core.trainer.fit` with an MLflow run
(params, per-epoch curves, final metrics, the model and per-user artifacts), reuses an
identical FINISHED run, and `load_model` rebuilds a logged model.

Runs a crashed worker left behind (RUNNING / FAILED / KILLED) are deleted before retraining,
leaving one run per key (flows/run_identity.py).

Metric keys (store.py converts `@`):
- per-epoch curves (step = epoch): `loss/<name>` for every training loss the method reports,
  `val/<name>` for every validation metric (e.g. `val/val_loss`, `val/hyper_snips_dcg_at_3`),
  and `pcc` (exposure estimate vs. true exposure, semi-synthetic data only);
- final values, unprefixed: `dcg_at_1..3`, `map_at_1..3`, `recall_at_1..3` (test set), on
  semi-synthetic data also `unexposed_*` (the second test protocol), `pcc` (its last point
  is the final PCC: it is not logged twice), `wall_seconds` (whole `fit` call),
  `train_seconds` (optimisation only, evaluation excluded), `peak_memory_mib`.
"""

from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunStatus
from mlflow.tracking.context import registry as context_registry

from flows.run_identity import (
    PARENT_TAG,
    TAG_CODE,
    TAG_COMMIT,
    TAG_DATA,
    TAG_MACHINE,
    TAG_REUSED_BY,
    TAG_RUN_KEY,
    RunIdentity,
    file_md5,
    flatten,
    git_commit,
    identify,
    machine_description,
)
from flows.store import (
    ensure_configured,
    from_mlflow_key,
    get_experiment_id,
    log_batch,
    now_ms,
    quote,
    search,
    to_mlflow_key,
)
from ubo_core import fused, trainer
from ubo_core.config import Params, TrainConfig, build, load_params
from ubo_core.data import DATASET_FILE, load_processed
from ubo_core.engine import TrainingTensors, resolve_device
from ubo_core.errors import DataError
from ubo_core.methods import get_method
from ubo_core.methods.base import Method
from ubo_core.trainer import KS, UNEXPOSED_PREFIX, EpochReport, FitResult

# Test-set metrics the trainer computes (`ubo_core.trainer.evaluate_test`).
TEST_METRICS: tuple[str, ...] = tuple(
    f"{name}@{k}" for name in ("dcg", "map", "recall") for k in KS
)
# The same on semi-synthetic data's second test protocol (relevant-but-unexposed items).
UNEXPOSED_TEST_METRICS: tuple[str, ...] = tuple(f"{UNEXPOSED_PREFIX}{m}" for m in TEST_METRICS)
# Every final (per-run) metric, in the project's names; studies average these.
FINAL_METRICS: tuple[str, ...] = (
    *TEST_METRICS,
    *UNEXPOSED_TEST_METRICS,
    "pcc",
    "wall_seconds",
    "train_seconds",
    "peak_memory_mib",
)

MODEL_DIR = "model"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.json"
EXPOSURE_PATH = "exposure/test_exposure.npz"
# Per-user test metrics (user ids + dcg_at_k, map_at_k, recall_at_k arrays): what the report's
# paired significance tests compare, user by user.
PER_USER_PATH = "test/per_user_metrics.npz"
# Run statuses a crashed or killed worker leaves behind.
UNFINISHED = ("RUNNING", "FAILED", "KILLED")


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


def find_finished_run(experiment_id: str, key: str) -> Run | None:
    """The FINISHED, not deleted run tagged `ubo.run_key = key` (the latest if several)."""
    runs = search(
        experiment_id,
        f"tags.`{TAG_RUN_KEY}` = {quote(key)} and attributes.status = 'FINISHED'",
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
        for run in search(experiment_id, f"tags.`{TAG_RUN_KEY}` = {quote(key)}")
        if run.info.status in UNFINISHED
    ]
    client = MlflowClient()
    for run in runs:
        client.delete_run(run.info.run_id)
    return len(runs)


def _epoch_metrics(report: EpochReport) -> list[Metric]:
    timestamp = now_ms()
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


def _write_artifacts(
    directory: Path,
    result: FitResult,
    data_users: np.ndarray,
    data_items: np.ndarray,
    document: dict[str, Any],
) -> None:
    """The run's artifact tree, written locally then uploaded in one `log_artifacts`."""
    model_dir = directory / MODEL_DIR
    model_dir.mkdir(parents=True)
    state = {name: value.detach().cpu().clone() for name, value in result.method.state().items()}
    torch.save(state, model_dir / STATE_FILE)
    text = json.dumps(document, indent=2, sort_keys=True, default=str)
    (model_dir / CONFIG_FILE).write_text(text)
    (directory / CONFIG_FILE).write_text(text)
    path = directory / PER_USER_PATH
    path.parent.mkdir(parents=True)
    arrays = {to_mlflow_key(name): values for name, values in result.test_per_user.items()}
    np.savez_compressed(path, user=result.test_users, **arrays)
    if result.test_exposure is not None:
        path = directory / EXPOSURE_PATH
        path.parent.mkdir(parents=True)
        np.savez_compressed(path, user=data_users, item=data_items, exposure=result.test_exposure)


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
    ensure_configured(repo)
    identity = identify(load_params(params_path), repo, dataset, method, seed, overrides)
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
    identity: RunIdentity,
    device: torch.device,
    progress: bool,
) -> dict[str, float]:
    """The body of `train_and_log` once its run exists: params, curves, metrics, artifacts."""
    train, hyper, config = identity.train, identity.hyper, identity.config
    processed_dir = identity.processed_dir
    params = flatten(config) | {"dataset": dataset, "method": method, "seed": str(seed)}
    log_batch(client, run_id, params=[Param(k, v) for k, v in params.items()])
    data = load_processed(processed_dir, dataset)

    def log_epoch(report: EpochReport) -> None:
        client.log_batch(run_id, metrics=_epoch_metrics(report))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    # trainer.fit through the module, so tests (and profilers) can patch it.
    result = trainer.fit(method, data, train, hyper, seed, callback=log_epoch, progress=progress)
    if fused.ran():  # the path dense mode's fused elementwise passes took (same values to
        client.set_tag(run_id, "elementwise", fused.ran())  # rounding, like threads); none for
        # a method without fused kernels (ExpoMF, CJMF, BPR) or in paper mode
    metrics = dict(result.test_metrics)
    if result.history and "pcc" in result.history[-1].metrics:
        metrics["pcc"] = result.history[-1].metrics["pcc"]  # already the curve's last point
    metrics["wall_seconds"] = time.perf_counter() - started
    metrics["train_seconds"] = result.seconds
    metrics["peak_memory_mib"] = _peak_memory_mib(device)
    timestamp, step = now_ms(), train.epochs
    log_batch(
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
        _write_artifacts(Path(tmp), result, data.test_user, data.test_item, document)
        client.log_artifacts(run_id, tmp)
    return metrics


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
    key = identify(params, Path(repo), dataset, method, seed, overrides, code).key
    run = find_finished_run(experiment_id, key)
    return run.info.run_id if run is not None else None


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
    metrics (exactly on the same device type: `ubo_core.trainer.build_method` constructs the
    method as `fit` does, seeded by the run's seed, so any random structure outside `state()`
    matches).
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
        method, _ = trainer.build_method(
            document["method"], tensors, train, hyper, int(document["seed"])
        )
    method.load_state(state)
    return method, tensors
