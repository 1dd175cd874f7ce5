"""δH₁ = X̄ · Δθ from an E and a U batch, with standard errors and attributions (docs/math.md §4–§6).

Passes over the data (each in token-budget microbatches, `scoring.Batch.scored`):
  1. U, one ordinary backward: g = ∇J = ∇ Σ c_ij logp_ij (policy gradient, §4.2) and, with `GroupGradients`
     hooks, the per-prompt-group gradients g_b (Σ_b g_b = g) when B × trainable parameters fit
     `u_cache_mb` and every trainable parameter is a Linear weight/bias (LoRA).
  2.              Δθ = update(g)                                   (adam_step | adam_precond | sgd, §4.4–4.5)
     or Δθ given (an observed step θ(next) − θ(this); then there is no U batch).
  3. E, one ordinary backward: X̄ = ∇ Σ_i w_i Σ_k (a_ik H_ik + c_ik logp_ik) for estimator.entropy and, with
     `RowDirectional` hooks, every row's w_i X_i·Δθ (§6.2) — SE_E and the E attributions; for token_mean a
     second backward through the same graph gives β = ∇E[L]·Δθ for the delta method (§5.1).
     `all_targets`: instead per-token tangents dH_ik, dlogp_ik by double backward (§6.1), which give all
     three targets and the naive estimate, at about twice the memory.
  4. SE_U and the U attributions (§5.2): with the group gradients, a jackknife over prompt groups through
     the real update rule (clipping and Adam included) and leave-one-group-out attributions — no further
     pass; without them, the delta method from one more U backward with `RowDirectional` hooks along
     u = (∂Δθ/∂g)ᵀ X̄. With fewer than two groups of non-zero advantage SE_U cannot be estimated (None).
No per-sample parameter-sized gradient is ever formed. Sums are kept in the trainable parameters' dtype
promoted to at least float32 (float32 for float32/half models, float64 for a float64 model).

Samples drawn by another checkpoint are re-scored and importance-weighted (`reuse_weights`, §5.4).
Under torchrun every process runs each pass over its share of the rows (`Batch.shard`) and all-reduces
the sums, so every process ends with the one-process results (up to summation order).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import torch

from .errors import ProbeError
from .estimators import TARGETS, EntropyCoefs, entropy_coefficients, naive_coefficients
from .importance import importance_weights, standard_error
from .scoring import Batch, accumulation_dtype
from .tangents import GroupGradients, RowDirectional, grad_and_tangents
from .update import (
    AdamState,
    FlatLayout,
    group_denominators,
    group_terms_from_rows,
    jackknife_se,
    leave_one_group_out,
    linearise,
    pg_coefficients,
    update_direction,
    zero_gradient_part,
)

log = logging.getLogger(__name__)


def _flat(grads, params, dtype: torch.dtype) -> torch.Tensor:
    """The gradients as one flat vector in `dtype`; None (a parameter off the outputs' path) counts as 0."""
    return torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1).to(dtype) for x, p in zip(grads, params)])


def policy_gradient(model, params, layout: FlatLayout, U: Batch, coef: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """g = ∇_θ Σ_ij coef_ij logp_ij over U, as a flat vector in the accumulation dtype."""
    dtype = accumulation_dtype(params[0])
    g = torch.zeros(layout.numel, dtype=dtype, device=coef.device)
    for rows, stats in U.scored(model, max_tokens, "U gradient", with_grad=True, entropies=False):
        grads, _ = grad_and_tangents([stats.logprobs], [coef[rows]], params, None)
        g += _flat(grads, params, dtype)
    return U.reduce(g)


def group_gradients(model, params, names, U: Batch, coef: torch.Tensor, groups: torch.Tensor, max_tokens: int):
    """(g flat, g_b [B, P]) from one ordinary backward per microbatch with `GroupGradients` hooks.

    `groups` [N]: every U row's group number 0..B−1. Σ_b g_b = g up to summation order.
    """
    dtype = accumulation_dtype(params[0])
    g = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=coef.device)
    hooks = GroupGradients(model, names, int(groups.max()) + 1)
    with hooks:
        for rows, stats in U.scored(model, max_tokens, "U gradient", with_grad=True, entropies=False):
            hooks.rows_group = groups[rows]
            grads = torch.autograd.grad([stats.logprobs], params, grad_outputs=[coef[rows]], allow_unused=True)
            g += _flat(grads, params, dtype)
    return U.reduce(g), U.reduce(hooks.flat(names))


