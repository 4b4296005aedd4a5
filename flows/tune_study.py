"""One tuning study: Optuna trials of one (data set, method) on the hyper-validation set, each
an MLflow run nested under the study's run (flow `ubo-tune-study`, deployments
`ubo-tune-study/cpu` and `/gpu`). The parent flow and the command line are flows/tune.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import optuna
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking.context import registry as context_registry
from prefect import flow, get_run_logger

from flows import run_identity, store
from flows.benchmark import repo_root
from flows.children import mark_waiting_for_slot
from flows.slot_gate import slot_gate
from ubo_core.config import Params, load_params
from ubo_core.data import load_processed
from ubo_core.errors import TrainingDiverged, UboError
from ubo_core.methods import check_method_params, get_method, resolve_config
from ubo_core.trainer import EpochReport
from ubo_core.tuning import (
    OBJECTIVE,
    Knob,
    check_tuning,
    knobs,
    run_trial,
    untuned,
)

EXPERIMENT = "ubo-tuning"
STUDY_DEPLOYMENT = "ubo-tune-study/cpu"
TAG_STUDY_KEY = "ubo.study_key"
TAG_CHOSEN = "ubo.chosen"  # JSON of the chosen values (incl. epochs) on a finished study run
TAG_KIND = "ubo.kind"  # "study" or "trial"
# 2: trial 0 is the untuned default configuration (`default_values`), so a search can never
# choose something that scores worse on hyper-validation than the defaults.
PROCEDURE = 2
TAG_LAST_USED = "ubo.last_used_ms"  # a reused study counts as chosen again from this time
# Train keys a tuning run may override: they do not change a trial's curve (eval_every does,
# through the best epoch and pruning, so it is not among them).
TUNING_OVERRIDES = frozenset({"device", "threads"})


def check_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    bad = sorted(set(overrides or {}) - TUNING_OVERRIDES)
    if bad:
        raise UboError(f"tuning overrides may only set {sorted(TUNING_OVERRIDES)}; got {bad}")
    return dict(overrides or {})


def study_key(
    params: Params, dataset: str, method: str, n_trials: int, code: str, data: str
) -> str:
    """What determines a study's outcome: its space, budget, base config, code and data."""
    payload = {
        "procedure": PROCEDURE,
        "dataset": dataset,
        "method": method,
        "n_trials": n_trials,
        "tuning": {
            "seed": params.tuning.seed,
            "startup_trials": params.tuning.startup_trials,
            "prune_after_epochs": params.tuning.prune_after_epochs,
            "space": params.tuning.space.get(method, {}),
        },
        "train": {
            k: v for k, v in dataclasses.asdict(params.train).items() if k not in TUNING_OVERRIDES
        },
        "methods": params.methods.get(method, {}),
        "code": code,
        "data": data,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def untuned_config(params: Params, method: str) -> dict[str, Any]:
    """Every train and method key as it is without tuning: `train`, then `methods.<method>`,
    then the method's own defaults (no `datasets:` layer)."""
    _, hyper = resolve_config(untuned(params), next(iter(params.catalog)), method)
    resolved = dataclasses.asdict(params.train) | dataclasses.asdict(hyper)
    return resolved | params.methods.get(method, {})


def format_values(values: dict[str, Any]) -> str:
    """`k=v, ...` sorted by key, floats to 3 significant digits."""
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(values.items())
    )


def default_values(params: Params, method: str, space: list[Knob]) -> dict[str, Any]:
    """The untuned configuration (`untuned_config`) of each knob, moved to the nearest point
    of its range (weight decay 0 becomes the range's low end on a log scale); a choice knob
    keeps its first choice if needed."""
    resolved = untuned_config(params, method)
    values = {}
    for knob in space:
        value = resolved[knob.name]
        if knob.choices:
            values[knob.name] = value if value in knob.choices else knob.choices[0]
        else:
            value = min(max(value, knob.low), knob.high)  # type: ignore[type-var]
            values[knob.name] = int(value) if knob.integer else float(value)
    return values


