"""Dense mode's fused elementwise kernels (ubo_core/fused.py): the compiled form of each
kernel equals its eager form, the path follows `train.elementwise`, "auto" falls back to eager
with one line when compiling fails, and a warm server's `warm_up` compiles every kernel a
dense run calls (a run forked after it compiles nothing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from planted import planted_feedback

from ubo_core import fused
from ubo_core.config import TrainConfig
from ubo_core.errors import ConfigError
from ubo_core.methods import METHODS
from ubo_core.trainer import fit

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
needs_compiler = pytest.mark.skipif(
    not fused.compiler_present(CPU), reason="no C++ compiler for torch.compile"
)


@pytest.fixture(autouse=True)
def restore_path():
    saved = dict(vars(fused._PATH))
    yield
    vars(fused._PATH).update(saved)


def block_inputs(shape=(7, 11), seed=0):
    """A float32 block with clamped cells: saturated logits, exposure 1 and a tiny exposure.
    Labels and weights come as dense mode's steps pass them (`Block.cell_tables`): byte tables
    with more rows than the block, and the block's rows in them, in random order."""
    gen = torch.Generator().manual_seed(seed)
    users, items = shape
    logit = torch.randn(shape, generator=gen) * 4
    logit[0] = 40.0
    logit[1, 1] = -100.0  # with exposure 1e-13 and a positive label: m p below 1e-42
    personal = torch.randn(shape, generator=gen) * 2
    item = torch.rand(items, generator=gen) * 0.9 + 0.05
    item[0], item[1] = 1.0, 1e-13
    rows = torch.randperm(users + 3, generator=gen)[:users]
    label = (torch.rand(users + 3, items, generator=gen) < 0.3).to(torch.uint8)
    label[rows[1], 1] = 1
    weight = (torch.rand(users + 3, items, generator=gen) < 0.9).to(torch.uint8)
    scale = (1.0 / weight[rows].sum().double()).float()
    coupling = torch.randn(shape, generator=gen)
    neg_eta = torch.tensor(-0.05)
    gate = torch.rand(items, generator=gen)
    cells = (label, weight, rows)
    return {
        "low_variance": (logit, item, *cells, scale),
        "ips": (logit, item, *cells, scale),
        "mixed_exposure": (logit, personal, gate, item, *cells, scale, True),
        "mixed_exposure_relevance": (logit, personal, gate, item, *cells, scale, False),
        "mixed_slope": (logit, personal, gate, item, *cells),
        "mixed_hyper_coefficients": (coupling, logit, personal, gate, item, *cells, neg_eta),
    }


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@needs_compiler
@pytest.mark.parametrize("shape", [(7, 11), (3, 64)], ids=["small", "vector_width"])
def test_compiled_kernels_equal_eager(shape):
    """Every kernel, compiled, against its eager form (and the cells against the in-place
    eager forms where those exist), float32, clamped cells included."""
    inputs = block_inputs(shape)
    calls = [(kernel, inputs[_key(kernel)]) for kernel in fused.dense_kernels()]
    calls.append((fused.mixed_exposure, inputs["mixed_exposure_relevance"]))
    for kernel, args in calls:
        fused.configure("eager", CPU)
        eager = _as_tuple(kernel(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args]))
        fused.configure("compiled", CPU)
        compiled = _as_tuple(kernel(*args))
        assert len(eager) == len(compiled)
        for mine, expected in zip(compiled, eager, strict=True):
            assert torch.isfinite(mine).all()
            torch.testing.assert_close(mine, expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["eager", pytest.param("compiled", marks=needs_compiler)])
def test_kernels_read_byte_tables_as_the_gathered_rows(path):
    """A kernel given the byte tables and the block's rows gives the same bits as given the
    block's gathered float rows (rows 0..B-1, what a plain `Batch` passes): reading the cells
    in place changes no number."""
    inputs = block_inputs((5, 37))
    calls = [(kernel, inputs[_key(kernel)]) for kernel in fused.dense_kernels()]
    for kernel, args in calls:
        position = next(k for k, a in enumerate(args) if a is inputs["ips"][2])
        label, weight, rows = args[position : position + 3]
        gathered = (label[rows].float(), weight[rows].float(), torch.arange(rows.numel()))
        as_rows = (*args[:position], *gathered, *args[position + 3 :])
        fused.configure(path, CPU)
        clone = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        from_tables = _as_tuple(kernel(*clone))
        clone = [a.clone() if isinstance(a, torch.Tensor) else a for a in as_rows]
        from_rows = _as_tuple(kernel(*clone))
        for mine, expected in zip(from_tables, from_rows, strict=True):
            assert torch.equal(mine, expected), kernel.__name__


def _key(kernel: fused.FusedKernel) -> str:
    return next(name for name in vars(fused) if getattr(fused, name) is kernel)


def test_path_follows_the_setting(monkeypatch):
    assert fused.configure("eager", CPU) == "eager"
    assert fused.configure("compiled", CPU) == "compiled"
    monkeypatch.setattr(fused.shutil, "which", lambda name: None)
    assert fused.configure("auto", CPU) == "eager"
    with pytest.raises(ConfigError, match="elementwise"):
        TrainConfig(elementwise="fast")


def _cpp_failure() -> Exception:
    from torch._inductor.exc import CppCompileError

    return CppCompileError(["g++", "kernel.cpp"], "cc1plus not found")


