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
from functools import partial
from pathlib import Path

from ubo_core.config import (
    BUILTIN_KINDS,
    REAL,
    SEMISYNTHETIC,
    CatalogEntry,
    Params,
    check_dataset,
    dataset_kind,
)
from ubo_core.datasets.csv_source import read_csv_real, read_csv_source
from ubo_core.datasets.dataset import Dataset
from ubo_core.datasets.readers import Interactions, RealFeedback, read_amazon_cds, read_ml100k
from ubo_core.datasets.real import read_coat, read_yahoo
from ubo_core.datasets.sources import AMAZON_CDS, COAT, ML100K, YAHOO, Source

__all__ = ["BUILTINS", "REAL", "SEMISYNTHETIC", "Dataset", "datasets", "get_dataset"]


@dataclass(frozen=True)
class Builtin:
    display: str
    source: Source
    read: Callable[[Path], RealFeedback | Interactions]


# Their kinds are config.BUILTIN_KINDS' (params.yaml is checked without this module).
BUILTINS: dict[str, Builtin] = {
    "coat": Builtin("Coat", COAT, read_coat),
    "yahoo": Builtin("Yahoo! R3", YAHOO, read_yahoo),
    "ml100k": Builtin("ML-100K (semi-synthetic)", ML100K, read_ml100k),
    "amazon_cds": Builtin("Amazon CDs (semi-synthetic)", AMAZON_CDS, read_amazon_cds),
}
assert list(BUILTINS) == list(BUILTIN_KINDS)


def resolve(name: str, entry: CatalogEntry) -> Dataset:
    """The catalog entry `name` as a Dataset (params.yaml was checked when it was loaded)."""
    kind = dataset_kind(name, entry)
    builtin = BUILTINS.get(name)
    if builtin is not None:
        return Dataset(
            name, kind, entry.display or builtin.display, entry, builtin.source, builtin.read
        )
    reader = (
        partial(_read_real_csv, entry=entry) if kind == REAL else partial(_read_csv, entry=entry)
    )
    return Dataset(name, kind, entry.display or name, entry, None, reader)


def _read_real_csv(raw_folder: Path, entry: CatalogEntry) -> RealFeedback:
    return read_csv_real(raw_folder, entry.train, entry.test)


def _read_csv(raw_folder: Path, entry: CatalogEntry) -> Interactions:
    return read_csv_source(raw_folder, entry.train)


def get_dataset(params: Params, name: str) -> Dataset:
    """The catalog's data set `name`; a ConfigError listing the catalog if it has none."""
    check_dataset(name, params.catalog)
    return resolve(name, params.catalog[name])


def datasets(params: Params, kind: str | None = None) -> dict[str, Dataset]:
    """The catalog's data sets in its order, all or those of one kind."""
    every = {name: resolve(name, entry) for name, entry in params.catalog.items()}
    return {name: d for name, d in every.items() if kind is None or d.kind == kind}
