"""The report's runs and numbers: which runs a report may use (`collect`), their summary
over seeds, and the paired significance tests; plus what the report names (methods in the
paper's order, display names, the paper's published values).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from scipy import stats

from flows import run_identity, store, tracked_run
from flows.study import TAG_SLOTS, summarise
from ubo_core.config import load_params
from ubo_core.data import FeedbackData
from ubo_core.datasets.registry import SEMISYNTHETIC, Dataset, get_dataset
from ubo_core.methods import METHODS
from ubo_core.reference_rankings import ReferenceRanking, reference_rankings
from ubo_core.trainer import UNEXPOSED_PREFIX

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2, 3, 4)
METRICS = ("dcg@1", "dcg@2", "dcg@3", "map@1", "map@2", "map@3")
# Semi-synthetic data's second test protocol (relevant-but-unexposed items, Saito et al.'s).
UNEXPOSED_METRICS = tuple(f"{UNEXPOSED_PREFIX}{m}" for m in METRICS)
PAPER_METHODS = ("relmf", "expomf", "cjmf", "bpr", "umf", "ubo")  # Tables 1-2, paper order
# NoOpt (a frozen at its initialisation) is our control, not the paper's: what optimising the
# exposure net adds at all.
RQ2_METHODS = ("ubo", "jointopt", "alteropt", "biopt2", "noopt")
ALL_METHODS = tuple(METHODS)  # the registry's order: the paper's Tables 1-2, then ablations
PCC_METHODS = ("expomf", "cjmf", "jointopt", "ubo")  # Figure 3
METHOD_DISPLAY = {name: cls.display for name, cls in METHODS.items()}
# The paper's Tables 1 and 2 (mean of 5 runs; ../shared/PAPER.md "Published numbers").
PAPER: dict[str, dict[str, tuple[float, ...]]] = {
    "yahoo": {  # rows: METRICS; columns: PAPER_METHODS
        "dcg@1": (0.501, 0.521, 0.535, 0.534, 0.541, 0.552),
        "dcg@2": (0.686, 0.724, 0.742, 0.740, 0.731, 0.766),
        "dcg@3": (0.794, 0.849, 0.866, 0.856, 0.842, 0.888),
        "map@1": (0.501, 0.521, 0.532, 0.534, 0.541, 0.552),
        "map@2": (0.583, 0.610, 0.622, 0.622, 0.625, 0.642),
        "map@3": (0.608, 0.636, 0.646, 0.645, 0.652, 0.664),
    },
    "coat": {
        "dcg@1": (0.555, 0.523, 0.504, 0.568, 0.556, 0.573),
        "dcg@2": (0.739, 0.728, 0.729, 0.770, 0.742, 0.792),
        "dcg@3": (0.887, 0.851, 0.873, 0.906, 0.896, 0.931),
        "map@1": (0.555, 0.523, 0.504, 0.568, 0.556, 0.573),
        "map@2": (0.622, 0.594, 0.589, 0.635, 0.621, 0.648),
        "map@3": (0.636, 0.606, 0.603, 0.650, 0.639, 0.659),
    },
}
PCC_CHECKPOINTS = (1, 5, 10, 20, 50, 100)
# The per-epoch hyper-validation objective (SNIPS DCG@3) as flows/tracked_run.py logs it.
HYPER_KEY = "val/hyper_snips_dcg_at_3"
REFERENCE_DISPLAY = {
    "true_relevance": "ranked by the true γ (ceiling)",
    "true_exposure": "ranked by the true m",
    "popularity": "ranked by popularity n_i (floor)",
}


def paper_value(dataset: str, metric: str, method: str) -> float | None:
    if dataset not in PAPER or method not in PAPER_METHODS:
        return None
    return PAPER[dataset][metric][PAPER_METHODS.index(method)]


# -- collecting the runs ---------------------------------------------------------------------
@dataclass
class Invocation:
    """One `ubo/full-benchmark` run as its MLflow parent run saw it: from creation to end
    (ms), and how many children could train at once (None: not recorded)."""

    start: float
    end: float | None
    slots: int | None


@dataclass
class Study:
    """The selected runs: one row per (dataset, method, seed), plus what the report names."""

    runs: pd.DataFrame  # dataset, method, seed, run_id, METRICS, pcc, seconds, tags
    per_user: dict[tuple[str, str, int], pd.Series] = field(default_factory=dict)
    pcc_curves: dict[tuple[str, str, int], pd.Series] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    other_versions: int = 0  # finished runs of the grid's cells not selected (other keys)
    code_version: str = ""
    pinned: bool = False  # code_version given on the command line, not the checkout's
    data_versions: dict[str, str] = field(default_factory=dict)
    mode: str = ""
    seeds: tuple[int, ...] = SEEDS
    tuned: bool = False  # params.yaml holds tuned values (a `datasets:` block)
    datasets: dict[str, Dataset] = field(default_factory=dict)  # the reported, catalog order
    unexposed_negatives: int = 0  # semisynthetic.unexposed_test_negatives of params.yaml
    # Semi-synthetic sets: the test set ranked by the truth and by popularity (no training).
    references: dict[str, list[ReferenceRanking]] = field(default_factory=dict)
    unexposed_references: dict[str, list[ReferenceRanking]] = field(default_factory=dict)
    invocations: dict[str, Invocation] = field(default_factory=dict)  # parent run id ->

    @staticmethod
    def seed_series(
        store: dict[tuple[str, str, int], pd.Series], dataset: str, method: str, seeds
    ) -> list[pd.Series]:
        """The series `store` (per_user or pcc_curves) holds for each seed, where it has one."""
        return [store[(dataset, method, s)] for s in seeds if (dataset, method, s) in store]

    def of_kind(self, kind: str) -> list[str]:
        """The reported data sets of `kind` (registry.REAL or SEMISYNTHETIC) that have runs."""
        present = set(self.runs["dataset"]) if "dataset" in self.runs else set()
        return [d for d, spec in self.datasets.items() if spec.kind == kind and d in present]


def collect(
    repo: Path,
    experiment: str,
    datasets: Sequence[str] | None = None,
    methods: Sequence[str] = tuple(METHODS),
    seeds: Sequence[int] = SEEDS,
    code_version: str | None = None,
) -> Study:
    """The runs of the grid at the checkout's code version, or at `code_version`; by
    default every data set of params.yaml's catalog."""
    params = load_params(repo / "params.yaml")
    datasets = list(params.catalog) if datasets is None else list(datasets)
    experiment_id = store.get_experiment_id(experiment, repo)
    client = MlflowClient()
    processed = run_identity.resolve_processed_dir(params.data.processed_dir, repo)
    rows, missing, selected = [], [], set()
    study = Study(runs=pd.DataFrame())
    study.code_version = code_version or run_identity.code_version(repo)
    study.pinned = code_version is not None
    study.mode = params.train.mode
    study.seeds = tuple(seeds)
    study.tuned = bool(params.datasets)
    study.datasets = {name: get_dataset(params, name) for name in datasets}
    study.unexposed_negatives = params.semisynthetic.unexposed_test_negatives
    for dataset in datasets:
        study.data_versions[dataset] = run_identity.data_version(processed, dataset, repo)
        semisynthetic = study.datasets[dataset].kind == SEMISYNTHETIC
        if semisynthetic:
            path = processed / dataset / "dataset.npz"
            if path.is_file():
                data = FeedbackData.load(path)
                study.references[dataset] = reference_rankings(data)
                if data.unexposed_test_user is not None:
                    study.unexposed_references[dataset] = reference_rankings(data, "unexposed")
        for method in methods:
            for seed in seeds:
                run_id = tracked_run.finished_run_for(
                    params, repo, experiment_id, dataset, method, seed, {}, study.code_version
                )
                if run_id is None:
                    missing.append(f"{dataset}/{method}/seed{seed}")
                    continue
                per_user = _per_user(client, run_id)
                if per_user is None:  # logged by an older flows/tracked_run.py: not comparable
                    missing.append(f"{dataset}/{method}/seed{seed} (no per-user metrics)")
                    continue
                selected.add(run_id)
                run = client.get_run(run_id)
                metrics = tracked_run.final_metrics(run)
                tags = run.data.tags
                rows.append(
                    {
                        "dataset": dataset,
                        "method": method,
                        "seed": seed,
                        "run_id": run_id,
                        **{
                            name: metrics.get(name, math.nan)
                            for name in (*METRICS, *UNEXPOSED_METRICS, "pcc")
                        },
                        "wall_seconds": metrics.get("wall_seconds", math.nan),
                        "train_seconds": metrics.get("train_seconds", math.nan),
                        "start": run.info.start_time,
                        "end": run.info.end_time,
                        "commit": tags.get(run_identity.TAG_COMMIT, "unknown"),
                        "parent": tags.get(run_identity.PARENT_TAG, ""),
                        "machine": tags.get(run_identity.TAG_MACHINE, "unknown"),
                        "device": tags.get("device", "unknown"),
                        # Dense mode's fused elementwise passes: compiled | eager ("" for
                        # methods without them, in paper mode and in runs before the tag).
                        "elementwise": tags.get("elementwise", ""),
                        "epochs": int(run.data.params.get("train.epochs", 0)),
                        # The selection objective at the run's last epoch (the tuned one).
                        "hyper": run.data.metrics.get(HYPER_KEY, math.nan),
                    }
                )
                study.per_user[(dataset, method, seed)] = per_user
                if semisynthetic:
                    history = client.get_metric_history(run_id, "pcc")
                    study.pcc_curves[(dataset, method, seed)] = pd.Series(
                        {m.step: m.value for m in sorted(history, key=lambda m: m.step)}
                    )
    # What else the store holds for these cells (other code, data or configs): not mixed in.
    for run in store.search(experiment_id, "attributes.status = 'FINISHED'"):
        tags = run.data.tags
        if (
            run.info.run_id not in selected
            and tags.get("dataset") in datasets
            and tags.get("method") in methods
            and tags.get("seed", "").isdigit()
            and int(tags["seed"]) in seeds
        ):
            study.other_versions += 1
    study.runs = pd.DataFrame(rows)
    study.missing = missing
    for parent in sorted({row["parent"] for row in rows if row["parent"]}):
        with contextlib.suppress(MlflowException):  # a parent deleted from the store
            run = client.get_run(parent)
            slots = run.data.tags.get(TAG_SLOTS, "")
            study.invocations[parent] = Invocation(
                run.info.start_time, run.info.end_time, int(slots) if slots.isdigit() else None
            )
    return study


