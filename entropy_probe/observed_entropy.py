"""A sampled estimate of the observed entropy change ΔH_obs = H(θ') − H(θ), with an SE, where θ' = θ + Δθ
is the step a trainer took (Δθ = θ(k+1) − θ(k)) and the model is too large to enumerate.

It combines the ground truth's two paired estimates (`ground_truth`, docs/math.md §8), per E row i:

(a) fresh samples with common random numbers (`FreshSampling.draw`, the same seed at θ and θ'), from the
    sampler's RB entropies: value F = R_fresh(θ') − R_fresh(θ), row influence a_i = ψᶠ_i(θ') − ψᶠ_i(θ);
(b) SNIS over the E batch drawn at θ (`Batch.sequence_sums`, weights ŵ_i = exp(ℓ_i(θ') − ℓ_i(θ))):
    value S = R(θ') − R(θ), row influence b_i = ψˢ_i(θ') − ψˢ_i(θ)  (`importance.ratio_estimate`).

Both estimate the same ΔH and, to first order, F − ΔH ≈ mean(a), S − ΔH ≈ mean(b), with mean(a) = mean(b) = 0
over the rows (Σψ = 0 at every φ). The fresh draw of row i answers E row i's prompt, so (a_i, b_i) are one
unit per row and may be correlated. The minimum-variance combination

    ΔH = λ·F + (1 − λ)·S,     d_i = λ a_i + (1 − λ) b_i,     SE = std(d)/√N,
    λ = (var b − cov(a, b)) / (var a + var b − 2 cov(a, b)) = cov(b, c) / var(c),   c = b − a,

clamped to [0, 1], is the control-variate estimator S − λ(S − F) with control S − F (influence c, mean ≈ 0).
Over [0, 1], var(d) is a convex quadratic in λ with the two single estimates at the ends, so with λ
estimated from the same rows std(d) ≤ min(std a, std b); choosing λ from the data costs O(1/N) bias.

When the SNIS weights at θ' are degenerate (ESS/N < min_ess_fraction) S and its SE are not trusted and
λ = 1 (fresh samples only). θ is restored bit-exactly (`perturb.perturbed`; checksum before and after).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .estimators import TARGETS
from .ground_truth import TRUTH_FIX, FreshSampling, perturbed_passes, target_parts
from .importance import effective_sample_size, paired_difference, ratio_estimate, standard_error
from .scoring import Batch

log = logging.getLogger(__name__)

COMBINED = "combined"  # λ from the rows' (co)variances
FRESH_ONLY = "fresh-only"  # SNIS ESS/N below the floor: λ = 1


@dataclass(frozen=True)
class SampledDeltaH:
    """ΔH_obs = H(θ + Δθ) − H(θ) for one target, sampled (see the module docstring for the formulas).

    delta_h, se: the combined estimate λ·fresh + (1 − λ)·snis and std(d)/√N; method: COMBINED or FRESH_ONLY;
    fresh_delta_h, fresh_se / snis_delta_h, snis_se: the two single paired estimates (NaN where undefined);
    snis_ess_fraction: ESS/N of E's weights at θ'; weight_fresh: λ; n_sequences: N (E rows = fresh rows).
    """

    delta_h: float
    se: float
    method: str
    fresh_delta_h: float
    fresh_se: float
    snis_delta_h: float
    snis_se: float
    snis_ess_fraction: float
    weight_fresh: float
    n_sequences: int


def fresh_weight(a: Tensor, b: Tensor) -> float:
    """λ = cov(b, b − a) / var(b − a) = (var b − cov(a, b)) / (var a + var b − 2 cov(a, b)), clamped to [0, 1].

    The variance of λa + (1 − λ)b is smallest there. var(b − a) = 0 (a ≡ b: e.g. Δθ = 0, where both are 0) or
    fewer than two rows leave λ undetermined; then λ = 1 (fresh samples: their validity needs no ESS).
    """
    a, b = a.double(), b.double()
    c = b - a  # the control's influence; computed directly, var(b − a) does not cancel catastrophically
    var_c = float(c.var()) if len(c) > 1 else float("nan")
    if not var_c > 0:
        return 1.0
    cov_bc = float(((b - b.mean()) * (c - c.mean())).sum() / (len(c) - 1))
    return min(1.0, max(0.0, cov_bc / var_c))


def _paired(new: tuple[float, Tensor], old: tuple[float, Tensor]) -> tuple[float, float, Tensor]:
    """(R_new − R_old, its SE, the row influences ψ_new − ψ_old) via `importance.paired_difference`."""
    d = paired_difference(new, old)
    return d["delta_h"], d["se"], new[1] - old[1]


def sampled_delta_h(
    model,
    E: Batch,
    delta_theta: dict[str, Tensor],
    fresh: FreshSampling,
    *,
    target: str,
    max_tokens: int,
    min_ess_fraction: float,
) -> SampledDeltaH:
    """ΔH_obs = H(θ + Δθ) − H(θ) of `target` from the E batch (drawn by `model` at its current θ) and fresh
    samples of E's prompts (`fresh`: E's temperature and top_p, a CRN seed), combined with minimum variance.

    Two teacher-forcing passes over E and two fresh draws, at θ and at θ' = θ + Δθ (applied in place and
    restored bit-exactly, also when a pass fails). Raises ValueError for an unknown target, a model in
    training mode, or fresh samples drawn with other π settings than E; ProbeError when the fresh prompts
    are not E's rows' prompts; RuntimeError if θ was not restored.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown entropy target {target!r}; expected one of {TARGETS}")
    passes = perturbed_passes(model, E, delta_theta, [1.0], fresh, max_tokens, "ΔH_obs")
    base, max_diff = passes.base, passes.max_abs_logp_diff
    [(_, new, fresh_new)] = passes.moved
    fresh_base = passes.fresh_base
    if max_diff > 1e-2:
        log.warning("ΔH_obs: E's log-probs differ from teacher forcing at θ by up to %.2g: was E drawn at θ?", max_diff)

    # (a) fresh samples: the sampler's own RB entropies, weights ≡ 1 (log-weight 0) at both θ and θ'
    n = len(E)
    zeros = torch.zeros(n, dtype=torch.float64)
    fresh_delta, fresh_se, a = _paired(
        ratio_estimate(zeros, *target_parts(fresh_new)[target], TRUTH_FIX),
        ratio_estimate(zeros, *target_parts(fresh_base)[target], TRUTH_FIX),
    )

    # (b) SNIS: θ drew E, so the behaviour log-prob is the teacher-forced ℓ(θ) (log-weight ≡ 0 at θ) and both
    # terms of the log-weight at θ' come from the same code path, so their rounding cancels
    log_w = new.logprob - base.logprob
    if log_w.isfinite().any():
        ess = effective_sample_size(log_w, TRUTH_FIX)
        snis_delta, snis_se, b = _paired(
            ratio_estimate(log_w, *target_parts(new)[target], TRUTH_FIX),
            ratio_estimate(zeros, *target_parts(base)[target], TRUTH_FIX),
        )
    else:  # no E response is possible under θ' (top_p < 1): SNIS has nothing to say
        ess, snis_delta, snis_se, b = 0.0, math.nan, math.nan, None
    ess_fraction = ess / n

    if b is None or ess_fraction < min_ess_fraction:
        # a few rows carry the SNIS weight: its value and its delta-method SE are both unreliable, and a λ
        # from its influences would trust it; fall back to the fresh samples alone
        lam, method, d = 1.0, FRESH_ONLY, a
        log.warning(
            "ΔH_obs: SNIS ESS/N at θ' is %.3g (< min_ess_fraction = %g): fresh samples only",
            ess_fraction,
            min_ess_fraction,
        )
    else:
        lam, method = fresh_weight(a, b), COMBINED
        d = lam * a + (1 - lam) * b
    # λ ∈ {0, 1} takes exactly one estimate (so a NaN in the other does not leak through 0·NaN)
    delta = fresh_delta if lam == 1.0 else snis_delta if lam == 0.0 else lam * fresh_delta + (1 - lam) * snis_delta
    out = SampledDeltaH(
        delta_h=delta,
        se=standard_error(d),
        method=method,
        fresh_delta_h=fresh_delta,
        fresh_se=fresh_se,
        snis_delta_h=snis_delta,
        snis_se=snis_se,
        snis_ess_fraction=ess_fraction,
        weight_fresh=lam,
        n_sequences=n,
    )
    log.info(
        "ΔH_obs (%s): %+.3e ± %.1e [%s, λ = %.3f]; fresh %+.3e ± %.1e; SNIS %+.3e ± %.1e (ESS/N %.3f)",
        target,
        out.delta_h,
        out.se,
        method,
        lam,
        fresh_delta,
        fresh_se,
        snis_delta,
        snis_se,
        ess_fraction,
    )
    return out


__all__ = ["COMBINED", "FRESH_ONLY", "SampledDeltaH", "fresh_weight", "sampled_delta_h"]
