"""The Prefect services this project starts on one machine: a server (SQLite under
.prefect/) whose UI talks to its own port, workers, each in its own process group with its
log, and the lock that keeps two of them off one Prefect home. `flows.local` (make benchmark,
make tune) and `flows.ui` (make ui) use them; so do the tests' throwaway stacks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO

import psutil

REPO = Path(__file__).resolve().parents[1]
STATE_DIR = REPO / ".prefect"
# Marks of a service's process and of every process it starts (inherited environment):
# which Prefect home, which run's process (pid) started it, and its name.
OWNER_HOME, OWNER_PID, SERVICE_NAME = "UBO_SERVICES_HOME", "UBO_SERVICES_OWNER", "UBO_SERVICE"
# The launcher of every service: on Linux ask for SIGTERM when the run that started it dies
# (then exit at once if it already has: the request came too late), then become the service.
DIE_WITH_PARENT = """
import os, signal, sys
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass  # not Linux: the next run stops what is left (stop_leftovers)
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


# How often a worker asks the server for scheduled runs. Prefect's default, 10 s, left a free
# worker idle 5 s on average (up to 10) before each cell: most of a Coat cell's wall time
# (docs/PERFORMANCE.md, orchestration); 2 s still left 1.3-1.6 s between warm-started cells.
# A poll is one cheap request (it marks the queue as polled: a small write, which SQLite
# takes in its stride at a few workers).
WORKER_QUERY_SECONDS = "1"


# How often the Prefect server's cancellation cleanup looks for subflow runs whose parent was
# cancelled (Prefect's default: 20 s). Each pass reads every open child of a study, one by
# one: with 140 children waiting it kept a SQLite server near half of one of the two cores
# the trainings share (py-spy: most of the server's time). Our parent cancels its own
# waiting children when it is stopped (flows/benchmark.py) and flows.local closes what a
# killed one left; the cleanup, every 5 minutes, remains for the rest.
CANCELLATION_CLEANUP_SECONDS = "300"


