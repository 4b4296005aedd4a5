"""The semi-synthetic study against the exposure power: DCG@3 and PCC as m = sigmoid(s)^power
sharpens (docs/RESULTS.md's discussion; the paper's Figures 2-3 use one power).

    python benchmarks/power_sweep.py run [--dataset ml100k] [--powers 0.5,1,2,3,4]
        [--methods ubo,umf,relmf,bpr,jointopt] [--seeds 0,1,2] [--jobs 2]
    python benchmarks/power_sweep.py plot [--out docs/figures/power_sweep.png]

For each power the data set is built from data/raw with params.yaml's `semisynthetic`
section at that power (then the validation stage's sets), once, into a temporary folder;
each method trains from the study's tuned values of params.yaml up to `--cap` epochs with the
test metrics and the PCC tracked per epoch. A point reports over the seeds: the test DCG@3 at
the epoch with the best hyper-validation SNIPS DCG@3 (the test set is never used to choose)
and the PCC of the learned exposure against the true one at the last epoch. Oracle and
popularity rankings of each power's test set (ubo_core/reference_rankings.py) are drawn as
lines. Runs are appended to docs/power_sweep/runs.jsonl keyed by code version and resolved
configuration, so a stopped sweep resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.fidelity import train_record  # noqa: E402
from flows.run_identity import code_version  # noqa: E402
from ubo_core.config import load_params  # noqa: E402
from ubo_core.data import FeedbackData  # noqa: E402
from ubo_core.datasets.registry import get_dataset  # noqa: E402
from ubo_core.datasets.semisynthetic import build_semisynthetic  # noqa: E402
from ubo_core.datasets.validation import build_validation_sets  # noqa: E402
from ubo_core.methods import resolve_config  # noqa: E402
from ubo_core.reference_rankings import reference_rankings  # noqa: E402

RUNS = REPO / "docs" / "power_sweep" / "runs.jsonl"
FIGURE = REPO / "docs" / "figures" / "power_sweep.png"


def build(dataset: str, power: float, folder: Path) -> tuple[Path, dict[str, Any]]:
    """The data set at `power` (semi-synthetic stage, then validation stage) as an npz in
    `folder`, and its reference rankings' DCG@3."""
    params = load_params(REPO / "params.yaml")
    config = dataclasses.replace(params.semisynthetic, exposure_power=power)
    data, _ = build_semisynthetic(
        get_dataset(params, dataset), REPO / params.data.raw_dir / dataset, config
    )
    data = build_validation_sets(data, params.validation)
    path = folder / f"{dataset}_power{power:g}.npz"
    data.save(path)
    references = {r.name: r.metrics["dcg@3"] for r in reference_rankings(data)}
    return path, references


def train_one(key: dict[str, Any], data_path: str) -> dict[str, Any]:
    return train_record(key, FeedbackData.load(Path(data_path)))


def load_runs() -> dict[str, dict[str, Any]]:
    if not RUNS.is_file():
        return {}
    runs = {}
    for line in RUNS.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        runs[json.dumps(record["key"], sort_keys=True)] = record
    return runs


def run(args: argparse.Namespace) -> None:
    version = code_version(REPO)
    if "+dirty" in version:
        sys.exit("error: ubo_core has uncommitted changes; commit them so runs name a version")
    params = load_params(REPO / "params.yaml")
    done = load_runs()
    RUNS.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ubo-power-") as tmp:
        jobs = []
        for power in (float(p) for p in args.powers.split(",")):
            path, references = build(args.dataset, power, Path(tmp))
            reference_line = {"power": power, "dataset": args.dataset, "references": references}
            print(json.dumps(reference_line), flush=True)
            for method in args.methods.split(","):
                overrides = {"epochs": args.cap, "threads": 1}
                train, hyper = resolve_config(params, args.dataset, method, overrides)
                for seed in (int(s) for s in args.seeds.split(",")):
                    key = {
                        "code": version,
                        "dataset": args.dataset,
                        "power": power,
                        "semisynthetic": dataclasses.asdict(params.semisynthetic)
                        | {"exposure_power": power},
                        "method": method,
                        "seed": seed,
                        "train": dataclasses.asdict(train),
                        "hyper": dataclasses.asdict(hyper),
                        "references": references,
                    }
                    if json.dumps(key, sort_keys=True) not in done:
                        jobs.append((key, str(path)))
        print(f"{len(jobs)} runs to do at {version}", flush=True)
        started = time.perf_counter()
        with ProcessPoolExecutor(args.jobs) as pool, RUNS.open("a") as out:
            futures = [pool.submit(train_one, key, path) for key, path in jobs]
            for count, future in enumerate(as_completed(futures), 1):
                record = future.result()
                out.write(json.dumps(record) + "\n")
                out.flush()
                key, best = record["key"], max(record["curve"], key=lambda p: p["hyper"])
                print(
                    f"[{count}/{len(jobs)} {(time.perf_counter() - started) / 60:.0f} min] "
                    f"power {key['power']:g} {key['method']} seed {key['seed']}: test "
                    f"{best['test']:.3f} (epoch {best['epoch']}), final pcc "
                    f"{record['curve'][-1]['pcc']:.3f}",
                    flush=True,
                )


