"""flows/store.py, run_identity.py, tracked_run.py, study.py: MLflow logging, de-duplication,
reloading and aggregation of runs.

Everything runs on CPU against a throwaway sqlite store in a temporary directory (never the
repo's own mlflow.db). The store is module-scoped because MLflow migrates a new sqlite
database on first use (seconds); tests stay independent by each using its own experiment.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType
from params_file import write_params

from flows import run_identity, study, tracked_run
from flows.run_identity import code_version, data_version, flatten, git_commit, run_key
from flows.store import configure, default_tracking_uri, get_experiment_id, to_mlflow_key
from flows.study import aggregate, log_aggregate, to_markdown
from flows.tracked_run import (
    FINAL_METRICS,
    TEST_METRICS,
    UNEXPOSED_TEST_METRICS,
    load_model,
    train_and_log,
)
from ubo_core.config import Params, load_params
from ubo_core.data import FeedbackData
from ubo_core.datasets.semisynthetic import unexposed_test_lists
from ubo_core.datasets.validation import build_validation_sets
from ubo_core.errors import DataError
from ubo_core.methods import METHODS
from ubo_core.methods.umf import UMF
from ubo_core.trainer import evaluate_test, pair_exposure

EPOCHS = 2
OVERRIDES = {"epochs": EPOCHS, "device": "cpu", "lr": 0.05}


def write_processed(root: Path, dataset: str, semisynthetic: bool = False) -> None:
    """A 30 x 12 processed data set in root/processed/<dataset>/ (users like the items of
    their group), shared by the tracking, CLI, flow and UI tests; with true relevance/exposure
    if asked."""
    rng = np.random.default_rng(0)
    n_users, n_items = 30, 12
    group_u, group_i = np.arange(n_users) % 2, np.arange(n_items) % 2
    likes = group_u[:, None] == group_i[None, :]
    rated = rng.random((n_users, n_items)) < 0.6
    user, item = np.nonzero(rated)
    test_items = np.stack([rng.choice(n_items, 4, replace=False) for _ in range(n_users)])
    test_user = np.repeat(np.arange(n_users), 4)
    test_item = np.sort(test_items, axis=1).ravel()
    truth = {}
    if semisynthetic:
        truth = {
            "true_relevance": np.where(likes, 0.8, 0.2),
            "true_exposure": rng.uniform(0.05, 0.95, (n_users, n_items)),
            # The second test protocol: liked but unrated items against the others.
            **unexposed_test_lists(likes, rated, 3, np.random.default_rng(1)),
        }
    data = FeedbackData(
        n_users,
        n_items,
        user.astype(np.int32),
        item.astype(np.int32),
        likes[user, item].astype(np.int8),
        test_user.astype(np.int32),
        test_item.astype(np.int32),
        likes[test_user, test_item].astype(np.int8),
        np.arange(n_users, dtype=np.int32),
        **truth,
    )
    data = build_validation_sets(data, Params().validation)
    data.save(root / "processed" / dataset / "dataset.npz")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Iterator[Path]:
    """A repo-like directory: processed data (coat; ml100k semi-synthetic), params.yaml, and
    the throwaway MLflow store sqlite:///<root>/mlflow.db with artifacts under <root>."""
    root = tmp_path_factory.mktemp("tracking")
    write_processed(root, "coat")
    write_processed(root, "ml100k", semisynthetic=True)
    write_params(root / "params.yaml", f"data:\n  processed_dir: {root / 'processed'}\n")
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield root
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI (for subprocesses): undo both
    # so that later test modules do not write into this store.
    mlflow.set_tracking_uri(None)
    if before is not None:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(autouse=True)