def service_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PREFECT_HOME", str(STATE_DIR))
    env.setdefault("UBO_REPO", str(REPO))
    # Offline machines: Prefect's and DVC's telemetry would only time out.
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["DO_NOT_TRACK"] = "1"
    env["DVC_NO_ANALYTICS"] = "1"
    # A Prefect client without an API URL would silently start a temporary server of its
    # own on the same SQLite database: fail instead.
    env["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "false"
    # SQLite takes one writer at a time. The late-runs service rewrites the state of every
    # child still queued for a worker (most of a study's, for most of its hour) every 5 s;
    # 84 of those writes met "database is locked" in one tuning run's server log. A child
    # queued for a free worker is not late.
    env.setdefault("PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED", "false")
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{REPO / 'mlflow.db'}")
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", WORKER_QUERY_SECONDS)
    env.setdefault(
        "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_LOOP_SECONDS", CANCELLATION_CLEANUP_SECONDS
    )
    return env


class Services:
    """Background Prefect processes (server, workers), each in its own process group with its
    log under `log_dir`.

    `stop` ends them and everything they started (flow-run processes that a worker put in a
    session of their own included): SIGTERM, then SIGKILL after a grace period. The tests'
    throwaway stacks (tests/test_flows.py) use the same class.
    """

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.processes: list[tuple[str, subprocess.Popen, IO, bool]] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(
        self,
        name: str,
        prefect_args: list[str],
        cwd: Path = REPO,
        env: dict[str, str] | None = None,
        stop_last: bool = False,
    ) -> subprocess.Popen:
        """`python -m prefect <prefect_args>` in the background (a server: `stop_last`)."""
        return self.spawn(
            name, [sys.executable, "-m", "prefect", *prefect_args], cwd, env, stop_last
        )

    def start_training_worker(
        self, name: str, worker_args: list[str], cwd: Path = REPO, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        """`prefect worker start <worker_args>` as service `worker-<name>`, with a warm server
        of its own that its flow runs are forked from (`python -m flows.warm worker`)."""
        argv = [sys.executable, "-m", "flows.warm", "worker", *worker_args]
        return self.spawn(f"worker-{name}", argv, cwd, env)

    def spawn(
        self,
        name: str,
        argv: list[str],
        cwd: Path = REPO,
        env: dict[str, str] | None = None,
        stop_last: bool = False,
    ) -> subprocess.Popen:
        """`argv` in the background, in a session of its own, logging to `<name>.log`.

        It is marked (environment variables every process it starts inherits) as this
        process's service on this Prefect home, so that a later run on the same home finds
        whatever a killed run left (`stop_leftovers`); on Linux it gets SIGTERM when this
        process dies (PR_SET_PDEATHSIG). `stop_last` processes (the server) are stopped after
        the others, which need them to end cleanly."""
        env = dict(env or self.env)
        env |= {
            OWNER_HOME: str(prefect_home_of(env)),
            OWNER_PID: str(os.getpid()),
            SERVICE_NAME: name,
        }
        log = open(self.log_dir / f"{name}.log", "w")  # noqa: SIM115 (closed by stop)
        process = subprocess.Popen(
            [sys.executable, "-c", DIE_WITH_PARENT, str(os.getpid()), *argv],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.processes.append((name, process, log, stop_last))
        return process

    def check_alive(self) -> None:
        for name, process, _, _ in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited ({process.returncode}):\n{self.tail(name)}")

    def tail(self, name: str | None = None, lines: int = 40) -> str:
        names = [name] if name else [n for n, _, _, _ in self.processes]
        parts = []
        for each in names:
            path = self.log_dir / f"{each}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"--- {each} ({path}) ---\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

    def stop(self, grace: float = 15.0) -> None:
        """Stop the workers (and what they started) first, then the server: a worker that
        loses its server mid-stop cannot report its runs and is killed after the grace."""
        first = [entry for entry in self.processes if not entry[3]]
        last = [entry for entry in self.processes if entry[3]]
        for wave in (first, last):
            if wave:
                self._stop_wave(wave, grace)
        for _, _, log, _ in self.processes:
            log.close()
        self.processes.clear()

    @staticmethod
    def _stop_wave(wave: list[tuple[str, subprocess.Popen, IO, bool]], grace: float) -> None:
        descendants = []
        for _, process, _, _ in wave:
            with contextlib.suppress(psutil.Error):
                descendants += psutil.Process(process.pid).children(recursive=True)
        for _, process, _, _ in reversed(wave):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for child in descendants:
            with contextlib.suppress(psutil.Error):
                child.terminate()
        deadline = time.monotonic() + grace
        for name, process, _, _ in wave:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(5)
                print(f"killed {name}", file=sys.stderr)
        _, alive = psutil.wait_procs(descendants, timeout=max(0.1, deadline - time.monotonic()))
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()


def prefect_home_of(env: dict[str, str]) -> Path:
    return Path(env.get("PREFECT_HOME", STATE_DIR)).resolve()


def leftovers(prefect_home: Path) -> list[psutil.Process]:
    """Processes a killed run left on `prefect_home`: every process marked as a service of
    it (`Services.spawn`), or started by one, whose owner is no longer this process. Call it
    holding the home's lock (`exclusive_run`): no live run owns them then."""
    home, found = str(prefect_home.resolve()), []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            environ = process.environ()
            if environ.get(OWNER_HOME) == home and environ.get(OWNER_PID) != str(os.getpid()):
                found.append(process)
    return found


def stop_leftovers(prefect_home: Path, grace: float = 15.0) -> int:
    """Stop what a killed run left on `prefect_home` (workers, the trainings they started,
    then its server), so that no old worker trains beside the new run's; returns how many
    processes were stopped."""
    found = leftovers(prefect_home)

    def is_server(process: psutil.Process) -> bool:
        with contextlib.suppress(psutil.Error):
            return process.environ().get(SERVICE_NAME) == "prefect-server"
        return False

    for wave in ([p for p in found if not is_server(p)], [p for p in found if is_server(p)]):
        terminate(wave, grace)
    return len(found)


def terminate(processes: list[psutil.Process], grace: float) -> None:
    """SIGTERM `processes`, and SIGKILL those still alive after `grace` seconds."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=5)


def prefect(
    env: dict[str, str], *args: str, check: bool = True, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"`prefect {' '.join(args)}` failed:\n{done.stdout}\n{done.stderr}")
    return done


def run_checked(argv: list[str], **kwargs) -> str:
    """Run a set-up command to its end; its stdout, or a RuntimeError with all it printed."""
    done = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def free_port(preferred: int | None = 4200) -> int:
    """`preferred` if nothing listens there, else any free port."""
    if preferred is not None:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", preferred)) != 0:
                return preferred
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(api_url: str, services: Services, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        services.check_alive()
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise RuntimeError(f"Prefect server at {api_url} not healthy after {timeout:.0f} s")


def report_leftovers(prefect_home: Path) -> int:
    """`stop_leftovers`, saying so in one line if there were any."""
    if stopped := stop_leftovers(prefect_home):
        print(
            f"stopped {stopped} process(es) left running on {prefect_home} by an earlier run "
            "that was killed (its server, workers and their trainings)"
        )
    return stopped


def exclusive_run(prefect_home: Path, holder: str = "`python -m flows.local`") -> IO:
    """Hold an exclusive lock on `<prefect_home>/flows-local.lock` until the returned file is
    closed (or the process dies); `holder` names this process in it. A second run on the same
    Prefect home would start a second server on the same SQLite database and reset the pools'
    concurrency limits under the first run's workers; submit extra work to the running server
    instead."""
    prefect_home.mkdir(parents=True, exist_ok=True)
    path = prefect_home / "flows-local.lock"
    handle = open(path, "a+")  # noqa: SIM115 (held open: the lock lives as long as the file)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        held_by = " ".join(handle.read().split()) or "another process"
        handle.close()
        raise RuntimeError(
            f"{path} is locked by a running {held_by}. Wait for it (or stop it), or submit to "
            "its server: PREFECT_API_URL=<its api url> prefect deployment run "
            "ubo/full-benchmark (or ubo/tune) --param ..."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{holder} (pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    handle.flush()
    return handle


def start_server(services: Services, env: dict[str, str], port: int) -> dict[str, str]:
    """A Prefect server on 127.0.0.1:`port` whose UI talks to it; returns `env` with its API
    URL, once it answers."""
    api_url = f"http://127.0.0.1:{port}/api"
    services.start(
        "prefect-server",
        ["server", "start", "--host", "127.0.0.1", "--port", str(port)],
        # The UI's API address defaults to port 4200 whatever the server's port: it would
        # show another server's runs.
        env=env | {"PREFECT_SERVER_UI_API_URL": api_url},
        stop_last=True,
    )
    env = env | {"PREFECT_API_URL": api_url}
    services.env = env
    wait_healthy(api_url, services)
    return env


def report_locked_database(server_log: Path) -> int:
    """Say (one line) if the Prefect server's SQLite database was ever locked during the run:
    the server retries, but the log holds a traceback for each time."""
    if not server_log.is_file():
        return 0
    count = server_log.read_text(errors="replace").count("database is locked")
    if count:
        print(
            f"note: the Prefect server's SQLite database was locked {count} time(s) (tracebacks "
            f"in {server_log}); Prefect retried them. If runs fail or hang, SQLite cannot keep "
            "up here: run the server on PostgreSQL (README, Several machines)."
        )
    return count
