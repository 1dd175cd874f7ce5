"""What-if updates and token attributions from one X̄ (docs/math.md §12).

X̄ (the E pass) is the probe's expensive part and does not depend on the update. Given it:
  - tokens: u = (∂Δθ/∂g)ᵀ X̄ at the configured update's g, then every U token's share a_ij of u·g from one
    double-backward pass over U (`passes.u_token_terms`, `tokens.TokenTable`);
  - rows: for each alternative update (lr, loss aggregation, clipping, advantage scaling, entropy bonus, KL
    penalty, token mask) Δθ' = rule'(g'), δH₁' = X̄·Δθ'. A row that changes ℓ's coefficients costs one U backward
    (g' with its group gradients); one that changes only the rule (lr, clipping) reuses g, and an entropy bonus
    takes g + Δβ_H h (h below). SE_U' by the jackknife over U's
    groups through rule'; SE_E' for all rows from ONE E backward with stacked row hooks (K directions at once);
  - the entropy-neutral setting: with h = ∇ Σ w H (the entropy bonus's gradient, one U backward),
    f(β) = X̄·Δθ(g + β h) is solved for f(β*) = target by bisection, SE(β*) = SE(δH₁ at β*) / |f'(β*)|;
    δH₁ is proportional to the lr for every rule here, so lr·target/δH₁ is the lr that reaches the target
    (none when that is not positive).
Every row equals a delta-h1 run with that row's settings on the same samples (a test).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .delta_h1 import (
    Clock,
    UGradient,
    e_coefficients,
    nonzero_advantage_groups,
    trainable_parameters,
    u_coefficients,
    u_gradient,
)
from .importance import standard_error
from .loss_terms import LossTerms, UCoefficients
from .passes import as_direction, group_gradients, influence_along, policy_gradient, u_token_terms
from .scoring import Batch, accumulation_dtype
from .specs import ComputeBudget
from .update import group_advantages, group_denominators, jackknife_se
from .update_rule import UpdateRule

log = logging.getLogger(__name__)

BISECTION_STEPS = 200


@dataclass
class Alternative:
    """A what-if row made concrete: its update rule, its U batch (advantages rescaled or not), and what changed."""

    name: str
    update: UpdateRule
    U: Batch
    changes: dict
    new_gradient: bool  # whether J's ℓ coefficients change (one more U backward), or g' = g + Δβ_H h


def alternative(base: UpdateRule, row, U: Batch, advantage_eps: float) -> Alternative:
    """The update and U batch of `row` (params `WhatIfRow`): `base` with the row's settings replaced."""
    changes = row.model_dump(exclude={"name"}, exclude_none=True)
    state = base.state if row.lr_scale is None else dataclasses.replace(base.state, lr=base.state.lr * row.lr_scale)
    max_grad_norm = base.max_grad_norm
    if row.max_grad_norm is not None:
        max_grad_norm = row.max_grad_norm or None
    terms = LossTerms(
        base.terms.entropy_coef if row.entropy_coef is None else row.entropy_coef,
        base.terms.token_mask if row.token_mask is None else row.token_mask,
        base.terms.mask_fraction if row.token_mask_fraction is None else row.token_mask_fraction,
        base.terms.kl_coef if row.kl_coef is None else row.kl_coef,
    )
    update = dataclasses.replace(
        base,
        state=state,
        loss_agg_mode=row.loss_agg_mode or base.loss_agg_mode,
        max_grad_norm=max_grad_norm,
        max_grad_norm_source="what-if row" if row.max_grad_norm is not None else base.max_grad_norm_source,
        terms=terms,
    )
    if row.advantage_scale is not None:
        U = rescaled_advantages(U, row.advantage_scale, advantage_eps)
    new_gradient = not {"lr_scale", "max_grad_norm", "entropy_coef"} >= set(changes)
    return Alternative(row.name, update, U, changes, new_gradient)


