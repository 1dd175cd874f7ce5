"""Update direction: advantages, PG objective vs naive/TRL losses, group attributions, and the update
rules against a real torch.optim.AdamW step, their formulas and finite differences."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
from torch import nn

from entropy_probe.errors import ProbeError
from entropy_probe.update import (
    LOSS_AGG_MODES,
    AdamState,
    FlatLayout,
    adam_precond_delta,
    adam_step_delta,
    group_advantages,
    group_terms_from_rows,
    linearise,
    pg_coefficients,
    resolve_loss_agg_mode,
    sgd_delta,
    update_direction,
    zero_gradient_part,
)

# ---------------------------------------------------------------------------------------------------
# Advantages and the policy-gradient objective


@pytest.mark.parametrize("scale", [False, True])
def test_group_advantages_by_hand(scale):
    # float64: the hand formula is exact, so the tolerance can be tight (float32 would round at ~5e-7 here)
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, -1.0, 2.0, 0.0]], dtype=torch.float64)
    got = group_advantages(rewards, scale=scale, eps=1e-4)
    for b, row in enumerate(rewards.tolist()):
        mean, std = statistics.mean(row), statistics.stdev(row)  # stdev: the (n − 1) sample std
        for g, r in enumerate(row):
            expected = (r - mean) / (std + 1e-4) if scale else r - mean
            assert got[b, g].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert (got[1] == 0).all()  # all-equal group: no signal, no division blow-up


def test_group_advantages_refuse_bad_input():
    with pytest.raises(ProbeError, match="G ≥ 2"):
        group_advantages(torch.zeros(3, 1), scale=True, eps=1e-4)
    with pytest.raises(ProbeError, match="non-finite rewards"):
        group_advantages(torch.tensor([[1.0, float("nan")]]), scale=False, eps=1e-4)


def test_resolve_loss_agg_mode():
    assert resolve_loss_agg_mode("auto", {"loss_type": "dapo"})[:2] == ("token-mean", None)
    assert resolve_loss_agg_mode("auto", {"loss_type": "bnpo"})[:2] == ("token-mean", None)
    assert resolve_loss_agg_mode("auto", {"loss_type": "grpo"})[:2] == ("seq-mean-token-mean", None)
    assert resolve_loss_agg_mode("auto", {"loss_type": "dr_grpo", "max_completion_length": 7})[:2] == (
        "seq-mean-token-sum-norm",
        7,
    )
    mode, max_len, reason = resolve_loss_agg_mode("auto", {"loss_type": None})
    assert (mode, max_len) == ("token-mean", None) and "unknown" in reason and "token-mean" in reason
    mode, _, reason = resolve_loss_agg_mode("auto", {"loss_type": "made_up"})
    assert mode == "token-mean" and "made_up" in reason
    assert resolve_loss_agg_mode("auto", None)[0] == "token-mean"
    assert resolve_loss_agg_mode("seq-mean-token-sum", {"loss_type": "grpo"})[0] == "seq-mean-token-sum"
    with pytest.raises(ProbeError, match="max_completion_length"):
        resolve_loss_agg_mode("auto", {"loss_type": "dr_grpo"})
    with pytest.raises(ProbeError, match="unknown loss aggregation mode 'mean'"):
        resolve_loss_agg_mode("mean", {})


def _pg_problem(seed=0, n_groups=3, g=4, r=5, v=6):
    """A differentiable stand-in for the policy: logp_ij = log_softmax(φ_ij)[y_ij], responses of varied length."""
    gen = torch.Generator().manual_seed(seed)
    n = n_groups * g
    phi = torch.randn(n, r, v, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, v, (n, r), generator=gen)
    lengths = torch.randint(1, r + 1, (n,), generator=gen)
    mask = torch.arange(r)[None] < lengths[:, None]
    rewards = torch.randint(0, 3, (n_groups, g), generator=gen).double()
    adv = group_advantages(rewards, scale=True, eps=1e-4).reshape(-1)
    group_index = torch.arange(n_groups).repeat_interleave(g)

    def logp_fn(p):
        return torch.log_softmax(p, -1).gather(-1, tokens[..., None])[..., 0] * mask

    return phi, logp_fn, mask, adv, group_index


def _naive_objective(logp, mask, adv, mode, max_len):
    """J written per sequence with Python loops, straight from the definitions."""
    n = len(adv)
    lens = [int(mask[i].sum()) for i in range(n)]
    seq_sums = [sum(adv[i] * logp[i, j] for j in range(lens[i])) for i in range(n)]
    if mode == "token-mean":
        return sum(seq_sums) / sum(lens)
    if mode == "seq-mean-token-mean":
        return sum(s / L for s, L in zip(seq_sums, lens)) / n
    if mode == "seq-mean-token-sum":
        return sum(seq_sums) / n
    return sum(seq_sums) / (n * max_len)


def _trl_loss(logp, mask, adv, loss_type, max_len):
    """TRL GRPOTrainer's loss at the on-policy point (ratio = exp(logp − logp.detach()) = 1, no clipping
    active), one batch, no KL (beta = 0): trl/trainer/grpo_trainer.py's aggregation branches."""
    ratio = torch.exp(logp - logp.detach())
    per_token_loss = -ratio * adv[:, None]
    m = mask.double()
    if loss_type == "grpo":
        return ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type in ("bnpo", "dapo"):  # dapo normaliser: tokens of the (here: single) batch
        return (per_token_loss * m).sum() / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * m).sum() / (per_token_loss.size(0) * max_len)
    raise ValueError(loss_type)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_pg_coefficients_gradient_matches_naive_objective(mode):
    phi, logp_fn, mask, adv, _ = _pg_problem()
    max_len = 7
    logp = logp_fn(phi)
    c = pg_coefficients(adv, mask, mode, max_len)
    (g_ours,) = torch.autograd.grad((c * logp).sum(), phi, retain_graph=True)
    (g_naive,) = torch.autograd.grad(_naive_objective(logp, mask, adv, mode, max_len), phi)
    torch.testing.assert_close(g_ours, g_naive, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_resolved_mode_reproduces_trl_loss_gradient(loss_type):
    """g = ∇J equals −∇(TRL's loss) for the mode that `auto` resolves the loss_type to."""
    phi, logp_fn, mask, adv, _ = _pg_problem(seed=1)
    mode, max_len, _ = resolve_loss_agg_mode("auto", {"loss_type": loss_type, "max_completion_length": 9})
    logp = logp_fn(phi)
    (g_ours,) = torch.autograd.grad((pg_coefficients(adv, mask, mode, max_len) * logp).sum(), phi, retain_graph=True)
    (g_trl,) = torch.autograd.grad(-_trl_loss(logp, mask, adv, loss_type, 9), phi)
    torch.testing.assert_close(g_ours, g_trl, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_group_terms_sum_to_u_dot_g_and_influence_is_the_empirical_influence(mode):
    """Σ_b attribution_b = u·g; influence_b = r + B ∂r/∂ε_b, where r(ε) is u·g with group b's sequences
    weighted by (1 + ε_b) in the objective and in its normaliser (token or sequence count)."""
    phi, logp_fn, mask, adv, group_index = _pg_problem(seed=2)
    max_len = 7
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(phi.shape, generator=gen, dtype=torch.float64)
    logp = logp_fn(phi)
    (g,) = torch.autograd.grad(_naive_objective(logp, mask, adv, mode, max_len), phi)
    _, dlogp = torch.func.jvp(logp_fn, (phi.detach(),), (u,))
    row_terms = (pg_coefficients(adv, mask, mode, max_len) * dlogp).sum(-1)
    attribution, influence = group_terms_from_rows(row_terms, mask, group_index, mode)
    assert attribution.sum().item() == pytest.approx((u * g).sum().item(), rel=1e-12)

    n_groups = int(group_index.max()) + 1
    eps = torch.zeros(n_groups, dtype=torch.float64, requires_grad=True)
    w = (1 + eps)[group_index]  # per-sequence weight
    m = mask.double()
    terms = adv[:, None] * dlogp * m  # A_i dlogp_ij
    if mode == "token-mean":
        r = (w[:, None] * terms).sum() / (w[:, None] * m).sum()
    elif mode == "seq-mean-token-mean":
        r = (w * terms.sum(-1) / m.sum(-1)).sum() / w.sum()
    elif mode == "seq-mean-token-sum":
        r = (w * terms.sum(-1)).sum() / w.sum()
    else:
        r = (w * terms.sum(-1)).sum() / (w.sum() * max_len)
    (dr,) = torch.autograd.grad(r, eps)
    torch.testing.assert_close(influence, r.detach() + n_groups * dr, rtol=1e-10, atol=1e-14)
    assert influence.mean().item() == pytest.approx(r.item(), rel=1e-10)


# ---------------------------------------------------------------------------------------------------
# Flat vectors


def test_flat_layout_round_trip_and_per_element():
    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.tensor([7.0]), "c": torch.arange(4.0).view(2, 1, 2)}
    layout = FlatLayout.from_named(tensors, names=["c", "a", "b"])
    flat = layout.flatten(tensors)
    assert flat.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 7]
    back = layout.unflatten(flat)
    assert list(back) == ["c", "a", "b"]
    for name in tensors:
        assert torch.equal(back[name], tensors[name])
    assert layout.per_element({"a": 2.0, "b": 3.0, "c": 1.0}).tolist() == [1] * 4 + [2] * 6 + [3]
    with pytest.raises(ValueError, match="11 elements"):
        layout.unflatten(torch.zeros(10))


