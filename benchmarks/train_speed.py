"""Training speed against what the machine can physically do, and against the libraries users
would pick instead: every method and mode over whole epochs of Yahoo!-sized data.

    python benchmarks/train_speed.py [--methods ubo,umf,...]
        [--modes paper,paper_lazy,dense,dense_eager]
        [--epochs 1] [--max-steps 0] [--peers] [--device cpu] [--threads 1]
        [--data data/processed/yahoo/dataset.npz] [--out docs/train_speed.json]
        [--profile ubo:paper_lazy] [--parts umf:dense]

Each configuration runs in a fresh subprocess: the method is built as `fit` builds it, warmed
up on a few steps, then timed over `--epochs` whole epochs, each from `sampler.epoch()` (the
shuffle and, for BPR, the negative sampling included) to its last step. `--max-steps` cuts
every epoch short (a smoke run; the table then says so). `dense` runs dense mode's
elementwise passes as the study does (`train.elementwise: auto`: compiled into one loop per
step where a C++ compiler is present, ubo_core/fused.py; compilation happens in the warm-up),
`dense_eager` op by op, for comparison.

The limit ratio: in the same process, on the same shapes, the time the step's unavoidable
work takes alone, divided by the measured time. So 1.0 means the step does nothing beyond
that work; what counts as the work:
- dense mode: the step's GEMMs. The step is run once under torch.profiler with shapes
  recorded; every matrix product it issues (aten::mm, addmm, bmm) is then timed alone at its
  shape (best of several), and their sum per step is the limit. The elementwise passes over
  the block's cells, the gathers and the optimiser count as overhead.
- paper mode: the optimiser's memory traffic, a fused Adam (torch's kernel) over the rows a
  step updates, plus one gather of those rows: with exact Adam all of the method's tables
  (every row moves by its momentum each step), with lazy Adam the batch's rows of each table
  (1,024 per table per pair list, 2,048 item rows for BPR's triples). The arithmetic of a
  1,024-pair step is small next to that traffic.

Peers (`--peers`, needs `pip install -e '.[bench]'`): implicit's and cornac's BPR on the same
training positives, 50 factors, one thread, one epoch each as the library defines it (one
sampled triple per training positive), timed in triples per second beside ours.

Peak memory is the subprocess's maximum resident set size (CPU) or torch's peak allocation
(CUDA). When the processed Yahoo set is absent, a synthetic matrix of the same shape and
density is used (timings do not depend on the labels' values).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ubo_core import fused
from ubo_core.config import Params
from ubo_core.data import FeedbackData
from ubo_core.datasets.validation import build_validation_sets
from ubo_core.engine import TrainingTensors, resolve_device
from ubo_core.methods import METHODS, resolve_config
from ubo_core.trainer import make_sampler

REPO = Path(__file__).resolve().parents[1]
YAHOO_SHAPE = (15_400, 1_000)
GEMMS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"}


def load_data(path: Path) -> tuple[FeedbackData, str]:
    if path.is_file():
        return FeedbackData.load(path), f"{path}"
    # Same shape and density as Yahoo! R3's training positives (8.1%).
    rng = np.random.default_rng(0)
    n_users, n_items = YAHOO_SHAPE
    rated = rng.random(YAHOO_SHAPE) < 0.02
    user, item = np.nonzero(rated)
    label = (rng.random(user.size) < 0.4).astype(np.int8)
    test_user = np.repeat(np.arange(5400), 10)
    test_item = rng.integers(0, n_items, test_user.size)
    keep = np.unique(test_user.astype(np.int64) * n_items + test_item, return_index=True)[1]
    data = FeedbackData(
        n_users,
        n_items,
        user.astype(np.int32),
        item.astype(np.int32),
        label,
        test_user[keep].astype(np.int32),
        test_item[keep].astype(np.int32),
        (rng.random(keep.size) < 0.1).astype(np.int8),
        np.arange(5400, dtype=np.int32),
    )
    return build_validation_sets(data, Params().validation), "synthetic 15,400 x 1,000"


def build(tensors: TrainingTensors, name: str, mode: str, device: str, threads: int):
    """The method and sampler of one configuration as fit() builds them."""
    # "paper_lazy": paper mode with optimizer lazy_adam (SparseAdam semantics); "dense_eager":
    # dense mode with its elementwise passes op by op.
    optimizer = "lazy_adam" if mode == "paper_lazy" else "adam"
    elementwise = "eager" if mode == "dense_eager" else "auto"
    mode = {"paper_lazy": "paper", "dense_eager": "dense"}.get(mode, mode)
    overrides = {"mode": mode, "device": device, "optimizer": optimizer, "threads": threads}
    overrides["elementwise"] = elementwise
    train, hyper = resolve_config(Params(), "yahoo", name, overrides)
    if tensors.device.type == "cpu":
        torch.set_num_threads(train.cpu_threads() or torch.get_num_threads())
    generator = torch.Generator(device=tensors.device).manual_seed(0)
    method = METHODS[name](tensors, train, hyper, generator)
    return method, make_sampler(METHODS[name].sampling, tensors, train, generator), train


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device: torch.device, repeats: int = 7) -> float:
    """Seconds of one call of fn, the best of `repeats` after a warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return best


