"""Dense mode's elementwise passes: fused into one compiled loop per step, or eager.

A dense block step is a few GEMMs and a chain of elementwise operations over the block's
(B, M) cells. Run eagerly, each operation is a pass through memory that does not stay in
cache: about a dozen passes took ~70% of a UMF block on this project's CPU, where the GEMMs
took ~15% (docs/PERFORMANCE.md). torch.compile (inductor: vectorised C++ on a CPU, Triton on a
GPU) fuses each chain into one loop that reads every input once. The chains it compiles are
the `*_cells` functions of ubo_core/estimators.py, single expressions of the same values and
clamps as the eager forms; tests/test_fused.py compares the two.

`train.elementwise` picks the path: "compiled", "eager", or "auto" (compiled where a compiler
is present: a C++ compiler on a CPU, Triton on a GPU; else eager, saying so once). Compiling
costs ~3 s per kernel and process even with inductor's on-disk cache warm (tracing is not
cached), which a Coat cell would feel: flows/warm.py's servers compile every kernel once
(`warm_up`) before forking their runs, which inherit them.

Results: the compiled and eager kernels agree to float rounding, so a run's numbers depend on
the path (as on the thread count); the run records which path its kernels took (`ran`).
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ubo_core.config import ELEMENTWISE_SETTINGS  # noqa: F401 (the settings' one home)
from ubo_core.estimators import (
    ips_block,
    ips_cells,
    low_variance_block,
    low_variance_cells,
    mixed_exposure_cells,
    mixed_exposure_hyper_coefficients,
    mixed_exposure_slope,
)


@dataclass
class _Path:
    setting: str = "eager"
    compiled: bool = False
    # A backend that failed once fails again: "auto" stays eager for the process's life.
    failed: bool = False
    # The path the last kernel call took since `configure` ("" when none ran: a method
    # without kernels, or paper mode), what a run records.
    ran: str = ""


# One training run per process (flows fork or start one per cell), so the path is process
# state that `configure` sets when a method is built, not an argument threaded through steps.
_PATH = _Path()


def compiler_present(device: torch.device) -> bool:
    """Whether torch.compile's backend can build kernels for `device` here."""
    if device.type == "cuda":
        import importlib.util

        return importlib.util.find_spec("triton") is not None
    names = (os.environ.get("CXX"), "g++", "c++", "clang++")
    return any(shutil.which(name) for name in names if name)


def configure(setting: str, device: torch.device) -> str:
    """Set the path of the kernels below for this process; returns `active()`."""
    _PATH.setting, _PATH.ran = setting, ""
    _PATH.compiled = setting == "compiled" or (
        setting == "auto" and not _PATH.failed and compiler_present(device)
    )
    return active()


def active() -> str:
    """The path the kernels take now: "compiled" or "eager"."""
    return "compiled" if _PATH.compiled else "eager"


def ran() -> str:
    """The path the kernels took since `configure` ("compiled" or "eager"), or "" when no
    kernel ran (a method whose steps have none): what a run records as its path."""
    return _PATH.ran


class FusedKernel:
    """A `*_cells` function, called compiled or eager as `configure` set. `eager` is a
    faster in-place form of the same values for the eager path, where one exists (UMF's and
    RelMF's: it may overwrite its first argument, which their callers do not reuse); the
    compiled form and the `*_cells` functions never write into their arguments."""

    def __init__(self, cells: Callable[..., object], eager: Callable[..., object] | None = None):
        self.cells, self.eager = cells, eager or cells
        self._compiled: Callable[..., object] | None = None
        self.__name__ = cells.__name__

    def __call__(self, *args: object):
        if not _PATH.compiled:
            _PATH.ran = "eager"
            return self.eager(*args)
        if self._compiled is None:
            import torch._inductor.config

            # In-process compilation: no pool of compile workers, which a warm server would
            # have to fork with (and which two cores do not need). Single-threaded kernels: no
            # OpenMP pool in a warm server (`warm_up`), and a loss sum whose order does not
            # depend on the thread count; dense mode's GEMMs still use every thread.
            torch._inductor.config.compile_threads = 1
            torch._inductor.config.cpp.threads = 1
            self._compiled = torch.compile(self.cells, dynamic=True, fullgraph=True)
        try:
            result = self._compiled(*args)
        except Exception as error:  # the backend failed to build: "auto" falls back
            if _PATH.setting != "auto" or not isinstance(error, _backend_failures()):
                raise
            _PATH.compiled, _PATH.failed = False, True
            said = " ".join(str(error).split())  # the compiler's output on the one line
            print(
                f"ubo_core.fused: compiling {self.__name__} failed ({type(error).__name__}: "
                f"{said[:300]}); elementwise passes run eager",
                file=sys.stderr,
                flush=True,
            )
            _PATH.ran = "eager"
            return self.eager(*args)
        _PATH.ran = "compiled"
        return result


