"""A data set of the catalog, resolved (ubo_core/datasets/registry.py builds them): what the
stages need to download, read and name it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ubo_core.config import CatalogEntry
from ubo_core.datasets.readers import Interactions, RealFeedback
from ubo_core.datasets.sources import Source


@dataclass(frozen=True)
class Dataset:
    """One catalog entry resolved: its kind (config.REAL or SEMISYNTHETIC), display name,
    where its raw files come from and how they are read."""

    name: str
    kind: str
    display: str
    entry: CatalogEntry
    source: Source | None  # None: your own CSV files, data/manual/<name>/<entry's files>
    reader: Callable[[Path], RealFeedback | Interactions]

    @property
    def files(self) -> tuple[str, ...]:
        """Your own data's file names (empty for a built-in)."""
        return tuple(f for f in (self.entry.train, self.entry.test) if f)

    def read(self, raw_folder: Path) -> RealFeedback | Interactions:
        """The raw folder's feedback: RealFeedback for a real set, Interactions else."""
        return self.reader(raw_folder)
