"""The full-parameter memory measures (issue of real-size models): the update state takes the AdamW moments without a
copy, and the long-vector paths (UPDATE_CHUNK slices: update rule, linearisation, dot products, the momentum part)
give the whole-vector numbers while forming no parameter-sized float64 temporaries."""

from __future__ import annotations

import pytest
import torch

from entropy_probe import update as update_module
from entropy_probe.optimizer_state import OptimizerState
from entropy_probe.update import FlatLayout, linearise, update_direction, zero_gradient_dot, zero_gradient_part

SHAPES = {"embed": (7, 5), "bias": (5,), "norm": (3,), "head": (5, 7)}
N = sum(torch.Size(s).numel() for s in SHAPES.values())  # 93 elements: 3 slices of 32 with UPDATE_CHUNK = 32


def _optimizer(gen: torch.Generator) -> OptimizerState:
    names = list(SHAPES)
    groups = [
        {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "names": ["embed", "head"]},
        {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "names": ["bias", "norm"]},
    ]
    order = groups[0]["names"] + groups[1]["names"]
    return OptimizerState(
        order,
        {n: 1e-3 * torch.randn(SHAPES[n], generator=gen) for n in names},
        {n: 1e-6 * torch.rand(SHAPES[n], generator=gen) for n in names},
        {n: 5.0 for n in names},
        groups,
        "test",
    )


def test_the_moments_are_one_buffer_the_update_state_reads_without_a_copy():
    gen = torch.Generator().manual_seed(0)
    optimizer = _optimizer(gen)
    layout = FlatLayout.from_named({n: torch.empty(SHAPES[n]) for n in optimizer.names}, optimizer.names)
    theta = {n: torch.randn(SHAPES[n], generator=gen) for n in optimizer.names}
    state = optimizer.flat(layout, theta)
    for moments, flat in ((optimizer.exp_avg, state.exp_avg), (optimizer.exp_avg_sq, state.exp_avg_sq)):
        assert flat.data_ptr() == moments[optimizer.names[0]].data_ptr()  # a view, not a copy
        assert torch.equal(flat, torch.cat([moments[n].reshape(-1) for n in optimizer.names]))
    other_order = FlatLayout.from_named({n: torch.empty(SHAPES[n]) for n in SHAPES}, list(SHAPES))
    copied = other_order.flatten(optimizer.exp_avg)  # not the buffer's order: concatenated
    assert copied.data_ptr() != state.exp_avg.data_ptr()
    assert torch.equal(copied, torch.cat([optimizer.exp_avg[n].reshape(-1) for n in SHAPES]))


@pytest.mark.parametrize("clip", [None, 0.5, 1e6], ids=["no-clip", "clipping", "clip-inactive"])
def test_long_float32_vectors_give_the_whole_vector_numbers(monkeypatch, clip):
    """g and X̄ in float32 (a float32 model): Δθ and u (float32, the passes' dtype: `long_dtype`) taken in slices —
    u from the closed-form derivative — equal the whole-vector float64 computation (u by autograd) to float32
    rounding of their size; u written over g is the same; the streamed dot and momentum part equal the plain sums to
    float64 round-off."""
    gen = torch.Generator().manual_seed(1)
    optimizer = _optimizer(gen)
    layout = FlatLayout.from_named({n: torch.empty(SHAPES[n]) for n in optimizer.names}, optimizer.names)
    state = optimizer.flat(layout, {n: torch.randn(SHAPES[n], generator=gen) for n in optimizer.names})
    g = torch.randn(N, generator=gen)
    xbar = torch.randn(N, generator=gen)
    whole_delta = update_direction("adam_step", g.double(), state, clip)
    whole_u = linearise("adam_step", g.double(), xbar.double(), state, clip)
    whole_momentum = (xbar.double() * zero_gradient_part("adam_step", state)).sum()
    monkeypatch.setattr(update_module, "UPDATE_CHUNK", 32)
    delta = update_direction("adam_step", g, state, clip)
    u = linearise("adam_step", g, xbar, state, clip)
    assert delta.dtype == torch.float32 and u.dtype == torch.float32
    assert float((delta.double() - whole_delta).norm()) <= 1e-6 * float(whole_delta.norm())
    assert float((u.double() - whole_u).norm()) <= 1e-6 * float(whole_u.norm())
    g_copy = g.clone()
    assert linearise("adam_step", g_copy, xbar, state, clip, out=g_copy) is g_copy  # u written over g
    assert torch.equal(g_copy, u)
    scale = float((xbar.double() * whole_delta).abs().sum())
    assert abs(float(state.dot(xbar, delta)) - float((xbar.double() * delta).sum())) <= 1e-14 * scale
    momentum = zero_gradient_dot("adam_step", xbar, state)
    assert abs(float(momentum) - float(whole_momentum)) <= 1e-14 * float(whole_momentum.abs() + scale)
    assert float(zero_gradient_dot("sgd", xbar, state)) == 0.0


