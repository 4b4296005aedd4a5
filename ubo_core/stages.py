"""Command-line entry points of the DVC stages (thin: load config, resolve paths, call one
function, write outputs atomically).

    python -m ubo_core.stages download <dataset>
    python -m ubo_core.stages prepare <dataset>      # real: preprocess; else: semi-synthetic
    python -m ubo_core.stages validation <dataset>
    python -m ubo_core.stages summary [<dataset> ...]

<dataset> is a name of params.yaml's catalog (ubo_core/datasets/registry.py says what each is).

Any UboError (bad params.yaml, missing or corrupt file, malformed row, empty split) ends the
command with one line on stderr naming the file or key, and exit status 1.

The command runs MKL (torch's CPU BLAS) with `MKL_CBWR=COMPATIBLE` unless you set MKL_CBWR
yourself (`REPRODUCIBLE_BLAS`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ubo_core.config import Params, load_params
from ubo_core.data import DATASET_FILE, FeedbackData
from ubo_core.datasets.download import MIRROR_ENV, download_dataset
from ubo_core.datasets.registry import REAL, get_dataset
from ubo_core.errors import DataError, UboError, UsageError
from ubo_core.fileio import read_json, write_json

SUMMARY_FILE = "summary.json"

# MKL picks its code path by CPU, and the semi-synthetic fits' float rounding with it: the same
# seed wrote other Amazon CDs bytes on another CPU type (docs/PERFORMANCE.md, Determinism).
# In COMPATIBLE mode MKL takes one path on every x86-64 CPU (measured on an AVX-512 host: the
# same bytes under MKL_ENABLE_INSTRUCTIONS=AVX512, AVX2 and SSE4_2 and under ATen's AVX2 and
# AVX-512 kernels; the Amazon CDs fits ~25% slower). MKL reads the variable once, at its first
# call, so the command sets it before anything computes.
REPRODUCIBLE_BLAS = ("MKL_CBWR", "COMPATIBLE")
SUMMARY_COLUMNS = (
    "source_n_users",
    "source_n_items",
    "source_n_interactions",
    "n_users",
    "n_items",
    "n_train_ratings",
    "n_train_pos",
    "n_train_pos_kept",
    "n_test_ratings",
    "n_test_pos",
    "n_eval_users",
    "n_val_pairs",
    "n_hyper_pairs",
    "mean_true_exposure",
    "random_dcg@3",
)


def run_download(params: Params, name: str) -> None:
    mirror = os.environ.get(MIRROR_ENV) or None
    dataset = get_dataset(params, name)
    target = download_dataset(
        dataset, params.data.raw_dir, params.data.manual_dir, Path(mirror) if mirror else None
    )
    origin = (
        f"your files in {params.data.manual_dir / name}"
        if dataset.source is None
        else f"mirror {mirror}"
        if mirror
        else "official source"
    )
    print(f"download {name}: {target} ({origin})")


def run_prepare(params: Params, name: str) -> None:
    """A real data set is preprocessed into implicit feedback; a semi-synthetic one gets its
    ground truth generated."""
    dataset = get_dataset(params, name)
    raw_folder = params.data.raw_dir / name
    if dataset.kind == REAL:
        from ubo_core.datasets.real import preprocess_real

        data = preprocess_real(dataset, raw_folder, params.preprocess.positive_threshold)
        _write_dataset(data, params.data.interim_dir / name)
    else:
        from ubo_core.datasets.semisynthetic import build_semisynthetic

        data, source = build_semisynthetic(dataset, raw_folder, params.semisynthetic)
        _write_dataset(data, params.data.interim_dir / name, data.counts() | source)


def run_validation(params: Params, name: str) -> None:
    from ubo_core.datasets.validation import build_validation_sets

    get_dataset(params, name)
    source = params.data.interim_dir / name / DATASET_FILE
    if not source.is_file():
        raise DataError(source, f"not found; run `dvc repro prepare@{name}` first")
    before = FeedbackData.load(source)
    after = build_validation_sets(before, params.validation)
    # Keep the input's summary (training counts as users know them from the data set's
    # published size, source sizes) and add what stays in training once the validation sets
    # are split off.
    summary = (
        read_json(source.with_name(SUMMARY_FILE))
        | after.counts()
        | {
            "n_train_ratings": before.counts()["n_train_ratings"],
            "n_train_pos": before.counts()["n_train_pos"],
            "n_train_ratings_kept": after.counts()["n_train_ratings"],
            "n_train_pos_kept": after.counts()["n_train_pos"],
        }
        | random_ranking_dcg(after)
    )
    _write_dataset(after, params.data.processed_dir / name, summary)


def random_ranking_dcg(data: FeedbackData) -> dict[str, float]:
    """Expected DCG@1..3 of a uniformly random ranking of each evaluated user's test items:
    the floor every method must clearly beat."""
    from ubo_core.metrics import RankingTask, expected_random_dcg

    task = RankingTask.from_pairs(data.test_user, data.test_item, data.test_label, data.eval_users)
    return {f"random_dcg@{k}": round(expected_random_dcg(task, k), 6) for k in (1, 2, 3)}


def _write_dataset(data: FeedbackData, folder: Path, summary: dict | None = None) -> None:
    summary = summary or data.counts()
    data.save(folder / DATASET_FILE)
    write_json(folder / SUMMARY_FILE, summary)
    print(f"wrote {folder / DATASET_FILE}: {summary}")


def summary_table(params: Params, names: Sequence[str]) -> str:
    """Each processed data set's summary.json side by side: one row per count."""
    columns = {}
    for name in names:
        path = params.data.processed_dir / get_dataset(params, name).name / SUMMARY_FILE
        columns[name] = read_json(path) if path.is_file() else {}
    rows = [["", *columns]]
    rows += [
        [key, *(_cell(summary.get(key)) for summary in columns.values())] for key in SUMMARY_COLUMNS
    ]
    widths = [max(len(row[k]) for row in rows) for k in range(len(rows[0]))]
    lines = [
        "  ".join(
            v.ljust(w) if k == 0 else v.rjust(w)
            for k, (v, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    missing = [name for name, summary in columns.items() if not summary]
    if missing:
        lines.append(f"(not built yet: {', '.join(missing)}; run `dvc repro`)")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


STAGES = {
    "download": run_download,
    "prepare": run_prepare,
    "validation": run_validation,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ubo_core.stages", description=__doc__.split("\n")[0]
    )
    parser.add_argument("stage", choices=[*STAGES, "summary"])
    parser.add_argument("datasets", nargs="*", help="names from params.yaml's catalog")
    parser.add_argument("--params", default="params.yaml", help="path to params.yaml")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        for name in args.datasets:
            if name not in params.catalog:
                raise UsageError(
                    "dataset argument",
                    f"unknown data set {name!r}; expected one of params.yaml's catalog "
                    f"{list(params.catalog)}",
                )
        if args.stage == "summary":
            print(summary_table(params, args.datasets or list(params.catalog)))
            return 0
        if len(args.datasets) != 1:
            parser.error(f"stage {args.stage} takes exactly one data set")
        STAGES[args.stage](params, args.datasets[0])
    except UboError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # The command only: a process that imports `main` (pytest) keeps its environment.
    os.environ.setdefault(*REPRODUCIBLE_BLAS)
    sys.exit(main())
