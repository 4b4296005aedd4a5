"""Atomic, byte-reproducible file output and checksums.

Every stage writes to a temporary sibling and renames it into place, so an interrupted or
failed stage never leaves a half-written output behind. Archives are written with a fixed
timestamp so that the same arrays give the same bytes (DVC hashes stay stable across runs).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ubo_core.errors import DataError

_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it onto `target`.

    Works for files and directories. On any exception the temporary is removed and
    `target` is left exactly as it was.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as error:
        raise DataError(target, f"cannot write here ({error.strerror or error})") from None
    tmp_target = tmp / target.name
    try:
        yield tmp_target
        if not tmp_target.exists():
            raise RuntimeError(f"atomic_path: nothing was written for {target}")
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(tmp_target, target)
    except OSError as error:
        # A full disk or a read-only folder while writing (the error names the temporary,
        # or no file at all): say which output could not be written. An error about another
        # file (an input the body read) is the body's own.
        if error.filename is not None and not str(error.filename).startswith(str(tmp)):
            raise
        raise DataError(target, f"cannot write ({error.strerror or error})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write arrays to a deflated .npz atomically, with a fixed member timestamp so the same
    arrays give the same bytes (for a given zlib)."""
    with atomic_path(Path(path)) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            for name in sorted(arrays):
                buffer = io.BytesIO()
                # np.ascontiguousarray would turn 0-d scalars (n_users) into 1-d arrays.
                array = np.asarray(arrays[name])
                np.lib.format.write_array(buffer, np.require(array, requirements="C"))
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, buffer.getvalue())


def load_npz(
    path: Path, required: tuple[str, ...] = (), skip: tuple[str, ...] = ()
) -> dict[str, np.ndarray]:
    """Read an .npz written by `save_npz`; missing file or array is a DataError.

    Arrays named in `skip` are never read (an .npz member is only decompressed on access),
    so a corrupt or absent skipped array cannot influence the caller."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files if name not in skip}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise DataError(path, f"not a readable .npz archive ({error})") from error
    missing = [name for name in required if name not in arrays and name not in skip]
    if missing:
        raise DataError(path, f"missing arrays {missing}")
    return arrays


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write JSON atomically with sorted keys (stable bytes for DVC metrics)."""
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        payload = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(path, f"invalid JSON ({error})") from error
    if not isinstance(payload, dict):
        raise DataError(path, "expected a JSON object")
    return payload
