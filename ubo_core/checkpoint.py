"""Resumable training: a run's whole state at an epoch's end, saved atomically, and the same
run continued from it with the same numbers it would have had uninterrupted.

A paper-mode run on Yahoo takes hours on a CPU (docs/PERFORMANCE.md); a killed process, a
lost worker or a machine that is only lent for a while would otherwise throw all of it away.
`fit(checkpoint=path)` saves after evaluated epochs (at most every `checkpoint_seconds`) and,
when `path` exists, resumes from it, provided it was written by the same run: method,
configuration, seed, device type, data (a digest of its arrays) and ubo_core's source.

What is saved is found rather than listed: every tensor, optimiser, generator and plain value
reachable from the method's attributes (its embeddings, its row optimisers' moments and step
counts, sub-models, counters), minus the training data (`TrainingTensors`, which the resumed
run rebuilds from the data set), plus torch's global RNG and the loop's own counters. A method
gains state without touching this module, and a value of a type the walk does not know stops
the save with its attribute path rather than being left out. tests/test_checkpoint.py trains
every method in both modes straight through and with a stop and resume (in-process, and a
command killed with SIGKILL), and requires identical parameters and curves.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ubo_core.data import FeedbackData
from ubo_core.engine import TrainingTensors
from ubo_core.errors import UboError
from ubo_core.fileio import atomic_path

FORMAT = 1
_SCALARS = (bool, int, float, str, type(None))
# Values that describe a method rather than hold its state: the rebuilt method has its own.
_DESCRIPTIONS = (torch.device, torch.dtype, PurePath)
Setter = Callable[[Any], None]


def _data_storages(tensors: TrainingTensors) -> set[int]:
    return {
        value.untyped_storage().data_ptr()
        for value in vars(tensors).values()
        if isinstance(value, Tensor) and value.numel()
    }


def _walk(root: object, data: set[int]) -> Iterator[tuple[str, Any, Setter | None]]:
    """(path, value, setter) for the state reachable from `root`: tensors (not the data's),
    optimisers, generators and plain values, by attribute path, each object once; `setter`
    puts a plain value back where it was found (None where it cannot be: in a tuple). A value
    of any other type raises: state this module does not know how to keep must not be
    dropped silently."""
    seen: set[int] = set()

    def visit(value: Any, path: str, setter: Setter | None) -> Iterator[tuple[str, Any, Any]]:
        if isinstance(value, TrainingTensors) or isinstance(value, _DESCRIPTIONS):
            return
        if isinstance(value, Tensor):
            if not value.numel() or value.untyped_storage().data_ptr() not in data:
                yield path, value, setter
            return
        if isinstance(value, (torch.optim.Optimizer, torch.Generator, *_SCALARS)):
            yield path, value, setter
            return
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, list):
            for index, item in enumerate(value):
                yield from visit(item, f"{path}[{index}]", partial(value.__setitem__, index))
        elif isinstance(value, tuple):
            for index, item in enumerate(value):
                yield from visit(item, f"{path}[{index}]", None)
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from visit(item, f"{path}[{key!r}]", partial(value.__setitem__, key))
        elif isinstance(value, nn.Module) or type(value).__module__.startswith("ubo_core"):
            # Frozen dataclasses too (configuration, mostly: equal on restore, so never set;
            # a tensor in one could still change in place).
            for name, item in vars(value).items():
                where = f"{path}.{name}" if path else name
                yield from visit(item, where, partial(object.__setattr__, value, name))
        elif isinstance(value, (set, frozenset)) and all(isinstance(v, str) for v in value):
            return  # nn.Module's names of non-persistent buffers
        else:
            raise UboError(
                f"checkpoint: {path} is a {type(value).__module__}.{type(value).__name__}, "
                "which ubo_core/checkpoint.py does not know how to save"
            )

    yield from visit(root, "", None)


def _plain(value: Any) -> Any:
    # Tensors as they are: torch.save writes each storage once, however many names share it.
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, torch.optim.Optimizer):
        return value.state_dict()
    if isinstance(value, torch.Generator):
        return value.get_state()
    return value


def data_digest(data: FeedbackData) -> str:
    """A hash of the arrays a run reads (a rebuilt validation split with the same counts is
    another run)."""
    digest = hashlib.sha256()
    for name, value in sorted(vars(data).items()):
        if isinstance(value, np.ndarray):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:16]


def code_digest() -> str:
    """A hash of ubo_core's source: a checkpoint resumes only under the code that wrote it."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def save(
    path: Path,
    identity: dict[str, Any],
    method: object,
    tensors: TrainingTensors,
    generator: torch.Generator,
    loop: dict[str, Any],
) -> None:
    """The run's state after an epoch, written atomically (a kill mid-write leaves the last
    complete checkpoint). `identity` names the run (method, configuration, seed, data, code);
    `loop` holds the trainer's counters and history."""
    state = {name: _plain(value) for name, value, _ in _walk(method, _data_storages(tensors))}
    payload = {
        "format": FORMAT,
        "identity": identity,
        "state": state,
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "loop": loop,
    }
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)


