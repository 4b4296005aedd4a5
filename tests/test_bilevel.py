"""The bi-level step of UBO and its ablations, against closed forms and finite differences.

Everything runs in float64 on a tiny planted data set (12 users x 10 items), so the checks
can be tight. The methods are driven only through their public interface (constructor,
`step`, `state`, `load_state`); the reference is a functional re-implementation of the
training loss L2 with the exposure net m_a (Eq. 10 and Eq. 13), written out here with plain
torch ops:

    L_train(w, a) = sum (or mean) over the batch of -[y log(m p) + (1 - y) log(1 - m p)],
        p = sigmoid(w_u . w_i),
        m = r sigmoid(e_u . w_i) + (1 - r) theta_i,  r = sigmoid(w_i . g + b),  a = (e, g, b)
    w'(a) = w - eta dL_train(w, a)/dw                   (Eq. 15; batch-summed loss)
    UBO:    outer(a) = sum over validation pairs of log loss(w'_u . w'_i, y)   (m = 1)
    BiOpt2: outer(a) = L_train(w'(a), a) summed over the same batch           (m_bar, not 1)

m reads w_i as an input whose gradient is stopped (the paper's derivation, Eq. 16-17: the
inner gradient has no l_m dm/dw_i term), or, with `item_grad_through_exposure`, as a
differentiable argument; every test of a step runs both ways (`THROUGH`).

Adam's first step from zero moments is exact in closed form: with m1 = (1 - b1) g and
v1 = (1 - b2) g^2, bias correction gives m_hat = g and v_hat = g^2, so
    param <- param - lr * g / (|g| + eps),  eps = 1e-8.
For |g| >> eps that is -lr sign(g), which says nothing about |g|; but for |g| within a few
decades of eps the map is invertible, |g| = eps |r| / (1 - |r|) with r = -delta / lr, so a
step with a small inner learning rate eta (hypergradient ~ eta) reveals the library's
hypergradient itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from planted import planted_feedback
from torch import Tensor

from ubo_core.config import TrainConfig
from ubo_core.engine import Batch, TrainingTensors
from ubo_core.estimators import item_popularity_exposure, log_loss, low_variance_loss
from ubo_core.methods.alteropt import AlterOpt
from ubo_core.methods.base import Method, pair_dot
from ubo_core.methods.biopt2 import BiOpt2
from ubo_core.methods.exposure_mf import ExposureHyper
from ubo_core.methods.jointopt import JointOpt
from ubo_core.methods.noopt import NoOpt
from ubo_core.methods.ubo import UBO

ADAM_EPS = 1e-8  # torch.optim.Adam's default, which the library's Adam keeps
DEFAULTS = ExposureHyper()
THROUGH = pytest.mark.parametrize("through", [False, True], ids=["paper_path", "through_w_i"])
RELEVANCE = ("user_emb", "item_emb")
EXPOSURE = ("exposure_user_emb", "gate_weight", "gate_bias")

Params = tuple[Tensor, ...]
Outer = Callable[..., Tensor]


@pytest.fixture(scope="module")
def tiny_data():
    data, _, _ = planted_feedback(n_users=12, n_items=10, n_test_items=3, seed=3)
    return data


@contextmanager
def default_float64() -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def make_method(
    cls: type[Method], data, mode: str = "paper", hyper: ExposureHyper = DEFAULTS
) -> Method:
    """A float64 method (parameters and optimiser state are created under float64 default
    dtype) with non-degenerate parameters: init_std 0.5 and gate bias 0.3 instead of 0."""
    train = TrainConfig(dim=3, device="cpu", epochs=1, mode=mode, init_std=0.5)
    with default_float64():
        tensors = TrainingTensors(data, torch.device("cpu"))
        method = cls(tensors, train, hyper, torch.Generator().manual_seed(0))
    # The data tensors are float32 by design; float64 keeps the reference comparison exact
    # (binary_cross_entropy_with_logits computes in its label's dtype).
    tensors.labels = tensors.labels.double()
    tensors.train_weight = tensors.train_weight.double()
    tensors.val_labels = tensors.val_labels.double()
    state = method.state()
    assert set(state) == set(RELEVANCE + EXPOSURE)
    assert all(value.dtype == torch.float64 for value in state.values())
    state["gate_bias"] = torch.full_like(state["gate_bias"], 0.3)
    method.load_state(state)
    return method


def snapshot(method: Method) -> tuple[Params, Params]:
    state = method.state()
    w = tuple(state[name].clone() for name in RELEVANCE)
    a = tuple(state[name].clone() for name in EXPOSURE)
    return w, a


def theta_of(method: Method) -> Tensor:
    """theta_i of Eq. 12 as the library holds it (float32 values) in float64."""
    theta = method.exposure_net.theta
    expected = item_popularity_exposure(method.tensors.item_popularity)
    torch.testing.assert_close(theta.double(), expected, rtol=1e-6, atol=1e-7)
    return theta.double()


def all_pairs_batch(method: Method) -> Batch:
    """Paper mode: every training pair in one batch."""
    t = method.tensors
    index = t.pair_index
    users, items = index // t.n_items, index % t.n_items
    return Batch(users, items, t.labels.view(-1)[index])


def block_batch(method: Method) -> Batch:
    """Dense mode: one block of every user against all items, held-out pairs weighted 0."""
    t = method.tensors
    users = torch.arange(t.n_users)
    return Batch(users, None, t.labels[users], t.train_weight[users])


def make_batch(method: Method, mode: str) -> Batch:
    return all_pairs_batch(method) if mode == "paper" else block_batch(method)


def path(through: bool, **knobs) -> ExposureHyper:
    """The default knobs with the gradient path `through` (and `knobs`)."""
    return ExposureHyper(item_grad_through_exposure=through, **knobs)


def inner_lr(hyper: ExposureHyper, mode: str) -> float:
    return hyper.inner_lr if mode == "paper" else hyper.dense_inner_lr


def exposure_lr(hyper: ExposureHyper, mode: str) -> float:
    return hyper.exposure_lr if mode == "paper" else hyper.dense_exposure_lr


# -- the functional reference ---------------------------------------------------------------
def ref_train_loss(
    w: Params, a: Params, theta: Tensor, batch: Batch, reduce: str, through: bool
) -> Tensor:
    user_emb, item_emb = w
    exp_user, gate_weight, gate_bias = a
    m_items = item_emb if through else item_emb.detach()  # w_i as m_a's input
    if batch.items is None:  # a block: (B, M)
        logits = user_emb[batch.users] @ item_emb.T
        personal = torch.sigmoid(exp_user[batch.users] @ m_items.T)
        gate_rows = m_items
        theta_b = theta
    else:  # pairs: (B,)
        logits = (user_emb[batch.users] * item_emb[batch.items]).sum(-1)
        gate_rows = m_items[batch.items]
        personal = torch.sigmoid((exp_user[batch.users] * gate_rows).sum(-1))
        theta_b = theta[batch.items]
    gate = torch.sigmoid(gate_rows @ gate_weight[:, 0] + gate_bias[0])
    m = gate * personal + (1 - gate) * theta_b
    p = torch.sigmoid(logits)
    y = batch.labels
    per_pair = -(y * torch.log(m * p) + (1 - y) * torch.log(1 - m * p))
    weight = torch.ones_like(per_pair) if batch.weight is None else batch.weight
    total = (per_pair * weight).sum()
    return total if reduce == "sum" else total / weight.sum()


def ref_unrolled(
    w: Params, a: Params, theta: Tensor, batch: Batch, eta: float, through: bool
) -> Params:
    """w' = w - eta dL_train(w, a)/dw (Eq. 15), differentiable in a."""
    w_leaf = tuple(x.detach().clone().requires_grad_(True) for x in w)
    loss = ref_train_loss(w_leaf, a, theta, batch, "sum", through)
    grads = torch.autograd.grad(loss, w_leaf, create_graph=True)
    return tuple(x - eta * g for x, g in zip(w_leaf, grads, strict=True))


