"""δH₁ = X̄ · Δθ from an E and a U batch, with standard errors and attributions (docs/math.md §4–§6).

`compute_delta_h1` runs the passes of `passes` in order:
  1. U (emulated rules only): g = ∇J, and the per-group gradients when they fit the budget;
  2. Δθ = rule(g), or the given (observed) step;
  3. E: X̄ and every row's share of X̄·Δθ (SE_E, the E attributions);
  4. SE_U and the U attributions: a jackknife over the cached group gradients, or the delta method.
It returns a `DeltaH1Estimate`: typed numbers (the fields of delta_h1.json) and the tensors behind them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from .artifacts.delta_h1 import TargetEstimate
from .errors import ProbeError
from .estimators import TARGETS, EntropyCoefs, entropy_coefficients, naive_coefficients
from .importance import Reuse, standard_error
from .loss_terms import UCoefficients, kl_slope
from .multi_step import leave_one_group_out_chains, momentum_chain, run_chain
from .passes import (
    as_direction,
    entropy_pass,
    entropy_rows,
    group_gradients,
    policy_gradient,
    token_advantage_covariance,
    u_row_terms,
)
from .scoring import Batch, accumulation_dtype
from .specs import ComputeBudget
from .tangents import RowDirectional
from .update import (
    UPDATE_CHUNK,
    FlatLayout,
    group_denominators,
    group_terms_from_rows,
    is_long,
    jackknife_se,
    pg_coefficients,
)
from .update_rule import UpdateRule

log = logging.getLogger(__name__)

NO_SE_U_FEW_GROUPS = "fewer than 2 prompt groups with non-zero advantage: SE_U cannot be estimated"
NO_U_OBSERVED = "the step is given (observed): no U batch"


class Clock(dict):
    """Seconds per phase (for the log): `clock("phase", fn, *args)` calls fn and adds its wall time."""

    def __call__(self, phase: str, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self[phase] = round(self.get(phase, 0.0) + time.perf_counter() - start, 4)


@dataclass
class UGradient:
    """The U pass: J's per-token coefficients, g = ∇J (flat) and, when cached, the per-group gradients [B, P]."""

    coefs: UCoefficients
    g: Tensor | None  # None once a long g has been overwritten by the linearisation u (`u_uncertainty`)
    g_groups: Tensor | None


@dataclass
class EGradient:
    """The E pass: X̄ (flat), the configured target's influence values ψ [N], every target's estimate."""

    xbar: Tensor
    psi: Tensor
    entropy: float
    targets: dict[str, TargetEstimate]
    naive: tuple[float, float] | None = None  # (δH₁, SE_E) of the surprisal estimator (all_targets only)


@dataclass
class UUncertainty:
    """SE_U, how it was estimated (or why not), and the U groups' attributions."""

    se_U: float | None = None
    se_U_method: str | None = None
    se_U_note: str | None = None
    attribution: Tensor | None = None  # [B] u·g_b: linearised contributions (Σ = the linearised gradient part)
    attribution_loo: Tensor | None = None  # [B] δH₁ − X̄·Δθ(g₋b), with the cached group gradients
    denominators: Tensor | None = None  # [B] each group's share D_b of the loss normaliser (`group_denominators`)