def suggest(trial: optuna.Trial, knob: Knob) -> Any:
    if knob.choices:
        return trial.suggest_categorical(knob.name, list(knob.choices))
    if knob.integer:
        return trial.suggest_int(knob.name, int(knob.low), int(knob.high), log=knob.log)  # type: ignore[arg-type]
    return trial.suggest_float(knob.name, float(knob.low), float(knob.high), log=knob.log)  # type: ignore[arg-type]


def run_study(
    *,
    dataset: str,
    method: str,
    n_trials: int | None,
    params_path: Path,
    repo: Path,
    experiment: str = EXPERIMENT,
    parent_run_id: str | None = None,
    overrides: dict[str, Any] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """One Optuna study for (dataset, method), every trial an MLflow run; returns the chosen
    values (with `epochs`). An identical FINISHED study in MLflow is reused."""
    overrides = check_overrides(overrides)
    params = load_params(params_path)
    check_method_params(params)
    check_tuning(params)
    get_method(method)
    space = knobs(params, method)
    n_trials = n_trials or params.tuning.trials.get(dataset, 10)
    processed_dir = run_identity.resolve_processed_dir(params.data.processed_dir, repo)
    code = run_identity.code_version(repo)
    data_version = run_identity.data_version(processed_dir, dataset, repo)
    key = study_key(params, dataset, method, n_trials, code, data_version)
    experiment_id = store.get_experiment_id(experiment, repo)
    client = MlflowClient()
    existing = store.search(
        experiment_id,
        f"tags.`{TAG_STUDY_KEY}` = '{key}' and attributes.status = 'FINISHED'",
        ["attributes.start_time DESC"],
    )
    if existing:
        log(f"{dataset}/{method}: identical study already finished ({existing[0].info.run_id})")
        client.set_tag(existing[0].info.run_id, TAG_LAST_USED, str(store.now_ms()))
        return json.loads(existing[0].data.tags[TAG_CHOSEN])
    for stale in store.search(experiment_id, f"tags.`{TAG_STUDY_KEY}` = '{key}'"):
        client.delete_run(stale.info.run_id)

    tags = {
        TAG_KIND: "study",
        TAG_STUDY_KEY: key,
        "dataset": dataset,
        "method": method,
        run_identity.TAG_CODE: code,
        run_identity.TAG_DATA: data_version,
    }
    if parent_run_id:
        tags[run_identity.PARENT_TAG] = parent_run_id
    study_run = client.create_run(
        experiment_id,
        tags=context_registry.resolve_tags(tags),
        run_name=f"tune {dataset}/{method}",
    ).info.run_id
    try:
        store.log_batch(
            client,
            study_run,
            params=[
                Param("n_trials", str(n_trials)),
                Param("procedure", str(PROCEDURE)),
                Param("objective", OBJECTIVE),
                Param("space", json.dumps(params.tuning.space.get(method, {}), sort_keys=True)),
            ],
        )
        # The test split is never read: only train, validation and hyper-validation arrays.
        data = load_processed(processed_dir, dataset, with_test=False)
        chosen = _optimise(
            client,
            experiment_id,
            study_run,
            params,
            data,
            dataset,
            method,
            space,
            n_trials,
            dict(overrides or {}),
            log,
        )
    except BaseException:
        client.set_terminated(study_run, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_tag(study_run, TAG_CHOSEN, json.dumps(chosen, sort_keys=True))
    client.set_terminated(study_run, RunStatus.to_string(RunStatus.FINISHED))
    return chosen


def _optimise(
    client: MlflowClient,
    experiment_id: str,
    study_run: str,
    params: Params,
    data: Any,
    dataset: str,
    method: str,
    space: list[Knob],
    n_trials: int,
    overrides: dict[str, Any],
    log: Any,
) -> dict[str, Any]:
    tuning = params.tuning
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(
            seed=tuning.seed, n_startup_trials=tuning.startup_trials
        ),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=tuning.startup_trials, n_warmup_steps=tuning.prune_after_epochs
        ),
    )
    study.enqueue_trial(default_values(params, method, space))
    best_epochs: dict[int, int] = {}
    for number in range(n_trials):
        trial = study.ask()
        values = {knob.name: suggest(trial, knob) for knob in space}
        trial_run = client.create_run(
            experiment_id,
            tags=context_registry.resolve_tags(
                {
                    TAG_KIND: "trial",
                    run_identity.PARENT_TAG: study_run,
                    "dataset": dataset,
                    "method": method,
                }
            ),
            run_name=f"{dataset}/{method}/trial{number}",
        ).info.run_id
        store.log_batch(client, trial_run, params=[Param(k, str(v)) for k, v in values.items()])

        def on_epoch(
            report: EpochReport, trial: optuna.Trial = trial, run: str = trial_run
        ) -> None:
            value = report.metrics[OBJECTIVE]
            client.log_batch(
                run,
                metrics=[
                    Metric(
                        store.to_mlflow_key(f"val/{OBJECTIVE}"),
                        value,
                        store.now_ms(),
                        report.epoch,
                    ),
                    Metric(
                        "val/val_loss", report.metrics["val_loss"], store.now_ms(), report.epoch
                    ),
                ],
            )
            trial.report(value if math.isfinite(value) else 0.0, report.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        started = time.perf_counter()
        state, status = "complete", RunStatus.FINISHED
        try:
            outcome = run_trial(
                data, params, dataset, method, overrides | values, tuning.seed, on_epoch
            )
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            state = "pruned"
        except TrainingDiverged as error:  # a bad region of the space, not a broken study
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            state, status = f"failed: {error}", RunStatus.FAILED
        except BaseException:
            client.set_tag(trial_run, "ubo.trial_state", "crashed")
            client.set_terminated(trial_run, RunStatus.to_string(RunStatus.FAILED))
            raise
        else:
            study.tell(trial, outcome.value)
            best_epochs[trial.number] = outcome.best_epoch
            store.log_batch(
                client,
                trial_run,
                metrics=[
                    Metric(store.to_mlflow_key(OBJECTIVE), outcome.value, store.now_ms(), 0),
                    Metric("best_epoch", outcome.best_epoch, store.now_ms(), 0),
                ],
            )
        client.set_tag(trial_run, "ubo.trial_state", state)
        client.set_terminated(trial_run, RunStatus.to_string(status))
        log(
            f"{dataset}/{method} trial {number + 1}/{n_trials} {state} in "
            f"{time.perf_counter() - started:.0f} s: {values}"
        )
    completed = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        raise UboError(f"tuning {dataset}/{method}: no trial completed (all pruned or diverged)")
    best = study.best_trial
    chosen = dict(best.params) | {"epochs": best_epochs[best.number]}
    store.log_batch(
        client,
        study_run,
        metrics=[
            Metric(store.to_mlflow_key(f"best_{OBJECTIVE}"), best.value, store.now_ms(), 0),
            Metric("n_completed", len(completed), store.now_ms(), 0),
        ],
        params=[Param(f"best.{k}", str(v)) for k, v in chosen.items()],
    )
    return chosen


@flow(name="ubo-tune-study", log_prints=True)
def ubo_tune_study(
    dataset: str,
    method: str,
    n_trials: int | None = None,
    experiment: str = EXPERIMENT,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tune one (data set, method) on its hyper-validation set. `overrides`: train keys
    that do not change results (threads, device), e.g. one thread per worker sharing cores."""
    repo = repo_root()
    store.configure(tracking_uri, repo)
    logger = get_run_logger()
    with slot_gate(logger.info, on_wait=mark_waiting_for_slot):  # one study per slot
        return run_study(
            dataset=dataset,
            method=method,
            n_trials=n_trials,
            params_path=repo / "params.yaml",
            repo=repo,
            experiment=experiment,
            parent_run_id=parent_run_id,
            overrides=overrides,
            log=logger.info,
        )
