"""Calibration of predicted against observed steps (entropy_probe.calibration) on inputs with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from entropy_probe import calibration as cal


def test_forecast_z_adds_the_observed_se():
    # spread √(SE_F² + σ_T²) = 5, SE_obs = 0: z = 10/5; with SE_obs = 12: √(25 + 144) = 13
    assert cal.forecast_z(11.0, 1.0, 5.0) == pytest.approx(2.0, rel=1e-15)
    assert cal.forecast_z(-12.0, 1.0, 5.0, 12.0) == pytest.approx(-1.0, rel=1e-15)
    assert cal.forecast_z(1.0, 0.0, 0.0, 0.0) is None


def test_z_scores_refuse_zero_se_and_bad_lengths():
    with pytest.raises(ValueError, match="<= 0"):
        cal.z_scores([1.0], [0.0], [0.0])
    with pytest.raises(ValueError, match="length"):
        cal.z_scores([1.0, 2.0], [0.0], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        cal.z_scores([float("nan")], [0.0], [1.0])


def test_calibrated_predictions_give_standard_normal_z():
    """ΔH_obs = δH₁_pred + noise of exactly the modelled variance: z ~ N(0, 1). With n = 4000 the sample mean
    has SD 1/√n = 0.016 and the sample SD about 1/√(2n) = 0.011; tolerances are 4 of those."""
    rng = np.random.default_rng(0)
    n = 4000
    pred = rng.normal(0.0, 1e-3, n)
    spread, se_obs = rng.uniform(1e-4, 5e-4, n), rng.uniform(0.0, 2e-4, n)
    obs = pred + rng.normal(0.0, 1.0, n) * np.sqrt(spread**2 + se_obs**2)
    s = cal.z_summary([cal.forecast_z(o, p, f, e) for o, p, f, e in zip(obs, pred, spread, se_obs)])
    assert s.n == n
    assert abs(s.mean) < 4 / math.sqrt(n)
    assert abs(s.sd - 1.0) < 4 / math.sqrt(2 * n)
    assert abs(s.share_within_2 - 0.9545) < 4 * math.sqrt(0.9545 * 0.0455 / n)


def test_overconfident_predictions_are_detected():
    """Noise twice the modelled SE: SD of z ≈ 2, far fewer within ±2 — the summary must show it."""
    rng = np.random.default_rng(1)
    n = 2000
    pred = np.zeros(n)
    obs = rng.normal(0.0, 2.0, n)
    s = cal.z_summary([cal.forecast_z(o, p, 1.0) for o, p in zip(obs, pred)])
    assert 1.9 < s.sd < 2.1 and 0.64 < s.share_within_2 < 0.72  # P(|N(0,4)| ≤ 2) = 0.683


def test_z_summary_small_inputs():
    assert cal.z_summary([]) == cal.ZSummary(0, None, None, None)
    one = cal.z_summary([3.0])
    assert one.mean == 3.0 and one.sd is None and one.share_within_2 == 0.0
    two = cal.z_summary([-1.0, 1.0])
    assert two.mean == 0.0 and two.sd == pytest.approx(math.sqrt(2.0), rel=1e-15) and two.share_within_2 == 1.0


def test_correlation():
    x = [1.0, 2.0, 3.0, 4.0]
    assert cal.correlation(x, [2.0, 4.0, 6.0, 8.0]) == pytest.approx(1.0, abs=1e-15)
    assert cal.correlation(x, [-1.0, -2.0, -3.0, -4.0]) == pytest.approx(-1.0, abs=1e-15)
    assert cal.correlation(x, [1.0, -1.0, -1.0, 1.0]) == pytest.approx(0.0, abs=1e-15)
    assert cal.correlation(x, [5.0] * 4) is None and cal.correlation([1.0], [2.0]) is None


def test_explained_fraction_of_a_quadratic_step():
    """ΔH(k) = a_k + b_k exactly (first plus second order): R² is 1 with both terms and
    1 − Σb²/Σ(a+b)² with the first alone."""
    a = np.array([1e-3, -2e-3, 5e-4, 3e-3])
    b = np.array([1e-4, 2e-4, -3e-4, 5e-5])
    obs = a + b
    assert cal.explained_fraction(obs, a + b) == 1.0
    expected_first = 1.0 - (b**2).sum() / (obs**2).sum()
    assert cal.explained_fraction(obs, a) == pytest.approx(expected_first, rel=1e-14)
    assert cal.explained_fraction(obs, np.zeros(4)) == 0.0  # the null prediction
    assert cal.explained_fraction(obs, -obs) == -3.0  # worse than predicting 0
    assert cal.explained_fraction([0.0, 0.0], [1.0, 1.0]) is None


def _calibrate(obs, forecast, first, second, z, **kw):
    args = dict(
        delta_h_obs=obs,
        forecast=forecast,
        forecast_first_order=forecast,
        z=z,
        z_first_order=z,
        delta_h1_obs=first,
        delta_h2_obs=second,
        along_step="exact",
        z_delta_h1_obs=[0.5, -0.5, 1.0],
        z_delta_h2_obs=[3.0, 1.0, 2.0],
        verdicts=["linear", "curved", "unresolved"],
    )
    return cal.calibrate(**{**args, **kw})


def test_calibrate_combines_everything():
    obs = [2.0, -1.0, 0.5]
    first = [1.5, -1.0, 0.25]
    second = [0.5, 0.0, 0.25]
    c = _calibrate(obs, [1.0, -1.0, 0.5], first, second, [1.0, 0.0, 0.0], forecast_first_order=first)
    assert (c.n_steps, c.n_steps_z) == (3, 3)
    assert c.z_mean == pytest.approx(1.0 / 3, rel=1e-14) and c.z_share_within_2 == 1.0
    assert c.explained_second_order == 1.0
    assert c.explained_first_order == pytest.approx(1 - (0.25 + 0.0625) / 5.25, rel=1e-14)
    assert c.explained_by_forecast == pytest.approx(1 - 1.0 / 5.25, rel=1e-14)
    assert c.corr_pred_obs == cal.correlation(first, obs) and c.corr_forecast_obs == cal.correlation([1, -1, 0.5], obs)
    assert c.z_delta_h1_obs_mean == pytest.approx(1.0 / 3, rel=1e-14) and c.z_delta_h2_obs_mean == 2.0
    assert c.z_delta_h2_obs_sd == 1.0
    assert (c.n_curved, c.n_unresolved, c.along_step) == (1, 1, "exact")


def test_a_step_without_z_counts_everywhere_else():
    """No silent drops: a step whose z is undefined (zero spread) leaves the z summary, and only that."""
    obs, pred, first = [2.0, -1.0, 0.5], [1.0, -1.0, 0.5], [1.5, -1.0, 0.25]
    c = _calibrate(obs, pred, first, [0.0] * 3, [1.0, None, 0.0], z_delta_h1_obs=[0.0, None], z_delta_h2_obs=[])
    assert (c.n_steps, c.n_steps_z) == (3, 2)
    assert c.z_mean == pytest.approx(0.5, rel=1e-14)  # z = 1 and 0: the middle step has none
    assert c.corr_forecast_obs == cal.correlation(pred, obs)  # all three steps
    assert c.explained_first_order == cal.explained_fraction(obs, first)
    assert c.z_delta_h1_obs_mean == 0.0 and c.z_delta_h2_obs_mean is None
    none = _calibrate(obs, pred, first, [0.0] * 3, [None] * 3)
    assert none.n_steps_z == 0 and none.z_mean is None and none.corr_forecast_obs == c.corr_forecast_obs