@dataclass
class DeltaH1Estimate:
    """Every number of delta_h1.json's estimate (U-dependent ones None for an observed step), and the tensors."""

    delta_h1: float
    delta_h1_from_tangents: float
    learning_rate: float
    bars_dot: float
    entropy: float
    se_delta_h1: float
    se_E: float
    se_U: float | None
    se_U_method: str | None
    se_U_note: str | None
    delta_h1_gradient_part: float | None
    delta_h1_momentum_part: float | None
    delta_h1_gradient_part_linearised: float | None
    delta_h1_naive: float | None
    se_E_naive: float | None
    cov_logp_advantage: float | None
    norm_xbar: float
    norm_delta_theta: float
    norm_g: float | None
    targets: dict[str, TargetEstimate]
    # tensors (not in delta_h1.json): flat X̄ and Δθ in layout order, attributions
    xbar: Tensor = field(repr=False)
    delta_theta: Tensor = field(repr=False)
    e_contributions: Tensor = field(repr=False)  # [N_E] ψ_i / N: each E sequence's share of δH₁
    u_attribution: Tensor | None = field(default=None, repr=False)
    u_attribution_loo: Tensor | None = field(default=None, repr=False)
    # the U pass's per-group gradients g_b [B, P] (full-batch normaliser) and shares D_b [B] of the normaliser,
    # when cached (compute.u_gradient_cache_mb): the trainer's own draw is simulated from them (`forecast`)
    u_group_gradients: Tensor | None = field(default=None, repr=False)
    u_group_denominators: Tensor | None = field(default=None, repr=False)
    timings: dict[str, float] = field(default_factory=dict, repr=False)

    def report_fields(self) -> dict:
        """The fields DeltaH1Report takes from the estimate: every number (the tensors have repr=False)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.repr}


def trainable_parameters(model, layout: FlatLayout) -> list[torch.nn.Parameter]:
    named = dict(model.named_parameters())
    return [named[n] for n in layout.names]


def u_gradient(model, layout, U: Batch, update: UpdateRule, u_weights, budget: ComputeBudget, clock) -> UGradient:
    """Pass 1: g = ∇J with the trainer's loss aggregation, with per-group gradients when they fit the budget
    and the hooks know every module using a trainable tensor (else SE_U by the delta method, one more U pass)."""
    params = trainable_parameters(model, layout)
    dtype = accumulation_dtype(params[0])
    slope = None if not update.terms.kl_coef else clock("u_reference", reference_kl_slope, model, U, budget.max_tokens)
    coefs = u_coefficients(U, update, u_weights, dtype, slope)
    _, groups = torch.unique(U.tensors["group_index"], return_inverse=True)
    n_groups = int(groups.max()) + 1
    hooks_work = RowDirectional.supports(model, layout.names)
    cache_bytes = n_groups * layout.numel * torch.empty((), dtype=dtype).element_size()
    if hooks_work and not update.state.sharded and cache_bytes <= budget.u_cache_mb * 2**20:
        g, g_groups = clock(
            "u_gradient", group_gradients, model, params, layout.names, U, coefs, groups, budget.max_tokens
        )
        return UGradient(coefs, g, g_groups)
    why = (
        "a trainable tensor is used by a module the hooks do not know"
        if not hooks_work
        else "the policy is sharded (compute.shard fsdp)"
        if update.state.sharded
        else f"{n_groups} groups × {layout.numel} parameters exceed compute.u_gradient_cache_mb = {budget.u_cache_mb:g}"
    )
    log.info("delta-h1: no per-group U gradients (%s): SE_U by the delta method, one more U pass", why)
    g = clock("u_gradient", policy_gradient, model, params, layout, U, coefs, budget.max_tokens)
    return UGradient(coefs, g, None)


def u_coefficients(U: Batch, update: UpdateRule, u_weights, dtype, slope: Tensor | None = None) -> UCoefficients:
    """J's per-token coefficients over U for `update`: the loss aggregation's, times A, and its `loss_terms`
    (slope: the KL penalty's 1 − exp(r − ℓ), `reference_kl_slope`, when it has one)."""
    mode, max_len = update.loss_agg_mode, update.max_len
    advantages = U.tensors["advantages"].to(dtype)
    pg = pg_coefficients(advantages, U.mask, mode, max_len, u_weights).to(dtype)
    weights = None
    if update.terms.entropy_coef or update.terms.kl_coef:
        weights = pg_coefficients(torch.ones_like(advantages), U.mask, mode, max_len, u_weights).to(dtype)
    return UCoefficients.of(update.terms, pg, weights, U.tensors, U.mask, slope)


def reference_kl_slope(model, U: Batch, max_tokens: int) -> Tensor:
    """1 − exp(r − ℓ) over U: ℓ under θ, r under the reference — U's `reference_logprobs` when the probe was given a
    reference model (`Probe(kl_reference=...)`, checkpoint.kl_reference: a full-parameter run's starting model, TRL's
    ref_model), else for a PEFT model the base with the adapter off (TRL's reference for a LoRA run); a model
    without an adapter and no reference is refused."""
    policy = U.token_stats(model, max_tokens, "U log-probs")["logprobs"]
    given = U.tensors.get("reference_logprobs")
    if given is not None:
        return kl_slope(policy, given.to(policy), U.mask)
    if not hasattr(model, "disable_adapter"):
        raise ProbeError(
            "a KL penalty needs the reference policy, which a full-parameter checkpoint does not hold",
            "set checkpoint.kl_reference to the model the run started from, or update.kl_coef: 0",
        )
    with model.disable_adapter():
        reference = U.token_stats(model, max_tokens, "U reference log-probs")["logprobs"]
    return kl_slope(policy, reference, U.mask)


def e_coefficients(E: Batch, estimator, target: str, e_weights, dtype) -> EntropyCoefs:
    """The RB estimator's per-token coefficients over E for `target` (estimator: baseline, ridge, folds)."""
    features = torch.stack([E.tensors["top1_prob"], E.tensors["margin"]], dim=-1).to(dtype)
    return entropy_coefficients(
        E.tensors["entropies"].to(dtype),
        E.mask,
        target=target,
        baseline=estimator.baseline,
        features=features,
        ridge=estimator.ridge,
        folds=estimator.crossfit_folds,
        weights=e_weights,
    )


def e_gradient(model, layout, E: Batch, estimator, e_weights, delta_theta, budget: ComputeBudget, clock) -> EGradient:
    """Pass 3: X̄ for estimator.entropy and each row's share of X̄·Δθ, from ordinary backwards with row hooks;
    with compute.all_targets (or parameters the hooks cannot see) per-token tangents by double backward,
    which give all three targets and the naive estimate."""
    params = trainable_parameters(model, layout)
    dtype = accumulation_dtype(params[0])
    direction = as_direction(delta_theta, layout, params)

    def coefficients(target: str) -> EntropyCoefs:
        return e_coefficients(E, estimator, target, e_weights, dtype)

    max_tokens = budget.max_tokens
    if budget.all_targets or not RowDirectional.supports(model, layout.names):
        coefs = {t: coefficients(t) for t in TARGETS}
        main = coefs[estimator.entropy]
        xbar, dH, dlogp = clock("e_gradient", entropy_pass, model, params, layout, E, main, direction, max_tokens)
        targets = {}
        for t, cf in coefs.items():
            est, se = cf.estimate(dH, dlogp)
            targets[t] = TargetEstimate(delta_h1=est, se_E=se, entropy=cf.entropy)
        naive = naive_coefficients(E.tensors["logprobs"].to(dtype), E.mask, target=estimator.entropy, weights=e_weights)
        return EGradient(xbar, main.influence(dH, dlogp), main.entropy, targets, naive.estimate(None, dlogp))
    main = coefficients(estimator.entropy)
    xbar, ws, beta = clock("e_gradient", entropy_rows, model, params, layout.names, E, main, direction, max_tokens)
    psi = main.influence_from_rows(ws, beta)
    target = TargetEstimate(delta_h1=psi.mean().item(), se_E=standard_error(psi), entropy=main.entropy)
    return EGradient(xbar, psi, main.entropy, {estimator.entropy: target})


def nonzero_advantage_groups(U: Batch) -> int:
    """How many prompt groups have an advantage ≠ 0 (the only groups that move g)."""
    moving = U.tensors["advantages"].abs() > 0
    return int(torch.unique(U.tensors["group_index"][moving]).numel())


def group_dots(g_groups: Tensor, u: Tensor) -> Tensor:
    """[B] g_b · u in float64, over slices of the parameters when g_groups is long (no [B, P] float64 copy)."""
    if g_groups.numel() <= UPDATE_CHUNK:
        return g_groups.double() @ u.double()
    out = torch.zeros(g_groups.shape[0], dtype=torch.float64, device=u.device)
    for start in range(0, u.numel(), UPDATE_CHUNK):
        cols = slice(start, start + UPDATE_CHUNK)
        out += g_groups[:, cols].double() @ u[cols].double()
    return out


def u_uncertainty(model, layout, U: Batch, update: UpdateRule, ug: UGradient, xbar, delta_h1, u_weights, budget, clock):
    """Pass 4: SE_U and the U attributions (§5.2): with the group gradients a jackknife over prompt groups
    through the real update rule and leave-one-group-out attributions (no further pass); without them the
    delta method from one more U backward with row hooks along u = (∂Δθ/∂g)ᵀ X̄ — for a long g (a full-parameter
    model) written over g, which nothing needs afterwards (ug.g is None then)."""
    in_place = ug.g_groups is None and is_long(ug.g.numel())
    u = clock("linearise", update.linearised, ug.g, xbar, ug.g if in_place else None)
    if in_place:
        ug.g = None
    out = UUncertainty()
    if ug.g_groups is not None:
        out.attribution = group_dots(ug.g_groups, u)  # u·g_b: Σ_b = u·g, from the cache instead of a third pass
        denominators = group_denominators(U.mask, U.tensors["group_index"], update.loss_agg_mode, u_weights)
        loo = clock("jackknife", update.leave_one_group_out, ug.g, ug.g_groups, denominators, xbar)
        out.se_U, out.se_U_method, out.attribution_loo = (
            jackknife_se(loo),
            "jackknife over U prompt groups",
            delta_h1 - loo,
        )
        out.denominators = denominators
    else:
        params = trainable_parameters(model, layout)
        direction = as_direction(u, layout, params)
        rows = clock("u_tangents", u_row_terms, model, params, layout.names, U, ug.coefs, direction, budget.max_tokens)
        groups = U.tensors["group_index"]
        out.attribution, influence = group_terms_from_rows(rows, U.mask, groups, update.loss_agg_mode, u_weights)
        out.se_U, out.se_U_method = standard_error(influence), "delta method"
    if nonzero_advantage_groups(U) < 2:
        out.se_U, out.se_U_note = None, NO_SE_U_FEW_GROUPS
    return out


def compute_delta_h1(
    model,
    E: Batch,
    U: Batch | None,
    layout: FlatLayout,
    update: UpdateRule,
    estimator,
    budget: ComputeBudget = ComputeBudget(),
    reuse: Reuse | None = None,
) -> DeltaH1Estimate:
    """δH₁ = X̄·Δθ ± SE for `update` (an emulated rule on U, or an observed step with U None).

    `reuse`: importance weights of samples another checkpoint drew (None: this checkpoint drew them, which
    makes this the plain unweighted computation). Sums are kept in the parameters' dtype promoted to ≥ float32;
    δH₁ is accumulated in float64.
    """
    if update.emulated == (U is None):
        raise ValueError("an emulated update rule needs a U batch; an observed step takes none")
    dtype = accumulation_dtype(trainable_parameters(model, layout)[0])
    e_w = None if reuse is None or reuse.e_weights is None else reuse.e_weights.to(dtype)
    u_w = None if reuse is None or reuse.u_weights is None else reuse.u_weights.to(dtype)
    clock = Clock()
    if update.chain is not None:
        return _chain_delta_h1(model, E, U, layout, update, estimator, budget, e_w, u_w, clock)
    ug = None
    if update.emulated:
        ug = u_gradient(model, layout, U, update, u_w, budget, clock)
        norm_g = float(update.state.norm(ug.g))
        delta_theta = clock("update", update.delta_theta, ug.g)
    else:
        delta_theta = update.observed.delta_theta  # float64; float32 over a long layout (`observed.delta_theta`)
    eg = e_gradient(model, layout, E, estimator, e_w, delta_theta, budget, clock)
    delta_h1 = float(update.state.dot(eg.xbar, delta_theta))  # all-reduced when the vectors are shards
    unc = UUncertainty(se_U_note=NO_U_OBSERVED)
    parts: dict[str, float | None] = {}
    if ug is not None:
        unc = u_uncertainty(model, layout, U, update, ug, eg.xbar, delta_h1, u_w, budget, clock)
        momentum = update.momentum_dot(eg.xbar)
        parts = dict(
            delta_h1_gradient_part=delta_h1 - momentum,
            delta_h1_momentum_part=momentum,
            delta_h1_gradient_part_linearised=float(unc.attribution.sum()),
            cov_logp_advantage=token_advantage_covariance(
                U.tensors["logprobs"], U.tensors["advantages"].to(dtype), U.mask
            ),
            norm_g=norm_g,
        )
    estimate = _estimate(eg, unc, delta_h1, delta_theta, update, len(E), parts, estimator.entropy, clock)
    if ug is not None and unc.denominators is not None:
        estimate.u_group_gradients, estimate.u_group_denominators = ug.g_groups, unc.denominators
    return estimate


def _chain_delta_h1(model, E, U, layout, update, estimator, budget, e_w, u_w, clock) -> DeltaH1Estimate:
    """δH₁ along the k-step chain (`multi_step`): Δθ = θ_k − θ₀; SE_U by the jackknife over U's prompt groups,
    each left out through the whole chain (B more chains); U attributions are those leave-one-out values."""
    if u_w is not None:
        raise ProbeError(
            "several steps per U batch need U drawn by this checkpoint (the clipped ratio is relative to it)",
            "sample U with this checkpoint, or set update.mini_batches: 1 and update.epochs: 1",
        )
    chain, max_tokens = update.chain, budget.max_tokens
    result = clock("u_chain", run_chain, model, layout, U, update, chain, max_tokens)
    delta_theta = result.delta_theta
    eg = e_gradient(model, layout, E, estimator, e_w, delta_theta, budget, clock)
    delta_h1 = float((eg.xbar.double() * delta_theta).sum())
    unc = UUncertainty()
    if nonzero_advantage_groups(U) < 2:
        unc.se_U_note = NO_SE_U_FEW_GROUPS
    else:
        loo = clock("jackknife", leave_one_group_out_chains, model, layout, U, update, chain, eg.xbar, max_tokens)
        unc.se_U, unc.se_U_method, unc.attribution_loo = (
            jackknife_se(loo),
            "jackknife over U prompt groups",
            delta_h1 - loo,
        )
    momentum = float((eg.xbar.double() * momentum_chain(update, chain)).sum())
    parts = dict(
        delta_h1_gradient_part=delta_h1 - momentum,
        delta_h1_momentum_part=momentum,
        cov_logp_advantage=token_advantage_covariance(
            U.tensors["logprobs"], U.tensors["advantages"].to(result.first_gradient.dtype), U.mask
        ),
        norm_g=float(result.first_gradient.double().norm()),
    )
    return _estimate(eg, unc, delta_h1, delta_theta, update, len(E), parts, estimator.entropy, clock)


def _estimate(
    eg: EGradient, unc: UUncertainty, delta_h1, delta_theta, update: UpdateRule, n_e, parts, target, clock
) -> DeltaH1Estimate:
    main, lr = eg.targets[target], update.learning_rate
    se_total = main.se_E if unc.se_U is None else (main.se_E**2 + unc.se_U**2) ** 0.5
    eg.targets[target] = main.model_copy(update=dict(se_U=unc.se_U, se_delta_h1=se_total))
    empty = dict.fromkeys(
        (
            "delta_h1_gradient_part",
            "delta_h1_momentum_part",
            "delta_h1_gradient_part_linearised",
            "cov_logp_advantage",
            "norm_g",
        )
    )
    naive_est, naive_se = eg.naive if eg.naive is not None else (None, None)
    return DeltaH1Estimate(
        delta_h1=delta_h1,
        delta_h1_from_tangents=main.delta_h1,
        learning_rate=lr,
        bars_dot=delta_h1 / lr,
        entropy=eg.entropy,
        se_delta_h1=se_total,
        se_E=main.se_E,
        se_U=unc.se_U,
        se_U_method=unc.se_U_method,
        se_U_note=unc.se_U_note,
        delta_h1_naive=naive_est,
        se_E_naive=naive_se,
        norm_xbar=float(update.state.norm(eg.xbar)),
        norm_delta_theta=float(update.state.norm(delta_theta)),
        targets=eg.targets,
        xbar=eg.xbar,
        delta_theta=delta_theta,
        e_contributions=eg.psi / n_e,
        u_attribution=unc.attribution,
        u_attribution_loo=unc.attribution_loo,
        timings=dict(clock),
        **{**empty, **parts},
    )


__all__ = [
    "Clock",
    "DeltaH1Estimate",
    "NO_SE_U_FEW_GROUPS",
    "compute_delta_h1",
    "e_gradient",
    "u_gradient",
    "u_uncertainty",
]
