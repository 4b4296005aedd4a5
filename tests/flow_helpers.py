"""Helpers of tests/test_flows.py: a throwaway copy of the repository and a test-only fault
hook. The background services (Prefect server and workers as process groups, always stopped)
are flows/services.py's `Services`, the same class `make benchmark` uses.

Nothing here touches the repository itself: logs, Prefect's database, MLflow's store and the
processed data all live under the test's temporary directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from params_file import write_params

REPO = Path(__file__).resolve().parents[1]

# Loaded as `sitecustomize` by the training workers and the flow runs they start, because
# their PYTHONPATH names the directory this is written to (no other process sees it).
FAULT_HOOK = '''"""Test-only fault injection (tests/test_flows.py).

While the file named by $UBO_TEST_FAULT_FILE exists and holds "<method> <seed>", training that
(method, seed) crashes right after its first epoch was reported (and logged to MLflow), like
a worker dying mid-run; with "<method> <seed> hang" it hangs there instead (a test then kills
its process). `ubo_core.trainer.fit` is wrapped when the module is first imported
(a meta path hook), whichever copy of ubo_core the flow run imports. Deleting the file fixes
the fault.
"""

import importlib.abc
import os
import sys

FAULT_FILE = os.environ.get("UBO_TEST_FAULT_FILE")


def _target():
    try:
        with open(FAULT_FILE) as handle:
            method, seed, *mode = handle.read().split()
    except (OSError, ValueError):
        return None
    return method, int(seed), mode == ["hang"]


def _wrap(module):
    fit = module.fit

    def fit_with_fault(
        method_name, data, train, hyper, seed, callback=None, progress=True, **kwargs
    ):
        target = _target()
        if target is None or target[:2] != (method_name, int(seed)):
            return fit(method_name, data, train, hyper, seed, callback, progress, **kwargs)

        def crash(report):
            if callback is not None:
                callback(report)
            if target[2]:
                import time

                time.sleep(3600)
            raise RuntimeError(
                f"injected fault: {method_name} seed {seed} crashed after epoch {report.epoch}"
            )

        return fit(method_name, data, train, hyper, seed, crash, progress, **kwargs)

    module.fit = fit_with_fault


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "ubo_core.trainer":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            _wrap(module)

        spec.loader.exec_module = exec_and_wrap
        return spec


if FAULT_FILE:
    sys.meta_path.insert(0, _Hook())
'''


def make_repo_copy(root: Path) -> Path:
    """`<root>/repo`: the code the workers run (ubo_core/, flows/, prefect.yaml,
    pyproject.toml) with a minimal params.yaml whose processed_dir is the copy's own
    (relative) data/processed; the caller writes the data there. Not a git repository."""
    repo = root / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("ubo_core", "flows"):
        shutil.copytree(REPO / package, repo / package, ignore=ignore)
    for name in ("prefect.yaml", "pyproject.toml"):
        shutil.copy2(REPO / name, repo / name)
    write_params(
        repo / "params.yaml",
        "data:\n  processed_dir: data/processed\n"
        "train:\n  epochs: 4\n"  # the benchmark scenarios pass their own epochs
        "tuning:\n  trials: {coat: 3}\n  startup_trials: 2\n  prune_after_epochs: 2\n"
        "  space:\n"
        "    umf: {lr: {low: 0.01, high: 0.1, log: true}}\n"
        "    ubo: {lr: {low: 0.01, high: 0.1, log: true}}\n",
    )
    return repo
