"""The one trainer: seeding, device, the loop, evaluation, callbacks and progress.

Methods only implement their update (`Method.step`); this module draws the batches, calls the
update, evaluates once per `eval_every` epochs and reports an `EpochReport` to an optional
callback (how Prefect/MLflow log curves without touching the methods).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ubo_core import checkpoint as checkpoints
from ubo_core.config import ROUNDING_ONLY_KEYS, TrainConfig
from ubo_core.data import FeedbackData
from ubo_core.engine import (
    Batch,
    BlockSampler,
    BlockTripleSampler,
    PairSampler,
    TrainingTensors,
    TripleSampler,
    resolve_device,
)
from ubo_core.errors import TrainingDiverged, UboError
from ubo_core.estimators import item_popularity_exposure, log_loss
from ubo_core.methods import get_method
from ubo_core.methods.base import Method
from ubo_core.metrics import (
    RankingTask,
    exposure_pcc,
    per_user_metrics,
    ranking_metrics,
    snips_metrics,
)

KS = (1, 2, 3)


@dataclass(frozen=True)
class EpochReport:
    """What the trainer reports after each evaluated epoch."""

    epoch: int  # 1-based
    step: int  # optimiser steps so far
    losses: dict[str, float]  # mean over the epoch's steps
    metrics: dict[str, float]  # val_loss, hyper_snips_*, pcc (semi-synthetic)
    seconds: float  # training time so far (evaluation excluded)
    pairs_per_second: float
    # Test metrics at this epoch, only when `fit(track_test=True)`: for measurements that
    # show after the fact what a selection rule picked (benchmarks/fidelity.py), never for
    # choosing anything.
    test: dict[str, float] | None = None


@dataclass
class FitResult:
    method: Method
    test_metrics: dict[str, float]
    history: list[EpochReport] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    # The random-exposure test set per user (the report's paired tests): user ids ascending
    # and each metric's per-user values, whose means are `test_metrics`; empty untested.
    test_users: np.ndarray | None = None
    test_per_user: dict[str, np.ndarray] = field(default_factory=dict)
    # The method's exposure estimate at each test pair (data.test_user / test_item order),
    # or None (untested, or a method without an exposure model).
    test_exposure: np.ndarray | None = None


Callback = Callable[[EpochReport], None]


class StopTraining(Exception):  # noqa: N818 (a signal, not an error)
    """Raised by a `fit` callback to end training after the epoch it was handed, keeping what
    was trained: `fit` returns as if that epoch had been the last (an early stop on
    hyper-validation, say). Any other exception from the callback ends the run (a pruned
    tuning trial)."""


def fit(
    method_name: str,
    data: FeedbackData,
    train: TrainConfig,
    hyper: Any,
    seed: int,
    callback: Callback | None = None,
    progress: bool = True,
    evaluate_test_set: bool = True,
    track_test: bool = False,
    checkpoint: Path | None = None,
    checkpoint_seconds: float = 60.0,
) -> FitResult:
    """Train `method_name` on `data` and return it with its test metrics.

    `evaluate_test_set=False` (tuning) leaves `test_metrics` empty; `data` may then lack its
    test split. `track_test` adds the test metrics to every evaluated epoch's report. The
    callback may raise StopTraining to end training there and keep the result, anything else
    to abandon the run (a pruned tuning trial). With `checkpoint`, the run's
    state is saved there after evaluated epochs (at most every `checkpoint_seconds`, and after
    the last), and a run whose checkpoint exists resumes from it with the numbers it would
    have had uninterrupted (ubo_core/checkpoint.py); the caller removes the file once it has
    kept the result."""
    if (evaluate_test_set or track_test) and not data.has_test:
        raise UboError("fit: the data set was loaded without its test split")
    tensors = TrainingTensors(data, resolve_device(train.device))
    device = tensors.device
    method, generator = build_method(method_name, tensors, train, hyper, seed)
    sampler = make_sampler(type(method).sampling, tensors, train, generator)
    history: list[EpochReport] = []
    training_seconds, steps, pairs, first_epoch = 0.0, 0, 0, 1
    identity: dict[str, Any] = {}
    if checkpoint is not None:
        identity = _run_identity(method_name, data, train, hyper, seed, track_test, device)
    if checkpoint is not None and checkpoint.is_file():
        loop = checkpoints.load(checkpoint, identity, method, tensors, generator)
        history, first_epoch = loop["history"], loop["epoch"] + 1
        training_seconds, steps, pairs = loop["seconds"], loop["steps"], loop["pairs"]
        # Said even without a progress bar: a run that skips epochs must say why.
        print(
            f"{method_name}: resuming from {checkpoint} after epoch {loop['epoch']}",
            file=sys.stderr,
            flush=True,
        )
    schedule = checkpoints.Schedule(checkpoint_seconds)
    bar = tqdm(
        range(first_epoch, train.epochs + 1),
        desc=f"{method_name}",
        unit="epoch",
        disable=not progress,
        initial=first_epoch - 1,
        total=train.epochs,
    )
    for epoch in bar:
        started = time.perf_counter()
        sums: dict[str, Tensor] = {}
        epoch_steps = 0
        for batch in sampler.epoch():
            for name, value in method.step(batch).items():
                sums[name] = sums.get(name, 0) + value
            epoch_steps += 1
            pairs += batch.n_examples
        losses = {name: float(total) / epoch_steps for name, total in sums.items()}  # one sync
        diverged = [name for name, value in losses.items() if not np.isfinite(value)]
        if diverged:
            raise TrainingDiverged(
                f"{method_name} diverged at epoch {epoch}: {', '.join(diverged)} is not finite "
                "(try a smaller learning rate)"
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        training_seconds += time.perf_counter() - started
        steps += epoch_steps
        if epoch % train.eval_every == 0 or epoch == train.epochs:
            metrics = evaluate_epoch(method, tensors)
            report = EpochReport(
                epoch,
                steps,
                losses,
                metrics,
                training_seconds,
                pairs / training_seconds,
                evaluate_test(method, tensors) if track_test else None,
            )
            history.append(report)
            bar.set_postfix(
                loss=f"{losses.get('train_loss', float('nan')):.4f}",
                val=f"{metrics['val_loss']:.4f}",
                kpairs_s=f"{report.pairs_per_second / 1e3:.0f}",
            )
            try:
                if callback is not None:
                    callback(report)
            except StopTraining:
                break  # no checkpoint: the caller keeps the result and removes the file
            if checkpoint is not None and schedule.due(final=epoch == train.epochs):
                loop = {"epoch": epoch, "history": history, "seconds": training_seconds}
                loop |= {"steps": steps, "pairs": pairs}
                checkpoints.save(checkpoint, identity, method, tensors, generator, loop)
    result = FitResult(method, {}, history, training_seconds, str(device))
    if evaluate_test_set:
        result.test_users, result.test_per_user = evaluate_test_per_user(method, tensors)
        result.test_metrics = evaluate_test(method, tensors)
        result.test_exposure = pair_exposure(method, data.test_user, data.test_item)
    return result


def _run_identity(
    method_name: str,
    data: FeedbackData,
    train: TrainConfig,
    hyper: Any,
    seed: int,
    track: bool,
    device: torch.device,
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the method, its configuration, the seed,
    the device type (CPU and CUDA generators draw different streams), the data and the code
    (digests), and whether the curve tracks the test set. The thread count and the
    elementwise path may differ: like a rerun on another machine, they change numbers only by
    float rounding."""
    config = {
        key: value
        for key, value in dataclasses.asdict(train).items()
        if key not in ROUNDING_ONLY_KEYS
    }
    return {
        "method": method_name,
        "train": config,
        "hyper": dataclasses.asdict(hyper) if dataclasses.is_dataclass(hyper) else repr(hyper),
        "seed": seed,
        "device": device.type,
        "data": checkpoints.data_digest(data),
        "code": checkpoints.code_digest(),
        "track_test": track,
    }


