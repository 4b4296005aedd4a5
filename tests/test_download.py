"""ubo_core.datasets.download and .amazon: checked raw files, offline (local HTTP only)."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import json
import threading
import zipfile
from pathlib import Path

import pytest

from ubo_core.config import Params
from ubo_core.datasets import amazon
from ubo_core.datasets.download import download_dataset, fetch_source
from ubo_core.datasets.registry import get_dataset
from ubo_core.datasets.sources import RawFile, Source
from ubo_core.errors import DataError

TRAIN = b"0 5 0\n4 0 0\n"
ITEMS = b"1 0 1\n0 1 0\n"
FILES = {"train.ascii": TRAIN, "user_item_features/item_features.ascii": ITEMS}


def make_source(files: dict[str, bytes] = FILES, **options) -> Source:
    """A toy Source whose recorded checksums are those of `files`' bytes."""
    raws = tuple(RawFile(path, hashlib.sha256(data).hexdigest()) for path, data in files.items())
    return Source(name="toy", files=raws, citation="test data", **options)


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)


def assert_holds_exactly(folder: Path, files: dict[str, bytes]) -> None:
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert found == set(files)
    for path, data in files.items():
        assert (folder / path).read_bytes() == data


def fetch_error(*args) -> str:
    with pytest.raises(DataError) as info:
        fetch_source(*args)
    return str(info.value)


# ---------------------------------------------------------------- mirror


def test_mirror_copies_checked_files(tmp_path):
    mirror = tmp_path / "mirror"
    write_files(mirror / "toy", {**FILES, "extra.txt": b"not listed"})
    target = tmp_path / "raw" / "toy"
    fetch_source(make_source(), target, tmp_path / "manual" / "toy", mirror)
    assert_holds_exactly(target, FILES)  # listed files only: extra.txt is not copied
    assert sorted(p.name for p in target.parent.iterdir()) == ["toy"]  # no temp left


def test_mirror_replaces_a_previous_download(tmp_path):
    mirror = tmp_path / "mirror"
    write_files(mirror / "toy", FILES)
    target = tmp_path / "raw" / "toy"
    write_files(target, {"stale.txt": b"old"})
    fetch_source(make_source(), target, tmp_path / "manual", mirror)
    assert_holds_exactly(target, FILES)


def test_mirror_checksum_mismatch_leaves_no_target(tmp_path):
    mirror = tmp_path / "mirror"
    write_files(mirror / "toy", {**FILES, "train.ascii": TRAIN + b"0 0 1\n"})
    target = tmp_path / "raw" / "toy"
    message = fetch_error(make_source(), target, tmp_path / "manual", mirror)
    assert "train.ascii: sha256 mismatch" in message
    assert hashlib.sha256(TRAIN).hexdigest() in message  # the expected digest
    assert hashlib.sha256(TRAIN + b"0 0 1\n").hexdigest() in message  # the one found
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no staging folder left either


def test_mirror_checksum_mismatch_names_the_mirror_file(tmp_path):
    mirror = tmp_path / "mirror"
    write_files(mirror / "toy", {**FILES, "train.ascii": b"corrupt\n"})
    message = fetch_error(make_source(), tmp_path / "raw" / "toy", tmp_path / "manual", mirror)
    assert str(mirror / "toy" / "train.ascii") in message


def test_mirror_missing_file(tmp_path):
    mirror = tmp_path / "mirror"
    write_files(mirror / "toy", {"train.ascii": TRAIN})
    target = tmp_path / "raw" / "toy"
    message = fetch_error(make_source(), target, tmp_path / "manual", mirror)
    missing = mirror / "toy" / "user_item_features" / "item_features.ascii"
    assert message == f"{missing}: file not found; the mirror (UBO_DATA_MIRROR) lacks it"
    assert not target.exists()


def test_mirror_folder_that_does_not_exist(tmp_path):
    mirror = tmp_path / "no_such_mirror"
    message = fetch_error(make_source(), tmp_path / "raw" / "toy", tmp_path / "manual", mirror)
    assert message == f"{mirror}: UBO_DATA_MIRROR points to a folder that does not exist"


