"""ubo_core.fileio: atomic output, byte-reproducible archives, checked reads."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ubo_core.errors import DataError, UboError
from ubo_core.fileio import atomic_path, load_npz, read_json, save_npz, sha256_file, write_json


class Boom(Exception):
    pass


# ---------------------------------------------------------------- atomic_path


def test_atomic_path_renames_a_file_into_place(tmp_path):
    target = tmp_path / "new" / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent.parent == target.parent  # a temp folder beside the target
        assert tmp.name == "out.txt"
        tmp.write_text("done")
    assert target.read_text() == "done"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]  # no temp left


def test_atomic_path_body_raises_leaves_neither_target_nor_temp(tmp_path):
    target = tmp_path / "out" / "result.txt"
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise Boom
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_atomic_path_body_raises_leaves_existing_target_untouched(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("old")
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("new")
            raise Boom
    assert target.read_text() == "old"
    assert sorted(tmp_path.iterdir()) == [target]


def test_atomic_path_failed_folder_keeps_existing_folder(tmp_path):
    target = tmp_path / "folder"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "other.txt").write_text("new")
            raise Boom
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "old"
    assert sorted(tmp_path.iterdir()) == [target]


def test_atomic_path_replaces_existing_folder_as_a_whole(tmp_path):
    target = tmp_path / "folder"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "fresh.txt").write_text("new")
    # The stale file must not survive: the folder is replaced, not merged.
    assert sorted(p.name for p in target.iterdir()) == ["fresh.txt"]
    assert sorted(tmp_path.iterdir()) == [target]


def test_atomic_path_nothing_written_is_an_error_and_keeps_target(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="nothing was written"):
        with atomic_path(target):
            pass
    assert target.read_text() == "old"
    assert sorted(tmp_path.iterdir()) == [target]


# ---------------------------------------------------------------- sha256_file


def test_sha256_file_matches_the_known_digest_of_abc(tmp_path):
    path = tmp_path / "abc.txt"
    path.write_bytes(b"abc")
    # FIPS 180-2 test vector: sha256("abc"). chunk_size=1 exercises the chunked loop.
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_file(path, chunk_size=1) == expected
    assert sha256_file(path) == expected


# ---------------------------------------------------------------- npz


def _arrays() -> dict[str, np.ndarray]:
    return {
        "b_user": np.array([3, 1, 2], np.int32),
        "a_label": np.array([1, 0, 1], np.int8),
        "n": np.asarray(7),
        "m": np.array([[0.25, 0.5], [0.75, 1.0]], np.float32),
    }


def test_save_npz_same_arrays_give_identical_bytes(tmp_path, monkeypatch):
    first, second = tmp_path / "first.npz", tmp_path / "second.npz"
    save_npz(first, _arrays())
    # A different insertion order and a clock 20 years later must not change a byte:
    # members are written sorted, with a fixed timestamp.
    monkeypatch.setattr(time, "time", lambda: time.mktime((2045, 6, 1, 12, 0, 0, 0, 0, -1)))
    reordered = dict(reversed(list(_arrays().items())))
    save_npz(second, reordered)
    assert first.read_bytes() == second.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first.npz", "second.npz"]


def test_save_then_load_npz_round_trip(tmp_path):
    path = tmp_path / "a.npz"
    save_npz(path, _arrays())
    loaded = load_npz(path, required=("n", "m"))
    assert sorted(loaded) == ["a_label", "b_user", "m", "n"]
    for name, array in _arrays().items():
        assert loaded[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded[name], array)


def test_load_npz_missing_file(tmp_path):
    path = tmp_path / "absent.npz"
    with pytest.raises(DataError) as info:
        load_npz(path)
    assert str(info.value) == f"{path}: file not found"
    assert isinstance(info.value, UboError)
    assert info.value.path == path


def test_load_npz_missing_array(tmp_path):
    path = tmp_path / "a.npz"
    save_npz(path, _arrays())
    with pytest.raises(DataError) as info:
        load_npz(path, required=("n", "zz_missing", "m"))
    assert str(info.value) == f"{path}: missing arrays ['zz_missing']"


def test_load_npz_not_an_archive(tmp_path):
    path = tmp_path / "text.npz"
    path.write_text("this is not a zip archive\n")
    with pytest.raises(DataError) as info:
        load_npz(path)
    assert str(info.value).startswith(f"{path}: not a readable .npz archive")


# ---------------------------------------------------------------- json


def test_write_json_sorts_keys_and_reads_back(tmp_path):
    path = tmp_path / "m.json"
    write_json(path, {"b": 1, "a": [2, 3]})
    assert path.read_text() == '{\n  "a": [\n    2,\n    3\n  ],\n  "b": 1\n}\n'
    assert read_json(path) == {"a": [2, 3], "b": 1}


@pytest.mark.parametrize(
    ("text", "problem"),
    [("[1, 2]\n", "expected a JSON object"), ("{oops", "invalid JSON")],
)
def test_read_json_errors(tmp_path, text, problem):
    path = tmp_path / "m.json"
    path.write_text(text)
    with pytest.raises(DataError) as info:
        read_json(path)
    assert str(info.value).startswith(f"{path}: {problem}")


def test_read_json_missing_file(tmp_path):
    path = tmp_path / "absent.json"
    with pytest.raises(DataError, match="file not found") as info:
        read_json(path)
    assert str(path) in str(info.value)
