"""The GPU checks of docs/PERFORMANCE.md in one short run (benchmarks/gpu_check.sh runs it).

    python benchmarks/gpu_check.py [--data data/processed/yahoo/dataset.npz] [--steps 2000]
        [--out gpu_check.json]

Needs only torch, numpy, pandas, pyyaml, tqdm and rich (ubo_core's own dependencies) and the
processed Yahoo! R3 set. For UMF and UBO in paper mode (exact Adam and lazy Adam):
1. eager: `--steps` steps of 1,024 pairs as the trainer runs them;
2. captured: the same step recorded once as a CUDA graph (static input buffers, the
   method's generator registered with the graph) and replayed; before timing, the replayed
   step is checked against the eager one from the same state on the same batches;
and one whole dense-mode epoch of each. Every line prints the projected time of 100 Yahoo
epochs (15.37M pairs each). On a machine without CUDA it runs the eager part on the CPU
(a dry run of the script) and says that the capture was skipped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ubo_core import fused  # noqa: E402
from ubo_core.config import Params  # noqa: E402
from ubo_core.data import FeedbackData  # noqa: E402
from ubo_core.engine import Batch, TrainingTensors  # noqa: E402
from ubo_core.methods import METHODS, resolve_config  # noqa: E402
from ubo_core.trainer import make_sampler  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(tensors: TrainingTensors, name: str, mode: str, optimizer: str, **overrides):
    overrides |= {"mode": mode, "optimizer": optimizer, "device": str(tensors.device)}
    train, hyper = resolve_config(Params(), "yahoo", name, overrides)
    generator = torch.Generator(device=tensors.device).manual_seed(0)
    method = METHODS[name](tensors, train, hyper, generator)
    sampler = make_sampler(METHODS[name].sampling, tensors, train, generator)
    return method, itertools.chain.from_iterable(sampler.epoch() for _ in itertools.count())


def projected_minutes(pairs_per_second: float, tensors: TrainingTensors) -> float:
    return 100 * tensors.n_train_pairs() / pairs_per_second / 60


def eager(tensors: TrainingTensors, name: str, optimizer: str, steps: int) -> dict:
    method, batches = build(tensors, name, "paper", optimizer)
    for _ in range(20):
        method.step(next(batches))
    sync(tensors.device)
    started = time.perf_counter()
    pairs = 0
    for _ in range(steps):
        batch = next(batches)
        method.step(batch)
        pairs += batch.n_examples
    sync(tensors.device)
    speed = pairs / (time.perf_counter() - started)
    return {"pairs_per_second": speed, "minutes_100_epochs": projected_minutes(speed, tensors)}


def capture(method, batches):
    """Warm-up steps, then one step recorded as a CUDA graph on static input buffers. The
    capture runs nothing: every replay is one step."""
    first = next(batches)
    static = Batch(first.users.clone(), first.items.clone(), first.labels.clone())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graph asks
        for _ in range(3):
            method.step(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    if hasattr(graph, "register_generator_state"):
        graph.register_generator_state(method.generator)
    with torch.cuda.graph(graph):
        method.step(static)

    def step(batch: Batch) -> None:
        static.users.copy_(batch.users)
        static.items.copy_(batch.items)
        static.labels.copy_(batch.labels)
        graph.replay()

    return step, first


def captured(tensors: TrainingTensors, name: str, optimizer: str, steps: int) -> dict:
    """The paper step as a CUDA graph: first checked against eager steps from the same state
    on the same batches (UBO with its whole validation set, so that no random draw differs
    between the two), then timed with the default settings."""
    whole = {"val_batch_size": int(tensors.val_users.numel())}
    graphed, graphed_batches = build(tensors, name, "paper", optimizer, **whole)
    reference, reference_batches = build(tensors, name, "paper", optimizer, **whole)
    step, first = capture(graphed, graphed_batches)
    next(reference_batches)  # the batch `capture` took
    for _ in range(3):
        reference.step(first)  # the warm-up steps
    for _ in range(5):
        batch = next(graphed_batches)
        step(batch)
        reference.step(next(reference_batches))
    sync(tensors.device)
    error = max(
        float((graphed.state()[key] - value).abs().max())
        for key, value in reference.state().items()
    )
    del graphed, reference
    method, batches = build(tensors, name, "paper", optimizer)
    step, _ = capture(method, batches)
    for _ in range(20):
        step(next(batches))
    sync(tensors.device)
    started = time.perf_counter()
    pairs = 0
    for _ in range(steps):
        batch = next(batches)
        step(batch)
        pairs += batch.n_examples
    sync(tensors.device)
    speed = pairs / (time.perf_counter() - started)
    return {
        "pairs_per_second": speed,
        "minutes_100_epochs": projected_minutes(speed, tensors),
        "max_abs_difference_from_eager": error,
    }


def dense_epoch(tensors: TrainingTensors, name: str) -> dict:
    overrides = {"mode": "dense", "optimizer": "adam", "device": str(tensors.device)}
    train, hyper = resolve_config(Params(), "yahoo", name, overrides)
    generator = torch.Generator(device=tensors.device).manual_seed(0)
    method = METHODS[name](tensors, train, hyper, generator)
    sampler = make_sampler(METHODS[name].sampling, tensors, train, generator)
    for batch in itertools.islice(sampler.epoch(), 3):
        method.step(batch)
    sync(tensors.device)
    started = time.perf_counter()
    for batch in sampler.epoch():
        method.step(batch)
    sync(tensors.device)
    seconds = time.perf_counter() - started
    return {"epoch_seconds": seconds, "minutes_100_epochs": 100 * seconds / 60}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(REPO / "data/processed/yahoo/dataset.npz"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        args.steps = min(args.steps, 200)
        torch.set_num_threads(1)
    data = FeedbackData.load(Path(args.data))
    tensors = TrainingTensors(data, device)
    name_of = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    print(f"device: {name_of}; torch {torch.__version__}; {args.steps} paper steps per line")
    results: dict = {"device": name_of, "torch": torch.__version__, "rows": []}
    for name, optimizer in itertools.product(("umf", "ubo"), ("adam", "lazy_adam")):
        kinds = [("eager", eager)] + ([("cuda graph", captured)] if cuda else [])
        for kind, run in kinds:
            try:
                row = run(tensors, name, optimizer, args.steps)
            except Exception as error:  # report and go on: one failure must not hide the rest
                row = {"error": f"{type(error).__name__}: {error}"[:300]}
            row |= {"method": name, "mode": f"paper {optimizer}", "kind": kind}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
        if not cuda:
            print(f"{name} {optimizer}: CUDA graph capture skipped (no CUDA)")
    for name in ("umf", "ubo"):
        try:
            row = dense_epoch(tensors, name)
        except Exception as error:
            row = {"error": f"{type(error).__name__}: {error}"[:300]}
        # Dense mode's elementwise passes as the study runs them (`elementwise: auto`: Triton
        # kernels where Triton is installed, compiled in the warm-up steps; else eager).
        row |= {"method": name, "mode": "dense", "kind": f"elementwise {fused.active()}"}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
