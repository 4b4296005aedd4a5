"""The dense-mode BPR sampler: the same triples per epoch as paper mode, grouped by user."""

from __future__ import annotations

from collections import Counter

import torch

from tests.test_tracking import write_processed
from ubo_core.data import FeedbackData
from ubo_core.engine import BlockTripleSampler, TrainingTensors, TripleSampler

CPU = torch.device("cpu")


def tensors_of(tmp_path) -> TrainingTensors:
    write_processed(tmp_path, "coat")
    return TrainingTensors(FeedbackData.load(tmp_path / "processed" / "coat" / "dataset.npz"), CPU)


def test_block_triples_cover_every_positive_rounds_times_with_unlabeled_negatives(tmp_path):
    t = tensors_of(tmp_path)
    sampler = BlockTripleSampler(t, 8, torch.Generator().manual_seed(0))
    n_positives = t.pos_users.numel()
    assert sampler.rounds == -(-t.n_train_pairs() // n_positives)
    seen: Counter = Counter()
    blocks = []
    for batch in sampler.epoch():
        assert batch.local is not None and batch.negatives is not None and batch.items is not None
        assert batch.users.unique().numel() == batch.users.numel() <= 8
        users = batch.users[batch.local]
        assert (t.labels[users, batch.items] == 1).all() and (batch.labels == 1).all()
        assert (t.labels[users, batch.negatives] == 0).all()
        assert t.in_train[users, batch.negatives].all()
        seen.update(zip(users.tolist(), batch.items.tolist(), strict=True))
        blocks.append(batch.users)
    assert sorted(torch.cat(blocks).tolist()) == list(range(t.n_users))  # each user once
    positives = set(zip(t.pos_users.tolist(), t.pos_items.tolist(), strict=True))
    assert set(seen) == positives and set(seen.values()) == {sampler.rounds}
    # As many triples as paper mode's sampler draws (up to its truncation of the last round).
    paper = sum(b.users.numel() for b in TripleSampler(t, 64, torch.Generator()).epoch())
    assert 0 <= n_positives * sampler.rounds - paper < n_positives


def test_block_triples_depend_on_the_seed_only(tmp_path):
    t = tensors_of(tmp_path)

    def first(seed: int):
        batch = next(BlockTripleSampler(t, 8, torch.Generator().manual_seed(seed)).epoch())
        return batch.users.tolist(), batch.negatives.tolist()

    assert first(1) == first(1) and first(1) != first(2)


def test_dense_bpr_step_equals_the_paper_step_on_the_same_triples(tmp_path):
    """Looking triples up in the block's score matrix gives the same loss and the same Adam
    step as gathering their embedding rows (exact Adam, so every row's update is compared)."""
    from ubo_core.config import TrainConfig
    from ubo_core.engine import Batch
    from ubo_core.methods.base import NoHyper
    from ubo_core.methods.bpr import BPR

    t = tensors_of(tmp_path)
    batch = next(BlockTripleSampler(t, 8, torch.Generator().manual_seed(3)).epoch())
    users = batch.users[batch.local]
    paper_batch = Batch(users, batch.items, batch.labels, negatives=batch.negatives)
    train = TrainConfig(lr=0.05, weight_decay=0.01)
    models = [BPR(t, train, NoHyper(), torch.Generator().manual_seed(0)) for _ in range(2)]
    dense_loss = models[0].step(batch)["train_loss"]
    paper_loss = models[1].step(paper_batch)["train_loss"]
    torch.testing.assert_close(dense_loss, paper_loss)
    for name in ("user_emb", "item_emb"):
        torch.testing.assert_close(models[0].state()[name], models[1].state()[name])
    assert not torch.equal(
        models[0].state()["item_emb"],
        BPR(t, train, NoHyper(), torch.Generator().manual_seed(0)).state()["item_emb"],
    )  # the step did move the parameters
