"""Does an engine change move the results? This checkout against another one, seed by seed.

    git worktree add /tmp/before <commit before the change>
    python benchmarks/engine_equivalence.py --before /tmp/before [--dataset coat]
        [--methods umf,relmf,bpr,ubo,jointopt,alteropt,noopt] [--seeds 0 1 2 3 4]
        [--mode dense] [--data data/processed] [--out docs/engine_equivalence.json]

Trains every (method, seed) with the study's settings (the tuned values) twice, once with
each checkout's ubo_core and params.yaml (their tuned values must agree; a key the change
adds is the change's own), on the processed set in `--data`
(a fresh worktree has none of its own), one thread, and prints test DCG@3 per
method: mean and standard deviation over the seeds for both, and the largest change of a
single seed, and the largest relative change of the trained parameters' sum (a ranking
metric may not move at all where the parameters do) and which elementwise path each ran. An
engine change that only reorders floating-point operations moves single seeds by far less
than the seeds differ from each other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, torch
from ubo_core.config import load_params
from ubo_core.data import load_processed
from ubo_core.methods import resolve_config
from ubo_core.trainer import fit
dataset, mode, params_path, data_root = sys.argv[1:5]
params = load_params(params_path)
data = load_processed(data_root, dataset)
for job in sys.argv[5:]:
    method, seed = job.split(":")
    train, hyper = resolve_config(params, dataset, method, {"mode": mode, "threads": 1})
    result = fit(method, data, train, hyper, int(seed), progress=False)
    try:  # which elementwise path dense mode took (checkouts from before ubo_core/fused.py: eager)
        from ubo_core import fused
        path = fused.active()
    except ImportError:
        path = "eager (before fused)"
    # The trained parameters, summed: a reordering of float operations moves this in its last
    # digits where DCG@3 (a ranking) may not move at all.
    checksum = sum(float(t.double().abs().sum()) for t in result.method.state().values())
    record = {"method": method, "seed": int(seed), "path": path, "checksum": checksum}
    print(json.dumps(record | result.test_metrics), flush=True)
"""


def run(checkout: Path, args: argparse.Namespace) -> dict[tuple[str, int], dict]:
    jobs = [f"{m}:{s}" for m in args.methods.split(",") for s in args.seeds]
    env = os.environ | {"PYTHONPATH": str(checkout)}
    command = [sys.executable, "-c", CHILD, args.dataset, args.mode, str(checkout / "params.yaml")]
    command += [str(args.data), *jobs]
    out = subprocess.run(command, env=env, cwd=checkout, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{checkout}: {out.stderr.strip().splitlines()[-1]}")
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {(row["method"], row["seed"]): row for row in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="the other checkout")
    parser.add_argument("--dataset", default="coat")
    parser.add_argument("--methods", default="umf,relmf,bpr,ubo,jointopt,alteropt,noopt")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--mode", default="dense")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "processed")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    before, after = run(args.before.resolve(), args), run(REPO, args)
    print(f"test DCG@3 on {args.dataset}, {args.mode} mode, seeds {args.seeds}")
    print(
        "| method | before: mean +- std | after: mean +- std | largest change of one seed | "
        "largest relative change of the parameters' sum | paths (before / after) |"
    )
    print("|---|---:|---:|---:|---:|---|")
    record = []
    for method in args.methods.split(","):
        old_rows = [before[method, s] for s in args.seeds]
        new_rows = [after[method, s] for s in args.seeds]
        old = [row["dcg@3"] for row in old_rows]
        new = [row["dcg@3"] for row in new_rows]
        change = max(abs(a - b) for a, b in zip(old, new, strict=True))
        drift = max(
            abs(a["checksum"] - b["checksum"]) / abs(a["checksum"])
            for a, b in zip(old_rows, new_rows, strict=True)
        )
        paths = f"{old_rows[0]['path']} / {new_rows[0]['path']}"
        print(
            f"| {method} | {statistics.mean(old):.4f} +- {statistics.stdev(old):.4f} | "
            f"{statistics.mean(new):.4f} +- {statistics.stdev(new):.4f} | {change:.4f} | "
            f"{drift:.1e} | {paths} |"
        )
        record.append({"method": method, "before": old_rows, "after": new_rows, "paths": paths})
    if args.out:
        Path(args.out).write_text(
            json.dumps({"dataset": args.dataset, "mode": args.mode, "rows": record}, indent=2)
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
