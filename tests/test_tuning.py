"""Tuning on the hyper-validation set (ubo_core.tuning, flows.tune): the search space is
checked, a trial never reads or evaluates the test set, the chosen values are written back into
params.yaml atomically, and a study records every trial in MLflow."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import params_file
import pytest
import yaml
from mlflow import MlflowClient

from flows import run_identity, store
from flows.tune import latest_choices, merged_choices
from flows.tune_study import TAG_CHOSEN, TAG_KIND, default_values, run_study
from tests.test_tracking import write_processed
from ubo_core import trainer
from ubo_core.config import ConfigError, load_params
from ubo_core.data import TEST_ARRAYS, FeedbackData
from ubo_core.errors import DataError, UboError
from ubo_core.fileio import load_npz, save_npz
from ubo_core.tuning import (
    OBJECTIVE,
    TUNED_MARKER,
    check_tuning,
    knobs,
    run_trial,
    tuned_block,
    write_tuned_defaults,
)

REPO = Path(__file__).resolve().parents[1]
SPACE = """
tuning:
  seed: 0
  trials: {coat: 3}
  startup_trials: 2
  prune_after_epochs: 2
  space:
    umf:
      weight_decay: {low: 1.0e-6, high: 1.0e-2, log: true}
      dense_lr: {low: 0.01, high: 0.1, log: true}
    cjmf:
      n_models: {choices: [2, 3]}
