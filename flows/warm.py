"""Warm starts for flow runs: a worker's flow-run process forked from a process that has
already imported torch, Prefect, MLflow and the project, instead of a fresh interpreter that
spends ~5 s importing them before every cell (docs/PERFORMANCE.md, orchestration).

    python -m flows.warm worker --pool ubo-cpu --limit 1    a worker with its warm server
    python -m flows.warm serve --socket @NAME                a warm server alone
    python -m flows.warm start                               a worker's flow-run command

The fan-out is unchanged: every cell is still its own flow run, claimed by whichever worker is
free, in a process of its own. Only where that process comes from changes. prefect.yaml sets
the training deployments' command to `python -m flows.warm start`; a worker started with
UBO_WARM_SOCKET naming a warm server gets its runs forked from it, and a worker without one
(or whose server is gone) runs `python -m prefect.engine` as Prefect does by default.

`start` is what the worker sees as the flow run's process: it hands its environment, working
directory and standard streams to the server, which forks a child that becomes exactly what
`python -m prefect.engine` would have been (same environment, streams, working directory,
exit status). Signals sent to `start` go to the child; if `start` dies (SIGKILL, a lost
worker), the server kills the child; if the server dies, the child dies with it
(PR_SET_PDEATHSIG) and `start` fails the run, which the parent's dead-child rule resubmits.

A child forks from code imported when the server started. If any of the project's modules
changed on disk since, the child runs `python -m prefect.engine` afresh instead (and says so),
so a run never trains with code other than what its code version names.

`start` imports the standard library only: it is the one fresh interpreter per run left.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import sys
from pathlib import Path

SOCKET_ENV = "UBO_WARM_SOCKET"
# The thread count the server's runs will train with, when its launcher knows it: dense
# kernels are compiled for that count alone (`compile_dense_kernels`).
RUN_THREADS_ENV = "UBO_WARM_RUN_THREADS"
# The module a flow-run process runs as __main__, warm or cold: Prefect's engine. Another one
# only in tests/test_warm.py, which checks the handover without a Prefect server.
MODULE_ENV, ENGINE = "UBO_WARM_MODULE", "prefect.engine"
# What a server imports before it serves: everything a training or tuning run imports before
# its first epoch (measured by `benchmarks/cell_overhead.py imports`).
PRELOAD = (
    "torch",
    "mlflow",
    "prefect.engine",
    "prefect.flow_engine",
    "flows.benchmark",
    "flows.tune_study",
)
# What MLflow imports on a run's first call, by tracking store (~1 s of a Coat cell): the
# ones a server's environment lacks are skipped.
PRELOAD_IF_PRESENT = (
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.tracking.rest_store",
    "mlflow.store.db.utils",
    "alembic.command",
    "alembic.runtime.migration",
    "sqlalchemy.dialects.sqlite",
    "sqlalchemy.dialects.postgresql",
    "git",
)
_HEADER = struct.Struct("!I")  # length of the request that follows
_PID = struct.Struct("!q")
_STATUS = struct.Struct("!i")  # as os.waitstatus_to_exitcode: -N for a signal N


def address(name: str) -> str:
    """`@name` is a Linux abstract socket (no file, no path-length limit, gone with the
    server; scoped to the network namespace, where worker and server live together)."""
    return "\0" + name[1:] if name.startswith("@") else name


def cold_start(reason: str | None) -> None:
    """Become `python -m prefect.engine`, as a worker without a warm server would run."""
    if reason:
        print(f"flows.warm: {reason}; starting the flow run cold", file=sys.stderr, flush=True)
    module = os.environ.get(MODULE_ENV, ENGINE)
    os.execv(sys.executable, [sys.executable, "-m", module])


# ---- start: the flow-run command --------------------------------------------------------


def _receive_exactly(connection: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def start() -> int:
    name = os.environ.get(SOCKET_ENV)
    if not name:
        cold_start(None)
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(address(name))
    except OSError as error:
        cold_start(f"no warm server at {SOCKET_ENV}={name} ({error.strerror})")
    request = json.dumps({"env": dict(os.environ), "cwd": os.getcwd()}).encode()
    socket.send_fds(connection, [_HEADER.pack(len(request)) + request], [0, 1, 2])
    pid_bytes = _receive_exactly(connection, _PID.size)
    if pid_bytes is None:
        print(f"flows.warm: the server at {name} closed before forking", file=sys.stderr)
        return 1
    (pid,) = _PID.unpack(pid_bytes)

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass  # it has just exited: its status is on the way

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    status_bytes = _receive_exactly(connection, _STATUS.size)
    if status_bytes is None:
        print(f"flows.warm: the server at {name} died during the run", file=sys.stderr)
        return 1
    (status,) = _STATUS.unpack(status_bytes)
    if status < 0:  # killed by a signal: die of the same one, as the child would have
        if -status not in (signal.SIGKILL, signal.SIGSTOP):  # the others may be forwarded
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    return status


# ---- serve: the warm server -------------------------------------------------------------


def _project_files() -> dict[str, int]:
    """Source file -> modification time of every loaded module of this project."""
    root = str(Path(__file__).resolve().parents[1])
    files = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and path.startswith(root) and path.endswith(".py"):
            files[path] = os.stat(path).st_mtime_ns
    return files


def run_thread_counts(default: int) -> list[int]:
    """The thread counts runs forked from here will train with: `RUN_THREADS_ENV` when the
    launcher knows it (flows/local.py gives every run of several CPU workers one thread),
    else 1 (the study's) and the server's own `default`. A run with another count is still
    right: it compiles its kernels itself (~3 s each)."""
    text = os.environ.get(RUN_THREADS_ENV, "").strip()
    if not text:
        return sorted({1, default})
    if not text.isdecimal() or int(text) < 1:
        raise SystemExit(f"flows.warm: {RUN_THREADS_ENV} must be a positive integer, not {text!r}")
    return [int(text)]


def compile_dense_kernels() -> str:
    """Compile dense mode's kernels (ubo_core/fused.py) for the thread counts a run forked
    from here will have (`run_thread_counts`): torch.compile guards on the thread count, so a
    run with another one compiles again (~3 s a kernel). Measured: without the 1, every dense
    cell of the study compiled its kernels again, 1-2 s of a Coat cell; compiling for a count
    no run uses doubled a server's start (~12 s more, before its first run)."""
    import torch

    from ubo_core import fused

    default = torch.get_num_threads()
    counts = run_thread_counts(default)
    try:
        for threads in counts:
            torch.set_num_threads(threads)  # sets the count; starts no thread
            if not fused.warm_up():
                return "no compiler: eager kernels"
    finally:
        torch.set_num_threads(default)
    return f"dense kernels compiled for {' and '.join(map(str, counts))} thread(s)"


def _native_threads() -> int:
    """This process's threads as the kernel counts them (Python's and native ones)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _changed(files: dict[str, int]) -> str | None:
    for path, mtime in files.items():
        try:
            if os.stat(path).st_mtime_ns != mtime:
                return path
        except FileNotFoundError:
            return path
    return None


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: a lost server leaves its runs to the dead-child rule


def _become_flow_run(request: dict, fds: list[int], files: dict[str, int]) -> None:
    """In the forked child: turn into `python -m prefect.engine` with the client's
    environment, working directory and streams. Never returns."""
    code = 1
    try:
        _die_with_parent()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        if changed := _changed(files):
            cold_start(f"{changed} changed since the warm server started")
        import runpy

        import torch
        from prefect.context import refresh_global_settings_context

        if threads := os.environ.get("OMP_NUM_THREADS"):  # read by torch at import only
            torch.set_num_threads(int(threads))
        refresh_global_settings_context()  # Prefect read its settings at import: reread
        import warnings

        # As `python -m prefect.engine` (no arguments: the run's id is in the environment),
        # run again as __main__ although the server imported it: runpy warns of exactly that.
        module = os.environ.get(MODULE_ENV, ENGINE)
        sys.argv = [module]
        warnings.filterwarnings("ignore", f"'{module}' found in sys.modules", RuntimeWarning)
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # as an uncaught exception ends an interpreter: traceback, 1
        import traceback

        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


class WarmServer:
    """Accepts `start` connections on one socket and forks a flow run for each; reports each
    child's exit status to its `start`, and kills a child whose `start` went away."""

    def __init__(self, name: str) -> None:
        import selectors

        self.name = name
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(address(name))  # before the imports: early clients queue, not
        self.listener.listen(64)  # fall back to a cold start
        self.selector = selectors.DefaultSelector()
        self.children: dict[int, tuple[socket.socket, int]] = {}  # pid -> (client, pidfd)
        self.stopping = False
        self.files: dict[str, int] = {}

    def preload(self) -> None:
        import gc
        import importlib
        import threading
        import time

        started = time.perf_counter()
        for module in PRELOAD:
            importlib.import_module(module)
        loaded = len(PRELOAD)
        for module in PRELOAD_IF_PRESENT:
            try:
                importlib.import_module(module)
                loaded += 1
            except ImportError:
                pass
        # Dense mode's fused kernels, compiled once here instead of ~3 s each in every run.
        native_before = _native_threads()
        try:
            kernels = compile_dense_kernels()
        except Exception as error:  # a compiler that fails: runs compile (or fall back) alone
            kernels = f"dense kernels not compiled ({type(error).__name__})"
        self.files = _project_files()
        gc.collect()
        gc.freeze()  # the children share these pages instead of copying them on first GC
        extra = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        if extra:  # a fork copies no other thread: a lock one held would stay held
            raise SystemExit(f"flows.warm: threads started during preload: {extra}")
        # Native threads too: an OpenMP pool started by the kernels' warm-up would hang each
        # child's first parallel region (ubo_core/fused.py). The imports' own (torch's, an
        # allocator's) were there before it.
        if (native := _native_threads()) > native_before:
            raise SystemExit(
                f"flows.warm: {native - native_before} native thread(s) started while "
                "compiling the dense kernels"
            )
        print(
            f"flows.warm: serving {self.name} ({loaded} modules preloaded, {kernels}, in "
            f"{time.perf_counter() - started:.1f} s)",
            flush=True,
        )

    def serve(self) -> None:
        import selectors

        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        self.selector.register(self.listener, selectors.EVENT_READ, ("accept", None))
        while not (self.stopping and not self.children):
            for key, _ in self.selector.select(timeout=1.0):
                kind, pid = key.data
                if kind == "accept":
                    self._accept()
                elif kind == "exit":
                    self._reap(pid)
                else:  # the client's socket: readable means it closed
                    self._client_gone(pid)

    def _stop(self, signum: int, _frame: object) -> None:
        """Stop accepting; pass the signal on to the runs, and exit once they have."""
        if not self.stopping:
            self.stopping = True
            self.selector.unregister(self.listener)
            self.listener.close()
        for pid in self.children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def _accept(self) -> None:
        import selectors

        client, _ = self.listener.accept()
        peer_uid = struct.unpack(
            "3i", client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        )[1]
        if peer_uid != os.getuid():  # it would run code as us with its environment
            client.close()
            return
        request, fds = self._read_request(client)
        if request is None:
            for fd in fds:  # a malformed request's streams are not ours to keep
                os.close(fd)
            client.close()
            return
        pid = os.fork()
        if pid == 0:
            self.listener.close()
            for other, pidfd in self.children.values():
                other.close()
                os.close(pidfd)
            client.close()
            _become_flow_run(request, fds, self.files)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        self.children[pid] = (client, pidfd)
        client.sendall(_PID.pack(pid))
        self.selector.register(pidfd, selectors.EVENT_READ, ("exit", pid))
        self.selector.register(client, selectors.EVENT_READ, ("client", pid))

    @staticmethod
    def _read_request(client: socket.socket) -> tuple[dict | None, list[int]]:
        client.settimeout(10.0)
        try:
            data, fds, _, _ = socket.recv_fds(client, 1 << 20, 3)
            if len(data) < _HEADER.size or len(fds) != 3:
                return None, fds
            (size,) = _HEADER.unpack(data[: _HEADER.size])
            body = data[_HEADER.size :]
            while len(body) < size:
                chunk = client.recv(size - len(body))
                if not chunk:
                    return None, fds
                body += chunk
            return json.loads(body), fds
        except (OSError, ValueError):
            return None, []
        finally:
            client.settimeout(None)

    def _reap(self, pid: int) -> None:
        import contextlib

        if pid not in self.children:
            return
        client, pidfd = self.children.pop(pid)
        _, status = os.waitpid(pid, 0)
        for fileobj in (pidfd, client):
            with contextlib.suppress(KeyError, ValueError):  # the client's: already gone
                self.selector.unregister(fileobj)
        os.close(pidfd)
        try:
            client.sendall(_STATUS.pack(os.waitstatus_to_exitcode(status)))
        except OSError:
            pass  # its start is gone: nobody left to tell
        client.close()

    def _client_gone(self, pid: int) -> None:
        """The run's `start` died (SIGKILL, its worker lost): so does the run, as a cold
        flow-run process would have died with it."""
        if pid not in self.children:
            return  # reaped in the same round
        client, _ = self.children[pid]
        self.selector.unregister(client)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # reaped when its pidfd reports


def worker(worker_args: list[str]) -> None:
    """`prefect worker start <worker_args>` with a warm server of its own: the server is
    started first, as the worker's child (it dies with it: the services' launcher,
    flows/services.py), then this process becomes the worker, its environment naming the
    server and this interpreter first on PATH (the flow-run command of prefect.yaml is
    `python -m flows.warm start`)."""
    import subprocess
    import uuid

    from flows.services import DIE_WITH_PARENT

    name = f"@ubo-warm-{uuid.uuid4().hex[:12]}"
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])
    env = dict(os.environ) | {SOCKET_ENV: name, "PATH": path}
    server = [sys.executable, "-m", "flows.warm", "serve", "--socket", name]
    subprocess.Popen(  # noqa: S603 (our own interpreter)
        [sys.executable, "-c", DIE_WITH_PARENT, str(os.getpid()), *server], env=env
    )
    command = [sys.executable, "-m", "prefect", "worker", "start", *worker_args]
    os.execve(sys.executable, command, env)


def serve(name: str) -> int:
    server = WarmServer(name)
    server.preload()
    server.serve()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.warm", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve_parser = sub.add_parser("serve", help="a warm server beside one worker")
    serve_parser.add_argument(
        "--socket",
        required=True,
        help=f"@NAME (abstract, Linux) or a path; the worker's {SOCKET_ENV}",
    )
    sub.add_parser("start", help="the flow-run command a worker runs (prefect.yaml)")
    worker_parser = sub.add_parser(
        "worker",
        help="`prefect worker start ARGS` with a warm server of its own",
        prefix_chars="\0",  # every argument is the worker's
    )
    worker_parser.add_argument("worker_args", nargs="*")
    args = parser.parse_args(argv)
    if args.command == "start":
        return start()
    if args.command == "worker":
        worker(args.worker_args)
    return serve(args.socket)


if __name__ == "__main__":
    sys.exit(main())