def load(
    path: Path,
    identity: dict[str, Any],
    method: object,
    tensors: TrainingTensors,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Restore `method` (freshly built for the same run), `generator` and torch's RNG from
    `path`; returns the trainer's `loop` state. A checkpoint of another run, or one whose
    state does not fit the method, stops with one line naming the file."""
    payload = _read(path)
    if differ := _differences(identity, payload.get("identity", {})):
        raise UboError(f"{path}: a checkpoint of another run (differs in {', '.join(differ)})")
    targets = {
        name: (value, setter) for name, value, setter in _walk(method, _data_storages(tensors))
    }
    saved = payload["state"]
    if targets.keys() != saved.keys():
        extra = sorted(saved.keys() ^ targets.keys())
        raise UboError(f"{path}: the method's state does not match ({', '.join(extra[:5])})")
    with torch.no_grad():
        for name, (target, setter) in targets.items():
            _restore(name, target, setter, saved[name], path)
    generator.set_state(payload["generator"])
    torch.set_rng_state(payload["torch_rng"])
    return payload["loop"]


def saved_loop(path: Path) -> dict[str, Any]:
    """The trainer's loop state in the checkpoint at `path` (its last epoch, its history so
    far, its counters), read without restoring anything: for a caller that decides on the
    whole curve, such as an early stop, when `fit` resumes from it."""
    return _read(path)["loop"]


def _read(path: Path) -> dict[str, Any]:
    try:
        # Onto the CPU: generator states must be CPU byte tensors; `copy_` and the optimisers'
        # `load_state_dict` move the rest onto the method's device.
        payload = torch.load(Path(path), map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file
        raise UboError(f"{path}: not a readable checkpoint ({type(error).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UboError(f"{path}: not a checkpoint of this version of ubo_core")
    return payload


def _differences(mine: dict[str, Any], theirs: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ (train.epochs, seed, ...)."""
    keys = sorted(mine.keys() | theirs.keys())
    found = []
    for key in keys:
        a, b = mine.get(key), theirs.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key}")
    return found


def _restore(name: str, target: Any, setter: Setter | None, value: Any, path: Path) -> None:
    if isinstance(target, Tensor):
        if target.shape != value.shape or target.dtype != value.dtype:
            raise UboError(
                f"{path}: {name} is {tuple(value.shape)} {value.dtype}, the method's "
                f"{tuple(target.shape)} {target.dtype}"
            )
        target.copy_(value)
    elif isinstance(target, torch.optim.Optimizer):
        target.load_state_dict(value)
    elif isinstance(target, torch.Generator):
        target.set_state(value)
    elif target != value:
        if setter is None:
            raise UboError(f"{path}: cannot restore {name} (a value inside a tuple)")
        setter(value)


class Schedule:
    """When to save: after an evaluated epoch once `min_seconds` passed since the last save,
    and always after the last epoch."""

    def __init__(self, min_seconds: float) -> None:
        self.min_seconds, self.last = min_seconds, time.monotonic()

    def due(self, final: bool) -> bool:
        if final or time.monotonic() - self.last >= self.min_seconds:
            self.last = time.monotonic()
            return True
        return False