"""


def write_params(root: Path, extra: str = SPACE) -> Path:
    path = root / "params.yaml"
    params_file.write_params(
        path,
        f"data:\n  processed_dir: {root / 'processed'}\n"
        "train:\n  mode: dense\n  epochs: 4\n  device: cpu\n  block_users: 8\n" + extra,
    )
    return path


def test_the_repository_search_space_is_valid():
    params = load_params(REPO / "params.yaml")
    check_tuning(params)
    assert {k.name for k in knobs(params, "relmf")} >= {"weight_decay", "dense_lr", "clip"}
    assert set(params.tuning.trials) == {"coat", "yahoo", "ml100k", "amazon_cds"}


def test_knobs_read_ranges_ints_and_choices(tmp_path):
    params = load_params(write_params(tmp_path))
    umf = {k.name: k for k in knobs(params, "umf")}
    assert umf["weight_decay"].log and umf["weight_decay"].low == 1e-6
    assert not umf["dense_lr"].integer
    (n_models,) = knobs(params, "cjmf")
    assert n_models.choices == (2, 3)
    assert knobs(params, "bpr") == []  # no space: nothing to tune


@pytest.mark.parametrize(
    ("space", "key", "problem"),
    [
        ("nosuch: {}", "tuning.space.nosuch", "unknown method"),
        ("umf: {lrr: {low: 0.1, high: 1.0}}", "tuning.space.umf.lrr", "not a valid value range"),
        ("umf: {lr: {low: 1.0, high: 0.1}}", "tuning.space.umf.lr", "low < high"),
        ("umf: {lr: {low: 0.0, high: 0.1, log: true}}", "tuning.space.umf.lr", "log needs low > 0"),
        ("umf: {lr: {choices: []}}", "tuning.space.umf.lr", "non-empty list"),
        ("umf: {lr: {low: 0.1, high: 1.0, step: 2}}", "tuning.space.umf.lr.step", "unknown key"),
        ("relmf: {clip: {low: 0.1, high: 2.0}}", "tuning.space.relmf.clip", "out of range"),
    ],
)
def test_bad_search_space_names_the_key(tmp_path, space, key, problem):
    params = load_params(write_params(tmp_path, f"tuning:\n  space:\n    {space}\n"))
    with pytest.raises(ConfigError) as error:
        check_tuning(params)
    assert error.value.key == key and problem in str(error.value)


def test_bad_trials_budget_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="tuning.trials.nosuch"):
        load_params(write_params(tmp_path, "tuning:\n  trials: {nosuch: 3}\n"))
    with pytest.raises(ConfigError, match="tuning.trials.coat"):
        load_params(write_params(tmp_path, "tuning:\n  trials: {coat: 0}\n"))


def poison_test_split(path: Path) -> None:
    """Rewrite the test arrays of a saved data set with values no loader accepts."""
    arrays = load_npz(path)
    arrays["test_label"] = np.full_like(arrays["test_label"], 7)
    arrays["test_user"] = np.full_like(arrays["test_user"], 10**6)
    arrays["eval_users"] = np.full_like(arrays["eval_users"], -1)
    save_npz(path, arrays)


def test_tuning_never_reads_the_test_set(tmp_path, monkeypatch):
    clean, poisoned = tmp_path / "clean", tmp_path / "poisoned"
    write_processed(clean, "coat")
    write_processed(poisoned, "coat")
    poisoned_file = poisoned / "processed" / "coat" / "dataset.npz"
    poison_test_split(poisoned_file)
    with pytest.raises(DataError):  # the poison is real: a full load refuses the file
        FeedbackData.load(poisoned_file)
    params = load_params(write_params(tmp_path))

    def forbidden(*_args, **_kwargs):
        raise AssertionError("tuning evaluated the test set")

    monkeypatch.setattr(trainer, "evaluate_test", forbidden)
    outcomes = []
    for root in (clean, poisoned):
        data = FeedbackData.load(root / "processed" / "coat" / "dataset.npz", with_test=False)
        assert all(getattr(data, name).size == 0 for name in TEST_ARRAYS)
        outcomes.append(run_trial(data, params, "coat", "umf", {"dense_lr": 0.05}, seed=0))
    assert outcomes[0].curve == outcomes[1].curve and len(outcomes[0].curve) == 4
    best_epoch, best_value = max(outcomes[0].curve, key=lambda point: point[1])
    assert (outcomes[0].value, outcomes[0].best_epoch) == (best_value, best_epoch)


def test_fit_refuses_to_evaluate_data_loaded_without_its_test_split(tmp_path):
    write_processed(tmp_path, "coat")
    data = FeedbackData.load(tmp_path / "processed" / "coat" / "dataset.npz", with_test=False)
    params = load_params(write_params(tmp_path))
    from ubo_core.methods import resolve_config

    train, hyper = resolve_config(params, "coat", "umf")
    with pytest.raises(Exception, match="without its test split"):
        trainer.fit("umf", data, train, hyper, 0, progress=False)


def test_tuned_defaults_replace_the_block_atomically_and_are_checked(tmp_path):
    path = write_params(tmp_path)
    head = path.read_text()
    block = tuned_block({"coat": {"umf": {"dense_lr": 0.0123456, "epochs": 7}}}, "why\nhow")
    write_tuned_defaults(path, block)
    text = path.read_text()
    assert text.startswith(head.rstrip("\n")) and TUNED_MARKER in text and "# how\n" in text
    params = load_params(path)
    assert params.datasets["coat"]["umf"] == {"dense_lr": 0.01235, "epochs": 7}
    # Written again: the old block is replaced, not appended to.
    write_tuned_defaults(path, tuned_block({"coat": {"umf": {"epochs": 9}}}, "again"))
    assert load_params(path).datasets["coat"]["umf"] == {"epochs": 9}
    assert path.read_text().count(TUNED_MARKER) == 1
    before = path.read_text()
    with pytest.raises(ConfigError, match="datasets.coat.umf.nosuch"):
        write_tuned_defaults(path, tuned_block({"coat": {"umf": {"nosuch": 1}}}, "bad"))
    assert path.read_text() == before  # nothing half-written
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".params")] == []


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store.configure(store.default_tracking_uri(tmp_path), tmp_path)
    yield tmp_path
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_a_study_logs_every_trial_and_is_reused(mlflow_store):
    root = mlflow_store
    write_processed(root, "coat")
    poison_test_split(root / "processed" / "coat" / "dataset.npz")  # tuning still runs
    params_path = write_params(root)
    arguments = {"dataset": "coat", "method": "umf", "n_trials": None}
    chosen = run_study(**arguments, params_path=params_path, repo=root, log=lambda _: None)
    assert set(chosen) == {"weight_decay", "dense_lr", "epochs"}
    assert 1 <= chosen["epochs"] <= 4
    client = MlflowClient()
    experiment = client.get_experiment_by_name("ubo-tuning").experiment_id
    runs = client.search_runs([experiment])
    studies = [r for r in runs if r.data.tags[TAG_KIND] == "study"]
    trials = [r for r in runs if r.data.tags[TAG_KIND] == "trial"]
    assert len(studies) == 1 and len(trials) == 3  # tuning.trials.coat
    study = studies[0]
    assert json.loads(study.data.tags[TAG_CHOSEN]) == chosen
    assert all(t.data.tags[run_identity.PARENT_TAG] == study.info.run_id for t in trials)
    completed = [t for t in trials if t.data.tags["ubo.trial_state"] == "complete"]
    score = store.to_mlflow_key(OBJECTIVE)
    top = max(t.data.metrics[score] for t in completed)
    best = [t for t in completed if t.data.metrics[score] == top]  # ties: Optuna's first
    best = min(best, key=lambda t: t.info.start_time)
    assert float(best.data.params["dense_lr"]) == chosen["dense_lr"]
    curve = client.get_metric_history(best.info.run_id, "val/hyper_snips_dcg_at_3")
    assert [m.step for m in curve] == [1, 2, 3, 4]
    assert latest_choices(experiment) == {"coat": {"umf": chosen}}
    # Trial 0 is the untuned configuration: dense_lr 0.01 (train default, the range's low
    # end) and weight decay 0 moved to the log range's low end.
    (first,) = [t for t in trials if t.info.run_name == "coat/umf/trial0"]
    assert first.data.params == {"dense_lr": "0.01", "weight_decay": "1e-06"}
    # The same study again: reused, no new trial.
    assert run_study(**arguments, params_path=params_path, repo=root, log=lambda _: None) == chosen
    assert len(client.search_runs([experiment])) == len(runs)


def test_default_values_are_the_untuned_config_clipped_into_the_space(tmp_path):
    path = write_params(tmp_path)
    params_file.add_sections(path, "methods:\n  cjmf: {n_models: 4}\n")
    params = load_params(path)
    assert default_values(params, "umf", knobs(params, "umf")) == {
        "weight_decay": 1e-6,
        "dense_lr": 0.01,
    }
    assert default_values(params, "cjmf", knobs(params, "cjmf")) == {"n_models": 2}


def test_a_trial_starts_from_the_untuned_defaults(tmp_path):
    """Values an earlier search wrote (`datasets:`) must not constrain the next one."""
    write_processed(tmp_path, "coat")
    path = write_params(tmp_path)
    params_file.add_sections(path, "datasets:\n  coat:\n    umf: {epochs: 1, dense_lr: 0.5}\n")
    params = load_params(path)
    data = FeedbackData.load(tmp_path / "processed" / "coat" / "dataset.npz", with_test=False)
    outcome = run_trial(data, params, "coat", "umf", {"dense_lr": 0.05}, seed=0)
    assert [epoch for epoch, _ in outcome.curve] == [1, 2, 3, 4]  # train.epochs, not 1


def test_semisynthetic_truth_behind_the_test_labels_is_not_loaded_either(tmp_path):
    write_processed(tmp_path, "ml100k", semisynthetic=True)
    path = tmp_path / "processed" / "ml100k" / "dataset.npz"
    data = FeedbackData.load(path, with_test=False)
    assert data.true_relevance is None and data.true_exposure is not None  # PCC still works
    assert FeedbackData.load(path).true_relevance is not None


def test_the_tuned_block_must_end_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("datasets:\n  coat: {}\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="section\\(s\\) \\['train'\\] follow it"):
        write_tuned_defaults(path, tuned_block({"coat": {"umf": {"epochs": 2}}}, "x"))
    assert path.read_text() == "datasets:\n  coat: {}\ntrain:\n  epochs: 3\n"


def test_tuning_overrides_that_change_results_are_refused(mlflow_store):
    write_processed(mlflow_store, "coat")
    params_path = write_params(mlflow_store)
    with pytest.raises(
        UboError, match="may only set \\['device', 'threads'\\]; got \\['epochs'\\]"
    ):
        run_study(
            dataset="coat",
            method="umf",
            n_trials=1,
            params_path=params_path,
            repo=mlflow_store,
            overrides={"epochs": 2, "threads": 1},
            log=lambda _: None,
        )


def test_apply_takes_the_study_a_tune_run_used_last(mlflow_store):
    """Space A, then B, then A again (reused, not retrained): A's values are the ones chosen."""
    write_processed(mlflow_store, "coat")
    space_a = SPACE
    space_b = SPACE.replace("high: 0.1, log: true}", "high: 0.2, log: true}")
    results = []
    for space in (space_a, space_b, space_a):
        params_path = write_params(mlflow_store, space)
        results.append(
            run_study(
                dataset="coat",
                method="umf",
                n_trials=2,
                params_path=params_path,
                repo=mlflow_store,
                log=lambda _: None,
            )
        )
    assert results[0] == results[2] != results[1]
    experiment = MlflowClient().get_experiment_by_name("ubo-tuning").experiment_id
    assert latest_choices(experiment) == {"coat": {"umf": results[0]}}


