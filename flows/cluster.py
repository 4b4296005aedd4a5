"""`make cluster-up` / `make cluster-down`: the several-machines setup on one machine, for
real: PostgreSQL, a Prefect server and an MLflow tracking server on it, and worker "hosts"
that share nothing but the two server URLs (the MLflow server proxies the artifact store).

    python -m flows.cluster up [--root .cluster] [--hosts 3] [--datasets coat]
        [--netns auto|on|off]
    python -m flows.cluster down [--root .cluster]
    python -m flows.cluster status [--root .cluster]
    python -m flows.cluster restart-db [--root .cluster]

Each host is what docs/SCALING.md tells a user to set up on another machine: its own clone
of this repository (the committed code, `git clone`), its own data (`dvc repro`, from the
mirror when UBO_DATA_MIRROR is set), its own Prefect home, and a worker started with
PREFECT_API_URL, MLFLOW_TRACKING_URI and UBO_REPO. Where the machine allows it (root, `ip
netns`; `--netns auto`, the default) each host is also its own network namespace: its own
loopback and one interface on a private bridge (10.231.X.0/24, no route out of the machine),
where the two servers listen on the bridge's address; a host cannot reach anything else on
this machine, PostgreSQL included (it listens on 127.0.0.1 for the servers only). The hosts
share this machine's Python environment and file system; nothing else. The servers and
workers keep running after `up` returns (their pids and logs are under the root); `down`
stops the workers, then the servers, then PostgreSQL, and drops the databases: a cluster here
is for trying the setup and for its test; docs/SCALING.md describes a lasting one.

The deployments are created without UBO_REPO in the environment, so their pull step keeps
`{{ $UBO_REPO }}` and each worker runs the code of its own clone, wherever it is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from flows.cluster_network import make_network, netns_available, remove_network
from flows.services import (
    CANCELLATION_CLEANUP_SECONDS,
    WORKER_QUERY_SECONDS,
    free_port,
    run_checked,
    terminate,
)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO / ".cluster"
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
CONTROL_POOL, TRAIN_POOL, GPU_POOL = "ubo-control", "ubo-cpu", "ubo-gpu"


@dataclass
class ClusterState:
    """What `up` started, written to <root>/cluster.json for `down` and `status`."""

    root: str
    pg_port: int
    pg_dir: str  # the database cluster, its socket and its log
    prefect_url: str
    mlflow_url: str
    hosts: list[str]
    pids: dict[str, int] = field(default_factory=dict)  # service name -> process group
    # The hosts' network namespaces (`make_network`), or None: all on this machine's loopback.
    network: dict | None = None

    def save(self) -> None:
        path = Path(self.root) / "cluster.json"
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, root: Path) -> ClusterState:
        path = root / "cluster.json"
        if not path.is_file():
            raise RuntimeError(f"{path}: no cluster here (python -m flows.cluster up)")
        return cls(**json.loads(path.read_text()))


def pg_bin() -> Path:
    found = sorted(Path("/").glob(PG_BIN_GLOB.lstrip("/")))
    if not found:
        raise RuntimeError(f"PostgreSQL not found ({PG_BIN_GLOB}); apt-get install postgresql")
    return found[-1]


def as_db_owner(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as `postgres` when we are root."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _detach(name: str, argv: list[str], cwd: Path, env: dict[str, str], logs: Path) -> int:
    """Start `argv` in a session of its own that outlives this process; returns its pid."""
    with open(logs / f"{name}.log", "w") as log:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process.pid


def _wait_http(url: str, what: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        time.sleep(1)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f} s (log {log})")


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.pop("UBO_REPO", None)
    env |= {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        # While PostgreSQL restarts the Prefect server answers 500, which Prefect's clients
        # do not retry by default: a parent polling its children would fail (SCALING.md).
        "PREFECT_CLIENT_RETRY_EXTRA_CODES": "500",
        "PREFECT_WORKER_QUERY_SECONDS": WORKER_QUERY_SECONDS,
        "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_LOOP_SECONDS": CANCELLATION_CLEANUP_SECONDS,
    }
    return env


# -- PostgreSQL ------------------------------------------------------------------------------
def postgres_dir(root: Path) -> Path:
    """Where the database cluster lives: <root>/postgres, or as root (PostgreSQL then runs as
    `postgres`, who may not be able to enter <root>) a folder of its own under the system's
    temporary directory, named in cluster.json."""
    if os.geteuid() != 0:
        return root / "postgres"
    folder = Path(tempfile.mkdtemp(prefix="ubo-cluster-postgres-"))
    shutil.chown(folder, "postgres")
    return folder


def start_postgres(pg_dir: Path) -> int:
    """A PostgreSQL cluster in `pg_dir` on a free loopback port, with databases `prefect`
    and `mlflow`; returns the port."""
    port = free_port(None)
    pg_dir.mkdir(parents=True, exist_ok=True)
    binaries = pg_bin()
    if not (pg_dir / "data" / "PG_VERSION").is_file():
        run_checked(
            as_db_owner(
                [
                    str(binaries / "initdb"),
                    "-D",
                    str(pg_dir / "data"),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                ]
            )
        )
    _pg_ctl(pg_dir, port, "start")
    for database in ("prefect", "mlflow"):
        psql(port, f"CREATE DATABASE {database}")
    return port


def _pg_ctl(pg_dir: Path, port: int, *args: str) -> None:
    options = f"-p {port} -k {pg_dir} -c listen_addresses=127.0.0.1"
    run_checked(
        as_db_owner(
            [
                str(pg_bin() / "pg_ctl"),
                "-D",
                str(pg_dir / "data"),
                "-o",
                options,
                "-l",
                str(pg_dir / "postgres.log"),
                "-w",
                *args,
            ]
        )
    )


def psql(port: int, sql: str) -> str:
    return run_checked(
        [
            str(pg_bin() / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-qtAc",
            sql,
        ]
    )


def pg_ctl(root: Path, *args: str) -> None:
    """`pg_ctl <args>` on the cluster's database (restart: `-m fast restart`)."""
    state = ClusterState.load(root)
    _pg_ctl(Path(state.pg_dir), state.pg_port, *args)


