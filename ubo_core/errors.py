"""Errors a user can act on. Entry points print `str(error)` and exit non-zero."""

from __future__ import annotations

from pathlib import Path


class UboError(Exception):
    """Base class of every error that ends a stage with a one-line message.

    Picklable whatever a subclass's constructor takes (an error raised in a worker process
    reaches its parent whole): the constructor's arguments are recorded and replayed.
    """

    def __new__(cls, *args: object, **kwargs: object) -> UboError:
        error = super().__new__(cls, *args)
        error._init = (args, kwargs)
        return error

    def __reduce__(self):
        args, kwargs = self._init
        return _rebuild, (type(self), args, kwargs)


def _rebuild(cls: type[UboError], args: tuple, kwargs: dict) -> UboError:
    return cls(*args, **kwargs)


class ConfigError(UboError):
    """A bad `params.yaml`: unknown key, wrong type, value out of range, unknown name."""

    def __init__(self, key: str, problem: str, source: str | Path = "params.yaml") -> None:
        super().__init__(f"{source}: {key}: {problem}")
        self.key = key


class UsageError(UboError):
    """A bad command line: the message names the flag or argument, not params.yaml."""

    def __init__(self, flag: str, problem: str) -> None:
        super().__init__(f"{flag}: {problem}")
        self.flag = flag


class DataError(UboError):
    """A bad or missing data file; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)


class TrainingDiverged(UboError):
    """A training loss became NaN or infinite (a learning rate too large, usually)."""
