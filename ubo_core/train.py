"""Train one method on one processed data set from the command line.

    python -m ubo_core.train --dataset coat --method ubo --seed 0 [--mode paper|dense]
        [--device auto|cpu|cuda] [--epochs N] [--set key=value ...] [--params params.yaml]
        [--checkpoint FILE [--checkpoint-seconds S]] [--show-config]

Shows a progress bar (epoch, loss, validation loss, speed) on stderr and ends by printing one
JSON line on stdout: dcg@1..3, map@1..3 (and pcc on semi-synthetic data), seconds, device.
With --checkpoint, the run's state is saved to FILE after its epochs (at most once a minute)
and a rerun of the same command resumes from it; the file is removed when the run finishes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ubo_core.config import load_params
from ubo_core.data import load_processed
from ubo_core.errors import UboError, UsageError
from ubo_core.methods import METHODS, check_method_params, resolve_config
from ubo_core.trainer import FitResult, fit


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """`key=value` strings -> {key: YAML-typed value} (so lr=0.01 is a float, mode=dense a str)."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError("--set", f"expected key=value, got {pair!r}")
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            problem = str(error).splitlines()[0]
            raise UsageError(
                "--set", f"{pair!r}: the value is not valid YAML ({problem})"
            ) from None
    return overrides


def result_line(
    result: FitResult, dataset: str, method: str, seed: int, mode: str
) -> dict[str, Any]:
    line: dict[str, Any] = {"dataset": dataset, "method": method, "seed": seed, "mode": mode}
    line |= {k: round(v, 6) for k, v in result.test_metrics.items() if not k.startswith("recall")}
    if result.history and "pcc" in result.history[-1].metrics:
        line["pcc"] = round(result.history[-1].metrics["pcc"], 6)
    line |= {"seconds": round(result.seconds, 3), "device": result.device}
    return line


def resolved_yaml(train: Any, hyper: Any, method: str) -> str:
    """The run's configuration as params.yaml would spell it: every train key, then the
    method's own knobs (defaults of its Hyper class unless params.yaml overrides them)."""

    def plain(config: Any) -> dict[str, Any]:
        return {
            key: str(value) if isinstance(value, Path) else value
            for key, value in dataclasses.asdict(config).items()
        }

    return yaml.safe_dump(
        {"train": plain(train), "methods": {method: plain(hyper)}}, sort_keys=False
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ubo_core.train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dataset", required=True, help="a name of params.yaml's catalog")
    parser.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--mode", choices=["paper", "dense"], help="training engine (default: params.yaml)"
    )
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: params.yaml)")
    parser.add_argument("--epochs", type=int, help="number of epochs (default: params.yaml)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a train or method key",
    )
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        metavar="FILE",
        help="save the run's state here and resume from it when it exists (long runs)",
    )
    parser.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=60.0,
        metavar="S",
        help="save at most every S seconds, and after the last epoch (default: %(default)s)",
    )
    parser.add_argument(
        "--show-config",
        action="store_true",
        help="print the run's resolved train keys and method knobs (YAML) and exit",
    )
    args = parser.parse_args(argv)
    try:
        if args.seed < 0:
            raise UsageError("--seed", f"{args.seed} is negative; a seed is 0 or more")
        if args.method not in METHODS:
            raise UsageError(
                "--method", f"unknown method {args.method!r}; expected one of {list(METHODS)}"
            )
        params = load_params(args.params)
        if args.dataset not in params.catalog:
            raise UsageError(
                "--dataset",
                f"unknown data set {args.dataset!r}; expected one of params.yaml's catalog "
                f"{list(params.catalog)}",
            )
        check_method_params(params)
        overrides = parse_overrides(args.set)
        for key in ("mode", "device", "epochs"):
            if getattr(args, key) is not None:
                overrides[key] = getattr(args, key)
        train, hyper = resolve_config(params, args.dataset, args.method, overrides)
        if args.show_config:
            print(resolved_yaml(train, hyper, args.method), end="")
            return 0
        data = load_processed(params.data.processed_dir, args.dataset)
        result = fit(
            args.method,
            data,
            train,
            hyper,
            args.seed,
            progress=not args.no_progress,
            checkpoint=args.checkpoint,
            checkpoint_seconds=args.checkpoint_seconds,
        )
    except UboError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result_line(result, args.dataset, args.method, args.seed, train.mode)))
    if args.checkpoint is not None:  # the result is out: the state is not needed any more
        args.checkpoint.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
