"""The data-set registry: what each name in params.yaml's `catalog` is.

A data set is of one of two kinds:
- `real`: implicit feedback with a random-exposure test set, evaluated on that test set
  (Coat, Yahoo! R3, your CSV data with a test file);
- `semisynthetic`: a source of interactions from which ground-truth relevance and exposure
  are generated (ML-100K, Amazon CDs, your CSV data without a test file).

The built-ins below come with a checksummed source and a reader. Any other catalog name is
your own data: CSV files in data/manual/<name>/ (ubo_core/datasets/csv_source.py). Config
checks, the DVC stages (dvc.yaml loops over the catalog), the flows' default data sets and
the report's tables, names and figures all come from here (docs/EXTENDING.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ubo_core.config import CatalogEntry, ConfigError, Params, check_dataset
from ubo_core.datasets.csv_source import read_csv_real, read_csv_source
from ubo_core.datasets.readers import Interactions, RealFeedback, read_amazon_cds, read_ml100k
from ubo_core.datasets.real import read_coat, read_yahoo
from ubo_core.datasets.sources import AMAZON_CDS, COAT, ML100K, YAHOO, Source

REAL = "real"
SEMISYNTHETIC = "semisynthetic"
KINDS = (REAL, SEMISYNTHETIC)


@dataclass(frozen=True)
class Builtin:
    kind: str
    display: str
    source: Source
    read: Callable[[Path], RealFeedback | Interactions]


BUILTINS: dict[str, Builtin] = {
    "coat": Builtin(REAL, "Coat", COAT, read_coat),
    "yahoo": Builtin(REAL, "Yahoo! R3", YAHOO, read_yahoo),
    "ml100k": Builtin(SEMISYNTHETIC, "ML-100K (semi-synthetic)", ML100K, read_ml100k),
    "amazon_cds": Builtin(
        SEMISYNTHETIC, "Amazon CDs (semi-synthetic)", AMAZON_CDS, read_amazon_cds
    ),
}


@dataclass(frozen=True)
class Dataset:
    """One catalog entry resolved: its kind, display name and how its raw files are read."""

    name: str
    kind: str
    display: str
    entry: CatalogEntry
    source: Source | None  # None: your own CSV files, data/manual/<name>/<entry's files>

    @property
    def files(self) -> tuple[str, ...]:
        """Your own data's file names (empty for a built-in)."""
        return tuple(f for f in (self.entry.train, self.entry.test) if f)

    def read(self, raw_folder: Path) -> RealFeedback | Interactions:
        """The raw folder's feedback: RealFeedback for a real set, Interactions else."""
        if self.source is not None:
            return BUILTINS[self.name].read(raw_folder)
        if self.kind == REAL:
            return read_csv_real(raw_folder, self.entry.train, self.entry.test)
        return read_csv_source(raw_folder, self.entry.train)


def resolve(name: str, entry: CatalogEntry) -> Dataset:
    builtin = BUILTINS.get(name)
    if builtin is not None:
        if entry.train or entry.test:
            raise ConfigError(
                f"catalog.{name}",
                f"{name!r} is a built-in data set (its files come from its source); "
                "your own data needs another name",
            )
        kind = builtin.kind
        display = entry.display or builtin.display
    else:
        if not entry.train:
            raise ConfigError(
                f"catalog.{name}",
                f"not a built-in data set ({', '.join(BUILTINS)}); your own data names its "
                "CSV files: train (and test for a random-exposure test set)",
            )
        kind = REAL if entry.test else SEMISYNTHETIC
        display = entry.display or name
    if kind == REAL and (entry.n_items or entry.min_user_interactions != 1):
        raise ConfigError(
            f"catalog.{name}",
            "n_items and min_user_interactions pick a semi-synthetic source's part; "
            "a real data set is used whole",
        )
    return Dataset(name, kind, display, entry, builtin.source if builtin else None)


def check_catalog(params: Params) -> None:
    """Resolve every catalog entry, so a bad one fails when params.yaml is loaded."""
    for name, entry in params.catalog.items():
        resolve(name, entry)


def get_dataset(params: Params, name: str) -> Dataset:
    """The catalog's data set `name`; a ConfigError listing the catalog if it has none."""
    check_dataset(name, params.catalog)
    return resolve(name, params.catalog[name])


def datasets(params: Params, kind: str | None = None) -> dict[str, Dataset]:
    """The catalog's data sets in its order, all or those of one kind."""
    every = {name: resolve(name, entry) for name, entry in params.catalog.items()}
    return {name: d for name, d in every.items() if kind is None or d.kind == kind}


def dataset_names(params: Params, kind: str | None = None) -> tuple[str, ...]:
    return tuple(datasets(params, kind))
