"""The download stage: bring a data set's raw files into `data/raw/<name>/`, checked.

Your own CSV data (params.yaml's catalog) is copied from `data/manual/<name>/`. For the
built-ins, the order of sources: the local mirror (`UBO_DATA_MIRROR`, laid out
`<name>/<file>`) when set, which is how offline machines work; for licensed Yahoo! R3, the
hand-placed copy in the manual folder; otherwise the official archive over the network.
Every file is checked against its recorded sha256 before the output folder is renamed into
place.
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from ubo_core.datasets import amazon
from ubo_core.datasets.sources import AMAZON_RATINGS_URL, AMAZON_REVIEWS_5CORE_URL, Source
from ubo_core.errors import DataError
from ubo_core.fileio import atomic_path, sha256_file

if TYPE_CHECKING:
    from ubo_core.datasets.dataset import Dataset

MIRROR_ENV = "UBO_DATA_MIRROR"


def download_dataset(
    dataset: Dataset, raw_dir: Path, manual_dir: Path, mirror: Path | None = None
) -> Path:
    """Fill `raw_dir/<name>` with the checked raw files of `dataset`; return that path.
    Your own data's files are read whole from `manual_dir/<name>/` first, so an error names
    the file you edit, then copied."""
    target = Path(raw_dir) / dataset.name
    manual_folder = Path(manual_dir) / dataset.name
    if dataset.source is None:
        dataset.read(manual_folder)
        copy_own_files(dataset.files, manual_folder, target)
    else:
        fetch_source(dataset.source, target, manual_folder, mirror)
    return target


def copy_own_files(files: tuple[str, ...], folder: Path, target: Path) -> None:
    """Copy your own data's files into `target`, which appears only if all are there."""
    with atomic_path(target) as staging:
        staging.mkdir(parents=True)
        for name in files:
            origin = folder / name
            destination = staging / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(origin, destination)


def fetch_source(source: Source, target: Path, manual_folder: Path, mirror: Path | None) -> None:
    """Bring `source`'s files into folder `target`, checked; `target` appears only if all pass."""
    with atomic_path(target) as staging:
        staging.mkdir(parents=True)
        if mirror is not None:
            _copy_from_mirror(source, Path(mirror), staging)
            verify_files(source, staging, Path(mirror) / source.name)
        elif source.licensed:
            _copy_from_manual(source, manual_folder, staging)
            verify_files(source, staging, manual_folder)
        elif source.archive_url is not None:
            _fetch_archive(source, source.archive_url, staging)
            verify_files(source, staging, source.archive_url)
        else:
            # Derived online; checked by its pairs' checksum inside (row order can differ).
            _fetch_amazon(staging)


def verify_files(source: Source, folder: Path, origin: str | Path) -> None:
    """Check every expected file of `source` is in `folder` with the recorded sha256.

    Errors name the file where it came from (`origin`/path: the mirror or manual copy the
    user has to replace, or the archive URL), not the staging copy that is about to vanish.
    """
    for raw in source.files:
        path = folder / raw.path
        shown = f"{origin}/{raw.path}"
        if not path.is_file():
            raise DataError(shown, "expected file is missing")
        digest = sha256_file(path)
        if digest != raw.sha256:
            raise DataError(
                shown,
                f"sha256 mismatch: expected {raw.sha256}, got {digest} (corrupt or wrong file)",
            )


def _copy_from_mirror(source: Source, mirror: Path, staging: Path) -> None:
    folder = mirror / source.name
    if not mirror.is_dir():
        raise DataError(mirror, f"{MIRROR_ENV} points to a folder that does not exist")
    if source.licensed and not folder.is_dir():
        raise DataError(folder, _licensed_message(source, folder, [f.path for f in source.files]))
    _copy_files(source, folder, staging, hint=f"the mirror ({MIRROR_ENV}) lacks it")


def _copy_from_manual(source: Source, folder: Path, staging: Path) -> None:
    missing = [raw.path for raw in source.files if not (folder / raw.path).is_file()]
    if missing:
        raise DataError(folder, _licensed_message(source, folder, missing))
    _copy_files(source, folder, staging, hint="")


def _licensed_message(source: Source, folder: Path, missing: list[str]) -> str:
    return f"missing {', '.join(missing)}. " + source.how_to_obtain.format(manual_dir=folder)


def _copy_files(source: Source, folder: Path, staging: Path, hint: str) -> None:
    for raw in source.files:
        origin = folder / raw.path
        if not origin.is_file():
            raise DataError(origin, f"file not found{'; ' + hint if hint else ''}")
        destination = staging / raw.path
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(origin, destination)


def fetch_url(url: str, destination: Path) -> None:
    """Stream `url` to `destination` with a progress bar; network errors become DataError."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (fixed URLs)
            total = int(response.headers.get("Content-Length") or 0) or None
            with (
                open(destination, "wb") as out,
                tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name) as bar,
            ):
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as error:
        raise DataError(
            url,
            f"download failed ({error}); offline, set {MIRROR_ENV} to a local mirror folder",
        ) from error


def _fetch_archive(source: Source, url: str, staging: Path) -> None:
    archive = staging / ".archive.zip"
    fetch_url(url, archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.namelist() if not m.endswith("/")]
            for raw in source.files:
                # Archives unpack into a top folder (coat/, ml-100k/): match on the path tail.
                matches = [m for m in members if m == raw.path or m.endswith("/" + raw.path)]
                if not matches:
                    raise DataError(url, f"archive has no member {raw.path}")
                destination = staging / raw.path
                destination.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(min(matches, key=len)) as src, open(destination, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile as error:
        raise DataError(url, f"not a zip archive ({error})") from error
    finally:
        archive.unlink(missing_ok=True)


def _fetch_amazon(staging: Path) -> None:
    ratings = staging / ".ratings_CDs_and_Vinyl.csv"
    reviews = staging / ".reviews_CDs_and_Vinyl_5.json.gz"
    fetch_url(AMAZON_RATINGS_URL, ratings)
    fetch_url(AMAZON_REVIEWS_5CORE_URL, reviews)
    amazon.derive_cds_subset(ratings, reviews, staging / "cds_interactions.tsv")
    ratings.unlink()
    reviews.unlink()
