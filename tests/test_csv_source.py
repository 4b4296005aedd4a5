"""Your own CSV data (ubo_core/datasets/csv_source.py): ids, labels, and one clear line per
bad input naming the file and line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ubo_core.datasets.csv_source import read_csv_real, read_csv_source
from ubo_core.errors import DataError


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_real_ids_are_mapped_over_both_files_in_sorted_order(tmp_path):
    write(tmp_path, "train.csv", "user,item,rating\nbob,x,5\nann,y,2\n")
    write(tmp_path, "test.csv", "user,item,click\ncy,z,1\nann,x,0\n")
    raw = read_csv_real(tmp_path, "train.csv", "test.csv")
    # users ann 0, bob 1, cy 2; items x 0, y 1, z 2 (the test's cy and z count too)
    assert raw.shape == (3, 3)
    np.testing.assert_array_equal(raw.train.user, [1, 0])
    np.testing.assert_array_equal(raw.train.item, [0, 1])
    np.testing.assert_array_equal(raw.train.labels(positive_threshold=4), [1, 0])
    np.testing.assert_array_equal(raw.test.user, [2, 0])
    np.testing.assert_array_equal(raw.test.labels(positive_threshold=4), [1, 0])


def test_spaces_around_fields_do_not_make_new_ids(tmp_path):
    write(tmp_path, "train.csv", "user, item, rating\nu1, x, 5\nu1,y ,1\n u2,x,4\n")
    source = read_csv_source(tmp_path, "train.csv")
    assert source.shape == (2, 2)
    np.testing.assert_array_equal(source.item, [0, 1, 0])


def test_without_a_label_column_every_training_row_is_a_click(tmp_path):
    write(tmp_path, "train.csv", "user,item,timestamp\na,x,10\na,y,11.5\n")
    write(tmp_path, "test.csv", "user,item,rating\na,z,4\na,x,3.5\n")
    raw = read_csv_real(tmp_path, "train.csv", "test.csv")
    np.testing.assert_array_equal(raw.train.labels(positive_threshold=4), [1, 1])
    np.testing.assert_array_equal(raw.test.labels(positive_threshold=4), [1, 0])  # 3.5 < 4


def test_semisynthetic_sources_keep_ratings_or_the_clicked_rows(tmp_path):
    write(tmp_path, "rated.csv", "user,item,rating\na,x,5\nb,x,1\n")
    rated = read_csv_source(tmp_path, "rated.csv")
    np.testing.assert_array_equal(rated.rating, [5.0, 1.0])
    write(tmp_path, "clicks.csv", "user,item,click\na,x,1\nb,x,0\nb,y,1\n")
    clicks = read_csv_source(tmp_path, "clicks.csv")
    assert clicks.rating is None and clicks.shape == (2, 2)
    np.testing.assert_array_equal(clicks.user, [0, 1])
    np.testing.assert_array_equal(clicks.item, [0, 1])


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty file; expected a header user,item[,rating|click]"),
        ("user,item\n", "no rows"),
        (
            "item,user\nx,a\n",
            "header ['item', 'user']; expected user,item then optionally one of rating or click,"
            " and timestamp",
        ),
        (
            "user,item,rating,click\na,x,5,1\n",
            "header ['user', 'item', 'rating', 'click']; expected",
        ),
        ("user,item,stars\na,x,5\n", "header ['user', 'item', 'stars']; expected"),
        ("user,item,rating\na,x,5\n,y,4\n", "line 3: empty user"),
        ("user,item,rating\na,x,5\nb, ,4\n", "line 3: empty item"),
        ("user,item,rating\na,x,6\n", "line 2: rating '6', expected a number in 1..5"),
        ("user,item,rating\na,x,nan\n", "line 2: rating 'nan', expected a number in 1..5"),
        ("user,item,click\na,x,2\n", "line 2: click '2', expected 0 or 1"),
        ("user,item,timestamp\na,x,inf\n", "line 2: timestamp 'inf', expected a number"),
        ("user,item\na,x\nb,x\na,x\n", "duplicate (user, item) on lines [2, 4]"),
        ("user,item\na,x,extra\n", "malformed CSV"),
    ],
)
def test_bad_files_stop_with_one_line_naming_the_file(tmp_path, text, problem):
    path = write(tmp_path, "train.csv", text)
    with pytest.raises(DataError) as info:
        read_csv_source(tmp_path, "train.csv")
    assert str(info.value).startswith(f"{path}: {problem}"), str(info.value)


def test_a_test_file_needs_labels_and_files_must_exist(tmp_path):
    write(tmp_path, "train.csv", "user,item\na,x\n")
    test = write(tmp_path, "test.csv", "user,item\na,y\n")
    with pytest.raises(DataError) as info:
        read_csv_real(tmp_path, "train.csv", "test.csv")
    assert str(info.value) == (
        f"{test}: no rating or click column: a random-exposure test needs labels"
    )
    with pytest.raises(DataError, match=r"file not found \(params.yaml's catalog names it\)"):
        read_csv_real(tmp_path, "train.csv", "missing.csv")


def test_a_click_log_without_clicks_is_an_error(tmp_path):
    path = write(tmp_path, "clicks.csv", "user,item,click\na,x,0\n")
    with pytest.raises(DataError) as info:
        read_csv_source(tmp_path, "clicks.csv")
    assert str(info.value) == f"{path}: no row with click 1"
