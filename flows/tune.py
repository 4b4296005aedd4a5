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
import json
import math
import sys
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import RunStatus
from mlflow.tracking.context import registry as context_registry
from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_flow_run

from flows import run_identity, store
from flows.benchmark import repo_root
from flows.children import STALL_SECONDS, Child, cancel_waiting, submit, wait_for_children
from flows.tune_study import (
    EXPERIMENT,
    STUDY_DEPLOYMENT,
    TAG_CHOSEN,
    TAG_KIND,
    TAG_LAST_USED,
    check_overrides,
    format_values,
)
from ubo_core.config import Params, load_params
from ubo_core.datasets.registry import BUILTINS, get_dataset
from ubo_core.errors import UboError
from ubo_core.methods import METHODS, check_method_params, get_method
from ubo_core.tuning import (
    OBJECTIVE,
    check_tuning,
    tuned_block,
)


@flow(name="ubo", log_prints=True)
def tune(
    datasets: list[str] | None = None,
    methods: list[str] = list(METHODS),  # noqa: B006 (Prefect parameters are copied)
    n_trials: int | None = None,
    tracking_uri: str | None = None,
    experiment: str = EXPERIMENT,
    study_deployment: str = STUDY_DEPLOYMENT,
    overrides: dict[str, Any] | None = None,
    poll_seconds: float = 5.0,
    stall_seconds: float = STALL_SECONDS,
    resubmits: int = 2,
) -> str:
    """Every (data set, method) study, one child flow run each (by default every data set
    of params.yaml's catalog); returns the tuned block. A study whose worker died is
    submitted again (flows/children.py) and resumes from the trials MLflow holds."""
    logger = get_run_logger()
    repo = repo_root()
    store.configure(tracking_uri, repo)
    params = load_params(repo / "params.yaml")
    check_method_params(params)
    check_tuning(params)
    datasets = list(params.catalog) if datasets is None else datasets
    for dataset in datasets:
        get_dataset(params, dataset)  # an unknown name fails before anything is submitted
    for method in methods:
        get_method(method)
    check_overrides(overrides)
    experiment_id = store.get_experiment_id(experiment, repo)
    client = MlflowClient()
    parent = client.create_run(
        experiment_id,
        tags=context_registry.resolve_tags(
            {TAG_KIND: "tune", "ubo.prefect_flow_run_id": str(current_flow_run.id)}
        ),
        run_name="tune",
    ).info.run_id
    submitted: list[tuple[str, str, Child]] = []
    try:
        for dataset in datasets:
            for method in methods:
                child = Child(
                    f"tune {dataset}/{method}",
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
                )
                submitted.append((dataset, method, submit(child)))
        states = wait_for_children(
            [child for *_, child in submitted],
            poll_seconds,
            stall_seconds,
            resubmits,
            logger.info,
        )
        failed = [
            f"{d}/{m} ({s.name})"
            for (d, m, _), s in zip(submitted, states, strict=True)
            if not s.is_completed()
        ]
        merged, kept = merged_choices(params, latest_choices(experiment_id))
        block = tuned_block(merged, header=_header(experiment, kept), order=params.catalog)
        client.log_text(parent, block, "tuned_defaults.yaml")
    except BaseException:
        client.set_terminated(parent, RunStatus.to_string(RunStatus.FAILED))
        cancel_waiting([child for *_, child in submitted])
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
    runs = store.search(
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
    or a store that lacks older studies) replaces only what it tuned. Studies of data sets no
    longer in the catalog are left out (params.yaml would refuse them)."""
    merged = {dataset: dict(methods) for dataset, methods in params.datasets.items()}
    for dataset, methods in chosen.items():
        if dataset in params.catalog:
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
    for dataset in dict.fromkeys([*BUILTINS, *sorted(d for d, _ in studies)]):  # no params here
        for method in METHODS:
            run = studies.get((dataset, method))
            if run is None:
                continue
            trials = store.search(
                experiment_id, f"tags.`{run_identity.PARENT_TAG}` = '{run.info.run_id}'"
            )
            states = [t.data.tags.get("ubo.trial_state", "") for t in trials]
            done = states.count("complete")
            pruned = states.count("pruned")
            failed = sum(state.startswith("failed") for state in states)
            best = run.data.metrics.get(store.to_mlflow_key(f"best_{OBJECTIVE}"), math.nan)
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
    repo = repo_root()
    try:
        store.open_store(None, repo)
        chosen = latest_choices(store.get_experiment_id(args.experiment, repo))
        if args.datasets:
            chosen = {d: methods for d, methods in chosen.items() if d in args.datasets}
        if not chosen:
            among = f" of data sets {args.datasets}" if args.datasets else ""
            raise UboError(
                f"no finished tuning study{among} in MLflow experiment {args.experiment!r}"
            )
        if args.command == "summary":
            print(summary_markdown(store.get_experiment_id(args.experiment, repo)), end="")
            return 0
        target = Path(args.params) if args.params else repo / "params.yaml"
        params = load_params(target)
        merged, kept = merged_choices(params, chosen)
        header = _header(args.experiment, kept, args.datasets or (), args.note)
        block = tuned_block(merged, header=header, order=params.catalog)
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