def _backend_failures() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when its backend cannot build a kernel (inductor's errors,
    a C++ compiler that fails, wrapped by dynamo): only these make "auto" fall back; any other
    error (a shape or dtype mistake in a caller) is a bug and propagates. Imported when an
    error is raised: dynamo's modules are not needed to import ubo_core."""
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import CppCompileError

    return BackendCompilerFailed, CppCompileError


low_variance = FusedKernel(low_variance_cells, low_variance_block)
ips = FusedKernel(ips_cells, ips_block)
mixed_exposure = FusedKernel(mixed_exposure_cells)
mixed_slope = FusedKernel(mixed_exposure_slope)
mixed_hyper_coefficients = FusedKernel(mixed_exposure_hyper_coefficients)


def warm_up() -> bool:
    """Compile every kernel as dense mode calls it on a CPU (float32 blocks, per-item vectors,
    the labels and weights as byte tables with the block's rows, 0-dim scalars) at this
    process's thread count (a guard of torch.compile), so that
    processes forked afterwards start with them compiled. Returns whether it compiled (False
    without a compiler).

    Nothing here may start an OpenMP pool: a child forked after the parent ran a parallel
    region hangs in its own first one (GNU libgomp; measured). The kernels are compiled
    single-threaded (`FusedKernel`), and the block has 29 x 1,013 cells: above the 4,096 at
    which inductor specialises small inputs (a guard that a real block would fail) and below
    ATen's parallel grain of 32,768, so the eager operations that make the inputs stay on one
    thread; so do the byte tables (31 x 1,013 cells). Distinct sizes, too (29 rows of 31):
    dynamic shapes give equal sizes one symbol and a guard."""
    cpu = torch.device("cpu")
    if not compiler_present(cpu):
        return False
    saved = (_PATH.setting, _PATH.compiled)
    configure("compiled", cpu)
    try:
        generator = torch.Generator().manual_seed(0)
        shape = (29, 1013)

        def cells() -> torch.Tensor:
            return torch.randn(shape, generator=generator)

        # Distinct tensors for every argument: the compiled graph guards on aliasing.
        item = torch.rand(shape[1], generator=generator)
        gate = torch.rand(shape[1], generator=generator)
        # As `Block.cell_tables` gives them: (label bytes, weight bytes, the block's rows).
        table_shape = (31, shape[1])
        label = (torch.rand(table_shape, generator=generator) > 0.9).to(torch.uint8)
        weight = torch.ones(table_shape, dtype=torch.uint8)
        tables = (label, weight, torch.randperm(table_shape[0], generator=generator)[: shape[0]])
        scale = torch.tensor(1.0 / (shape[0] * shape[1]))
        low_variance(cells(), item, *tables, scale)
        ips(cells(), item, *tables, scale)
        logits, personal = cells(), cells()
        for exposure_grads in (False, True):
            mixed_exposure(logits, personal, gate, item, *tables, scale, exposure_grads)
        mixed_slope(logits, personal, gate, item, *tables)
        neg_eta = torch.tensor(-0.1)
        mixed_hyper_coefficients(cells(), logits, personal, gate, item, *tables, neg_eta)
    finally:
        _PATH.setting, _PATH.compiled = saved
        _PATH.ran = ""
        _stop_tqdm_monitor()
    return True


def _stop_tqdm_monitor() -> None:
    """Inductor's code generation runs torch.fx's interpreter, which opens a (disabled) tqdm
    bar, and tqdm then starts its monitor thread; a warm server forks only without threads."""
    from tqdm import tqdm

    if tqdm.monitor is not None:
        tqdm.monitor.exit()
        tqdm.monitor = None


def dense_kernels() -> tuple[FusedKernel, ...]:
    """Every kernel (tests check each compiled form against its eager one)."""
    return (low_variance, ips, mixed_exposure, mixed_slope, mixed_hyper_coefficients)
