"""The real stages on the real Coat files, when the raw-data mirror is on this machine.

Skipped with a reason otherwise (CI has the mirror beside the checkout, ../shared/datasets).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from params_file import write_params

from ubo_core.data import FeedbackData
from ubo_core.metrics import RankingTask, expected_random_dcg, ranking_metrics
from ubo_core.stages import main

REPO = Path(__file__).resolve().parents[1]


def find_mirror() -> Path | None:
    configured = os.environ.get("UBO_DATA_MIRROR")
    candidates = [Path(configured)] if configured else []
    candidates.append(REPO.parent / "shared" / "datasets")
    return next((c.resolve() for c in candidates if (c / "coat" / "train.ascii").is_file()), None)


MIRROR = find_mirror()
pytestmark = [
    pytest.mark.mirror,
    pytest.mark.skipif(
        MIRROR is None, reason="raw data mirror not found (set UBO_DATA_MIRROR or ../shared)"
    ),
]


@pytest.fixture(scope="module")
def coat(tmp_path_factory) -> FeedbackData:
    root = tmp_path_factory.mktemp("coat")
    params = root / "params.yaml"
    write_params(
        params,
        "data:\n"
        f"  raw_dir: {root / 'raw'}\n  interim_dir: {root / 'interim'}\n"
        f"  processed_dir: {root / 'processed'}\n  manual_dir: {root / 'manual'}\n",
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("UBO_DATA_MIRROR", str(MIRROR))
        for stage in ("download", "prepare", "validation"):
            assert main([stage, "coat", "--params", str(params)]) == 0
    return FeedbackData.load(root / "processed" / "coat" / "dataset.npz")


def test_coat_counts_match_the_published_data(coat):
    counts = coat.counts()
    assert (coat.n_users, coat.n_items) == (290, 300)
    assert counts["n_test_ratings"] == 4640
    assert counts["n_eval_users"] == 237
    # 6,960 training ratings minus the held-out validation and hyper-validation pairs.
    removed = np.isin(
        coat.excluded_user.astype(np.int64) * 300 + coat.excluded_item,
        coat.train_user.astype(np.int64) * 300 + coat.train_item,
    )
    assert not removed.any()
    assert counts["n_val_users"] == 58  # 20% of 290 users


def test_expected_random_dcg3_on_coat_is_0_4833(coat):
    task = RankingTask.from_pairs(coat.test_user, coat.test_item, coat.test_label, coat.eval_users)
    assert task.n_users == 237
    closed_form = expected_random_dcg(task, 3)
    assert round(closed_form, 4) == 0.4833
    # The same number from the metric code itself: random scores, averaged over draws.
    rng = np.random.default_rng(0)
    draws = [
        ranking_metrics(rng.random(task.item_ids.shape), task, ks=(3,))["dcg@3"] for _ in range(400)
    ]
    standard_error = np.std(draws) / np.sqrt(len(draws))
    assert abs(np.mean(draws) - closed_form) < 4 * standard_error


def test_dvc_repro_builds_coat_and_second_repro_does_nothing(tmp_path):
    """The real dvc.yaml: build Coat, repro again (nothing to do), change one validation knob
    (only the validation stage re-runs)."""
    work = tmp_path / "repo"
    work.mkdir()
    for name in ("dvc.yaml", "params.yaml", "pyproject.toml"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(
        REPO / "ubo_core", work / "ubo_core", ignore=shutil.ignore_patterns("__pycache__")
    )
    (work / "data" / "manual" / "coat").mkdir(parents=True)
    shutil.copy(REPO / "data/manual/coat/README.md", work / "data/manual/coat/README.md")
    env = os.environ | {
        "UBO_DATA_MIRROR": str(MIRROR),
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    dvc = [sys.executable, "-m", "dvc"]

    def run(*args: str) -> str:
        done = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    first = run(*dvc, "repro", "validation@coat")
    assert "Running stage 'download@coat'" in first
    assert "Running stage 'validation@coat'" in first
    assert (work / "data" / "processed" / "coat" / "summary.json").is_file()
    second = run(*dvc, "repro", "validation@coat")
    assert "Running stage" not in second
    params = (work / "params.yaml").read_text()
    (work / "params.yaml").write_text(params.replace("  seed: 0\n", "  seed: 1\n", 1))
    third = run(*dvc, "repro", "validation@coat")
    assert "Running stage 'validation@coat'" in third
    assert "Running stage 'prepare@coat'" not in third
    assert "Running stage 'download@coat'" not in third
    # A stage that fails keeps its last good output in data/ (issue 14, fault 9): DVC would
    # delete it before running the stage, but every output is `persist: true` and written
    # atomically.
    output = work / "data" / "processed" / "coat" / "dataset.npz"
    good = output.read_bytes()
    text = (work / "params.yaml").read_text()
    (work / "params.yaml").write_text(
        text.replace("  active_user_fraction: 0.2", "  active_user_fraction: 2", 1)
    )
    failed = subprocess.run(
        [*dvc, "repro", "validation@coat"], cwd=work, env=env, capture_output=True, text=True
    )
    assert failed.returncode != 0
    assert "validation.active_user_fraction: 2.0 is out of range" in failed.stdout + failed.stderr
    assert output.read_bytes() == good
    (work / "params.yaml").write_text(text)
    assert "Running stage" not in run(*dvc, "repro", "validation@coat")  # still up to date
