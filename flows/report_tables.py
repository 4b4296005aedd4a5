"""The report's markdown: RESULTS.md's tables and text from a `Study` (flows/report_runs.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime

import pandas as pd
from scipy import stats

from flows.report_runs import (
    ALL_METHODS,
    METHOD_DISPLAY,
    METRICS,
    PAPER,
    PAPER_METHODS,
    PCC_CHECKPOINTS,
    PCC_METHODS,
    REFERENCE_DISPLAY,
    RQ2_METHODS,
    UNEXPOSED_METRICS,
    Invocation,
    Study,
    paired_tests,
    paper_value,
    summary,
)
from flows.study import metric_table as markdown_metric_table
from ubo_core.datasets.registry import REAL, SEMISYNTHETIC
from ubo_core.trainer import UNEXPOSED_PREFIX


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
    head = "| metric | " + " | ".join(METHOD_DISPLAY[m] for m in methods) + " |"
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
    """`flows.study.metric_table` with display names, upper-case metric names, best in bold."""
    return markdown_metric_table(
        table, dataset, methods, metrics, names=METHOD_DISPLAY, label=_metric_label, bold_best=True
    )


def _metric_label(metric: str) -> str:
    return metric.removeprefix(UNEXPOSED_PREFIX).upper()


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
        f"By DCG@3, ours: {' > '.join(METHOD_DISPLAY[m] for m in ours)}; "
        f"the paper's: {' > '.join(METHOD_DISPLAY[m] for m in paper)}."
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
        above = f"{METHOD_DISPLAY[b]} above {METHOD_DISPLAY[a]} by {gap:.3f}"
        pairs.append(f"{above} ({gap / pooled:.1f} pooled std)" if pooled else above)
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
            f"| {METHOD_DISPLAY[row['baseline']]} | {row['n_users']} | {row['n_seeds']} | "
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
        lines.append(f"| {METHOD_DISPLAY[method]} | {mean:.3f} | {_f(std)} | {se:.3f} |")
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
        "unclicked items of the training draw against up to "
        f"{study.unexposed_negatives} sampled non-relevant items "
        "(DCG and MAP as above, on these longer lists):",
        "",
        metric_table(table, dataset, ALL_METHODS, UNEXPOSED_METRICS),
        "",
        "\n".join(lines),
        "",
        "Methods by DCG@3, best first: random-exposure test "
        + ", ".join(METHOD_DISPLAY[m] for m in order["random"])
        + "; unexposed lists "
        + ", ".join(METHOD_DISPLAY[m] for m in order["unexposed"])
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
            f"| {METHOD_DISPLAY[m]} | {row[('hyper', 'mean')]:.3f} ± {_f(row[('hyper', 'std')])} "
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
        lines.append(f"| {METHOD_DISPLAY[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _elementwise(runs: pd.DataFrame) -> str:
    """How dense runs' fused elementwise passes ran (ubo_core/fused.py), e.g. `; dense
    elementwise passes: compiled (140 runs)`; empty without runs that used them."""
    paths = runs.loc[runs["elementwise"] != "", "elementwise"].value_counts()
    if paths.empty:
        return ""
    return "; dense elementwise passes: " + ", ".join(
        f"{path} ({count} runs)" for path, count in sorted(paths.items())
    )


def _invocations(runs: pd.DataFrame, invocations: dict[str, Invocation]) -> str:
    """Per `ubo/full-benchmark` invocation (parent run) whose runs were selected: how many and
    the span from its first selected run's start to its last one's end. A rerun trains only
    the cells whose run key changed, so one table can hold runs of several invocations.

    Where the parent recorded its slots (runs that could train at once), also the
    orchestration overhead: the parent run's wall time, from its creation (before the first
    child is submitted) to its end (after the last finished and the table was logged), over
    the ideal, the sum of its runs' run times (`wall_seconds`: training and evaluation) over
    the slots. 1.00x would be every slot training from the first second to the last."""
    spans = (
        runs.groupby("parent", sort=False)
        .agg(
            n=("run_id", "size"),
            start=("start", "min"),
            end=("end", "max"),
            busy=("wall_seconds", "sum"),
        )
        .sort_values("start")
    )
    parts = []
    for row in spans.itertuples():
        text = (
            f"{row.n} runs from {_utc(row.start)} to {_utc(row.end)} UTC "
            f"({(row.end - row.start) / 3.6e6:.2f} h)"
        )
        invocation = invocations.get(str(row.Index))
        if invocation is not None and invocation.slots and invocation.end:
            wall = (invocation.end - invocation.start) / 1000
            ideal = row.busy / invocation.slots
            text += (
                f", parent run {wall / 3600:.2f} h on {invocation.slots} slots: "
                f"**{wall / ideal:.2f}x** the sum of its run times / slots ({ideal / 3600:.2f} h)"
            )
        parts.append(text)
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
        f"- Machine: {'; '.join(machines)}; devices: {', '.join(sorted(set(runs['device'])))}"
        f"{_elementwise(runs)}.",
        f"- Wall time: {_invocations(runs, study.invocations)}; sum of run times "
        f"{runs['wall_seconds'].sum() / 3600:.2f} h, of which training (evaluation excluded) "
        f"{runs['train_seconds'].sum() / 3600:.2f} h.",
        "",
    ]
    per_dataset = (
        runs.groupby("dataset", sort=False)["wall_seconds"]
        .sum()
        .reindex([d for d in study.datasets if d in set(runs["dataset"])])
        / 60
    )
    parts += [
        "| data set | " + " | ".join(study.datasets[d].display for d in per_dataset.index) + " |",
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
            f"## Table {number}: {study.datasets[dataset].display}",
            "",
            "Mean ± std over seeds (best of the row in bold); under it the paper's value and "
            "(ours − paper) / our std.",
            "",
            paper_table(table, dataset),
            "",
            ordering_text(table, dataset),
            "",
        ]
    real = study.of_kind(REAL)
    for dataset in (d for d in real if d not in PAPER):  # a real set of the user's own
        parts += [
            f"## {study.datasets[dataset].display}: every method",
            "",
            "Mean ± std over seeds (best of the row in bold), on its random-exposure test set.",
            "",
            metric_table(table, dataset, ALL_METHODS),
            "",
        ]
    if real:
        parts += ["## RQ2: the bi-level optimisation against its ablations (Figure 1)", ""]
        for dataset in real:
            parts += [
                f"### {study.datasets[dataset].display}",
                "",
                metric_table(table, dataset, RQ2_METHODS),
                "",
            ]
            ubo = (
                table.loc[(dataset, "ubo"), "dcg@3_mean"]
                if (dataset, "ubo") in table.index
                else None
            )
            if ubo is not None:
                gains = [
                    f"{METHOD_DISPLAY[m]} "
                    f"{100 * (ubo / table.loc[(dataset, m), 'dcg@3_mean'] - 1):+.1f}%"
                    for m in RQ2_METHODS[1:]
                    if (dataset, m) in table.index
                ]
                parts += [f"UBO's DCG@3 relative to: {', '.join(gains)}.", ""]
        parts += ["![Figure 1](figures/fig1_rq2.png)", ""]
    semi = study.of_kind(SEMISYNTHETIC)
    if semi:
        parts += ["## Semi-synthetic data (Figure 2)", ""]
        for dataset in semi:
            parts += [
                f"### {study.datasets[dataset].display}",
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
            parts += [f"### {study.datasets[dataset].display}", "", pcc_table(study, dataset), ""]
        parts += ["![Figure 3](figures/fig3_pcc.png)", ""]
    parts += [
        "## Paired comparison: UBO against each baseline",
        "",
        "Per-user DCG@3 differences (UBO − baseline) averaged over the seeds; paired t-test "
        "and Wilcoxon signed-rank test over users, Holm-adjusted over the baselines of each "
        "data set; `seeds won`: seeds whose mean DCG@3 favours UBO.",
        "",
    ]
    for dataset in study.datasets:
        baselines = [m for m in ALL_METHODS if m != "ubo"]
        tests = paired_tests(study, dataset, baselines)
        if tests.empty:
            continue
        parts += [f"### {study.datasets[dataset].display}", "", paired_table(tests), ""]
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
        for dataset in study.datasets:
            block = hyper_vs_test(study, dataset)
            if block:
                parts += [f"### {study.datasets[dataset].display}", "", block, ""]
    if discussion:
        parts += [discussion.strip(), ""]
    return "\n".join(parts)
