"""SE_U from per-prompt-group U gradients (docs/math.md §5.2): the group gradients, leave-one-group-out
through the real update rule, and the jackknife SE against the spread of δH₁ over many U draws — with
gradient clipping active (the case where the delta method sees no variance) and inactive.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_lora_model
from test_delta_h1 import PROMPTS, adam_state, sample_batch, sample_u
from tolerances import FP64_REL, assert_close_scaled, assert_vectors_close, dot_scale

from entropy_probe.delta_h1 import NO_SE_U_FEW_GROUPS, compute_delta_h1
from entropy_probe.params import EstimatorParams
from entropy_probe.passes import group_gradients, policy_gradient
from entropy_probe.perturb import as_float64
from entropy_probe.specs import ComputeBudget
from entropy_probe.update import (
    LOSS_AGG_MODES,
    group_denominators,
    jackknife_se,
    leave_one_group_out,
    pg_coefficients,
    update_direction,
)
from entropy_probe.update_rule import UpdateRule


@pytest.fixture(scope="module")
def model():
    """Peaked enough that ∇H is not tiny, flat enough that most groups have rewards that differ."""
    model = make_lora_model(seed=5, rank=2, head_scale=6.0)
    return model


def _params(model, layout):
    named = dict(model.named_parameters())
    return [named[n] for n in layout.names]


def _groups(U):
    return torch.unique(U.tensors["group_index"], return_inverse=True)[1]


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_group_gradients_are_each_groups_own_gradient_and_sum_to_g(model, tokenizer, mode):
    """float64: g_b = ∇J restricted to group b's rows (same normaliser), Σ_b g_b = g — exact identities."""
    m64 = as_float64(copy.deepcopy(model))
    U = sample_u(m64, tokenizer, n_groups=4, G=3, seed=11)
    layout, _ = adam_state(m64)
    params = _params(m64, layout)
    coef = pg_coefficients(U.tensors["advantages"].double(), U.mask, mode, 4)
    g, g_groups = group_gradients(m64, params, layout.names, U, coef, _groups(U), max_tokens=13)
    g_plain = policy_gradient(m64, params, layout, U, coef, max_tokens=10_000)
    assert_vectors_close(g, g_plain, rel=FP64_REL, what="g with hooks vs plain")
    assert_vectors_close(g_groups.sum(0), g, rel=FP64_REL, what="Σ_b g_b vs g")
    for b in range(g_groups.shape[0]):
        only_b = coef * (_groups(U) == b)[:, None]
        assert_vectors_close(
            g_groups[b], policy_gradient(m64, params, layout, U, only_b, 10_000), rel=FP64_REL, what=f"g_{b}"
        )