def test_the_unexposed_test_lists_are_not_loaded_for_tuning(tmp_path):
    write_processed(tmp_path, "ml100k", semisynthetic=True)
    path = tmp_path / "processed" / "ml100k" / "dataset.npz"
    full = FeedbackData.load(path)
    assert full.unexposed_test_user is not None  # the builder wrote them
    tuning = FeedbackData.load(path, with_test=False)
    assert tuning.unexposed_test_user is None and tuning.unexposed_test_label is None


def test_apply_keeps_the_pairs_the_store_did_not_tune(tmp_path):
    """A partial re-tune (one data set's methods, or a fresh store) replaces only its pairs."""
    path = write_params(tmp_path)
    params_file.add_sections(
        path,
        "datasets:\n  coat:\n    umf: {epochs: 5}\n    bpr: {epochs: 6}\n"
        + "  yahoo:\n    umf: {epochs: 7}\n",
    )
    merged, kept = merged_choices(
        load_params(path), {"coat": {"umf": {"epochs": 2}}, "ml100k": {"ubo": {"epochs": 3}}}
    )
    assert merged == {
        "coat": {"umf": {"epochs": 2}, "bpr": {"epochs": 6}},
        "yahoo": {"umf": {"epochs": 7}},
        "ml100k": {"ubo": {"epochs": 3}},
    }
    assert kept == ["coat/bpr", "yahoo/umf"]


def test_apply_for_some_data_sets_takes_only_their_studies(tmp_path, monkeypatch, capsys):
    """`flows.tune show|apply --datasets ...`: a re-tune of some data sets leaves the other
    data sets' pairs as params.yaml has them, even where the store holds later studies (a
    hand-kept choice stays)."""
    from flows import tune as tune_cli

    path = write_params(tmp_path)
    params_file.add_sections(path, "datasets:\n  coat:\n    umf: {epochs: 5}\n")
    monkeypatch.setattr(tune_cli.store, "configure", lambda *args: None)
    monkeypatch.setattr(tune_cli.store, "get_experiment_id", lambda *args: "0")
    store = {"coat": {"umf": {"epochs": 2}}, "ml100k": {"umf": {"epochs": 3}}}
    monkeypatch.setattr(tune_cli, "latest_choices", lambda experiment_id: store)
    argv = ["show", "--params", str(path), "--datasets", "ml100k"]
    assert tune_cli.main(argv) == 0
    block = yaml.safe_load(capsys.readouterr().out)["datasets"]
    assert block == {"coat": {"umf": {"epochs": 5}}, "ml100k": {"umf": {"epochs": 3}}}
