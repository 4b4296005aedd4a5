"""Hyperparameter tuning on the hyper-validation set, the paper's way (never the test set).

The search itself (which values to try, when to prune) belongs to the orchestration layer
(`flows/tune.py`, Optuna); this module holds what is science and must be testable without it:
- `knobs`: the search space of a method, read from `params.yaml` `tuning.space` and checked
  against the method registry;
- `run_trial`: train one configuration on data loaded *without* its test split and score it by
  the best per-epoch SNIPS DCG@3 on the hyper-validation set. The epoch reaching it is part of
  the result: `epochs` is tuned too (early stopping chosen on hyper-validation);
- `tuned_block` / `write_tuned_defaults`: the chosen values as the `datasets:` section of
  `params.yaml`, written atomically and checked before it replaces the file.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ubo_core.config import ConfigError, Params, load_params
from ubo_core.data import FeedbackData
from ubo_core.fileio import atomic_path
from ubo_core.methods import METHODS, check_method_params, get_method, resolve_config
from ubo_core.trainer import EpochReport, fit

OBJECTIVE = "hyper_snips_dcg@3"
TUNED_MARKER = "# ---- tuned defaults"


@dataclass(frozen=True)
class Knob:
    """One dimension of a method's search space."""

    name: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)


def knobs(params: Params, method: str) -> list[Knob]:
    """The search space of `method` (`tuning.space.<method>`); ConfigError on a bad entry."""
    get_method(method)
    space = params.tuning.space.get(method, {})
    where = f"tuning.space.{method}"
    if not isinstance(space, Mapping):
        raise ConfigError(where, "expected a mapping of knob -> {low, high, log} or {choices}")
    result = []
    for name, spec in space.items():
        key = f"{where}.{name}"
        if not isinstance(spec, Mapping):
            raise ConfigError(key, "expected {low, high, log} or {choices: [...]}")
        unknown = sorted(set(spec) - {"low", "high", "log", "choices"})
        if unknown:
            raise ConfigError(
                f"{key}.{unknown[0]}", "unknown key; expected low, high, log, choices"
            )
        if "choices" in spec:
            choices = spec["choices"]
            if set(spec) != {"choices"} or not isinstance(choices, list) or not choices:
                raise ConfigError(key, "choices must be a non-empty list, alone")
            knob = Knob(name, choices=tuple(choices))
        else:
            low, high, log = spec.get("low"), spec.get("high"), spec.get("log", False)
            numbers = all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                for v in (low, high)
            )
            if not numbers or not low < high:  # type: ignore[operator]
                raise ConfigError(key, f"needs numbers low < high, got low={low!r} high={high!r}")
            if not isinstance(log, bool) or (log and low <= 0):  # type: ignore[operator]
                raise ConfigError(key, "log must be true or false, and log needs low > 0")
            knob = Knob(name, low, high, log)
        result.append(knob)
        # Both ends (or every choice) must be a valid configuration of this method.
        for value in knob.choices or (knob.low, knob.high):
            try:
                resolve_config(params, next(iter(params.catalog)), method, {name: value})
            except ConfigError as error:
                raise ConfigError(key, f"not a valid value range: {error}") from None
    return result


def check_tuning(params: Params) -> None:
    """Every method in `tuning.space` exists and every knob is valid (load-time check)."""
    for method in params.tuning.space:
        if method not in METHODS:
            raise ConfigError(
                f"tuning.space.{method}", f"unknown method; expected one of {list(METHODS)}"
            )
        knobs(params, method)


def untuned(params: Params) -> Params:
    """`params` without its `datasets:` layer: what a trial starts from. The tuned values of an
    earlier search (that layer) must not constrain the next one (e.g. cap its epochs)."""
    return dataclasses.replace(params, datasets={})


@dataclass
class TrialOutcome:
    """A trial's score: the best hyper-validation objective over epochs, and when."""

    value: float
    best_epoch: int
    curve: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


def run_trial(
    data: FeedbackData,
    params: Params,
    dataset: str,
    method: str,
    values: Mapping[str, Any],
    seed: int,
    on_epoch: Callable[[EpochReport], None] | None = None,
    progress: bool = False,
) -> TrialOutcome:
    """Train `method` with `values` over the params.yaml defaults and score it on the
    hyper-validation set. `data` should be loaded with `with_test=False`; the test set is never
    evaluated either way. `on_epoch` may raise to stop the trial (pruning)."""
    train, hyper = resolve_config(untuned(params), dataset, method, dict(values))
    curve: list[tuple[int, float]] = []

    def record(report: EpochReport) -> None:
        value = report.metrics[OBJECTIVE]
        curve.append((report.epoch, value if math.isfinite(value) else 0.0))
        if on_epoch is not None:
            on_epoch(report)

    result = fit(
        method,
        data,
        train,
        hyper,
        seed,
        callback=record,
        progress=progress,
        evaluate_test_set=False,
    )
    best_epoch, best_value = max(curve, key=lambda point: (point[1], -point[0]))
    return TrialOutcome(best_value, best_epoch, curve, result.seconds)


def tuned_block(
    chosen: Mapping[str, Mapping[str, Mapping[str, Any]]], header: str, order: Iterable[str] = ()
) -> str:
    """The `datasets:` section of params.yaml holding `chosen[dataset][method] = values`;
    data sets in `order` (the catalog's) first, methods in the registry's order."""
    ordered = {
        dataset: {
            method: {key: _plain(value) for key, value in sorted(chosen[dataset][method].items())}
            for method in METHODS
            if method in chosen[dataset]
        }
        for dataset in dict.fromkeys([*order, *chosen])
        if dataset in chosen
    }
    body = yaml.safe_dump({"datasets": ordered}, sort_keys=False, default_flow_style=None)
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    title = f"{TUNED_MARKER} (written by `python -m flows.tune apply`; review the diff) ----"
    return f"{title}\n{comment}{body}"


def _plain(value: Any) -> Any:
    """Floats rounded to 4 significant digits: reviewable, and as good as the search."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    return value


def write_tuned_defaults(params_path: Path, block: str) -> None:
    """Replace everything from the tuned-defaults marker (or a top-level `datasets:`) to the
    end of params.yaml with `block`; the new file is checked before it replaces the old. The
    `datasets:` section belongs to the tuner: hand-set values go in `methods:`."""
    params_path = Path(params_path)
    text = params_path.read_text()
    lines = text.splitlines(keepends=True)
    cut = next(
        (i for i, line in enumerate(lines) if line.startswith((TUNED_MARKER, "datasets:"))),
        len(lines),
    )
    # The block is the end of the file; refuse to cut away any other top-level section.
    later = [
        line.split(":")[0]
        for line in lines[cut + 1 :]
        if re.match(r"[A-Za-z_]", line) and not line.startswith("datasets:")
    ]
    if later:
        raise ConfigError(
            "datasets",
            f"the tuned block must end {params_path}, but section(s) {later} follow it; move "
            "them above `datasets:`",
        )
    head = "".join(lines[:cut]).rstrip("\n") + "\n\n"
    with atomic_path(params_path) as tmp:
        tmp.write_text(head + block)
        params = load_params(tmp)
        check_method_params(params)
        check_tuning(params)
