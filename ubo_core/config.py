"""Typed, strict configuration read once from `params.yaml`.

One frozen dataclass per section. Unknown keys, missing keys, wrong types and out-of-range
values raise `ConfigError` naming the dotted key. Nothing else in `ubo_core` reads YAML.

The rule for missing keys (docs/CONFIG.md): params.yaml gives every key of every section,
so the file a user reads is the whole configuration; a missing one is an error that names
every missing key. The exceptions are overrides and optional entries, each optional by
meaning: `methods` and `datasets` override train keys and each method's own knobs (whose
defaults are the method's `Hyper` class: `python -m ubo_core.train --show-config` prints a
run's resolved values), and a catalog entry's keys (a built-in data set needs none). The
dataclasses' defaults serve code that builds a config directly (tests, the Python API).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from ubo_core.errors import ConfigError

T = TypeVar("T")
# libyaml's parser where PyYAML was built with it (the wheels are): the same documents, ten
# times faster; every training run reads params.yaml, ~0.2 s of a Coat cell in pure Python.
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# A data set's name is a folder name and part of DVC's stage names (download@<name>).
DATASET_NAME = re.compile(r"[a-z][a-z0-9_]*")
# The two kinds of data set: implicit feedback with a random-exposure test set (evaluated on
# it), or a source from which ground-truth relevance and exposure are generated.
REAL, SEMISYNTHETIC = "real", "semisynthetic"
# The built-in data sets and their kinds; ubo_core/datasets/registry.py adds each one's
# source and reader. Any other catalog name is your own CSV data.
BUILTIN_KINDS: dict[str, str] = {
    "coat": REAL,
    "yahoo": REAL,
    "ml100k": SEMISYNTHETIC,
    "amazon_cds": SEMISYNTHETIC,
}


def check_dataset(name: str, allowed: Iterable[str]) -> str:
    """Return `name` if it is one of `allowed` (params.yaml's catalog), else ConfigError."""
    allowed = list(allowed)
    if name not in allowed:
        raise ConfigError("dataset", f"unknown data set {name!r}; expected one of {allowed}")
    return name


@dataclass(frozen=True)
class DataPaths:
    raw_dir: Path = Path("data/raw")
    interim_dir: Path = Path("data/interim")
    processed_dir: Path = Path("data/processed")
    manual_dir: Path = Path("data/manual")


@dataclass(frozen=True)
class PreprocessConfig:
    positive_threshold: int = 4

    def __post_init__(self) -> None:
        _check_range("preprocess.positive_threshold", self.positive_threshold, 1, 5)


VALIDATION_NEGATIVES: tuple[str, ...] = ("rated", "unlabeled")
VALIDATION_POPULARITY: tuple[str, ...] = ("positives", "ratings")


@dataclass(frozen=True)
class ValidationConfig:
    """The unbiased validation set: "we select the most popular positive item and negative
    item for each active user" (the paper, Sec. 2, Bi-level Optimization). Two readings are
    open (docs/FIDELITY.md measures both):
    - `negative`: "rated", an item the user rated below the threshold (known to have been
      seen and disliked; needs explicit ratings), or "unlabeled", any item with R~ = 0 for
      the user (all an implicit-feedback system knows).
    - `popularity`: "positives", n_i = training positives of i as in theta_i (Eq. 12), or
      "ratings", the number of users who rated i (how often it was seen).
    """

    active_user_fraction: float = 0.2
    hyper_fraction: float = 0.1
    seed: int = 0
    negative: str = "rated"
    popularity: str = "positives"

    def __post_init__(self) -> None:
        _check_range("validation.active_user_fraction", self.active_user_fraction, 0.0, 1.0, True)
        _check_range("validation.hyper_fraction", self.hyper_fraction, 0.0, 1.0, True)
        check_choice("validation.negative", self.negative, VALIDATION_NEGATIVES)
        check_choice("validation.popularity", self.popularity, VALIDATION_POPULARITY)


@dataclass(frozen=True)
class CatalogEntry:
    OPTIONAL: typing.ClassVar[frozenset[str]] = frozenset(
        {"display", "train", "test", "n_items", "min_user_interactions"}
    )

    """One data set the pipeline builds: params.yaml `catalog.<name>` (docs/EXTENDING.md).

    A built-in name (ubo_core/datasets/registry.py: coat, yahoo, ml100k, amazon_cds) needs
    no file keys. Your own data names its CSV files in `data/manual/<name>/`: `train`
    (required) and `test`, a random-exposure test (then it is evaluated like Yahoo and Coat;
    without one, the semi-synthetic route builds the ground truth from `train`, like ML-100K).
    `n_items` and `min_user_interactions` pick the part of a semi-synthetic source that is
    kept (0 = every item), so dense training stays minutes.
    """

    display: str = ""  # the report's name for it; default: the built-in's, else the name
    train: str = ""
    test: str = ""
    n_items: int = 0
    min_user_interactions: int = 1

    def __post_init__(self) -> None:
        if self.n_items:
            _check_range("n_items", self.n_items, 2, 10**9)
        _check_range("min_user_interactions", self.min_user_interactions, 1, 10**9)
        for key in ("train", "test"):
            name = getattr(self, key)
            if name and (Path(name).is_absolute() or ".." in Path(name).parts):
                raise ConfigError(key, f"{name!r}: a file name inside data/manual/<name>/")
        if self.test and not self.train:
            raise ConfigError("test", "given without `train`")
        if self.test and Path(self.test) == Path(self.train):
            raise ConfigError("test", "the same file as `train`; a test set must be held out")


def default_catalog() -> dict[str, CatalogEntry]:
    return {
        "coat": CatalogEntry(),
        "yahoo": CatalogEntry(),
        "ml100k": CatalogEntry(n_items=1682, min_user_interactions=1),
        "amazon_cds": CatalogEntry(n_items=1000, min_user_interactions=10),
    }


SEMISYNTHETIC_GENERATORS: tuple[str, ...] = ("reference", "fitted")


@dataclass(frozen=True)
class SemisyntheticConfig:
    """How the ground truth is made (ubo_core/datasets/semisynthetic.py, docs/DATA.md).

    `generator`: "reference" follows Saito et al.'s generator (usaito/unbiased-implicit-rec),
    as the paper says ("similar to Saito et al."): MFs without biases, Glorot-uniform
    initialised, `fit_steps` Adam steps of `reference_batch_size` pairs drawn with
    replacement at `reference_lr`, which stops them early (about 0.8 epoch of ML-100K's
    ratings). "fitted": biased MFs fitted to convergence by full-batch Adam at `fit_lr` with
    `fit_weight_decay` (this project's earlier generator).

    `unexposed_test_negatives`: the second test protocol, Saito et al.'s (their
    src/evaluator.py): each user's relevant but unclicked items of the training draw
    (R = 1, O = 0) ranked against up to this many sampled non-relevant items. The paper
    says only that it evaluates "similarly" to its real data sets; the study reports both."""

    seed: int = 0
    n_test_items: int = 10
    unexposed_test_negatives: int = 100
    relevance_eps: float = 5.0
    exposure_power: float = 1.0
    generator: str = "reference"
    fit_dim: int = 20
    fit_steps: int = 300
    reference_lr: float = 0.01
    reference_batch_size: int = 256
    fit_lr: float = 0.05
    fit_weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        _check_range("semisynthetic.n_test_items", self.n_test_items, 2, 10**6)
        _check_range(
            "semisynthetic.unexposed_test_negatives", self.unexposed_test_negatives, 1, 10**6
        )
        _check_range("semisynthetic.exposure_power", self.exposure_power, 0.0, 100.0, True)
        _check_range("semisynthetic.fit_dim", self.fit_dim, 1, 1024)
        _check_range("semisynthetic.fit_steps", self.fit_steps, 1, 10**6)
        _check_range("semisynthetic.fit_lr", self.fit_lr, 0.0, 10.0, True)
        _check_range("semisynthetic.fit_weight_decay", self.fit_weight_decay, 0.0, 10.0)
        _check_range("semisynthetic.reference_lr", self.reference_lr, 0.0, 10.0, True)
        _check_range("semisynthetic.reference_batch_size", self.reference_batch_size, 1, 10**7)
        check_choice("semisynthetic.generator", self.generator, SEMISYNTHETIC_GENERATORS)


TRAIN_MODES: tuple[str, ...] = ("paper", "dense")
OPTIMIZERS: tuple[str, ...] = ("adam", "lazy_adam")
ELEMENTWISE_SETTINGS: tuple[str, ...] = ("auto", "compiled", "eager")
# TrainConfig keys that change a run's numbers by float rounding at most, like a rerun on
# another machine: the device (a run on CPU and one on GPU are the same experiment), the CPU
# thread count, and whether dense mode's elementwise passes ran compiled or eager. A checkpoint
# may be resumed across them (ubo_core/trainer.py).
ROUNDING_ONLY_KEYS: frozenset[str] = frozenset({"device", "threads", "elementwise"})
# ... and the keys that change no result at all: those, and how often the validation curves
# are evaluated (evaluation never draws from the training generator). They stay out of a
# run's identity (flows/run_identity.py's run key, benchmarks/fidelity.py's records); a
# checkpoint keeps eval_every, since its stored curve depends on it.
NON_RESULT_KEYS: frozenset[str] = ROUNDING_ONLY_KEYS | {"eval_every"}


@dataclass(frozen=True)
class TrainConfig:
    """Knobs every method shares (the paper: Adam, lr 1e-3, dim 50, batch 1024, 100 epochs).

    `mode` picks the training engine: "paper" steps on minibatches of `batch_size` pairs drawn
    from all N x M pairs; "dense" steps on blocks of `block_users` users against all items
    (a few GEMMs), with its own learning rate `dense_lr` since its batches are much larger.
    `optimizer` "adam" is torch.optim.Adam exactly; "lazy_adam" updates only the embedding
    rows a step touches (torch.optim.SparseAdam semantics): O(batch) instead of O(table).
    """

    mode: str = "paper"
    optimizer: str = "adam"
    device: str = "auto"
    epochs: int = 100
    dim: int = 50
    batch_size: int = 1024
    block_users: int = 256
    lr: float = 1e-3
    dense_lr: float = 1e-2
    weight_decay: float = 0.0
    init_std: float = 0.1
    val_batch_size: int = 1024
    eval_every: int = 1
    # CPU threads for torch. 0 = auto: 1 in paper mode (its ops are tiny, and handing them to
    # a second thread costs more than it saves: 0.8 against 1.35 ms per UMF step on Yahoo),
    # all cores in dense mode (GEMMs). Same seed and same thread count: bitwise same results.
    threads: int = 0
    # Dense mode's elementwise passes (ubo_core/fused.py): "compiled" fuses each step's chain
    # into one loop (torch.compile), "eager" runs it op by op, "auto" compiles where a
    # compiler is present. The same values to float rounding; the run records which ran.
    elementwise: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in TRAIN_MODES:
            raise ConfigError(
                "mode", f"unknown mode {self.mode!r}; expected one of {list(TRAIN_MODES)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                "optimizer",
                f"unknown optimizer {self.optimizer!r}; expected one of {list(OPTIMIZERS)}",
            )
        if self.elementwise not in ELEMENTWISE_SETTINGS:
            raise ConfigError(
                "elementwise",
                f"unknown setting {self.elementwise!r}; expected one of "
                f"{list(ELEMENTWISE_SETTINGS)}",
            )
        if self.device != "auto" and not (
            self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")
        ):
            raise ConfigError("device", f"{self.device!r}; expected auto, cpu, cuda or cuda:N")
        for key in ("epochs", "dim", "batch_size", "block_users", "val_batch_size", "eval_every"):
            _check_range(key, getattr(self, key), 1, 10**9)
        for key in ("lr", "dense_lr", "init_std"):
            _check_range(key, getattr(self, key), 0.0, 100.0, True)
        _check_range("weight_decay", self.weight_decay, 0.0, 100.0)
        _check_range("threads", self.threads, 0, 1024)

    def cpu_threads(self) -> int | None:
        """Threads to set for a CPU run, or None to leave torch's default."""
        if self.threads:
            return self.threads
        return 1 if self.mode == "paper" else None

    @property
    def step_lr(self) -> float:
        """The learning rate of the relevance parameters in this mode."""
        return self.lr if self.mode == "paper" else self.dense_lr


@dataclass(frozen=True)
class TuningConfig:
    """The hyperparameter search (`ubo/tune`): per (data set, method), `trials[dataset]`
    trials of `seed`-ed TPE over `space[method]`, each scored by the best per-epoch SNIPS
    DCG@3 on the hyper-validation set; a trial whose curve is below the median of earlier
    trials after `prune_after_epochs` epochs is stopped. `space[method][knob]` is
    {low, high, log} (int when low and high are ints) or {choices: [...]}; knobs are train
    keys or the method's own. Checked against the registry by `ubo_core.tuning`."""

    seed: int = 0
    trials: dict[str, int] = field(default_factory=dict)
    startup_trials: int = 4
    prune_after_epochs: int = 10
    space: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for dataset, count in self.trials.items():
            _check_range(f"trials.{dataset}", count, 1, 10**6)
        _check_range("startup_trials", self.startup_trials, 1, 10**6)
        _check_range("prune_after_epochs", self.prune_after_epochs, 1, 10**6)


@dataclass(frozen=True)
class Params:
    """The whole of `params.yaml`.

    `catalog` names the data sets the pipeline builds (dvc.yaml's stages loop over it; the
    data-set registry, ubo_core/datasets/registry.py, says what each is). `methods` (per
    method) and `datasets` (per data set, per method) hold overrides of `train` keys and
    each method's own knobs; they are checked against the method registry when the file is
    loaded, and resolved by `ubo_core.methods.resolve_config`.
    """

    # Overrides, optional by meaning: absent is "no override" (an untuned study has no
    # `datasets:` block).
    OPTIONAL: typing.ClassVar[frozenset[str]] = frozenset({"methods", "datasets"})

    data: DataPaths = field(default_factory=DataPaths)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    semisynthetic: SemisyntheticConfig = field(default_factory=SemisyntheticConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    datasets: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    catalog: dict[str, CatalogEntry] = field(default_factory=default_catalog)

    def __post_init__(self) -> None:
        if not self.catalog:
            raise ConfigError("catalog", "names no data set")
        for name, entry in self.catalog.items():
            if not DATASET_NAME.fullmatch(name):
                raise ConfigError(
                    f"catalog.{name}", "a data set name is lower-case letters, digits and _"
                )
            _check_catalog_entry(name, entry)
        for where, names in (("datasets", self.datasets), ("tuning.trials", self.tuning.trials)):
            for name in names:
                if name not in self.catalog:
                    raise ConfigError(
                        f"{where}.{name}",
                        f"unknown data set; expected one of the catalog's {list(self.catalog)}",
                    )


def dataset_kind(name: str, entry: CatalogEntry) -> str:
    """REAL or SEMISYNTHETIC: a built-in's kind, or for your own data whether it has a test
    file."""
    if name in BUILTIN_KINDS:
        return BUILTIN_KINDS[name]
    return REAL if entry.test else SEMISYNTHETIC


def _check_catalog_entry(name: str, entry: CatalogEntry) -> None:
    if name in BUILTIN_KINDS and (entry.train or entry.test):
        raise ConfigError(
            f"catalog.{name}",
            f"{name!r} is a built-in data set (its files come from its source); "
            "your own data needs another name",
        )
    if name not in BUILTIN_KINDS and not entry.train:
        raise ConfigError(
            f"catalog.{name}",
            f"not a built-in data set ({', '.join(BUILTIN_KINDS)}); your own data names its "
            "CSV files: train (and test for a random-exposure test set)",
        )
    if dataset_kind(name, entry) == REAL and (entry.n_items or entry.min_user_interactions != 1):
        raise ConfigError(
            f"catalog.{name}",
            "n_items and min_user_interactions pick a semi-synthetic source's part; "
            "a real data set is used whole",
        )


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and check `params.yaml`; every problem is a ConfigError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("(file)", "not found", source=path)
    try:
        loader = SAFE_LOADER(path.read_text())
        try:  # one parse: the node tree is checked for duplicate keys, then constructed
            node = loader.get_single_node()
            _check_duplicate_keys(node, "", path)
            raw = loader.construct_document(node) if node is not None else {}  # empty file
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        raise ConfigError("(file)", f"not valid YAML ({error})", source=path) from error
    try:
        params = build(Params, raw, "")
    except ConfigError as error:
        raise ConfigError(error.key, str(error).split(": ", 2)[-1], source=path) from None
    if missing := missing_keys(Params, raw, ""):
        raise ConfigError(
            ", ".join(missing),
            "missing; params.yaml gives every key of its sections (docs/CONFIG.md), so a "
            "deleted line never falls back to a default silently",
            source=path,
        )
    return params


def default_document() -> dict[str, Any]:
    """Every key of params.yaml at the code's defaults, as YAML would hold it: the template a
    new params.yaml starts from (`python -m ubo_core.config`)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: plain(each) for key, each in value.items()}
        return str(value) if isinstance(value, Path) else value

    return plain(dataclasses.asdict(Params()))


def missing_keys(cls: type, raw: Any, prefix: str) -> list[str]:
    """The dotted keys of dataclass `cls` (and its dataclass-valued fields, recursively)
    that mapping `raw` leaves out, in the dataclass's order; a class's `OPTIONAL` keys may be
    left out. `raw` has already been built, so its types are right."""
    optional = getattr(cls, "OPTIONAL", frozenset())
    hints = typing.get_type_hints(cls)
    missing = []
    for each in dataclasses.fields(cls):
        if each.name in optional:
            continue
        if each.name not in raw:
            missing.append(f"{prefix}{each.name}")
            continue
        hint = hints[each.name]
        if dataclasses.is_dataclass(hint):
            missing += missing_keys(hint, raw[each.name], f"{prefix}{each.name}.")
        elif typing.get_origin(hint) is dict:
            value_hint = typing.get_args(hint)[1]
            if dataclasses.is_dataclass(value_hint):
                for name, entry in raw[each.name].items():
                    missing += missing_keys(value_hint, entry, f"{prefix}{each.name}.{name}.")
    return missing


def _check_duplicate_keys(node: yaml.Node | None, prefix: str, path: Path) -> None:
    """A key given twice in one mapping (YAML keeps the last one silently) is an error naming
    the dotted key and both lines."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"{prefix}{key}", f"given twice (lines {seen[key]} and {line})", source=path
                )
            seen[key] = line
            _check_duplicate_keys(value_node, f"{prefix}{key}.", path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicate_keys(item, f"{prefix.rstrip('.')}[{index}].", path)


def build(cls: type[T], raw: Any, prefix: str) -> T:
    """Build dataclass `cls` from a mapping, strictly (no unknown keys, exact types)."""
    where = prefix.rstrip(".") or "(top level)"
    if not isinstance(raw, dict):
        raise ConfigError(where, f"expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}", f"unknown key; expected one of {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], raw[name], f"{prefix}{name}") for name in raw}
    try:
        return cls(**values)
    except ConfigError as error:
        # Range checks in __post_init__ name the key relative to the section.
        if prefix and not error.key.startswith(prefix):
            raise ConfigError(prefix + error.key, str(error).split(": ", 2)[-1]) from None
        raise


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        hint = next(option for option in options if option is not type(None))
        return _coerce(hint, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        _, value_hint = typing.get_args(hint)
        return {
            str(k): (v if value_hint is Any else _coerce(value_hint, v, f"{key}.{k}"))
            for k, v in value.items()
        }
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"expected a list, got {value!r}")
        (item_hint, *_) = typing.get_args(hint)
        return tuple(_coerce(item_hint, item, f"{key}[{i}]") for i, item in enumerate(value))
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(key, f"expected a path string, got {value!r}")
        return Path(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"expected a number, got {value!r}")
        if not math.isfinite(value):  # NaN passes every range check; inf is no setting
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported type {hint!r}")


def _check_range(
    key: str, value: float, low: float, high: float, exclusive_low: bool = False
) -> None:
    too_low = value <= low if exclusive_low else value < low
    if too_low or value > high:
        bracket = "(" if exclusive_low else "["
        raise ConfigError(key, f"{value!r} is out of range {bracket}{low}, {high}]")


def check_choice(key: str, value: str, choices: Iterable[str]) -> None:
    """ConfigError naming `key` unless `value` is one of `choices` (every enumerated knob)."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(key, f"unknown value {value!r}; expected one of {choices}")


if __name__ == "__main__":
    # `python -m ubo_core.config`: a complete params.yaml at the code's defaults.
    print(yaml.safe_dump(default_document(), sort_keys=False), end="")