def summary(dataset: str) -> tuple[dict, dict]:
    """{(method, power): [(test at best hyper epoch, final pcc), ...]}, {power: references}
    of the newest code version that has runs."""
    runs = list(load_runs().values())
    runs = [r for r in runs if r["key"]["dataset"] == dataset]
    if not runs:
        sys.exit(f"error: {RUNS} has no run of {dataset}; run `power_sweep.py run` first")
    version = runs[-1]["key"]["code"]
    points: dict[tuple[str, float], list[tuple[float, float]]] = {}
    references: dict[float, dict[str, float]] = {}
    for record in runs:
        key = record["key"]
        if key["code"] != version:
            continue
        best = max(record["curve"], key=lambda p: p["hyper"])
        points.setdefault((key["method"], key["power"]), []).append(
            (best["test"], record["curve"][-1]["pcc"])
        )
        references[key["power"]] = key["references"]
    return points, references


def plot(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    points, references = summary(args.dataset)
    methods = list(dict.fromkeys(m for m, _ in points))
    powers = sorted(references)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    colors = dict(zip(methods, plt.get_cmap("tab10").colors, strict=False))  # same in both

    def errorbars(ax, xs: list[float], samples: list, method: str) -> None:
        means, stds = [x.mean() for x in samples], [x.std(ddof=1) for x in samples]
        ax.errorbar(xs, means, stds, label=method, marker="o", capsize=3, color=colors[method])

    for method in methods:
        xs = [p for p in powers if (method, p) in points]
        dcg = [np.array([v[0] for v in points[(method, p)]]) for p in xs]
        pcc = [np.array([v[1] for v in points[(method, p)]]) for p in xs]
        errorbars(left, xs, dcg, method)
        if not all(np.isnan(c).all() for c in pcc):
            errorbars(right, xs, pcc, method)
    for name, style in (("true_relevance", "--"), ("popularity", ":")):
        left.plot(
            powers,
            [references[p][name] for p in powers],
            style,
            color="grey",
            label={"true_relevance": "ranked by true γ", "popularity": "by popularity"}[name],
        )
    left.set(
        xlabel="exposure power",
        ylabel="test DCG@3 (best hyper-val epoch)",
        title=f"{args.dataset}: DCG@3",
    )
    right.set(xlabel="exposure power", ylabel="PCC, last epoch", title=f"{args.dataset}: PCC")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    for method in methods:
        cells = []
        for p in powers:
            values = points.get((method, p), [])
            if values:
                d = np.array([v[0] for v in values])
                c = np.array([v[1] for v in values])
                cells.append(f"{d.mean():.3f} ± {d.std(ddof=1):.3f} (pcc {c.mean():.2f})")
            else:
                cells.append("–")
        print(f"| {method} | " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--dataset", default="ml100k")
    run_parser.add_argument("--powers", default="0.5,1,2,3,4")
    run_parser.add_argument("--methods", default="ubo,umf,relmf,bpr,jointopt")
    run_parser.add_argument("--seeds", default="0,1,2")
    run_parser.add_argument("--cap", type=int, default=100, help="most epochs per run")
    run_parser.add_argument("--jobs", type=int, default=2)
    plot_parser = sub.add_parser("plot")
    plot_parser.add_argument("--dataset", default="ml100k")
    plot_parser.add_argument("--out", default=str(FIGURE))
    args = parser.parse_args()
    run(args) if args.command == "run" else plot(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