# -- up and down -------------------------------------------------------------------------------
def make_host(root: Path, name: str, datasets: list[str], env: dict[str, str]) -> Path:
    """A worker host: a clone of this repository's committed code with its own data."""
    host = root / name
    repo = host / "repo"
    if not repo.is_dir():
        run_checked(["git", "clone", "--quiet", str(REPO), str(repo)])
    (host / "home").mkdir(parents=True, exist_ok=True)
    bin_dir = str(Path(sys.executable).parent)
    host_env = env | {"PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}
    for dataset in datasets:
        run_checked(
            [sys.executable, "-m", "dvc", "repro", "-q", f"validation@{dataset}"],
            cwd=repo,
            env=host_env,
        )
    return repo


def up(root: Path, hosts: int, datasets: list[str], netns: str = "auto") -> ClusterState:
    """`netns`: "on" puts every host in a network namespace of its own (root only), "off"
    leaves them all on this machine's loopback, "auto" is "on" where the machine allows it."""
    root = root.resolve()
    if (root / "cluster.json").is_file():
        raise RuntimeError(f"{root}: a cluster is already up here (python -m flows.cluster down)")
    if netns == "on" and not netns_available():
        raise RuntimeError("--netns on needs root and `ip netns` (iproute2)")
    (root / "logs").mkdir(parents=True, exist_ok=True)
    logs, env = root / "logs", base_env()
    names = [f"host-{index}" for index in range(1, hosts + 1)]
    print(f"cloning {REPO} into {hosts} host(s) and building {', '.join(datasets)} on each")
    repos = {name: make_host(root, name, datasets, env) for name in names}
    pg_dir = postgres_dir(root)
    pg_port = start_postgres(pg_dir)
    state = ClusterState(str(root), pg_port, str(pg_dir), "", "", names)
    state.save()  # from here on, `down` can undo what was started
    print(f"PostgreSQL on 127.0.0.1:{pg_port} (databases prefect, mlflow)")
    if netns == "on" or (netns == "auto" and netns_available()):
        state.network = make_network(names)
        state.save()
        print(
            f"{hosts} network namespace(s) on bridge {state.network['bridge']}; the servers "
            f"listen on {state.network['address']}"
        )
    listen = state.network["address"] if state.network else "127.0.0.1"
    prefect_port, mlflow_port = free_port(None), free_port(None)
    prefect_url = f"http://{listen}:{prefect_port}/api"
    server_env = env | {
        "PREFECT_HOME": str(root / "prefect-server"),
        "PREFECT_API_DATABASE_CONNECTION_URL": (
            f"postgresql+asyncpg://postgres@127.0.0.1:{pg_port}/prefect"
        ),
        "PREFECT_SERVER_UI_API_URL": prefect_url,
    }
    state.pids["prefect-server"] = _detach(
        "prefect-server",
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            listen,
            "--port",
            str(prefect_port),
        ],
        root,
        server_env,
        logs,
    )
    state.pids["mlflow-server"] = _detach(
        "mlflow-server",
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            listen,
            "--port",
            str(mlflow_port),
            "--workers",
            "2",
            "--backend-store-uri",
            f"postgresql+psycopg2://postgres@127.0.0.1:{pg_port}/mlflow",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],
        root,
        env,
        logs,
    )
    state.prefect_url, state.mlflow_url = prefect_url, f"http://{listen}:{mlflow_port}"
    state.save()
    _wait_http(f"{prefect_url}/health", "the Prefect server", logs / "prefect-server.log")
    _wait_http(f"{state.mlflow_url}/health", "the MLflow server", logs / "mlflow-server.log")
    print(f"Prefect server {prefect_url} and MLflow server {state.mlflow_url}, on PostgreSQL")
    client_env = env | {"PREFECT_API_URL": prefect_url, "MLFLOW_TRACKING_URI": state.mlflow_url}
    first = repos[names[0]]
    prefect_cli = [sys.executable, "-m", "prefect"]
    deploy_env = client_env | {"PREFECT_HOME": str(root / names[0] / "home")}
    for pool in (CONTROL_POOL, TRAIN_POOL, GPU_POOL):
        run_checked(
            [*prefect_cli, "work-pool", "create", pool, "--type", "process", "--overwrite"],
            env=deploy_env,
            cwd=first,
        )
    # Without UBO_REPO here the pull step keeps `{{ $UBO_REPO }}`: each worker's own clone.
    run_checked([*prefect_cli, "--no-prompt", "deploy", "--all"], env=deploy_env, cwd=first)
    for name in names:
        start_worker(state, name)
    state.save()
    print(
        f"{hosts} worker host(s) up: {', '.join(names)}; the study: PREFECT_API_URL="
        f"{prefect_url} prefect deployment run ubo/full-benchmark"
    )
    return state


