"""Prefect flows: `ubo` (deployment `full-benchmark`) fans every (data set, method, seed) out
as its own flow run of `ubo-train` onto a work pool; workers pick them up.

Thin by design: the science is `ubo_core`, the tracking `flows.tracked_run`. The parent
- skips every child whose run key (config + code version + data version) already has a
  FINISHED run in MLflow, so a re-run trains only what is missing or failed;
- submits the rest with `run_deployment(..., timeout=0)` and waits for all of them,
  submitting again a child whose worker died (flows/children.py);
- logs the aggregated table (mean and std over seeds) on its own MLflow run;
- fails naming every failed child.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger

from flows import store, study, tracked_run
from flows.children import (
    STALL_SECONDS,
    Child,
    cancel_waiting,
    mark_waiting_for_slot,
    submit,
    training_slots,
    wait_for_children,
)
from flows.slot_gate import slot_gate
from ubo_core.config import load_params
from ubo_core.methods import METHODS, check_method_params, get_method, resolve_config

REPO = Path(__file__).resolve().parents[1]
TRAIN_DEPLOYMENT = "ubo-train/cpu"


def repo_root() -> Path:
    """The repository the flows run in: `$UBO_REPO` (tests, other checkouts) or this one."""
    return Path(os.environ.get("UBO_REPO", REPO)).resolve()


@flow(name="ubo-train", retries=1, retry_delay_seconds=10, log_prints=True)
def ubo_train(
    dataset: str,
    method: str,
    seed: int,
    overrides: dict[str, Any] | None = None,
    experiment: str = store.DEFAULT_EXPERIMENT,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Train one (data set, method, seed) and record it in MLflow (skipped if already done)."""
    repo = repo_root()
    store.configure(tracking_uri, repo)
    logger = get_run_logger()
    # One trainer per slot (flows/slot_gate.py); the progress line counts a waiting cell apart.
    with slot_gate(logger.info, on_wait=mark_waiting_for_slot):
        child = tracked_run.train_and_log(
            dataset=dataset,
            method=method,
            seed=seed,
            overrides=overrides or {},
            params_path=repo / "params.yaml",
            repo=repo,
            experiment=experiment,
            parent_run_id=parent_run_id,
        )
    verb = "skipped (already in MLflow)" if child.skipped else "trained"
    logger.info("%s/%s/seed%d %s: %s", dataset, method, seed, verb, child.metrics)
    return {"run_id": child.run_id, "metrics": child.metrics, "skipped": child.skipped}


@flow(name="ubo", log_prints=True)
def ubo(
    datasets: list[str] | None = None,
    methods: list[str] = list(METHODS),  # noqa: B006 (Prefect parameters are copied)
    seeds: list[int] = [0, 1, 2, 3, 4],  # noqa: B006
    overrides: dict[str, Any] | None = None,
    method_overrides: dict[str, dict[str, Any]] | None = None,
    epochs: int | None = None,
    mode: str | None = None,
    tracking_uri: str | None = None,
    experiment: str = store.DEFAULT_EXPERIMENT,
    train_deployment: str = TRAIN_DEPLOYMENT,
    poll_seconds: float = 5.0,
    stall_seconds: float = STALL_SECONDS,
    resubmits: int = 2,
) -> str:
    """The whole study: every data set x method x seed, one child flow run each; by default
    every data set of params.yaml's catalog.

    overrides apply to every method (train keys such as lr, or epochs/mode given directly);
    method_overrides[method] to one method. A child pending or without a heartbeat for
    `stall_seconds` is declared dead and submitted again, at most `resubmits` times
    (flows/children.py). Returns the results table (markdown).
    """
    logger = get_run_logger()
    repo = repo_root()
    store.configure(tracking_uri, repo)
    params = load_params(repo / "params.yaml")
    check_method_params(params)
    datasets = list(params.catalog) if datasets is None else datasets
    common = dict(overrides or {})
    if epochs is not None:
        common["epochs"] = epochs
    if mode is not None:
        common["mode"] = mode
    per_method = method_overrides or {}
    plan = []
    for dataset in datasets:
        for method in methods:
            get_method(method)
            child_overrides = common | per_method.get(method, {})
            resolve_config(params, dataset, method, child_overrides)  # fail before submitting
            plan += [(dataset, method, seed, child_overrides) for seed in seeds]

    experiment_id = store.get_experiment_id(experiment, repo)
    parent = study.start_parent_run(experiment_id, datasets, methods, seeds, common, per_method)
    logger.info("MLflow parent run %s; %d children planned", parent, len(plan))
    if slots := training_slots(train_deployment):
        MlflowClient().set_tag(parent, study.TAG_SLOTS, str(slots))
    submitted: list[tuple[Child, tuple]] = []
    try:
        run_ids = []
        for dataset, method, seed, child_overrides in plan:
            existing = tracked_run.finished_run_for(
                params, repo, experiment_id, dataset, method, seed, child_overrides
            )
            if existing is not None:
                run_ids.append(existing)
                logger.info(
                    "%s/%s/seed%d already finished in MLflow (%s): skipped",
                    dataset,
                    method,
                    seed,
                    existing,
                )
                continue
            child = Child(
                f"{dataset}/{method}/seed{seed}",
                train_deployment,
                {
                    "dataset": dataset,
                    "method": method,
                    "seed": seed,
                    "overrides": child_overrides,
                    "experiment": experiment,
                    "tracking_uri": tracking_uri,
                    "parent_run_id": parent,
                },
            )
            submitted.append((submit(child), (dataset, method, seed, child_overrides)))
        started = time.monotonic()
        states = wait_for_children(
            [child for child, _ in submitted], poll_seconds, stall_seconds, resubmits, logger.info
        )
        failed = []
        for (child, key_args), state in zip(submitted, states, strict=True):
            # The child's MLflow run is found by its run key: no need for Prefect to persist
            # results between processes.
            run_id = tracked_run.finished_run_for(params, repo, experiment_id, *key_args)
            if state.is_completed() and run_id is not None:
                run_ids.append(run_id)
            else:
                failed.append(f"{child.name} ({state.name})")
        logger.info(
            "children finished after %.0f s; %d failed", time.monotonic() - started, len(failed)
        )
        table = study.aggregate_runs(experiment_id, [r for r in run_ids if r], parent)
        markdown = study.to_markdown(table)
        study.log_aggregate(parent, table)
    except BaseException:
        # Cancelled or crashed while its children ran: never leave the MLflow parent RUNNING,
        # nor children waiting that a worker would train for a parent that is gone.
        study.end_parent_run(parent, ["(the parent flow run itself)"])
        if cancelled := cancel_waiting([child for child, _ in submitted]):
            logger.info("cancelled %d child run(s) that had not started", cancelled)
        raise
    study.end_parent_run(parent, failed)
    print(markdown)
    if failed:
        raise RuntimeError(f"{len(failed)} child run(s) failed: {', '.join(failed)}")
    return markdown
