"""Training speed: pairs per second of every method in paper and dense mode, against the
textbook PyTorch loop, on the same Yahoo-sized data (15,400 x 1,000), in one run.

    python benchmarks/train_speed.py [--steps 300] [--methods ubo,umf,...] [--device cpu]
        [--modes paper,paper_lazy,dense] [--batch-size 1024] [--profile ubo:paper_lazy]
        [--data data/processed/yahoo/dataset.npz] [--out docs/train_speed.json]

`--batch-size` changes paper mode's minibatch (the naive loop keeps 1024): five seeds trained
side by side as one model would do five times a step's work per step, so a 5,120-pair batch
bounds what that batching could gain.

The naive reference is what a first PyTorch implementation of UMF looks like (torch's default
threads): a DataLoader
over a TensorDataset of all 15.4M training pairs (batch 1024, shuffled), nn.Embedding,
autograd and torch.optim.Adam. Paper mode and the naive loop are timed over `--steps`
minibatches after a warm-up; dense mode over whole epochs (its steps are blocks of users).
When the processed Yahoo set is absent, a synthetic matrix of the same shape and density is
used (timings do not depend on the labels' values). Peak memory is the process's maximum
resident set size (CPU) or torch's peak allocation (CUDA), measured per configuration in a
fresh subprocess.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ubo_core.config import Params
from ubo_core.data import FeedbackData
from ubo_core.datasets.validation import build_validation_sets
from ubo_core.engine import TrainingTensors, resolve_device
from ubo_core.estimators import item_popularity_exposure, low_variance_loss
from ubo_core.methods import METHODS, resolve_config
from ubo_core.trainer import make_sampler

REPO = Path(__file__).resolve().parents[1]

YAHOO_SHAPE = (15_400, 1_000)


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


def naive_loop(tensors: TrainingTensors, steps: int) -> float:
    """Textbook UMF: DataLoader + nn.Embedding + autograd + torch.optim.Adam. Pairs/s."""
    index = tensors.pair_index.cpu()
    n_items = tensors.n_items
    dataset = TensorDataset(index // n_items, index % n_items, tensors.labels.view(-1).cpu()[index])
    loader = DataLoader(dataset, batch_size=1024, shuffle=True)
    user_emb = nn.Embedding(tensors.n_users, 50)
    item_emb = nn.Embedding(tensors.n_items, 50)
    nn.init.normal_(user_emb.weight, std=0.1)
    nn.init.normal_(item_emb.weight, std=0.1)
    theta = item_popularity_exposure(tensors.item_popularity.cpu()).float().clamp_min(1e-3)
    optimizer = torch.optim.Adam([*user_emb.parameters(), *item_emb.parameters()], lr=1e-3)
    started, done = None, 0
    for step, (users, items, labels) in enumerate(loader):
        if step == 10:
            started, done = time.perf_counter(), 0
        logits = (user_emb(users) * item_emb(items)).sum(1)
        loss = low_variance_loss(logits, theta[items], labels).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        done += users.numel()
        if step == steps + 10:
            break
    assert started is not None
    return done / (time.perf_counter() - started)


def build(tensors: TrainingTensors, name: str, mode: str, device: str, batch_size: int = 1024):
    """The method and sampler of one configuration, threads set as fit() would set them."""
    # "paper_lazy": paper mode with optimizer lazy_adam (SparseAdam semantics).
    optimizer = "lazy_adam" if mode == "paper_lazy" else "adam"
    mode = "paper" if mode == "paper_lazy" else mode
    overrides = {"mode": mode, "device": device, "optimizer": optimizer, "batch_size": batch_size}
    train, hyper = resolve_config(Params(), "yahoo", name, overrides)
    threads = train.cpu_threads()  # what fit() would use: 1 in paper mode, all cores in dense
    if tensors.device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    generator = torch.Generator(device=tensors.device).manual_seed(0)
    method = METHODS[name](tensors, train, hyper, generator)
    return method, make_sampler(METHODS[name].sampling, tensors, train, generator), mode


def profile_steps(
    tensors: TrainingTensors, config: str, device: str, batch_size: int, steps: int = 100
) -> None:
    """torch.profiler over `steps` steps of `config` (method:mode): the operations one step
    issues and where its CPU time goes (on CUDA: host-side time only, not kernel time)."""
    name, _, mode = config.partition(":")
    method, sampler, mode = build(tensors, name, mode or "paper_lazy", device, batch_size)
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
        f"{config}: {sum(e.count for e in ops) / steps:.0f} aten operations and "
        f"{total_us / steps:.0f} us of self CPU time per step (under the profiler)"
    )
    print(events.table(sort_by="self_cpu_time_total", row_limit=15))


def method_speed(
    tensors: TrainingTensors, name: str, mode: str, steps: int, device: str, batch_size: int = 1024
) -> float:
    method, sampler, mode = build(tensors, name, mode, device, batch_size)
    if METHODS[name].sampling == "full" or mode == "dense":
        # Whole epochs: one warm-up, then enough epochs for ~2 s.
        for batch in sampler.epoch():
            method.step(batch)
        pairs, started = 0, time.perf_counter()
        while time.perf_counter() - started < 2.0:
            for batch in sampler.epoch():
                method.step(batch)
                pairs += batch.n_examples
        _sync(tensors.device)
        return pairs / (time.perf_counter() - started)
    batches = sampler.epoch()
    for _ in range(10):
        method.step(next(batches))
    _sync(tensors.device)
    pairs, started = 0, time.perf_counter()
    for _ in range(steps):
        batch = next(batches)
        method.step(batch)
        pairs += batch.n_examples
    _sync(tensors.device)
    return pairs / (time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    data, source = load_data(Path(args.data))
    tensors = TrainingTensors(data, device)
    if args.one == "naive":
        speed = naive_loop(tensors, args.steps)
    else:
        name, mode = args.one.split(":")
        speed = method_speed(tensors, name, mode, args.steps, args.device, args.batch_size)
    return {
        "config": args.one,
        "pairs_per_second": speed,
        "peak_mib": peak_memory_mib(device),
        "data": source,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--modes", default="paper,paper_lazy,dense")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=1024, help="paper mode's minibatch")
    parser.add_argument("--data", default=str(REPO / "data/processed/yahoo/dataset.npz"))
    parser.add_argument("--out", default="")
    parser.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: one subprocess
    parser.add_argument("--profile", default="", help="method:mode to profile, e.g. ubo:paper_lazy")
    args = parser.parse_args()
    if args.profile:
        data, _ = load_data(Path(args.data))
        tensors = TrainingTensors(data, resolve_device(args.device))
        profile_steps(tensors, args.profile, args.device, args.batch_size)
        return
    if args.one:
        print(json.dumps(run_one(args)))
        return
    configs = ["naive"] + [
        f"{m}:{mode}" for m in args.methods.split(",") for mode in args.modes.split(",")
    ]
    rows = []
    for config in configs:
        command = [
            sys.executable,
            __file__,
            "--one",
            config,
            "--steps",
            str(args.steps),
            "--device",
            args.device,
            "--batch-size",
            str(args.batch_size),
            "--data",
            args.data,
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(
            f"{config:18s} {rows[-1]['pairs_per_second'] / 1e3:10.1f} kpairs/s  "
            f"peak {rows[-1]['peak_mib']:7.0f} MiB",
            flush=True,
        )
    naive = rows[0]["pairs_per_second"]
    n_pairs = YAHOO_SHAPE[0] * YAHOO_SHAPE[1]
    machine = platform.processor() or platform.machine()
    print(
        f"\nmachine: {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"device {args.device}; paper-mode batch {args.batch_size}; data: {rows[0]['data']}"
    )
    print("| method | mode | pairs/s | x naive | 100 epochs on Yahoo | peak memory |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        name, _, mode = row["config"].partition(":")
        speed = row["pairs_per_second"]
        minutes = 100 * n_pairs / speed / 60
        print(
            f"| {name} | {mode or 'naive'} | {speed:,.0f} | {speed / naive:.1f} | "
            f"{minutes:,.1f} min | {row['peak_mib']:,.0f} MiB |"
        )
    if args.out:
        record = {"rows": rows, "naive": naive, "batch_size": args.batch_size}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