def rescaled_advantages(U: Batch, scale: bool, eps: float) -> Batch:
    """U with A recomputed from its rewards (groups are G contiguous rows), divided by the group's std or not."""
    rewards = U.tensors["rewards"]
    G = int((U.tensors["group_index"] == U.tensors["group_index"][0]).sum())
    advantages = group_advantages(rewards.view(-1, G).double(), scale, eps).reshape(-1).to(rewards.dtype)
    return dataclasses.replace(U, tensors={**U.tensors, "advantages": advantages})


@dataclass
class Step:
    """One update's Δθ = rule(g) and what its jackknife needs: the group gradients and the groups' denominators."""

    update: UpdateRule
    g: Tensor
    g_groups: Tensor | None
    denominators: Tensor
    delta_theta: Tensor

    @classmethod
    def of(cls, update: UpdateRule, g: Tensor, g_groups: Tensor | None, U: Batch, u_weights) -> "Step":
        denominators = group_denominators(U.mask, U.tensors["group_index"], update.loss_agg_mode, u_weights)
        return cls(update, g, g_groups, denominators, update.delta_theta(g))

    def se_U(self, xbar: Tensor) -> float | None:
        """The jackknife SE_U through this step's rule (None without group gradients)."""
        if self.g_groups is None:
            return None
        loo = self.update.leave_one_group_out(self.g, self.g_groups, self.denominators, xbar)
        return jackknife_se(loo) if len(loo) > 1 else None


def entropy_gradient(model, layout, U: Batch, update: UpdateRule, u_weights, budget: ComputeBudget, with_groups: bool):
    """(h, h_b or None): the gradient of the entropy bonus's term Σ_ij w_ij H_ij over U (β_H = 1), aggregated
    like the policy loss, with its per-group parts when the U pass keeps them."""
    params = trainable_parameters(model, layout)
    dtype = accumulation_dtype(params[0])
    pg = u_coefficients(U, dataclasses.replace(update, terms=LossTerms(entropy_coef=1.0)), u_weights, dtype)
    coefs = UCoefficients(torch.zeros_like(pg.logp), pg.entropy)
    if with_groups:
        _, groups = torch.unique(U.tensors["group_index"], return_inverse=True)
        return group_gradients(model, params, layout.names, U, coefs, groups, budget.max_tokens)
    return policy_gradient(model, params, layout, U, coefs, budget.max_tokens), None


def with_bonus(g: Tensor, g_groups: Tensor | None, h: Tensor, h_groups: Tensor | None, extra: float):
    """(g, g_b) with the entropy bonus raised by `extra`: J's gradient is linear in β_H."""
    groups = None if g_groups is None or h_groups is None else g_groups + extra * h_groups.to(g_groups.dtype)
    return g + extra * h, groups


def solve_entropy_coef(update: UpdateRule, g: Tensor, h: Tensor, xbar: Tensor, target: float) -> float | None:
    """β with X̄·Δθ(g + β h) = target, the root nearest 0 found on a log grid of ±β then bisected (None: no sign
    change for |β| up to 10⁶ ‖g‖/‖h‖)."""
    xbar = xbar.double()

    def f(beta: float) -> float:
        return float(xbar @ update.delta_theta(g + beta * h)) - target

    f0 = f(0.0)
    if f0 == 0.0:
        return 0.0
    h_norm = float(h.double().norm())
    if h_norm == 0.0:
        return None
    scale = max(float(g.double().norm()), 1e-30) / h_norm
    for exponent in range(-8, 7):
        for sign in (1.0, -1.0):
            beta = sign * scale * 10.0**exponent
            if math.copysign(1.0, f(beta)) != math.copysign(1.0, f0):
                return _bisect(f, 0.0 if exponent == -8 else sign * scale * 10.0 ** (exponent - 1), beta)
    return None


