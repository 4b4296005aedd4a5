"""The study's report: `docs/RESULTS.md` and `docs/figures/fig{1,2,3}_*.png` from MLflow.

    python -m flows.report [--experiment ubo] [--out docs] [--allow-partial]   (make report)

Which runs: for every (data set, method, seed) of the grid, the FINISHED run whose run key is
the one `ubo/full-benchmark` would train now, i.e. params.yaml's configuration (no overrides),
the current code version (ubo_core) and the current data version of each data
set (its DVC md5). Runs of any other code, data or configuration are never mixed in; they are
only counted. A missing cell stops the report (naming it) unless `--allow-partial`.

Everything printed comes from those runs; the report has no timestamps and sorts everything,
so two runs on the same store write byte-identical files. `docs/results_discussion.md`, if
present, is the hand-written discussion and is included verbatim.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from flows import results_runs, store
from flows.report_figures import figures
from flows.report_runs import METHOD_DISPLAY, REPO, SEEDS, collect, summary
from flows.report_tables import render
from ubo_core.errors import UboError
from ubo_core.fileio import atomic_path
from ubo_core.methods import METHODS


# -- command line ----------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--experiment", default=store.DEFAULT_EXPERIMENT)
    parser.add_argument(
        "--out", default=str(REPO / "docs"), help="where RESULTS.md and figures/ go"
    )
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument(
        "--allow-partial", action="store_true", help="report even with missing runs"
    )
    parser.add_argument(
        "--datasets", nargs="+", default=None, help="default: every data set of the catalog"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument(
        "--no-mlflow-results",
        action="store_true",
        help="do not update the per-data-set results experiments of the MLflow store",
    )
    parser.add_argument(
        "--code-version",
        default=None,
        help="report the runs of this code version (as RESULTS.md names it) instead of the "
        "checkout's: ubo_core may have changed since the study ran",
    )
    args = parser.parse_args(argv)
    repo = Path(os.environ.get("UBO_REPO", REPO)).resolve()
    try:
        store.open_store(args.tracking_uri, repo)
        study = collect(
            repo, args.experiment, args.datasets, args.methods, args.seeds, args.code_version
        )
        if study.runs.empty:
            raise UboError(
                f"no finished run of code version {study.code_version} and the current data "
                f"and params.yaml in {args.experiment!r}"
            )
        if study.missing and not args.allow_partial:
            raise UboError(
                f"{len(study.missing)} run(s) of code version {study.code_version} and the "
                "current data and params.yaml are not in MLflow (run `make benchmark`; "
                "--allow-partial reports anyway): "
                + ", ".join(study.missing[:10])
                + (" ..." if len(study.missing) > 10 else "")
            )
    except UboError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    out = Path(args.out)
    discussion_path = out / "results_discussion.md"
    discussion = discussion_path.read_text() if discussion_path.is_file() else ""
    text = render(study, discussion)  # before anything is written: a failure leaves no mix
    try:
        for path in figures(study, out / "figures"):
            print(f"wrote {path}")
        with atomic_path(out / "RESULTS.md") as tmp:
            tmp.write_text(text)
    except UboError as error:  # a read-only folder, a full disk: each file is whole or old
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'RESULTS.md'} from {len(study.runs)} runs")
    if not args.no_mlflow_results:
        experiments = results_runs.publish(
            summary(study.runs),
            {name: dataset.display for name, dataset in study.datasets.items()},
            METHOD_DISPLAY,
            study.code_version,
        )
        names = ", ".join(
            results_runs.experiment_name(study.datasets[d].display) for d in experiments
        )
        print(f"updated the MLflow experiments {names} (`make ui`: DCG@3 by method)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