# ---------------------------------------------------------------------------------------------------
# Update rules vs a real AdamW step


def _trained_module(dtype):
    """A small module, two param groups (different lr, weight decay, betas, eps), after 3 real AdamW
    steps; `extra` never had a gradient, so it has no optimizer state (lazy state, step 0)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(dtype)
    extra = nn.Parameter(torch.randn(3, dtype=dtype))
    named = {**dict(net.named_parameters()), "extra": extra}
    groups = [
        {
            "names": ["0.weight", "2.weight", "extra"],
            "lr": 1e-2,
            "weight_decay": 0.1,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
        },
        {"names": ["0.bias", "2.bias"], "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.99), "eps": 1e-6},
    ]
    opt = torch.optim.AdamW(
        [{"params": [named[n] for n in gr["names"]], **{k: v for k, v in gr.items() if k != "names"}} for gr in groups]
    )
    x, y = torch.randn(8, 4, dtype=dtype), torch.randn(8, 2, dtype=dtype)
    for _ in range(3):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
    assert named["extra"] not in opt.state
    return net, extra, named, groups, opt, x, y


def _objective(net, extra, x, y):
    return -((net(x) - y) ** 2).mean() + (extra * torch.arange(1.0, 4.0, dtype=extra.dtype)).sum()


def _real_step(net, extra, named, opt, x, y, max_norm):
    """Δθ of the Trainer's sequence: loss = −J, backward, clip_grad_norm_, AdamW.step(), on copies."""
    net2, extra2, named2, opt2 = copy.deepcopy((net, extra, named, opt))
    opt2.zero_grad()
    (-_objective(net2, extra2, x, y)).backward()
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(named2.values()), max_norm)
    opt2.step()
    return {n: (named2[n] - named[n]).detach() for n in named}