def ref_val_loss(w: Params, tensors: TrainingTensors) -> Tensor:
    user_emb, item_emb = w
    s = (user_emb[tensors.val_users] * item_emb[tensors.val_items]).sum(-1)
    y = tensors.val_labels
    return -(y * F.logsigmoid(s) + (1 - y) * F.logsigmoid(-s)).sum()


def ubo_outer(w, a, theta, batch, eta, tensors, through) -> Tensor:
    return ref_val_loss(ref_unrolled(w, a, theta, batch, eta, through), tensors)


def biopt2_outer(w, a, theta, batch, eta, tensors, through) -> Tensor:
    w_next = ref_unrolled(w, a, theta, batch, eta, through)
    return ref_train_loss(w_next, a, theta, batch, "sum", through)


OUTER: dict[type[Method], Outer] = {UBO: ubo_outer, BiOpt2: biopt2_outer}


def ref_hypergradient(
    outer: Outer, w, a, theta, batch, eta, tensors, through
) -> tuple[Tensor, Params]:
    a_leaf = tuple(x.detach().clone().requires_grad_(True) for x in a)
    value = outer(w, a_leaf, theta, batch, eta, tensors, through)
    return value.detach(), torch.autograd.grad(value, a_leaf)


def ref_gradient(
    w: Params, a: Params, theta: Tensor, batch: Batch, wrt: str, through: bool
) -> Params:
    """Gradient of the batch-mean L_train w.r.t. w or a at (w, a)."""
    leaves = [x.clone().requires_grad_(True) for x in (w if wrt == "w" else a)]
    if wrt == "w":
        loss = ref_train_loss(tuple(leaves), a, theta, batch, "mean", through)
    else:
        loss = ref_train_loss(w, tuple(leaves), theta, batch, "mean", through)
    return torch.autograd.grad(loss, leaves)