# ---------------------------------------------------------------- licensed, manual folder

HOW_TO = "Ask the owner, then copy the files into {manual_dir}/ and run again."


def test_licensed_source_with_empty_manual_folder(tmp_path):
    manual = tmp_path / "manual" / "toy"
    manual.mkdir(parents=True)
    target = tmp_path / "raw" / "toy"
    source = make_source(licensed=True, how_to_obtain=HOW_TO)
    message = fetch_error(source, target, manual, None)
    assert message == (
        f"{manual}: missing train.ascii, user_item_features/item_features.ascii. "
        f"Ask the owner, then copy the files into {manual}/ and run again."
    )
    assert not target.exists()


def test_licensed_source_message_lists_only_the_missing_files(tmp_path):
    manual = tmp_path / "manual" / "toy"
    write_files(manual, {"train.ascii": TRAIN})  # one of the two files is there
    source = make_source(licensed=True, how_to_obtain=HOW_TO)
    message = fetch_error(source, tmp_path / "raw" / "toy", manual, None)
    assert message.startswith(f"{manual}: missing user_item_features/item_features.ascii. ")


def test_licensed_source_from_complete_manual_folder(tmp_path):
    manual = tmp_path / "manual" / "toy"
    write_files(manual, FILES)
    target = tmp_path / "raw" / "toy"
    fetch_source(make_source(licensed=True, how_to_obtain=HOW_TO), target, manual, None)
    assert_holds_exactly(target, FILES)


