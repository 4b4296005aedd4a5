"""Hyperparameter tuning on the hyper-validation set: deployment `ubo/tune`.

    prefect deployment run ubo/tune            every (data set, method) of params.yaml `tuning`
    python -m flows.tune apply                 write the chosen values into params.yaml
    python -m flows.tune show                  print them (the block `apply` would write)
    python -m flows.tune summary               a markdown table of the studies (docs/TUNING.md)

The parent flow (`ubo`, deployment `tune`) fans one `ubo-tune-study` flow run per
(data set, method) out onto the training pool, like the benchmark does with seeds. Each study
runs `tuning.trials[dataset]` Optuna trials in its worker (TPE, seeded; median pruning on the
per-epoch hyper-validation curve) over data loaded *without* its test split, and records every
trial as an MLflow run nested under the study's run in experiment `ubo-tuning`. Why Optuna:
seeded TPE and pruning of hopeless trials are what make a search affordable on 2 cores, and
they are well tested there. The chosen values, with the epoch at which the best trial peaked
as `epochs`, are tags of the study run; `apply` writes the latest study of each
(data set, method) back into params.yaml as reviewed defaults (review the git diff).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import textwrap
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking.context import registry as context_registry
from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_flow_run

from flows import tracking
from flows.benchmark import _repo, submit_child, wait_for_children
from ubo_core.config import DATASETS, Params, load_params
from ubo_core.errors import TrainingDiverged, UboError
from ubo_core.methods import METHODS, check_method_params, get_method, resolve_config
from ubo_core.train import load_processed
from ubo_core.trainer import EpochReport
from ubo_core.tuning import (
    OBJECTIVE,
    Knob,
    check_tuning,
    knobs,
    run_trial,
    tuned_block,
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
    _, hyper = resolve_config(untuned(params), DATASETS[0], method)
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
    processed_dir = tracking._processed_dir(params.data.processed_dir, repo)
    code = tracking.code_version(repo)
    data_version = tracking.data_version(processed_dir, dataset, repo)
    key = study_key(params, dataset, method, n_trials, code, data_version)
    experiment_id = tracking.get_experiment_id(experiment, repo)
    client = MlflowClient()
    existing = tracking._search(
        experiment_id,
        f"tags.`{TAG_STUDY_KEY}` = '{key}' and attributes.status = 'FINISHED'",
        ["attributes.start_time DESC"],
    )
    if existing:
        log(f"{dataset}/{method}: identical study already finished ({existing[0].info.run_id})")
        client.set_tag(existing[0].info.run_id, TAG_LAST_USED, str(tracking._now_ms()))
        return json.loads(existing[0].data.tags[TAG_CHOSEN])
    for stale in tracking._search(experiment_id, f"tags.`{TAG_STUDY_KEY}` = '{key}'"):
        client.delete_run(stale.info.run_id)

    tags = {
        TAG_KIND: "study",
        TAG_STUDY_KEY: key,
        "dataset": dataset,
        "method": method,
        tracking.TAG_CODE: code,
        tracking.TAG_DATA: data_version,
    }
    if parent_run_id:
        tags[tracking.PARENT_TAG] = parent_run_id
    study_run = client.create_run(
        experiment_id,
        tags=context_registry.resolve_tags(tags),
        run_name=f"tune {dataset}/{method}",
    ).info.run_id
    try:
        tracking._log_batch(
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
                    tracking.PARENT_TAG: study_run,
                    "dataset": dataset,
                    "method": method,
                }
            ),
            run_name=f"{dataset}/{method}/trial{number}",
        ).info.run_id
        tracking._log_batch(client, trial_run, params=[Param(k, str(v)) for k, v in values.items()])

        def on_epoch(
            report: EpochReport, trial: optuna.Trial = trial, run: str = trial_run
        ) -> None:
            value = report.metrics[OBJECTIVE]
            client.log_batch(
                run,
                metrics=[
                    Metric(
                        tracking.to_mlflow_key(f"val/{OBJECTIVE}"),
                        value,
                        tracking._now_ms(),
                        report.epoch,
                    ),
                    Metric(
                        "val/val_loss", report.metrics["val_loss"], tracking._now_ms(), report.epoch
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
            tracking._log_batch(
                client,
                trial_run,
                metrics=[
                    Metric(tracking.to_mlflow_key(OBJECTIVE), outcome.value, tracking._now_ms(), 0),
                    Metric("best_epoch", outcome.best_epoch, tracking._now_ms(), 0),
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
    tracking._log_batch(
        client,
        study_run,
        metrics=[
            Metric(tracking.to_mlflow_key(f"best_{OBJECTIVE}"), best.value, tracking._now_ms(), 0),
            Metric("n_completed", len(completed), tracking._now_ms(), 0),
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
    repo = _repo()
    tracking.configure(tracking_uri, repo)
    logger = get_run_logger()
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


@flow(name="ubo", log_prints=True)
def tune(
    datasets: list[str] = list(DATASETS),  # noqa: B006 (Prefect parameters are copied)
    methods: list[str] = list(METHODS),  # noqa: B006
    n_trials: int | None = None,
    tracking_uri: str | None = None,
    experiment: str = EXPERIMENT,
    study_deployment: str = STUDY_DEPLOYMENT,
    overrides: dict[str, Any] | None = None,
    poll_seconds: float = 5.0,
) -> str:
    """Every (data set, method) study, one child flow run each; returns the tuned block."""
    logger = get_run_logger()
    repo = _repo()
    tracking.configure(tracking_uri, repo)
    params = load_params(repo / "params.yaml")
    check_method_params(params)
    check_tuning(params)
    for method in methods:
        get_method(method)
    check_overrides(overrides)
    experiment_id = tracking.get_experiment_id(experiment, repo)
    client = MlflowClient()
    parent = client.create_run(
        experiment_id,
        tags=context_registry.resolve_tags(
            {TAG_KIND: "tune", "ubo.prefect_flow_run_id": str(current_flow_run.id)}
        ),
        run_name="tune",
    ).info.run_id
    try:
        submitted = []
        for dataset in datasets:
            for method in methods:
                flow_run = submit_child(
                    study_deployment,
                    {
                        "dataset": dataset,
                        "method": method,
                        "n_trials": n_trials,
                        "experiment": experiment,
                        "tracking_uri": tracking_uri,
                        "parent_run_id": parent,
                        "overrides": overrides,
                    },
                    f"tune {dataset}/{method}",
                )
                submitted.append((dataset, method, flow_run))
        states = wait_for_children([run.id for *_, run in submitted], poll_seconds)
        failed = [
            f"{d}/{m} ({s.name})"
            for (d, m, _), s in zip(submitted, states, strict=True)
            if not s.is_completed()
        ]
        merged, kept = merged_choices(params, latest_choices(experiment_id))
        block = tuned_block(merged, header=_header(experiment, kept))
        client.log_text(parent, block, "tuned_defaults.yaml")
    except BaseException:
        client.set_terminated(parent, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(
        parent, RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
    )
    logger.info("tuned defaults:\n%s", block)
    if failed:
        raise RuntimeError(f"{len(failed)} study run(s) failed: {', '.join(failed)}")
    return block


def latest_studies(experiment_id: str) -> dict[tuple[str, str], Any]:
    """The FINISHED study run of each (data set, method) that a `tune` run started or reused
    last: the one `apply` writes and `summary` shows."""
    runs = tracking._search(
        experiment_id,
        f"tags.`{TAG_KIND}` = 'study' and attributes.status = 'FINISHED'",
    )
    studies: dict[tuple[str, str], Any] = {}
    # Latest by when the study last served a `tune` run: started, or reused as identical.
    for run in sorted(runs, key=_last_used, reverse=True):
        studies.setdefault((run.data.tags["dataset"], run.data.tags["method"]), run)
    return studies


def latest_choices(experiment_id: str) -> dict[str, dict[str, dict[str, Any]]]:
    """chosen[dataset][method]: the values of `latest_studies`."""
    chosen: dict[str, dict[str, dict[str, Any]]] = {}
    for (dataset, method), run in latest_studies(experiment_id).items():
        chosen.setdefault(dataset, {})[method] = json.loads(run.data.tags[TAG_CHOSEN])
    return chosen


def merged_choices(
    params: Params, chosen: dict[str, dict[str, dict[str, Any]]]
) -> tuple[dict[str, dict[str, dict[str, Any]]], list[str]]:
    """The store's choices over the `datasets:` block params.yaml holds now, and the
    "dataset/method" pairs kept from params.yaml: a partial re-tune (some data sets or methods,
    or a store that lacks older studies) replaces only what it tuned."""
    merged = {dataset: dict(methods) for dataset, methods in params.datasets.items()}
    for dataset, methods in chosen.items():
        merged.setdefault(dataset, {}).update(methods)
    kept = [
        f"{dataset}/{method}"
        for dataset, methods in params.datasets.items()
        for method in methods
        if method not in chosen.get(dataset, {})
    ]
    return merged, kept


def _last_used(run: Any) -> int:
    return max(run.info.start_time, int(run.data.tags.get(TAG_LAST_USED, 0)))


def summary_markdown(experiment_id: str) -> str:
    """A table of `latest_studies`: trials completed / pruned / failed, the best
    hyper-validation objective, the study's wall time, the range of its completed trials'
    wall times and its choice."""
    studies = latest_studies(experiment_id)
    lines = [
        "| data set | method | started (UTC) | trials (done / pruned / failed) "
        "| best SNIPS DCG@3 | minutes | minutes per completed trial | chosen |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dataset in DATASETS:
        for method in METHODS:
            run = studies.get((dataset, method))
            if run is None:
                continue
            trials = tracking._search(
                experiment_id, f"tags.`{tracking.PARENT_TAG}` = '{run.info.run_id}'"
            )
            states = [t.data.tags.get("ubo.trial_state", "") for t in trials]
            done = states.count("complete")
            pruned = states.count("pruned")
            failed = sum(state.startswith("failed") for state in states)
            best = run.data.metrics.get(tracking.to_mlflow_key(f"best_{OBJECTIVE}"), math.nan)
            minutes = (run.info.end_time - run.info.start_time) / 60000
            per_trial = [
                (t.info.end_time - t.info.start_time) / 60000
                for t, state in zip(trials, states, strict=True)
                if state == "complete"
            ]
            trial_minutes = f"{min(per_trial):.1f}-{max(per_trial):.1f}" if per_trial else "-"
            text = format_values(json.loads(run.data.tags[TAG_CHOSEN]))
            started = datetime.fromtimestamp(run.info.start_time / 1000, UTC)
            lines.append(
                f"| {dataset} | {method} | {started:%Y-%m-%d %H:%M} | {done} / {pruned} / {failed} "
                f"| {best:.4f} | "
                f"{minutes:.1f} | {trial_minutes} | {text} |"
            )
    return "\n".join(lines) + "\n"


def _header(
    experiment: str, kept: Sequence[str] = (), only: Sequence[str] = (), note: str = ""
) -> str:
    text = (
        f"Chosen by `ubo/tune` (MLflow experiment {experiment!r}): per (data set, method) the\n"
        f"best trial by {OBJECTIVE} on the hyper-validation set (SNIPS; the test set is never\n"
        "read); `epochs` is the epoch at which that trial's curve peaked. Space and budget:\n"
        "the `tuning` section above; docs/TUNING.md."
    )
    if kept:
        why = "no study in this store"
        if only:  # a kept pair of a selected data set is one without a study
            why = f"outside --datasets {' '.join(only)}, or {why}"
        text += f"\nKept from the previous params.yaml ({why}):\n" + "\n".join(
            textwrap.wrap(", ".join(kept), 88)
        )
    if note:
        text += "\n" + "\n".join(textwrap.wrap(note, 88))
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.tune", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", choices=["show", "apply", "summary"])
    parser.add_argument("--experiment", default=EXPERIMENT)
    parser.add_argument("--params", default=None, help="params.yaml to write (default: the repo's)")
    parser.add_argument(
        "--datasets",
        nargs="+",
        help="show/apply only these data sets' studies (a partial re-tune); the block keeps "
        "every other pair as params.yaml has it",
    )
    parser.add_argument("--note", default="", help="a reviewer's note for the block's header")
    args = parser.parse_args(argv)
    repo = _repo()
    tracking.configure(None, repo)
    try:
        chosen = latest_choices(tracking.get_experiment_id(args.experiment, repo))
        if args.datasets:
            chosen = {d: methods for d, methods in chosen.items() if d in args.datasets}
        if not chosen:
            among = f" of data sets {args.datasets}" if args.datasets else ""
            raise UboError(
                f"no finished tuning study{among} in MLflow experiment {args.experiment!r}"
            )
        if args.command == "summary":
            print(summary_markdown(tracking.get_experiment_id(args.experiment, repo)), end="")
            return 0
        target = Path(args.params) if args.params else repo / "params.yaml"
        merged, kept = merged_choices(load_params(target), chosen)
        header = _header(args.experiment, kept, args.datasets or (), args.note)
        block = tuned_block(merged, header=header)
        if args.command == "show":
            print(block, end="")
            return 0
        from ubo_core.tuning import write_tuned_defaults

        write_tuned_defaults(target, block)
    except UboError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    pairs = sum(map(len, chosen.values()))
    print(
        f"wrote the tuned defaults of {pairs} (data set, method) pairs to {target}"
        + (f"; kept {len(kept)} others from it" if kept else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
