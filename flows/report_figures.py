"""The report's figures: docs/figures/fig{1,2,3}_*.png (byte-identical on a rerun)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from flows.report_runs import (
    ALL_METHODS,
    METHOD_DISPLAY,
    PCC_METHODS,
    RQ2_METHODS,
    Study,
    summary,
)
from ubo_core.datasets.registry import REAL, SEMISYNTHETIC
from ubo_core.fileio import atomic_path


# -- figures ---------------------------------------------------------------------------------
def _bars(
    ax,
    table: pd.DataFrame,
    dataset: str,
    title: str,
    methods: Sequence[str],
    highlight: str = "ubo",
):
    methods = [m for m in methods if (dataset, m) in table.index]
    means = [table.loc[(dataset, m), "dcg@3_mean"] for m in methods]
    stds = [np.nan_to_num(table.loc[(dataset, m), "dcg@3_std"]) for m in methods]
    colors = ["#c0392b" if m == highlight else "#7f8c8d" for m in methods]
    ax.bar(range(len(methods)), means, yerr=stds, capsize=4, color=colors)
    ax.set_xticks(
        range(len(methods)), [METHOD_DISPLAY[m] for m in methods], rotation=30, ha="right"
    )
    low = min(m - s for m, s in zip(means, stds, strict=True))
    high = max(m + s for m, s in zip(means, stds, strict=True))
    pad = (high - low) * 0.3 + 0.005
    ax.set_ylim(max(0.0, low - pad), high + pad)
    ax.set_ylabel("DCG@3 (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)


def _save(fig, path: Path, options: dict) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **options)
    return path


def figures(study: Study, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    table = summary(study.runs)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    # PNG metadata without the matplotlib version: identical bytes on a rerun.
    save = {"dpi": 120, "metadata": {"Software": None}}

    def bar_figure(datasets, methods, width: float, title: str, name: str) -> None:
        fig, axes = plt.subplots(
            1, len(datasets), figsize=(width * len(datasets), 3.8), squeeze=False
        )
        for ax, dataset in zip(axes[0], datasets, strict=True):
            _bars(ax, table, dataset, study.datasets[dataset].display, methods)
        fig.suptitle(title)
        fig.tight_layout()
        written.append(_save(fig, out / name, save))
        plt.close(fig)

    real = study.of_kind(REAL)
    if real:
        bar_figure(
            real, RQ2_METHODS, 4.5, "Figure 1 (RQ2): UBO against its ablations", "fig1_rq2.png"
        )

    semi = study.of_kind(SEMISYNTHETIC)
    if semi:
        bar_figure(
            semi,
            ALL_METHODS,
            5.5,
            "Figure 2: semi-synthetic data, every method",
            "fig2_semisynthetic.png",
        )

        fig, axes = plt.subplots(1, len(semi), figsize=(5.5 * len(semi), 3.8), squeeze=False)
        colors = dict(zip(PCC_METHODS, ("#2980b9", "#27ae60", "#8e44ad", "#c0392b"), strict=True))
        for ax, dataset in zip(axes[0], semi, strict=True):
            for method in PCC_METHODS:
                seeds = Study.seed_series(study.pcc_curves, dataset, method, study.seeds)
                if not seeds:
                    continue
                curves = pd.concat(seeds, axis=1)
                mean, std = curves.mean(axis=1), curves.std(axis=1).fillna(0.0)
                ax.plot(mean.index, mean, label=METHOD_DISPLAY[method], color=colors[method])
                ax.fill_between(mean.index, mean - std, mean + std, alpha=0.2, color=colors[method])
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch (ExpoMF: EM iteration)")
            ax.set_ylabel("PCC(learned m̄, true m)")
            ax.set_title(study.datasets[dataset].display)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("Figure 3: exposure PCC per epoch (mean ± std over seeds)")
        fig.tight_layout()
        written.append(_save(fig, out / "fig3_pcc.png", save))
        plt.close(fig)
    return written