def mlflow_state(store, monkeypatch):
    """Every test starts and ends pointed at the throwaway store with no active run."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(default_tracking_uri(store))
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(default_tracking_uri(store))


def train(store: Path, experiment: str, **kwargs) -> tracked_run.ChildRun:
    arguments = {
        "dataset": "coat",
        "method": "umf",
        "seed": 0,
        "overrides": OVERRIDES,
        "params_path": store / "params.yaml",
        "repo": store,
        "experiment": experiment,
        "parent_run_id": None,
    }
    return train_and_log(**(arguments | kwargs))


def runs_of(experiment: str, view: int = ViewType.ACTIVE_ONLY) -> list:
    experiment_id = MlflowClient().get_experiment_by_name(experiment).experiment_id
    return MlflowClient().search_runs([experiment_id], run_view_type=view)


def artifact_paths(run_id: str, path: str | None = None) -> set[str]:
    return {info.path for info in MlflowClient().list_artifacts(run_id, path)}


# -- 1. one run, everything logged -----------------------------------------------------------
def test_train_and_log_logs_params_tags_curves_metrics_and_artifacts(store):
    child = train(store, "logs")
    assert not child.skipped
    run = MlflowClient().get_run(child.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "coat/umf/seed0"

    params = run.data.params
    assert params["dataset"] == "coat" and params["method"] == "umf" and params["seed"] == "0"
    assert params["train.epochs"] == str(EPOCHS) and params["train.lr"] == "0.05"
    assert params["train.device"] == "cpu" and "train.mode" in params

    tags = run.data.tags
    assert (tags["dataset"], tags["method"], tags["seed"], tags["device"]) == (
        "coat",
        "umf",
        "0",
        "cpu",
    )
    assert len(tags["ubo.run_key"]) == 64
    assert tags["ubo.code_version"] == "unknown"  # the store directory is not a git repo
    assert tags["ubo.data_version"].startswith("md5:")  # no dvc.lock there
    assert "mlflow.parentRunId" not in tags

    client = MlflowClient()
    for key in ("loss/train_loss", "val/val_loss", "val/hyper_snips_dcg_at_3"):
        history = client.get_metric_history(child.run_id, key)
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), key

    # Final metrics: unprefixed MLflow keys (dcg_at_1 ...), and the same values returned.
    for name in TEST_METRICS:
        assert run.data.metrics[to_mlflow_key(name)] == child.metrics[name]
    assert child.metrics["dcg@1"] == child.metrics["map@1"]  # DCG@1 = MAP@1 by definition
    assert child.metrics["wall_seconds"] > 0 and child.metrics["peak_memory_mib"] > 0
    assert "pcc" not in child.metrics  # real data: no true exposure
    # Real data: no true exposure, no second (relevant-but-unexposed) test protocol.
    assert set(child.metrics) == set(FINAL_METRICS) - {"pcc", *UNEXPOSED_TEST_METRICS}

    assert artifact_paths(child.run_id) == {"config.json", "model", "exposure", "test"}
    assert artifact_paths(child.run_id, "model") == {"model/state.pt", "model/config.json"}
    # Per-user test metrics (the report's paired tests): their means are the logged metrics.
    local = mlflow.artifacts.download_artifacts(
        run_id=child.run_id, artifact_path=tracked_run.PER_USER_PATH
    )
    with np.load(local) as per_user:
        assert per_user["user"].tolist() == list(range(30))  # eval_users: every user
        for name in TEST_METRICS:
            key = to_mlflow_key(name)
            assert per_user[key].shape == (30,)
            assert per_user[key].mean() == pytest.approx(child.metrics[name], abs=1e-12)
    assert tags["ubo.git_commit"] == "unknown"
    assert artifact_paths(child.run_id, "exposure") == {"exposure/test_exposure.npz"}
    local = mlflow.artifacts.download_artifacts(
        run_id=child.run_id, artifact_path="exposure/test_exposure.npz"
    )
    with np.load(local) as exposure:
        assert exposure["user"].shape == exposure["item"].shape == exposure["exposure"].shape
        assert exposure["user"].size == 30 * 4
        assert ((exposure["exposure"] > 0) & (exposure["exposure"] <= 1)).all()
    config = mlflow.artifacts.load_dict(f"runs:/{child.run_id}/model/config.json")
    assert config["method_class"].endswith("UMF") and config["train"]["epochs"] == EPOCHS
    assert config["hyper"] == {} and config["data_version"] == tags["ubo.data_version"]
    assert mlflow.artifacts.load_dict(f"runs:/{child.run_id}/config.json") == config


def test_semisynthetic_run_logs_the_pcc_curve_and_final_pcc(store):
    child = train(store, "pcc", dataset="ml100k", method="ubo")
    history = MlflowClient().get_metric_history(child.run_id, "pcc")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))
    final = max(history, key=lambda m: m.step).value
    assert child.metrics["pcc"] == final  # the final pcc is the curve's last point
    assert MlflowClient().get_run(child.run_id).data.metrics["pcc"] == final


def test_artifacts_of_the_default_sqlite_store_go_next_to_the_database(store):
    experiment_id = get_experiment_id("where", store)
    location = MlflowClient().get_experiment(experiment_id).artifact_location
    assert location == (store / "mlruns" / "where").as_uri()
    assert get_experiment_id("where", store) == experiment_id  # found, not created twice


def test_configure_prefers_argument_then_environment_then_default(tmp_path, monkeypatch):
    assert default_tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert configure("sqlite:////elsewhere/x.db", tmp_path) == "sqlite:////elsewhere/x.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////from/env.db")
    assert configure(None, tmp_path) == "sqlite:////from/env.db"
    assert mlflow.get_tracking_uri() == "sqlite:////from/env.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert configure(None, tmp_path) == default_tracking_uri(tmp_path)


# -- 2. de-duplication -----------------------------------------------------------------------
def test_identical_call_is_skipped_and_changes_train_new_runs(store):
    first = train(store, "dedup")
    again = train(store, "dedup")
    assert again.skipped and again.run_id == first.run_id
    assert again.metrics == first.metrics
    # device and threads do not change the result: still the same run.
    same = train(store, "dedup", overrides=OVERRIDES | {"device": "auto", "threads": 2})
    assert same.skipped and same.run_id == first.run_id
    key = MlflowClient().get_run(first.run_id).data.tags["ubo.run_key"]
    assert [r.data.tags["ubo.run_key"] for r in runs_of("dedup")].count(key) == 1

    other_lr = train(store, "dedup", overrides=OVERRIDES | {"lr": 0.02})
    other_seed = train(store, "dedup", seed=1)
    assert not other_lr.skipped and not other_seed.skipped
    assert len({first.run_id, other_lr.run_id, other_seed.run_id}) == 3
    assert len(runs_of("dedup")) == 3


# -- 3. reloading ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["umf", "ubo"])
def test_load_model_reproduces_the_logged_test_metrics(store, method):
    child = train(store, "reload", method=method)
    loaded, tensors = load_model(child.run_id)
    assert type(loaded) is METHODS[method] and tensors.device.type == "cpu"
    metrics = MlflowClient().get_run(child.run_id).data.metrics
    reproduced = evaluate_test(loaded, tensors)
    assert {name: reproduced[name] for name in TEST_METRICS} == {
        name: metrics[to_mlflow_key(name)] for name in TEST_METRICS
    }
    local = mlflow.artifacts.download_artifacts(
        run_id=child.run_id, artifact_path="exposure/test_exposure.npz"
    )
    with np.load(local) as logged:
        again = pair_exposure(loaded, logged["user"], logged["item"])
        np.testing.assert_array_equal(again, logged["exposure"])


def test_load_model_refuses_changed_data(store, tmp_path):
    child = train(store, "reload-check")
    write_processed(tmp_path, "coat", semisynthetic=True)  # other bytes, same place
    with pytest.raises(DataError, match="md5 differs"):
        load_model(child.run_id, processed_dir=tmp_path / "processed")


# -- 4. failures -----------------------------------------------------------------------------
def test_failed_run_ends_failed_and_is_replaced_by_the_next_call(store, monkeypatch):
    original = UMF.step
    calls = {"n": 0}

    def step_then_crash(self, batch):
        calls["n"] += 1
        if calls["n"] > 1:  # the tiny data set has one step per epoch: crash in epoch 2
            raise RuntimeError("worker crashed")
        return original(self, batch)

    monkeypatch.setattr(UMF, "step", step_then_crash)
    with pytest.raises(RuntimeError, match="worker crashed"):
        train(store, "crash")
    assert mlflow.active_run() is None
    (failed,) = runs_of("crash")
    assert failed.info.status == "FAILED"
    history = MlflowClient().get_metric_history(failed.info.run_id, "loss/train_loss")
    assert [m.step for m in history] == [1]  # epoch 1 was logged before the crash

    # A worker killed outright leaves its run RUNNING: make one with the same key.
    key = failed.data.tags["ubo.run_key"]
    experiment_id = failed.info.experiment_id
    stale = MlflowClient().create_run(experiment_id, tags={"ubo.run_key": key})
    monkeypatch.setattr(UMF, "step", original)
    child = train(store, "crash")
    assert not child.skipped
    (finished,) = runs_of("crash")
    assert finished.info.run_id == child.run_id and finished.info.status == "FINISHED"
    deleted = {r.info.run_id for r in runs_of("crash", ViewType.DELETED_ONLY)}
    assert deleted == {failed.info.run_id, stale.info.run_id}


# -- 5. run key ------------------------------------------------------------------------------
def test_run_key_is_stable_and_changes_with_every_input():
    config = {"train": {"lr": 0.05, "epochs": 2, "device": "cpu", "threads": 0}, "hyper": {}}
    base = ("coat", "ubo", 0, config, "abc", "md5:1")
    key = run_key(*base)
    assert key == run_key(*base) and len(key) == 64
    reordered = {"hyper": {}, "train": {"threads": 0, "device": "cpu", "epochs": 2, "lr": 0.05}}
    assert run_key("coat", "ubo", 0, reordered, "abc", "md5:1") == key
    ignored = {"train": config["train"] | {"device": "cuda", "threads": 8, "eval_every": 5}}
    assert run_key("coat", "ubo", 0, config | ignored, "abc", "md5:1") == key
    changed = [
        ("yahoo", "ubo", 0, config, "abc", "md5:1"),
        ("coat", "umf", 0, config, "abc", "md5:1"),
        ("coat", "ubo", 1, config, "abc", "md5:1"),
        ("coat", "ubo", 0, {**config, "train": config["train"] | {"lr": 0.01}}, "abc", "md5:1"),
        ("coat", "ubo", 0, {**config, "hyper": {"inner_lr": 0.2}}, "abc", "md5:1"),
        ("coat", "ubo", 0, config, "abd", "md5:1"),
        ("coat", "ubo", 0, config, "abc", "md5:2"),
    ]
    keys = {run_key(*arguments) for arguments in changed}
    assert key not in keys and len(keys) == len(changed)


def test_flatten_nests_with_dots():
    assert flatten({"train": {"lr": 0.1, "x": {"y": None}}, "seed": 3}) == {
        "train.lr": "0.1",
        "train.x.y": "None",
        "seed": "3",
    }


# -- 6. versions -----------------------------------------------------------------------------
def test_data_version_uses_dvc_lock_md5_only_when_the_file_matches(tmp_path):
    write_processed(tmp_path, "coat")
    processed = tmp_path / "processed"
    actual = run_identity.file_md5(processed / "coat" / "dataset.npz")
    assert data_version(processed, "coat", tmp_path) == f"md5:{actual}"  # no dvc.lock

    def lock(md5: str) -> None:
        (tmp_path / "dvc.lock").write_text(
            "schema: '2.0'\nstages:\n  validation@coat:\n    cmd: x\n    outs:\n"
            f"    - path: data/processed/coat/dataset.npz\n      hash: md5\n      md5: {md5}\n"
        )

    lock(actual)
    assert data_version(processed, "coat", tmp_path) == actual
    lock("0" * 32)  # stale lock: the file changed since dvc repro
    assert data_version(processed, "coat", tmp_path) == f"md5:{actual}"
    with pytest.raises(DataError, match="dvc repro validation@yahoo"):
        data_version(processed, "yahoo", tmp_path)


def test_code_version_hashes_code_not_commits_plus_dirty_and_unknown_outside_git(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert code_version(tmp_path) == "unknown"
    assert git_commit(tmp_path) == "unknown"

    def git(*args: str) -> str:
        identity = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
        command = ["git", "-C", str(tmp_path), *identity, *args]
        # Identity via -c: the test machine may have no git config.
        return subprocess.run(command, check=True, capture_output=True, text=True).stdout

    write_params(tmp_path / "params.yaml", "train: {}\n")
    (tmp_path / "README.md").write_text("x\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "init")
    sha = git("rev-parse", "HEAD").strip()
    clean = code_version(tmp_path)
    assert clean.startswith("code-") and git_commit(tmp_path) == sha
    (tmp_path / "README.md").write_text("y\n")  # not code: still clean
    assert code_version(tmp_path) == clean
    git("commit", "-q", "-am", "docs only")  # a new commit, the same code
    assert code_version(tmp_path) == clean and git_commit(tmp_path) != sha
    write_params(tmp_path / "params.yaml", "train: {lr: 0.1}\n")  # config: in the run key
    assert code_version(tmp_path) == clean
    (tmp_path / "ubo_core").mkdir()
    (tmp_path / "ubo_core" / "a.py").write_text("x = 1\n")  # untracked code counts
    dirty = code_version(tmp_path)
    assert dirty.startswith(f"{clean}+dirty.") and code_version(tmp_path) == dirty
    (tmp_path / "ubo_core" / "a.py").write_text("x = 2\n")  # another uncommitted edit
    assert code_version(tmp_path).startswith(f"{clean}+dirty.")
    assert code_version(tmp_path) != dirty
    (tmp_path / "ubo_core" / "a.py").write_text("x = 1\n")
    assert code_version(tmp_path) == dirty
    git("add", ".")
    git("commit", "-q", "-m", "code")  # committed code changes the version
    committed = code_version(tmp_path)
    assert committed.startswith("code-") and committed not in (clean, dirty)
    (tmp_path / "ubo_core" / "a.py").write_text("x = 3\n")  # a tracked file edited
    assert code_version(tmp_path).startswith(f"{committed}+dirty.")


# -- 7. aggregation --------------------------------------------------------------------------
def test_aggregate_markdown_and_log_aggregate_on_the_parent(store):
    client = MlflowClient()
    experiment_id = get_experiment_id("aggregate", store)
    parent = client.create_run(experiment_id, run_name="benchmark").info.run_id
    children = {
        (method, seed): train(store, "aggregate", method=method, seed=seed, parent_run_id=parent)
        for method in ("umf", "ubo")
        for seed in (0, 1)
    }
    for child in children.values():
        assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent
    train(store, "aggregate", seed=2)  # not a child: only counted without the parent filter

    table = aggregate(experiment_id, parent)
    assert list(table["method"]) == ["umf", "ubo"]  # the registry's order (the paper's tables)
    assert list(table["n_seeds"]) == [2, 2] and set(table["dataset"]) == {"coat"}
    for _, row in table.iterrows():
        for name in TEST_METRICS:
            values = [
                client.get_run(children[row["method"], seed].run_id).data.metrics[
                    to_mlflow_key(name)
                ]
                for seed in (0, 1)
            ]
            assert row[f"{name}_mean"] == pytest.approx(np.mean(values), abs=1e-15)
            assert row[f"{name}_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-15)
        assert np.isnan(row["pcc_mean"])  # real data
    everything = aggregate(experiment_id)
    assert dict(zip(everything["method"], everything["n_seeds"], strict=True)) == {
        "ubo": 2,
        "umf": 3,
    }

    markdown = to_markdown(table)
    assert markdown.startswith("### coat\n")
    assert "| metric | umf | ubo |" in markdown and "| dcg@1 | " in markdown
    assert "±" in markdown and "| seeds | 2 | 2 |" in markdown

    log_aggregate(parent, table)
    metrics = client.get_run(parent).data.metrics
    umf = table.set_index("method").loc["umf"]
    assert metrics["coat/umf/dcg_at_1_mean"] == umf["dcg@1_mean"]
    assert metrics["coat/umf/map_at_3_std"] == umf["map@3_std"]
    assert "coat/umf/pcc_mean" not in metrics  # NaN values are left out
    assert artifact_paths(parent) == {"results.csv", "results.md"}
    text = Path(mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="results.md"))
    assert text.read_text() == markdown

    # A later benchmark that reuses a finished run counts it as its own child.
    second = client.create_run(experiment_id, run_name="benchmark-2").info.run_id
    reused = train(store, "aggregate", seed=0, parent_run_id=second)
    assert reused.skipped and reused.run_id == children["umf", 0].run_id
    single = aggregate(experiment_id, second)
    assert list(single["n_seeds"]) == [1] and np.isnan(single["dcg@1_std"].iloc[0])
    assert "±" not in to_markdown(single)


# -- 8. helpers of the benchmark flow --------------------------------------------------------
def test_parent_flow_helpers(store, monkeypatch):
    client = MlflowClient()
    experiment_id = get_experiment_id("flow", store)
    params = load_params(store / "params.yaml")

    plain = study.start_parent_run(experiment_id, ["coat"], ["umf"], [0, 1])
    assert "prefect.flow_run_id" not in client.get_run(plain).data.tags  # not in a flow run
    study.end_parent_run(plain, ["coat/umf/seed1 (Crashed)"])
    ended = client.get_run(plain)
    assert ended.info.status == "FAILED"
    assert ended.data.tags["ubo.failed_children"] == "coat/umf/seed1 (Crashed)"

    monkeypatch.setattr(study, "_prefect_flow_run_id", lambda: "flow-run-1")
    parent = study.start_parent_run(
        experiment_id, ["coat"], ["umf"], [0, 1], {"epochs": EPOCHS}, {"umf": {"lr": 0.05}}
    )
    run = client.get_run(parent)
    assert run.info.status == "RUNNING" and run.data.tags["ubo.role"] == "parent"
    assert run.data.params["seeds"] == "0,1" and run.data.params["overrides.epochs"] == "2"
    assert run.data.params["method_overrides.umf.lr"] == "0.05"

    def finished(seed: int) -> str | None:
        return tracked_run.finished_run_for(
            params, store, experiment_id, "coat", "umf", seed, OVERRIDES
        )

    assert finished(0) is None
    first = train(store, "flow", seed=0)  # e.g. a child whose result the flow did not get back
    assert finished(0) == first.run_id and finished(1) is None
    second = train(store, "flow", seed=1, parent_run_id=parent)

    table = study.aggregate_runs(experiment_id, [first.run_id], parent)
    assert list(table["n_seeds"]) == [2]
    assert study.results_for_flow_run("flow-run-1", store) is None  # nothing logged yet
    log_aggregate(parent, table)
    study.end_parent_run(parent, [])
    assert client.get_run(parent).info.status == "FINISHED"
    assert study.results_for_flow_run("flow-run-1", store) == to_markdown(table)
    assert study.results_for_flow_run("no-such-flow-run", store) is None
    assert second.run_id in {r.info.run_id for r in runs_of("flow")}
