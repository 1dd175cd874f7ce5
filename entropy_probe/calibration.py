"""How well the probe forecast the steps a trainer really took: pure functions on per-step arrays (docs/math.md §11).

Per observed step k (θ(k) → θ(k+1)) the trajectory stage has the observed entropy change ΔH_obs(k) (± SE_obs
when sampled), the forecast F̄(k) ± SE_F with the spread σ_T of the trainer's own draw (`forecast`), and the
first- and second-order terms δH₁_obs(k), δH₂_obs(k) along the step actually taken. The trainer's step is one
draw of the simulated distribution, so

    z(k) = (ΔH_obs − F̄) / √(SE_F² + σ_T² + SE_obs²)

should look like N(0, 1) across k when the probe is calibrated: mean ≈ 0, SD ≈ 1, about 95% within ±2. The same
z with the first order alone (F̄₁, its SE and σ_T) sits beside it: where the step is curved, it is not calibrated.
The explained fraction of ΔH_obs by a prediction p is

    R²(p) = 1 − Σ_k (ΔH_obs − p)² / Σ_k ΔH_obs²      (about 0, not the mean: ΔH = 0 is the null prediction)

for p = F̄, δH₁_obs (first order) and δH₁_obs + δH₂_obs (second order). Estimates with a standard error are
z-tested against their exact values, z = (estimate − exact) / SE.
Every function takes plain sequences or arrays and returns floats (None where a number is undefined).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .artifacts.trajectory import CalibrationMetrics

Z_WITHIN = 2.0  # the |z| counted as "within": about 95% of N(0, 1)


def _array(x: Sequence[float]) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"expected a 1-d sequence, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("non-finite value in the per-step inputs")
    return a


def forecast_z(delta_h_obs: float, forecast: float, spread: float, se_obs: float = 0.0) -> float | None:
    """z = (ΔH_obs − F̄) / √(spread² + SE_obs²), spread = √(SE_F² + σ_T²) (positive: entropy rose more than
    forecast); None when the denominator is 0."""
    sd = math.sqrt(spread**2 + se_obs**2)
    return (delta_h_obs - forecast) / sd if sd > 0 else None


def z_scores(estimate: Sequence[float], reference: Sequence[float], se: Sequence[float]) -> np.ndarray:
    """z = (estimate − reference) / SE, per step (an SE of 0 is an error: the z would be ±inf)."""
    est, ref, s = _array(estimate), _array(reference), _array(se)
    if not (est.shape == ref.shape == s.shape):
        raise ValueError("estimate, reference and SE differ in length")
    if (s <= 0).any():
        raise ValueError("a standard error is <= 0")
    return (est - ref) / s


@dataclass(frozen=True)
class ZSummary:
    """mean and sample SD (ddof 1) of z, the share of |z| ≤ 2, and n. SD is None for n < 2."""

    n: int
    mean: float | None
    sd: float | None
    share_within_2: float | None


def z_summary(z: Sequence[float]) -> ZSummary:
    """Summary of z-scores that should be N(0, 1): mean, SD (ddof 1), share with |z| ≤ 2."""
    a = _array(z)
    if a.size == 0:
        return ZSummary(0, None, None, None)
    sd = float(a.std(ddof=1)) if a.size > 1 else None
    return ZSummary(int(a.size), float(a.mean()), sd, float((np.abs(a) <= Z_WITHIN).mean()))


def correlation(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation of x and y; None for fewer than 2 points or a constant series."""
    a, b = _array(x), _array(y)
    if a.shape != b.shape:
        raise ValueError("x and y differ in length")
    if a.size < 2:
        return None
    da, db = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((da**2).sum()) * float((db**2).sum()))
    return max(-1.0, min(1.0, float((da * db).sum()) / denom)) if denom > 0 else None  # rounding can pass ±1


def explained_fraction(observed: Sequence[float], predicted: Sequence[float]) -> float | None:
    """R² = 1 − Σ(observed − predicted)² / Σ observed² (None when every observed value is 0).

    1 for a perfect prediction, 0 for predicting 0 every time, negative for worse than that.
    """
    o, p = _array(observed), _array(predicted)
    if o.shape != p.shape:
        raise ValueError("observed and predicted differ in length")
    total = float((o**2).sum())
    return 1.0 - float(((o - p) ** 2).sum()) / total if total > 0 else None


def calibrate(
    *,
    delta_h_obs: Sequence[float],
    forecast: Sequence[float],
    forecast_first_order: Sequence[float],
    z: Sequence[float | None],
    z_first_order: Sequence[float | None],
    delta_h1_obs: Sequence[float],
    delta_h2_obs: Sequence[float],
    along_step: str,
    z_delta_h1_obs: Sequence[float | None],
    z_delta_h2_obs: Sequence[float | None],
    verdicts: Sequence[str],
) -> CalibrationMetrics:
    """Every number of the summary from the per-step arrays (all of one length, the number of steps). A z that
    is None (a zero denominator) is left out of its own summary only; every other number uses every step.
    δH₁_obs, δH₂_obs: exact along the step (`along_step` "exact") or the E batch's estimates ("sampled")."""

    def defined(values: Sequence[float | None]) -> list[float]:
        return [v for v in values if v is not None]

    zf, z1 = z_summary(defined(z)), z_summary(defined(z_first_order))
    zd1, zd2 = z_summary(defined(z_delta_h1_obs)), z_summary(defined(z_delta_h2_obs))
    first = _array(delta_h1_obs)
    return CalibrationMetrics(
        n_steps=len(delta_h_obs),
        n_steps_z=zf.n,
        z_mean=zf.mean,
        z_sd=zf.sd,
        z_share_within_2=zf.share_within_2,
        z_first_order_mean=z1.mean,
        z_first_order_sd=z1.sd,
        z_first_order_share_within_2=z1.share_within_2,
        corr_forecast_obs=correlation(forecast, delta_h_obs),
        corr_pred_obs=correlation(forecast_first_order, delta_h_obs),
        explained_by_forecast=explained_fraction(delta_h_obs, forecast),
        explained_first_order=explained_fraction(delta_h_obs, first),
        explained_second_order=explained_fraction(delta_h_obs, first + _array(delta_h2_obs)),
        along_step=along_step,
        z_delta_h1_obs_mean=zd1.mean,
        z_delta_h1_obs_sd=zd1.sd,
        z_delta_h2_obs_mean=zd2.mean,
        z_delta_h2_obs_sd=zd2.sd,
        n_curved=sum(v == "curved" for v in verdicts),
        n_unresolved=sum(v == "unresolved" for v in verdicts),
    )


__all__ = ["ZSummary", "calibrate", "correlation", "explained_fraction", "forecast_z", "z_scores", "z_summary"]
