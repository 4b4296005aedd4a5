"""The study's result, shaped for the MLflow UI: one experiment per data set, one run per
method holding its metrics' means over seeds.

The training runs are one per (data set, method, seed), nested under their benchmark's
parent, and MLflow's runs table shows no metric column until one is chosen among hundreds. So
`make report` also writes, per reported data set, the experiment "ubo results: <data set>"
with one flat run per method (named by the method, metrics DCG@1..3 and MAP@1..3: the means
over the seeds RESULTS.md reports; the stds, the seeds and the code version as tags). A
fresh browser gets there in three clicks: "Model training", the experiment under "Recent
Experiments", and the chart view, whose bar charts put every method's DCG@3 side by side.
A rerun of the report updates these runs in place (a metric's latest value is what the UI
shows), so each experiment holds one run per method.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, RunTag

from flows.store import log_batch, now_ms, quote, search, to_mlflow_key

METRICS = ("dcg@1", "dcg@2", "dcg@3", "map@1", "map@2", "map@3")
TAG_METHOD = "method"
TAG_DATASET = "dataset"
# The experiment opens on its runs (the "Model training" view), not on GenAI traces.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_name(display: str) -> str:
    return f"ubo results: {display}"


def _experiment_id(client: MlflowClient, name: str, description: str) -> str:
    experiment = client.get_experiment_by_name(name)
    experiment_id = (
        experiment.experiment_id if experiment is not None else client.create_experiment(name)
    )
    for key, value in {**EXPERIMENT_KIND, "mlflow.note.content": description}.items():
        client.set_experiment_tag(experiment_id, key, value)
    return experiment_id


def publish(
    table: pd.DataFrame,
    displays: Mapping[str, str],
    method_displays: Mapping[str, str],
    code_version: str,
) -> dict[str, str]:
    """Write `table` (flows.report_runs.summary: index (dataset, method), `<metric>_mean`,
    `<metric>_std`, `n_seeds`) as the results experiments; returns data set -> experiment id."""
    client = MlflowClient()
    written = {}
    for dataset, display in displays.items():
        methods = [m for d, m in table.index if d == dataset]
        if not methods:
            continue
        description = (
            f"DCG@3 and MAP of every method on {display}: one run per method, the mean over "
            f"seeds of the study at `{code_version}` (written by `make report`, like "
            "docs/RESULTS.md; stds and seeds are the runs' tags). Open the chart view "
            "(the second icon above the runs) to see them side by side."
        )
        experiment_id = _experiment_id(client, experiment_name(display), description)
        existing = {
            run.data.tags.get(TAG_METHOD): run.info.run_id
            for run in search(experiment_id, f"tags.{TAG_DATASET} = {quote(dataset)}")
        }
        timestamp = now_ms()
        # Created in reverse so that the newest-first table and the charts' first ten runs
        # list the methods in the registry's (the paper's) order.
        for position, method in enumerate(reversed(methods)):
            row = table.loc[(dataset, method)]
            run_id = existing.get(method)
            if run_id is None:
                run_id = client.create_run(
                    experiment_id,
                    start_time=timestamp + position,  # a strict order, whatever the clock
                    run_name=method_displays.get(method, method),
                    tags={TAG_DATASET: dataset, TAG_METHOD: method},
                ).info.run_id
            metrics = [
                Metric(to_mlflow_key(name), float(row[f"{name}_mean"]), timestamp, 0)
                for name in METRICS
                if not math.isnan(float(row[f"{name}_mean"]))
            ]
            # Tags, not params: a params value cannot change when the report is rerun.
            tags = [
                RunTag(to_mlflow_key(f"{name}_std"), f"{float(row[f'{name}_std']):.4f}")
                for name in METRICS
            ]
            tags += [
                RunTag("ubo.code_version", code_version),
                RunTag("ubo.n_seeds", str(int(row["n_seeds"]))),
            ]
            log_batch(client, run_id, metrics=metrics, tags=tags)
            client.set_terminated(run_id)
        written[dataset] = experiment_id
    return written