def gemm_limit(method, batch, device: torch.device) -> tuple[float, int]:
    """Seconds the step's own matrix products take alone, and how many it issues."""
    with torch.profiler.profile(record_shapes=True) as prof:
        method.step(batch)
    total, count = 0.0, 0
    for event in prof.events():
        if (
            event.name not in GEMMS
            or event.cpu_parent is not None
            and (event.cpu_parent.name in GEMMS)
        ):
            continue
        shapes = [s for s in event.input_shapes if s]
        count += 1
        if event.name == "aten::addmm":
            shapes = shapes[1:3]
        left = torch.randn(shapes[0], device=device)
        right = torch.randn(shapes[1], device=device)
        total += best_time(lambda left=left, right=right: torch.matmul(left, right), device)
    return total, count


def trainable_tables(method) -> list[nn.Parameter]:
    seen, tables = set(), []
    for value in vars(method).values():
        if isinstance(value, nn.Parameter) and id(value) not in seen:
            seen.add(id(value))
            tables.append(value)
    return tables


def adam_limit(method, lazy: bool, rows_per_step: int, device: torch.device) -> float:
    """Seconds of a fused Adam over the rows a step updates, plus one gather of those rows."""
    tables = trainable_tables(method)
    count = torch.zeros((), device=device)
    total = 0.0
    for table in tables:
        rows = table.shape[0] if not lazy or table.ndim < 2 else min(rows_per_step, table.shape[0])
        shape = (rows, *table.shape[1:])
        p, g, m, v = (torch.rand(shape, device=device) for _ in range(4))
        index = torch.randint(table.shape[0], (rows,), device=device)
        source = table.detach()

        def update(p=p, g=g, m=m, v=v, index=index, source=source, lazy=lazy):
            if lazy and source.ndim == 2:
                source.index_select(0, index)
            torch._fused_adam_(
                [p], [g], [m], [v], [], [count], amsgrad=False, lr=1e-3, beta1=0.9,
                beta2=0.999, weight_decay=0.0, eps=1e-8, maximize=False,
            )  # fmt: skip

        total += best_time(update, device)
    return total


