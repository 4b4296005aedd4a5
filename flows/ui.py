"""`make ui`: the MLflow UI on this project's store, light, and the Prefect UI if asked.

    python -m flows.ui [--port 5000] [--prefect] [--prefect-port 4200]

MLflow: `mlflow server` with one worker and without MLflow's job runner (the GenAI jobs this
project never submits: `mlflow ui` as such starts about 10 processes and 2.7 GiB), on
MLFLOW_TRACKING_URI or the repository's sqlite:///mlflow.db. `--prefect`: the Prefect UI of
`.prefect/`, the server `make benchmark` uses; if a `make benchmark` or `make tune` is running
its server already serves it, and this prints that address instead of starting a second one.
A taken port stops it at once with exit status 1. Ctrl-C stops what it started.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from flows.services import (
    REPO,
    STATE_DIR,
    Services,
    exclusive_run,
    report_leftovers,
    service_env,
    start_server,
)
from flows.store import open_store
from ubo_core.errors import UboError


def port_taken(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def mlflow_command(store: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        store,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def wait_for(url: str, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the MLflow server exited; its log {log}:\n{log.read_text()}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s (log: {log})")


def lock_is_free(prefect_home: Path) -> bool:
    try:
        exclusive_run(prefect_home, holder="a probe of flows.ui").close()
    except RuntimeError:
        return False
    return True


def running_prefect_server(prefect_home: Path) -> str | None:
    """The API URL of the server a running `flows.local` holds (its lock file names it)."""
    lock = prefect_home / "flows-local.lock"
    if not lock.is_file():
        return None
    for line in lock.read_text().splitlines():
        if line.startswith("its server: "):
            return line.removeprefix("its server: ").strip()
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.ui", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=5000, help="the MLflow UI's port")
    parser.add_argument("--prefect", action="store_true", help="also the Prefect UI")
    parser.add_argument("--prefect-port", type=int, default=4200)
    args = parser.parse_args(argv)
    env = service_env() | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    store = env["MLFLOW_TRACKING_URI"]
    try:
        open_store(store, REPO)  # a corrupt or locked store: one line, before any server
    except UboError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    home = Path(env["PREFECT_HOME"])
    study_server = running_prefect_server(home) if args.prefect else None
    if study_server and not lock_is_free(home):
        print(f"Prefect UI: {study_server.removesuffix('/api')} (the running study's server)")
        args.prefect = False  # nothing of ours to start
    ports = [args.port, args.prefect_port] if args.prefect else [args.port]
    taken = [port for port in ports if port_taken(port)]
    if taken:
        print(
            f"error: port {taken[0]} is taken (another `make ui`, or a server of yours); "
            "choose another with --port / --prefect-port",
            file=sys.stderr,
        )
        return 1
    # SIGTERM (a `timeout`, a stopped terminal) stops it like Ctrl-C: nothing is left running.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    logs = STATE_DIR / "ui"
    logs.mkdir(parents=True, exist_ok=True)
    services = Services(logs, env)
    lock = None
    mlflow_log = logs / "mlflow.log"
    with open(mlflow_log, "w") as log:
        mlflow = subprocess.Popen(
            mlflow_command(store, args.port),
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        if args.prefect:
            # Held while the UI runs: a `make benchmark` started meanwhile says so and stops,
            # rather than start a second server on the same database.
            lock = exclusive_run(home, holder="`make ui PREFECT=1` (python -m flows.ui)")
            report_leftovers(home)
            api_url = f"http://127.0.0.1:{args.prefect_port}/api"
            lock.write(f"its server: {api_url}\n")
            lock.flush()
            start_server(services, env, args.prefect_port)
            print(f"Prefect UI: {api_url.removesuffix('/api')}")
        wait_for(f"http://127.0.0.1:{args.port}/health", mlflow, mlflow_log)
        print(f"MLflow UI:  http://127.0.0.1:{args.port}  (store {store})", flush=True)
        print("Ctrl-C stops them.", flush=True)
        while mlflow.poll() is None:
            services.check_alive()
            time.sleep(1)
        print(f"error: the MLflow server exited (log {mlflow_log})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(mlflow.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            mlflow.wait(timeout=15)
        services.stop()
        if lock is not None:
            lock.close()


if __name__ == "__main__":
    sys.exit(main())
