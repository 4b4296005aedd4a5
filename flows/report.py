"""The study's report: `docs/RESULTS.md` and `docs/figures/fig{1,2,3}_*.png` from MLflow.

    python -m flows.report [--experiment ubo] [--out docs] [--allow-partial]   (make report)

Which runs: for every (data set, method, seed) of the grid, the FINISHED run whose run key is
the one `ubo/full-benchmark` would train now, i.e. params.yaml's configuration (no overrides),
the current code version (ubo_core) and the current data version of each data
set (its DVC md5). Runs of any other code, data or configuration are never mixed in; they are
only counted. A missing cell stops the report (naming it) unless `--allow-partial`.

Everything printed comes from those runs; the report has no timestamps and sorts everything,
so two runs on the same store write byte-identical files. `docs/results_discussion.md`, if
present, is the hand-written discussion and is included verbatim.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from scipy import stats

from flows import tracking
from ubo_core.config import DATASETS, REAL_DATASETS, SEMISYNTHETIC_DATASETS, load_params
from ubo_core.data import FeedbackData
from ubo_core.errors import UboError
from ubo_core.fileio import atomic_path
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
ALL_METHODS = (*PAPER_METHODS, "jointopt", "alteropt", "biopt2", "noopt")  # display order
PCC_METHODS = ("expomf", "cjmf", "jointopt", "ubo")  # Figure 3
DISPLAY = {
    "ubo": "UBO",
    "umf": "UMF",
    "relmf": "RelMF",
    "expomf": "ExpoMF",
    "cjmf": "CJMF",
    "bpr": "BPR",
    "jointopt": "JointOpt",
    "alteropt": "AlterOpt",
    "biopt2": "BiOpt2",
    "noopt": "NoOpt",
    "coat": "Coat",
    "yahoo": "Yahoo! R3",
    "ml100k": "ML-100K (semi-synthetic)",
    "amazon_cds": "Amazon CDs (semi-synthetic)",
}
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
# The per-epoch hyper-validation objective (SNIPS DCG@3) as flows/tracking.py logs it.
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
    # Semi-synthetic sets: the test set ranked by the truth and by popularity (no training).
    references: dict[str, list[ReferenceRanking]] = field(default_factory=dict)
    unexposed_references: dict[str, list[ReferenceRanking]] = field(default_factory=dict)

    @staticmethod
    def seed_series(
        store: dict[tuple[str, str, int], pd.Series], dataset: str, method: str, seeds
    ) -> list[pd.Series]:
        """The series `store` (per_user or pcc_curves) holds for each seed, where it has one."""
        return [store[(dataset, method, s)] for s in seeds if (dataset, method, s) in store]


def collect(
    repo: Path,
    experiment: str,
    datasets: Sequence[str] = DATASETS,
    methods: Sequence[str] = tuple(METHODS),
    seeds: Sequence[int] = SEEDS,
    code_version: str | None = None,
) -> Study:
    """The runs of the grid at the checkout's code version, or at `code_version`."""
    params = load_params(repo / "params.yaml")
    experiment_id = tracking.get_experiment_id(experiment, repo)
    client = MlflowClient()
    processed = tracking._processed_dir(params.data.processed_dir, repo)
    rows, missing, selected = [], [], set()
    study = Study(runs=pd.DataFrame())
    study.code_version = code_version or tracking.code_version(repo)
    study.pinned = code_version is not None
    study.mode = params.train.mode
    study.seeds = tuple(seeds)
    study.tuned = bool(params.datasets)
    for dataset in datasets:
        study.data_versions[dataset] = tracking.data_version(processed, dataset, repo)
        if dataset in SEMISYNTHETIC_DATASETS:
            path = processed / dataset / "dataset.npz"
            if path.is_file():
                data = FeedbackData.load(path)
                study.references[dataset] = reference_rankings(data)
                if data.unexposed_test_user is not None:
                    study.unexposed_references[dataset] = reference_rankings(data, "unexposed")
        for method in methods:
            for seed in seeds:
                run_id = tracking.finished_run_for(
                    params, repo, experiment_id, dataset, method, seed, {}, study.code_version
                )
                if run_id is None:
                    missing.append(f"{dataset}/{method}/seed{seed}")
                    continue
                per_user = _per_user(client, run_id)
                if per_user is None:  # logged by an older flows/tracking.py: not comparable
                    missing.append(f"{dataset}/{method}/seed{seed} (no per-user metrics)")
                    continue
                selected.add(run_id)
                run = client.get_run(run_id)
                metrics = tracking.final_metrics(run)
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
                        "commit": tags.get(tracking.TAG_COMMIT, "unknown"),
                        "parent": tags.get(tracking.PARENT_TAG, ""),
                        "machine": tags.get(tracking.TAG_MACHINE, "unknown"),
                        "device": tags.get("device", "unknown"),
                        "epochs": int(run.data.params.get("train.epochs", 0)),
                        # The selection objective at the run's last epoch (the tuned one).
                        "hyper": run.data.metrics.get(HYPER_KEY, math.nan),
                    }
                )
                study.per_user[(dataset, method, seed)] = per_user
                if dataset in SEMISYNTHETIC_DATASETS:
                    history = client.get_metric_history(run_id, "pcc")
                    study.pcc_curves[(dataset, method, seed)] = pd.Series(
                        {m.step: m.value for m in sorted(history, key=lambda m: m.step)}
                    )
    # What else the store holds for these cells (other code, data or configs): not mixed in.
    for run in tracking._search(experiment_id, "attributes.status = 'FINISHED'"):
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
    return study


