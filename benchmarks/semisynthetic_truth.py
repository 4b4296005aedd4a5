"""What the semi-synthetic ground truth looks like under each generator (docs/DATA.md).

    python benchmarks/semisynthetic_truth.py [--datasets ml100k,amazon_cds]
        [--generators reference,fitted] [--powers 1] [--out docs/semisynthetic_truth.json]

Builds each data set in memory from data/raw with params.yaml's `semisynthetic` section and
the generator (and exposure power) named, then prints, per user averaged over users unless
said otherwise:
- corr(popularity, m): Pearson correlation over items of the training popularity n_i with
  the true exposure m_ui (how right UMF's and RelMF's popularity exposure theta_i can be);
- corr(gamma, m): relevance against exposure;
- additive share: the share of logit(m)'s variance that a user effect plus an item effect
  explains (two-way additive fit over all pairs);
- at the gamma cap: the share of pairs with gamma = sigmoid(5 - eps), the clip's ceiling;
- clicks: the share of pairs with R~ = 1;
- DCG@3 of the test set ranked by true gamma (the ceiling), true m and popularity (the floor),
  each with its standard error over users (the test draw's noise).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ubo_core.config import load_params  # noqa: E402
from ubo_core.datasets.registry import get_dataset  # noqa: E402
from ubo_core.datasets.semisynthetic import build_semisynthetic  # noqa: E402
from ubo_core.reference_rankings import reference_rankings  # noqa: E402


def per_user_corr(left: np.ndarray, right: np.ndarray) -> float:
    a = left - left.mean(axis=1, keepdims=True)
    b = right - right.mean(axis=1, keepdims=True)
    norm = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    ok = norm > 0
    return float(((a * b).sum(1)[ok] / norm[ok]).mean())


def additive_share(m: np.ndarray) -> float:
    logit = np.log(m) - np.log1p(-m)
    grand = logit.mean()
    fitted = logit.mean(1, keepdims=True) + logit.mean(0, keepdims=True) - grand
    return float(1.0 - ((logit - fitted) ** 2).sum() / ((logit - grand) ** 2).sum())


def describe(dataset: str, generator: str, power: float) -> dict[str, float | str]:
    params = load_params(REPO / "params.yaml")
    config = dataclasses.replace(params.semisynthetic, generator=generator, exposure_power=power)
    data, _ = build_semisynthetic(
        get_dataset(params, dataset), REPO / params.data.raw_dir / dataset, config
    )
    assert data.true_relevance is not None and data.true_exposure is not None
    gamma = data.true_relevance.astype(np.float64)
    m = np.clip(data.true_exposure.astype(np.float64), 1e-12, 1 - 1e-12)
    popularity = np.broadcast_to(data.item_popularity().astype(np.float64), m.shape)
    cap = 1.0 / (1.0 + np.exp(-(5.0 - config.relevance_eps)))
    row: dict[str, float | str] = {
        "dataset": dataset,
        "generator": generator,
        "power": power,
        "corr(popularity, m)": per_user_corr(popularity, m),
        "corr(gamma, m)": per_user_corr(gamma, m),
        "additive share of logit m": additive_share(m),
        "at the gamma cap": float(np.isclose(gamma, cap, rtol=0, atol=1e-6).mean()),
        "clicks": float((data.train_label == 1).sum() / m.size),
        "mean m": float(m.mean()),
        "mean gamma": float(gamma.mean()),
    }
    for ranking in reference_rankings(data):
        row[f"DCG@3 by {ranking.name}"] = ranking.metrics["dcg@3"]
        row[f"DCG@3 by {ranking.name} (se)"] = ranking.dcg3_standard_error
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="ml100k,amazon_cds")
    parser.add_argument("--generators", default="reference,fitted")
    parser.add_argument("--powers", default="1")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    rows = [
        describe(dataset, generator, float(power))
        for dataset in args.datasets.split(",")
        for generator in args.generators.split(",")
        for power in args.powers.split(",")
    ]
    names = [k for k in rows[0] if k not in ("dataset", "generator", "power")]
    header = " | ".join(f"{r['dataset']} {r['generator']} pow {r['power']:g}" for r in rows)
    print(f"| statistic | {header} |")
    print("|---|" + "---:|" * len(rows))
    for name in names:
        print(f"| {name} | " + " | ".join(f"{r[name]:.3f}" for r in rows) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