def _state(layout, named, groups, opt, dtype=torch.float64):
    st = {n: opt.state.get(p, {}) for n, p in named.items()}
    pick = lambda key: {n: s[key] for n, s in st.items() if key in s}  # noqa: E731
    return AdamState.from_groups(
        layout,
        {n: p.detach() for n, p in named.items()},
        pick("exp_avg"),
        pick("exp_avg_sq"),
        {n: s["step"].item() for n, s in st.items() if "step" in s},
        groups,
        dtype=dtype,
    )


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("clip", ["active", "inactive", "none"])
def test_adam_step_matches_torch_adamw(dtype, clip):
    net, extra, named, groups, opt, x, y = _trained_module(dtype)
    layout = FlatLayout.from_named(named)
    grads = torch.autograd.grad(_objective(net, extra, x, y), list(named.values()))
    g = layout.flatten(dict(zip(named, grads)), torch.float64)
    max_norm = {"active": 0.3 * g.norm().item(), "inactive": 10 * g.norm().item(), "none": None}[clip]
    state = _state(layout, named, groups, opt)
    assert state.step.min() == 0 and state.step.max() == 3  # `extra` starts from empty state
    ours = update_direction("adam_step", g, state, max_norm)
    direct = adam_step_delta(
        g,
        state.theta,
        state.exp_avg,
        state.exp_avg_sq,
        state.step,
        state.lr,
        state.beta1,
        state.beta2,
        state.eps,
        state.weight_decay,
        max_norm,
    )
    assert torch.equal(ours, direct)
    real = layout.flatten(_real_step(net, extra, named, opt, x, y, max_norm), torch.float64)
    if dtype == torch.float64:
        torch.testing.assert_close(ours, real, rtol=1e-10, atol=1e-15)
    else:  # θ' − θ in float32 carries ~ulp(θ) rounding; AdamW's own float32 ops ~1e-7 relative
        tol = 2 * torch.finfo(torch.float32).eps * (state.theta.abs() + 1)
        assert ((ours - real).abs() <= tol + 1e-6 * ours.abs()).all()


