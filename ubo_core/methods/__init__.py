"""The method registry: name -> class. Name = module name = the value used in params.yaml;
the order is the report's (the paper's Tables 1-2, then the ablations); the display name is
the class's `display` (its class name unless it says otherwise). docs/EXTENDING.md."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ubo_core.config import ConfigError, Params, TrainConfig, build, check_dataset
from ubo_core.methods.alteropt import AlterOpt
from ubo_core.methods.base import Method
from ubo_core.methods.biopt2 import BiOpt2
from ubo_core.methods.bpr import BPR
from ubo_core.methods.cjmf import CJMF
from ubo_core.methods.expomf import ExpoMF
from ubo_core.methods.jointopt import JointOpt
from ubo_core.methods.noopt import NoOpt
from ubo_core.methods.relmf import RelMF
from ubo_core.methods.ubo import UBO
from ubo_core.methods.umf import UMF

METHODS: dict[str, type[Method]] = {
    "relmf": RelMF,
    "expomf": ExpoMF,
    "cjmf": CJMF,
    "bpr": BPR,
    "umf": UMF,
    "ubo": UBO,
    "jointopt": JointOpt,
    "alteropt": AlterOpt,
    "biopt2": BiOpt2,
    "noopt": NoOpt,
}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ConfigError("method", f"unknown method {name!r}; expected one of {list(METHODS)}")
    return METHODS[name]


def resolve_config(
    params: Params, dataset: str, method: str, overrides: Mapping[str, Any] | None = None
) -> tuple[TrainConfig, Any]:
    """The training config and the method's own hyperparameters for (dataset, method).

    Later layers win: `train`, then `methods.<method>`, then `datasets.<dataset>.<method>`,
    then `overrides` (the command line's --set). Each layer may set `train` keys and the
    method's own knobs; any other key is a ConfigError naming where it came from.
    """
    cls = get_method(method)
    check_dataset(dataset, params.catalog)
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    hyper_keys = {f.name for f in dataclasses.fields(cls.Hyper)}
    train_values: dict[str, Any] = dataclasses.asdict(params.train)
    hyper_values: dict[str, Any] = {}
    layers = [
        (f"methods.{method}", params.methods.get(method, {})),
        (f"datasets.{dataset}.{method}", params.datasets.get(dataset, {}).get(method, {})),
        ("--set", overrides or {}),
    ]
    origin: dict[str, str] = {}  # key -> the layer that set it last, for error messages
    for where, layer in layers:
        if not isinstance(layer, Mapping):
            raise ConfigError(where, "expected a mapping")
        for key, value in layer.items():
            if key in train_keys:
                train_values[key] = value
            elif key in hyper_keys:
                hyper_values[key] = value
            else:
                known = sorted(train_keys | hyper_keys)
                raise _layer_error(
                    where, key, f"unknown key for method {method!r}; expected one of {known}"
                )
            origin[key] = where
    try:
        return build(TrainConfig, train_values, "train."), build(
            cls.Hyper, hyper_values, f"methods.{method}."
        )
    except ConfigError as error:
        # Name the layer the bad value came from (params.yaml's section or the command line).
        key = error.key.rsplit(".", 1)[-1]
        if key not in origin:
            raise
        raise _layer_error(origin[key], key, str(error).split(": ", 2)[-1]) from None


def _layer_error(where: str, key: str, problem: str) -> ConfigError:
    if where == "--set":
        return ConfigError(f"--set {key}", problem, source="command line")
    return ConfigError(f"{where}.{key}", problem)


def check_method_params(params: Params) -> None:
    """Resolve every (data set, method) the file mentions, so a bad key fails at load time."""
    for method in params.methods:
        get_method(method)
    for dataset, per_method in params.datasets.items():  # names checked by Params
        for method in per_method:
            resolve_config(params, dataset, method)
    any_dataset = next(iter(params.catalog))
    for method in params.methods:
        resolve_config(params, any_dataset, method)
