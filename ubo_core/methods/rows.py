"""Row-restricted steps: the paper-mode fast path shared by every embedding method.

A 1024-pair minibatch touches at most 1024 user rows and 1024 item rows of tables with
15,400 and 1,000 rows. Autograd through `table[index]` would scatter gradients into a dense
zero table and Adam would then update every row: both O(table) per step. Instead a step
works on the unique rows it touches: either as small leaf tensors that autograd
differentiates (`RowSubset`; dense mode and the reference form of paper-mode steps) or with
per-pair gradients in closed form (`RowAdam.step_pairs`; the hand-derived paper-mode steps),
and `RowAdam` applies the update to those rows.

`RowAdam` is exactly `torch.optim.Adam` (L2 weight decay added to the gradient) when
`lazy=False`: rows outside the batch have zero gradient and still move by their momentum.
With `lazy=True` only the batch's rows and their moments change (bias correction still uses
the global step count), which makes a step O(batch) instead of O(table): the semantics of
`torch.optim.SparseAdam`, which differs only in where eps enters (tests/test_hand_derived.py).

Rows are read with `index_select`, not `table[index]`: on the CPU, advanced indexing goes
through a generic gather kernel that is 3-4x slower for (1024, 50) rows, and it was the
largest share of a paper-mode step (torch.profiler; docs/PERFORMANCE.md). `unique_rows` and
`write_rows` say why they do not call `torch.unique` and `index_copy_`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def unique_rows(index: Tensor, n_rows: int) -> tuple[Tensor, Tensor]:
    """`torch.unique(index, return_inverse=True)` for indices into a table of `n_rows` rows:
    the sorted distinct rows and each entry's position among them. For tables up to 64 rows
    per index (Yahoo's 15,400 users for 1,024 pairs) they are found by marking the rows in an
    (n_rows,) vector instead of sorting: the same result, on the CPU 13 us instead of 45 us
    for 1,024 indices into 1,000 rows and 32 us instead of 40 us into 15,400 (a sort of random
    keys is branchy). Larger tables sort, which keeps a step O(batch)."""
    if n_rows > 64 * max(1, index.numel()):
        return torch.unique(index, return_inverse=True)
    mark = torch.zeros(n_rows, dtype=torch.int64, device=index.device)
    mark.index_fill_(0, index, 1)
    rows = mark.nonzero().squeeze(1)
    local = mark.cumsum_(0).index_select(0, index).sub_(1)
    return rows, local


# Row writes through NumPy: the dtypes it shares with torch (bfloat16, for one, it has not).
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


def write_rows(table: Tensor, rows: Tensor, values: Tensor) -> None:
    """table[rows] = values for distinct `rows`. On the CPU through NumPy views of the same
    memory: numpy's row assignment takes 12 us for (1000, 50) float32 rows where
    `index_copy_` takes 19 us, and a lazy step writes six such blocks. The write bypasses
    autograd's version counter: only for optimiser state and parameters outside any graph
    (RowAdam steps under no_grad)."""
    if table.dtype != values.dtype:
        raise TypeError(f"write_rows: table is {table.dtype}, values are {values.dtype}")
    if table.device.type == "cpu" and table.dtype in _NUMPY_DTYPES:
        table.detach().numpy()[rows.numpy()] = values.detach().numpy()
    else:
        table.index_copy_(0, rows, values)


class RowSubset:
    """The rows of `table` that `index` names, as a leaf tensor that autograd can differentiate.

    `index` None means every row (dense mode's item table). `local` maps each entry of
    `index` to its row in `values`, so `values[local]` equals `table[index]`.
    """

    def __init__(self, table: Tensor, index: Tensor | None, extra: Tensor | None = None) -> None:
        if index is None:
            self.rows: Tensor | None = None
            self.local: Tensor | None = None
            self.values = table.detach().clone().requires_grad_()
            self.extra_local = extra
            return
        joined = index if extra is None else torch.cat([index, extra])
        rows, local = unique_rows(joined, table.shape[0])
        self.rows = rows
        self.local = local[: index.numel()]
        self.extra_local = None if extra is None else local[index.numel() :]
        self.values = table.detach().index_select(0, rows).requires_grad_()

    def gather(self, values: Tensor | None = None, which: str = "index") -> Tensor:
        """Rows for `index` (or `extra`), taken from `values` (default: the leaf)."""
        source = self.values if values is None else values
        local = self.local if which == "index" else self.extra_local
        return source if local is None else source.index_select(0, local)


class RowAdam:
    """Adam over whole tables, stepping with the gradient of a `RowSubset` of rows."""

    def __init__(
        self, params: list[nn.Parameter], lr: float, weight_decay: float, lazy: bool
    ) -> None:
        self.params, self.lr, self.weight_decay, self.lazy = params, lr, weight_decay, lazy
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = 0
        # The fused kernel reads the step count from a float32 tensor on the parameters'
        # device; one, refilled each step, saves a host-to-device copy per table on CUDA.
        self._step_count = torch.zeros((), dtype=torch.float32, device=params[0].device)

    @torch.no_grad()
    def step(self, grads: list[tuple[Tensor | None, Tensor]]) -> None:
        """One Adam step; `grads[k]` = (rows or None for all rows, gradient of those rows)."""
        self.steps += 1
        self._step_count.fill_(self.steps)
        bias1 = 1 - BETA1**self.steps
        bias2_sqrt = (1 - BETA2**self.steps) ** 0.5
        for param, m, v, (rows, grad) in zip(
            self.params, self.exp_avg, self.exp_avg_sq, grads, strict=True
        ):
            if rows is not None and not self.lazy:
                rows, grad = None, torch.zeros_like(param).index_add_(0, rows, grad)
            if rows is None:
                self._update(param, m, v, grad, bias1, bias2_sqrt)
            else:
                p_rows, m_rows, v_rows = (t.index_select(0, rows) for t in (param, m, v))
                self._fused_update(p_rows, m_rows, v_rows, grad)
                for table, values in ((param, p_rows), (m, m_rows), (v, v_rows)):
                    write_rows(table, rows, values)

    def step_pairs(self, grads: list[tuple[Tensor | None, Tensor]]) -> None:
        """One Adam step from per-pair gradients: `grads[k]` = (index (B,) naming the row of
        each gradient row, duplicates allowed, or None for a whole-parameter gradient).
        The hand-derived paper-mode steps use this; duplicates are summed per row."""
        whole: list[tuple[Tensor | None, Tensor]] = []
        for param, (index, grad) in zip(self.params, grads, strict=True):
            if index is None:
                whole.append((None, grad))
            elif self.lazy:
                rows, local = unique_rows(index, param.shape[0])
                summed = grad.new_zeros(rows.numel(), grad.shape[1]).index_add_(0, local, grad)
                whole.append((rows, summed))
            else:
                whole.append((None, torch.zeros_like(param).index_add_(0, index, grad)))
        self.step(whole)

    def _update(
        self, p: Tensor, m: Tensor, v: Tensor, grad: Tensor, bias1: float, bias2_sqrt: float
    ) -> None:
        if self.weight_decay:
            grad = grad + self.weight_decay * p
        m.lerp_(grad, 1 - BETA1)
        v.mul_(BETA2).addcmul_(grad, grad, value=1 - BETA2)
        denom = (v.sqrt() / bias2_sqrt).add_(EPS)
        p.addcdiv_(m, denom, value=-self.lr / bias1)

    def _fused_update(self, p: Tensor, m: Tensor, v: Tensor, grad: Tensor) -> None:
        """The same update as `_update` in one kernel (torch.optim.Adam(fused=True)'s), which
        saves six passes over the rows; used on the lazy path, where a step is a few
        hundred rows and each pass costs more than its arithmetic."""
        torch._fused_adam_(
            [p],
            [grad],
            [m],
            [v],
            [],
            [self._step_count],
            amsgrad=False,
            lr=self.lr,
            beta1=BETA1,
            beta2=BETA2,
            weight_decay=self.weight_decay,
            eps=EPS,
            maximize=False,
        )


class RowSGD(RowAdam):
    """Plain gradient descent, p <- p - lr (g + weight_decay p), with RowAdam's interface:
    the paper's outer step ("a gradient descent step with the outer loop learning rate
    eta'", Sec. 2) where `exposure_optimizer: sgd` asks for it. Rows a lazy step does not
    touch do not move, as in exact SGD (their gradient is 0); the moment tables stay 0."""

    def _update(
        self, p: Tensor, m: Tensor, v: Tensor, grad: Tensor, bias1: float, bias2_sqrt: float
    ) -> None:
        if self.weight_decay:
            grad = grad + self.weight_decay * p
        p.add_(grad, alpha=-self.lr)

    def _fused_update(self, p: Tensor, m: Tensor, v: Tensor, grad: Tensor) -> None:
        self._update(p, m, v, grad, 1.0, 1.0)
