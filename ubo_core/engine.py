"""The training engine's data side: tensors resident on the device and the samplers.

Training sees every (user, item) pair of the N x M matrix except the held-out validation
pairs, with label R~ (1 on training positives). The samplers draw indices on the device from a
seeded generator, so a step never transfers data from the host:

- `PairSampler` (paper mode): a fresh permutation of all training pairs each epoch, cut into
  minibatches of `batch_size` pairs (the paper's setting, 1024).
- `BlockSampler` (dense mode): a permutation of the users cut into blocks of `block_users`;
  a step sees each block's users against all items, so its scores are one GEMM.
- `TripleSampler` (BPR, paper mode): training positives, each with one item drawn uniformly
  from that user's unlabeled items (R~ = 0, not held out; `UnlabeledItems`). An epoch has as
  many triples as the pointwise methods see pairs (positives cycled in fresh random orders),
  so every method takes the same number of optimiser steps per epoch; one pass over the
  positives would give BPR ~2 steps per epoch on Coat against ~85 for the others.
- `BlockTripleSampler` (BPR, dense mode): as many triples per epoch (each positive `rounds`
  times, so up to one round more than `TripleSampler`'s truncated count), grouped by blocks of
  users, so that a step scores its block against all items with one GEMM and looks triples up
  in that matrix instead of gathering three embedding rows per triple. All copies of a
  positive fall in the same step, each with its own negative.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

from ubo_core.data import FeedbackData
from ubo_core.errors import UboError
from ubo_core.metrics import RankingTask


def resolve_device(requested: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; an unavailable CUDA request is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UboError(f"device {requested!r} requested but CUDA is not available")
    return device


@dataclass
class Batch:
    """One step's training pairs.

    Pairs: users (B,), items (B,), labels (B,), weight None.
    Dense block: users (B,), items None (= all items), labels (B, M), weight (B, M) with 0 on
    held-out pairs. Triples (BPR): users (B,), items (B,) positives, negatives (B,).
    Dense triples (BPR): users (U,) a block of distinct users, items and negatives (T,), and
    `local` (T,): the position in `users` of each triple's user.
    """

    users: Tensor
    items: Tensor | None
    labels: Tensor
    weight: Tensor | None = None
    negatives: Tensor | None = None
    local: Tensor | None = None

    @property
    def n_examples(self) -> int:
        """Examples the step trains on, for speed figures: triples for BPR (whose dense
        batches name a block of users), else pairs (a dense block: users x all items)."""
        if self.negatives is not None:
            return self.negatives.numel()
        return self.users.numel() if self.weight is None else self.weight.numel()

    def reduce_mean(self, per_pair: Tensor) -> Tensor:
        """Mean of a per-pair loss over the batch's training pairs."""
        if self.weight is None:
            return per_pair.mean()
        return (per_pair * self.weight).sum() / self.weight.sum()

    def reduce_sum(self, per_pair: Tensor) -> Tensor:
        return per_pair.sum() if self.weight is None else (per_pair * self.weight).sum()

    def cell_tables(self) -> tuple[Tensor, Tensor, Tensor]:
        """A dense block's (label table, weight table, rows): its labels and weights are
        table[rows], what the dense kernels take (ubo_core/estimators.py, `block_rows`). Here
        the rows the batch holds, 0..B-1; a `Block` names its rows of training's byte tables."""
        assert self.weight is not None, "cell tables are a dense block's"
        rows = torch.arange(self.labels.shape[0], device=self.labels.device)
        return self.labels, self.weight, rows

    def n_train_cells(self) -> Tensor:
        """A dense block's number of training cells (0-dim float32, an exact integer)."""
        assert self.weight is not None, "training cells are a dense block's"
        return self.weight.sum()

    def cell_scale(self, dtype: torch.dtype) -> Tensor:
        """1/n for a dense block of n training cells, the factor of the mean loss over them
        (the sums of PAPER.md Eq. 4 and 10 taken as means over a batch's pairs, as paper mode
        takes them), 0-dim in the cells' `dtype`.
        Rounded once from float64, what an eager op does with a float64 scalar anyway; a
        float64 0-dim input to a compiled kernel would cost a host read per call."""
        return (1.0 / self.n_train_cells().double()).to(dtype)


