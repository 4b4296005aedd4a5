"""The report (flows/report*.py): hand-checked statistics, runs selected by code, data and
config version and never mixed, byte-identical output on a rerun."""

from __future__ import annotations

import math
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from params_file import write_params

from flows import report, report_runs, report_tables, run_identity, store, tracked_run
from tests.test_tracking import write_processed

DATASETS = ["coat", "ml100k"]
METHODS = ["relmf", "expomf", "umf", "ubo", "jointopt"]
SEEDS = [0, 1]


def test_holm_adjustment_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01, max(0.03, 2 * 0.03), max(0.06, 1 * 0.04)
    assert report_runs.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert report_runs.holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1


def test_paired_tests_average_over_seeds_then_test_over_users():
    users = [10, 11, 12]
    study = report_runs.Study(runs=pd.DataFrame())
    # Per-user differences UBO - UMF: seed 0 (0.0, 0.2, 0.4), seed 1 (0.2, 0.2, 0.2)
    # -> per user 0.1, 0.2, 0.3: mean 0.2, sd 0.1, t = 0.2 / (0.1 / sqrt 3) = 2 sqrt 3, df 2.
    study.per_user[("coat", "ubo", 0)] = pd.Series([0.5, 0.7, 0.9], index=users)
    study.per_user[("coat", "umf", 0)] = pd.Series([0.5, 0.5, 0.5], index=users)
    study.per_user[("coat", "ubo", 1)] = pd.Series([0.6, 0.6, 0.6], index=users)
    study.per_user[("coat", "umf", 1)] = pd.Series([0.4, 0.4, 0.4], index=users)
    (row,) = report_runs.paired_tests(study, "coat", ["umf"]).to_dict("records")
    assert row["mean_diff"] == pytest.approx(0.2)
    assert (row["n_users"], row["n_seeds"], row["seeds_won"]) == (3, 2, 2)
    t = 2 * math.sqrt(3)
    assert row["t_p"] == pytest.approx(1 - t / math.sqrt(2 + t * t))  # Student t, df = 2
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t_{0.975, 2} * sem
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.2 - half, 0.2 + half))
    assert row["wilcoxon_p"] == pytest.approx(0.25)  # 3 positive ranks: exact 2 / 2^3
    assert row["t_p_holm"] == row["t_p"]  # one baseline: nothing to adjust


def test_what_ran_prints_the_orchestration_overhead_by_hand():
    """Issue 15, part 5: the parent run's wall time over (sum of run times / slots)."""
    hour = 3.6e6  # ms
    runs = pd.DataFrame(
        {
            "parent": ["p", "p", "p", "q"],
            "run_id": ["a", "b", "c", "d"],
            "start": [0.0, 0.0, 0.5 * hour, 2 * hour],
            "end": [1.0 * hour, 0.5 * hour, 1.0 * hour, 2.1 * hour],
            "wall_seconds": [3600.0, 1800.0, 1800.0, 360.0],
        }
    )
    invocations = {
        "p": report_runs.Invocation(start=-0.1 * hour, end=1.1 * hour, slots=2),
        "q": report_runs.Invocation(start=2 * hour, end=2.1 * hour, slots=None),  # not recorded
    }
    text = report_tables._invocations(runs, invocations)
    # p: 7200 s of runs on 2 slots = 1 h ideal; its parent ran 1.2 h -> 1.20x
    assert "3 runs from" in text and "parent run 1.20 h on 2 slots: **1.20x**" in text
    assert text.count("x** the sum") == 1  # q recorded no slots: no ratio