def finite_difference(outer: Outer, w, a, theta, batch, eta, tensors, through, h) -> Params:
    """Central differences of a -> outer(a), one coordinate of a at a time."""
    result = []
    for k, block in enumerate(a):
        grad = torch.zeros_like(block)
        for j in range(block.numel()):
            values = []
            for sign in (1.0, -1.0):
                shifted = [x.clone() for x in a]
                shifted[k].view(-1)[j] += sign * h
                value = outer(w, tuple(shifted), theta, batch, eta, tensors, through)
                values.append(float(value.detach()))
            grad.view(-1)[j] = (values[0] - values[1]) / (2 * h)
        result.append(grad)
    return tuple(result)


def adam_first_step(params: Params, grads: Params, lr: float) -> Params:
    return tuple(p - lr * g / (g.abs() + ADAM_EPS) for p, g in zip(params, grads, strict=True))


def gradient_from_adam_first_step(before: Params, after: Params, lr: float) -> Params:
    """Invert delta = -lr g / (|g| + eps): r = -delta / lr, g = eps r / (1 - |r|)."""
    grads = []
    for p0, p1 in zip(before, after, strict=True):
        r = -(p1 - p0) / lr
        assert float(r.abs().max()) < 1 - 1e-5, "saturated: |g| >> eps cannot be recovered"
        grads.append(ADAM_EPS * r / (1 - r.abs()))
    return tuple(grads)


def assert_params_close(actual: Params, expected: Params, atol: float = 1e-11) -> None:
    # atol: a gradient entry that is 0 in exact arithmetic may come out as +-1e-17 on one
    # side and 0 on the other; Adam turns that into a step of lr * 1e-9 = 1e-12.
    for x, y in zip(actual, expected, strict=True):
        torch.testing.assert_close(x, y, rtol=0.0, atol=atol)


def assert_relative_close(actual: Params, expected: Params, rtol: float) -> None:
    """max |actual - expected| <= rtol * max |expected| over all of a."""
    flat_a = torch.cat([x.reshape(-1) for x in actual])
    flat_e = torch.cat([x.reshape(-1) for x in expected])
    scale = float(flat_e.abs().max())
    assert scale > 0.0, "the check is vacuous: the expected gradient is 0"
    error = float((flat_a - flat_e).abs().max())
    assert error <= rtol * scale, f"max abs error {error:.3e} vs scale {scale:.3e}"


def flat(params: Params) -> Tensor:
    return torch.cat([x.reshape(-1) for x in params])


# -- the hypergradient ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "through"),
    [(UBO, False), (UBO, True), (BiOpt2, True)],
    ids=["ubo-paper_path", "ubo-through_w_i", "biopt2-through_w_i"],
)
@pytest.mark.parametrize("mode", ["paper", "dense"])
def test_reference_hypergradient_matches_finite_differences(tiny_data, cls, through, mode):
    """The reference hypergradient d outer(w'(a)) / da by autograd equals central differences
    of the scalar function a -> outer(w - eta dL_train(w, a)/dw) at the method's default eta.
    Central differences err by O(h^2 f''') ~ 1e-10 and O(eps_64 |f| / h) ~ 1e-11 at h = 1e-5,
    far below 1e-6 of the gradient's scale. (BiOpt2 on the paper's path evaluates m at a
    stop-gradient w'(a): its hypergradient is by definition not the derivative of one scalar
    function of a, so finite differences do not apply; its step is checked below.)"""
    method = make_method(cls, tiny_data, mode, path(through))
    batch = make_batch(method, mode)
    theta, tensors, eta = theta_of(method), method.tensors, inner_lr(DEFAULTS, mode)
    w0, a0 = snapshot(method)
    outer = OUTER[cls]
    _, ref_grad = ref_hypergradient(outer, w0, a0, theta, batch, eta, tensors, through)
    fd = finite_difference(outer, w0, a0, theta, batch, eta, tensors, through, h=1e-5)
    assert_relative_close(ref_grad, fd, rtol=1e-6)
    # Every part of a = (e_u, gate weight, gate bias) has a non-zero hypergradient.
    assert all(float(g.abs().max()) > 1e-8 for g in ref_grad)