def time_epochs(method, sampler, epochs: int, max_steps: int, device: torch.device):
    """Examples per second over whole epochs, shuffle included; and the steps timed."""
    warm = sampler.epoch()
    for batch in itertools.islice(warm, 3):
        method.step(batch)
    del warm
    _sync(device)
    examples = steps = 0
    started = time.perf_counter()
    for _ in range(epochs):
        for batch in itertools.islice(sampler.epoch(), max_steps or None):
            method.step(batch)
            examples += batch.n_examples
            steps += 1
    _sync(device)
    return examples / (time.perf_counter() - started), steps, time.perf_counter() - started


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    data, source = load_data(Path(args.data))
    tensors = TrainingTensors(data, device)
    name, mode = args.one.split(":")
    method, sampler, train = build(tensors, name, mode, args.device, args.threads)
    speed, steps, seconds = time_epochs(method, sampler, args.epochs, args.max_steps, device)
    batch = next(iter(sampler.epoch()))
    step_seconds = seconds / steps
    with_adam = None
    if mode.startswith("dense") or METHODS[name].sampling == "full":
        limit, gemms = gemm_limit(method, batch, device)
        kind = f"{gemms} GEMMs"
        # Exact Adam moves every row of every table each step: its memory traffic is as
        # unavoidable as the GEMMs (train.optimizer adam, the study's setting).
        adam_seconds = adam_limit(method, False, 0, device)  # 0: no Adam (ExpoMF's EM)
        with_adam = (limit + adam_seconds) / step_seconds if adam_seconds else None
    else:
        rows = 2 * batch.n_examples if METHODS[name].sampling == "triples" else batch.n_examples
        limit = adam_limit(method, mode == "paper_lazy", rows, device)
        kind = "fused Adam, lazy rows" if mode == "paper_lazy" else "fused Adam, all rows"
    return {
        "config": args.one,
        "examples_per_second": speed,
        "steps": steps,
        "seconds": seconds,
        "limit_ratio": limit / step_seconds,
        "limit": kind,
        "limit_ratio_with_adam": with_adam,
        "threads": torch.get_num_threads(),
        "elementwise": fused.active() if mode.startswith("dense") else "",
        "peak_mib": peak_memory_mib(device),
        "data": source,
        "epoch_examples": tensors.n_train_pairs(),
    }


def peers(data: FeedbackData, threads: int) -> list[dict]:
    """implicit's and cornac's BPR on the training positives: triples per second."""
    import scipy.sparse as sp

    users, items = data.train_positives()
    matrix = sp.csr_matrix(
        (np.ones(users.size, np.float32), (users, items)), shape=(data.n_users, data.n_items)
    )
    rows = []
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    model = BayesianPersonalizedRanking(
        factors=50, iterations=1, num_threads=threads, random_state=0
    )
    model.fit(matrix, show_progress=False)  # warm-up (thread pools, first-call work)
    started = time.perf_counter()
    model.fit(matrix, show_progress=False)
    seconds = time.perf_counter() - started
    rows.append({"peer": "implicit 0.7 BPR", "triples_per_second": users.size / seconds})

    import cornac
    from cornac.data import Dataset

    triples = list(zip(users.tolist(), items.tolist(), [1.0] * users.size, strict=True))
    train_set = Dataset.from_uir(triples, seed=0)
    bpr = cornac.models.BPR(k=50, max_iter=1, seed=0, verbose=False)
    bpr.fit(train_set)
    started = time.perf_counter()
    bpr.fit(train_set)
    seconds = time.perf_counter() - started
    rows.append({"peer": "cornac 3 BPR", "triples_per_second": users.size / seconds})
    return rows


def profile_steps(args: argparse.Namespace, steps: int = 100) -> None:
    """torch.profiler over `steps` steps of `--profile` (method:mode)."""
    data, _ = load_data(Path(args.data))
    tensors = TrainingTensors(data, resolve_device(args.device))
    name, _, mode = args.profile.partition(":")
    method, sampler, _ = build(tensors, name, mode or "paper_lazy", args.device, args.threads)
    batches = itertools.chain.from_iterable(sampler.epoch() for _ in itertools.count())
    for _ in range(10):
        method.step(next(batches))
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            method.step(next(batches))
    events = prof.key_averages()
    ops = [e for e in events if e.key.startswith("aten::")]
    total_us = sum(e.self_cpu_time_total for e in events)
    print(
        f"{args.profile}: {sum(e.count for e in ops) / steps:.0f} aten operations and "
        f"{total_us / steps:.0f} us of self CPU time per step (under the profiler)"
    )
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))


