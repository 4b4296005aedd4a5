"""Method configuration (layered, strict) and `python -m ubo_core.train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from params_file import add_sections, write_params
from test_tracking import write_processed  # the shared tiny processed data set

from ubo_core.config import Params, load_params
from ubo_core.data import FeedbackData
from ubo_core.errors import ConfigError, UsageError
from ubo_core.methods import METHODS, check_method_params, resolve_config
from ubo_core.methods.relmf import RelMFHyper
from ubo_core.train import main, parse_overrides


def test_registry_has_the_papers_nine_methods_and_the_control():
    # A subset: adding a method (docs/EXTENDING.md) needs no edit here.
    expected = {"ubo", "umf", "relmf", "expomf", "cjmf", "bpr", "jointopt", "alteropt", "biopt2"}
    assert expected | {"noopt"} <= set(METHODS)
    assert list(METHODS)[:6] == ["relmf", "expomf", "cjmf", "bpr", "umf", "ubo"]  # Tables 1-2
    for name, cls in METHODS.items():
        assert cls.__module__ == f"ubo_core.methods.{name}"  # registry key = module name
        assert cls.display == cls.__name__ or "display" in cls.__dict__


def test_layers_override_in_order(tmp_path):
    path = tmp_path / "params.yaml"
    write_params(
        path,
        "train:\n  lr: 0.002\n"
        "methods:\n  relmf:\n    lr: 0.003\n    clip: 0.2\n"
        "datasets:\n  coat:\n    relmf:\n      clip: 0.3\n",
    )
    params = load_params(path)
    train, hyper = resolve_config(params, "yahoo", "relmf")
    assert train.lr == 0.003 and hyper == RelMFHyper(clip=0.2)
    train, hyper = resolve_config(params, "coat", "relmf")
    assert hyper == RelMFHyper(clip=0.3)
    train, hyper = resolve_config(params, "coat", "relmf", {"clip": 0.4, "epochs": 3})
    assert hyper.clip == 0.4 and train.epochs == 3 and train.lr == 0.003
    # Another method does not see relmf's layer.
    assert resolve_config(params, "coat", "umf")[0].lr == 0.002


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("methods:\n  ubo:\n    clip: 0.1\n", "methods.ubo.clip"),
        ("methods:\n  ubx: {}\n", "method"),
        ("datasets:\n  movielens:\n    ubo: {}\n", "datasets.movielens"),
        # The section the bad value is written in (issue 14, fault 12).
        ("datasets:\n  coat:\n    ubo:\n      inner_lr: -1\n", "datasets.coat.ubo.inner_lr"),
        ("methods:\n  relmf:\n    clip: 2\n", "methods.relmf.clip"),
        ("methods:\n  umf:\n    lr: fast\n", "methods.umf.lr"),
    ],
)
def test_bad_method_params_fail_at_load_naming_the_key(tmp_path, yaml_text, key):
    path = tmp_path / "params.yaml"
    write_params(path, yaml_text)
    with pytest.raises(ConfigError) as caught:
        check_method_params(load_params(path))
    assert f": {key}" in str(caught.value), str(caught.value)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown method 'mf'.*'ubo'.*'biopt2'"):
        resolve_config(Params(), "coat", "mf")


def test_parse_overrides_types_values_like_yaml():
    assert parse_overrides(["lr=0.01", "mode=dense", "epochs=3"]) == {
        "lr": 0.01,
        "mode": "dense",
        "epochs": 3,
    }
    with pytest.raises(UsageError, match="--set: expected key=value"):
        parse_overrides(["lr"])


def tiny_processed(root: Path) -> Path:
    """A tiny processed Coat-named data set under root/processed and a params.yaml using it."""
    write_processed(root, "coat")
    params = root / "params.yaml"
    write_params(params, f"data:\n  processed_dir: {root / 'processed'}\n")
    return params


def test_cli_prints_one_json_line_with_the_metrics(tmp_path, capsys):
    params = tiny_processed(tmp_path)
    argv = ["--dataset", "coat", "--method", "umf", "--epochs", "2", "--device", "cpu"]
    assert main([*argv, "--params", str(params), "--no-progress", "--set", "lr=0.05"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    line = json.loads(out[0])
    expected_keys = {"dcg@1", "dcg@2", "dcg@3", "map@1", "map@2", "map@3", "seconds", "device"}
    assert expected_keys <= set(line)
    assert line["dcg@1"] == line["map@1"]
    assert (line["dataset"], line["method"], line["seed"], line["device"]) == (
        "coat",
        "umf",
        0,
        "cpu",
    )


def test_cli_checkpoint_resumes_a_stopped_run_and_is_removed_at_the_end(
    tmp_path, capsys, monkeypatch
):
    """--checkpoint: a run stopped after its second epoch resumes from there (the rerun trains
    only the rest) and prints what the uninterrupted run prints; the file is gone after."""
    import ubo_core.trainer as trainer

    params = tiny_processed(tmp_path)
    argv = ["--dataset", "coat", "--method", "umf", "--epochs", "4", "--device", "cpu"]
    argv += ["--params", str(params), "--no-progress", "--set", "lr=0.05"]
    assert main(argv) == 0
    straight = json.loads(capsys.readouterr().out)
    checkpoint = tmp_path / "umf.ckpt"
    saves, resumed_after = trainer.checkpoints.save, []

    def save_then_stop(*args, **kwargs):
        saves(*args, **kwargs)
        if args[-1]["epoch"] == 2:
            raise KeyboardInterrupt  # killed right after epoch 2's checkpoint

    monkeypatch.setattr(trainer.checkpoints, "save", save_then_stop)
    monkeypatch.setattr(trainer.checkpoints.Schedule, "due", lambda self, final: True)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--checkpoint", str(checkpoint)])
    assert checkpoint.is_file()
    monkeypatch.setattr(trainer.checkpoints, "save", saves)
    loads = trainer.checkpoints.load

    def load_and_note(*args, **kwargs):
        loop = loads(*args, **kwargs)
        resumed_after.append(loop["epoch"])
        return loop

    monkeypatch.setattr(trainer.checkpoints, "load", load_and_note)
    assert main([*argv, "--checkpoint", str(checkpoint)]) == 0
    assert resumed_after == [2]
    resumed = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in resumed.items() if k != "seconds"} == {
        k: v for k, v in straight.items() if k != "seconds"
    }
    assert not checkpoint.exists()


def test_cli_missing_data_names_the_dvc_command(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    write_params(params, f"data:\n  processed_dir: {tmp_path / 'nothing'}\n")
    assert main(["--dataset", "yahoo", "--method", "ubo", "--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert "dvc repro validation@yahoo" in err and err.startswith("error: ")


def test_cli_unknown_method_and_key(tmp_path, capsys):
    params = tiny_processed(tmp_path)
    assert main(["--dataset", "coat", "--method", "mf", "--params", str(params)]) == 1
    assert "unknown method 'mf'" in capsys.readouterr().err
    argv = ["--dataset", "coat", "--method", "ubo", "--params", str(params), "--set", "clip=1"]
    assert main(argv) == 1
    assert "command line: --set clip: unknown key for method 'ubo'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--method", "ubo2"], "error: --method: unknown method 'ubo2'; expected one of ["),
        (["--dataset", "coatx"], "error: --dataset: unknown data set 'coatx'; expected one of"),
        (["--seed", "-1"], "error: --seed: -1 is negative; a seed is 0 or more"),
        (["--set", "lr=[1,"], "error: --set: 'lr=[1,': the value is not valid YAML ("),
        (["--set", "lr=-1"], "error: command line: --set lr: -1.0 is out of range"),
        (["--set", "lr=.nan"], "error: command line: --set lr: expected a finite number, got nan"),
    ],
)
def test_command_line_mistakes_name_the_flag_in_one_line(tmp_path, capsys, argv, expected):
    """Issue 14, faults 8 and 12: a mistake on the command line is blamed on the flag, not on
    params.yaml, in one line and without a traceback."""
    params = tiny_processed(tmp_path)
    base = {"--dataset": "coat", "--method": "umf", "--epochs": "1"}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        base[flag] = value
    args = [word for pair in base.items() for word in pair if pair[0] != "--set"]
    args += [*(["--set", base["--set"]] if "--set" in base else []), "--params", str(params)]
    assert main([*args, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(expected), err
    assert err.count("\n") == 1


def test_a_bad_value_in_params_yaml_is_blamed_on_its_section(tmp_path, capsys):
    params = tiny_processed(tmp_path)
    add_sections(params, "methods:\n  umf:\n    lr: -1\n")
    assert main(["--dataset", "coat", "--method", "umf", "--params", str(params)]) == 1
    assert "error: params.yaml: methods.umf.lr: -1.0 is out of range" in capsys.readouterr().err


def test_training_that_diverges_stops_with_a_clear_error(tmp_path, monkeypatch):
    """A non-finite epoch loss stops training at once, naming the epoch (not 100 epochs later
    as a NaN-score error at evaluation)."""
    import torch

    from ubo_core.errors import UboError
    from ubo_core.methods.umf import UMF
    from ubo_core.trainer import fit

    monkeypatch.setattr(UMF, "step", lambda self, batch: {"train_loss": torch.tensor(float("nan"))})
    params = load_params(tiny_processed(tmp_path))
    data = FeedbackData.load(tmp_path / "processed" / "coat" / "dataset.npz")
    train, hyper = resolve_config(params, "coat", "umf", {"epochs": 3, "device": "cpu"})
    with pytest.raises(UboError, match="umf diverged at epoch 1: train_loss is not finite"):
        fit("umf", data, train, hyper, seed=0, progress=False)