def _bisect(f, inside: float, outside: float) -> float:
    """A root of f between `inside` (f has f(0)'s sign there) and `outside` (the other sign)."""
    f_inside = f(inside)
    for _ in range(BISECTION_STEPS):
        middle = 0.5 * (inside + outside)
        if middle in (inside, outside):
            break
        if math.copysign(1.0, f(middle)) == math.copysign(1.0, f_inside):
            inside = middle
        else:
            outside = middle
    return 0.5 * (inside + outside)


def e_rows_along(
    model, layout, E: Batch, estimator, e_weights, directions: list[Tensor], budget, clock
) -> list[Tensor]:
    """[ψ_k [N]] per direction: δH₁_k = mean ψ_k and SE_E,k from one E backward with stacked row hooks."""
    dtype = accumulation_dtype(trainable_parameters(model, layout)[0])
    coefs = e_coefficients(E, estimator, estimator.entropy, e_weights, dtype)
    psi = clock("e_rows", influence_along, model, E, layout, coefs, directions, budget.max_tokens)
    return list(psi.unbind(1))


def token_pass(model, layout, U: Batch, update: UpdateRule, ug: UGradient, xbar: Tensor, budget, clock):
    """(a [N, R], H [N, R], u·g): every U token's share of the linearised gradient part, the policy's entropies."""
    params = trainable_parameters(model, layout)
    u = clock("linearise", update.linearised, ug.g, xbar)
    direction = as_direction(u, layout, params)
    a, entropies = clock("tokens", u_token_terms, model, params, U, ug.coefs, direction, budget.max_tokens)
    return a, entropies, float(u.double() @ ug.g.double())  # a long u is in the passes' dtype (`linearise`)


@dataclass
class RowOutcome:
    """One what-if row's numbers (the base update is the row named 'configured')."""

    name: str
    changes: dict
    delta_h1: float
    se_E: float
    se_U: float | None
    delta_theta: Tensor

    @property
    def se(self) -> float:
        return math.sqrt(self.se_E**2 + (self.se_U or 0.0) ** 2)


@dataclass
class EntropyNeutral:
    """The entropy bonus β* with δH₁(β*) = target ± its SE, and the lr scale that reaches the target."""

    target: float
    entropy_coef: float | None
    entropy_coef_se: float | None
    at_solution: RowOutcome | None
    lr_scale: float | None


@dataclass
class WhatIfOutcome:
    base: RowOutcome
    rows: list[RowOutcome]
    neutral: EntropyNeutral
    token_a: Tensor  # [N, R]
    token_entropies: Tensor  # [N, R]
    token_coefficients: Tensor  # [N, R] c_ij of the configured update
    gradient_part_linearised: float
    timings: dict[str, float]


