"""Diagnostic for docs/results_discussion.md: does the hyper-validation objective rank the
tuned configuration above params.yaml's untuned defaults, and does the test set agree?

    python -m flows.tuning_diagnostic --dataset yahoo --methods umf ubo [--seed 0]

For each method it trains two runs (MLflow experiment `ubo-diagnostics`, reused when
identical): the tuned configuration (params.yaml as it is) and the untuned one (the tuned
keys reset to the `train`/`methods` defaults), and prints, per run, the best and the last
per-epoch SNIPS DCG@3 on the hyper-validation set next to the test DCG@3. This reads the test
set: it is an analysis of the protocol after the fact, never an input to tuning.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mlflow import MlflowClient

from flows import store, tracked_run
from flows.tune_study import format_values, untuned_config
from ubo_core.config import load_params

REPO = Path(__file__).resolve().parents[1]
CURVE = "val/hyper_snips_dcg_at_3"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="yahoo")
    parser.add_argument("--methods", nargs="+", default=["umf", "ubo"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    store.configure(None, REPO)
    params = load_params(REPO / "params.yaml")
    client = MlflowClient()
    print("| method | configuration | best hyper SNIPS DCG@3 (epoch) | last | test DCG@3 |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        tuned = params.datasets.get(args.dataset, {}).get(method, {})
        defaults = untuned_config(params, method)
        untuned = {key: defaults[key] for key in tuned}
        for name, overrides in (("tuned", {}), ("untuned defaults", untuned)):
            child = tracked_run.train_and_log(
                dataset=args.dataset,
                method=method,
                seed=args.seed,
                overrides=overrides,
                params_path=REPO / "params.yaml",
                repo=REPO,
                experiment="ubo-diagnostics",
                parent_run_id=None,
            )
            curve = sorted(client.get_metric_history(child.run_id, CURVE), key=lambda m: m.step)
            best = max(curve, key=lambda m: m.value)
            shown = format_values(tuned if name == "tuned" else untuned)
            print(
                f"| {method} | {name}: {shown} | {best.value:.4f} ({best.step}) | "
                f"{curve[-1].value:.4f} | {child.metrics['dcg@3']:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