def _inductor_failure() -> Exception:
    """What torch.compile raises in practice: inductor wraps its errors (compile_fx.py)."""
    from torch._inductor.exc import InductorError

    return InductorError(RuntimeError("cc1plus not found"), None)


@pytest.mark.parametrize("failure", [_cpp_failure, _inductor_failure])
def test_auto_falls_back_to_eager_when_compiling_fails(monkeypatch, capsys, failure):
    """A backend that cannot build (no working compiler): "auto" says so in one line, runs
    the eager form and stays eager for the process (a later `configure("auto")` does not try
    again); "compiled" raises. The run records the path its kernels took."""

    def broken_compile(fn, **_):
        def run(*args):
            raise failure()

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(fused, "_PATH", fused._Path())  # this test's failure stays here
    kernel = fused.FusedKernel(lambda x: x + 1)
    fused.configure("compiled", CPU)
    with pytest.raises(type(failure()), match="cc1plus"):
        kernel(torch.zeros(2))
    kernel = fused.FusedKernel(lambda x: x + 1)
    monkeypatch.setattr(fused.shutil, "which", lambda name: "/usr/bin/g++")
    assert fused.configure("auto", CPU) == "compiled" and fused.ran() == ""
    torch.testing.assert_close(kernel(torch.zeros(2)), torch.ones(2))
    assert fused.active() == "eager" and fused.ran() == "eager"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cc1plus not found" in err[0] and "run eager" in err[0]
    assert fused.configure("auto", CPU) == "eager"  # sticky: no second failed compile


def test_auto_propagates_errors_that_are_not_the_backends(monkeypatch):
    """Only a backend's failure to build makes "auto" fall back: a caller's mistake (here a
    shape error) raises as it would eager, instead of hiding behind the eager path."""

    def compile_passthrough(fn, **_):
        return fn

    monkeypatch.setattr(torch, "compile", compile_passthrough)
    monkeypatch.setattr(fused, "_PATH", fused._Path())
    monkeypatch.setattr(fused.shutil, "which", lambda name: "/usr/bin/g++")
    kernel = fused.FusedKernel(lambda x, y: x + y)
    fused.configure("auto", CPU)
    with pytest.raises(RuntimeError, match="size"):
        kernel(torch.zeros(2), torch.zeros(3))
    assert fused.active() == "compiled"
    torch.testing.assert_close(kernel(torch.zeros(2), torch.ones(2)), torch.ones(2))
    assert fused.ran() == "compiled"


def test_runs_record_the_path_their_kernels_took():
    """`ran()` names the path only when a kernel ran since `configure`: a method without
    fused kernels (ExpoMF, CJMF, BPR) records none, whatever the process's setting."""
    fused.configure("eager", CPU)
    assert fused.ran() == ""
    data, _, _ = planted_feedback(n_users=12, n_items=30, n_test_items=4, seed=0)
    train = TrainConfig(mode="dense", epochs=1, dim=4, block_users=8, elementwise="eager")
    fit("bpr", data, train, None, seed=0, progress=False)
    assert fused.ran() == ""
    fit("umf", data, train, METHODS["umf"].Hyper(), seed=0, progress=False)
    assert fused.ran() == "eager"


WARM_THEN_TRAIN = """
import os, sys, time, traceback, torch
from torch._dynamo.utils import counters
from planted import planted_feedback
from ubo_core import fused
from ubo_core.config import TrainConfig
from ubo_core.methods import METHODS
from ubo_core.trainer import fit
from flows.warm import compile_dense_kernels
torch.set_num_threads(2)  # a server's threads; an OpenMP pool started here would hang the child
assert "compiled for 1 and 2" in compile_dense_kernels()
compiled = counters["stats"]["unique_graphs"]
assert compiled >= 6, compiled
pid = os.fork()
if pid == 0:  # a run forked from the server, as flows/warm.py forks them
    try:
        data, _, _ = planted_feedback(n_users=40, n_items=601, n_test_items=4, seed=1)
        for threads in (1, 0):  # the study's one thread a cell, and the server's count
            train = TrainConfig(
                mode="dense", epochs=2, dim=4, block_users=16, elementwise="compiled",
                threads=threads,
            )
            for name in sys.argv[1:]:
                hyper = getattr(METHODS[name], "Hyper", None)
                fit(name, data, train, hyper() if hyper else None, seed=0, progress=False)
        assert counters["stats"]["unique_graphs"] == compiled, dict(counters["stats"])
        os._exit(0)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
deadline = time.monotonic() + 300
while not (done := os.waitpid(pid, os.WNOHANG))[0]:
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        sys.exit("the forked run hung")
    time.sleep(0.2)
sys.exit(os.waitstatus_to_exitcode(done[1]))
"""


@needs_compiler
def test_warm_up_compiles_what_dense_runs_call():
    """After a warm server's compile (flows/warm.py, `compile_dense_kernels`), dense runs of
    every method with a fused kernel, in a process forked from it, on one thread (the study's)
    and on the server's two, finish (no OpenMP pool inherited in a broken state) and compile
    no further graph, at block sizes
    other than warm-up's (16 and 8 users x 601 items: blocks of fewer than 4,096 cells would
    compile once more)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    methods = ["umf", "relmf", "ubo", "jointopt", "alteropt", "biopt2", "noopt"]
    done = subprocess.run(
        [sys.executable, "-c", WARM_THEN_TRAIN, *methods],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