def build_method(
    method_name: str, tensors: TrainingTensors, train: TrainConfig, hyper: Any, seed: int
) -> tuple[Method, torch.Generator]:
    """The method as `fit` constructs it, and the generator its sampler draws from: CPU
    threads set (`train.threads`), torch's global RNG and the generator seeded with `seed`.
    Reloading a logged model goes through here too, so any random structure a method draws
    at construction outside its `state()` is the trained run's."""
    cls = get_method(method_name)
    threads = train.cpu_threads()
    if tensors.device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    generator = torch.Generator(device=tensors.device).manual_seed(seed)
    return cls(tensors, train, hyper, generator), generator


def make_sampler(
    sampling: str, tensors: TrainingTensors, train: TrainConfig, generator: torch.Generator
):
    if sampling == "triples":
        if train.mode == "paper":
            return TripleSampler(tensors, train.batch_size, generator)
        return BlockTripleSampler(tensors, train.block_users, generator)
    if sampling == "full":
        return FullSampler(tensors)
    if train.mode == "paper":
        return PairSampler(tensors, train.batch_size, generator)
    return BlockSampler(tensors, train.block_users, generator)


class FullSampler:
    """One step per epoch over everything (EM methods)."""

    def __init__(self, tensors: TrainingTensors) -> None:
        self.tensors = tensors

    def epoch(self) -> Iterator[Batch]:
        t = self.tensors
        users = torch.arange(t.n_users, device=t.device)
        yield Batch(users, None, t.labels, t.train_weight)