def test_licensed_source_absent_from_mirror_gives_the_instructions(tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    source = make_source(licensed=True, how_to_obtain=HOW_TO)
    message = fetch_error(source, tmp_path / "raw" / "toy", tmp_path / "manual", mirror)
    assert message.startswith(f"{mirror / 'toy'}: missing train.ascii, ")
    assert f"copy the files into {mirror / 'toy'}/" in message


def test_download_yahoo_without_manual_copy_explains_webscope(tmp_path):
    raw, manual = tmp_path / "raw", tmp_path / "manual"
    manual.mkdir()
    with pytest.raises(DataError) as info:
        download_dataset(get_dataset(Params(), "yahoo"), raw, manual, mirror=None)
    message = str(info.value)
    assert message.startswith(f"{manual / 'yahoo'}: missing ")
    assert "ydata-ymusic-rating-study-v1_0-train.txt" in message
    assert "ydata-ymusic-rating-study-v1_0-test.txt" in message
    assert "Webscope" in message
    assert f"into {manual / 'yahoo'}/" in message  # the folder to put them in
    assert not (raw / "yahoo").exists()


# ---------------------------------------------------------------- archive over HTTP


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (signature of the base class)
        pass


@pytest.fixture
def http_folder(tmp_path, monkeypatch):
    """A folder served on 127.0.0.1 (a random free port); yields (folder, base URL)."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "*")  # never route the local server through a proxy
    folder = tmp_path / "served"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("coat/", b"")  # a folder entry, as real archives have
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def test_archive_members_matched_by_path_tail(tmp_path, http_folder):
    served, base = http_folder
    (served / "coat.zip").write_bytes(
        zip_bytes(
            {
                "coat/train.ascii": TRAIN,
                # Also ends with "/train.ascii", but longer: the shortest match wins.
                "coat/backup/train.ascii": b"old copy\n",
                # Ends with "train.ascii" but not "/train.ascii": never a match.
                "coat/xtrain.ascii": b"unrelated\n",
                "coat/user_item_features/item_features.ascii": ITEMS,
            }
        )
    )
    target = tmp_path / "raw" / "toy"
    source = make_source(archive_url=f"{base}/coat.zip")
    fetch_source(source, target, tmp_path / "manual", None)
    assert_holds_exactly(target, FILES)  # and the downloaded .archive.zip is gone


def test_archive_missing_member(tmp_path, http_folder):
    served, base = http_folder
    (served / "coat.zip").write_bytes(zip_bytes({"coat/train.ascii": TRAIN}))
    target = tmp_path / "raw" / "toy"
    url = f"{base}/coat.zip"
    message = fetch_error(make_source(archive_url=url), target, tmp_path / "manual", None)
    assert message == f"{url}: archive has no member user_item_features/item_features.ascii"
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_archive_member_with_wrong_bytes(tmp_path, http_folder):
    served, base = http_folder
    members = {
        "coat/train.ascii": b"changed\n",
        "coat/user_item_features/item_features.ascii": ITEMS,
    }
    (served / "coat.zip").write_bytes(zip_bytes(members))
    target = tmp_path / "raw" / "toy"
    source = make_source(archive_url=f"{base}/coat.zip")
    assert "train.ascii: sha256 mismatch" in fetch_error(source, target, tmp_path / "m", None)
    assert not target.exists()


def test_archive_that_is_not_a_zip(tmp_path, http_folder):
    served, base = http_folder
    (served / "coat.zip").write_text("<html>not found</html>\n")
    url = f"{base}/coat.zip"
    message = fetch_error(make_source(archive_url=url), tmp_path / "raw" / "toy", tmp_path, None)
    assert message.startswith(f"{url}: not a zip archive")


def test_archive_http_error_suggests_the_mirror(tmp_path, http_folder):
    _, base = http_folder
    url = f"{base}/absent.zip"  # 404
    target = tmp_path / "raw" / "toy"
    message = fetch_error(make_source(archive_url=url), target, tmp_path / "manual", None)
    assert message.startswith(f"{url}: download failed (")
    assert "set UBO_DATA_MIRROR" in message
    assert not target.exists()


# ---------------------------------------------------------------- Amazon CDs derivation

# Thresholds lowered so that a hand-made example exercises each filter step.
# ratings (user, item, rating, timestamp), file order:
RATINGS_CSV = """\
A,i1,5.0,300
A,i2,4.0,100
A,i3,5.0,200
A,i4,5.0,50
A,i9,3.0,10
B,i3,4.0,30
B,i1,5.0,10
B,i2,5.0,20
B,i4,4.0,40
C,i5,5.0,1
C,i1,5.0,2
C,i2,2.0,3
C,i3,1.0,4
D,i5,4.0,7
D,i1,4.0,8
D,i2,5.0,8
D,i3,4.0,6
D,i4,5.0,5
E,i1,5.0,11
E,i5,4.0,12
E,i6,5.0,13
"""
# With MIN_USER_FIRST = 3, MIN_ITEM = 3, MIN_USER_DISTINCT = 3 (MIN_REVIEW_CHARS stays 10):
# 1. rating >= 4: drops (A,i9,3) (C,i2,2) (C,i3,1).
# 2. users with >= 3 interactions left: A 4, B 4, C 2, D 5, E 3 -> C dropped (it had 4
#    rows before step 1, so step 1 must come first).
# 3. items with >= 3 interactions among A, B, D, E: i1 4 (A B D E), i2 3, i3 3, i4 3 (A B D),
#    i5 2 (D E; C's row no longer counts, so step 2 must come first), i6 1 -> i5, i6 dropped.
# 4. items with a review longer than 10 characters: i1 i2 i3 i5 i6; i4's only text is exactly
#    10 characters ("0123456789", not > 10) -> i4 dropped.
# 5. users with >= 3 distinct items: A {i1 i2 i3}, B {i1 i2 i3}, D {i1 i2 i3}, E {i1} -> E out.
# 6. each user's items in time order, equal times in file order:
#    A: i2 (100) i3 (200) i1 (300); B: i1 (10) i2 (20) i3 (30); D: i3 (6) i1 (8) i2 (8).
EXPECTED_TSV = "user\titem\nA\ti2\nA\ti3\nA\ti1\nB\ti1\nB\ti2\nB\ti3\nD\ti3\nD\ti1\nD\ti2\n"
REVIEWS = [
    {"asin": "i1", "reviewText": "a long enough review"},
    {"asin": "i2", "reviewText": "more than ten characters"},
    {"asin": "i3", "reviewText": "short"},
    {"asin": "i3", "reviewText": "but this one is long"},
    {"asin": "i4", "reviewText": "0123456789"},
    {"asin": "i4", "summary": "no reviewText field at all"},
    {"asin": "i5", "reviewText": "long review of i5"},
    {"asin": "i6", "reviewText": "long review of i6"},
]


@pytest.fixture
def amazon_inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(amazon, "MIN_USER_FIRST", 3)
    monkeypatch.setattr(amazon, "MIN_ITEM", 3)
    monkeypatch.setattr(amazon, "MIN_USER_DISTINCT", 3)
    ratings = tmp_path / "ratings.csv"
    ratings.write_text(RATINGS_CSV)
    reviews = tmp_path / "reviews.json.gz"
    with gzip.open(reviews, "wt") as handle:
        handle.writelines(json.dumps(review) + "\n" for review in REVIEWS)
    return ratings, reviews


def test_derive_cds_subset_applies_every_filter(tmp_path, amazon_inputs):
    out = tmp_path / "out" / "cds_interactions.tsv"
    amazon.derive_cds_subset(*amazon_inputs, out, expected_pairs_sha256=None)
    assert out.read_text() == EXPECTED_TSV


def test_derive_cds_subset_accepts_the_right_pairs_hash(tmp_path, amazon_inputs):
    # sha256 of the sorted "user\titem\n" lines of the expected output
    lines = sorted(EXPECTED_TSV.splitlines()[1:])
    digest = hashlib.sha256("".join(line + "\n" for line in lines).encode()).hexdigest()
    out = tmp_path / "cds_interactions.tsv"
    amazon.derive_cds_subset(*amazon_inputs, out, expected_pairs_sha256=digest)
    assert out.read_text() == EXPECTED_TSV


def test_derive_cds_subset_wrong_hash_leaves_no_file(tmp_path, amazon_inputs):
    out = tmp_path / "cds_interactions.tsv"
    with pytest.raises(DataError) as info:
        amazon.derive_cds_subset(*amazon_inputs, out, expected_pairs_sha256="0" * 64)
    message = str(info.value)
    assert message.startswith(f"{out}: derived subset differs from the recorded one")
    assert f"expected {'0' * 64}" in message
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ratings.csv", "reviews.json.gz"]


def test_pairs_sha256_ignores_row_order_and_repeats(tmp_path):
    first, second = tmp_path / "a.tsv", tmp_path / "b.tsv"
    first.write_text("user\titem\nu1\tx\nu2\ty\nu1\tz\n")
    second.write_text("user\titem\r\nu1\tz\r\nu1\tx\r\nu2\ty\r\nu1\tx\r\n\r\n")
    # sorted distinct lines: "u1\tx", "u1\tz", "u2\ty"
    expected = hashlib.sha256(b"u1\tx\nu1\tz\nu2\ty\n").hexdigest()
    assert amazon.pairs_sha256(first) == expected
    assert amazon.pairs_sha256(second) == expected
    third = tmp_path / "c.tsv"
    third.write_text("user\titem\nu1\tx\nu2\ty\n")  # one pair fewer: a different hash
    assert amazon.pairs_sha256(third) != expected


def test_derive_cds_subset_bad_review_json_names_the_line(tmp_path, amazon_inputs):
    ratings, _ = amazon_inputs
    reviews = tmp_path / "bad.json.gz"
    with gzip.open(reviews, "wt") as handle:
        handle.write('{"asin": "i1", "reviewText": "long enough text"}\n{broken\n')
    out = tmp_path / "out.tsv"
    with pytest.raises(DataError) as info:
        amazon.derive_cds_subset(ratings, reviews, out, expected_pairs_sha256=None)
    assert str(info.value) == f"{reviews}: line 2: bad JSON"
    assert not out.exists()


def test_derive_cds_subset_malformed_ratings(tmp_path, amazon_inputs):
    _, reviews = amazon_inputs
    ratings = tmp_path / "bad.csv"
    ratings.write_text("A,i1,5.0,300\nB,i2,4.0,yesterday\n")
    with pytest.raises(DataError) as info:
        amazon.derive_cds_subset(ratings, reviews, tmp_path / "o.tsv", expected_pairs_sha256=None)
    assert str(info.value).startswith(f"{ratings}: malformed ratings CSV")
