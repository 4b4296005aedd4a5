"""ubo_core.datasets.readers: strict parsing of the raw rating files."""

from __future__ import annotations

import numpy as np
import pytest

from ubo_core.datasets.readers import read_interactions, read_rating_matrix, read_rating_table
from ubo_core.errors import DataError


def _raises(func, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        func(*args, **kwargs)
    return str(info.value)


# ---------------------------------------------------------------- read_rating_matrix (Coat)


def test_rating_matrix_good_3x4_with_crlf(tmp_path):
    path = tmp_path / "train.ascii"
    path.write_bytes(b"0 5 0 1\r\n4 0 0 0\r\n0  0 3 2\r\n")
    ratings = read_rating_matrix(path, (3, 4))
    # Nonzero cells in row-major order: (0,1)=5 (0,3)=1 (1,0)=4 (2,2)=3 (2,3)=2.
    np.testing.assert_array_equal(ratings.user, [0, 0, 1, 2, 2])
    np.testing.assert_array_equal(ratings.item, [1, 3, 0, 2, 3])
    np.testing.assert_array_equal(ratings.rating, [5, 1, 4, 3, 2])
    assert (ratings.user.dtype, ratings.item.dtype, ratings.rating.dtype) == (
        np.int32,
        np.int32,
        np.int8,
    )


def test_rating_matrix_trailing_blank_line_is_fine(tmp_path):
    path = tmp_path / "train.ascii"
    path.write_text("1 0\n0 2\n\n")
    ratings = read_rating_matrix(path, (2, 2))
    np.testing.assert_array_equal(ratings.rating, [1, 2])


def test_rating_matrix_non_integer_names_the_line(tmp_path):
    path = tmp_path / "train.ascii"
    path.write_text("0 5 0 1\n4 0 x 0\n0 0 3 2\n")
    message = _raises(read_rating_matrix, path, (3, 4))
    assert message == f"{path}: line 2: non-integer rating in '4 0 x 0'"


def test_rating_matrix_fractional_value_is_non_integer(tmp_path):
    path = tmp_path / "train.ascii"
    path.write_text("0 5 0 1\n4 0 0 0\n0 0 3.5 2\n")
    assert "line 3: non-integer rating" in _raises(read_rating_matrix, path, (3, 4))


def test_rating_matrix_wrong_column_count_names_the_line(tmp_path):
    path = tmp_path / "train.ascii"
    path.write_text("0 5 0 1\n4 0 0\n0 0 3 2\n")
    message = _raises(read_rating_matrix, path, (3, 4))
    assert message == f"{path}: line 2: 3 columns, expected 4"


def test_rating_matrix_wrong_row_count(tmp_path):
    path = tmp_path / "train.ascii"
    path.write_text("0 5 0 1\n4 0 0 0\n")
    message = _raises(read_rating_matrix, path, (3, 4))
    assert message == f"{path}: matrix shape (2, 4), expected (3, 4)"


def test_rating_matrix_rating_7_out_of_range(tmp_path):
    path = tmp_path / "train.ascii"
    path.write_text("0 5 0 1\n4 0 0 0\n0 7 3 2\n")
    message = _raises(read_rating_matrix, path, (3, 4))
    assert message == f"{path}: line 3: rating 7 out of range 0..5"


def test_rating_matrix_negative_rating_out_of_range(tmp_path):
    path = tmp_path / "train.ascii"
    path.write_text("0 -1\n1 0\n")
    assert "line 1: rating -1 out of range" in _raises(read_rating_matrix, path, (2, 2))


def test_rating_matrix_out_of_range_line_counts_blank_lines(tmp_path):
    path = tmp_path / "train.ascii"
    path.write_text("\n1 2\n3 7\n")  # the 7 is on file line 3
    assert "line 3: rating 7" in _raises(read_rating_matrix, path, (2, 2))


def test_rating_matrix_empty_file(tmp_path):
    path = tmp_path / "train.ascii"
    path.write_text("")
    message = _raises(read_rating_matrix, path, (3, 4))
    assert message == f"{path}: matrix shape (0, 4), expected (3, 4)"


def test_rating_matrix_all_zero_has_no_ratings(tmp_path):
    path = tmp_path / "train.ascii"
    path.write_text("0 0\n0 0\n")
    assert _raises(read_rating_matrix, path, (2, 2)) == f"{path}: no ratings"


def test_rating_matrix_missing_file(tmp_path):
    path = tmp_path / "absent.ascii"
    assert _raises(read_rating_matrix, path, (2, 2)) == f"{path}: file not found"


# ---------------------------------------------------------------- read_rating_table (Yahoo)


def test_rating_table_good_ids_become_zero_based(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("1\t1\t5\n1\t3\t1\n2\t2\t4\n3\t4\t3\n")
    ratings = read_rating_table(path, n_users=3, n_items=4)
    # 1-based (u, i) -> 0-based: (1,1)->(0,0) (1,3)->(0,2) (2,2)->(1,1) (3,4)->(2,3)
    np.testing.assert_array_equal(ratings.user, [0, 0, 1, 2])
    np.testing.assert_array_equal(ratings.item, [0, 2, 1, 3])
    np.testing.assert_array_equal(ratings.rating, [5, 1, 4, 3])
    assert (ratings.user.dtype, ratings.item.dtype, ratings.rating.dtype) == (
        np.int32,
        np.int32,
        np.int8,
    )


def test_rating_table_crlf_and_four_columns(tmp_path):
    path = tmp_path / "u.data"
    path.write_bytes(b"2\t1\t5\t881250949\r\n1\t2\t3\t891717742\r\n")
    ratings = read_rating_table(path, n_users=2, n_items=2, n_columns=4)
    np.testing.assert_array_equal(ratings.user, [1, 0])
    np.testing.assert_array_equal(ratings.item, [0, 1])
    np.testing.assert_array_equal(ratings.rating, [5, 3])


def test_rating_table_zero_based_ids(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("0\t2\t5\n")
    ratings = read_rating_table(path, n_users=1, n_items=3, one_based=False)
    assert (ratings.user.tolist(), ratings.item.tolist()) == ([0], [2])


def test_rating_table_non_numeric_field_names_the_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("1\t1\t5\n2\tabc\t4\n")
    message = _raises(read_rating_table, path, 3, 4)
    assert message == f"{path}: line 2: non-integer field in '2\\tabc\\t4'"


def test_rating_table_fractional_rating_is_non_integer(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("1\t1\t5\n2\t2\t4\n3\t3\t4.5\n")
    assert "line 3: non-integer field" in _raises(read_rating_table, path, 3, 4)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ("4\t1\t5", "line 2: user id 4 out of range [1, 3]"),  # 3 users: ids 1..3
        ("0\t1\t5", "line 2: user id 0 out of range [1, 3]"),  # 0 is not a 1-based id
        ("1\t5\t5", "line 2: item id 5 out of range [1, 4]"),  # 4 items: ids 1..4
    ],
)
def test_rating_table_id_out_of_range(tmp_path, row, problem):
    path = tmp_path / "train.txt"
    path.write_text(f"1\t1\t5\n{row}\n")
    assert _raises(read_rating_table, path, 3, 4) == f"{path}: {problem}"


@pytest.mark.parametrize("rating", [0, 6])
def test_rating_table_rating_out_of_range(tmp_path, rating):
    path = tmp_path / "train.txt"
    path.write_text(f"1\t1\t5\n2\t2\t4\n3\t3\t{rating}\n")
    message = _raises(read_rating_table, path, 3, 4)
    assert message == f"{path}: line 3: rating {rating} out of range 1..5"


def test_rating_table_duplicate_pair_names_both_lines(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("1\t1\t5\n2\t2\t4\n3\t3\t1\n2\t2\t1\n")  # (2, 2) on lines 2 and 4
    message = _raises(read_rating_table, path, 3, 4)
    assert message == f"{path}: duplicate (user, item) on lines [2, 4]"


def test_rating_table_wrong_column_count(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("1\t1\t5\t9\n2\t2\t4\t9\n")
    assert _raises(read_rating_table, path, 3, 4) == f"{path}: 4 columns, expected 3"


def test_rating_table_ragged_rows_are_malformed(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("1\t1\t5\n2\t2\t4\t9\n")
    message = _raises(read_rating_table, path, 3, 4)
    assert message.startswith(f"{path}: malformed table")
    assert "line 2" in message  # pandas' tokenizer names the line


def test_rating_table_line_number_counts_blank_lines(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("1\t1\t5\n\n1\t2\t7\n")  # the bad rating is on file line 3
    assert "line 3: rating 7" in _raises(read_rating_table, path, 3, 4)


def test_rating_table_empty_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("")
    assert _raises(read_rating_table, path, 3, 4).startswith(f"{path}: malformed table")


def test_rating_table_missing_file(tmp_path):
    path = tmp_path / "absent.txt"
    assert _raises(read_rating_table, path, 3, 4) == f"{path}: file not found"


# ---------------------------------------------------------------- read_interactions (Amazon)


def test_interactions_indices_follow_sorted_names(tmp_path):
    path = tmp_path / "cds_interactions.tsv"
    path.write_text("user\titem\nbob\tX9\nalice\tB2\nbob\tB2\ncarl\tA1\n")
    user, item, user_names, item_names = read_interactions(path)
    # sorted users: alice=0 bob=1 carl=2; sorted items: A1=0 B2=1 X9=2
    assert user_names.tolist() == ["alice", "bob", "carl"]
    assert item_names.tolist() == ["A1", "B2", "X9"]
    np.testing.assert_array_equal(user, [1, 0, 1, 2])
    np.testing.assert_array_equal(item, [2, 1, 1, 0])
    assert (user.dtype, item.dtype) == (np.int32, np.int32)


def test_interactions_numeric_looking_ids_stay_strings(tmp_path):
    path = tmp_path / "cds_interactions.tsv"
    path.write_text("user\titem\n10\t007\n9\t7\n")
    _, item, user_names, item_names = read_interactions(path)
    # string sort: "10" < "9" and "007" < "7"; leading zeros are kept
    assert user_names.tolist() == ["10", "9"]
    assert item_names.tolist() == ["007", "7"]
    np.testing.assert_array_equal(item, [0, 1])


def test_interactions_bad_header(tmp_path):
    path = tmp_path / "cds_interactions.tsv"
    path.write_text("user\tasin\nbob\tX9\n")
    message = _raises(read_interactions, path)
    assert message == f"{path}: header ['user', 'asin'], expected ['user', 'item']"


def test_interactions_duplicate_names_file_lines(tmp_path):
    path = tmp_path / "cds_interactions.tsv"
    # header is line 1: (bob, X9) is on lines 2 and 4
    path.write_text("user\titem\nbob\tX9\nalice\tB2\nbob\tX9\n")
    message = _raises(read_interactions, path)
    assert message == f"{path}: duplicate (user, item) on lines [2, 4]"


def test_interactions_empty_id_names_the_line(tmp_path):
    path = tmp_path / "cds_interactions.tsv"
    path.write_text("user\titem\nbob\tX9\n\tB2\n")
    assert _raises(read_interactions, path) == f"{path}: line 3: empty id"


def test_interactions_header_only_has_no_interactions(tmp_path):
    path = tmp_path / "cds_interactions.tsv"
    path.write_text("user\titem\n")
    assert _raises(read_interactions, path) == f"{path}: no interactions"


def test_interactions_missing_file(tmp_path):
    path = tmp_path / "absent.tsv"
    assert _raises(read_interactions, path) == f"{path}: file not found"


def test_interactions_extra_field_is_an_error(tmp_path):
    path = tmp_path / "cds_interactions.tsv"
    path.write_text("user\titem\nA\tx\t1\nB\ty\t2\n")
    _raises(read_interactions, path)