def what_if(
    model, layout, E: Batch, U: Batch, update: UpdateRule, rows, estimator, xbar: Tensor, spec, *, budget, eps, reuse
) -> WhatIfOutcome:
    """The token attribution, the what-if rows and the entropy-neutral setting for `update` (the configured one)
    from the given X̄ (delta-h1's): U backwards as the module docstring says, then one E backward for every SE_E.

    spec: params `whatif` (target); eps: the advantage scaling's ε; reuse: importance weights (`importance.Reuse`).
    Memory: a row's group gradients (B × P) live only while its δH₁ and SE_U are formed; every row's Δθ (P each, in
    the parameters' accumulation dtype) is kept for the E pass, which holds them all as stacked directions."""
    if update.chain is not None or not update.emulated:
        raise ValueError("what-if rows need one emulated step (callers check)")
    clock = Clock()
    dtype = accumulation_dtype(trainable_parameters(model, layout)[0])
    e_w = None if reuse is None or reuse.e_weights is None else reuse.e_weights.to(dtype)
    u_w = None if reuse is None or reuse.u_weights is None else reuse.u_weights.to(dtype)
    xbar = xbar.double()
    moving = nonzero_advantage_groups(U) >= 2  # SE_U needs two groups that move g

    def settle(name: str, changes: dict, step: Step) -> RowOutcome:
        """The row's δH₁ and SE_U now (its group gradients may go), SE_E after the E pass."""
        se_U = step.se_U(xbar) if moving else None
        return RowOutcome(name, changes, float(xbar @ step.delta_theta), math.nan, se_U, step.delta_theta.to(dtype))

    base_ug = u_gradient(model, layout, U, update, u_w, budget, clock)
    g, g_groups = base_ug.g.double(), base_ug.g_groups
    with_groups = g_groups is not None
    h, h_groups = clock("entropy_gradient", entropy_gradient, model, layout, U, update, u_w, budget, with_groups)
    h = h.double()

    outcomes = {"configured": settle("configured", {}, Step.of(update, g, g_groups, U, u_w))}
    for alt in (alternative(update, row, U, eps) for row in rows):
        if alt.new_gradient:
            ug = clock(f"row {alt.name}", u_gradient, model, layout, alt.U, alt.update, u_w, budget, Clock())
            row_g, row_groups = ug.g, ug.g_groups
        else:  # lr, clipping and the entropy bonus: no U pass
            extra = alt.update.terms.entropy_coef - update.terms.entropy_coef
            row_g, row_groups = with_bonus(g, g_groups, h, h_groups, extra)
        outcomes[alt.name] = settle(alt.name, alt.changes, Step.of(alt.update, row_g, row_groups, alt.U, u_w))
    a, entropies, linear = token_pass(model, layout, U, update, base_ug, xbar, budget, clock)

    beta = solve_entropy_coef(update, g, h, xbar, spec.target)
    if beta is not None:
        terms = dataclasses.replace(update.terms, entropy_coef=update.terms.entropy_coef + beta)
        step = Step.of(dataclasses.replace(update, terms=terms), *with_bonus(g, g_groups, h, h_groups, beta), U, u_w)
        outcomes["entropy-neutral"] = settle("entropy-neutral", {"entropy_coef": terms.entropy_coef}, step)
    token_coefficients = base_ug.coefs.logp
    del base_ug, g_groups, h_groups

    directions = [o.delta_theta for o in outcomes.values()]
    psis = e_rows_along(model, layout, E, estimator, e_w, directions, budget, clock)
    for outcome, psi in zip(outcomes.values(), psis):
        outcome.se_E = standard_error(psi)
    base, at_beta = outcomes.pop("configured"), outcomes.pop("entropy-neutral", None)
    return WhatIfOutcome(
        base=base,
        rows=list(outcomes.values()),
        neutral=_neutral(update, base, at_beta, g, h, xbar, beta, spec.target),
        token_a=a,
        token_entropies=entropies,
        token_coefficients=token_coefficients,
        gradient_part_linearised=linear,
        timings=dict(clock),
    )


def _neutral(update, base: RowOutcome, at: RowOutcome | None, g, h, xbar, beta, target) -> EntropyNeutral:
    """The entropy-neutral record: β* with SE(δH₁ at β*) / |f'(β*)|, and the lr scale reaching the target."""
    ratio = target / base.delta_h1 if base.delta_h1 != 0 else -1.0
    lr_scale = ratio + 0.0 if ratio >= 0 else None  # + 0.0: a target of 0 reads 0, not −0
    if beta is None:
        return EntropyNeutral(target, None, None, None, lr_scale)
    # f'(β*) by a central difference of X̄·Δθ(g + (β* ± δ) h), δ a millionth of β*'s scale
    delta = max(abs(beta), 1e-12) * 1e-6
    ahead, behind = update.delta_theta(g + (beta + delta) * h), update.delta_theta(g + (beta - delta) * h)
    slope = float(xbar @ (ahead - behind)) / (2 * delta)
    coef_se = None if slope == 0 else at.se / abs(slope)
    return EntropyNeutral(target, update.terms.entropy_coef + beta, coef_se, at, lr_scale)


__all__ = [
    "Alternative",
    "EntropyNeutral",
    "RowOutcome",
    "WhatIfOutcome",
    "alternative",
    "solve_entropy_coef",
    "what_if",
]