def host_env(state: ClusterState, name: str) -> dict[str, str]:
    host = Path(state.root) / name
    return base_env() | {
        "PREFECT_API_URL": state.prefect_url,
        "MLFLOW_TRACKING_URI": state.mlflow_url,
        "PREFECT_HOME": str(host / "home"),
        "UBO_REPO": str(host / "repo"),
    }


def start_worker(state: ClusterState, name: str) -> None:
    """The worker(s) of host `name`, as docs/SCALING.md starts one on another machine; the
    first host also serves the control pool (the parent flows)."""
    host, logs = Path(state.root) / name, Path(state.root) / "logs"
    # In its network namespace, where there is one: `ip netns exec` execs the worker itself.
    inside = ["ip", "netns", "exec", state.network["namespaces"][name]] if state.network else []
    prefect_cli = [*inside, sys.executable, "-m", "prefect", "worker", "start"]
    # Its flow runs fork from a warm server of its own (flows/warm.py), as SCALING.md says.
    warm_worker = [*inside, sys.executable, "-m", "flows.warm", "worker"]
    state.pids[f"{name}/worker"] = _detach(
        f"{name}-worker",
        [*warm_worker, "--pool", TRAIN_POOL, "--limit", "1", "--name", name],
        host / "repo",
        host_env(state, name),
        logs,
    )
    if name == state.hosts[0]:
        state.pids[f"{name}/control"] = _detach(
            f"{name}-control",
            [*prefect_cli, "--pool", CONTROL_POOL, "--name", f"{name}-control"],
            host / "repo",
            host_env(state, name),
            logs,
        )