def _per_user(client: MlflowClient, run_id: str) -> pd.Series | None:
    """Per-user DCG@3 of a run (index: user id); None if the run did not log them."""
    folder = tracking.PER_USER_PATH.rsplit("/", 1)[0]
    if tracking.PER_USER_PATH not in {a.path for a in client.list_artifacts(run_id, folder)}:
        return None
    with tempfile.TemporaryDirectory(prefix="ubo-report-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=tracking.PER_USER_PATH, dst_path=tmp
        )
        with np.load(local) as arrays:
            return pd.Series(arrays["dcg_at_3"], index=arrays["user"])


# -- the numbers -----------------------------------------------------------------------------
def summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (ddof=1) and seed count per (dataset, method) of METRICS, the unexposed
    protocol's metrics (NaN on real data and in runs logged before it existed) and pcc."""
    grouped = runs.groupby(["dataset", "method"], sort=False)
    columns = [*METRICS, *(m for m in UNEXPOSED_METRICS if m in runs), "pcc"]
    table = grouped[columns].agg(["mean", "std"])
    table.columns = [f"{name}_{stat}" for name, stat in table.columns]
    table["n_seeds"] = grouped.size()
    return table


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


# -- markdown --------------------------------------------------------------------------------
def _f(value: float, digits: int = 3) -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.{digits}f}"
    )