class Block(Batch):
    """Dense mode's block from `BlockSampler`: users (B,) against all items. Its labels and
    weights (B, M) are gathered only when something reads them (the autograd reference
    steps, CJMF); the fused kernels read the cells' bytes in place from training's byte
    tables (`cell_tables`), 1 byte a cell where the gathered float rows cost 8 to write and
    8 to read again (`benchmarks/train_speed.py --parts` times a dense step's parts)."""

    def __init__(self, users: Tensor, tensors: TrainingTensors) -> None:
        # Not the dataclass's __init__: labels and weight are the properties below.
        self.users, self.items, self.negatives, self.local = users, None, None, None
        self.tensors = tensors

    @cached_property
    def labels(self) -> Tensor:  # type: ignore[override]
        return self.tensors.labels.index_select(0, self.users)

    @cached_property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self.tensors.train_weight.index_select(0, self.users)

    @property
    def n_examples(self) -> int:
        return self.users.numel() * self.tensors.n_items

    def cell_tables(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.tensors.label_bytes, self.tensors.train_bytes, self.users

    def n_train_cells(self) -> Tensor:
        # A float32 sum of per-user integer counts: the same exact integer as the float32 sum
        # of the block's 0/1 weights (both below 2^24), read from 256 numbers instead of 256k.
        return self.tensors.train_cells.index_select(0, self.users).sum()


class TrainingTensors:
    """Everything training and evaluation read, built once from a processed data set."""

    def __init__(self, data: FeedbackData, device: torch.device) -> None:
        if not data.has_validation:
            raise UboError("training needs the processed data set (run the validation stage)")
        assert data.excluded_user is not None and data.val_user is not None
        assert data.val_item is not None and data.val_label is not None
        self.device = device
        self.n_users, self.n_items = data.n_users, data.n_items
        pos_users, pos_items = data.train_positives()
        labels = torch.zeros(self.n_users, self.n_items, dtype=torch.float32)
        labels[torch.from_numpy(pos_users).long(), torch.from_numpy(pos_items).long()] = 1.0
        in_train = torch.ones(self.n_users, self.n_items, dtype=torch.bool)
        in_train[
            torch.from_numpy(data.excluded_user).long(), torch.from_numpy(data.excluded_item).long()
        ] = False
        self.labels = labels.to(device)
        self.in_train = in_train.to(device)
        self.train_weight = in_train.float().to(device)
        # Dense mode's kernels read a block's cells from these (`Block.cell_tables`).
        self.label_bytes = self.labels.to(torch.uint8)
        # The same memory as in_train (bool is one byte holding 0 or 1), read as numbers.
        self.train_bytes = self.in_train.view(torch.uint8)
        self.train_cells = in_train.sum(1).float().to(device)
        self.pos_users = torch.from_numpy(pos_users).long().to(device)
        self.pos_items = torch.from_numpy(pos_items).long().to(device)
        popularity = np.bincount(pos_items, minlength=self.n_items)
        self.item_popularity = torch.from_numpy(popularity).to(device)
        self.val_users = torch.from_numpy(data.val_user).long().to(device)
        self.val_items = torch.from_numpy(data.val_item).long().to(device)
        self.val_labels = torch.from_numpy(data.val_label).float().to(device)
        self.true_exposure = (
            None if data.true_exposure is None else torch.from_numpy(data.true_exposure).to(device)
        )
        # None when the data set was loaded without its test split (tuning).
        self.test_task = (
            RankingTask.from_pairs(data.test_user, data.test_item, data.test_label, data.eval_users)
            if data.has_test
            else None
        )
        # Semi-synthetic only: the second test protocol (relevant-but-unexposed items).
        self.unexposed_test_task = (
            RankingTask.from_pairs(
                data.unexposed_test_user, data.unexposed_test_item, data.unexposed_test_label
            )
            if data.has_test and data.unexposed_test_user is not None
            else None
        )
        assert data.hyper_user is not None and data.hyper_item is not None
        assert data.hyper_label is not None
        self.hyper_task = RankingTask.from_pairs(data.hyper_user, data.hyper_item, data.hyper_label)
        self._pair_index: Tensor | None = None

    @property
    def pair_index(self) -> Tensor:
        """Flat indices u * M + i of all training pairs, (P,) int64 (built on first use)."""
        if self._pair_index is None:
            self._pair_index = torch.nonzero(self.in_train.view(-1)).view(-1)
        return self._pair_index

    def n_train_pairs(self) -> int:
        return int(self.pair_index.numel())


class PairSampler:
    """Paper mode: minibatches of `batch_size` pairs from a new permutation every epoch."""

    def __init__(self, tensors: TrainingTensors, batch_size: int, generator: torch.Generator):
        self.tensors, self.batch_size, self.generator = tensors, batch_size, generator
        self.flat_labels = tensors.labels.view(-1)

    def epoch(self) -> Iterator[Batch]:
        index = self.tensors.pair_index
        order = torch.randperm(index.numel(), generator=self.generator, device=index.device)
        # index_select, not index[order]: the same tensor, about 3.5x faster on the CPU
        # (advanced indexing's generic path); most of the per-epoch shuffle's cost on Yahoo.
        shuffled = index.index_select(0, order)
        del order
        # Users, items and labels of the whole epoch at once: three passes over 15M pairs
        # cost less than three small ops on each of Yahoo's 15,000 steps.
        n_items = self.tensors.n_items
        users, items = shuffled // n_items, shuffled % n_items
        labels = self.flat_labels.index_select(0, shuffled)
        del shuffled
        for user, item, label in zip(
            users.split(self.batch_size),
            items.split(self.batch_size),
            labels.split(self.batch_size),
            strict=True,
        ):
            yield Batch(user, item, label)


class BlockSampler:
    """Dense mode: blocks of `block_users` users against all items."""

    def __init__(self, tensors: TrainingTensors, block_users: int, generator: torch.Generator):
        self.tensors, self.block_users, self.generator = tensors, block_users, generator

    def epoch(self) -> Iterator[Batch]:
        t = self.tensors
        order = torch.randperm(t.n_users, generator=self.generator, device=t.device)
        for users in order.split(self.block_users):
            yield Block(users, t)


class TripleSampler:
    """BPR: (user, positive, unlabeled) triples, as many per epoch as training pairs."""

    def __init__(self, tensors: TrainingTensors, batch_size: int, generator: torch.Generator):
        self.tensors, self.batch_size, self.generator = tensors, batch_size, generator
        self.unlabeled = UnlabeledItems(tensors)

    def epoch(self) -> Iterator[Batch]:
        t = self.tensors
        n_positives, n_triples = t.pos_users.numel(), t.n_train_pairs()
        rounds = -(-n_triples // n_positives)
        order = torch.cat(
            [
                torch.randperm(n_positives, generator=self.generator, device=t.device)
                for _ in range(rounds)
            ]
        )[:n_triples]
        for chunk in order.split(self.batch_size):
            users, items = t.pos_users.index_select(0, chunk), t.pos_items.index_select(0, chunk)
            yield Batch(users, items, t.labels[users, items], negatives=self.negatives(users))

    def negatives(self, users: Tensor) -> Tensor:
        return self.unlabeled.sample(users, self.generator)


class UnlabeledItems:
    """Per user, the items with R~ = 0 still in training (held-out pairs excluded), in one
    flat table of item ids with each user's offset and count, so that a uniform draw per user
    is one random number, a multiply and a gather: exact, of fixed size, and without the host
    synchronisation a rejection loop's "any left to redraw?" check needs on a device. It
    holds the unlabeled training pairs as int32 item ids (60 MB for Yahoo! R3)."""

    def __init__(self, t: TrainingTensors) -> None:
        flat = t.pair_index[t.labels.view(-1).index_select(0, t.pair_index) == 0]
        self.items = (flat % t.n_items).int()
        self.counts = torch.bincount(flat // t.n_items, minlength=t.n_users)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        # A user with a training positive and no unlabeled item has no BPR triple to draw.
        has_positive = torch.bincount(t.pos_users, minlength=t.n_users) > 0
        stuck = torch.nonzero(has_positive & (self.counts == 0)).view(-1)
        if stuck.numel():
            raise UboError(
                f"BPR needs an unlabeled item per user: user {int(stuck[0])} and "
                f"{stuck.numel() - 1} more have every training item positive"
            )

    def sample(self, users: Tensor, generator: torch.Generator) -> Tensor:
        """One item per entry of `users`, uniform among that user's unlabeled items."""
        counts = self.counts.index_select(0, users)
        draw = torch.rand(
            users.shape, generator=generator, device=users.device, dtype=torch.float64
        )
        # float64 keeps draw * count below count for any count under 2^50; the clamp is for
        # peace of mind.
        within = torch.minimum((draw * counts).long(), counts - 1)
        return self.items.index_select(0, self.offsets.index_select(0, users) + within).long()


class BlockTripleSampler:
    """BPR in dense mode: a permutation of the users cut into blocks of `block_users`; each
    block's training positives, each `rounds` times with a fresh unlabeled item, where
    `rounds` = ceil(training pairs / positives) as in `TripleSampler`."""

    def __init__(self, tensors: TrainingTensors, block_users: int, generator: torch.Generator):
        self.tensors, self.block_users, self.generator = tensors, block_users, generator
        order = torch.argsort(tensors.pos_users, stable=True)
        self.items_by_user = tensors.pos_items[order]
        self.counts = torch.bincount(tensors.pos_users, minlength=tensors.n_users)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.rounds = -(-tensors.n_train_pairs() // max(1, tensors.pos_users.numel()))
        self.unlabeled = UnlabeledItems(tensors)

    def epoch(self) -> Iterator[Batch]:
        t = self.tensors
        order = torch.randperm(t.n_users, generator=self.generator, device=t.device)
        blocks = order.split(self.block_users)
        # Each block's number of positives, read once per epoch (the epoch's one host
        # synchronisation): repeat_interleave then knows its output size in every step.
        sizes = torch.stack([self.counts.index_select(0, b).sum() for b in blocks]).tolist()
        for users, size in zip(blocks, sizes, strict=True):
            if size == 0:
                continue  # a block of users without positives: no triple
            counts = self.counts.index_select(0, users)
            local = torch.repeat_interleave(
                torch.arange(users.numel(), device=t.device), counts, output_size=size
            )
            # Position of each positive within its user's run: its index minus the run start.
            starts = torch.repeat_interleave(
                torch.cumsum(counts, 0) - counts, counts, output_size=size
            )
            within = torch.arange(size, device=t.device) - starts
            items = self.items_by_user[self.offsets.index_select(0, users)[local] + within]
            local, items = local.repeat(self.rounds), items.repeat(self.rounds)
            triple_users = users.index_select(0, local)
            negatives = self.unlabeled.sample(triple_users, self.generator)
            labels = t.labels[triple_users, items]
            yield Batch(users, items, labels, negatives=negatives, local=local)