def entropy_rows(model, params, names, E: Batch, coefs: EntropyCoefs, direction, max_tokens: int):
    """(X̄ flat, w_i X_i·v per row [N], β or None) for one target from ordinary backwards with row hooks.

    X̄ = ∇ Σ_i w_i Σ_k (a_ik H_ik + c_ik logp_ik); the hooks give each row's share of X̄·v. token_mean's
    delta method also needs β = Σ_i w_i Σ_j len_c_ij dlogp_ij = v·∇ Σ w len_c logp: a second backward
    through the same graph (`retain_graph`), hooks only.
    """
    dtype = accumulation_dtype(params[0])
    w = coefs.weights.unsqueeze(1).to(coefs.a.dtype)
    a, c = (coefs.a * w).to(dtype), (coefs.c * w).to(dtype)
    len_c = None if coefs.len_c is None else (coefs.len_c * w).to(dtype)
    xbar = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=a.device)
    rows_out = torch.zeros(len(E), dtype=dtype, device=a.device)
    beta = torch.zeros((), dtype=dtype, device=a.device)
    hooks = RowDirectional(model, names, direction)
    beta_pass = len_c is not None
    with hooks:
        passes = E.scored(
            model, max_tokens, "E gradient", with_grad=True, entropies=False, coefs=(a, c), logprob_grad=beta_pass
        )
        for rows, stats in passes:
            grads = torch.autograd.grad(stats.surrogate.sum(), params, retain_graph=beta_pass, allow_unused=True)
            xbar += _flat(grads, params, dtype)
            rows_out[rows] = _taken(hooks, grads)
            if beta_pass:
                grads = torch.autograd.grad([stats.logprobs], params, grad_outputs=[len_c[rows]], allow_unused=True)
                beta += _taken(hooks, grads).sum()
    return E.reduce(xbar), E.reduce(rows_out), (E.reduce(beta) if beta_pass else None)


def _taken(hooks: RowDirectional, grads) -> torch.Tensor | float:
    """The hooks' per-row sums of the last backward; 0 only when no parameter got a gradient either."""
    taken = hooks.take()  # None: no hooked layer is on the path to these outputs
    if taken is None and any(g is not None for g in grads):  # the hooks missed a path: never report 0
        raise RuntimeError("RowDirectional hooks did not fire although the parameters got gradients")
    return 0.0 if taken is None else taken


def entropy_pass(model, params, layout, E: Batch, coefs: EntropyCoefs, direction, max_tokens: int):
    """(X̄ flat, dH [N,R], dlogp [N,R]) with X̄ = ∇ Σ_i w_i Σ_k (a H + c logp), tangents along direction
    (direction None: X̄ alone, tangents None)."""
    dtype = accumulation_dtype(params[0])
    w = coefs.weights.unsqueeze(1).to(coefs.a.dtype)
    a, c = (coefs.a * w).to(dtype), (coefs.c * w).to(dtype)
    xbar = torch.zeros(layout.numel, dtype=dtype, device=a.device)
    if direction is None:  # X̄ alone: one backward of the surrogate a·H + c·ℓ (one head product per chunk)
        passes = E.scored(
            model, max_tokens, "E gradient", with_grad=True, entropies=False, coefs=(a, c), logprob_grad=False
        )
        for _, stats in passes:
            xbar += _flat(torch.autograd.grad(stats.surrogate.sum(), params, allow_unused=True), params, dtype)
        return E.reduce(xbar), None, None
    dH, dlogp = torch.zeros_like(a), torch.zeros_like(a)
    for rows, stats in E.scored(model, max_tokens, "E gradient", with_grad=True):
        grads, (dH[rows], dlogp[rows]) = grad_and_tangents(
            [stats.entropies, stats.logprobs], [a[rows], c[rows]], params, direction
        )
        xbar += _flat(grads, params, dtype)
    return E.reduce(xbar), E.reduce(dH), E.reduce(dlogp)  # tangents: rows of other shards are 0 here


