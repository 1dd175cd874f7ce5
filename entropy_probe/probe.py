"""δH₁ = X̄ · Δθ from an E and a U batch, with standard errors and attributions (docs/math.md §4–§6).

Passes over the data (each in token-budget microbatches, `scoring.Batch.scored`):
  1. U, reverse:  g = ∇J = ∇ Σ c_ij logp_ij                       (policy gradient of the U batch, §4.2)
  2.              Δθ = update(g)                                   (adam_step | adam_precond | sgd, §4.4–4.5)
  3. E, reverse + double-backward: X̄ = ∇ Σ_i w_i Σ_k (a_ik H_ik + c_ik logp_ik) and, for every E
     token, dH_ik = ∇H_ik·Δθ and dlogp_ik = ∇logp_ik·Δθ (§5.1, §6.1). Every target's δH₁ and SE_E are
     weighted sums of those tangents (`EntropyCoefs.estimate`), so one pass serves all three targets.
  4. U, one ordinary backward with `RowDirectional` hooks: row_i = Σ_j c_ij ∇logp_ij · u along
     u = (∂Δθ/∂g)ᵀ X̄ (the update's linearisation in g, §4.7), giving per-prompt-group attributions and
     SE_U (§5.2).
No per-sample parameter-sized gradient is ever formed. Sums are kept in the trainable parameters' dtype
promoted to at least float32 (float32 for float32/half models, float64 for a float64 model).

Samples drawn by another checkpoint are re-scored and importance-weighted (`reuse_weights`, §5.4).
Under torchrun every process runs each pass over its share of the rows (`Batch.shard`) and all-reduces
the sums — g, X̄, the per-token tangents and the re-scored statistics — so every process ends with the
one-process results (up to summation order); the coefficients come from the full batch on every process.
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
from .tangents import RowDirectional, grad_and_tangents
from .update import (
    AdamState,
    FlatLayout,
    group_terms_from_rows,
    linearise,
    pg_coefficients,
    update_direction,
    zero_gradient_part,
)

log = logging.getLogger(__name__)


def _flat(grads: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return torch.cat([x.reshape(-1).to(dtype) for x in grads])


def policy_gradient(model, params, layout: FlatLayout, U: Batch, coef: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """g = ∇_θ Σ_ij coef_ij logp_ij over U, as a flat vector in the accumulation dtype."""
    dtype = accumulation_dtype(params[0])
    g = torch.zeros(layout.numel, dtype=dtype, device=coef.device)
    for rows, stats in U.scored(model, max_tokens, "U gradient", with_grad=True, entropies=False):
        grads, _ = grad_and_tangents([stats.logprobs], [coef[rows]], params, None)
        g += _flat(grads, dtype)
    return U.reduce(g)


def entropy_pass(model, params, layout, E: Batch, coefs: EntropyCoefs, direction, max_tokens: int):
    """(X̄ flat, dH [N,R], dlogp [N,R]) with X̄ = ∇ Σ_i w_i Σ_k (a H + c logp), tangents along direction
    (direction None: X̄ alone, tangents None)."""
    dtype = accumulation_dtype(params[0])
    w = coefs.weights.unsqueeze(1).to(coefs.a.dtype)
    a, c = (coefs.a * w).to(dtype), (coefs.c * w).to(dtype)
    xbar = torch.zeros(layout.numel, dtype=dtype, device=a.device)
    dH = dlogp = None
    if direction is not None:
        dH, dlogp = torch.zeros_like(a), torch.zeros_like(a)
    for rows, stats in E.scored(model, max_tokens, "E gradient", with_grad=True):
        grads, tangents = grad_and_tangents([stats.entropies, stats.logprobs], [a[rows], c[rows]], params, direction)
        if tangents is not None:
            dH[rows], dlogp[rows] = tangents
        xbar += _flat(grads, dtype)
    if direction is None:
        return E.reduce(xbar), None, None
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
                taken = hooks.take()  # None: no hooked layer is on the path to these log-probs
                if taken is None and any(g is not None for g in grads):  # the hooks missed a path: never report 0
                    raise RuntimeError("RowDirectional hooks did not fire although the parameters got gradients")
                rows_out[rows] = 0.0 if taken is None else taken
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


def compute_delta_h1(
    model,
    E: Batch,
    U: Batch,
    layout: FlatLayout,
    spec: UpdateSpec,
    estimator,
    max_tokens: int,
    e_weights: torch.Tensor | None = None,
    u_weights: torch.Tensor | None = None,
) -> dict:
    """Every number of delta_h1.json plus the flat X̄ and Δθ (keys `xbar`, `delta_theta`) and attributions.

    e_weights: self-normalised importance weights of the E sequences (sum 1; None = uniform);
    u_weights: those of the U sequences scaled to mean 1 (None = all 1). Both are None when the probed
    checkpoint drew the samples, which makes this the plain, unweighted computation. `timings` (seconds
    per phase) are for the log only.
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

    advantages = U.tensors["advantages"].to(dtype)
    pg_coef = pg_coefficients(advantages, U.mask, spec.loss_agg_mode, spec.max_len, u_weights).to(dtype)
    g = timed("u_gradient", policy_gradient, model, params, layout, U, pg_coef, max_tokens)

    start = time.perf_counter()
    delta_theta = update_direction(spec.rule, g.double(), spec.state, spec.max_grad_norm)
    delta_zero = zero_gradient_part(spec.rule, spec.state, spec.max_grad_norm)
    timings["update"] = round(time.perf_counter() - start, 4)
    direction = as_direction(delta_theta)

    features = torch.stack([E.tensors["top1_prob"], E.tensors["margin"]], dim=-1).to(dtype)
    coefs = {
        t: entropy_coefficients(
            E.tensors["entropies"].to(dtype),
            E.mask,
            target=t,
            baseline=estimator.baseline,
            features=features,
            ridge=estimator.ridge,
            folds=estimator.crossfit_folds,
            weights=e_weights,
        )
        for t in TARGETS
    }
    main = coefs[estimator.entropy]
    xbar, dH, dlogp = timed("e_gradient", entropy_pass, model, params, layout, E, main, direction, max_tokens)

    start = time.perf_counter()
    u = linearise(spec.rule, g.double(), xbar.double(), spec.state, spec.max_grad_norm)
    timings["linearise"] = round(time.perf_counter() - start, 4)
    row_terms = timed("u_tangents", u_row_terms, model, params, layout.names, U, pg_coef, as_direction(u), max_tokens)
    attribution, influence = group_terms_from_rows(
        row_terms, U.mask, U.tensors["group_index"], spec.loss_agg_mode, u_weights
    )

    delta_h1 = float((xbar.double() * delta_theta).sum())
    momentum_part = float((xbar.double() * delta_zero).sum())
    per_target = {}
    for t, cf in coefs.items():
        est, se_e = cf.estimate(dH, dlogp)
        per_target[t] = {"delta_h1": est, "se_E": se_e, "entropy": cf.entropy}
    naive = naive_coefficients(E.tensors["logprobs"].to(dtype), E.mask, target=estimator.entropy, weights=e_weights)
    naive_est, naive_se = naive.estimate(None, dlogp)
    se_e = per_target[estimator.entropy]["se_E"]
    se_u = standard_error(influence)
    se_total = (se_e**2 + se_u**2) ** 0.5
    per_target[estimator.entropy].update(se_U=se_u, se_delta_h1=se_total)
    lr_mean = float(spec.state.lr.mean())
    return {
        "delta_h1": delta_h1,
        "delta_h1_from_tangents": per_target[estimator.entropy]["delta_h1"],
        "bars_dot": delta_h1 / lr_mean,
        "learning_rate": lr_mean,
        "entropy": main.entropy,
        "se_delta_h1": se_total,
        "se_E": se_e,
        "se_U": se_u,
        "delta_h1_gradient_part": delta_h1 - momentum_part,
        "delta_h1_momentum_part": momentum_part,
        "delta_h1_gradient_part_linearised": float(attribution.sum()),
        "delta_h1_naive": naive_est,
        "se_E_naive": naive_se,
        "cov_logp_advantage": token_advantage_covariance(U.tensors["logprobs"], advantages, U.mask),
        "norm_xbar": float(xbar.double().norm()),
        "norm_delta_theta": float(delta_theta.norm()),
        "norm_g": float(g.double().norm()),
        "targets": per_target,
        "timings": timings,
        "xbar": xbar,
        "delta_theta": delta_theta,
        "e_contributions": main.influence(dH, dlogp) / len(E),
        "u_attribution": attribution,
    }
