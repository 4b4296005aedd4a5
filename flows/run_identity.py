"""What names a training run: code and data versions, the machine, and the run key.

A run is identified by `run_key`: a hash of everything that determines its result (data
set, method, seed, resolved config, code version, data version). A FINISHED run with the
same key is reused instead of retrained (flows/tracked_run.py), so re-running the benchmark
after a crash or a change only trains what is missing or changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import yaml

from ubo_core.config import NON_RESULT_KEYS, SAFE_LOADER, Params, TrainConfig
from ubo_core.data import DATASET_FILE
from ubo_core.errors import DataError
from ubo_core.methods import resolve_config

# Tags (the `ubo.` prefix keeps them apart from MLflow's own `mlflow.*` tags).
TAG_RUN_KEY = "ubo.run_key"
TAG_CODE = "ubo.code_version"
TAG_DATA = "ubo.data_version"
TAG_COMMIT = "ubo.git_commit"
TAG_MACHINE = "ubo.machine"  # CPU cores / GPU and torch version of the worker (the report)
TAG_REUSED_BY = "ubo.reused_by."  # + parent run id: a skipped run counts for that parent too
PARENT_TAG = "mlflow.parentRunId"

# Bump when the meaning of a key changes, so that old runs are not reused by mistake.
RUN_KEY_VERSION = 1


# -- versions and run key --------------------------------------------------------------------
def code_version(repo: Path) -> str:
    """Version of the code that decides results: a hash of the git tree of `ubo_core/` at HEAD
    (`git ls-tree`); `unknown` outside git.

    A content hash rather than the commit: a commit that only touches docs, flows or tests
    keeps the version, so runs of one study stay comparable while the report is written
    (`git_commit` records the commit itself). params.yaml is not part of it: the run key holds
    the resolved configuration of each run, so editing another method's or data set's entry
    (or a comment) keeps every other run valid. When `ubo_core/` has uncommitted changes the
    suffix is `+dirty.<hash of the changes>`: with a bare `+dirty`, two different uncommitted
    edits would share a run key and the second would silently reuse the first one's results.
    """
    paths = ("ubo_core",)

    def git(*args: str) -> bytes:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, check=True
        ).stdout

    try:
        objects = git("ls-tree", "HEAD", "--", *paths)
        version = "code-" + hashlib.sha256(objects).hexdigest()[:16]
        if not git("status", "--porcelain", "--", *paths).strip():
            return version
        digest = hashlib.sha256(git("diff", "HEAD", "--binary", "--", *paths))
        untracked = git("ls-files", "--others", "--exclude-standard", "-z", "--", *paths)
        for name in sorted(filter(None, untracked.split(b"\0"))):
            digest.update(b"\0" + name + b"\0" + (Path(repo) / name.decode()).read_bytes())
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{version}+dirty.{digest.hexdigest()[:12]}"


def machine_description(device: torch.device) -> str:
    """What ran a training run, for the report: e.g. `x86_64, 2 CPU cores, torch 2.13.0`."""
    text = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    if device.type == "cuda":
        text += f", {torch.cuda.get_device_name(device)}"
    return text


def git_commit(repo: Path) -> str:
    """HEAD's commit (what a report names), `unknown` outside git."""
    try:
        done = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.decode().strip()