@THROUGH
@pytest.mark.parametrize("cls", [UBO, BiOpt2], ids=["ubo", "biopt2"])
@pytest.mark.parametrize("mode", ["paper", "dense"])
def test_step_moves_a_by_adams_first_step_on_the_hypergradient(tiny_data, cls, mode, through):
    """One `step` at the default eta: a1 = a0 - lr_a g/(|g| + eps) with g the reference
    hypergradient at (w0, a0); the returned outer loss is the reference outer(a0)."""
    method = make_method(cls, tiny_data, mode, path(through))
    batch = make_batch(method, mode)
    theta, tensors, eta = theta_of(method), method.tensors, inner_lr(DEFAULTS, mode)
    w0, a0 = snapshot(method)
    losses = method.step(batch)
    _, a1 = snapshot(method)

    value, hypergrad = ref_hypergradient(OUTER[cls], w0, a0, theta, batch, eta, tensors, through)
    torch.testing.assert_close(losses["outer_loss"], value, rtol=1e-12, atol=0.0)
    assert_params_close(a1, adam_first_step(a0, hypergrad, exposure_lr(DEFAULTS, mode)))


@THROUGH
@pytest.mark.parametrize("mode", ["paper", "dense"])
def test_ubo_hypergradient_read_back_from_a_small_eta_step(tiny_data, mode, through):
    """With eta = 1e-7 the UBO hypergradient is O(eta) (largest entry ~1e-8 here), within
    reach of Adam's eps = 1e-8, so the library's own hypergradient can be read back from
    delta a (module docstring) and compared with the reference to 1e-6 relative: the
    inversion loses ~1e-16 / (1 - |r|) relative, and 1 - |r| >= 1e-5 is asserted. The
    reference is eta-generic code checked against finite differences above."""
    eta = 1e-7
    small = path(through, inner_lr=eta, dense_inner_lr=eta)
    method = make_method(UBO, tiny_data, mode, small)
    batch = make_batch(method, mode)
    theta, tensors = theta_of(method), method.tensors
    w0, a0 = snapshot(method)
    method.step(batch)
    _, a1 = snapshot(method)

    library_grad = gradient_from_adam_first_step(a0, a1, exposure_lr(small, mode))
    _, ref_grad = ref_hypergradient(ubo_outer, w0, a0, theta, batch, eta, tensors, through)
    assert 1e-9 < float(flat(ref_grad).abs().max()) < 1e-5
    assert_relative_close(library_grad, ref_grad, rtol=1e-6)


@THROUGH
@pytest.mark.parametrize("mode", ["paper", "dense"])
def test_ubo_step_is_bilevel_exposure_step_then_relevance_adam_step(tiny_data, mode, through):
    """UBO.step: a1 = a0 - lr_a g_a/(|g_a| + eps) with g_a the hypergradient at (w0, a0),
    then w1 = w0 - lr_w g_w/(|g_w| + eps) with g_w = d mean L_train(w0, a1) / dw; the
    returned train loss is mean L_train(w0, a1)."""
    method = make_method(UBO, tiny_data, mode, path(through))
    batch = make_batch(method, mode)
    theta, tensors, eta = theta_of(method), method.tensors, inner_lr(DEFAULTS, mode)
    w0, a0 = snapshot(method)
    losses = method.step(batch)
    w1, a1 = snapshot(method)

    _, hypergrad = ref_hypergradient(ubo_outer, w0, a0, theta, batch, eta, tensors, through)
    a1_expected = adam_first_step(a0, hypergrad, exposure_lr(DEFAULTS, mode))
    assert_params_close(a1, a1_expected)
    grad_w = ref_gradient(w0, a1_expected, theta, batch, "w", through)
    assert_params_close(w1, adam_first_step(w0, grad_w, method.train.step_lr))
    train_loss = ref_train_loss(w0, a1_expected, theta, batch, "mean", through)
    torch.testing.assert_close(losses["train_loss"], train_loss, rtol=1e-12, atol=0.0)


def test_hypergradient_is_zero_when_the_inner_step_misses_the_validation_rows(tiny_data):
    """L_val has m = 1, so it has no direct a term (the paper: "L_val does not explicitly
    contain any a term"); a acts only through w'. If the training batch touches none of the
    validation users' or items' rows, w'_u = w_u and w'_i = w_i on every validation pair, so
    d L_val(w'(a)) / da = 0 exactly and Adam's first step moves a by 0 / (0 + eps) = 0."""
    method = make_method(UBO, tiny_data)
    t = method.tensors
    users, items = t.pair_index // t.n_items, t.pair_index % t.n_items
    far = ~torch.isin(users, t.val_users) & ~torch.isin(items, t.val_items)
    assert int(far.sum()) >= 10
    batch = Batch(users[far], items[far], t.labels[users[far], items[far]])
    w0, a0 = snapshot(method)

    method.step(batch)
    w1, a1 = snapshot(method)

    assert_params_close(a1, a0, atol=0.0)
    assert not torch.equal(w1[0], w0[0])  # the relevance step did happen


