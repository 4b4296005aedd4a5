"""docs/FIDELITY.md's measurements: every choice the paper leaves open, and what it changes.

    python benchmarks/fidelity.py run --row gradient_path [--datasets coat,yahoo]
        [--seeds 0,1,2] [--jobs 2]                     # train what the row needs (resumes)
    python benchmarks/fidelity.py run --all            # every row but the hours-long ones
    python benchmarks/fidelity.py table [--check]      # docs/FIDELITY.md's table from the runs
    python benchmarks/fidelity.py list                 # the rows and their variants

A row names one open choice: the paper's words, our default and why, and its variants as
config overrides (method knobs, train keys, or the validation stage's keys, for which the
validation set is rebuilt in memory from the interim data). Every variant starts from the
study's tuned values (`datasets:` layer of docs/fidelity/base_params.yaml, the params.yaml
the recorded runs used; `--params params.yaml` for today's; the paper-mode rows start from the
untuned values instead, since the tuned ones are dense mode's) and changes only what the row
says. Each run uses one thread, so its numbers do not depend on the machine's core count.

Each run trains up to a cap (CAP_EPOCHS, or the variant's) with the test metrics tracked per
epoch (`fit(track_test=True)`) and records the curve. A cell reports, over seeds (mean ± std):
the hyper-validation objective (best SNIPS DCG@3 over epochs, what tuning maximises) and the
test DCG@3 at that epoch: the epoch is chosen on hyper-validation, the test set is read only
to report (a variant with `select="last"` reports the last epoch instead, the paper's fixed
budget). Runs are appended to `docs/fidelity/runs.jsonl` as they finish, keyed by the code
version and the resolved configuration, so a stopped `run` trains only what is missing, a re-tuned
params.yaml never reuses a stale run, and rows that share a variant (every row's default) train it
once. A run in flight saves its state to .cache/fidelity/ at most once a minute and resumes from
there (the paper-mode rows' runs take two hours; a session may end before they do).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flows.run_identity import code_version  # noqa: E402
from ubo_core import checkpoint as checkpoints  # noqa: E402
from ubo_core.config import (  # noqa: E402
    NON_RESULT_KEYS,
    Params,
    TrainConfig,
    ValidationConfig,
    load_params,
)
from ubo_core.data import FeedbackData  # noqa: E402
from ubo_core.datasets.validation import build_validation_sets  # noqa: E402
from ubo_core.errors import UboError  # noqa: E402
from ubo_core.methods import get_method, resolve_config  # noqa: E402
from ubo_core.trainer import EpochReport, StopTraining, fit  # noqa: E402
from ubo_core.tuning import untuned  # noqa: E402

RUNS = REPO / "docs" / "fidelity" / "runs.jsonl"
# The params.yaml the recorded runs started from: the study's tuned values before the third
# tuning round (docs/TUNING.md), kept so that `table` finds its runs and `run` reproduces them
# after params.yaml is re-tuned. `--params params.yaml` measures at today's values instead.
BASE_PARAMS = REPO / "docs" / "fidelity" / "base_params.yaml"
FIDELITY_MD = REPO / "docs" / "FIDELITY.md"
TABLE_START, TABLE_END = "<!-- fidelity-table:start -->", "<!-- fidelity-table:end -->"
# Runs save their state here at most once a minute (`fit(checkpoint=...)`): a stopped `run`
# resumes each unfinished run from its last checkpoint instead of its first epoch. A run's file
# goes when its record is written; a stopped run no longer wanted (an older code version's)
# leaves one, which nothing reads: the folder may be deleted whenever no `run` is going.
CHECKPOINTS = REPO / ".cache" / "fidelity"
CAP_EPOCHS = {"coat": 100, "yahoo": 50}  # Yahoo's tuned UBO peaks at epoch 28


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)  # train keys and method knobs
    scale: dict[str, float] = field(default_factory=dict)  # multiply a resolved knob
    validation: dict[str, Any] = field(default_factory=dict)  # validation stage keys
    epochs: int | None = None  # cap instead of CAP_EPOCHS
    select: str = "best"  # "best": epoch chosen on hyper-validation; "last": the final one
    # Stop once hyper-validation has not improved for this many epochs (None: train to the
    # cap). The paper trains a fixed 100 epochs and selects none; with the epoch chosen on
    # hyper-validation, a run that stopped early chose the epoch the full run would have
    # unless a later epoch beats a long stall. PATIENCE's comment says how long was seen.
    patience: int | None = None


DEFAULT = Variant("ours")
# In the five full 100-epoch paper-mode runs on Yahoo (UMF wd 0/1e-5/1e-4, UBO wd 0/1e-5), the
# longest stretch without a new best hyper-validation score before one came was 16 epochs
# (`fidelity.py stalls`; Coat's paper-mode runs, a few steps an epoch, still climb at epoch 100
# and stall up to 54 epochs on the way, so this patience is for Yahoo's paper mode only);
# 30 stops UBO's eta/eta' runs (best near epochs 8-15) after about 40 epochs instead of 100,
# which lets them finish inside one session (a session's checkpoints do not outlive it).
PATIENCE = 30
PAPER_MODE = {"mode": "paper", "optimizer": "adam", "epochs": 100}
PAPER_LAZY = {**PAPER_MODE, "optimizer": "lazy_adam"}


@dataclass(frozen=True)
class Row:
    name: str
    choice: str
    paper: str
    ours: str
    variants: tuple[Variant, ...]
    method: str = "ubo"
    datasets: tuple[str, ...] = ("coat", "yahoo")
    default: Variant = DEFAULT
    seeds: tuple[int, ...] | None = None  # None: the command's --seeds
    untuned: bool = False  # start from params.yaml without its tuned (dense-mode) layer
    hours: bool = False  # hours of CPU per run: left out of `run --all`, run by --row


ROWS: dict[str, Row] = {
    row.name: row
    for row in [
        Row(
            "gradient_path",
            "Gradient path from L_train to w_i through m_a",
            "Eq. 13 feeds w_i into m_a; Eq. 16-17 (App. B-C) differentiate the unrolled step "
            "through l_s only",
            "no dm/dw_i term (`item_grad_through_exposure: false`): the paper's derivation",
            (Variant("through w_i", {"item_grad_through_exposure": True}),),
        ),
        Row(
            "gate_init",
            "Initialisation of the gate r and of e_u",
            'silent ("one layer MLP followed by a sigmoid")',
            "gate bias 0, e_u ~ N(0, 0.1^2): m_a starts near 0.25 + 0.5 theta_i",
            (Variant("m_a starts at theta (gate bias -4)", {"gate_init_bias": -4.0}),),
        ),
        Row(
            "outer_optimizer",
            "Outer optimiser of a",
            '"update a ... via a gradient descent step with the outer loop learning rate '
            'eta\'" (Sec. 2); "optimize it with Adam" (Sec. 3.1)',
            "Adam (tuned eta'): the hypergradient's scale moves by orders of magnitude "
            "between parameters and over training",
            (
                Variant("SGD, eta' = 1", {"exposure_optimizer": "sgd", "dense_exposure_lr": 1.0}),
                Variant("SGD, eta' = 10", {"exposure_optimizer": "sgd", "dense_exposure_lr": 10.0}),
            ),
        ),
        Row(
            "outer_batch",
            "Outer batch",
            '"the validation loss L_val ... on the unbiased validation set" (all of it)',
            "1,024 validation pairs drawn with replacement per step (`val_batch_size`)",
            (Variant("all validation pairs", {"val_batch_size": 10**6}),),
        ),
        Row(
            "inner_step",
            "Inner step size eta (Eq. 15)",
            'silent ("a gradient step with the learning rate eta")',
            "tuned on hyper-validation (`dense_inner_lr`)",
            (
                Variant("eta x 0.1", scale={"dense_inner_lr": 0.1}),
                Variant("eta x 10", scale={"dense_inner_lr": 10.0}),
            ),
        ),
        Row(
            "inner_batch",
            "Inner batch (a dense block)",
            '"the batch size as 1024" (pairs)',
            "a block of 256 users x all items per step (dense mode)",
            (
                Variant("64-user blocks", {"block_users": 64}),
                Variant("1,024-user blocks", {"block_users": 1024}),
            ),
        ),
        Row(
            "epochs",
            "Training length",
            '"the training epoch as 100 for all methods"',
            "the epoch with the best hyper-validation SNIPS DCG@3 (at most the cap)",
            (Variant("100 epochs, last", epochs=100, select="last"),),
        ),
        Row(
            "exposure_weight_decay",
            "Weight decay on a",
            '"For other hyperparameters such as weight decay, we tune them"',
            "tuned on hyper-validation (`exposure_weight_decay`)",
            (
                Variant("0", {"exposure_weight_decay": 0.0}),
                Variant("1e-2", {"exposure_weight_decay": 1e-2}),
            ),
        ),
        Row(
            "validation_negative",
            "The validation set's negative",
            '"the most popular positive item and negative item for each active user"',
            "the most popular rated negative (rating < 4)",
            (Variant("most popular R~ = 0 item", validation={"negative": "unlabeled"}),),
        ),
        Row(
            "validation_popularity",
            "Popularity in the validation set",
            '"the most popular" (Sec. 2); theta_i counts positives (Eq. 12)',
            "n_i = training positives, as in Eq. 12",
            (Variant("n_i = ratings", validation={"popularity": "ratings"}),),
        ),
        Row(
            "train_mode",
            "Dense blocks vs 1,024-pair minibatches",
            '"Adam ... learning rate 10^-3 ... batch size 1024"',
            "dense blocks (paper mode costs 20-60x more per epoch on a CPU)",
            (
                Variant(
                    "paper mode (lazy Adam, lr 1e-3, batch 1024)",
                    {"mode": "paper", "optimizer": "lazy_adam"},
                ),
            ),
            datasets=("coat",),
        ),
        Row(
            "expomf_constant",
            "ExpoMF: the Gaussian density's constant",
            "Liang et al. (2016): N(y | theta_u . beta_i, 1/lambda_y); dawenl/expo-mf "
            "multiplies it by pi (its issue #4)",
            "the normalised density (`density_constant: correct`)",
            (Variant("the reference's (x pi)", {"density_constant": "reference"}),),
            method="expomf",
        ),
        Row(
            "expomf_ranking",
            "ExpoMF: what ranks the test items",
            "silent; the reference's notebook ranks by mu_i theta_u . beta_i",
            "theta_u . beta_i, preference given exposure (`rank_by: preference`)",
            (
                Variant("mu_i theta_u . beta_i", {"rank_by": "exposed"}),
                Variant(
                    "mu-weighted, reference constant",
                    {"rank_by": "exposed", "density_constant": "reference"},
                ),
            ),
            method="expomf",
        ),
        Row(
            "expomf_lambda_y",
            "ExpoMF: lambda_y, where mu can grow",
            "tuned; mu_i can rise above the click rate only if lambda_y > 2 pi",
            "tuned on hyper-validation within [0.1, 1000]",
            (
                Variant("lambda_y = 10", {"lambda_y": 10.0}),
                Variant("lambda_y = 100", {"lambda_y": 100.0}),
            ),
            method="expomf",
        ),
        Row(
            "paper_mode_yahoo_umf",
            "The paper's training setting on Yahoo: UMF",
            '"Adam ... learning rate 10^-3 ... batch size 1024 ... training epoch as 100"',
            "dense mode, tuned (the study); here paper mode from the untuned values, exact "
            "Adam, weight decay chosen on hyper-validation among the variants",
            tuple(
                Variant(f"paper mode, exact Adam, wd {wd:g}", {**PAPER_MODE, "weight_decay": wd})
                for wd in (0.0, 1e-5, 1e-4)
            ),
            method="umf",
            datasets=("yahoo",),
            seeds=(0,),
            untuned=True,
            hours=True,
            default=Variant("dense mode, untuned", {"epochs": 100}),
        ),
        Row(
            "paper_mode_yahoo_ubo",
            "The paper's training setting on Yahoo: UBO",
            '"Adam ... learning rate 10^-3 ... batch size 1024 ... training epoch as 100"',
            "dense mode, tuned (the study); here paper mode from the untuned values, lazy Adam "
            "(exact Adam costs 2 h per run on one core), weight decay, eta and eta' chosen on "
            "hyper-validation among the variants",
            (
                *(
                    Variant(f"paper mode, lazy Adam, wd {wd:g}", {**PAPER_LAZY, "weight_decay": wd})
                    # Two values, not UMF's three: 1e-5 already fell far below 0 (hyper 1.063
                    # against 1.168), as both decays did for UMF; a third costs 130 min a run.
                    for wd in (0.0, 1e-5)
                ),
                # eta and eta' at the weight decay hyper-validation chose (0), one knob at a
                # time.
                Variant(
                    "paper, lazy, wd 0, eta 1",
                    {**PAPER_LAZY, "weight_decay": 0.0, "inner_lr": 1.0},
                    patience=PATIENCE,
                ),
                Variant(
                    "paper, lazy, wd 0, eta' 1e-2",
                    {**PAPER_LAZY, "weight_decay": 0.0, "exposure_lr": 1e-2},
                    patience=PATIENCE,
                ),
            ),
            datasets=("yahoo",),
            seeds=(0,),
            untuned=True,
            hours=True,
            default=Variant("dense mode, untuned", {"epochs": 100}),
        ),
    ]
}


# -- running ---------------------------------------------------------------------------------
def run_key(
    params: Params, row: Row, variant: Variant, dataset: str, seed: int, version: str
) -> dict[str, Any]:
    """Everything that decides a run: the code version and the resolved configuration (so a
    re-tuned params.yaml never reuses a stale run, and rows whose variants resolve alike, as
    every row's default does, share their runs). One thread per run: the same numbers
    whatever the machine's core count."""
    overrides = {"epochs": variant.epochs or CAP_EPOCHS[dataset], **variant.overrides}
    base = untuned(params) if row.untuned else params
    train, hyper = resolve_config(base, dataset, row.method, overrides | {"threads": 1})
    if variant.scale:
        hyper = dataclasses.replace(
            hyper, **{k: getattr(hyper, k) * factor for k, factor in variant.scale.items()}
        )
    validation = (
        dataclasses.asdict(dataclasses.replace(params.validation, **variant.validation))
        if variant.validation
        else None  # the processed data set, built with params.yaml's validation section
    )
    key = {
        "code": version,
        "dataset": dataset,
        "method": row.method,
        "seed": seed,
        "train": dataclasses.asdict(train),
        "hyper": dataclasses.asdict(hyper),
        "validation": validation,
    }
    # Only when set: the records of runs trained to their cap keep the keys they were written with.
    return key | ({"patience": variant.patience} if variant.patience else {})


def key_text(key: dict[str, Any]) -> str:
    """A run's identity as text, without the train keys that change no result beyond float
    rounding (NON_RESULT_KEYS: threads, device, the elementwise path, ...): a key added to
    TrainConfig later leaves the records written before it valid."""
    train = {k: v for k, v in key["train"].items() if k not in NON_RESULT_KEYS}
    return json.dumps({**key, "train": train}, sort_keys=True)


def load_runs(path: Path = RUNS) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    runs = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill: that run is simply redone
            print(f"{path}:{number}: unreadable line skipped", file=sys.stderr)
            continue
        runs[key_text(record["key"])] = record
    return runs


def train_one(
    key: dict[str, Any], data_dirs: tuple[str, str], label: str | None = None
) -> dict[str, Any]:
    """One run, in a worker process, from its fully resolved key; with `label`, a line per
    evaluated epoch says how far it is (the paper-mode rows' runs take hours)."""
    interim_dir, processed_dir = (REPO / d for d in data_dirs)
    dataset = key["dataset"]
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    if key["validation"] is not None:
        interim = FeedbackData.load(interim_dir / dataset / "dataset.npz")
        data = build_validation_sets(interim, ValidationConfig(**key["validation"]))
    else:
        data = FeedbackData.load(processed_dir / dataset / "dataset.npz")
    return train_record(key, data, label, checkpoint_path(key))


def checkpoint_path(key: dict[str, Any]) -> Path:
    """Where a run of `key` keeps its checkpoint until its record is written."""
    return CHECKPOINTS / f"{hashlib.sha256(key_text(key).encode()).hexdigest()[:20]}.pt"


def train_record(
    key: dict[str, Any],
    data: FeedbackData,
    label: str | None = None,
    checkpoint: Path | None = None,
) -> dict[str, Any]:
    """Train the resolved `key` on `data` with the test metrics tracked; its record: the
    per-epoch hyper-validation objective, validation loss, PCC (NaN on real sets) and test
    DCG@3. benchmarks/power_sweep.py records its runs the same way."""
    train = TrainConfig(**key["train"])
    hyper = get_method(key["method"]).Hyper(**key["hyper"])
    started = time.perf_counter()

    resumed = checkpoint is not None and checkpoint.is_file()
    first_epoch: int | None = None  # this process's first (later than 1 when it resumed)
    patience = key.get("patience")
    best_epoch, best_hyper = 0, -math.inf

    def note_best(report: EpochReport) -> None:
        nonlocal best_epoch, best_hyper
        if report.metrics["hyper_snips_dcg@3"] > best_hyper:
            best_epoch, best_hyper = report.epoch, report.metrics["hyper_snips_dcg@3"]

    if resumed:  # the epochs before the checkpoint count for the early stop too
        for report in checkpoints.saved_loop(checkpoint)["history"]:
            note_best(report)

    def after_epoch(report: EpochReport) -> None:
        if label:
            report_progress(report)
        note_best(report)
        if patience and report.epoch - best_epoch >= patience:
            raise StopTraining

    def report_progress(report: EpochReport) -> None:
        nonlocal first_epoch
        first_epoch = first_epoch or report.epoch
        minutes = (time.perf_counter() - started) / 60
        left = minutes / (report.epoch - first_epoch + 1) * (train.epochs - report.epoch)
        print(
            f"  {label}: epoch {report.epoch}/{train.epochs}, hyper "
            f"{report.metrics['hyper_snips_dcg@3']:.4f}, {minutes:.0f} min, ~{left:.0f} min left",
            flush=True,
        )

    history = fit(
        key["method"],
        data,
        train,
        hyper,
        key["seed"],
        callback=after_epoch,
        progress=False,
        track_test=True,
        checkpoint=checkpoint,
    ).history
    stopped = history[-1].epoch if history[-1].epoch < train.epochs else None
    curve = [
        {
            "epoch": report.epoch,
            "hyper": report.metrics["hyper_snips_dcg@3"],
            "val_loss": report.metrics["val_loss"],
            "pcc": report.metrics.get("pcc", math.nan),
            "test": report.test["dcg@3"] if report.test else math.nan,
        }
        for report in history
    ]
    # seconds: this process's; a resumed run's earlier processes are not counted.
    seconds = round(time.perf_counter() - started, 1)
    return (
        {"key": key, "curve": curve, "seconds": seconds}
        | ({"resumed": True} if resumed else {})
        | ({"stopped_early_at": stopped} if stopped else {})
    )


def needed(
    params: Params,
    rows: Iterable[Row],
    datasets: list[str] | None,
    seeds: list[int],
    version,
    labels: list[str] | None = None,
) -> dict[str, tuple[dict[str, Any], str]]:
    """key text -> (key, a label naming the first row and variant that needs it); `labels`,
    when given, keeps only the variants so labelled."""
    keys = {}
    for row in rows:
        for dataset in row.datasets:
            if datasets and dataset not in datasets:
                continue
            for variant in (row.default, *row.variants):
                if labels and variant.label not in labels:
                    continue
                for seed in row.seeds or seeds:
                    key = run_key(params, row, variant, dataset, seed, version)
                    keys.setdefault(key_text(key), (key, f"{row.name}: {variant.label}"))
    return keys


def run(
    rows: list[Row],
    datasets: list[str] | None,
    seeds: list[int],
    jobs: int,
    params_path: Path,
    labels: list[str] | None = None,
) -> None:
    version = code_version(REPO)
    if "+dirty" in version:
        sys.exit("error: ubo_core has uncommitted changes; commit them so runs name a version")
    params = load_params(params_path)  # read once: later edits do not reach the runs
    data_dirs = (str(params.data.interim_dir), str(params.data.processed_dir))
    done = load_runs()
    wanted = needed(params, rows, datasets, seeds, version, labels)
    todo = [job for text, job in wanted.items() if text not in done]
    # Yahoo first (long), so the short runs fill the gaps at the end.
    todo.sort(key=lambda job: (job[0]["dataset"] != "yahoo", job[0]["seed"]))
    print(f"{len(todo)} runs to do at {version} ({len(wanted) - len(todo)} recorded)", flush=True)
    RUNS.parent.mkdir(parents=True, exist_ok=True)
    hours_long = {row.name for row in rows if row.hours}  # their runs report every epoch
    started = time.perf_counter()
    with ProcessPoolExecutor(jobs) as pool, RUNS.open("a") as out:
        futures = {
            pool.submit(
                train_one,
                key,
                data_dirs,
                describe(key, label) if label.partition(":")[0] in hours_long else None,
            ): (key, label)
            for key, label in todo
        }
        for count, future in enumerate(as_completed(futures), 1):
            try:
                record = future.result()
            except UboError as error:  # a bad variant: say which, go on with the others
                print(f"error: {describe(*futures[future])}: {error}", flush=True)
                continue
            out.write(json.dumps(record) + "\n")  # one line per run: a kill loses only the
            out.flush()  # epochs of runs in flight since their last checkpoint
            checkpoint_path(record["key"]).unlink(missing_ok=True)
            best = max(record["curve"], key=lambda p: p["hyper"])
            elapsed = time.perf_counter() - started
            print(
                f"[{count}/{len(todo)} {elapsed / 60:.0f} min] {describe(*futures[future])}: "
                f"hyper {best['hyper']:.4f} test {best['test']:.4f} at epoch {best['epoch']} "
                f"({record['seconds']:.0f} s)",
                flush=True,
            )


def describe(key: dict[str, Any], label: str) -> str:
    return f"{key['dataset']} {key['method']} seed {key['seed']} ({label})"


def cell(records: list[dict[str, Any]], select: str) -> tuple[str, str, int]:
    hyper, test, capped = [], [], 0
    for record in records:
        curve = record["curve"]
        best = max(curve, key=lambda p: p["hyper"])
        chosen = curve[-1] if select == "last" else best
        hyper.append(best["hyper"] if select == "best" else chosen["hyper"])
        test.append(chosen["test"])
        capped += best["epoch"] == curve[-1]["epoch"] and select == "best"
    return mean_std(hyper), mean_std(test), capped


def mean_std(values: list[float]) -> str:
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return f"{mean:.3f} (1 seed)"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return f"{mean:.3f} ± {std:.3f}"


def cell_records(
    runs: dict[str, dict[str, Any]], keys: list[dict[str, Any]], version: str | None
) -> tuple[list[dict[str, Any]] | None, str | None]:
    """The records of one cell (one per seed) at `version`, or by default at the newest code
    version that has all of them: a later ubo_core change that leaves a row's method alone
    (ExpoMF's knobs for UBO's rows, say) does not make its runs stale, and the table names
    the versions it shows."""
    versions = (
        [version] if version else list(dict.fromkeys(r["key"]["code"] for r in runs.values()))
    )
    for candidate in reversed(versions):
        records = [runs.get(key_text({**key, "code": candidate})) for key in keys]
        if all(r is not None for r in records):
            return records, candidate  # type: ignore[return-value]
    return None, None


TABLE_DATASETS = ("coat", "yahoo")


def table(seeds: list[int], version: str | None = None, params_path: Path = BASE_PARAMS) -> str:
    runs = load_runs()
    params = load_params(params_path)
    columns = " | ".join(f"{d}: hyper-val | {d}: test" for d in TABLE_DATASETS)
    lines = [
        f"| choice | the paper | ours (default) | variant | {columns} | command |",
        "|---|---|---|---|" + "---:|---:|" * len(TABLE_DATASETS) + "---|",
    ]
    missing, used = 0, []
    for row in ROWS.values():
        for number, variant in enumerate((row.default, *row.variants)):
            cells = []
            for dataset in TABLE_DATASETS:
                if dataset not in row.datasets:
                    cells += ["", ""]
                    continue
                row_seeds = row.seeds or seeds
                keys = [run_key(params, row, variant, dataset, s, "") for s in row_seeds]
                records, at = cell_records(runs, keys, version)
                if records is None:
                    missing += 1
                    cells += ["not run", "not run"]
                    continue
                hyper, test, capped = cell(records, variant.select)
                used.append(at)
                stopped = any("stopped_early_at" in r for r in records)
                cells += [hyper, test + ("*" * bool(capped)) + ("†" * stopped)]
            label = f"**{variant.label}**" if variant is row.default else variant.label
            method = "" if row.method == "ubo" else f"{row.method}: "
            # A "|" inside a cell (N(y | m, ...)) would split it: markdown's escape.
            head = tuple(t.replace("|", "\\|") for t in (row.choice, row.paper, row.ours))
            head = head if number == 0 else ("", "", "")
            command = f"`fidelity.py run --row {row.name}`" if number == 0 else ""
            lines.append(
                f"| {' | '.join(head)} | {method}{label} | {' | '.join(cells)} | {command} |"
            )
    lines.append("")
    versions = ", ".join(dict.fromkeys(used)) or "none"
    lines.append(
        f"Mean ± std over seeds {', '.join(map(str, seeds))}; hyper-val: best SNIPS DCG@3 on "
        "the hyper-validation set over the epochs; test: DCG@3 at that epoch (* the best "
        "epoch was the cap's for at least one seed; † the runs stopped "
        f"{PATIENCE} epochs after their best, the variant's patience). UBO (dense mode, "
        "the tuned values of "
        f"{params_path.relative_to(REPO) if params_path.is_relative_to(REPO) else params_path}"
        ") unless the variant names another method. Code version(s): "
        f"{versions}." + (f" {missing} cells not run yet." if missing else "")
    )
    return "\n".join(lines)


def agreement() -> str:
    """How far the hyper-validation objective (SNIPS DCG@3, what tuning and epoch selection
    maximise) agrees with the test DCG@3, per data set and method over every recorded run:
    Spearman's rho across runs (each at its best hyper-validation epoch: does a higher
    objective pick a better configuration?) and within runs over the epochs (does it pick the
    right epoch?). Read after the fact; nothing is selected with it."""
    from scipy import stats

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in load_runs().values():
        groups.setdefault((record["key"]["dataset"], record["key"]["method"]), []).append(record)
    lines = [
        "| data set | method | runs | rho across runs (p) | mean rho over epochs within a run |",
        "|---|---|---:|---:|---:|",
    ]
    for (dataset, method), records in sorted(groups.items()):
        best = [max(r["curve"], key=lambda p: p["hyper"]) for r in records]
        across = stats.spearmanr([b["hyper"] for b in best], [b["test"] for b in best])
        within = [
            stats.spearmanr([p["hyper"] for p in r["curve"]], [p["test"] for p in r["curve"]])[0]
            for r in records
            if len(r["curve"]) > 2
        ]
        lines.append(
            f"| {dataset} | {method} | {len(records)} | {across[0]:+.2f} ({across[1]:.3f}) "
            f"| {float(np.nanmean(within)):+.2f} |"
        )
    return "\n".join(lines)


def longest_stall(curve: list[dict[str, Any]]) -> int:
    """The most epochs a run went without a new best hyper-validation score before one came
    (what PATIENCE must exceed for an early stop to choose the full run's epoch)."""
    best, best_epoch, stall = -math.inf, 0, 0
    for point in curve:
        if point["hyper"] > best:
            stall = max(stall, point["epoch"] - best_epoch)
            best, best_epoch = point["hyper"], point["epoch"]
    return stall


def stalls() -> str:
    """Per recorded paper-mode run trained to its cap: its best epoch and longest stall."""
    lines = [
        "| data set | method | optimizer | wd | epochs | best epoch | longest stall |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for record in load_runs().values():
        key, curve = record["key"], record["curve"]
        if key["train"]["mode"] != "paper" or "stopped_early_at" in record:
            continue
        best = max(curve, key=lambda p: p["hyper"])
        lines.append(
            f"| {key['dataset']} | {key['method']} | {key['train']['optimizer']} | "
            f"{key['train']['weight_decay']:g} | {len(curve)} | {best['epoch']} | "
            f"{longest_stall(curve)} |"
        )
    return "\n".join(lines)


def write_table(seeds: list[int], check: bool, version: str | None, params_path: Path) -> int:
    text = FIDELITY_MD.read_text()
    head, start, rest = text.partition(TABLE_START)
    _, end, tail = rest.partition(TABLE_END)
    if not start or not end:
        sys.exit(f"error: {FIDELITY_MD} lacks the {TABLE_START} ... {TABLE_END} markers")
    new = f"{head}{TABLE_START}\n{table(seeds, version, params_path)}\n{TABLE_END}{tail}"
    if check:
        if new != text:
            print(f"{FIDELITY_MD} is out of date: run `python benchmarks/fidelity.py table`")
            return 1
        return 0
    FIDELITY_MD.write_text(new)
    print(f"wrote the table of {FIDELITY_MD}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="train the runs a row needs (resumes)")
    pick = run_parser.add_mutually_exclusive_group(required=True)
    pick.add_argument("--row", action="append", choices=list(ROWS))
    pick.add_argument("--all", action="store_true", help="every row but the hours-long ones")
    run_parser.add_argument("--datasets", help="comma-separated; default: the row's")
    run_parser.add_argument("--seeds", default="0,1,2")
    run_parser.add_argument(
        "--variant",
        action="append",
        help="only the variant with this label (repeatable; see `list`): an hours-long row's "
        "missing cell without retraining the cells a behaviour-free code change left valid",
    )
    run_parser.add_argument("--jobs", type=int, default=2, help="runs side by side")
    run_parser.add_argument(
        "--params", type=Path, default=BASE_PARAMS, help="base configuration (default: %(default)s)"
    )
    table_parser = sub.add_parser("table", help="write docs/FIDELITY.md's table")
    table_parser.add_argument("--seeds", default="0,1,2")
    table_parser.add_argument("--check", action="store_true", help="fail if out of date")
    table_parser.add_argument("--code-version", help="default: that of the last recorded run")
    table_parser.add_argument(
        "--params", type=Path, default=BASE_PARAMS, help="base configuration (default: %(default)s)"
    )
    sub.add_parser("list", help="the rows and their variants")
    sub.add_parser("agreement", help="hyper-validation objective against test, after the fact")
    sub.add_parser("stalls", help="paper-mode runs' longest wait for a new best (PATIENCE)")
    args = parser.parse_args()
    if args.command == "list":
        for row in ROWS.values():
            print(f"{row.name}: {row.choice} [{row.method}; {', '.join(row.datasets)}]")
            for variant in row.variants:
                print(f"    {variant.label}")
        return 0
    if args.command == "agreement":
        print(agreement())
        return 0
    if args.command == "stalls":
        print(stalls())
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.command == "table":
        return write_table(seeds, args.check, args.code_version, args.params)
    if args.all:
        rows = [row for row in ROWS.values() if not row.hours]
    else:
        rows = [ROWS[name] for name in args.row]
    datasets = args.datasets.split(",") if args.datasets else None
    run(rows, datasets, seeds, args.jobs, args.params, args.variant)
    return 0


if __name__ == "__main__":
    sys.exit(main())