@lru_cache(maxsize=64)
def _file_md5(path: str, size: int, mtime_ns: int) -> str:
    # Cached on (path, size, mtime) so that 45 runs of one data set hash its file once.
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_md5(path: Path) -> str:
    """md5 of a file's bytes (what DVC 3 records for a file output with `hash: md5`)."""
    stat = path.stat()
    return _file_md5(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def _dvc_lock_md5s(repo: Path) -> dict[str, str]:
    """path -> md5 of every output recorded in `<repo>/dvc.lock` ({} if none)."""
    lock = Path(repo) / "dvc.lock"
    if not lock.is_file():
        return {}
    try:
        stages = (yaml.load(lock.read_text(), Loader=SAFE_LOADER) or {}).get("stages", {})
    except yaml.YAMLError:
        return {}
    return {
        str(out["path"]): str(out["md5"])
        for stage in stages.values()
        if isinstance(stage, dict)
        for out in stage.get("outs", []) or []
        if isinstance(out, dict) and "path" in out and "md5" in out
    }


def data_version(processed_dir: Path, dataset: str, repo: Path) -> str:
    """Content hash of `<processed_dir>/<dataset>/dataset.npz`.

    The md5 that `dvc.lock` records for it (so the version can be looked up in DVC) when the
    file really has that md5; otherwise `md5:<md5 of the file>` (a file DVC did not produce,
    or one changed since `dvc repro`). Either way the same bytes give the same version.
    """
    path = Path(processed_dir) / dataset / DATASET_FILE
    if not path.is_file():
        raise DataError(path, f"not found; build it with `dvc repro validation@{dataset}`")
    actual = file_md5(path)
    recorded = _dvc_lock_md5s(repo)
    candidates = [f"data/processed/{dataset}/{DATASET_FILE}"]
    try:
        candidates.append(path.resolve().relative_to(Path(repo).resolve()).as_posix())
    except ValueError:
        pass  # outside the repo: only the conventional DVC path can name it
    if any(recorded.get(candidate) == actual for candidate in candidates):
        return actual
    return f"md5:{actual}"


def resolved_config(train: TrainConfig, hyper: Any) -> dict[str, dict[str, Any]]:
    """`{"train": {...}, "hyper": {...}}`: the resolved config as plain JSON-able dicts."""
    return {"train": dataclasses.asdict(train), "hyper": dataclasses.asdict(hyper)}


def _result_config(config: dict[str, Any]) -> dict[str, Any]:
    # Non-result keys may sit at the top level (a flat config) or in the "train" section.
    kept = {k: v for k, v in config.items() if k not in NON_RESULT_KEYS}
    if isinstance(kept.get("train"), dict):
        kept["train"] = {k: v for k, v in kept["train"].items() if k not in NON_RESULT_KEYS}
    return kept


def run_key(dataset: str, method: str, seed: int, config: dict, code: str, data: str) -> str:
    """sha256 (hex) of the canonical JSON of everything that determines a run's result.

    `config` is the resolved config (`resolved_config(train, hyper)`); `device`, `threads`
    and `eval_every` are left out (at the top level and in `config["train"]`) since they do
    not change the trained model. Keys are sorted, so dict order does not matter.
    """
    payload = {
        "version": RUN_KEY_VERSION,
        "dataset": dataset,
        "method": method,
        "seed": int(seed),
        "config": _result_config(config),
        "code": code,
        "data": data,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested dicts -> `{"a.b": str(value)}` (MLflow params are flat strings)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = str(value)
    return flat


def resolve_processed_dir(path: Path, repo: Path) -> Path:
    """params.yaml's processed folder as an absolute path."""
    # params.yaml paths are relative to the repo (DVC runs there); a worker's cwd may differ.
    return path if path.is_absolute() else Path(repo) / path


@dataclass(frozen=True)
class RunIdentity:
    """Everything that names a run, resolved once."""

    train: TrainConfig
    hyper: Any
    config: dict[str, Any]
    processed_dir: Path
    code: str
    data: str
    key: str


def identify(
    params: Params,
    repo: Path,
    dataset: str,
    method: str,
    seed: int,
    overrides: dict | None,
    code: str | None = None,
) -> RunIdentity:
    """Resolve a (data set, method, seed, overrides) cell against params.yaml: its config,
    data folder, code and data versions and run key. `code` names another code version
    than the checkout's (e.g. the one a committed report was made of)."""
    train, hyper = resolve_config(params, dataset, method, overrides)
    config = resolved_config(train, hyper)
    processed_dir = resolve_processed_dir(params.data.processed_dir, repo)
    code = code or code_version(repo)
    data = data_version(processed_dir, dataset, repo)
    key = run_key(dataset, method, seed, config, code, data)
    return RunIdentity(train, hyper, config, processed_dir, code, data, key)
