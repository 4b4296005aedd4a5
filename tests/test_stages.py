"""The stage command line: thin, strict, atomic. Runs on tiny files the test writes."""

import errno
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from params_file import write_params

from ubo_core.data import FeedbackData
from ubo_core.datasets.real import COAT_SHAPE
from ubo_core.stages import main


def make_params(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "params.yaml"
    write_params(
        path,
        "data:\n"
        f"  raw_dir: {tmp_path / 'raw'}\n"
        f"  interim_dir: {tmp_path / 'interim'}\n"
        f"  processed_dir: {tmp_path / 'processed'}\n"
        f"  manual_dir: {tmp_path / 'manual'}\n" + extra,
    )
    return path


def write_fake_coat(folder: Path, seed: int = 0) -> None:
    """Coat-shaped matrices (290 x 300): 24 train and 16 test ratings per user, like Coat."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for name, per_user in (("train.ascii", 24), ("test.ascii", 16)):
        matrix = np.zeros(COAT_SHAPE, int)
        for user in range(COAT_SHAPE[0]):
            items = rng.choice(COAT_SHAPE[1], per_user, replace=False)
            matrix[user, items] = rng.integers(1, 6, per_user)
        text = "\r\n".join(" ".join(map(str, row)) for row in matrix) + "\r\n"
        (folder / name).write_text(text)


def test_preprocess_then_validation_writes_dataset_and_summary(tmp_path, capsys):
    params = make_params(tmp_path)
    write_fake_coat(tmp_path / "raw" / "coat")
    assert main(["prepare", "coat", "--params", str(params)]) == 0
    assert main(["validation", "coat", "--params", str(params)]) == 0
    data = FeedbackData.load(tmp_path / "processed" / "coat" / "dataset.npz")
    # 24 training ratings per user; n_train_ratings in the summary is the source's count.
    assert (data.n_users, data.n_items) == COAT_SHAPE
    assert data.has_validation
    capsys.readouterr()
    assert main(["summary", "coat", "yahoo", "--params", str(params)]) == 0
    table = capsys.readouterr().out
    assert "6,960" in table  # 290 users x 24 ratings
    assert "4,640" in table  # 290 users x 16 ratings
    assert "not built yet: yahoo" in table
    # Nothing but the outputs: no temporary left beside them.
    assert sorted(p.name for p in (tmp_path / "processed" / "coat").iterdir()) == [
        "dataset.npz",
        "summary.json",
    ]


def test_malformed_row_stops_with_file_and_line_and_writes_nothing(tmp_path, capsys):
    params = make_params(tmp_path)
    write_fake_coat(tmp_path / "raw" / "coat")
    train = tmp_path / "raw" / "coat" / "train.ascii"
    lines = train.read_text().splitlines()
    lines[4] = lines[4].replace("0", "x", 1)
    train.write_text("\n".join(lines) + "\n")
    assert main(["prepare", "coat", "--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {train}: line 5: non-integer")
    assert err.count("\n") == 1  # one line, no traceback
    assert not (tmp_path / "interim").exists() or not any((tmp_path / "interim").rglob("*"))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["prepare", "movielens"],
            "error: dataset argument: unknown data set 'movielens'; expected one of params.yaml's",
        ),
        (["validation", "coat"], "not found; run `dvc repro prepare@coat` first"),
        (["prepare", "coat"], "raw data missing; run `dvc repro download@coat` first"),
    ],
)
def test_bad_invocations_exit_1_with_one_clear_line(tmp_path, capsys, argv, expected):
    params = make_params(tmp_path)
    assert main([*argv, "--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert expected in err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_bad_params_file_names_the_key(tmp_path, capsys):
    params = make_params(tmp_path, "validation:\n  active_user_fraction: 2\n")
    assert main(["validation", "coat", "--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert "validation.active_user_fraction: 2.0 is out of range" in err


def test_yahoo_missing_says_which_files_and_where(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("UBO_DATA_MIRROR", raising=False)
    params = make_params(tmp_path)
    assert main(["download", "yahoo", "--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert "ydata-ymusic-rating-study-v1_0-train.txt" in err
    assert "ydata-ymusic-rating-study-v1_0-test.txt" in err
    assert str(tmp_path / "manual" / "yahoo") in err
    assert "Webscope" in err
    assert not (tmp_path / "raw" / "yahoo").exists()


@pytest.mark.parametrize(
    ("code", "words"), [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only")]
)
def test_a_full_disk_or_read_only_folder_is_one_line_naming_the_output(
    tmp_path, capsys, monkeypatch, code, words
):
    """Fault 7: a disk or folder fault while a stage writes its output was a long traceback
    naming no path. The output (and the one before it) is left whole."""
    params = make_params(tmp_path)
    write_fake_coat(tmp_path / "raw" / "coat")
    assert main(["prepare", "coat", "--params", str(params)]) == 0
    before = (tmp_path / "interim" / "coat" / "dataset.npz").read_bytes()
    real_writestr = zipfile.ZipFile.writestr

    def failing_writestr(self, *args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(zipfile.ZipFile, "writestr", failing_writestr)
    assert main(["prepare", "coat", "--params", str(params)]) == 1
    err = capsys.readouterr().err
    target = tmp_path / "interim" / "coat" / "dataset.npz"
    assert err.startswith(f"error: {target}: cannot write (") and words in err, err
    assert err.count("\n") == 1
    monkeypatch.setattr(zipfile.ZipFile, "writestr", real_writestr)
    assert target.read_bytes() == before  # the last good output stays
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []


def test_the_stage_command_holds_mkl_to_one_code_path(tmp_path):
    """The semi-synthetic fits' rounding follows MKL's code path, which MKL picks by CPU: the
    same seed wrote other Amazon CDs bytes on another CPU type. The command holds MKL to its
    CPU-independent path (`REPRODUCIBLE_BLAS`); MKL_VERBOSE prints each BLAS call's mode."""
    params = make_params(
        tmp_path,
        "catalog:\n  amazon_cds: {n_items: 20, min_user_interactions: 2}\n"
        "semisynthetic: {fit_steps: 3}\n",
    )
    rng = np.random.default_rng(0)
    folder = tmp_path / "raw" / "amazon_cds"
    folder.mkdir(parents=True)
    pairs = np.unique(np.stack([rng.integers(0, 60, 600), rng.integers(0, 40, 600)], 1), axis=0)
    rows = "".join(f"u{u}\ti{i}\n" for u, i in pairs)
    (folder / "cds_interactions.tsv").write_text("user\titem\n" + rows)
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"} | {"MKL_VERBOSE": "1"}
    command = [sys.executable, "-m", "ubo_core.stages", "prepare", "amazon_cds"]
    done = subprocess.run(
        [*command, "--params", str(params)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    calls = [line for line in done.stdout.splitlines() if line.startswith("MKL_VERBOSE D")]
    if not calls:
        pytest.skip("this torch calls no MKL BLAS (no MKL_VERBOSE lines)")
    assert all(" CNR:COMPATIBLE " in line for line in calls), calls[0]