def test_group_gradients_of_a_full_model(tokenizer):
    """Every tensor of a tied full model (embedding used twice, norms, biases): g_b is group b's own gradient and
    Σ_b g_b = g in float64, with the pad token as a real response token (its row: the trainer's zero)."""
    from test_tangents import full_model

    m64 = as_float64(full_model(tied=True))
    U = sample_u(m64, tokenizer, n_groups=4, G=3, seed=11)
    U.input_ids[0, U.n_prompt_cols] = m64.model.embed_tokens.padding_idx
    layout, _ = adam_state(m64)
    params = _params(m64, layout)
    coef = pg_coefficients(U.tensors["advantages"].double(), U.mask, "token-mean")
    g, g_groups = group_gradients(m64, params, layout.names, U, coef, _groups(U), max_tokens=13)
    assert_vectors_close(g_groups.sum(0), g, rel=FP64_REL, what="Σ_b g_b vs g")
    moving = 0
    for b in range(g_groups.shape[0]):
        only_b = policy_gradient(m64, params, layout, U, coef * (_groups(U) == b)[:, None], 10_000)
        if not only_b.any():  # all-equal rewards: no gradient from this group
            assert not g_groups[b].any()
            continue
        moving += 1
        assert_vectors_close(g_groups[b], only_b, rel=FP64_REL, what=f"g_{b}")
    assert moving >= 2


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_leave_one_group_out_equals_the_batch_without_that_group(model, tokenizer, mode):
    """X̄·Δθ(g₋b) from the cache = the same update computed from a U batch that never had group b."""
    m64 = as_float64(copy.deepcopy(model))
    U = sample_u(m64, tokenizer, n_groups=4, G=3, seed=12)
    layout, state = adam_state(m64)
    params = _params(m64, layout)
    groups = _groups(U)
    coef = pg_coefficients(U.tensors["advantages"].double(), U.mask, mode, 4)
    g, g_groups = group_gradients(m64, params, layout.names, U, coef, groups, 10_000)
    xbar = torch.randn(layout.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    denominators = group_denominators(U.mask, U.tensors["group_index"], mode)
    loo = leave_one_group_out("adam_step", g, g_groups, denominators, xbar, state, 0.05)
    for b in range(len(loo)):
        keep = groups != b
        coef_without = pg_coefficients(U.tensors["advantages"][keep].double(), U.mask[keep], mode, 4)
        full = torch.zeros_like(coef)
        full[keep] = coef_without
        g_without = policy_gradient(m64, params, layout, U, full, 10_000)
        expected = (xbar * update_direction("adam_step", g_without, state, 0.05)).sum()
        assert_close_scaled(
            loo[b],
            expected,
            float(xbar.abs() @ update_direction("adam_step", g_without, state, 0.05).abs()),
            what=f"LOO {b}",
        )


def test_jackknife_se_formula():
    """√((B−1)/B Σ (v − v̄)²) on numbers worked by hand: v = 1, 2, 3 → √(2/3 · 2) = 2/√3."""
    assert jackknife_se(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(2 / 3**0.5, rel=1e-12)


@pytest.mark.parametrize("max_grad_norm", [None, 0.02], ids=["no-clipping", "clipping-active"])
def test_se_u_matches_the_spread_over_u_draws(model, tokenizer, max_grad_norm):
    """E fixed, 60 U draws through the real adam_step rule: mean SE_U² ≈ Var(δH₁) over the draws.

    Compares variances (the unbiased quantity). With clipping active every draw is clipped (checked), the
    case where the old delta method reported ~0. Tolerance: the ratio of a 60-draw variance to the mean of
    60 jackknife variances with 8 groups each has a sampling SD of about 0.25 here.
    """
    layout, state = adam_state(model, lr=2e-2)
    params = _params(model, layout)
    spec = UpdateRule("adam_step", state, "token-mean", max_grad_norm=max_grad_norm)
    E = sample_batch(model, tokenizer, PROMPTS * 16, seed=1)
    first = compute_delta_h1(
        model, E, sample_u(model, tokenizer, 8, 4, seed=5000), layout, spec, EstimatorParams(), ComputeBudget(4096)
    )
    xbar = first.xbar.double()
    values, variances, clipped = [], [], 0
    for s in range(60):
        U = sample_u(model, tokenizer, 8, 4, seed=5001 + s)
        coef = pg_coefficients(U.tensors["advantages"], U.mask, "token-mean")
        g, g_groups = group_gradients(model, params, layout.names, U, coef, _groups(U), 4096)
        g = g.double()
        clipped += max_grad_norm is not None and float(g.norm()) > max_grad_norm
        values.append(float(xbar @ update_direction("adam_step", g, state, max_grad_norm)))
        denominators = group_denominators(U.mask, U.tensors["group_index"], "token-mean")
        loo = leave_one_group_out("adam_step", g, g_groups, denominators, xbar, state, max_grad_norm)
        variances.append(jackknife_se(loo) ** 2)
    if max_grad_norm is not None:
        assert clipped == 60
    spread = torch.tensor(values, dtype=torch.float64).var().item()
    ratio = (sum(variances) / len(variances)) / spread
    assert 0.5 < ratio < 2.0, ratio


def test_se_u_is_calibrated_at_the_default_batch_size_with_clipping_active(model, tokenizer):
    """The issue's calibration criterion: at the default B_U (batch_config.B_U = 8 groups of 4), U's prompts drawn
    without replacement from a population of 16 (as `generation.plan_u` draws them), every draw clipped: the spread
    of δH₁ over 150 U draws (E fixed) against the RMS of their jackknife SE_U is within 0.8–1.25 (measured 1.04; the
    sampling SD of this ratio is about 0.07 here). The jackknife treats groups as independent draws; the
    population's finite size would shrink only the between-prompt part of the spread (docs/math.md §5.2)."""
    from entropy_probe.params import BatchParams
    from entropy_probe.update import group_advantages

    population = [f"{a}+{b}=" for a in range(4) for b in range(4)]
    B, G, max_grad_norm = BatchParams().B_U, 4, 0.02

    def draw_u(seed: int):
        order = torch.randperm(len(population), generator=torch.Generator().manual_seed(seed))[:B].tolist()
        U = sample_batch(model, tokenizer, [population[i] for i in order for _ in range(G)], seed)
        rewards = ((U.input_ids[:, U.n_prompt_cols :] * U.mask).sum(-1) % 2).float()  # parity, as sample_u
        U.tensors["advantages"] = group_advantages(rewards.view(B, G), True, 1e-4).view(-1)
        U.tensors["group_index"] = torch.arange(B).repeat_interleave(G)
        return U

    layout, state = adam_state(model, lr=2e-2)
    params = _params(model, layout)
    spec = UpdateRule("adam_step", state, "token-mean", max_grad_norm=max_grad_norm)
    E = sample_batch(model, tokenizer, PROMPTS * 16, seed=1)
    xbar = compute_delta_h1(model, E, draw_u(5000), layout, spec, EstimatorParams(), ComputeBudget(4096)).xbar.double()
    values, variances = [], []
    for s in range(150):
        U = draw_u(5001 + s)
        coef = pg_coefficients(U.tensors["advantages"], U.mask, "token-mean")
        g, g_groups = group_gradients(model, params, layout.names, U, coef, _groups(U), 4096)
        g = g.double()
        assert float(g.norm()) > max_grad_norm
        values.append(float(xbar @ update_direction("adam_step", g, state, max_grad_norm)))
        denominators = group_denominators(U.mask, U.tensors["group_index"], "token-mean")
        loo = leave_one_group_out("adam_step", g, g_groups, denominators, xbar, state, max_grad_norm)
        variances.append(jackknife_se(loo) ** 2)
    ratio = (torch.tensor(values, dtype=torch.float64).var().item() / (sum(variances) / len(variances))) ** 0.5
    assert 0.8 < ratio < 1.25, ratio


def test_se_u_is_none_with_one_moving_group(model, tokenizer):
    """One prompt group with non-zero advantage: SE_U is not estimable — None with the reason, never ~0."""
    layout, state = adam_state(model)
    spec = UpdateRule("adam_step", state, "token-mean", max_grad_norm=0.02)
    E = sample_batch(model, tokenizer, PROMPTS * 4, seed=1)
    U = sample_u(model, tokenizer, 4, 4, seed=7)
    adv = U.tensors["advantages"].view(4, 4)
    adv[1:] = 0.0  # only group 0 moves g
    adv[0] = torch.tensor([1.0, -1.0, 0.5, -0.5])
    r = compute_delta_h1(model, E, U, layout, spec, EstimatorParams(), ComputeBudget(4096))
    assert r.se_U is None and r.se_U_note == NO_SE_U_FEW_GROUPS
    assert r.se_delta_h1 == r.se_E
    with_cache = compute_delta_h1(model, E, U, layout, spec, EstimatorParams(), ComputeBudget(4096))
    assert with_cache.se_U_method == "jackknife over U prompt groups"
    without = compute_delta_h1(model, E, U, layout, spec, EstimatorParams(), ComputeBudget(4096, u_cache_mb=0))
    assert without.se_U_method == "delta method" and without.se_U is None


def test_cache_and_delta_method_agree_on_the_linearised_attributions(model, tokenizer):
    """u·g_b from the cached group gradients = the third pass's row hooks (both Σ_b = u·g)."""
    layout, state = adam_state(model)
    spec = UpdateRule("adam_step", state, "token-mean")
    E = sample_batch(model, tokenizer, PROMPTS * 4, seed=1)
    U = sample_u(model, tokenizer, 8, 4, seed=8)
    cached = compute_delta_h1(model, E, U, layout, spec, EstimatorParams(), ComputeBudget(4096))
    passes = compute_delta_h1(model, E, U, layout, spec, EstimatorParams(), ComputeBudget(4096, u_cache_mb=0))
    scale = dot_scale(passes.xbar, passes.delta_theta)  # δH₁ may cancel: compare on its terms' scale
    assert_close_scaled(cached.delta_h1, passes.delta_h1, scale, what="δH₁ with and without the cache")
    scale = float(passes.u_attribution.abs().sum())
    assert_vectors_close(cached.u_attribution, passes.u_attribution, rel=1e-5, what="u·g_b")
    assert scale > 0
    # leave-one-group-out attributions: δH₁ − δH₁ without the group; a group with zero advantage still
    # changes the token-mean normaliser, so no entry is exactly 0 unless nothing moves
    assert cached.u_attribution_loo.shape == cached.u_attribution.shape


def test_activation_checkpointing_changes_nothing(model, tokenizer):
    """With checkpoint.use_checkpointing the layers are recomputed in each backward (the LoRA layers' forward
    hooks fire again): the row hooks must neither miss nor double-count, so every result is unchanged."""
    from entropy_probe.checkpoint import enable_checkpointing

    layout, state = adam_state(model)
    spec = UpdateRule("adam_step", state, "token-mean")
    E = sample_batch(model, tokenizer, PROMPTS * 4, seed=1)
    U = sample_u(model, tokenizer, 8, 4, seed=3)
    plain = compute_delta_h1(model, E, U, layout, spec, EstimatorParams(), ComputeBudget(4096))
    recomputing = copy.deepcopy(model)
    enable_checkpointing(recomputing)
    calls = []
    name = next(n for n, _ in recomputing.named_modules() if n.endswith("q_proj.lora_A.default"))
    handle = dict(recomputing.named_modules())[name].register_forward_hook(lambda *_: calls.append(1))
    checkpointed = compute_delta_h1(recomputing, E, U, layout, spec, EstimatorParams(), ComputeBudget(4096))
    handle.remove()
    assert len(calls) > 2  # two forwards (U, E) plus the recomputations: checkpointing is really on
    scale = dot_scale(plain.xbar, plain.delta_theta)  # δH₁ may cancel: compared on its terms' scale
    for key in ("delta_h1", "delta_h1_from_tangents"):
        assert_close_scaled(getattr(checkpointed, key), getattr(plain, key), scale, what=key)
    for key in ("se_E", "se_U"):  # standard errors do not cancel: their own size is the scale
        assert_close_scaled(getattr(checkpointed, key), getattr(plain, key), abs(getattr(plain, key)), what=key)
    assert_vectors_close(checkpointed.u_attribution_loo, plain.u_attribution_loo, rel=1e-5, what="LOO")
    assert_vectors_close(checkpointed.e_contributions, plain.e_contributions, rel=1e-5, what="E rows")