def _p(value: float) -> str:
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def paper_table(table: pd.DataFrame, dataset: str) -> str:
    """Rows = metrics, columns = the paper's methods; `ours ± std` (best of the row in bold),
    the paper's value and the difference in units of our std."""
    methods = [m for m in PAPER_METHODS if (dataset, m) in table.index]
    head = "| metric | " + " | ".join(DISPLAY[m] for m in methods) + " |"
    lines = [head, "|---|" + "---|" * len(methods)]
    for metric in METRICS:
        means = {m: table.loc[(dataset, m), f"{metric}_mean"] for m in methods}
        best = max(means.values())
        cells = []
        for method in methods:
            mean, std = means[method], table.loc[(dataset, method), f"{metric}_std"]
            ours = f"{mean:.3f} ± {_f(std)}"
            if mean == best:
                ours = f"**{ours}**"
            paper = paper_value(dataset, metric, method)
            if paper is not None:
                z = (mean - paper) / std if std and not math.isnan(std) else math.nan
                ours += f"<br>paper {paper:.3f} ({_signed(z)})"
            cells.append(ours)
        lines.append(f"| {metric.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _signed(value: float) -> str:
    if math.isnan(value):
        return "std 0"
    return f"{value:+.1f}σ"


def metric_table(table: pd.DataFrame, dataset: str, methods: Sequence[str], metrics=METRICS) -> str:
    methods = [m for m in methods if (dataset, m) in table.index]
    lines = [
        "| metric | " + " | ".join(DISPLAY[m] for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for metric in metrics:
        means = {m: table.loc[(dataset, m), f"{metric}_mean"] for m in methods}
        best = max(means.values())
        cells = []
        for method in methods:
            cell = f"{means[method]:.3f} ± {_f(table.loc[(dataset, method), f'{metric}_std'])}"
            cells.append(f"**{cell}**" if means[method] == best else cell)
        label = metric.removeprefix(UNEXPOSED_PREFIX).upper()
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ordering(table: pd.DataFrame, dataset: str, metric: str = "dcg@3") -> tuple[list, list]:
    """(our order, the paper's order) of the paper's methods by `metric`, best first."""
    methods = [m for m in PAPER_METHODS if (dataset, m) in table.index]
    ours = sorted(methods, key=lambda m: -table.loc[(dataset, m), f"{metric}_mean"])
    paper = sorted(methods, key=lambda m: -(paper_value(dataset, metric, m) or 0.0))
    return ours, paper


def ordering_text(table: pd.DataFrame, dataset: str) -> str:
    ours, paper = ordering(table, dataset)
    swapped = [
        (a, b) for i, a in enumerate(paper) for b in paper[i + 1 :] if ours.index(a) > ours.index(b)
    ]
    text = (
        f"By DCG@3, ours: {' > '.join(DISPLAY[m] for m in ours)}; "
        f"the paper's: {' > '.join(DISPLAY[m] for m in paper)}."
    )
    if not swapped:
        return text + " Same order."
    pairs = []
    for a, b in swapped:
        gap = table.loc[(dataset, b), "dcg@3_mean"] - table.loc[(dataset, a), "dcg@3_mean"]
        pooled = math.sqrt(
            (table.loc[(dataset, a), "dcg@3_std"] ** 2 + table.loc[(dataset, b), "dcg@3_std"] ** 2)
            / 2
        )
        pairs.append(
            f"{DISPLAY[b]} above {DISPLAY[a]} by {gap:.3f} ({gap / pooled:.1f} pooled std)"
            if pooled
            else f"{DISPLAY[b]} above {DISPLAY[a]} by {gap:.3f}"
        )
    return (
        text
        + f" Pairs in the opposite order to the paper's ({len(swapped)}): "
        + "; ".join(pairs)
        + "."
    )


def paired_table(tests: pd.DataFrame) -> str:
    lines = [
        "| UBO vs | users | seeds | mean ΔDCG@3 | 95% CI | t-test p (Holm) "
        "| Wilcoxon p (Holm) | seeds won |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, row in tests.iterrows():
        lines.append(
            f"| {DISPLAY[row['baseline']]} | {row['n_users']} | {row['n_seeds']} | "
            f"{row['mean_diff']:+.4f} | [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}] | "
            f"{_p(row['t_p_holm'])} | {_p(row['wilcoxon_p_holm'])} | "
            f"{row['seeds_won']}/{row['n_seeds']} |"
        )
    return "\n".join(lines)


def draw_noise_table(study: Study, table: pd.DataFrame, dataset: str) -> str:
    """DCG@3 of each method with its standard error over test users (the one test draw's
    noise, which the ± over training seeds leaves out), then the rankings that need no
    training: by the true relevance (the ceiling), the true exposure and popularity."""
    lines = [
        "| ranking | DCG@3 | ± over seeds | standard error over test users |",
        "|---|---|---|---|",
    ]
    for method in ALL_METHODS:
        per_user = Study.seed_series(study.per_user, dataset, method, study.seeds)
        if not per_user:
            continue
        users = pd.concat(per_user, axis=1).mean(axis=1)  # one value per user: seed mean
        se = users.std(ddof=1) / math.sqrt(len(users))
        mean, std = (table.loc[(dataset, method), f"dcg@3_{k}"] for k in ("mean", "std"))
        lines.append(f"| {DISPLAY[method]} | {mean:.3f} | {_f(std)} | {se:.3f} |")
    for ranking in study.references.get(dataset, []):
        name = REFERENCE_DISPLAY[ranking.name]
        lines.append(
            f"| {name} | {ranking.metrics['dcg@3']:.3f} | – | {ranking.dcg3_standard_error:.3f} |"
        )
    return "\n".join(lines)


def unexposed_section(study: Study, table: pd.DataFrame, dataset: str) -> list[str]:
    """The second test protocol (Saito et al.'s): the metric table, the reference rankings on
    its lists, and how far the methods' order agrees with the random-exposure test's."""
    methods = [m for m in ALL_METHODS if (dataset, m) in table.index]
    column = f"{UNEXPOSED_PREFIX}dcg@3_mean"
    if table.loc[[(dataset, m) for m in methods], column].isna().any():
        return []  # some runs predate the protocol
    order = {
        name: sorted(methods, key=lambda m: -table.loc[(dataset, m), key])
        for name, key in (("random", "dcg@3_mean"), ("unexposed", column))
    }
    rho = stats.spearmanr(
        [order["random"].index(m) for m in methods], [order["unexposed"].index(m) for m in methods]
    ).statistic
    lines = ["| ranking | DCG@3 |", "|---|---|"]
    for ranking in study.unexposed_references.get(dataset, []):
        lines.append(f"| {REFERENCE_DISPLAY[ranking.name]} | {ranking.metrics['dcg@3']:.3f} |")
    return [
        "The second test protocol, Saito et al.'s (docs/DATA.md): each user's relevant but "
        "unclicked items of the training draw against up to 100 sampled non-relevant items "
        "(DCG and MAP as above, on these longer lists):",
        "",
        metric_table(table, dataset, ALL_METHODS, UNEXPOSED_METRICS),
        "",
        "\n".join(lines),
        "",
        "Methods by DCG@3, best first: random-exposure test "
        + ", ".join(DISPLAY[m] for m in order["random"])
        + "; unexposed lists "
        + ", ".join(DISPLAY[m] for m in order["unexposed"])
        + f" (Spearman rank correlation {rho:+.2f}).",
        "",
    ]


def hyper_vs_test(study: Study, dataset: str) -> str:
    """`## How the hyper-validation objective steers selection` for one data set ('' when its
    runs lack the objective)."""
    runs = study.runs[(study.runs["dataset"] == dataset) & study.runs["hyper"].notna()]
    if runs.empty:
        return ""
    stats_ = runs.groupby("method")[["hyper", "dcg@3"]].agg(["mean", "std"])
    methods = [m for m in ALL_METHODS if m in stats_.index]
    hyper_rank = stats_[("hyper", "mean")].rank(ascending=False, method="min")
    test_rank = stats_[("dcg@3", "mean")].rank(ascending=False, method="min")
    lines = [
        "| method | hyper-val SNIPS DCG@3 | rank | test DCG@3 | rank |",
        "|---|---|---:|---|---:|",
    ]
    for m in methods:
        row = stats_.loc[m]
        lines.append(
            f"| {DISPLAY[m]} | {row[('hyper', 'mean')]:.3f} ± {_f(row[('hyper', 'std')])} "
            f"| {int(hyper_rank[m])} | {row[('dcg@3', 'mean')]:.3f} ± "
            f"{_f(row[('dcg@3', 'std')])} | {int(test_rank[m])} |"
        )
    across_methods = stats.spearmanr(hyper_rank[methods], test_rank[methods]).statistic
    across_runs = stats.spearmanr(runs["hyper"], runs["dcg@3"])
    lines += [
        "",
        f"Spearman's ρ across the {len(methods)} methods' means {across_methods:+.2f}; across "
        f"all {len(runs)} runs {across_runs.statistic:+.2f} (p {_p(across_runs.pvalue)}).",
    ]
    return "\n".join(lines)


def pcc_table(study: Study, dataset: str) -> str:
    methods = [*PCC_METHODS, *(m for m in ALL_METHODS if m not in PCC_METHODS)]
    curves = {
        m: pd.concat(
            [
                study.pcc_curves[(dataset, m, s)]
                for s in study.seeds
                if (dataset, m, s) in study.pcc_curves
            ],
            axis=1,
        )
        for m in methods
        if any((dataset, m, s) in study.pcc_curves for s in study.seeds)
    }
    curves = {m: c for m, c in curves.items() if not c.empty}
    checkpoints = [e for e in PCC_CHECKPOINTS if any(e in c.index for c in curves.values())]
    lines = [
        "| method | " + " | ".join(f"epoch {e}" for e in checkpoints) + " | final (epoch) |",
        "|---|" + "---|" * (len(checkpoints) + 1),
    ]
    for method, curve in curves.items():
        cells = [
            f"{curve.loc[e].mean():.3f} ± {_f(curve.loc[e].std())}" if e in curve.index else "–"
            for e in checkpoints
        ]
        last = curve.index.max()
        cells.append(f"{curve.loc[last].mean():.3f} ± {_f(curve.loc[last].std())} ({last})")
        lines.append(f"| {DISPLAY[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _invocations(runs: pd.DataFrame) -> str:
    """Per `ubo/full-benchmark` invocation (parent run) whose runs were selected: how many and
    the span from its first selected run's start to its last one's end. A rerun trains only
    the cells whose run key changed, so one table can hold runs of several invocations."""
    spans = (
        runs.groupby("parent", sort=False)
        .agg(n=("run_id", "size"), start=("start", "min"), end=("end", "max"))
        .sort_values("start")
    )
    parts = [
        f"{row.n} runs from {_utc(row.start)} to {_utc(row.end)} UTC "
        f"({(row.end - row.start) / 3.6e6:.2f} h)"
        for row in spans.itertuples()
    ]
    head = "one benchmark invocation" if len(parts) == 1 else f"{len(parts)} benchmark invocations"
    return f"{head}: " + "; ".join(parts)


def _utc(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def render(study: Study, discussion: str = "") -> str:
    runs = study.runs
    table = summary(runs)
    machines = sorted(set(runs["machine"]))
    commits = sorted(set(runs["commit"]))
    parts = [
        "# Results: the UBO study, regenerated",
        "",
        (
            f"Written by `python -m flows.report --code-version {study.code_version}` "
            if study.pinned
            else "Written by `python -m flows.report` (`make report`) "
        )
        + "from the MLflow runs of `ubo/full-benchmark`; do not edit by hand (the discussion "
        "at the end comes from `docs/results_discussion.md`).",
        "",
        "## What ran",
        "",
        f"- Runs: {len(runs)} ({runs['dataset'].nunique()} data set(s) x "
        f"{runs['method'].nunique()} methods x seeds {sorted(set(runs['seed']))}); "
        f"missing: {', '.join(study.missing) if study.missing else 'none'}.",
        f"- Training mode: `{study.mode}`; "
        + (
            "hyperparameters and epochs as tuned on the hyper-validation sets (the `datasets:` "
            "block of `params.yaml`, docs/TUNING.md)."
            if study.tuned
            else "params.yaml defaults, **untuned** (no `datasets:` block in params.yaml)."
        ),
        f"- Code version: `{study.code_version}` (a hash of the git tree of ubo_core"
        + (", given on the command line" if study.pinned else " at HEAD")
        + f"); git commits of the runs: {', '.join(f'`{c[:12]}`' for c in commits)}."
        + (
            " **Not a git checkout: runs of different code cannot be told apart here.**"
            if study.code_version == "unknown"
            else ""
        ),
        "- Data versions (DVC md5 of `data/processed/<name>/dataset.npz`): "
        + ", ".join(f"{d} `{v}`" for d, v in sorted(study.data_versions.items()))
        + ".",
        f"- Finished runs of the same cells with another code, data or configuration version "
        f"in the store, left out: {study.other_versions}.",
        f"- Machine: {'; '.join(machines)}; devices: {', '.join(sorted(set(runs['device'])))}.",
        f"- Wall time: {_invocations(runs)}; sum of run times "
        f"{runs['wall_seconds'].sum() / 3600:.2f} h, of which training (evaluation excluded) "
        f"{runs['train_seconds'].sum() / 3600:.2f} h.",
        "",
    ]
    per_dataset = (
        runs.groupby("dataset", sort=False)["wall_seconds"]
        .sum()
        .reindex([d for d in DATASETS if d in set(runs["dataset"])])
        / 60
    )
    parts += [
        "| data set | " + " | ".join(DISPLAY[d] for d in per_dataset.index) + " |",
        "|---|" + "---|" * len(per_dataset),
        "| run time, all methods and seeds (min) | "
        + " | ".join(f"{v:.1f}" for v in per_dataset)
        + " |",
        "",
    ]
    for number, dataset in ((1, "yahoo"), (2, "coat")):
        if not any(d == dataset for d, _ in table.index):
            continue
        parts += [
            f"## Table {number}: {DISPLAY[dataset]}",
            "",
            "Mean ± std over seeds (best of the row in bold); under it the paper's value and "
            "(ours − paper) / our std.",
            "",
            paper_table(table, dataset),
            "",
            ordering_text(table, dataset),
            "",
        ]
    real = [d for d in REAL_DATASETS if any(x == d for x, _ in table.index)]
    if real:
        parts += ["## RQ2: the bi-level optimisation against its ablations (Figure 1)", ""]
        for dataset in real:
            parts += [f"### {DISPLAY[dataset]}", "", metric_table(table, dataset, RQ2_METHODS), ""]
            ubo = (
                table.loc[(dataset, "ubo"), "dcg@3_mean"]
                if (dataset, "ubo") in table.index
                else None
            )
            if ubo is not None:
                gains = [
                    f"{DISPLAY[m]} {100 * (ubo / table.loc[(dataset, m), 'dcg@3_mean'] - 1):+.1f}%"
                    for m in RQ2_METHODS[1:]
                    if (dataset, m) in table.index
                ]
                parts += [f"UBO's DCG@3 relative to: {', '.join(gains)}.", ""]
        parts += ["![Figure 1](figures/fig1_rq2.png)", ""]
    semi = [d for d in SEMISYNTHETIC_DATASETS if any(x == d for x, _ in table.index)]
    if semi:
        parts += ["## Semi-synthetic data (Figure 2)", ""]
        for dataset in semi:
            parts += [
                f"### {DISPLAY[dataset]}",
                "",
                metric_table(table, dataset, ALL_METHODS),
                "",
                "DCG@3 against the test draw's noise and the rankings that need no training:",
                "",
                draw_noise_table(study, table, dataset),
                "",
            ]
            if f"{UNEXPOSED_PREFIX}dcg@3_mean" in table and (dataset, "ubo") in table.index:
                parts += unexposed_section(study, table, dataset)
        parts += ["![Figure 2](figures/fig2_semisynthetic.png)", ""]
        parts += [
            "## PCC of the learned exposure against the true exposure (Figure 3)",
            "",
            "Per user, Pearson correlation of m̄(u, ·) with the true m(u, ·) over all items, "
            "averaged over users; mean ± std over seeds at a few epochs and at the last one.",
            "",
        ]
        for dataset in semi:
            parts += [f"### {DISPLAY[dataset]}", "", pcc_table(study, dataset), ""]
        parts += ["![Figure 3](figures/fig3_pcc.png)", ""]
    parts += [
        "## Paired comparison: UBO against each baseline",
        "",
        "Per-user DCG@3 differences (UBO − baseline) averaged over the seeds; paired t-test "
        "and Wilcoxon signed-rank test over users, Holm-adjusted over the baselines of each "
        "data set; `seeds won`: seeds whose mean DCG@3 favours UBO.",
        "",
    ]
    for dataset in DATASETS:
        baselines = [m for m in ALL_METHODS if m != "ubo"]
        tests = paired_tests(study, dataset, baselines)
        if tests.empty:
            continue
        parts += [f"### {DISPLAY[dataset]}", "", paired_table(tests), ""]
    if runs["hyper"].notna().any():
        parts += [
            "## How the hyper-validation objective steers selection",
            "",
            "Tuning and epoch selection maximise SNIPS DCG@3 on the hyper-validation set "
            "(held-out training clicks, biased exposure). Per method: that objective at each "
            "run's last (the tuned) epoch against its test DCG@3, mean ± std over seeds, each "
            "with the method's rank among the others; Spearman's ρ between the two across the "
            "methods' means and across all runs. Read after the fact: nothing is selected "
            "with it.",
            "",
        ]
        for dataset in DATASETS:
            block = hyper_vs_test(study, dataset)
            if block:
                parts += [f"### {DISPLAY[dataset]}", "", block, ""]
    if discussion:
        parts += [discussion.strip(), ""]
    return "\n".join(parts)


# -- figures ---------------------------------------------------------------------------------
def _bars(ax, table: pd.DataFrame, dataset: str, methods: Sequence[str], highlight: str = "ubo"):
    methods = [m for m in methods if (dataset, m) in table.index]
    means = [table.loc[(dataset, m), "dcg@3_mean"] for m in methods]
    stds = [np.nan_to_num(table.loc[(dataset, m), "dcg@3_std"]) for m in methods]
    colors = ["#c0392b" if m == highlight else "#7f8c8d" for m in methods]
    ax.bar(range(len(methods)), means, yerr=stds, capsize=4, color=colors)
    ax.set_xticks(range(len(methods)), [DISPLAY[m] for m in methods], rotation=30, ha="right")
    low = min(m - s for m, s in zip(means, stds, strict=True))
    high = max(m + s for m, s in zip(means, stds, strict=True))
    pad = (high - low) * 0.3 + 0.005
    ax.set_ylim(max(0.0, low - pad), high + pad)
    ax.set_ylabel("DCG@3 (mean ± std over seeds)")
    ax.set_title(DISPLAY[dataset])
    ax.grid(axis="y", alpha=0.3)


def _save(fig, path: Path, options: dict) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **options)
    return path


def figures(study: Study, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    table = summary(study.runs)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    present = {d for d, _ in table.index}
    # PNG metadata without the matplotlib version: identical bytes on a rerun.
    save = {"dpi": 120, "metadata": {"Software": None}}

    def bar_figure(datasets, methods, width: float, title: str, name: str) -> None:
        fig, axes = plt.subplots(
            1, len(datasets), figsize=(width * len(datasets), 3.8), squeeze=False
        )
        for ax, dataset in zip(axes[0], datasets, strict=True):
            _bars(ax, table, dataset, methods)
        fig.suptitle(title)
        fig.tight_layout()
        written.append(_save(fig, out / name, save))
        plt.close(fig)

    real = [d for d in REAL_DATASETS if d in present]
    if real:
        bar_figure(
            real, RQ2_METHODS, 4.5, "Figure 1 (RQ2): UBO against its ablations", "fig1_rq2.png"
        )

    semi = [d for d in SEMISYNTHETIC_DATASETS if d in present]
    if semi:
        bar_figure(
            semi,
            ALL_METHODS,
            5.5,
            "Figure 2: semi-synthetic data, every method",
            "fig2_semisynthetic.png",
        )

        fig, axes = plt.subplots(1, len(semi), figsize=(5.5 * len(semi), 3.8), squeeze=False)
        colors = dict(zip(PCC_METHODS, ("#2980b9", "#27ae60", "#8e44ad", "#c0392b"), strict=True))
        for ax, dataset in zip(axes[0], semi, strict=True):
            for method in PCC_METHODS:
                seeds = Study.seed_series(study.pcc_curves, dataset, method, study.seeds)
                if not seeds:
                    continue
                curves = pd.concat(seeds, axis=1)
                mean, std = curves.mean(axis=1), curves.std(axis=1).fillna(0.0)
                ax.plot(mean.index, mean, label=DISPLAY[method], color=colors[method])
                ax.fill_between(mean.index, mean - std, mean + std, alpha=0.2, color=colors[method])
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch (ExpoMF: EM iteration)")
            ax.set_ylabel("PCC(learned m̄, true m)")
            ax.set_title(DISPLAY[dataset])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("Figure 3: exposure PCC per epoch (mean ± std over seeds)")
        fig.tight_layout()
        written.append(_save(fig, out / "fig3_pcc.png", save))
        plt.close(fig)
    return written


# -- command line ----------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--experiment", default=tracking.DEFAULT_EXPERIMENT)
    parser.add_argument(
        "--out", default=str(REPO / "docs"), help="where RESULTS.md and figures/ go"
    )
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument(
        "--allow-partial", action="store_true", help="report even with missing runs"
    )
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument(
        "--code-version",
        default=None,
        help="report the runs of this code version (as RESULTS.md names it) instead of the "
        "checkout's: ubo_core may have changed since the study ran",
    )
    args = parser.parse_args(argv)
    repo = Path(os.environ.get("UBO_REPO", REPO)).resolve()
    tracking.configure(args.tracking_uri, repo)
    try:
        study = collect(
            repo, args.experiment, args.datasets, args.methods, args.seeds, args.code_version
        )
        if study.runs.empty:
            raise UboError(
                f"no finished run of code version {study.code_version} and the current data "
                f"and params.yaml in {args.experiment!r}"
            )
        if study.missing and not args.allow_partial:
            raise UboError(
                f"{len(study.missing)} run(s) of code version {study.code_version} and the "
                "current data and params.yaml are not in MLflow (run `make benchmark`; "
                "--allow-partial reports anyway): "
                + ", ".join(study.missing[:10])
                + (" ..." if len(study.missing) > 10 else "")
            )
    except UboError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    out = Path(args.out)
    discussion_path = out / "results_discussion.md"
    discussion = discussion_path.read_text() if discussion_path.is_file() else ""
    text = render(study, discussion)  # before anything is written: a failure leaves no mix
    for path in figures(study, out / "figures"):
        print(f"wrote {path}")
    with atomic_path(out / "RESULTS.md") as tmp:
        tmp.write_text(text)
    print(f"wrote {out / 'RESULTS.md'} from {len(study.runs)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