def test_paper_values_and_difference_in_std_units():
    assert report_runs.paper_value("yahoo", "dcg@3", "ubo") == 0.888
    assert report_runs.paper_value("coat", "map@1", "relmf") == 0.555
    assert report_runs.paper_value("ml100k", "dcg@3", "ubo") is None
    table = pd.DataFrame(
        {"dcg@3_mean": [0.90], "dcg@3_std": [0.031]}
        | {f"{m}_{s}": [0.5] for m in report_runs.METRICS if m != "dcg@3" for s in ("mean", "std")},
        index=pd.MultiIndex.from_tuples([("coat", "ubo")]),
    )
    text = report_tables.paper_table(table, "coat")
    assert "**0.900 ± 0.031**<br>paper 0.931 (-1.0σ)" in text  # (0.900 - 0.931) / 0.031


@pytest.fixture(scope="module")
def study_store(tmp_path_factory):
    """A repo-like directory with tiny coat and ml100k data and a few finished study runs."""
    root = tmp_path_factory.mktemp("report")
    write_processed(root, "coat")
    write_processed(root, "ml100k", semisynthetic=True)
    write_params(
        root / "params.yaml",
        f"data:\n  processed_dir: {root / 'processed'}\n"
        "train: {mode: dense, epochs: 3, device: cpu, block_users: 8, dense_lr: 0.05}\n",
    )
    before = os.environ.get("MLFLOW_TRACKING_URI")
    store.configure(store.default_tracking_uri(root), root)
    for dataset in DATASETS:
        for method in METHODS:
            for seed in SEEDS:
                tracked_run.train_and_log(
                    dataset=dataset,
                    method=method,
                    seed=seed,
                    overrides={},
                    params_path=root / "params.yaml",
                    repo=root,
                    experiment="study",
                    parent_run_id=None,
                )
    yield root
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    if before is not None:
        os.environ["MLFLOW_TRACKING_URI"] = before


def run_report(root: Path, out: Path, *extra: str) -> int:
    os.environ["UBO_REPO"] = str(root)
    try:
        return report.main(
            [
                "--experiment",
                "study",
                "--out",
                str(out),
                "--tracking-uri",
                store.default_tracking_uri(root),
                "--datasets",
                *DATASETS,
                "--methods",
                *METHODS,
                "--seeds",
                *map(str, SEEDS),
                *extra,
            ]
        )
    finally:
        del os.environ["UBO_REPO"]


def test_report_is_byte_identical_on_a_rerun_and_names_versions(study_store, tmp_path):
    (tmp_path / "results_discussion.md").write_text("## Discussion\n\nHand-written.\n")
    assert run_report(study_store, tmp_path) == 0
    first = (tmp_path / "RESULTS.md").read_bytes()
    images = {p.name: p.read_bytes() for p in (tmp_path / "figures").iterdir()}
    assert set(images) == {"fig2_semisynthetic.png", "fig3_pcc.png", "fig1_rq2.png"}
    assert run_report(study_store, tmp_path) == 0
    assert (tmp_path / "RESULTS.md").read_bytes() == first
    assert {p.name: p.read_bytes() for p in (tmp_path / "figures").iterdir()} == images
    text = first.decode()
    assert "Runs: 20 (2 data set(s) x 5 methods x seeds [0, 1]); missing: none." in text
    assert "Code version: `unknown`" in text and "Not a git checkout" in text  # no git here
    assert "**untuned** (no `datasets:` block in params.yaml)" in text
    data = run_identity.data_version(study_store / "processed", "coat", study_store)
    assert f"coat `{data}`" in text
    assert "## Table 2: Coat" in text and "Table 1" not in text  # no Yahoo runs
    assert "paper 0.931" in text and "## Discussion\n\nHand-written." in text
    assert "### ML-100K (semi-synthetic)" in text and "| UBO vs |" in text
    assert "The second test protocol" in text