def test_a_hyperparameter_of_two_groups_is_held_per_parameter(monkeypatch):
    """Over a long layout the weight decay of the Trainer's two groups is one value per parameter (`PerParameter`):
    the update rule, the linearisation, the momentum part, the leave-one-group-out values, the mean lr, a scaled lr
    and an AdamW step of the chains give the numbers of the same state held per element, bit for bit."""
    from dataclasses import replace

    from entropy_probe.update import PerParameter, adam_advance, leave_one_group_out

    gen = torch.Generator().manual_seed(2)
    optimizer = _optimizer(gen)
    optimizer.groups[1]["lr"] = 2e-3  # two lrs as well as two decays
    layout = FlatLayout.from_named({n: torch.empty(SHAPES[n]) for n in optimizer.names}, optimizer.names)
    theta = {n: torch.randn(SHAPES[n], generator=gen) for n in optimizer.names}
    monkeypatch.setattr(update_module, "UPDATE_CHUNK", 32)
    state = optimizer.flat(layout, theta)
    assert isinstance(state.weight_decay, PerParameter) and isinstance(state.lr, PerParameter)
    dense = state.dense()
    assert torch.equal(dense.weight_decay, state.weight_decay.dense()) and dense.weight_decay.shape == (N,)
    assert torch.equal(dense.weight_decay[:35], torch.full((35,), 0.01, dtype=torch.float64))  # embed
    g, xbar = torch.randn(N, generator=gen), torch.randn(N, generator=gen)
    for clip in (None, 0.5):
        assert torch.equal(update_direction("adam_step", g, state, clip), update_direction("adam_step", g, dense, clip))
        assert torch.equal(linearise("adam_step", g, xbar, state, clip), linearise("adam_step", g, xbar, dense, clip))
    assert torch.equal(zero_gradient_dot("adam_step", xbar, state), zero_gradient_dot("adam_step", xbar, dense))
    groups, shares = torch.randn(3, N, generator=gen), torch.tensor([1.0, 2.0, 3.0])
    loo = leave_one_group_out("adam_step", g.double(), groups, shares, xbar.double(), state, 0.5)
    assert torch.equal(loo, leave_one_group_out("adam_step", g.double(), groups, shares, xbar.double(), dense, 0.5))
    assert state.mean(state.lr) == dense.mean(dense.lr)
    assert torch.equal((state.lr * 0.5).dense(), dense.lr * 0.5)
    step, after = adam_advance(g.double(), replace(state), 0.5)
    step_dense, after_dense = adam_advance(g.double(), dense, 0.5)
    assert torch.equal(step, step_dense) and torch.equal(after.exp_avg, after_dense.exp_avg)


@pytest.mark.parametrize("rule", ["adam_step", "adam_precond", "sgd"])
def test_the_closed_form_derivative_is_autograds(rule):
    """`direction_derivative` (the long layouts' linearisation) = autograd through the rule, elementwise, in float64
    to 1e-12 — including elements with no state (m = v = 0, step 0) and a zero gradient there (v' = 0: the safe
    square root's zero slope)."""
    from entropy_probe.update import AdamState, _update_direction, direction_derivative

    gen = torch.Generator().manual_seed(3)
    n = 64
    exp_avg = 1e-3 * torch.randn(n, generator=gen, dtype=torch.float64)
    exp_avg_sq = 1e-6 * torch.rand(n, generator=gen, dtype=torch.float64)
    step = torch.full((n,), 7.0, dtype=torch.float64)
    x = 1e-3 * torch.randn(n, generator=gen, dtype=torch.float64)
    if rule == "adam_step":  # fresh elements: no state yet, one of them with a zero gradient
        exp_avg[:4], exp_avg_sq[:4], step[:4], x[0] = 0.0, 0.0, 0.0, 0.0
    hyper = [torch.full((n,), v, dtype=torch.float64) for v in (2e-3, 0.9, 0.999, 1e-8, 0.01)]
    theta = torch.randn(n, generator=gen, dtype=torch.float64)
    state = AdamState(theta, exp_avg, exp_avg_sq, step, *hyper)
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(_update_direction(rule, leaf, state, None).sum(), leaf)
    got = direction_derivative(rule, x, state)
    assert torch.isfinite(got).all()
    assert float((got - expected).abs().max()) <= 1e-12 * float(expected.abs().max())


