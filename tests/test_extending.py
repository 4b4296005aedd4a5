"""docs/EXTENDING.md, followed to the letter: its method (built from the guide's own code
blocks) and its data sets (CSV files plus one catalog entry each, built by the real
`dvc repro`) train and evaluate."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from params_file import write_params
from planted import planted_feedback

from ubo_core.config import Params
from ubo_core.engine import TrainingTensors
from ubo_core.methods import METHODS, resolve_config
from ubo_core.metrics import expected_random_dcg
from ubo_core.trainer import fit

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "EXTENDING.md"


def guide_block(first_line: str) -> str:
    """The guide's fenced code block that starts with `first_line`."""
    blocks = re.findall(r"```(?:python|yaml)?\n(.*?)```", GUIDE.read_text(), flags=re.S)
    matches = [b for b in blocks if b.startswith(first_line)]
    assert len(matches) == 1, f"{GUIDE} has no single block starting {first_line!r}"
    return matches[0]


@pytest.fixture
def naive_registered(tmp_path, monkeypatch):
    """Step 1 (the module, from the guide's block) and step 2 (its registry line)."""
    path = tmp_path / "naive.py"
    path.write_text(guide_block("# ubo_core/methods/naive.py"))
    spec = importlib.util.spec_from_file_location("ubo_core.methods.naive", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "ubo_core.methods.naive", module)
    spec.loader.exec_module(module)
    monkeypatch.setitem(METHODS, "naive", module.Naive)
    return module.Naive


def test_the_guides_method_trains_and_evaluates_in_both_modes(naive_registered):
    data, _, _ = planted_feedback()
    random_dcg = expected_random_dcg(TrainingTensors(data, "cpu").test_task, 3)
    for mode in ("paper", "dense"):
        overrides = {"mode": mode, "epochs": 20, "lr": 0.05, "dense_lr": 0.05, "threads": 1}
        train, hyper = resolve_config(Params(), "coat", "naive", overrides)
        result = fit("naive", data, train, hyper, seed=0, progress=False)
        assert result.test_metrics["dcg@3"] > random_dcg + 0.2, mode
    assert naive_registered.display == "Naive"  # tables and figures call it by its class


def test_the_guides_method_test_passes():
    """Step 3: the guide's own test of the method runs and passes."""
    namespace: dict = {}
    exec(guide_block("# tests/test_naive.py"), namespace)  # noqa: S102 (our own docs)
    namespace["test_naive_loss_is_log_loss"]()


def test_the_guides_catalog_example_is_a_valid_catalog(tmp_path):
    block = guide_block("catalog:\n")
    catalog = yaml.safe_load(block.replace("  ...\n", ""))["catalog"]
    path = tmp_path / "params.yaml"
    write_params(path, yaml.safe_dump({"catalog": catalog}))
    from ubo_core.config import load_params
    from ubo_core.datasets.registry import datasets

    kinds = {name: d.kind for name, d in datasets(load_params(path)).items()}
    assert kinds == {
        "coat": "real",
        "yahoo": "real",
        "shop": "real",
        "shop_clicks": "semisynthetic",
    }