@torch.no_grad()
def score_matrix(method: Method, users: np.ndarray, block: int = 4096) -> np.ndarray:
    """Relevance logits of `users` against all items, (len(users), M) float32 on the host."""
    index = torch.tensor(np.asarray(users), dtype=torch.long, device=method.device)
    return torch.cat([method.scores(chunk) for chunk in index.split(block)]).float().cpu().numpy()


def task_scores(method: Method, task: RankingTask) -> np.ndarray:
    """(n_users, L) scores of a ranking task's candidates; NaN at padding."""
    rows = score_matrix(method, task.user_ids)
    scores = np.take_along_axis(rows, np.maximum(task.item_ids, 0), axis=1).astype(np.float64)
    scores[~task.mask] = np.nan
    return scores


def evaluate_test_per_user(
    method: Method, tensors: TrainingTensors
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(user ids, metric -> per-user values) on the random-exposure test set."""
    task = tensors.test_task
    assert task is not None, "loaded without its test split"
    return task.user_ids, per_user_metrics(task_scores(method, task), task, KS)


# Metric-name prefix of the second semi-synthetic test protocol (`evaluate_test`).
UNEXPOSED_PREFIX = "unexposed_"


def evaluate_test(method: Method, tensors: TrainingTensors) -> dict[str, float]:
    """DCG@K, MAP@K and Recall@K on the random-exposure test set; on semi-synthetic data also
    on the relevant-but-unexposed lists (Saito et al.'s protocol), prefixed `unexposed_`."""
    _, per_user = evaluate_test_per_user(method, tensors)
    metrics = {name: float(values.mean()) for name, values in per_user.items()}
    task = tensors.unexposed_test_task
    if task is not None:
        unexposed = ranking_metrics(task_scores(method, task), task, KS)
        metrics |= {f"{UNEXPOSED_PREFIX}{name}": value for name, value in unexposed.items()}
    return metrics


@torch.no_grad()
def evaluate_epoch(method: Method, tensors: TrainingTensors) -> dict[str, float]:
    """Metrics that may guide training choices (never the test set): log loss on the unbiased
    validation set, SNIPS DCG/Recall@3 on the hyper-validation set, and on semi-synthetic data
    the PCC of the method's exposure estimate against the true exposure."""
    rows = method.scores(tensors.val_users)
    logits = rows.gather(1, tensors.val_items[:, None]).squeeze(1)
    metrics = {"val_loss": float(log_loss(logits.float(), tensors.val_labels).mean())}
    task = tensors.hyper_task
    # Propensity of a hyper-validation positive: item popularity as RelMF models exposure,
    # with add-one counts so that an item whose positives were all held out is not 0.
    theta = item_popularity_exposure(tensors.item_popularity.cpu() + 1).numpy()
    propensity = theta[np.maximum(task.item_ids, 0)]
    snips = snips_metrics(task_scores(method, task), task, propensity, ks=(3,))
    metrics |= {f"hyper_{name}": value for name, value in snips.items() if "map" not in name}
    if tensors.true_exposure is not None:
        users = np.arange(tensors.n_users)
        estimate = exposure_matrix(method, users)
        if estimate is not None:
            metrics["pcc"] = exposure_pcc(estimate, tensors.true_exposure.cpu().numpy())
    return metrics


@torch.no_grad()
def pair_exposure(
    method: Method, users: np.ndarray, items: np.ndarray, block: int = 4096
) -> np.ndarray | None:
    """The method's exposure estimate m_bar at each (user, item) pair, float64, or None for
    methods without one. Computed per block of users so that memory stays O(block x M)."""
    users, items = np.asarray(users), np.asarray(items)
    out = np.empty(users.shape, dtype=np.float64)
    unique = np.unique(users)
    for start in range(0, unique.size, block):
        chunk = unique[start : start + block]
        rows = method.exposure(torch.as_tensor(chunk, dtype=torch.long, device=method.device))
        if rows is None:
            return None
        selected = np.isin(users, chunk)
        row = torch.as_tensor(np.searchsorted(chunk, users[selected]), device=method.device)
        col = torch.as_tensor(items[selected].astype(np.int64), device=method.device)
        out[selected] = rows[row, col].double().cpu().numpy()
    return out


@torch.no_grad()
def exposure_matrix(method: Method, users: np.ndarray, block: int = 4096) -> np.ndarray | None:
    index = torch.tensor(np.asarray(users), dtype=torch.long, device=method.device)
    chunks = [method.exposure(chunk) for chunk in index.split(block)]
    if chunks[0] is None:
        return None
    return torch.cat(chunks).double().cpu().numpy()
