"""Resumable training: a run's whole state at an epoch's end, saved atomically, and the same
run continued from it with the same numbers it would have had uninterrupted.

A paper-mode run on Yahoo takes hours on a CPU (docs/PERFORMANCE.md); a killed process, a
lost worker or a machine that is only lent for a while would otherwise throw all of it away.
`fit(checkpoint=path)` saves after each evaluated epoch (at most every `min_seconds`) and, when
`path` exists, resumes from it.

What is saved is found rather than listed: every tensor, optimiser, generator and plain value
reachable from the method's attributes (its embeddings, its row optimisers' moments and step
counts, sub-models, counters), minus the training data (`TrainingTensors`, which the resumed run
rebuilds from the data set), plus torch's global RNG and the loop's own counters. A method
gains state without touching this module; tests/test_checkpoint.py trains every method in both
modes straight through and with a stop and resume, and requires identical parameters and curves,
so state this walk missed would show there.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ubo_core.engine import TrainingTensors
from ubo_core.errors import UboError
from ubo_core.fileio import atomic_path

FORMAT = 1
_SCALARS = (bool, int, float, str, type(None))


def _data_storages(tensors: TrainingTensors) -> set[int]:
    return {
        value.untyped_storage().data_ptr()
        for value in vars(tensors).values()
        if isinstance(value, Tensor) and value.numel()
    }


def _walk(root: object, data: set[int]) -> Iterator[tuple[str, Any]]:
    """(path, value) for the state reachable from `root`: tensors (not the data's),
    optimisers, generators and plain values, by attribute path; each object once."""
    seen: set[int] = set()

    def visit(value: Any, path: str) -> Iterator[tuple[str, Any]]:
        if isinstance(value, TrainingTensors):
            return
        if isinstance(value, Tensor):
            if not value.numel() or value.untyped_storage().data_ptr() not in data:
                yield path, value
            return
        if isinstance(value, (torch.optim.Optimizer, torch.Generator)) or isinstance(
            value, _SCALARS
        ):
            yield path, value
            return
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                yield from visit(item, f"{path}[{index}]")
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from visit(item, f"{path}[{key!r}]")
        elif isinstance(value, nn.Module) or type(value).__module__.startswith("ubo_core"):
            if _frozen_dataclass(value):  # configuration: the resumed run is built from the same
                return
            for name, item in vars(value).items():
                yield from visit(item, f"{path}.{name}" if path else name)

    yield from visit(root, "")


def _frozen_dataclass(value: Any) -> bool:
    params = getattr(value, "__dataclass_params__", None)
    return dataclasses.is_dataclass(value) and bool(params is not None and params.frozen)


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, torch.optim.Optimizer):
        return value.state_dict()
    if isinstance(value, torch.Generator):
        return value.get_state()
    return value


def save(
    path: Path,
    identity: dict[str, Any],
    method: object,
    tensors: TrainingTensors,
    generator: torch.Generator,
    loop: dict[str, Any],
) -> None:
    """The run's state after an epoch, written atomically (a kill mid-write leaves the last
    complete checkpoint). `identity` names the run (method, configuration, seed, data shape);
    `loop` holds the trainer's counters and history."""
    state = {name: _plain(value) for name, value in _walk(method, _data_storages(tensors))}
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
    try:
        payload = torch.load(Path(path), map_location=tensors.device, weights_only=False)
    except Exception as error:  # a truncated or foreign file
        raise UboError(f"{path}: not a readable checkpoint ({type(error).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UboError(f"{path}: not a checkpoint of this version of ubo_core")
    if payload["identity"] != identity:
        differ = sorted(
            key
            for key in identity.keys() | payload["identity"].keys()
            if identity.get(key) != payload["identity"].get(key)
        )
        raise UboError(f"{path}: a checkpoint of another run (differs in {', '.join(differ)})")
    targets = dict(_walk(method, _data_storages(tensors)))
    saved = payload["state"]
    if targets.keys() != saved.keys():
        extra = sorted(saved.keys() - targets.keys()) + sorted(targets.keys() - saved.keys())
        raise UboError(f"{path}: the method's state does not match ({', '.join(extra[:5])})")
    with torch.no_grad():
        for name, target in targets.items():
            _restore(method, name, target, saved[name], path)
    generator.set_state(payload["generator"])
    torch.set_rng_state(payload["torch_rng"])
    return payload["loop"]


def _restore(method: object, name: str, target: Any, value: Any, path: Path) -> None:
    if isinstance(target, Tensor):
        if target.shape != value.shape or target.dtype != value.dtype:
            raise UboError(
                f"{path}: {name} is {tuple(value.shape)}, the method's {tuple(target.shape)}"
            )
        target.copy_(value)
    elif isinstance(target, torch.optim.Optimizer):
        target.load_state_dict(value)
    elif isinstance(target, torch.Generator):
        target.set_state(value)
    elif target != value:
        _set_attribute(method, name, value)


def _set_attribute(root: object, name: str, value: Any) -> None:
    """Set the plain value at attribute path `name` (a counter the method keeps)."""
    owner_path, _, attribute = name.rpartition(".")
    if "[" in attribute:
        raise UboError(f"checkpoint: cannot restore {name} (a plain value inside a container)")
    owner = root
    for part in filter(None, owner_path.split(".")):
        owner = getattr(owner, part)
    setattr(owner, attribute, value)


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
