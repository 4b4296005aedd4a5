"""Row-restricted steps: the paper-mode fast path shared by every embedding method.

A 1024-pair minibatch touches at most 1024 user rows and 1024 item rows of tables with
15,400 and 1,000 rows. Autograd through `table[index]` would scatter gradients into a dense
zero table and Adam would then update every row: both O(table) per step. Instead a step
works on the unique rows it touches: either as small leaf tensors that autograd
differentiates (`RowSubset`; dense mode and the reference form of paper-mode steps) or with
per-pair gradients in closed form (the hand-derived paper-mode steps),
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
    """The distinct rows that `index` names and each entry's position among them, in tensors
    of `index`'s own size, so that no shape depends on the data and a step needs no host
    synchronisation (`torch.unique` and `nonzero` wait for the device to learn their output
    size).

    Returns (rows, local): rows (B,) holds the n distinct rows in ascending order, then
    B - n copies of rows[0] as padding; rows.index_select(0, local) equals `index`. Gathering
    the padded rows costs a few rows more than the distinct ones; a padding row is rows[0] again
    with a zero gradient, which `RowAdam` sums into rows[0]'s, so the padding changes nothing. For
    tables up to 64 rows per index (Yahoo's 15,400 users for 1,024 pairs) the rows are found
    by marking them in an (n_rows,) vector, faster on the CPU than a sort of random keys;
    larger tables sort, which keeps a step O(batch)."""
    if n_rows > 64 * max(1, index.numel()):
        ordered, order = torch.sort(index)
        first = torch.ones_like(ordered, dtype=torch.bool)
        first[1:] = ordered[1:] != ordered[:-1]
        local = torch.empty_like(index).scatter_(0, order, first.cumsum(0).sub_(1))
    else:
        mark = torch.zeros(n_rows, dtype=torch.int64, device=index.device)
        mark.index_fill_(0, index, 1)
        local = mark.cumsum_(0).index_select(0, index).sub_(1)
    # The smallest row (position 0 of the distinct rows), then every row at its position.
    rows = index.min().expand(index.numel()).clone().scatter_(0, local, index)
    return rows, local


# Row writes through NumPy: the dtypes it shares with torch (bfloat16, for one, it has not).
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


def write_rows(table: Tensor, rows: Tensor, values: Tensor) -> None:
    """table[rows] = values, where repeated rows come with equal values (so the order of the
    writes does not matter). On the CPU through NumPy views of the same
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
    """Adam over whole tables, stepping with the gradient of a `RowSubset` of rows.

    Both paths run torch's fused Adam kernel (`torch.optim.Adam(fused=True)`'s): one pass
    that reads p, g, m, v and writes p, m, v, instead of the six passes of the textbook
    update. The exact path (`lazy=False`) scatters a step's row gradients into a gradient
    table kept across steps and zeroes only those rows afterwards, so a step allocates
    nothing table-sized and its cost is the kernel's 7 passes over the tables (the memory
    limit benchmarks/train_speed.py measures). The step count lives in a device tensor that
    the step increments in place: no host value enters a step (a captured CUDA graph replays
    it correctly)."""

    def __init__(
        self, params: list[nn.Parameter], lr: float, weight_decay: float, lazy: bool
    ) -> None:
        self.params, self.lr, self.weight_decay, self.lazy = params, lr, weight_decay, lazy
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        # Gradients scattered per row: every entry is 0 between steps (a step writes its
        # rows, then zeroes them again).
        self._grad_tables = [torch.zeros_like(p) for p in params]
        self._step_count = torch.zeros((), dtype=torch.float32, device=params[0].device)

    @torch.no_grad()
    def step(self, grads: list[tuple[Tensor | None, Tensor]]) -> None:
        """One Adam step; `grads[k]` = (the row of each gradient row, or None for a
        whole-parameter gradient; gradient). Rows may repeat (the per-pair gradients of the
        hand-derived steps, `unique_rows`'s padding): both paths sum them per row."""
        self._step_count.add_(1)
        for k, (rows, grad) in enumerate(grads):
            if rows is None:
                self._fused_update(self.params[k], self.exp_avg[k], self.exp_avg_sq[k], grad)
            elif self.lazy:
                self._row_update(k, rows, grad)
            else:
                self._scattered_update(k, rows, grad)

    def _row_update(self, k: int, rows: Tensor, grad: Tensor) -> None:
        """Lazy: the update on the touched rows only. `rows` may repeat a row (pairs of one
        user, or `unique_rows`'s padding): the gradients are summed per row in the gradient
        table, and every copy of a row then reads the same p, m, v and summed gradient, so
        the copies compute the same update and their writes agree. Fixed shapes, no
        `unique`: nothing in the step waits for the device."""
        param, m, v = self.params[k], self.exp_avg[k], self.exp_avg_sq[k]
        table = self._grad_tables[k]
        table.index_add_(0, rows, grad)
        grad_rows = table.index_select(0, rows)
        table.index_fill_(0, rows, 0.0)
        p_rows, m_rows, v_rows = (t.index_select(0, rows) for t in (param, m, v))
        self._fused_update(p_rows, m_rows, v_rows, grad_rows)
        for target, values in ((param, p_rows), (m, m_rows), (v, v_rows)):
            write_rows(target, rows, values)

    def _scattered_update(self, k: int, index: Tensor, grad: Tensor) -> None:
        """Exact: the row gradients scattered into the (zero) gradient table, the update on
        every row (rows outside the batch move by their momentum), the rows zeroed again."""
        table = self._grad_tables[k]
        # index_add_: rows repeat (pairs of one row, unique_rows's padding).
        table.index_add_(0, index, grad)
        self._fused_update(self.params[k], self.exp_avg[k], self.exp_avg_sq[k], table)
        table.index_fill_(0, index, 0.0)

    def _fused_update(self, p: Tensor, m: Tensor, v: Tensor, grad: Tensor) -> None:
        """Adam's update (L2 weight decay added to the gradient) in torch's fused kernel."""
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

    def _fused_update(self, p: Tensor, m: Tensor, v: Tensor, grad: Tensor) -> None:
        if self.weight_decay:
            grad = grad + self.weight_decay * p
        p.add_(grad, alpha=-self.lr)