def test_theta_of_a_long_layout_is_read_from_the_parameters_in_place(monkeypatch):
    """Over a long layout θ is a `FlatView` of the given tensors (no copy): its slices, across tensor boundaries,
    are the concatenation's, and Δθ is bit for bit the one from a flat copy of θ."""
    from entropy_probe.update import FlatView

    gen = torch.Generator().manual_seed(4)
    optimizer = _optimizer(gen)
    layout = FlatLayout.from_named({n: torch.empty(SHAPES[n]) for n in optimizer.names}, optimizer.names)
    theta = {n: torch.randn(SHAPES[n], generator=gen) for n in optimizer.names}
    copied = optimizer.flat(layout, theta)  # a short layout: θ flattened
    monkeypatch.setattr(update_module, "UPDATE_CHUNK", 32)
    state = optimizer.flat(layout, theta)
    assert isinstance(state.theta, FlatView) and not isinstance(copied.theta, FlatView)
    flat = torch.cat([theta[n].reshape(-1) for n in optimizer.names])
    for rows in (slice(0, 32), slice(30, 45), slice(32, 64), slice(90, 93), slice(0, N), slice(50, 50)):
        assert torch.equal(state.theta[rows], flat[rows])
    assert optimizer.names[:2] == ["embed", "head"]  # the 35 elements of embed, then head's
    assert state.theta[slice(36, 40)].data_ptr() == theta["head"].data_ptr() + 4  # inside one tensor: a view
    g = torch.randn(N, generator=gen)
    assert torch.equal(update_direction("adam_step", g, state, 0.5), update_direction("adam_step", g, copied, 0.5))


def test_backward_into_adds_each_gradient_into_the_flat_vector():
    """`passes.backward_into` = the flat autograd.grad gradients added in (float64 accumulator, float32 parameters;
    a parameter off the path adds nothing), with the parameters' own .grad left as it was; acc None discards them
    and still says whether any parameter got one."""
    from entropy_probe.passes import backward_into

    gen = torch.Generator().manual_seed(5)
    a = torch.nn.Parameter(torch.randn(3, 4, generator=gen))
    b = torch.nn.Parameter(torch.randn(4, generator=gen))
    unused = torch.nn.Parameter(torch.randn(2, generator=gen))
    b.grad = torch.full((4,), 7.0)  # a trainer's leftover gradient: untouched
    params = [a, b, unused]
    x = torch.randn(5, 3, generator=gen)
    acc = torch.ones(3 * 4 + 4 + 2, dtype=torch.float64)
    out = torch.tanh(x @ a) * b
    weights = torch.randn(5, 4, generator=gen)
    expected = torch.autograd.grad(out, [a, b], weights, retain_graph=True)
    assert backward_into(out, params, acc, weights, retain_graph=True)
    flat = torch.cat([expected[0].reshape(-1), expected[1]]).double()
    assert torch.equal(acc[:16], 1.0 + flat) and torch.equal(acc[16:], torch.ones(2, dtype=torch.float64))
    assert a.grad is None and torch.equal(b.grad, torch.full((4,), 7.0)) and unused.grad is None
    assert backward_into(out, params, None, weights)
    assert a.grad is None and torch.equal(b.grad, torch.full((4,), 7.0))
    assert not backward_into((unused * 2).sum(), [a, b], None)  # no parameter on the path: nothing taken


def test_an_observed_step_of_a_long_layout_is_float32(monkeypatch):
    """θ(next) − θ(this) over a long layout is stored in float32 (the float64 difference of each tensor, rounded
    once), as the emulated Δθ; over a short one it stays the exact float64 difference."""
    from pathlib import Path

    from entropy_probe.observed import delta_theta

    gen = torch.Generator().manual_seed(6)
    this = {n: torch.randn(SHAPES[n], generator=gen) for n in SHAPES}
    nxt = {n: t + 1e-3 * torch.randn(t.shape, generator=gen) for n, t in this.items()}
    layout = FlatLayout.from_named(this)
    exact = torch.cat([(nxt[n].double() - this[n].double()).reshape(-1) for n in SHAPES])
    where = (Path("a"), Path("b"))
    short = delta_theta(this, nxt, layout, where, "fix")
    assert short.dtype == torch.float64 and torch.equal(short, exact)
    monkeypatch.setattr(update_module, "UPDATE_CHUNK", 32)
    long = delta_theta(this, nxt, layout, where, "fix")
    assert long.dtype == torch.float32 and torch.equal(long, exact.float())