def u_row_terms(model, params, names: list[str], U: Batch, coef: torch.Tensor, direction, max_tokens: int):
    """row_i = Σ_j coef_ij ∇logp_ij · direction for every U row, [N] — all the U attributions need.

    One ordinary backward per microbatch with `RowDirectional` hooks when every trainable parameter is a
    Linear weight/bias (LoRA); otherwise per-token tangents by double backward, summed with coef.
    """
    rows_out = torch.zeros(len(U), dtype=accumulation_dtype(params[0]), device=coef.device)
    row_dots = RowDirectional.supports(model, names)
    hooks = RowDirectional(model, names, direction) if row_dots else contextlib.nullcontext()
    with hooks:
        for rows, stats in U.scored(model, max_tokens, "U tangents", with_grad=True, entropies=False):
            if row_dots:
                grads = torch.autograd.grad([stats.logprobs], params, grad_outputs=[coef[rows]], allow_unused=True)
                rows_out[rows] = _taken(hooks, grads)
            else:
                ones = U.mask[rows].to(coef.dtype)
                _, (dlogp,) = grad_and_tangents([stats.logprobs], [ones], params, direction)
                rows_out[rows] = (coef[rows] * dlogp).sum(-1)
    return U.reduce(rows_out)


def token_advantage_covariance(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> float:
    """Cui et al. (2025) diagnostic: Cov(log π(y_t), A_t) over the U batch's response tokens (§5.5)."""
    logp = logprobs[mask].double()
    adv = advantages.unsqueeze(1).expand_as(mask)[mask].double()
    return ((logp - logp.mean()) * (adv - adv.mean())).mean().item()


# ---------------------------------------------------------------------------------------------
# reuse of samples drawn by another checkpoint


@dataclass
class Reuse:
    """The importance weights of cached samples (None = this checkpoint drew them) and what to report."""

    e_weights: torch.Tensor | None  # self-normalised (sum 1), for the E estimator
    u_weights: torch.Tensor | None  # normalised to mean 1, for the U coefficients
    ess: dict[str, float]  # "E"/"U" -> ESS of the re-weighted batches only


def reuse_weights(
    model, E: Batch, U: Batch, foreign: dict[str, str | None], max_tokens: int, min_ess_fraction: float, force: bool
) -> Reuse:
    """Re-score the batches named in `foreign` ("E"/"U" -> the checkpoint that drew them) under `model` and
    weight them by π_probed(y)/π_behaviour(y) (docs/math.md §5.4); below min_ess_fraction refuse unless force."""
    weights: dict[str, torch.Tensor | None] = {"E": None, "U": None}
    ess = {}
    for name, batch in (("E", E), ("U", U)):
        if name not in foreign:
            continue
        w, ess[name] = importance_weights(batch.rescore(model, max_tokens))
        fraction = ess[name] / len(batch)
        log.info(
            "delta-h1: %s samples drawn by checkpoint %s; importance-weighted, ESS/N = %.3f",
            name,
            foreign[name],
            fraction,
        )
        if fraction < min_ess_fraction and not force:
            raise ProbeError(
                f"the {name} samples (drawn by checkpoint {foreign[name]}) have ESS/N = {fraction:.3f} under this "
                f"checkpoint, below reuse.min_ess_fraction = {min_ess_fraction}",
                "re-sample with this checkpoint (sampling.checkpoint), or set reuse.force: true to compute anyway",
            )
        weights[name] = w if name == "E" else w * len(batch)
    return Reuse(weights["E"], weights["U"], ess)


# ---------------------------------------------------------------------------------------------
# the whole computation, on in-memory batches


@dataclass
class UpdateSpec:
    rule: str
    state: AdamState
    max_grad_norm: float | None
    loss_agg_mode: str
    max_len: int | None


NO_SE_U_FEW_GROUPS = "fewer than 2 prompt groups with non-zero advantage: SE_U cannot be estimated"


def _nonzero_advantage_groups(U: Batch) -> int:
    """How many prompt groups have an advantage ≠ 0 (the only groups that move g)."""
    moving = U.tensors["advantages"].abs() > 0
    groups = U.tensors["group_index"][moving]
    return int(torch.unique(groups).numel())


def cache_fits(n_groups: int, numel: int, dtype: torch.dtype, budget_mb: float) -> bool:
    """Whether the per-group U gradients (n_groups × numel in `dtype`) fit the budget in MiB."""
    return n_groups * numel * torch.empty((), dtype=dtype).element_size() <= budget_mb * 2**20


def compute_delta_h1(
    model,
    E: Batch,
    U: Batch | None,
    layout: FlatLayout,
    spec: UpdateSpec | None,
    estimator,
    max_tokens: int,
    e_weights: torch.Tensor | None = None,
    u_weights: torch.Tensor | None = None,
    *,
    all_targets: bool = False,
    u_cache_mb: float = 4096.0,
    delta_theta: torch.Tensor | None = None,
) -> dict:
    """Every number of delta_h1.json plus the flat X̄ and Δθ (keys `xbar`, `delta_theta`) and attributions.

    e_weights: self-normalised importance weights of the E sequences (sum 1; None = uniform);
    u_weights: those of the U sequences scaled to mean 1 (None = all 1). Both are None when the probed
    checkpoint drew the samples, which makes this the plain, unweighted computation.
    all_targets: per-token tangents for all three targets and the naive estimate (double backward);
    otherwise estimator.entropy only, from ordinary backwards. u_cache_mb: budget for the per-group U
    gradients (jackknife SE_U); 0 or over budget: the delta method. delta_theta: a given step (flat float64,
    layout order; e.g. an observed one) — then U and spec are None and every U-dependent entry is None.
    `timings` (seconds per phase) are for the log only.
    """
    params = dict(model.named_parameters())
    params = [params[n] for n in layout.names]
    dtype = accumulation_dtype(params[0])
    if e_weights is not None:
        e_weights = e_weights.to(dtype)
    if u_weights is not None:
        u_weights = u_weights.to(dtype)
    timings: dict[str, float] = {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        timings[name] = round(time.perf_counter() - start, 4)
        return out

    def as_direction(flat: torch.Tensor) -> list[torch.Tensor]:
        return [d.to(p.dtype) for d, p in zip(layout.unflatten(flat.to(dtype)).values(), params)]

    hooks_work = RowDirectional.supports(model, layout.names)
    observed = delta_theta is not None
    g = g_groups = None
    if observed:
        if U is not None or spec is not None:
            raise ValueError("a given delta_theta replaces the U batch and the update rule: pass U=None, spec=None")
        delta_theta = delta_theta.to(torch.float64)
    else:
        advantages = U.tensors["advantages"].to(dtype)
        pg_coef = pg_coefficients(advantages, U.mask, spec.loss_agg_mode, spec.max_len, u_weights).to(dtype)
        _, groups = torch.unique(U.tensors["group_index"], return_inverse=True)
        n_groups = int(groups.max()) + 1
        use_cache = hooks_work and cache_fits(n_groups, layout.numel, dtype, u_cache_mb)
        if not use_cache:
            why = (
                "not every trainable parameter is a Linear weight/bias"
                if not hooks_work
                else (
                    f"{n_groups} groups × {layout.numel} parameters exceed compute.u_gradient_cache_mb = {u_cache_mb:g}"
                )
            )
            log.info("delta-h1: no per-group U gradients (%s): SE_U by the delta method, one more U pass", why)
        if use_cache:
            g, g_groups = timed(
                "u_gradient", group_gradients, model, params, layout.names, U, pg_coef, groups, max_tokens
            )
        else:
            g = timed("u_gradient", policy_gradient, model, params, layout, U, pg_coef, max_tokens)
        start = time.perf_counter()
        delta_theta = update_direction(spec.rule, g.double(), spec.state, spec.max_grad_norm)
        delta_zero = zero_gradient_part(spec.rule, spec.state, spec.max_grad_norm)
        timings["update"] = round(time.perf_counter() - start, 4)
    direction = as_direction(delta_theta)

    features = torch.stack([E.tensors["top1_prob"], E.tensors["margin"]], dim=-1).to(dtype)

    def coefficients(target: str) -> EntropyCoefs:
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

    per_target = {}
    naive_est = naive_se = None
    if all_targets or not hooks_work:
        coefs = {t: coefficients(t) for t in TARGETS}
        main = coefs[estimator.entropy]
        xbar, dH, dlogp = timed("e_gradient", entropy_pass, model, params, layout, E, main, direction, max_tokens)
        for t, cf in coefs.items():
            est, se = cf.estimate(dH, dlogp)
            per_target[t] = {"delta_h1": est, "se_E": se, "entropy": cf.entropy}
        naive = naive_coefficients(E.tensors["logprobs"].to(dtype), E.mask, target=estimator.entropy, weights=e_weights)
        naive_est, naive_se = naive.estimate(None, dlogp)
        psi = main.influence(dH, dlogp)
    else:
        main = coefficients(estimator.entropy)
        xbar, ws, beta = timed("e_gradient", entropy_rows, model, params, layout.names, E, main, direction, max_tokens)
        psi = main.influence_from_rows(ws, beta)
        per_target[estimator.entropy] = {
            "delta_h1": psi.mean().item(),
            "se_E": standard_error(psi),
            "entropy": main.entropy,
        }
    se_e = per_target[estimator.entropy]["se_E"]
    delta_h1 = float((xbar.double() * delta_theta).sum())

    u_results = {
        "se_U": None,
        "se_U_method": None,
        "se_U_note": "the step is given (observed): no U batch" if observed else None,
        "delta_h1_gradient_part": None,
        "delta_h1_momentum_part": None,
        "delta_h1_gradient_part_linearised": None,
        "cov_logp_advantage": None,
        "norm_g": None,
        "u_attribution": None,
        "u_attribution_loo": None,
    }
    if not observed:
        u_results.update(
            _u_uncertainty(
                model,
                params,
                layout,
                U,
                spec,
                pg_coef,
                g,
                g_groups,
                xbar,
                delta_h1,
                u_weights,
                as_direction,
                max_tokens,
                timings,
            )
        )
        momentum_part = float((xbar.double() * delta_zero).sum())
        u_results.update(
            delta_h1_gradient_part=delta_h1 - momentum_part,
            delta_h1_momentum_part=momentum_part,
            cov_logp_advantage=token_advantage_covariance(U.tensors["logprobs"], advantages, U.mask),
            norm_g=float(g.double().norm()),
        )
    se_u = u_results["se_U"]
    se_total = se_e if se_u is None else (se_e**2 + se_u**2) ** 0.5
    per_target[estimator.entropy].update(se_U=se_u, se_delta_h1=se_total)
    lr_mean = float(spec.state.lr.mean()) if spec is not None else None
    return {
        "delta_h1": delta_h1,
        "delta_h1_from_tangents": per_target[estimator.entropy]["delta_h1"],
        "bars_dot": None if lr_mean is None else delta_h1 / lr_mean,
        "learning_rate": lr_mean,
        "entropy": main.entropy,
        "se_delta_h1": se_total,
        "se_E": se_e,
        "delta_h1_naive": naive_est,
        "se_E_naive": naive_se,
        "norm_xbar": float(xbar.double().norm()),
        "norm_delta_theta": float(delta_theta.norm()),
        "targets": per_target,
        "timings": timings,
        "xbar": xbar,
        "delta_theta": delta_theta,
        "e_contributions": psi / len(E),
        **u_results,
    }


def _u_uncertainty(
    model, params, layout, U, spec, pg_coef, g, g_groups, xbar, delta_h1, u_weights, as_direction, max_tokens, timings
) -> dict:
    """SE_U, its method and the U attributions (linearised, and leave-one-group-out with the group gradients)."""
    start = time.perf_counter()
    u = linearise(spec.rule, g.double(), xbar.double(), spec.state, spec.max_grad_norm)
    timings["linearise"] = round(time.perf_counter() - start, 4)
    out: dict = {}
    if g_groups is not None:
        # u·g_b: the groups' linearised contributions (Σ_b = u·g), from the cache instead of a third pass
        attribution = g_groups.double() @ u
        start = time.perf_counter()
        denominators = group_denominators(U.mask, U.tensors["group_index"], spec.loss_agg_mode, u_weights)
        loo = leave_one_group_out(
            spec.rule, g.double(), g_groups, denominators, xbar.double(), spec.state, spec.max_grad_norm
        )
        timings["jackknife"] = round(time.perf_counter() - start, 4)
        out.update(
            se_U=jackknife_se(loo), se_U_method="jackknife over U prompt groups", u_attribution_loo=delta_h1 - loo
        )
    else:
        start = time.perf_counter()
        row_terms = u_row_terms(model, params, layout.names, U, pg_coef, as_direction(u), max_tokens)
        timings["u_tangents"] = round(time.perf_counter() - start, 4)
        attribution, influence = group_terms_from_rows(
            row_terms, U.mask, U.tensors["group_index"], spec.loss_agg_mode, u_weights
        )
        out.update(se_U=standard_error(influence), se_U_method="delta method")
    out.update(u_attribution=attribution, delta_h1_gradient_part_linearised=float(attribution.sum()))
    if _nonzero_advantage_groups(U) < 2:
        out.update(se_U=None, se_U_note=NO_SE_U_FEW_GROUPS)
    return out
