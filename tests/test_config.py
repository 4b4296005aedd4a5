"""params.yaml is read once into typed config; every problem names the key."""

from pathlib import Path

import pytest
import yaml

from ubo_core.config import (
    CatalogEntry,
    Params,
    TrainConfig,
    check_dataset,
    default_document,
    load_params,
)
from ubo_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", ["params.yaml", "docs/fidelity/base_params.yaml"])
def test_every_params_file_of_the_repository_loads(path):
    from ubo_core.methods import check_method_params

    check_method_params(load_params(REPO / path))


def test_repository_params_load_and_match_documented_defaults():
    params = load_params(REPO / "params.yaml")
    assert params.preprocess.positive_threshold == 4
    assert params.validation.active_user_fraction == 0.2
    assert params.validation.hyper_fraction == 0.1
    assert params.semisynthetic.relevance_eps == 5.0
    assert params.catalog["amazon_cds"] == CatalogEntry(n_items=1000, min_user_interactions=10)
    assert list(params.catalog) == ["coat", "yahoo", "ml100k", "amazon_cds"]
    assert params.data.processed_dir == Path("data/processed")
    # The paper's training setting (Sec. 3.1): Adam, lr 1e-3, dim 50, batch 1024, 100 epochs.
    assert (params.train.lr, params.train.dim, params.train.batch_size) == (1e-3, 50, 1024)
    train = params.train
    # The study's engine on CPU is dense mode (docs/PERFORMANCE.md); TrainConfig's own
    # default stays the paper's minibatch setting.
    assert (train.epochs, train.optimizer, train.mode) == (100, "adam", "dense")
    assert TrainConfig().mode == "paper"


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("train:\n  mode: fast\n", "train.mode", "unknown mode 'fast'"),
        ("train:\n  optimizer: sgd\n", "train.optimizer", "unknown optimizer 'sgd'"),
        ("train:\n  device: tpu\n", "train.device", "expected auto, cpu, cuda"),
        ("train:\n  lr: 0\n", "train.lr", "out of range"),
        ("train:\n  epochs: 0\n", "train.epochs", "out of range"),
    ],
)
def test_bad_train_section(tmp_path, text, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_params(path)
    assert str(caught.value).startswith(f"{path}: {key}: ")
    assert problem in str(caught.value)


def test_the_code_defaults_template_is_a_complete_params_file(tmp_path):
    """`python -m ubo_core.config` prints every key at the code's defaults."""
    text = yaml.safe_dump(default_document(), sort_keys=False)
    assert load_params(write(tmp_path, text)) == Params()


def drop_lines(text: str, *lines: str) -> str:
    kept = text.splitlines(keepends=True)
    for line in lines:
        index = next(i for i, each in enumerate(kept) if each.split("#")[0].rstrip() == line)
        del kept[index]  # the first such line
    return "".join(kept)


@pytest.mark.parametrize(
    ("dropped", "keys"),
    [
        # Deleting `mode: dense` used to train in paper mode (the code's default), exit 0.
        (["  mode: dense"], "train.mode"),
        (["  seed: 0", "  mode: dense"], "validation.seed, train.mode"),  # the first seed
    ],
)
def test_a_missing_key_is_an_error_naming_every_missing_key(tmp_path, dropped, keys):
    text = (REPO / "params.yaml").read_text()
    path = write(tmp_path, drop_lines(text, *dropped))
    with pytest.raises(ConfigError) as caught:
        load_params(path)
    assert str(caught.value).startswith(f"{path}: {keys}: missing; ")


def test_a_missing_section_is_an_error(tmp_path):
    document = yaml.safe_load((REPO / "params.yaml").read_text())
    del document["train"]
    path = write(tmp_path, yaml.safe_dump(document))
    with pytest.raises(ConfigError, match=r"params.yaml: train: missing; "):
        load_params(path)


def test_a_catalog_entry_and_the_override_maps_may_be_sparse(tmp_path):
    """Optional by meaning: a built-in data set needs no file keys; `methods` and `datasets`
    override only what they name."""
    document = default_document() | {"catalog": {"coat": {}}, "methods": {"umf": {"lr": 0.01}}}
    params = load_params(write(tmp_path, yaml.safe_dump(document)))
    assert params.catalog == {"coat": CatalogEntry()} and params.methods == {"umf": {"lr": 0.01}}


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("colour: red\n", "colour", "unknown key"),
        ("validation:\n  sead: 1\n", "validation.sead", "unknown key"),
        (
            "catalog:\n  ml100k:\n    n_itmes: 5\n",
            "catalog.ml100k.n_itmes",
            "unknown key",
        ),
        ("validation:\n  seed: zero\n", "validation.seed", "expected an integer"),
        ("validation:\n  seed: true\n", "validation.seed", "expected an integer"),
        ("validation:\n  hyper_fraction: 1.5\n", "validation.hyper_fraction", "out of range"),
        ("validation:\n  hyper_fraction: 0\n", "validation.hyper_fraction", "out of range"),
        ("preprocess:\n  positive_threshold: 6\n", "preprocess.positive_threshold", "out of range"),
        (
            "catalog:\n  amazon_cds:\n    n_items: 1\n",
            "catalog.amazon_cds.n_items",
            "out of range",
        ),
        ("catalog: {}\n", "catalog", "names no data set"),
        ("catalog:\n  My-Shop: {train: a.csv}\n", "catalog.My-Shop", "lower-case letters"),
        ("catalog:\n  shop: {}\n", "catalog.shop", "not a built-in data set"),
        ("catalog:\n  coat: {train: a.csv}\n", "catalog.coat", "is a built-in data set"),
        ("catalog:\n  shop: {test: t.csv}\n", "catalog.shop.test", "given without `train`"),
        ("catalog:\n  shop: {train: ../a.csv}\n", "catalog.shop.train", "inside data/manual"),
        ("catalog:\n  shop: {train: a.csv, test: a.csv}\n", "catalog.shop.test", "same file"),
        (
            "catalog:\n  shop: {train: a.csv, test: t.csv, n_items: 10}\n",
            "catalog.shop",
            "a real data set is used whole",
        ),
        (
            "catalog:\n  coat: {}\ndatasets:\n  yahoo: {umf: {epochs: 2}}\n",
            "datasets.yahoo",
            "unknown data set; expected one of the catalog's ['coat']",
        ),
        (
            "catalog:\n  coat: {}\ntuning:\n  trials: {ml100k: 3}\n",
            "tuning.trials.ml100k",
            "unknown data set",
        ),
        ("data:\n  raw_dir: 3\n", "data.raw_dir", "expected a path"),
        ("validation: [1, 2]\n", "validation", "expected a mapping"),
    ],
)
def test_bad_params_name_the_file_and_key(tmp_path, text, key, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_params(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {key}: "), message
    assert problem in message


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("train:\n  lr: .nan\n", "train.lr", "expected a finite number, got nan"),
        ("train:\n  lr: .inf\n", "train.lr", "expected a finite number, got inf"),
        (
            "validation:\n  active_user_fraction: .nan\n",
            "validation.active_user_fraction",
            "expected a finite number, got nan",
        ),
        ("train:\n  lr: 0.1\n  dim: 8\n  lr: 0.2\n", "train.lr", "given twice (lines 2 and 4)"),
        ("train: {lr: 0.1}\ntrain: {lr: 0.2}\n", "train", "given twice (lines 1 and 2)"),
    ],
)
def test_nan_inf_and_duplicate_keys_are_refused(tmp_path, text, key, problem):
    """Issue 14, faults 5 and 6: NaN passed every range check and a repeated key silently
    took the last value."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_params(path)
    assert str(caught.value) == f"{path}: {key}: {problem}"


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(write(tmp_path, "a: [1,\n"))


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown data set 'movielens'.*coat.*amazon_cds"):
        check_dataset("movielens", Params().catalog)


def test_errors_survive_pickling():
    """A worker process's error reaches its parent whole (ProcessPoolExecutor pickles it)."""
    import pickle

    from ubo_core.errors import DataError, TrainingDiverged
    from ubo_core.metrics import MetricError

    errors = (
        ConfigError("train.lr", "bad", "x.yaml"),
        ConfigError("train.lr", "bad", source="y.yaml"),
        DataError("a/b.npz", "missing"),
        TrainingDiverged("ubo diverged"),
        MetricError("no user"),
    )
    for error in errors:
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error)