def _per_user(client: MlflowClient, run_id: str) -> pd.Series | None:
    """Per-user DCG@3 of a run (index: user id); None if the run did not log them."""
    folder = tracked_run.PER_USER_PATH.rsplit("/", 1)[0]
    if tracked_run.PER_USER_PATH not in {a.path for a in client.list_artifacts(run_id, folder)}:
        return None
    with tempfile.TemporaryDirectory(prefix="ubo-report-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=tracked_run.PER_USER_PATH, dst_path=tmp
        )
        with np.load(local) as arrays:
            return pd.Series(arrays["dcg_at_3"], index=arrays["user"])


# -- the numbers -----------------------------------------------------------------------------
def summary(runs: pd.DataFrame) -> pd.DataFrame:
    """`flows.study.summarise` of METRICS, the unexposed protocol's metrics (NaN on real data; left
    out when no run has them, e.g. runs logged before the protocol existed) and pcc."""
    return summarise(runs, [*METRICS, *(m for m in UNEXPOSED_METRICS if m in runs), "pcc"])


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down; monotone; capped at 1)."""
    order = np.argsort(p_values, kind="stable")
    adjusted = np.empty(len(p_values))
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted.tolist()


def paired_tests(study: Study, dataset: str, baselines: Sequence[str]) -> pd.DataFrame:
    """UBO against each baseline on one data set, user by user (per-user DCG@3).

    Per seed, the two runs rank the same test users, so each user gives a paired difference
    (UBO - baseline) per seed; averaging it over the seeds gives one difference per user, which
    the paired t-test and the Wilcoxon signed-rank test take (users are the independent units;
    seeds are repeated measures of the same user). `seeds_won` counts the seeds whose mean
    favours UBO. p-values are Holm-adjusted over the baselines of the data set.
    """
    rows = []
    for baseline in baselines:
        per_seed = []
        for seed in study.seeds:
            ours = study.per_user.get((dataset, "ubo", seed))
            theirs = study.per_user.get((dataset, baseline, seed))
            if ours is not None and theirs is not None:
                per_seed.append((ours - theirs).rename(seed))
        if not per_seed:
            continue
        differences = pd.concat(per_seed, axis=1)
        # Rounded: a mean of exactly equal values can come out as 1e-17, which Wilcoxon
        # would count as a difference.
        per_user = differences.mean(axis=1).to_numpy().round(12)
        mean = float(per_user.mean())
        half = float(stats.t.ppf(0.975, per_user.size - 1) * stats.sem(per_user))
        t_p = float(stats.ttest_rel(per_user, np.zeros_like(per_user)).pvalue)
        nonzero = per_user[per_user != 0]
        w_p = float(stats.wilcoxon(nonzero).pvalue) if nonzero.size else 1.0
        rows.append(
            {
                "baseline": baseline,
                "n_users": per_user.size,
                "n_seeds": differences.shape[1],
                "mean_diff": mean,
                "ci_low": mean - half,
                "ci_high": mean + half,
                "t_p": t_p,
                "wilcoxon_p": w_p,
                "seeds_won": int((differences.mean(axis=0) > 0).sum()),
            }
        )
    table = pd.DataFrame(rows)
    if not table.empty:
        table["t_p_holm"] = holm(table["t_p"].tolist())
        table["wilcoxon_p_holm"] = holm(table["wilcoxon_p"].tolist())
    return table
