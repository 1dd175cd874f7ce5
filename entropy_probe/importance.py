"""Importance weights, effective sample size and self-normalised ratio estimates (docs/math.md §3.7, §8.1).

For sequences drawn by a behaviour policy and evaluated under another, with per-sequence log-ratios
λ_i = Σ_k (ℓ_ik^new − ℓ_ik^behaviour):

    ŵ_i = exp(λ_i − max λ)            (the one stabilisation: every quantity below is scale-free)
    w_i = ŵ_i / Σ ŵ,                   ESS = (Σ ŵ)² / Σ ŵ² = 1 / Σ w_i²   (N for equal weights)

A self-normalised ratio of weighted means R = Σ ŵ a / Σ ŵ b has the influence values
ψ_i = ŵ_i (a_i − R b_i) / mean(ŵ b): mean(ψ) = 0 and SE(R) = std(ψ)/√N (delta method). Two such
estimates on the same sequences differ with SE = std(ψ_new − ψ_old)/√N.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from .errors import ProbeError

if TYPE_CHECKING:
    from .scoring import Batch

log = logging.getLogger(__name__)

REUSE_FIX = "re-sample with this checkpoint, or use generation.top_p = 1"


def stabilised_weights(log_ratio: Tensor, fix: str = REUSE_FIX) -> Tensor:
    """ŵ_i = exp(λ_i − max λ) in float64 (equal log-ratios give exactly 1); `fix` names the remedy when all are 0."""
    log_ratio = log_ratio.double()
    if log_ratio.isnan().any() or (log_ratio == float("inf")).any():  # −inf is a weight of 0; NaN/+inf a bug upstream
        raise ProbeError("an importance log-ratio is NaN or +inf (a scored token outside the policy's support)", fix)
    if not log_ratio.isfinite().any():
        raise ProbeError("every importance weight is 0 (no sampled response is possible under the target policy)", fix)
    return (log_ratio - log_ratio.max()).exp()


def importance_weights(log_ratio: Tensor, fix: str = REUSE_FIX) -> tuple[Tensor, float]:
    """(w_i = ŵ_i / Σ ŵ (sum 1, float64), ESS = (Σ ŵ)² / Σ ŵ²)."""
    raw = stabilised_weights(log_ratio, fix)
    return raw / raw.sum(), float(raw.sum() ** 2 / (raw * raw).sum())


def effective_sample_size(log_ratio: Tensor, fix: str = REUSE_FIX) -> float:
    """ESS = (Σ ŵ)² / Σ ŵ²."""
    return importance_weights(log_ratio, fix)[1]


def ratio_estimate(log_ratio: Tensor, a: Tensor, b: Tensor, fix: str = REUSE_FIX) -> tuple[float, Tensor]:
    """(R = Σ ŵ a / Σ ŵ b, influence values ψ_i = ŵ_i (a_i − R b_i) / mean(ŵ b)); Σ ψ = 0."""
    w = stabilised_weights(log_ratio, fix)
    a, b = a.double(), b.double()
    wb = w * b
    value = (w * a).sum() / wb.sum()
    return float(value), w * (a - value * b) / wb.mean()


def standard_error(influence: Tensor) -> float:
    """std(ψ)/√N (Bessel-corrected std; NaN for fewer than 2 values): the delta-method SE of mean(ψ)."""
    return float(influence.std() / math.sqrt(len(influence))) if len(influence) > 1 else float("nan")


def paired_difference(new: tuple[float, Tensor], old: tuple[float, Tensor]) -> dict[str, float]:
    """R_new − R_old on the same sequences: {"delta_h": R_new − R_old, "se": std(ψ_new − ψ_old)/√N}."""
    return {"delta_h": new[0] - old[0], "se": standard_error(new[1] - old[1])}


# ---------------------------------------------------------------------------------------------
# reuse of samples drawn by another checkpoint (docs/math.md §5.4)


@dataclass
class Reuse:
    """The importance weights of cached samples (None = this checkpoint drew them) and what to report."""

    e_weights: Tensor | None  # self-normalised (sum 1), for the E estimator
    u_weights: Tensor | None  # normalised to mean 1, for the U coefficients
    ess: dict[str, float] = field(default_factory=dict)  # "E"/"U" -> ESS of the re-weighted batches only


def reuse_weights(
    model, batches: dict[str, Batch], foreign: dict[str, str], max_tokens: int, min_ess_fraction: float, force: bool
) -> Reuse:
    """Re-score the batches named in `foreign` ("E"/"U" -> the checkpoint that drew them) under `model` and
    weight them by π_probed(y)/π_behaviour(y); below min_ess_fraction refuse unless `force`."""
    weights: dict[str, Tensor | None] = {"E": None, "U": None}
    ess = {}
    for name, batch in batches.items():
        if name not in foreign:
            continue
        w, ess[name] = importance_weights(batch.rescore(model, max_tokens))
        fraction = ess[name] / len(batch)
        log.info("%s samples drawn by checkpoint %s; importance-weighted, ESS/N = %.3f", name, foreign[name], fraction)
        if fraction < min_ess_fraction and not force:
            raise ProbeError(
                f"the {name} samples (drawn by checkpoint {foreign[name]}) have ESS/N = {fraction:.3f} under this "
                f"checkpoint, below reuse.min_ess_fraction = {min_ess_fraction}",
                "re-sample with this checkpoint (sampling.checkpoint), or set reuse.force: true to compute anyway",
            )
        weights[name] = w if name == "E" else w * len(batch)
    return Reuse(weights["E"], weights["U"], ess)
