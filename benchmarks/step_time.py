"""Milliseconds per paper-mode step, exact and lazy Adam: the quick before/after of an engine
change, run once per checkout on the same machine.

    PYTHONPATH=<checkout> python benchmarks/step_time.py [--methods umf,ubo,bpr] [--steps 1000]
        [--data data/processed/yahoo/dataset.npz]

One thread, 1,024-pair steps of the study's Yahoo configuration after 50 warm-up steps, the
epoch's shuffle left out (benchmarks/train_speed.py times whole epochs). With PYTHONPATH
naming another checkout (a `git worktree` of an older commit), its ubo_core is timed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import ubo_core
from ubo_core.config import Params
from ubo_core.data import FeedbackData
from ubo_core.engine import TrainingTensors
from ubo_core.methods import METHODS, resolve_config
from ubo_core.trainer import make_sampler

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="umf,ubo,bpr")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--data", default=str(REPO / "data/processed/yahoo/dataset.npz"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    tensors = TrainingTensors(FeedbackData.load(Path(args.data)), torch.device("cpu"))
    print(f"ubo_core from {Path(ubo_core.__file__).parent}")
    for name in args.methods.split(","):
        for optimizer in ("adam", "lazy_adam"):
            overrides = {"mode": "paper", "optimizer": optimizer, "device": "cpu"}
            train, hyper = resolve_config(Params(), "yahoo", name, overrides)
            generator = torch.Generator().manual_seed(0)
            method = METHODS[name](tensors, train, hyper, generator)
            batches = make_sampler(METHODS[name].sampling, tensors, train, generator).epoch()
            for _ in range(50):
                method.step(next(batches))
            started = time.perf_counter()
            for _ in range(args.steps):
                method.step(next(batches))
            per_step = (time.perf_counter() - started) / args.steps * 1e3
            print(f"{name:10s} {optimizer:10s} {per_step:6.2f} ms per step")


if __name__ == "__main__":
    main()
