"""BPR (Rendle et al. 2009): pairwise ranking of each training positive above one uniformly
sampled unlabeled item of the same user. Paper mode steps on minibatches of triples; dense mode
on all triples of a block of users (`BlockTripleSampler`), scored from one
block-against-all-items GEMM."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ubo_core.config import TrainConfig
from ubo_core.engine import Batch, TrainingTensors
from ubo_core.estimators import bpr_loss
from ubo_core.methods.base import Method, RelevanceMF
from ubo_core.methods.rows import RowAdam, RowSubset


class BPR(Method):
    sampling = "triples"
    hand_derived = True  # False: both modes through autograd (the reference, for tests)

    def __init__(
        self, tensors: TrainingTensors, train: TrainConfig, hyper: Any, generator: torch.Generator
    ) -> None:
        super().__init__(tensors, train, hyper, generator)
        self.relevance = RelevanceMF(tensors, train, generator)
        self.user_emb, self.item_emb = self.relevance.user_emb, self.relevance.item_emb
        self.optimizer = RowAdam(
            self.relevance.parameters(),
            train.step_lr,
            train.weight_decay,
            lazy=train.optimizer == "lazy_adam",
        )

    def step(self, batch: Batch) -> dict[str, Tensor]:
        assert batch.items is not None and batch.negatives is not None
        if batch.local is not None:
            return self._block_step(batch) if self.hand_derived else self._dense_step(batch)
        if self.hand_derived:
            return self._triple_step(batch)
        users = RowSubset(self.user_emb, batch.users)
        items = RowSubset(self.item_emb, batch.items, extra=batch.negatives)
        user_rows = users.gather()
        positive = (user_rows * items.gather()).sum(-1)
        negative = (user_rows * items.gather(which="extra")).sum(-1)
        loss = bpr_loss(positive, negative).mean()
        grad_users, grad_items = torch.autograd.grad(loss, [users.values, items.values])
        self.optimizer.step([(users.rows, grad_users), (items.rows, grad_items)])
        return {"train_loss": loss.detach()}

    def _triple_step(self, batch: Batch) -> dict[str, Tensor]:
        """Paper mode with the gradient in closed form: with x = s_ui - s_uj and
        c = d(-log sigmoid x)/dx / B = (sigmoid(x) - 1) / B, the user row gets c (w_i - w_j),
        the positive item c w_u and the negative item -c w_u."""
        assert batch.items is not None and batch.negatives is not None
        user_rows = self.user_emb.detach().index_select(0, batch.users)
        positive_rows = self.item_emb.detach().index_select(0, batch.items)
        negative_rows = self.item_emb.detach().index_select(0, batch.negatives)
        margin = (user_rows * (positive_rows - negative_rows)).sum(-1)
        slope = ((torch.sigmoid(margin) - 1.0) / margin.numel()).unsqueeze(-1)
        user_grad = slope * user_rows
        self.optimizer.step(
            [
                (batch.users, slope * (positive_rows - negative_rows)),
                (torch.cat([batch.items, batch.negatives]), torch.cat([user_grad, -user_grad])),
            ]
        )
        return {"train_loss": -F.logsigmoid(margin).mean()}

    def _block_step(self, batch: Batch) -> dict[str, Tensor]:
        """Dense mode with the gradient in closed form: the block's scores S = U W^T (one
        GEMM), each triple's slope c = (sigmoid(s_ui - s_uj) - 1) / T added at (u, i) and
        subtracted at (u, j) of a (B, M) matrix G, then dL/dU = G W and dL/dW = G^T U."""
        assert batch.items is not None and batch.negatives is not None
        assert batch.local is not None
        user_rows = self.user_emb.detach().index_select(0, batch.users)
        item_table = self.item_emb.detach()
        scores = user_rows @ item_table.T
        n_items = item_table.shape[0]
        row = batch.local * n_items
        positive_cell, negative_cell = row + batch.items, row + batch.negatives
        flat = scores.view(-1)
        margin = flat.index_select(0, positive_cell) - flat.index_select(0, negative_cell)
        slope = (torch.sigmoid(margin) - 1.0) / margin.numel()
        cells = torch.zeros_like(scores)
        cells.view(-1).index_add_(0, positive_cell, slope).index_add_(0, negative_cell, -slope)
        self.optimizer.step([(batch.users, cells @ item_table), (None, cells.T @ user_rows)])
        return {"train_loss": -F.logsigmoid(margin).mean()}

    def _dense_step(self, batch: Batch) -> dict[str, Tensor]:
        """A block of users against all items: one GEMM, then each triple's two scores are
        looked up in it (autograd scatters their gradients back into the block's matrix)."""
        assert batch.items is not None and batch.negatives is not None
        assert batch.local is not None
        users = RowSubset(self.user_emb, batch.users)
        items = RowSubset(self.item_emb, None)
        scores = users.gather() @ items.gather().T  # (block, M)
        positive = scores[batch.local, batch.items]
        negative = scores[batch.local, batch.negatives]
        loss = bpr_loss(positive, negative).mean()
        grad_users, grad_items = torch.autograd.grad(loss, [users.values, items.values])
        self.optimizer.step([(users.rows, grad_users), (None, grad_items)])
        return {"train_loss": loss.detach()}

    def scores(self, users: Tensor) -> Tensor:
        return self.relevance.logits(users, None)

    def state(self) -> dict[str, Tensor]:
        return {"user_emb": self.user_emb.detach(), "item_emb": self.item_emb.detach()}