def test_report_numbers_are_the_runs_means(study_store):
    store.configure(store.default_tracking_uri(study_store), study_store)
    study = report_runs.collect(study_store, "study", DATASETS, METHODS, SEEDS)
    runs = study.runs
    assert len(runs) == 20 and not study.missing and study.other_versions == 0
    table = report_runs.summary(runs)
    ubo = runs[(runs.dataset == "coat") & (runs.method == "ubo")]["dcg@3"]
    assert table.loc[("coat", "ubo"), "dcg@3_mean"] == pytest.approx(ubo.mean())
    assert table.loc[("coat", "ubo"), "dcg@3_std"] == pytest.approx(ubo.std(ddof=1))
    per_user = study.per_user[("coat", "ubo", 0)]
    assert per_user.mean() == pytest.approx(ubo.iloc[0])
    curve = study.pcc_curves[("ml100k", "ubo", 0)]
    assert list(curve.index) == [1, 2, 3] and np.isfinite(curve).all()


def test_semisynthetic_tables_carry_the_draw_noise_and_the_reference_rankings(study_store):
    """Per method: DCG@3 with the standard error over users of the seed-mean per-user DCG@3;
    then the rankings by true gamma, true m and popularity of the processed test set."""
    store.configure(store.default_tracking_uri(study_store), study_store)
    study = report_runs.collect(study_store, "study", DATASETS, METHODS, SEEDS)
    assert "coat" not in study.references
    names = [r.name for r in study.references["ml100k"]]
    assert names == ["true_relevance", "true_exposure", "popularity"]
    text = report_tables.draw_noise_table(study, report_runs.summary(study.runs), "ml100k")
    users = pd.concat([study.per_user[("ml100k", "ubo", s)] for s in SEEDS], axis=1).mean(1)
    se = users.std(ddof=1) / math.sqrt(len(users))
    runs = study.runs
    mean = runs[(runs.dataset == "ml100k") & (runs.method == "ubo")]["dcg@3"].mean()
    ubo_line = next(line for line in text.splitlines() if line.startswith("| UBO |"))
    assert ubo_line.startswith(f"| UBO | {mean:.3f} |") and ubo_line.endswith(f"| {se:.3f} |")
    oracle = study.references["ml100k"][0]
    assert f"ranked by the true γ (ceiling) | {oracle.metrics['dcg@3']:.3f} |" in text


def test_semisynthetic_tables_carry_the_second_test_protocol(study_store):
    """The unexposed lists' metrics are the runs' means, with the reference rankings on the
    same lists and the two protocols' method orders; real data has none of it."""
    store.configure(store.default_tracking_uri(study_store), study_store)
    study = report_runs.collect(study_store, "study", DATASETS, METHODS, SEEDS)
    table = report_runs.summary(study.runs)
    assert math.isnan(table.loc[("coat", "ubo"), "unexposed_dcg@3_mean"])
    lines = report_tables.unexposed_section(study, table, "ml100k")
    runs = study.runs
    mean = runs[(runs.dataset == "ml100k") & (runs.method == "ubo")]["unexposed_dcg@3"].mean()
    assert 0 < mean <= 1 + 1 / math.log2(3) + 0.5
    text = "\n".join(lines)
    header = next(line for line in lines[2].splitlines() if line.startswith("| metric |"))
    row = next(line for line in lines[2].splitlines() if line.startswith("| DCG@3 |"))
    cell = dict(zip(header.split("|")[2:-1], row.split("|")[2:-1], strict=True))[" UBO "]
    assert cell.strip("* ").startswith(f"{mean:.3f} ±")
    oracle = study.unexposed_references["ml100k"][0]
    assert f"ranked by the true γ (ceiling) | {oracle.metrics['dcg@3']:.3f} |" in text
    assert "Spearman rank correlation" in text


def test_report_never_mixes_versions_and_refuses_missing_runs(study_store, tmp_path, capsys):
    params = study_store / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(original.replace("epochs: 3", "epochs: 4"))  # another configuration
        store.configure(store.default_tracking_uri(study_store), study_store)
        study = report_runs.collect(study_store, "study", DATASETS, METHODS, SEEDS)
        assert study.runs.empty and len(study.missing) == 20 and study.other_versions == 20
        assert run_report(study_store, tmp_path) == 1
        assert "no finished run of code version" in capsys.readouterr().err
    finally:
        params.write_text(original)
    assert run_report(study_store, tmp_path, "--seeds", "0", "1", "2") == 1  # seed 2 missing
    err = capsys.readouterr().err
    assert (
        "10 run(s)" in err and "coat/relmf/seed2" in err and not (tmp_path / "RESULTS.md").exists()
    )
    assert run_report(study_store, tmp_path, "--seeds", "0", "1", "2", "--allow-partial") == 0
    assert "missing: coat/relmf/seed2" in (tmp_path / "RESULTS.md").read_text()