# torch.profiler's names for the parts of a dense step (`--parts`); the fused elementwise pass
# is inductor's compiled graph, recorded as "## Call CompiledFxGraph <hash> ##".
STEP_PARTS = {
    **{name: "GEMMs" for name in GEMMS},
    "aten::_fused_adam_": "exact Adam",
    "aten::index_select": "gathers and scatters",
    "aten::index_add_": "gathers and scatters",
    "aten::index_fill_": "gathers and scatters",
    "aten::scatter_add_": "gathers and scatters",
    "aten::index_copy_": "gathers and scatters",
}
FUSED_PASS = "## Call CompiledFxGraph"


def step_parts(args: argparse.Namespace, steps: int = 50) -> dict:
    """Where a dense step's time goes (`--parts method:dense`), and the best limit ratio the
    step's own parts allow: the GEMMs timed alone (`gemm_limit`) over the GEMMs plus the fused
    elementwise pass(es) plus exact Adam's pass over the tables (`adam_limit`), the three
    things a step cannot skip. The step itself is timed without the profiler; the profiler's
    per-part self time (which adds a few microseconds per operation) says where it goes."""
    device = resolve_device(args.device)
    data, _ = load_data(Path(args.data))
    tensors = TrainingTensors(data, device)
    name, _, mode = args.parts.partition(":")
    method, sampler, _ = build(tensors, name, mode or "dense", args.device, args.threads)
    batches = list(itertools.islice(sampler.epoch(), steps))

    def run_batches() -> None:
        for batch in batches:
            method.step(batch)

    # best_time's warm-up pass compiles the fused kernels.
    best = best_time(run_batches, device, repeats=3) / len(batches)
    with torch.profiler.profile() as prof:
        run_batches()
    parts: dict[str, float] = {}
    for event in prof.key_averages():
        part = STEP_PARTS.get(event.key)
        if part is None:
            part = "fused pass" if event.key.startswith(FUSED_PASS) else "the rest"
        parts[part] = parts.get(part, 0.0) + event.self_cpu_time_total / 1e6 / len(batches)
    gemms_alone, _ = gemm_limit(method, batches[0], device)
    adam_alone = adam_limit(method, False, 0, device)
    fused_pass = parts.get("fused pass", 0.0)
    floor = gemms_alone / (gemms_alone + fused_pass + adam_alone)
    return {
        "config": f"{name}:{mode or 'dense'}",
        "step_seconds": best,
        "profiled_parts_seconds": parts,
        "gemms_alone_seconds": gemms_alone,
        "adam_alone_seconds": adam_alone,
        "limit_ratio": gemms_alone / best,
        "best_ratio_of_parts": floor,
    }


