"""Helpers of tests/test_flows.py: a throwaway copy of the repository, background services
(Prefect server and workers as process groups, always stopped) and a test-only fault hook.

Nothing here touches the repository itself: logs, Prefect's database, MLflow's store and the
processed data all live under the test's temporary directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO

import psutil  # a dependency of dvc, which the project pins

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# Loaded as `sitecustomize` by the training workers and the flow runs they start, because
# their PYTHONPATH names the directory this is written to (no other process sees it).
FAULT_HOOK = '''"""Test-only fault injection (tests/test_flows.py).

While the file named by $UBO_TEST_FAULT_FILE exists and holds "<method> <seed>", training that
(method, seed) crashes right after its first epoch was reported (and logged to MLflow), like
a worker dying mid-run. `ubo_core.trainer.fit` is wrapped when the module is first imported
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
            method, seed = handle.read().split()
    except (OSError, ValueError):
        return None
    return method, int(seed)


def _wrap(module):
    fit = module.fit

    def fit_with_fault(
        method_name, data, train, hyper, seed, callback=None, progress=True, **kwargs
    ):
        if _target() != (method_name, int(seed)):
            return fit(method_name, data, train, hyper, seed, callback, progress, **kwargs)

        def crash(report):
            if callback is not None:
                callback(report)
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
    (repo / "params.yaml").write_text(
        "data:\n  processed_dir: data/processed\n"
        "train:\n  epochs: 4\n"  # the benchmark scenarios pass their own epochs
        "tuning:\n  trials: {coat: 3}\n  startup_trials: 2\n  prune_after_epochs: 2\n"
        "  space:\n"
        "    umf: {lr: {low: 0.01, high: 0.1, log: true}}\n"
        "    ubo: {lr: {low: 0.01, high: 0.1, log: true}}\n"
    )
    return repo


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Services:
    """Background processes, each in its own process group with its log under `log_dir`.

    `stop` ends them and everything they started (flow-run processes that a worker put in a
    session of their own included): SIGTERM, then SIGKILL after a grace period.
    """

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.processes: list[tuple[str, subprocess.Popen, IO]] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, args: list[str], cwd: Path, env: dict[str, str] | None = None):
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 (closed by stop)
        process = subprocess.Popen(
            [PYTHON, "-m", "prefect", *args],
            cwd=cwd,
            env=env or self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append((name, process, log))
        return process

    def check_alive(self) -> None:
        for name, process, _ in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited ({process.returncode}):\n{self.tail(name)}")

    def tail(self, name: str | None = None, lines: int = 40) -> str:
        names = [name] if name else [n for n, _, _ in self.processes]
        parts = []
        for each in names:
            path = self.log_dir / f"{each}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {each} ---\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

    def _descendants(self) -> list[psutil.Process]:
        found = []
        for _, process, _ in self.processes:
            with contextlib.suppress(psutil.Error):
                found += psutil.Process(process.pid).children(recursive=True)
        return found

    def stop(self, grace: float = 15.0) -> None:
        descendants = self._descendants()
        for _, process, _ in reversed(self.processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for child in descendants:
            with contextlib.suppress(psutil.Error):
                child.terminate()
        deadline = time.monotonic() + grace
        for _, process, _ in self.processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
        _, alive = psutil.wait_procs(descendants, timeout=max(0.1, deadline - time.monotonic()))
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
        for _, _, log in self.processes:
            log.close()
        self.processes.clear()


def wait_healthy(api_url: str, services: Services, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        services.check_alive()
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise RuntimeError(f"Prefect server at {api_url} not healthy after {timeout:.0f} s")


def prefect_cli(env: dict[str, str], cwd: Path, *args: str) -> str:
    done = subprocess.run(
        [PYTHON, "-m", "prefect", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"`prefect {' '.join(args)}` failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout
