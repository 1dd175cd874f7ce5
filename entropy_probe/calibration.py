"""How well the probe predicted the steps a trainer really took: pure functions on per-step arrays (docs/math.md §11).

Per observed step k (θ(k) → θ(k+1)) the trajectory stage has the observed entropy change ΔH_obs(k), the
probe's prediction δH₁_pred(k) ± (SE_E, SE_U) from its own U draw, and the first- and second-order terms
δH₁_obs(k), δH₂_obs(k) along the step actually taken. The trainer's step is one more random U draw, so

    z(k) = (ΔH_obs − δH₁_pred) / √(SE_E² + SE_U² + SE_U² · B_U_probe / B_U_trainer)

should look like N(0, 1) across k when the probe is calibrated (and the step is in the linear regime):
mean ≈ 0, SD ≈ 1, about 95% within ±2. The explained fraction of ΔH_obs by a prediction p is

    R²(p) = 1 − Σ_k (ΔH_obs − p)² / Σ_k ΔH_obs²      (about 0, not the mean: ΔH = 0 is the null prediction)

for p = δH₁_obs (first order) and p = δH₁_obs + δH₂_obs (second order). Estimates with a standard error are
z-tested against their exact values, z = (estimate − exact) / SE.
Every function takes plain sequences or arrays and returns floats (None where a number is undefined).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

Z_WITHIN = 2.0  # the |z| counted as "within": about 95% of N(0, 1)


def _array(x: Sequence[float]) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"expected a 1-d sequence, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("non-finite value in the per-step inputs")
    return a


def prediction_se(se_E: Sequence[float], se_U: Sequence[float], b_u_probe: int, b_u_trainer: int) -> np.ndarray:
    """√(SE_E² + SE_U² + SE_U² · B_U_probe / B_U_trainer): the spread of ΔH_obs − δH₁_pred.

    SE_E and SE_U are the probe's (its E and its U draw); the last term is the trainer's own U draw, whose
    variance scales as 1/B: SE_U² (which is ∝ 1/B_U_probe) times B_U_probe / B_U_trainer.
    """
    if b_u_probe < 1 or b_u_trainer < 1:
        raise ValueError("batch sizes must be >= 1")
    e, u = _array(se_E), _array(se_U)
    return np.sqrt(e**2 + u**2 * (1.0 + b_u_probe / b_u_trainer))


def z_scores(estimate: Sequence[float], reference: Sequence[float], se: Sequence[float]) -> np.ndarray:
    """z = (estimate − reference) / SE, per step (an SE of 0 is an error: the z would be ±inf)."""
    est, ref, s = _array(estimate), _array(reference), _array(se)
    if not (est.shape == ref.shape == s.shape):
        raise ValueError("estimate, reference and SE differ in length")
    if (s <= 0).any():
        raise ValueError("a standard error is <= 0")
    return (est - ref) / s


def step_z(
    delta_h_obs: Sequence[float],
    delta_h1_pred: Sequence[float],
    se_E: Sequence[float],
    se_U: Sequence[float],
    b_u_probe: int,
    b_u_trainer: int,
) -> np.ndarray:
    """z(k) = (ΔH_obs − δH₁_pred) / `prediction_se` (the sign: positive when entropy rose more than predicted)."""
    return z_scores(delta_h_obs, delta_h1_pred, prediction_se(se_E, se_U, b_u_probe, b_u_trainer))


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


@dataclass(frozen=True)
class Calibration:
    """The calibration summary of a trajectory (what metrics JSON holds)."""

    n_steps: int  # every step: the correlation and the explained fractions use them all
    z_mean: float | None  # z = (ΔH_obs − δH₁_pred) / √(SE_E² + SE_U² (1 + B_U/B_U_trainer)), over the steps with SE_U
    z_sd: float | None
    z_share_within_2: float | None
    corr_pred_obs: float | None  # correlation of δH₁_pred with ΔH_obs
    explained_first_order: float | None  # R² of ΔH_obs by δH₁_obs (exact along the step)
    explained_second_order: float | None  # R² of ΔH_obs by δH₁_obs + δH₂_obs
    z_delta_h1_obs_mean: float | None  # z-test of the sampled δH₁_obs against its exact value
    z_delta_h1_obs_sd: float | None
    z_delta_h2_obs_mean: float | None  # z-test of the sampled δH₂_obs against its exact value
    z_delta_h2_obs_sd: float | None
    n_steps_z: int | None = None  # the steps with an SE_U (the z of the others is undefined)

    def as_dict(self) -> dict:
        return asdict(self)


def calibrate(
    *,
    delta_h_obs: Sequence[float],
    delta_h1_pred: Sequence[float],
    se_E: Sequence[float],
    se_U: Sequence[float | None],
    b_u_probe: int,
    b_u_trainer: int,
    delta_h1_obs_exact: Sequence[float],
    delta_h2_obs_exact: Sequence[float],
    z_delta_h1_obs: Sequence[float],
    z_delta_h2_obs: Sequence[float],
) -> Calibration:
    """Every number of the summary from the per-step arrays (all of one length, the number of steps; the two
    along-step z lists hold the defined ones). A step whose SE_U is None (fewer than two U groups with a
    non-zero advantage) has no forecast z, but its ΔH_obs and δH₁_pred count in every other number."""
    known = [u is not None for u in se_U]

    def with_z(values: Sequence) -> list:
        return [v for v, k in zip(values, known) if k]

    obs, pred = with_z(delta_h_obs), with_z(delta_h1_pred)
    z = z_summary(step_z(obs, pred, with_z(se_E), with_z(se_U), b_u_probe, b_u_trainer))
    first = _array(delta_h1_obs_exact)
    z1, z2 = z_summary(z_delta_h1_obs), z_summary(z_delta_h2_obs)
    return Calibration(
        n_steps=len(delta_h_obs),
        n_steps_z=z.n,
        z_mean=z.mean,
        z_sd=z.sd,
        z_share_within_2=z.share_within_2,
        corr_pred_obs=correlation(delta_h1_pred, delta_h_obs),
        explained_first_order=explained_fraction(delta_h_obs, first),
        explained_second_order=explained_fraction(delta_h_obs, first + _array(delta_h2_obs_exact)),
        z_delta_h1_obs_mean=z1.mean,
        z_delta_h1_obs_sd=z1.sd,
        z_delta_h2_obs_mean=z2.mean,
        z_delta_h2_obs_sd=z2.sd,
    )


__all__ = [
    "Calibration",
    "ZSummary",
    "calibrate",
    "correlation",
    "explained_fraction",
    "prediction_se",
    "step_z",
    "z_scores",
    "z_summary",
]