def test_report_pinned_to_a_code_version_selects_only_that_versions_runs(
    study_store, tmp_path, capsys
):
    """After ubo_core changes, `--code-version` (as RESULTS.md names it) still reports the
    study's runs, and says so; a version without runs is refused."""
    assert run_report(study_store, tmp_path, "--code-version", "code-0123456789abcdef") == 1
    assert "no finished run" in capsys.readouterr().err
    assert not (tmp_path / "RESULTS.md").exists()
    assert run_report(study_store, tmp_path, "--code-version", "unknown") == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert "Written by `python -m flows.report --code-version unknown` from" in text
    assert "Code version: `unknown` (a hash of the git tree of ubo_core, given on the" in text
    assert "Runs: 20 " in text and "one benchmark invocation: 20 runs from " in text


def test_hyper_validation_against_test_per_method(study_store):
    """Each method's selection objective (SNIPS DCG@3 at its last epoch, as logged) beside its
    test DCG@3, with ranks and Spearman's rho; the objective is the run's logged value."""
    store.configure(store.default_tracking_uri(study_store), study_store)
    study = report_runs.collect(study_store, "study", DATASETS, METHODS, SEEDS)
    runs = study.runs
    ubo = runs[(runs.dataset == "coat") & (runs.method == "ubo")]
    run = mlflow.get_run(ubo.iloc[0]["run_id"])
    assert ubo.iloc[0]["hyper"] == run.data.metrics["val/hyper_snips_dcg_at_3"]
    text = report_tables.hyper_vs_test(study, "coat")
    line = next(x for x in text.splitlines() if x.startswith("| UBO |"))
    assert line.startswith(f"| UBO | {ubo['hyper'].mean():.3f} ± {ubo['hyper'].std():.3f} |")
    assert f"across all {len(runs[runs.dataset == 'coat'])} runs" in text


def test_the_report_writes_one_results_run_per_method_for_the_mlflow_ui(study_store, tmp_path):
    """`make report` also fills "ubo results: <data set>": one flat run per method, named by
    it, whose metrics are the report's means; a rerun updates the runs, never adds any."""
    from mlflow import MlflowClient

    from flows import results_runs

    assert run_report(study_store, tmp_path) == 0
    assert run_report(study_store, tmp_path) == 0
    store.configure(store.default_tracking_uri(study_store), study_store)
    study = report_runs.collect(study_store, "study", DATASETS, METHODS, SEEDS)
    table = report_runs.summary(study.runs)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(results_runs.experiment_name("Coat"))
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = store.search(experiment.experiment_id, "attributes.status = 'FINISHED'")
    names = {run.info.run_name: run for run in runs}
    assert sorted(names) == sorted(report_runs.METHOD_DISPLAY[m] for m in METHODS)
    ubo = names["UBO"]
    assert ubo.data.metrics["dcg_at_3"] == pytest.approx(table.loc[("coat", "ubo"), "dcg@3_mean"])
    assert float(ubo.data.tags["dcg_at_3_std"]) == pytest.approx(
        table.loc[("coat", "ubo"), "dcg@3_std"], abs=1e-4
    )
    assert ubo.data.tags["ubo.n_seeds"] == "2"
    # Newest first, as the runs table and the charts list them: the registry's order.
    newest_first = store.search(
        experiment.experiment_id, "attributes.status = 'FINISHED'", ["attributes.start_time DESC"]
    )
    assert [r.data.tags["method"] for r in newest_first] == METHODS