def print_parts(record: dict) -> None:
    us = 1e6
    print(f"{record['config']}: {record['step_seconds'] * us:,.0f} us per step (no profiler)")
    profiled = record["profiled_parts_seconds"]
    total = sum(profiled.values())
    for part, seconds in sorted(profiled.items(), key=lambda item: -item[1]):
        print(f"  {part:22s} {seconds * us:7,.0f} us  {seconds / total:5.1%}  (profiled)")
    print(
        f"  GEMMs alone {record['gemms_alone_seconds'] * us:,.0f} us, exact Adam alone "
        f"{record['adam_alone_seconds'] * us:,.0f} us: limit ratio {record['limit_ratio']:.2f}; "
        f"the best these parts allow (GEMMs / (GEMMs + fused pass + Adam)) "
        f"{record['best_ratio_of_parts']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--modes", default="paper,paper_lazy,dense")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=0, help="cut epochs short (smoke)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: fit's choice)")
    parser.add_argument("--peers", action="store_true", help="implicit and cornac BPR too")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", default=str(REPO / "data/processed/yahoo/dataset.npz"))
    parser.add_argument("--out", default="")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: one subprocess
    parser.add_argument("--profile", default="", help="method:mode to profile, e.g. ubo:paper_lazy")
    parser.add_argument(
        "--parts", default="", help="methods whose dense step to take apart, e.g. umf,ubo"
    )
    args = parser.parse_args()
    if args.profile:
        profile_steps(args)
        return
    if args.parts:
        records = []
        for config in args.parts.split(","):
            records.append(step_parts(argparse.Namespace(**{**vars(args), "parts": config})))
            print_parts(records[-1])
        if args.out:
            write_record(args.out, threads=torch.get_num_threads(), steps=records)
        return
    if args.one:
        print(json.dumps(run_one(args)))
        return
    configs = [f"{m}:{mode}" for m in args.methods.split(",") for mode in args.modes.split(",")]
    rows = []
    for config in configs:
        command = [sys.executable, __file__, "--one", config, "--epochs", str(args.epochs)]
        command += ["--max-steps", str(args.max_steps), "--threads", str(args.threads)]
        command += ["--device", args.device, "--data", args.data]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{config:20s} {row['examples_per_second'] / 1e6:8.2f} M/s  "
            f"limit ratio {row['limit_ratio']:5.2f} ({row['limit']})  "
            f"{row['seconds']:6.1f} s  peak {row['peak_mib']:6.0f} MiB",
            flush=True,
        )
    peer_rows = []
    if args.peers:
        data, _ = load_data(Path(args.data))
        peer_rows = peers(data, args.threads or os.cpu_count() or 1)
        for peer in peer_rows:
            print(f"{peer['peer']:20s} {peer['triples_per_second'] / 1e6:8.2f} M triples/s")
    machine = machine_description()
    partial = f", epochs cut at {args.max_steps} steps" if args.max_steps else ""
    print(
        f"\nmachine: {machine}, {os.cpu_count()} cores, {args.threads or 'auto'} thread(s), "
        f"torch {torch.__version__}, device {args.device}; {args.epochs} epoch(s){partial}; "
        f"data: {rows[0]['data'] if rows else args.data}"
    )
    print_table(rows, peer_rows)
    if args.out:
        capability = torch.backends.cpu.get_cpu_capability()
        write_record(args.out, cpu_capability=capability, rows=rows, peers=peer_rows)


def write_record(path: str, **fields: object) -> None:
    """The JSON a command writes with --out: the command, machine and torch that made it, then
    its `fields`."""
    header = {
        "command": "python benchmarks/train_speed.py " + " ".join(sys.argv[1:]),
        "machine": f"{machine_description()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
    }
    Path(path).write_text(json.dumps(header | fields, indent=2) + "\n")


def machine_description() -> str:
    """The architecture, the CPU's model and the vector ISA ATen's kernels run with: ratios
    and speeds differ between hosts of one machine type (an AVX-512 host ran the dense steps
    at 0.35-0.40 of the GEMM limit where an earlier host of the same type gave 0.21-0.24)."""
    fields: dict[str, str] = {}
    try:
        first_cpu = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        for line in first_cpu.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    model = fields.get("model name") or platform.processor()
    if fields.get("cpu family"):
        model += f", family {fields['cpu family']} model {fields.get('model', '?')}"
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{platform.machine()}{f' ({model})' if model else ''}, ATen {capability}"


def print_table(rows: list[dict], peer_rows: list[dict]) -> None:
    print(
        "| method | mode | examples/s | limit ratio | limit | with Adam's traffic | "
        "100 epochs | peak memory |"
    )
    print("|---|---|---:|---:|---|---:|---:|---:|")
    for row in rows:
        name, _, mode = row["config"].partition(":")
        speed = row["examples_per_second"]
        minutes = 100 * row["epoch_examples"] / speed / 60
        with_adam = row.get("limit_ratio_with_adam")
        print(
            f"| {name} | {mode} | {speed:,.0f} | {row['limit_ratio']:.2f} | {row['limit']} | "
            f"{'' if with_adam is None else f'{with_adam:.2f}'} | {minutes:,.1f} min | "
            f"{row['peak_mib']:,.0f} MiB |"
        )
    for peer in peer_rows:
        print(f"| {peer['peer']} | peer | {peer['triples_per_second']:,.0f} | | | | | |")


if __name__ == "__main__":
    main()
