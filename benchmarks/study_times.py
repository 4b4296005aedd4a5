"""Per-cell run times of two studies, method by method: what an engine change did to the
study's own runs (docs/PERFORMANCE.md).

    python benchmarks/study_times.py --before code-9078dd4a6e0ff5fe --after code-f0f952a5ffd5918a
        [--tracking-uri sqlite:///mlflow.db] [--datasets yahoo,coat]

Reads the finished child runs of both code versions from the MLflow store and prints, per
data set and method, the mean over seeds of `train_seconds` (the epochs, evaluation excluded)
and `wall_seconds` (the whole run inside its flow: data loading, training, evaluation,
logging), before and after. Timings of two studies on this virtual machine differ by up to
~25% on unchanged code; the methods the change did not touch show how much.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flows.run_identity import PARENT_TAG, TAG_CODE  # noqa: E402
from flows.store import search  # noqa: E402


def cell_times(client, code: str) -> dict[tuple[str, str], list[tuple[float, float]]]:
    times: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    query = f"tags.`{TAG_CODE}` = '{code}' and attributes.status = 'FINISHED'"
    runs = [
        run
        for experiment in client.search_experiments()
        for run in search(experiment.experiment_id, query)
    ]
    for run in runs:
        if run.data.tags.get(PARENT_TAG) is None or "train_seconds" not in run.data.metrics:
            continue  # a parent run, or a run without timings
        key = (run.data.tags["dataset"], run.data.tags["method"])
        times[key].append((run.data.metrics["train_seconds"], run.data.metrics["wall_seconds"]))
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="code version of the earlier study")
    parser.add_argument("--after", required=True, help="code version of the later study")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{REPO / 'mlflow.db'}")
    parser.add_argument("--datasets", default="yahoo,coat,ml100k,amazon_cds")
    args = parser.parse_args()
    import mlflow

    mlflow.set_tracking_uri(args.tracking_uri)  # flows.store.search's client reads it
    client = mlflow.MlflowClient()
    before, after = cell_times(client, args.before), cell_times(client, args.after)
    if not before or not after:
        missing = args.before if not before else args.after
        raise SystemExit(f"study_times: no finished runs of {missing} in {args.tracking_uri}")
    print(f"mean seconds per cell, {args.before} -> {args.after}")
    print("| data set | method | seeds | train before | train after | wall before | wall after |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for dataset in args.datasets.split(","):
        methods = sorted(
            {m for d, m in before if d == dataset} & {m for d, m in after if d == dataset}
        )
        for method in methods:
            old, new = before[dataset, method], after[dataset, method]
            print(
                f"| {dataset} | {method} | {len(old)}, {len(new)} | "
                f"{statistics.mean(t for t, _ in old):.1f} | "
                f"{statistics.mean(t for t, _ in new):.1f} | "
                f"{statistics.mean(w for _, w in old):.1f} | "
                f"{statistics.mean(w for _, w in new):.1f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