def test_zero_gradient_part_is_adamw_step_with_zero_gradient():
    net, extra, named, groups, opt, x, y = _trained_module(torch.float64)
    layout = FlatLayout.from_named(named)
    state = _state(layout, named, groups, opt)
    net2, extra2, named2, opt2 = copy.deepcopy((net, extra, named, opt))
    for p in named2.values():
        p.grad = torch.zeros_like(p)
    opt2.step()
    real = layout.flatten({n: named2[n] - named[n] for n in named}).detach()
    torch.testing.assert_close(zero_gradient_part("adam_step", state, max_grad_norm=1.0), real, rtol=1e-10, atol=1e-15)
    assert (zero_gradient_part("adam_step", state).abs() > 0).any()
    for rule in ("adam_precond", "sgd"):
        assert (zero_gradient_part(rule, state) == 0).all()


def test_adam_precond_and_sgd_match_their_formulas_per_parameter():
    net, extra, named, groups, opt, *_ = _trained_module(torch.float64)
    del named["extra"]  # adam_precond needs state for every parameter
    groups = [{**gr, "names": [n for n in gr["names"] if n != "extra"]} for gr in groups]
    layout = FlatLayout.from_named(named)
    state = _state(layout, named, groups, opt)
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(layout.numel, generator=gen, dtype=torch.float64)
    g_named = layout.unflatten(g)
    expected_pre, expected_sgd = {}, {}
    for gr in groups:
        for name in gr["names"]:
            st = opt.state[named[name]]
            v_hat = st["exp_avg_sq"] / (1 - gr["betas"][1] ** st["step"].item())
            expected_pre[name] = gr["lr"] * g_named[name] / (v_hat.sqrt() + gr["eps"])
            expected_sgd[name] = gr["lr"] * g_named[name]
    torch.testing.assert_close(
        update_direction("adam_precond", g, state), layout.flatten(expected_pre), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(update_direction("sgd", g, state), layout.flatten(expected_sgd), rtol=1e-12, atol=0)
    assert torch.equal(sgd_delta(g, 0.5), 0.5 * g)
    with pytest.raises(ProbeError, match="step ≥ 1"):
        adam_precond_delta(g, state.exp_avg_sq, torch.zeros_like(state.step), state.lr, state.beta2, state.eps)
    with pytest.raises(ProbeError, match="unknown update rule 'lion'"):
        update_direction("lion", g, state)


def _synthetic_state(p=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda: torch.randn(p, generator=gen, dtype=torch.float64)  # noqa: E731
    half = torch.arange(p) < p // 2
    return AdamState(
        theta=rnd(),
        exp_avg=0.01 * rnd(),
        exp_avg_sq=1e-4 * rnd() ** 2 + 1e-6,
        step=torch.where(half, 5.0, 40.0).double(),
        lr=torch.where(half, 1e-2, 3e-3).double(),
        beta1=torch.full((p,), 0.9, dtype=torch.float64),
        beta2=torch.where(half, 0.999, 0.99).double(),
        eps=torch.full((p,), 1e-8, dtype=torch.float64),
        weight_decay=torch.where(half, 0.1, 0.0).double(),
    ), rnd


@pytest.mark.parametrize(
    "rule,clip", [("adam_step", "active"), ("adam_step", "inactive"), ("adam_precond", None), ("sgd", None)]
)
def test_linearise_matches_finite_differences(rule, clip):
    state, rnd = _synthetic_state()
    g, xbar = 0.02 * rnd(), rnd()
    max_norm = {"active": 0.5 * g.norm().item(), "inactive": 10 * g.norm().item(), None: None}[clip]
    u = linearise(rule, g, xbar, state, max_norm)
    h = 1e-7
    jac = torch.stack(
        [
            (update_direction(rule, g + h * e, state, max_norm) - update_direction(rule, g - h * e, state, max_norm))
            / (2 * h)
            for e in torch.eye(len(g), dtype=torch.float64)
        ],
        dim=1,
    )  # jac[j, k] = ∂Δθ_j/∂g_k
    torch.testing.assert_close(u, jac.T @ xbar, rtol=1e-6, atol=1e-9)
    if clip == "active":  # clipping couples the coordinates
        off_diag = jac - torch.diag(torch.diag(jac))
        assert off_diag.abs().max() > 1e-6


def test_linearise_is_finite_where_adam_has_no_state_and_no_gradient():
    """v' = 0 (no state, zero gradient): the derivative is (lr/(1−β₁)) (1−β₁)/eps, not NaN."""
    state, rnd = _synthetic_state()
    state.exp_avg[0] = state.exp_avg_sq[0] = state.step[0] = 0.0
    g, xbar = 0.02 * rnd(), rnd()
    g[0] = 0.0
    u = linearise("adam_step", g, xbar, state, None)
    assert torch.isfinite(u).all()
    lr, b1, eps = state.lr[0], state.beta1[0], state.eps[0]
    assert u[0].item() == pytest.approx((xbar[0] * lr / (1 - b1) * (1 - b1) / eps).item(), rel=1e-12)


@pytest.mark.parametrize("rule", ["adam_step", "adam_precond", "sgd"])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_a_long_g_is_updated_in_slices_bit_for_bit(monkeypatch, rule, clip):
    """update_direction takes a long g in UPDATE_CHUNK slices (memory of a full-parameter model): the same
    numbers as the whole vector at once, clipping factor included."""
    from entropy_probe import update as update_module
    from entropy_probe.update import AdamState, update_direction

    n = 1000
    gen = torch.Generator().manual_seed(0)
    one = lambda v: torch.full((1,), v, dtype=torch.float64).expand(n)  # noqa: E731
    state = AdamState(
        theta=torch.randn(n, generator=gen),
        exp_avg=1e-3 * torch.randn(n, generator=gen),
        exp_avg_sq=1e-6 * torch.rand(n, generator=gen),
        step=one(5.0),
        lr=one(1e-3),
        beta1=one(0.9),
        beta2=one(0.999),
        eps=one(1e-8),
        weight_decay=torch.rand(n, generator=gen, dtype=torch.float64),
    )
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    whole = update_direction(rule, g, state, clip)
    monkeypatch.setattr(update_module, "UPDATE_CHUNK", 64)
    assert torch.equal(update_direction(rule, g, state, clip), whole)


def _long_state(n: int, gen: torch.Generator):
    """A float64 AdamW state of n elements after 5 steps, the hyperparameters shared (expanded views, as a Trainer's)."""
    from entropy_probe.update import AdamState

    one = lambda v: torch.full((1,), v, dtype=torch.float64).expand(n)  # noqa: E731
    return AdamState(
        theta=torch.randn(n, generator=gen, dtype=torch.float64),
        exp_avg=1e-3 * torch.randn(n, generator=gen, dtype=torch.float64),
        exp_avg_sq=1e-6 * torch.rand(n, generator=gen, dtype=torch.float64),
        step=one(5.0),
        lr=one(1e-3),
        beta1=one(0.9),
        beta2=one(0.999),
        eps=one(1e-8),
        weight_decay=one(0.01),
    )


@pytest.mark.parametrize("rule", ["adam_step", "adam_precond", "sgd"])
@pytest.mark.parametrize("clip", [None, 0.5, 1e6], ids=["no-clip", "clipping", "clip-inactive"])
def test_a_long_g_is_linearised_in_slices(monkeypatch, rule, clip):
    """linearise in UPDATE_CHUNK slices (the clipping factor's own derivative added once) equals the whole vector's
    autograd VJP to float64 round-off."""
    from entropy_probe import update as update_module
    from entropy_probe.update import linearise

    n = 1000
    gen = torch.Generator().manual_seed(1)
    state = _long_state(n, gen)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    xbar = torch.randn(n, generator=gen, dtype=torch.float64)
    whole = linearise(rule, g, xbar, state, clip)
    monkeypatch.setattr(update_module, "UPDATE_CHUNK", 64)
    sliced = linearise(rule, g, xbar, state, clip)
    assert float((sliced - whole).norm()) <= 1e-12 * float(whole.norm())


@pytest.mark.parametrize("rule", ["adam_step", "adam_precond", "sgd"])
@pytest.mark.parametrize("clip", [None, 0.5, 1e6], ids=["no-clip", "clipping", "clip-inactive"])
def test_leave_one_group_out_over_slices_is_each_groups_own_update(monkeypatch, rule, clip):
    """All groups at once over UPDATE_CHUNK slices (several here) equals, per group, X̄·Δθ of the whole g₋b =
    (g − g_b)·D/(D − D_b) through update_direction — clipping by each g₋b's own norm — to float64 round-off of the
    dot (|X̄|·|Δθ| scale)."""
    from entropy_probe import update as update_module
    from entropy_probe.update import leave_one_group_out, update_direction

    n, n_groups = 1000, 5
    gen = torch.Generator().manual_seed(2)
    state = _long_state(n, gen)
    g_groups = 0.1 * torch.randn(n_groups, n, generator=gen)  # float32, as the U pass keeps them
    g = g_groups.double().sum(0)
    xbar = torch.randn(n, generator=gen, dtype=torch.float64)
    denominators = torch.rand(n_groups, generator=gen, dtype=torch.float64) + 1
    monkeypatch.setattr(update_module, "UPDATE_CHUNK", 64)  # 12 elements per slice for 5 groups
    loo = leave_one_group_out(rule, g, g_groups, denominators, xbar, state, clip)
    total = denominators.sum()
    for b in range(n_groups):
        g_minus = (g - g_groups[b].double()) * (total / (total - denominators[b]))
        delta = update_direction(rule, g_minus, state, clip)
        scale = float(xbar.norm() * delta.norm())
        assert abs(float(loo[b]) - float(xbar @ delta)) <= 1e-13 * scale, (b, float(loo[b]), float(xbar @ delta))