# -- a data set in two files, through the real dvc.yaml -------------------------------------
def write_shop(folder: Path, seed: int = 0) -> None:
    """A tiny shop: 60 users, 30 items in two taste groups; users rate about 12 items they
    chose (popularity-biased), 1..5 stars (4-5 when the groups match, mostly); the test file
    holds 8 items per user drawn at random (random exposure), rated the same way."""
    rng = np.random.default_rng(seed)
    n_users, n_items = 60, 30
    likes = (np.arange(n_users)[:, None] % 2) == (np.arange(n_items)[None, :] % 2)

    def stars(u: int, i: int) -> int:
        return (
            int(rng.integers(4, 6))
            if likes[u, i] == (rng.random() < 0.9)
            else int(rng.integers(1, 4))
        )

    popularity = np.linspace(1.0, 6.0, n_items)
    train_rows, test_rows = ["user,item,rating,timestamp"], ["user,item,rating"]
    for u in range(n_users):
        chosen = rng.choice(n_items, 12, replace=False, p=popularity / popularity.sum())
        train_rows += [
            f"u{u},item{i},{stars(u, i)},{1_700_000_000 + 60 * k}" for k, i in enumerate(chosen)
        ]
        test_rows += [f"u{u},item{i},{stars(u, i)}" for i in rng.choice(n_items, 8, replace=False)]
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text("\n".join(train_rows) + "\n")
    (folder / "test.csv").write_text("\n".join(test_rows) + "\n")
    # The same choices as a click log without labels: a semi-synthetic source.
    clicks = ["user,item"] + [
        row.split(",", 2)[0] + "," + row.split(",", 2)[1] for row in train_rows[1:]
    ]
    (folder.parent / "shop_clicks").mkdir()
    (folder.parent / "shop_clicks" / "clicks.csv").write_text("\n".join(clicks) + "\n")


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    """A git + DVC checkout of the repository's pipeline with the guide's two data sets."""
    work = tmp_path_factory.mktemp("repo")
    for name in ("dvc.yaml", "params.yaml", "pyproject.toml"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(
        REPO / "ubo_core", work / "ubo_core", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(REPO / "data" / "manual", work / "data" / "manual")
    write_shop(work / "data" / "manual" / "shop")
    params = (work / "params.yaml").read_text()
    entries = (
        "  shop: {display: My shop, train: train.csv, test: test.csv}\n"
        "  shop_clicks: {train: clicks.csv, n_items: 25}\n"
    )
    params = params.replace("\npreprocess:", entries + "\npreprocess:", 1)
    (work / "params.yaml").write_text(params)
    return work


def run(work: Path, *args: str) -> str:
    env = os.environ | {
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    done = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def built(repo_copy) -> Path:
    run(repo_copy, "git", "init", "-q")
    run(repo_copy, sys.executable, "-m", "dvc", "init", "-q")
    out = run(
        repo_copy, sys.executable, "-m", "dvc", "repro", "validation@shop", "validation@shop_clicks"
    )
    for stage in ("download", "prepare", "validation"):
        for name in ("shop", "shop_clicks"):
            assert f"Running stage '{stage}@{name}'" in out
    assert "coat" not in out  # only what was asked for
    return repo_copy


@pytest.mark.parametrize(("name", "semisynthetic"), [("shop", False), ("shop_clicks", True)])
def test_a_csv_data_set_runs_through_dvc_repro_and_one_training_run(built, name, semisynthetic):
    summary = json.loads((built / "data" / "processed" / name / "summary.json").read_text())
    assert summary["n_eval_users"] > 0 and summary["n_val_pairs"] > 0
    out = run(
        built,
        sys.executable,
        "-m",
        "ubo_core.train",
        "--dataset",
        name,
        "--method",
        "ubo",
        "--epochs",
        "3",
        "--set",
        "threads=1",
        "--no-progress",
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["dataset"] == name and 0.0 < result["dcg@3"]
    assert ("pcc" in result) == semisynthetic  # ground truth only where it was generated
    if not semisynthetic:
        # every user and item of the files, ids mapped over both files
        assert summary["n_users"] == 60 and summary["n_items"] == 30


def test_a_second_repro_does_nothing_and_a_changed_csv_reruns_its_stages(built):
    out = run(built, sys.executable, "-m", "dvc", "repro", "validation@shop")
    assert "Running stage" not in out
    test = built / "data" / "manual" / "shop" / "test.csv"
    test.write_text(test.read_text() + "u0,item_new,5\n")
    out = run(built, sys.executable, "-m", "dvc", "repro", "validation@shop")
    assert "Running stage 'download@shop'" in out and "Running stage 'prepare@shop'" in out


def test_a_bad_csv_stops_the_stage_with_one_line_naming_file_and_line(built):
    bad = built / "data" / "manual" / "shop" / "train.csv"
    good = bad.read_text()
    try:
        bad.write_text(good + "u1,item3,seven,1\n")
        env = os.environ | {
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        }
        done = subprocess.run(
            [sys.executable, "-m", "ubo_core.stages", "download", "shop"],
            cwd=built,
            env=env,
            capture_output=True,
            text=True,
        )
        line = good.count("\n") + 1
        assert done.returncode == 1
        assert done.stderr == (
            f"error: data/manual/shop/train.csv: line {line}: rating 'seven', "
            "expected a number in 1..5\n"
        )
    finally:
        bad.write_text(good)
