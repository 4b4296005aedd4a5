"""Errors a user can act on. Entry points print `str(error)` and exit non-zero."""

from __future__ import annotations

from pathlib import Path


class UboError(Exception):
    """Base class of every error that ends a stage with a one-line message."""


class ConfigError(UboError):
    """A bad `params.yaml`: unknown key, wrong type, value out of range, unknown name."""

    def __init__(self, key: str, problem: str, source: str | Path = "params.yaml") -> None:
        super().__init__(f"{source}: {key}: {problem}")
        self.key = key
        self._args = (key, problem, source)

    def __reduce__(self):  # picklable, so an error in a worker process reaches its parent
        return type(self), self._args


class DataError(UboError):
    """A bad or missing data file; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self._args = (path, problem)

    def __reduce__(self):
        return type(self), self._args


class TrainingDiverged(UboError):
    """A training loss became NaN or infinite (a learning rate too large, usually)."""