# -- Eq. 16 and Eq. 17, with the per-pair exposure m as a free variable ------------------------
# u = 0 likes i1 = 1 and dislikes i2 = 2; u1 = 1 likes i = 0 and u2 = 2 dislikes it (Sec. 2);
# the one training pair is (u, i) = (0, 0).
PAPER_VAL_PAIRS = [(0, 1, 1.0), (0, 2, 0.0), (1, 0, 1.0), (2, 0, 0.0)]


def random_embeddings(seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    user_emb = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    item_emb = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    return user_emb, item_emb


def exposure_hypergradient(user_emb, item_emb, val_pairs, train_label, m_value, eta):
    """d L_val(w'(m)) / dm for the one training pair (0, 0) with free exposure m, with the
    library's low_variance_loss (inner, summed) and log_loss (outer, summed)."""
    m = torch.tensor([m_value], dtype=torch.float64, requires_grad=True)
    u = user_emb.clone().requires_grad_(True)
    i = item_emb.clone().requires_grad_(True)
    pair = torch.tensor([0])
    label = torch.tensor([train_label], dtype=torch.float64)
    inner = low_variance_loss(pair_dot(u, i, pair, pair), m, label).sum()
    grad_u, grad_i = torch.autograd.grad(inner, (u, i), create_graph=True)
    u_next, i_next = u - eta * grad_u, i - eta * grad_i
    vu = torch.tensor([p[0] for p in val_pairs])
    vi = torch.tensor([p[1] for p in val_pairs])
    vy = torch.tensor([p[2] for p in val_pairs], dtype=torch.float64)
    outer = log_loss(pair_dot(u_next, i_next, vu, vi), vy).sum()
    (grad_m,) = torch.autograd.grad(outer, m)
    return float(grad_m), u_next.detach(), i_next.detach()


@pytest.mark.parametrize("m_value", [0.05, 0.4, 0.9])
def test_eq16_no_hypergradient_through_the_exposure_of_a_training_positive(m_value):
    """Eq. 16: for a training pair with R~ = 1, L2 = -log m - log p, so dL2/dw = -dlog p/dw
    does not depend on m: w' and hence L_val(w') are constant in m, d L_val / d m = 0 exactly
    (the (1 - y) log(1 - m p) term enters multiplied by exactly 0)."""
    user_emb, item_emb = random_embeddings(0)
    grad_m, _, _ = exposure_hypergradient(user_emb, item_emb, PAPER_VAL_PAIRS, 1.0, m_value, 0.5)
    assert grad_m == 0.0


@pytest.mark.parametrize("m_value", [0.05, 0.4, 0.9])
@pytest.mark.parametrize("seed", [0, 1])
def test_eq17_hypergradient_through_the_exposure_of_a_training_negative(m_value, seed):
    """Eq. 17, exact for one unrolled step. The negative pair's inner gradient is
        dL2/dw_u = g w_i, dL2/dw_i = g w_u,  g = m s(R) / (1 - m sigma(R)),
    R = w_u . w_i, s(R) = sigma(R) sigma(-R); so dg/dm = s(R) / (1 - m sigma(R))^2
    (d/dm [m s / (1 - m sigma)] = s (1 - m sigma + m sigma) / (1 - m sigma)^2), and
        dw'_u/dm = -eta dg/dm w_i,  dw'_i/dm = -eta dg/dm w_u.
    With R'_xy = w'_x . w'_y, the validation gradients at w' are
        dL_val/dw'_u = -sigma(-R'_{u i1}) w_i1 + sigma(R'_{u i2}) w_i2,
        dL_val/dw'_i = -sigma(-R'_{u1 i}) w_u1 + sigma(R'_{u2 i}) w_u2
    (i1, i2, u1, u2 are not in the training batch, so w' = w on their rows), hence
        dL_val/dm = eta s(R)/(1 - m sigma(R))^2 [w_i1.w_i sigma(-R'_{u i1})
                    - w_i2.w_i sigma(R'_{u i2}) + w_u1.w_u sigma(-R'_{u1 i})
                    - w_u2.w_u sigma(R'_{u2 i})],
    the paper's Eq. 17 with the validation scores taken at w' (equal to first order in eta)."""
    eta = 0.3
    user_emb, item_emb = random_embeddings(seed)
    grad_m, u_next, i_next = exposure_hypergradient(
        user_emb, item_emb, PAPER_VAL_PAIRS, 0.0, m_value, eta
    )

    def sig(x: Tensor) -> float:
        return float(torch.sigmoid(x))

    w_u, w_i = user_emb[0], item_emb[0]
    w_i1, w_i2, w_u1, w_u2 = item_emb[1], item_emb[2], user_emb[1], user_emb[2]
    r = w_u @ w_i
    factor = eta * sig(r) * sig(-r) / (1 - m_value * sig(r)) ** 2
    bracket = (
        float(w_i1 @ w_i) * sig(-(u_next[0] @ i_next[1]))
        - float(w_i2 @ w_i) * sig(u_next[0] @ i_next[2])
        + float(w_u1 @ w_u) * sig(-(u_next[1] @ i_next[0]))
        - float(w_u2 @ w_u) * sig(u_next[2] @ i_next[0])
    )
    assert grad_m == pytest.approx(factor * bracket, rel=1e-10, abs=1e-14)
    assert abs(grad_m) > 1e-6


@pytest.mark.parametrize("similar", [True, False])
def test_eq17_sign_argument(similar):
    """The paper's reading of Eq. 17's first term: with "u likes i1" as the only validation
    pair and i similar to i1 (w_i1 . w_i > 0), dL_val/dm = factor * w_i1.w_i sigma(-R'_{u i1})
    with factor > 0, so it is positive and gradient descent lowers m_ui: R~_ui = 0 is
    explained by i not having been exposed. With w_i1 = -w_i (dissimilar) the sign flips."""
    user_emb, item_emb = random_embeddings(2)
    item_emb[1] = item_emb[0] if similar else -item_emb[0]
    grad_m, _, _ = exposure_hypergradient(user_emb, item_emb, [(0, 1, 1.0)], 0.0, 0.5, 0.3)
    assert grad_m != 0.0 and (grad_m > 0) == similar


# -- the ablations differ only in their step ------------------------------------------------
@THROUGH
def test_jointopt_step_is_one_adam_step_of_w_and_a_on_the_training_loss(tiny_data, through):
    """(w1, a1) = (w0, a0) - lr g/(|g| + eps), g = grad of mean L_train at (w0, a0), with
    lr_w = train.step_lr and lr_a = exposure_lr; the returned loss is mean L_train(w0, a0)."""
    method = make_method(JointOpt, tiny_data, "paper", path(through))
    batch = all_pairs_batch(method)
    theta = theta_of(method)
    w0, a0 = snapshot(method)
    losses = method.step(batch)
    w1, a1 = snapshot(method)

    grad_w = ref_gradient(w0, a0, theta, batch, "w", through)
    grad_a = ref_gradient(w0, a0, theta, batch, "a", through)
    assert_params_close(w1, adam_first_step(w0, grad_w, method.train.step_lr))
    assert_params_close(a1, adam_first_step(a0, grad_a, DEFAULTS.exposure_lr))
    loss = ref_train_loss(w0, a0, theta, batch, "mean", through)
    torch.testing.assert_close(losses["train_loss"], loss, rtol=1e-12, atol=0.0)


@THROUGH
def test_alteropt_exposure_step_holds_w_fixed_then_w_steps_on_new_a(tiny_data, through):
    """a1 = Adam step on d mean L_train(w0, a)/da at a0 (w fixed); then
    w1 = Adam step on d mean L_train(w, a1)/dw at w0. JointOpt's w1 uses a0 instead, so the
    two differ in w1 (and UBO's a1 comes from the hypergradient instead)."""
    method = make_method(AlterOpt, tiny_data, "paper", path(through))
    batch = all_pairs_batch(method)
    theta = theta_of(method)
    w0, a0 = snapshot(method)
    method.step(batch)
    w1, a1 = snapshot(method)

    grad_a = ref_gradient(w0, a0, theta, batch, "a", through)
    a1_expected = adam_first_step(a0, grad_a, DEFAULTS.exposure_lr)
    assert_params_close(a1, a1_expected)
    grad_w = ref_gradient(w0, a1_expected, theta, batch, "w", through)
    assert_params_close(w1, adam_first_step(w0, grad_w, method.train.step_lr))


@THROUGH
@pytest.mark.parametrize("mode", ["paper", "dense"])
def test_noopt_keeps_a_and_steps_w_on_the_training_loss(tiny_data, mode, through):
    """The control: a never moves; w1 = Adam step on d mean L_train(w, a0)/dw at w0."""
    method = make_method(NoOpt, tiny_data, mode, path(through))
    batch = make_batch(method, mode)
    theta = theta_of(method)
    w0, a0 = snapshot(method)
    losses = method.step(batch)
    w1, a1 = snapshot(method)

    assert_params_close(a1, a0, atol=0.0)
    grad_w = ref_gradient(w0, a0, theta, batch, "w", through)
    assert_params_close(w1, adam_first_step(w0, grad_w, method.train.step_lr))
    loss = ref_train_loss(w0, a0, theta, batch, "mean", through)
    torch.testing.assert_close(losses["train_loss"], loss, rtol=1e-12, atol=0.0)


def test_the_gradient_path_decides_whether_l_m_reaches_the_item_embeddings(tiny_data):
    """On the paper's path dL_train/dw_i = l_s w_u only: the item gradient equals that of L2
    with m held as a constant; with `item_grad_through_exposure` it differs by l_m dm/dw_i.
    The user gradient is the same both ways (m does not depend on w_u)."""
    method = make_method(NoOpt, tiny_data)
    batch = all_pairs_batch(method)
    theta = theta_of(method)
    w0, a0 = snapshot(method)
    paper = ref_gradient(w0, a0, theta, batch, "w", False)
    through = ref_gradient(w0, a0, theta, batch, "w", True)
    torch.testing.assert_close(paper[0], through[0], rtol=1e-12, atol=0.0)
    assert float((paper[1] - through[1]).abs().max()) > 1e-4

    user_emb, item_emb = (x.clone().requires_grad_(True) for x in w0)
    m = ref_exposure(a0, item_emb.detach(), theta, batch)  # a number per pair, no w_i path
    logits = (user_emb[batch.users] * item_emb[batch.items]).sum(-1)
    loss = low_variance_loss(logits, m, batch.labels).mean()
    expected = torch.autograd.grad(loss, [user_emb, item_emb])
    assert_params_close(paper, tuple(expected), atol=1e-14)


@THROUGH
def test_biopt2_step_uses_l2_at_the_unrolled_weights_on_the_same_batch(tiny_data, through):
    """BiOpt2's outer loss is sum L2(w'(a), m_a) over the training batch itself (m_bar, not
    1; the validation set plays no part), its a-step is Adam's first step on the hypergradient
    of that, and then w steps on mean L_train(w0, a1). With eta = 1 the full hypergradient and
    its direct term alone (d L2(w', a)/da at fixed w') differ in sign on several entries
    (asserted), so a step that dropped the path through w' would fail the a1 check."""
    eta = 1.0
    hyper = path(through, inner_lr=eta)
    method = make_method(BiOpt2, tiny_data, "paper", hyper)
    batch = all_pairs_batch(method)
    theta, tensors = theta_of(method), method.tensors
    w0, a0 = snapshot(method)
    losses = method.step(batch)
    w1, a1 = snapshot(method)

    value, hypergrad = ref_hypergradient(biopt2_outer, w0, a0, theta, batch, eta, tensors, through)
    torch.testing.assert_close(losses["outer_loss"], value, rtol=1e-12, atol=0.0)
    a1_expected = adam_first_step(a0, hypergrad, hyper.exposure_lr)
    assert_params_close(a1, a1_expected)
    grad_w = ref_gradient(w0, a1_expected, theta, batch, "w", through)
    assert_params_close(w1, adam_first_step(w0, grad_w, method.train.step_lr))

    w_next = tuple(x.detach() for x in ref_unrolled(w0, a0, theta, batch, eta, through))
    a_leaf = tuple(x.clone().requires_grad_(True) for x in a0)
    direct_loss = ref_train_loss(w_next, a_leaf, theta, batch, "sum", through)
    direct = torch.autograd.grad(direct_loss, a_leaf)
    assert int((torch.sign(flat(direct)) != torch.sign(flat(hypergrad))).sum()) >= 3
    ubo_value = ubo_outer(w0, a0, theta, batch, eta, tensors, through).detach()
    assert float(value) != pytest.approx(float(ubo_value))


@pytest.mark.parametrize("mode", ["paper", "dense"])
def test_sgd_outer_step_is_the_papers_gradient_step(tiny_data, mode):
    """`exposure_optimizer: sgd`: a1 = a0 - eta' g, g the reference hypergradient (the
    paper's "gradient descent step with the outer loop learning rate eta'")."""
    hyper = path(False, exposure_optimizer="sgd", exposure_lr=0.5, dense_exposure_lr=0.5)
    method = make_method(UBO, tiny_data, mode, hyper)
    batch = make_batch(method, mode)
    theta, tensors, eta = theta_of(method), method.tensors, inner_lr(hyper, mode)
    w0, a0 = snapshot(method)
    method.step(batch)
    _, a1 = snapshot(method)
    _, hypergrad = ref_hypergradient(ubo_outer, w0, a0, theta, batch, eta, tensors, False)
    expected = tuple(a - 0.5 * g for a, g in zip(a0, hypergrad, strict=True))
    assert_params_close(a1, expected, atol=1e-14)
    assert float(flat(hypergrad).abs().max()) > 1e-6


def test_gate_init_bias_starts_the_exposure_at_popularity(tiny_data):
    """gate_init_bias -4 puts r = sigmoid(w_i . g - 4) near 0.018, so m_a starts within 0.02
    of theta_i (UMF's exposure, Eq. 12); the default 0 starts it near 0.25 + 0.5 theta_i."""
    for bias, start in ((-4.0, lambda t: t), (0.0, lambda t: 0.25 + 0.5 * t)):
        train = TrainConfig(dim=3, device="cpu", epochs=1, mode="paper")
        tensors = TrainingTensors(tiny_data, torch.device("cpu"))
        method = UBO(tensors, train, path(False, gate_init_bias=bias), torch.Generator())
        theta = method.exposure_net.theta
        exposure = method.exposure(torch.arange(tensors.n_users)).detach()
        assert float((exposure - start(theta)).abs().max()) < 0.03


# -- Eq. 17 inside the library's step ----------------------------------------------------------
def ref_exposure(a: Params, item_emb: Tensor, theta: Tensor, batch: Batch) -> Tensor:
    exp_user, gate_weight, gate_bias = a
    item_rows = item_emb[batch.items]
    gate = torch.sigmoid(item_rows @ gate_weight[:, 0] + gate_bias[0])
    personal = torch.sigmoid((exp_user[batch.users] * item_rows).sum(-1))
    return gate * personal + (1 - gate) * theta[batch.items]


@THROUGH
def test_ubo_hypergradient_is_eq17_times_dm_da(tiny_data, through):
    """On the paper's path, UBO's hypergradient for a batch of one training negative (u, i) is
    the chain rule through that pair's exposure: dL_val/da = (dL_val/dm) dm/da, with dL_val/dm
    the free-m hypergradient that Eq. 17 spells out (checked in closed form above) over the
    method's validation set. With `item_grad_through_exposure` the step differs from it:
    w'_i then also moves by -eta l_m dm/dw_i, a second path from a to L_val."""
    eta = 1e-6
    method = make_method(UBO, tiny_data, "paper", path(through, inner_lr=eta))
    t = method.tensors
    # u a validation user and i another validation user's item: both rows reach L_val.
    u = int(t.val_users[0])
    i = int(t.val_items[t.val_users != u][0])
    batch = Batch(torch.tensor([u]), torch.tensor([i]), torch.zeros(1, dtype=torch.float64))
    theta = theta_of(method)
    w0, a0 = snapshot(method)
    method.step(batch)
    _, a1 = snapshot(method)
    library_grad = gradient_from_adam_first_step(a0, a1, DEFAULTS.exposure_lr)

    a_leaf = tuple(x.clone().requires_grad_(True) for x in a0)
    m = ref_exposure(a_leaf, w0[1], theta, batch)
    dm_da = torch.autograd.grad(m.sum(), a_leaf)
    grad_m = free_m_hypergradient(w0, (u, i), float(m), eta, t)
    expected = tuple(grad_m * g for g in dm_da)
    if through:
        error = float((flat(library_grad) - flat(expected)).abs().max())
        assert error > 1e-3 * float(flat(expected).abs().max())
    else:
        assert_relative_close(library_grad, expected, rtol=1e-6)


def free_m_hypergradient(w: Params, pair: tuple[int, int], m_value: float, eta, tensors):
    """d L_val(w'(m)) / dm for one training negative `pair` with free exposure m (the
    library's low_variance_loss inside, the summed log loss on the validation set outside)."""
    m = torch.tensor([m_value], dtype=torch.float64, requires_grad=True)
    u_emb, i_emb = (x.clone().requires_grad_(True) for x in w)
    users, items = torch.tensor([pair[0]]), torch.tensor([pair[1]])
    inner = low_variance_loss(pair_dot(u_emb, i_emb, users, items), m, torch.zeros(1)).sum()
    grad_u, grad_i = torch.autograd.grad(inner, (u_emb, i_emb), create_graph=True)
    w_next = (u_emb - eta * grad_u, i_emb - eta * grad_i)
    (grad_m,) = torch.autograd.grad(ref_val_loss(w_next, tensors), m)
    return float(grad_m)


def test_the_five_exposure_methods_start_from_the_same_state(tiny_data):
    """Same seed -> same initial (w, a) for UBO, JointOpt, AlterOpt, BiOpt2 and NoOpt, so the
    tests above compare steps from one state, and the methods differ only in `step`."""
    classes = (UBO, JointOpt, AlterOpt, BiOpt2, NoOpt)
    states = [make_method(cls, tiny_data).state() for cls in classes]
    for state in states[1:]:
        assert set(state) == set(states[0])
        for name, value in state.items():
            assert torch.equal(value, states[0][name])
