"""Warm starts (flows/warm.py): a flow-run process forked from a worker's warm server must be
what `python -m prefect.engine` would have been: the same environment, working directory,
streams and exit status, signals passed on, killed with its `start`, and cold when the
project's code changed or no server answers. Issue 15, part 5. The engine is replaced by
tests/warm_probe.py (UBO_WARM_MODULE); tests/test_flows.py runs real flow runs warm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from flows.warm import MODULE_ENV, SOCKET_ENV

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env[MODULE_ENV] = "warm_probe"
    env.pop(SOCKET_ENV, None)
    return env


@pytest.fixture(scope="module")
def server():
    name = f"@ubo-warm-test-{uuid.uuid4().hex[:8]}"
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.warm", "serve", "--socket", name],
        cwd=REPO,
        env=base_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    line = process.stdout.readline()  # after the preload
    assert "serving" in line, line + process.stdout.read()
    yield name
    process.terminate()
    assert process.wait(30) == 0


def start(env: dict[str, str], cwd: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.warm", "start"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def echo(env: dict[str, str], cwd: Path) -> tuple[dict, str, int]:
    process = start(env | {"PROBE_MODE": "echo", "PROBE_VALUE": "x y", "PROBE_EXIT": "3"}, cwd)
    out, err = process.communicate(timeout=60)
    return json.loads(out), err, process.returncode


def test_a_warm_run_gets_the_environment_directory_streams_and_exit_status_of_a_cold_one(
    server, tmp_path
):
    warm, warm_err, warm_code = echo(base_env() | {SOCKET_ENV: server}, tmp_path)
    cold, cold_err, cold_code = echo(base_env(), tmp_path)
    assert warm.pop("warm") and not cold.pop("warm")
    assert warm == cold == {"cwd": str(tmp_path), "value": "x y", "argv": []}
    assert warm_code == cold_code == 3
    assert warm_err == cold_err == "to stderr\n"


def test_without_its_server_a_run_starts_cold_and_says_why(tmp_path):
    gone = f"@ubo-warm-test-{uuid.uuid4().hex[:8]}"  # nobody serves it
    report, err, code = echo(base_env() | {SOCKET_ENV: gone}, tmp_path)
    assert not report["warm"] and code == 3
    assert err.splitlines()[0].startswith(f"flows.warm: no warm server at {SOCKET_ENV}={gone}")


def wait_for_pid(marker: Path) -> int:
    deadline = time.monotonic() + 60
    while not (marker.exists() and marker.read_text().endswith("\n")):
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)
    return int(marker.read_text().split()[0])


def test_sigterm_to_start_reaches_the_run(server, tmp_path):
    marker = tmp_path / "marker"
    env = base_env() | {SOCKET_ENV: server, "PROBE_MODE": "wait", "PROBE_MARKER": str(marker)}
    process = start(env, tmp_path)
    wait_for_pid(marker)
    process.send_signal(signal.SIGTERM)  # what a worker sends to cancel a flow run
    process.communicate(timeout=30)
    assert process.returncode == 7
    assert marker.read_text().split()[1:] == ["terminated"]


def test_a_killed_start_takes_its_run_with_it(server, tmp_path):
    marker = tmp_path / "marker"
    env = base_env() | {SOCKET_ENV: server, "PROBE_MODE": "wait", "PROBE_MARKER": str(marker)}
    process = start(env, tmp_path)
    run = psutil.Process(wait_for_pid(marker))
    process.kill()  # its worker's machine lost: the run must not train on unseen
    process.communicate(timeout=30)
    run.wait(timeout=30)
    assert not psutil.pid_exists(run.pid) or run.status() == psutil.STATUS_ZOMBIE


def test_a_run_killed_by_a_signal_ends_start_with_the_same_signal(server, tmp_path):
    process = start(base_env() | {SOCKET_ENV: server, "PROBE_MODE": "die"}, tmp_path)
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL


def test_a_run_after_the_projects_code_changed_starts_cold(server, tmp_path):
    """The server imported the project when it started: a run must not train with code
    other than what is on disk, which its code version names."""
    source = REPO / "flows" / "warm.py"
    before = source.stat()
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    try:
        report, err, code = echo(base_env() | {SOCKET_ENV: server}, tmp_path)
    finally:
        os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert not report["warm"] and code == 3
    assert f"flows.warm: {source} changed since the warm server started" in err
    warm, _, _ = echo(base_env() | {SOCKET_ENV: server}, tmp_path)
    assert warm["warm"]  # restored: warm again


@pytest.mark.parametrize(
    ("hint", "expected"), [(None, [1, 3]), ("1", [1]), ("2", [2]), ("x", None), ("0", None)]
)
def test_kernels_are_compiled_for_the_thread_counts_runs_will_use(monkeypatch, hint, expected):
    """Without a hint, a server compiles dense kernels for one thread (the study's) and its
    own count; with the launcher's hint (flows/local.py: every run of several CPU workers gets
    one thread) for that count alone, half the compile before the first run; a bad hint stops
    with one line naming it."""
    import torch

    from flows import warm
    from ubo_core import fused

    threads, compiled_for = {"now": 3}, []  # a server with 3 threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads["now"])
    monkeypatch.setattr(torch, "set_num_threads", lambda n: threads.update(now=n))
    monkeypatch.setattr(fused, "warm_up", lambda: compiled_for.append(threads["now"]) or True)
    if hint is None:
        monkeypatch.delenv(warm.RUN_THREADS_ENV, raising=False)
    else:
        monkeypatch.setenv(warm.RUN_THREADS_ENV, hint)
    if expected is None:
        with pytest.raises(SystemExit, match=warm.RUN_THREADS_ENV):
            warm.compile_dense_kernels()
        return
    said = warm.compile_dense_kernels()
    assert compiled_for == expected and threads["now"] == 3  # the server's count restored
    assert said == f"dense kernels compiled for {' and '.join(map(str, expected))} thread(s)"
