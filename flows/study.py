"""A study's runs together: the parent run of one benchmark, the aggregate over seeds (one
implementation, shared with the report) and its markdown.

The parent flow checks for finished runs itself before submitting children (a skipped child
then costs no Prefect flow run at all), so `finished_run_for` lives beside the run
(flows/tracked_run.py) and the parent's bookkeeping here.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunStatus, ViewType
from mlflow.tracking.context import registry as context_registry

from flows.run_identity import PARENT_TAG, TAG_REUSED_BY, flatten
from flows.store import ensure_configured, log_batch, now_ms, quote, search, to_mlflow_key
from flows.tracked_run import FINAL_METRICS, final_metrics
from ubo_core.datasets.registry import BUILTINS
from ubo_core.methods import METHODS

TAG_ROLE = "ubo.role"
TAG_FAILED = "ubo.failed_children"
TAG_FLOW_RUN = "prefect.flow_run_id"
# On a parent run: how many of its children could train at once (flows.children.training_slots).
TAG_SLOTS = "ubo.slots"


# -- aggregation -----------------------------------------------------------------------------
def _runs_of(experiment_id: str, parent_run_id: str | None) -> list[Run]:
    finished = "attributes.status = 'FINISHED'"
    if parent_run_id is None:
        return search(experiment_id, finished)
    parent = quote(parent_run_id)
    children = search(experiment_id, f"{finished} and tags.`{PARENT_TAG}` = {parent}")
    reused = search(experiment_id, f"{finished} and tags.`{TAG_REUSED_BY}{parent_run_id}` = 'true'")
    unique = {run.info.run_id: run for run in [*children, *reused]}
    return list(unique.values())


def _order(values: Iterable[str], known: Sequence[str]) -> dict[str, tuple[int, str]]:
    # Registry order for known names (built-in data sets, methods), then the rest alphabetically.
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


def summarise(runs: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Per (dataset, method) of a runs table (one row per dataset, method, seed): `n_seeds`
    and `<metric>_mean`, `<metric>_std` (pandas std, ddof=1: NaN for one seed) of each of
    `metrics`, rows in first-seen order. What the parent run logs and the report prints."""
    grouped = runs.groupby(["dataset", "method"], sort=False)
    table = grouped[list(metrics)].agg(["mean", "std"])
    table.columns = [f"{name}_{stat}" for name, stat in table.columns]
    table.insert(0, "n_seeds", grouped.size())
    return table


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
    table = summarise(runs_table, FINAL_METRICS).reset_index()
    dataset_rank = _order(table["dataset"], list(BUILTINS))
    method_rank = _order(table["method"], list(METHODS))
    table["_order"] = [
        (dataset_rank[d], method_rank[m])
        for d, m in zip(table["dataset"], table["method"], strict=True)
    ]
    table = table.sort_values("_order").drop(columns="_order").reset_index(drop=True)
    return table[columns]


def cell(mean: float, std: float) -> str:
    """`mean ± std` to 3 decimals; the mean alone for one seed (std NaN); `–` if missing."""
    if math.isnan(mean):
        return "–"
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def metric_table(
    table: pd.DataFrame,
    dataset: str,
    methods: Sequence[str],
    metrics: Sequence[str],
    *,
    names: Mapping[str, str] | None = None,
    label: Callable[[str], str] = str,
    bold_best: bool = False,
    seeds_row: bool = False,
) -> str:
    """One data set's markdown table from a `summarise` table (indexed by dataset, method):
    rows = metrics (named by `label`), columns = the `methods` it has (named by `names`),
    cells `cell(mean, std)`, the best mean in bold with `bold_best`, and a row with the
    number of seeds with `seeds_row`. Built by hand: no `tabulate` dependency."""
    methods = [m for m in methods if (dataset, m) in table.index]
    names = names or {}
    lines = [
        "| metric | " + " | ".join(names.get(m, m) for m in methods) + " |",
        "|---|" + "---:|" * len(methods),
    ]
    for metric in metrics:
        means = {m: float(table.loc[(dataset, m), f"{metric}_mean"]) for m in methods}
        best = max((v for v in means.values() if not math.isnan(v)), default=math.nan)
        cells = []
        for method in methods:
            text = cell(means[method], float(table.loc[(dataset, method), f"{metric}_std"]))
            cells.append(f"**{text}**" if bold_best and means[method] == best else text)
        lines.append(f"| {label(metric)} | " + " | ".join(cells) + " |")
    if seeds_row:
        seeds = [str(int(table.loc[(dataset, m), "n_seeds"])) for m in methods]
        lines.append("| seeds | " + " | ".join(seeds) + " |")
    return "\n".join(lines)


def to_markdown(
    table: pd.DataFrame,
    metrics: Sequence[str] = ("dcg@1", "dcg@2", "dcg@3", "map@1", "map@2", "map@3"),
) -> str:
    """An `aggregate` table as markdown: one `metric_table` per data set, under its name,
    with the number of seeds (the parent run's results.md)."""
    indexed = table.set_index(["dataset", "method"])
    blocks = [
        f"### {dataset}\n\n"
        + metric_table(indexed, dataset, list(part["method"]), metrics, seeds_row=True)
        for dataset, part in table.groupby("dataset", sort=False)
    ]
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
    timestamp = now_ms()
    metrics = [Metric(key, value, timestamp, 0) for key, value in _aggregate_metrics(table)]
    log_batch(client, parent_run_id, metrics=metrics)
    with tempfile.TemporaryDirectory(prefix="ubo-results-") as tmp:
        csv_path, md_path = Path(tmp) / "results.csv", Path(tmp) / "results.md"
        table.to_csv(csv_path, index=False)
        md_path.write_text(to_markdown(table))
        client.log_artifact(parent_run_id, str(csv_path))
        client.log_artifact(parent_run_id, str(md_path))


# -- the parent run of a benchmark ------------------------------------------------------------
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
    log_batch(client, run.info.run_id, params=[Param(k, v) for k, v in params.items()])
    return run.info.run_id


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
    ensure_configured(Path(repo))
    client = MlflowClient()
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return None
    runs = client.search_runs(
        experiment_ids,
        f"tags.`{TAG_FLOW_RUN}` = {quote(str(flow_run_id))}",
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
