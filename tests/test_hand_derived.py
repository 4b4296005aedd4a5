"""Paper mode's hand-derived steps against autograd, and the row optimiser against torch's.

Paper mode computes its gradients in closed form (`hand_derived = True`, the default): the
slopes of the estimators (ubo_core/estimators.py), the per-pair steps of UMF and RelMF
(methods/pointwise.py) and of the four L2 + m_a methods, UBO's hypergradient included
(methods/exposure_mf.py). Each is compared here with the autograd form of the same step
(`hand_derived = False`), from the same state on the same batch, in float64, where the two
must agree to rounding. tests/test_bilevel.py checks the (default, hand-derived) steps against
an independent functional reference and finite differences as well.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import pytest
import torch
from planted import planted_feedback
from torch import nn

from ubo_core import fused
from ubo_core.config import TrainConfig
from ubo_core.engine import (
    BlockSampler,
    BlockTripleSampler,
    PairSampler,
    TrainingTensors,
    TripleSampler,
)
from ubo_core.estimators import (
    ips_block,
    ips_cells,
    ips_loss,
    ips_loss_slope,
    low_variance_block,
    low_variance_cells,
    low_variance_derivatives,
    low_variance_loss,
    low_variance_slope,
    mixed_exposure_cells,
    mixed_exposure_hyper_coefficients,
    mixed_exposure_slope,
)
from ubo_core.methods import METHODS
from ubo_core.methods.rows import RowAdam, RowSGD, unique_rows

HAND_DERIVED = ("umf", "relmf", "bpr", "ubo", "jointopt", "alteropt", "biopt2", "noopt")
EXPOSURE_MF = ("ubo", "jointopt", "alteropt", "biopt2", "noopt")


def random_pairs(n: int = 400, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logit = torch.randn(n, generator=gen, dtype=torch.float64) * 3
    exposure = torch.rand(n, generator=gen, dtype=torch.float64) * 0.98 + 0.01
    label = (torch.rand(n, generator=gen, dtype=torch.float64) < 0.4).double()
    return logit, exposure, label


def test_ips_slope_is_autograds():
    logit, exposure, label = random_pairs()
    logit.requires_grad_()
    (expected,) = torch.autograd.grad(ips_loss(logit, exposure, label).sum(), logit)
    torch.testing.assert_close(ips_loss_slope(logit.detach(), exposure, label), expected)


@pytest.mark.parametrize("saturated", [False, True], ids=["interior", "clamped"])
def test_low_variance_derivatives_are_autograds(saturated):
    """First and second partials in s and m, including where the loss's clamps cut the
    gradient (m p -> 1 with sigmoid(s) rounding to 1; m below the floor)."""
    logit, exposure, label = random_pairs()
    if saturated:
        logit[:100] = 40.0  # sigmoid = 1 in float64: 1 - m p hits the floor when m = 1
        exposure[:50] = 1.0
        exposure[100:150] = 1e-13
    logit.requires_grad_()
    exposure.requires_grad_()
    loss = low_variance_loss(logit, exposure, label).sum()
    d_s, d_m = torch.autograd.grad(loss, [logit, exposure], create_graph=True)
    # Pairs are independent, so the gradient of a sum is the per-pair derivative.
    (d_sm,) = torch.autograd.grad(d_s.sum(), [exposure], retain_graph=True)
    (d_mm,) = torch.autograd.grad(d_m.sum(), [exposure])
    mine = low_variance_derivatives(logit.detach(), exposure.detach(), label, second_order=True)
    torch.testing.assert_close(mine.s, d_s.detach())
    torch.testing.assert_close(mine.m, d_m.detach())
    torch.testing.assert_close(mine.sm, d_sm)
    torch.testing.assert_close(mine.mm, d_mm)
    torch.testing.assert_close(low_variance_slope(logit.detach(), exposure.detach(), label), mine.s)
    if saturated:
        assert float(mine.m[:50].abs().min()) == 0.0 or bool((label[:50] == 1).all())


@pytest.mark.parametrize("saturated", [False, True], ids=["interior", "clamped"])
def test_dense_block_forms_equal_the_general_ones(saturated):
    """Dense mode's few-pass forms (`low_variance_block`, `ips_block`) and the single
    expressions ubo_core/fused.py compiles (`*_cells`) against the general per-pair forms: the
    same slopes, partials, exposure coefficients and (weighted, scaled) losses, clamped cells
    included."""
    logit, exposure, label = random_pairs()
    if saturated:
        logit[:100] = 40.0
        exposure[:50] = 1.0
        exposure[100:150] = 1e-13
    weight = (torch.arange(400) % 7 != 0).double()  # some held-out cells
    rows = torch.arange(400)  # the kernels read label[rows] and weight[rows]
    scale = 1.0 / weight.sum()
    # The mixed-exposure kernels form m = r q + (1 - r) theta themselves: a generic gate, and
    # the general partials at m as they compute it.
    gen = torch.Generator().manual_seed(1)
    personal_logit = torch.randn(400, generator=gen, dtype=torch.float64) * 3
    gate = torch.rand(400, generator=gen, dtype=torch.float64)
    theta = torch.rand(400, generator=gen, dtype=torch.float64)
    if saturated:  # m = 1 (1 - m p at its floor where p = 1) and m below the exposure floor
        personal_logit[:50], theta[:50] = 50.0, 1.0
        personal_logit[100:150], theta[100:150] = -50.0, 1e-13
    q = torch.sigmoid(personal_logit)
    m = gate * q + (1.0 - gate) * theta
    if saturated:
        assert bool((m < 1e-12).any()) and bool((1.0 - m * torch.sigmoid(logit) < 1e-7).any())
    at_m = low_variance_derivatives(logit, m, label, second_order=True)
    mixed = personal_logit, gate, theta, label
    close = {"rtol": 1e-12, "atol": 1e-15}
    slope, loss, coef_e, coef_gate = mixed_exposure_cells(logit, *mixed, weight, rows, scale, True)
    torch.testing.assert_close(slope, at_m.s * weight * scale, **close)
    loss_m = at_m.m * weight * scale
    torch.testing.assert_close(coef_e, loss_m * gate * q * (1 - q), **close)
    torch.testing.assert_close(coef_gate, loss_m * (q - theta) * gate * (1 - gate), **close)
    torch.testing.assert_close(
        mixed_exposure_slope(logit, *mixed, weight, rows), at_m.s * weight, **close
    )
    coupling = torch.randn(400, generator=gen, dtype=torch.float64)
    neg_eta = torch.tensor(-0.3, dtype=torch.float64)
    hyper_e, hyper_gate = mixed_exposure_hyper_coefficients(
        coupling, logit, *mixed, weight, rows, neg_eta
    )
    c = -0.3 * coupling * at_m.sm * weight
    torch.testing.assert_close(hyper_e, c * gate * q * (1 - q), **close)
    torch.testing.assert_close(hyper_gate, c * (q - theta) * gate * (1 - gate), **close)
    if not saturated:  # the loss reads log(m p): equal while m p is a normal number
        expected = (low_variance_loss(logit, m, label) * weight).sum() * scale
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    for form in (low_variance_block, low_variance_cells):
        slope, loss = form(logit.clone(), exposure, label, weight, rows, scale)
        expected = low_variance_slope(logit, exposure, label) * weight * scale
        torch.testing.assert_close(slope, expected)
        if not saturated:
            expected = (low_variance_loss(logit, exposure, label) * weight).sum() * scale
            torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    for form in (ips_block, ips_cells):
        slope, loss = form(logit.clone(), exposure, label, weight, rows, scale)
        torch.testing.assert_close(slope, ips_loss_slope(logit, exposure, label) * weight * scale)
        expected = (ips_loss(logit, exposure, label) * weight).sum() * scale
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_row_sgd_is_torch_sgd(weight_decay):
    """RowSGD (the paper's plain outer step): exactly torch.optim.SGD, lazy or not."""
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    tables = [nn.Parameter(start.clone()) for _ in range(3)]
    exact, lazy = RowSGD([tables[0]], 0.1, weight_decay, False), RowSGD([tables[1]], 0.1, 0.0, True)
    torch_sgd = torch.optim.SGD([tables[2]], lr=0.1, weight_decay=weight_decay)
    for _ in range(4):
        index = torch.randint(30, (12,), generator=gen)
        grad = torch.randn(12, 4, generator=gen, dtype=torch.float64)
        exact.step([(index, grad)])
        lazy.step([(index, grad)])
        torch_sgd.zero_grad()
        tables[2].grad = torch.zeros_like(start).index_add_(0, index, grad)
        torch_sgd.step()
    torch.testing.assert_close(tables[0].detach(), tables[2].detach(), rtol=1e-14, atol=1e-15)
    if weight_decay == 0.0:
        torch.testing.assert_close(tables[1].detach(), tables[2].detach(), rtol=1e-14, atol=1e-15)


def test_unique_rows_is_torch_unique_padded_to_the_index_size():
    """The distinct rows in order, then copies of the first up to the index's size (fixed
    shapes: no host synchronisation), by marking (small tables) and by sorting (large)."""
    gen = torch.Generator().manual_seed(0)
    for n_rows in (7, 1000, 15400, 200_000):
        index = torch.randint(n_rows, (1024,), generator=gen)
        rows, local = unique_rows(index, n_rows)
        expected_rows, expected_local = torch.unique(index, return_inverse=True)
        n = expected_rows.numel()
        assert rows.shape == index.shape and torch.equal(local, expected_local)
        assert torch.equal(rows[:n], expected_rows)
        assert bool((rows[n:] == expected_rows[0]).all())
        assert torch.equal(rows.index_select(0, local), index)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_row_adam_is_torch_adam(weight_decay):
    """lazy=False: exactly torch.optim.Adam (L2 decay in the gradient) on the whole table."""
    gen = torch.Generator().manual_seed(1)
    table = nn.Parameter(torch.randn(30, 4, generator=gen))
    reference = nn.Parameter(table.detach().clone())
    mine = RowAdam([table], 1e-2, weight_decay, lazy=False)
    torch_adam = torch.optim.Adam([reference], lr=1e-2, weight_decay=weight_decay)
    for _ in range(5):
        index = torch.randint(30, (12,), generator=gen)
        grad = torch.randn(12, 4, generator=gen)
        mine.step([(index, grad)])
        torch_adam.zero_grad()
        reference.grad = torch.zeros_like(reference).index_add_(0, index, grad)
        torch_adam.step()
    torch.testing.assert_close(table.detach(), reference.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_lazy_row_adam_is_adam_on_the_touched_rows(weight_decay):
    """lazy=True (through the fused kernel): Adam's update, with the step count of the whole
    table for bias correction, applied only to the rows the batch touches (duplicates summed);
    other rows and their moments do not move. That is torch.optim.SparseAdam's semantics,
    except that SparseAdam adds eps before its bias correction (compared loosely below)."""
    gen = torch.Generator().manual_seed(2)
    start = torch.randn(30, 4, generator=gen, dtype=torch.float64)
    table = nn.Parameter(start.clone())
    mine = RowAdam([table], 1e-2, weight_decay, lazy=True)
    ref = start.clone()
    exp_avg, exp_avg_sq = torch.zeros_like(ref), torch.zeros_like(ref)
    embedding = nn.Embedding(30, 4, sparse=True, dtype=torch.float64)
    embedding.weight.data.copy_(start)
    sparse_adam = torch.optim.SparseAdam(embedding.parameters(), lr=1e-2)
    touched = torch.zeros(30, dtype=torch.bool)
    for step in range(1, 6):
        index = torch.randint(25, (12,), generator=gen)  # rows 25..29 are never touched
        grad = torch.randn(12, 4, generator=gen, dtype=torch.float64)
        touched[index] = True
        mine.step([(index, grad)])

        rows = torch.unique(index)
        g = torch.zeros_like(ref).index_add_(0, index, grad)[rows] + weight_decay * ref[rows]
        exp_avg[rows] = 0.9 * exp_avg[rows] + 0.1 * g
        exp_avg_sq[rows] = 0.999 * exp_avg_sq[rows] + 0.001 * g * g
        denom = (exp_avg_sq[rows] / (1 - 0.999**step)).sqrt() + 1e-8
        ref[rows] -= 1e-2 / (1 - 0.9**step) * exp_avg[rows] / denom

        sparse_adam.zero_grad()
        (embedding(index) * grad).sum().backward()
        sparse_adam.step()
    torch.testing.assert_close(table.detach(), ref, rtol=1e-12, atol=1e-14)
    assert torch.equal(table.detach()[~touched], start[~touched])
    assert not torch.equal(table.detach()[touched], start[touched])
    if weight_decay == 0.0:
        torch.testing.assert_close(table.detach(), embedding.weight.detach(), rtol=0, atol=1e-6)


def make_pair(
    name: str,
    data,
    optimizer: str,
    weight_decay: float = 0.0,
    seed: int = 0,
    mode: str = "paper",
    elementwise: str = "eager",
    **knobs,
):
    """Two float64 copies of one method from the same state: hand-derived and autograd;
    `knobs` are the method's own (ExposureHyper's for the L2 + m_a methods)."""
    train = TrainConfig(
        dim=5,
        device="cpu",
        epochs=1,
        mode=mode,
        block_users=6,
        init_std=0.5,
        optimizer=optimizer,
        batch_size=64,
        val_batch_size=4,  # below the 8 validation pairs: each step draws its own batch
        weight_decay=weight_decay,
        elementwise=elementwise,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        tensors = TrainingTensors(data, torch.device("cpu"))
        tensors.labels = tensors.labels.double()
        tensors.val_labels = tensors.val_labels.double()
        assert tensors.val_users.numel() > train.val_batch_size
        cls = METHODS[name]
        hyper = cls.Hyper()
        if hasattr(hyper, "exposure_weight_decay"):
            hyper = dataclasses.replace(hyper, exposure_weight_decay=weight_decay, **knobs)
        copies = []
        for hand in (True, False):
            method = cls(tensors, train, hyper, torch.Generator().manual_seed(seed))
            method.hand_derived = hand
            copies.append(method)
    finally:
        torch.set_default_dtype(previous)
    if hasattr(copies[0], "gate_bias"):
        for method in copies:  # away from the symmetric start, so every term is non-zero
            method.gate_bias.data.fill_(0.3)
    return tensors, train, copies


@contextmanager
def autograd_forbidden() -> Iterator[None]:
    """Fails any torch.autograd.grad call: proves a step took the hand-derived path."""

    def refuse(*args, **kwargs):
        raise AssertionError("the hand-derived step called torch.autograd.grad")

    original = torch.autograd.grad
    torch.autograd.grad = refuse
    try:
        yield
    finally:
        torch.autograd.grad = original


CASES = [
    *((name, {}) for name in HAND_DERIVED),
    # The other gradient path (Eq. 13's w_i inside m_a differentiated) and the plain outer step.
    *((name, {"item_grad_through_exposure": True}) for name in EXPOSURE_MF),
    *((name, {"exposure_optimizer": "sgd"}) for name in ("ubo", "jointopt")),
]


@pytest.mark.parametrize("mode", ["paper", "dense", "dense_compiled"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01], ids=["no_decay", "decay"])
@pytest.mark.parametrize("optimizer", ["adam", "lazy_adam"])
@pytest.mark.parametrize(("name", "knobs"), CASES, ids=["-".join([n, *k]) for n, k in CASES])
def test_hand_derived_steps_equal_autograd_steps(name, knobs, optimizer, weight_decay, mode):
    """Ten steps (paper mode: batches of 64 pairs or BPR triples; dense mode: blocks of 6
    users against all items, or their BPR triples; UBO's validation batches of 4 drawn from
    the method's generator) give the same parameters and losses both ways, and the
    hand-derived copy never calls autograd (BiOpt2's bi-level step is autograd, and so is
    dense mode with `item_grad_through_exposure`). "dense_compiled": the same with dense
    mode's elementwise passes compiled (ubo_core/fused.py), for the methods that use them."""
    elementwise = "compiled" if mode == "dense_compiled" else "eager"
    mode = "dense" if mode == "dense_compiled" else mode
    if elementwise == "compiled":
        if name in ("bpr", "cjmf") or knobs.get("item_grad_through_exposure"):
            pytest.skip("no fused kernel on this path")
        if not fused.compiler_present(torch.device("cpu")):
            pytest.skip("no C++ compiler for torch.compile")
    data, _, _ = planted_feedback(n_users=20, n_items=15, n_test_items=4, seed=5)
    tensors, train, (hand, auto) = make_pair(
        name, data, optimizer, weight_decay, 0, mode, elementwise, **knobs
    )
    start = hand.state()["user_emb"].clone()
    sampler_class = {
        ("paper", False): PairSampler,
        ("paper", True): TripleSampler,
        ("dense", False): BlockSampler,
        ("dense", True): BlockTripleSampler,
    }[mode, name == "bpr"]
    size = train.batch_size if mode == "paper" else train.block_users
    sampler = sampler_class(tensors, size, torch.Generator().manual_seed(9))
    batches = itertools.chain.from_iterable(sampler.epoch() for _ in range(10))
    on_autograd = name == "biopt2" or (mode == "dense" and knobs.get("item_grad_through_exposure"))
    for _ in range(10):
        batch = next(batches)
        with nullcontext() if on_autograd else autograd_forbidden():
            hand_losses = hand.step(batch)
        auto_losses = auto.step(batch)
        for key, value in auto_losses.items():
            torch.testing.assert_close(hand_losses[key], value, rtol=1e-10, atol=1e-12)
    for key, value in auto.state().items():
        torch.testing.assert_close(hand.state()[key], value, rtol=1e-9, atol=1e-11)
    assert not torch.equal(hand.state()["user_emb"], start)  # the steps moved the parameters


@pytest.mark.parametrize("name", ["ubo", "alteropt"])
def test_reusing_the_exposure_steps_logits_changes_no_bit(name, monkeypatch):
    """Dense UBO and AlterOpt hand U W^T from their exposure-only step to the relevance step
    that follows on the same block (`ExposureMF._keep_logits`): the same numbers, bit for bit,
    as computing the GEMM again."""
    from ubo_core.methods.exposure_mf import ExposureMF
    from ubo_core.trainer import fit

    data = planted_feedback(n_users=40, n_items=30, n_test_items=5, seed=2)[0]
    train = TrainConfig(mode="dense", epochs=3, dim=4, block_users=8, device="cpu")

    def final_state():
        hyper = METHODS[name].Hyper()
        return fit(name, data, train, hyper, seed=0, progress=False).method.state()

    block_terms, reused = ExposureMF.block_terms, []

    def spy(self, batch):
        reused.append(self._kept_logits is not None and self._kept_logits[0] is batch)
        return block_terms(self, batch)

    monkeypatch.setattr(ExposureMF, "block_terms", spy)
    kept = final_state()
    assert sum(reused) == len(reused) // 2  # every relevance step reused its block's logits
    monkeypatch.setattr(ExposureMF, "_keep_logits", lambda self, batch, terms: None)
    recomputed = final_state()
    for key, value in recomputed.items():
        assert torch.equal(kept[key], value), key