def kill_host(state: ClusterState, name: str) -> int:
    """SIGKILL a host's workers and every training they started (a machine lost)."""
    killed = 0
    for key in [k for k in state.pids if k.startswith(f"{name}/")]:
        for process in _group(state.pids.pop(key)):
            with contextlib.suppress(psutil.Error):
                process.kill()
                killed += 1
    home = str(Path(state.root) / name / "home")
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.environ().get("PREFECT_HOME") == home:
                process.kill()
                killed += 1
    state.save()
    return killed


def _group(pid: int) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        leader = psutil.Process(pid)
        return [leader, *leader.children(recursive=True)]
    return []


def _stop(pids: list[int], grace: float = 20.0) -> None:
    processes = [p for pid in pids for p in _group(pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    terminate(processes, grace)


def down(root: Path) -> None:
    """Stop the workers (and their trainings), then the two servers, then PostgreSQL."""
    root = root.resolve()
    state = ClusterState.load(root)
    workers = [pid for key, pid in state.pids.items() if "/" in key]
    _stop(workers)
    # Trainings run in sessions of their own: find them by their host's Prefect home.
    homes = {str(root / name / "home") for name in state.hosts}
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if process.environ().get("PREFECT_HOME") in homes:
                process.kill()
    _stop([pid for key, pid in state.pids.items() if "/" not in key])
    with contextlib.suppress(RuntimeError):
        pg_ctl(root, "-m", "fast", "stop")
    if state.network:
        remove_network(state.network)
    shutil.rmtree(state.pg_dir, ignore_errors=True)
    (root / "cluster.json").unlink()
    print(
        f"cluster at {root} stopped and its databases dropped (the hosts' clones and the "
        "artifacts stay there; delete the folder to drop them)"
    )


def status(root: Path) -> str:
    state = ClusterState.load(root.resolve())
    lines = [
        f"Prefect {state.prefect_url}  MLflow {state.mlflow_url}  PostgreSQL "
        f"127.0.0.1:{state.pg_port}"
    ]
    if state.network:
        namespaces = ", ".join(state.network["namespaces"].values())
        lines.append(f"  hosts in network namespaces {namespaces} ({state.network['bridge']})")
    for key, pid in sorted(state.pids.items()):
        alive = psutil.pid_exists(pid)
        lines.append(f"  {key:24s} pid {pid:7d}  {'running' if alive else 'GONE'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.cluster", description=__doc__.split("\n")[0]
    )
    parser.add_argument("command", choices=["up", "down", "status", "restart-db"])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--datasets", nargs="+", default=["coat"])
    parser.add_argument(
        "--netns",
        choices=["auto", "on", "off"],
        default="auto",
        help="a network namespace per host (auto: where the machine allows it)",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            try:
                up(args.root, args.hosts, args.datasets, args.netns)
            except BaseException:
                if (args.root.resolve() / "cluster.json").is_file():
                    down(args.root)  # nothing half-started is left running
                raise
        elif args.command == "down":
            down(args.root)
        elif args.command == "status":
            print(status(args.root))
        else:
            pg_ctl(args.root.resolve(), "-m", "fast", "restart")
            print("PostgreSQL restarted")
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
