"""The local services' life cycle (flows/services.py), without Prefect: plain processes stand
in for the server, a worker and the training a worker starts. Issue 14, faults 3 and 10."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows.services import Services, exclusive_run, leftovers, stop_leftovers

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")

# A service that notes in `log` when it is asked to stop, after `delay` seconds of cleanup.
STOPPABLE = """
import signal, sys, time
log, name, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
def stop(*_):
    time.sleep(delay)
    with open(log, "a") as handle:
        handle.write(name + "\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open(log + "." + name, "w").close()
while True:
    time.sleep(0.1)
"""


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_stop_ends_the_workers_before_the_server(tmp_path):
    """Fault 10: SIGTERM reached the server and the workers together, so a worker still
    reporting its runs lost its server (and was SIGKILLed after the grace period)."""
    log = tmp_path / "stopped"
    services = Services(tmp_path / "logs", dict(os.environ, PREFECT_HOME=str(tmp_path)))
    stoppable = [sys.executable, "-c", STOPPABLE, str(log)]
    services.spawn("prefect-server", [*stoppable, "server", "0"], stop_last=True)
    services.spawn("worker", [*stoppable, "worker", "0.5"])  # needs 0.5 s to wind down
    wait_for(lambda: Path(f"{log}.server").exists() and Path(f"{log}.worker").exists())
    services.stop(grace=10)
    assert log.read_text().split() == ["worker", "server"]


# A run of flows.local in miniature: holds the Prefect home's lock, starts a server and a
# worker, and the worker starts a training in a session of its own (as Prefect's process
# worker does), then the run waits to be killed.
RUN = """
import os, subprocess, sys, time
from pathlib import Path
from flows.services import Services, exclusive_run
home = Path(sys.argv[1])
lock = exclusive_run(home)
services = Services(home / "logs", dict(os.environ, PREFECT_HOME=str(home)))
sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
server = services.spawn("prefect-server", sleep, stop_last=True)
training = (
    "import subprocess, sys, time; p = subprocess.Popen(sys.argv[1:], start_new_session=True); "
    f"open({str(home / 'training.pid')!r}, 'w').write(str(p.pid)); time.sleep(600)"
)
worker = services.spawn("worker", [sys.executable, "-c", training, *sleep])
(home / "services.pid").write_text(f"{server.pid} {worker.pid}")
time.sleep(600)
"""


def test_a_killed_run_leaves_nothing_that_the_next_run_does_not_stop(tmp_path):
    """Fault 3: SIGKILL of flows.local orphaned its server and workers, and the next run
    started another server on the same database while the old workers kept training."""
    home = tmp_path / "home"
    run = subprocess.Popen(
        [sys.executable, "-c", RUN, str(home)],
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=REPO,
    )
    try:
        wait_for(lambda: (home / "training.pid").is_file() and (home / "services.pid").is_file())
        wait_for(lambda: (home / "training.pid").read_text().strip() != "")
        server, worker = (int(pid) for pid in (home / "services.pid").read_text().split())
        training = psutil.Process(int((home / "training.pid").read_text()))
        run.send_signal(signal.SIGKILL)
        run.wait(10)
        # The services die with the run that started them ...
        wait_for(lambda: not psutil.pid_exists(server) and not psutil.pid_exists(worker), 10)
        # ... but a training in a session of its own outlives its worker: the next run,
        # holding the lock, finds it by its marks and stops it before starting anything.
        assert training.is_running()
        lock = exclusive_run(home)
        try:
            assert [p.pid for p in leftovers(home)] == [training.pid]
            assert stop_leftovers(home, grace=5) == 1
            assert not training.is_running() or training.status() == psutil.STATUS_ZOMBIE
            assert leftovers(home) == []
        finally:
            lock.close()
    finally:
        if run.poll() is None:
            run.kill()
        for process in psutil.process_iter():
            try:
                if process.environ().get("UBO_SERVICES_HOME") == str(home.resolve()):
                    process.kill()
            except psutil.Error:
                pass
