"""The forecast's simulated trainer draws (entropy_probe.forecast): the subset gradient's normaliser, the spread of
the draws without the E rows' own noise, and the forecast's variance, on inputs with known answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from entropy_probe.errors import ProbeError
from entropy_probe.forecast import (
    TrainerDraws,
    check_pool,
    control_variate_second,
    draw_gradient,
    draw_spread,
    resample_groups,
    simulate_trainer_draws,
    simulate_trainer_draws_shared,
    summarise,
)
from entropy_probe.update import AdamState
from entropy_probe.update_rule import UpdateRule


def test_draw_gradient_is_the_subset_batch_gradient():
    """g_b = N_b / D (the pool's normaliser): the draw's gradient is Σ_{b∈S} N_b / Σ_{b∈S} D_b, a group drawn twice
    counting twice (token-mean: D_b = the group's tokens)."""
    gen = torch.Generator().manual_seed(0)
    numerators = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    tokens = torch.tensor([3.0, 5.0, 2.0, 8.0, 4.0], dtype=torch.float64)
    g_groups = numerators / tokens.sum()
    draw = torch.tensor([1, 3, 1])
    expected = (2 * numerators[1] + numerators[3]) / (2 * tokens[1] + tokens[3])
    torch.testing.assert_close(draw_gradient(g_groups, tokens, draw), expected, rtol=1e-14, atol=0)
    assert draw_gradient(g_groups, torch.zeros(5, dtype=torch.float64), draw).abs().max() == 0


def test_resample_groups_is_seeded_and_in_range():
    a, b = resample_groups(6, 4, 50, seed=3), resample_groups(6, 4, 50, seed=3)
    assert torch.equal(a, b) and a.shape == (50, 4) and int(a.min()) >= 0 and int(a.max()) <= 5
    assert not torch.equal(a, resample_groups(6, 4, 50, seed=4))
    assert len(torch.unique(a)) == 6  # 200 draws with replacement reach every group


def test_draw_spread_removes_the_rows_own_noise():
    """T_Si = F_S + e_Si, F_S ~ N(0, σ²) and row noise e ~ N(0, τ²) with τ²/N ≫ σ²: the naive var_S(mean_i T)
    is about σ² + τ²/N, draw_spread about σ² (its SD here is about σ²·√(2/K)·(1 + τ²/(Nσ²)) ≈ 0.16 σ²)."""
    gen = torch.Generator().manual_seed(1)
    k, n, sigma, tau = 800, 200, 1.0, 40.0
    signal = sigma * torch.randn(k, 1, generator=gen, dtype=torch.float64)
    rows = signal + tau * torch.randn(k, n, generator=gen, dtype=torch.float64)
    naive = float(rows.mean(1).var())
    assert naive == pytest.approx(sigma**2 + tau**2 / n, rel=0.2)  # ≈ 9: the noise dominates
    assert draw_spread(rows) == pytest.approx(sigma**2, abs=0.5)
    no_signal = tau * torch.randn(k, n, generator=gen, dtype=torch.float64)
    assert draw_spread(no_signal) <= 0.5


def test_summarise_formulas():
    """F̄, σ_T² = n/(n−1)·draw_spread, SE² = SE_E² + σ_T²(B_T/n + 1/K), SE_E = std_i(mean_S T_Si)/√N, by hand."""
    gen = torch.Generator().manual_seed(2)
    first = torch.randn(8, 30, generator=gen, dtype=torch.float64) + 1.0
    second = 0.1 * torch.randn(8, 30, generator=gen, dtype=torch.float64)
    draws = TrainerDraws(first, second, torch.zeros(3), torch.ones(8))
    f = summarise(draws, n_pool=16, trainer_groups=4)
    total = first + second
    assert f.delta_h == pytest.approx(float(total.mean()), rel=1e-14)
    assert f.delta_h1 + f.delta_h2 == pytest.approx(f.delta_h, rel=1e-14)
    sd_t = math.sqrt(16 / 15 * draw_spread(total))
    se_e = float(total.mean(0).std()) / math.sqrt(30)
    assert f.sd_trainer == pytest.approx(sd_t, rel=1e-12) and f.se_E == pytest.approx(se_e, rel=1e-12)
    assert f.se == pytest.approx(math.sqrt(se_e**2 + sd_t**2 * (4 / 16 + 1 / 8)), rel=1e-12)
    assert f.spread == pytest.approx(math.sqrt(f.se**2 + f.sd_trainer**2), rel=1e-14)
    sd_t1 = math.sqrt(16 / 15 * draw_spread(first))
    assert f.sd_trainer_first_order == pytest.approx(sd_t1, rel=1e-12)
    assert (f.pool_groups, f.trainer_groups, f.n_draws) == (16, 4, 8)


def _sgd_rule(p: int) -> UpdateRule:
    zeros, ones = torch.zeros(p, dtype=torch.float64), torch.ones(p, dtype=torch.float64)
    state = AdamState(zeros, zeros, zeros, ones, 0.5 * ones, 0.9 * ones, 0.999 * ones, 1e-8 * ones, zeros)
    return UpdateRule("sgd", state, "token-mean", max_grad_norm=None)


def test_simulated_draws_go_through_the_rule():
    """sgd with lr 0.5: Δθ_S = 0.5 g_S; the taylor callback sees exactly that Δθ, and the checks use it."""
    gen = torch.Generator().manual_seed(3)
    g_groups = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    denominators = torch.tensor([1.0, 2.0, 1.0, 3.0, 1.0, 2.0], dtype=torch.float64)
    draws = resample_groups(6, 2, 5, seed=0)
    xbar = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    seen = []

    def taylor(delta):
        seen.append(delta)
        return (xbar @ delta).expand(3).clone(), torch.zeros(3, dtype=torch.float64)

    reference = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    out = simulate_trainer_draws(_sgd_rule(4), g_groups, denominators, draws, taylor, reference)
    for delta, draw in zip(seen, draws):
        torch.testing.assert_close(delta, 0.5 * draw_gradient(g_groups, denominators, draw), rtol=1e-15, atol=0)
    torch.testing.assert_close(out.first_order, torch.stack([xbar @ d for d in seen]), rtol=1e-15, atol=0)
    torch.testing.assert_close(out.mean_delta_theta, torch.stack(seen).mean(0), rtol=1e-14, atol=1e-16)
    assert out.cos_reference[0] == pytest.approx(float(seen[0][0] / seen[0].norm()), rel=1e-14)
    assert out.cos_next.shape == (4,) and out.norm[2] == pytest.approx(float(seen[2].norm()), rel=1e-15)


def _quadratic_rows(curvatures: Tensor, deltas: Tensor, x: Tensor):
    """Row i's entropy as a quadratic in θ: ψ_i(θ + sΔθ̄) along v = x_i·v + s Δθ̄ᵀ H_i v with H_i = c_i I, and the
    exact per-row δH₂ ½ Δθᵀ H_i Δθ of each step."""
    mean = deltas.mean(0)
    d_rows = curvatures[None, :] * (deltas @ mean)[:, None]  # [K, N] Δθ̄ᵀ H_i Δθ_S
    exact = 0.5 * curvatures[None, :] * (deltas * deltas).sum(1)[:, None]
    return d_rows, exact


def test_control_variate_second_is_exact_for_draws_of_one_spread():
    """H_i = c_i I and every e_S = Δθ_S − Δθ̄ of one length: ½ e_Sᵀ H_i e_S is the same for all draws, so one
    exactly computed draw corrects every other to the exact δH₂; with none, the estimate misses exactly that term;
    identical draws need no correction at all."""
    gen = torch.Generator().manual_seed(5)
    p, n = 5, 4
    curvatures = torch.randn(n, generator=gen, dtype=torch.float64)
    base = torch.randn(p, generator=gen, dtype=torch.float64)
    spread = torch.randn(p, generator=gen, dtype=torch.float64)
    deltas = torch.stack([base + spread, base - spread])  # Δθ̄ = base, e_S = ±spread: one length
    d_rows, exact = _quadratic_rows(curvatures, deltas, torch.zeros(n))
    e = deltas - deltas.mean(0)
    missing = 0.5 * curvatures[None, :] * (e * e).sum(1)[:, None]
    torch.testing.assert_close(control_variate_second(d_rows, {}), exact - missing, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(control_variate_second(d_rows, {0: exact[0]}), exact, rtol=1e-12, atol=1e-14)
    same = base.expand(3, p).clone()
    d_same, exact_same = _quadratic_rows(curvatures, same, torch.zeros(n))
    torch.testing.assert_close(control_variate_second(d_same, {}), exact_same, rtol=1e-12, atol=1e-14)


def test_shared_draws_equal_their_own_finite_differences_on_a_quadratic():
    """simulate_trainer_draws_shared against simulate_trainer_draws when every row is a quadratic with H_i = c_i I:
    the first-order rows are equal, and δH₂ rows too up to the draws' own curvature term, which the exactly
    computed draws correct (here: to its mean over those draws)."""
    gen = torch.Generator().manual_seed(6)
    g_groups = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    denominators = torch.ones(6, dtype=torch.float64)
    draws = resample_groups(6, 3, 8, seed=1)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64)  # X_i
    curvatures = torch.randn(5, generator=gen, dtype=torch.float64)
    eps = 1e-3

    def psi(theta_shift: Tensor, v: Tensor) -> Tensor:  # ψ_i at θ + shift, along v: x_i·v + shiftᵀ H_i v
        return x @ v + curvatures * float(theta_shift @ v)

    def taylor(delta):
        plus, minus = psi(eps * delta, delta), psi(-eps * delta, delta)
        return 0.5 * (plus + minus), (plus - minus) / (4 * eps)

    def shifted(mean_delta, deltas):
        plus = torch.stack([psi(eps * mean_delta, d) for d in deltas], dim=1)
        minus = torch.stack([psi(-eps * mean_delta, d) for d in deltas], dim=1)
        return plus, minus, eps

    rule = _sgd_rule(4)
    own = simulate_trainer_draws(rule, g_groups, denominators, draws, taylor)
    shared = simulate_trainer_draws_shared(rule, g_groups, denominators, draws, shifted, taylor, exact_draws=3)
    torch.testing.assert_close(shared.first_rows, own.first_rows, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(shared.second_rows[:3], own.second_rows[:3], rtol=1e-12, atol=1e-14)
    deltas = torch.stack([rule.delta_theta(draw_gradient(g_groups, denominators, d)) for d in draws])
    e2 = ((deltas - deltas.mean(0)) ** 2).sum(1)
    error = shared.second_rows - own.second_rows  # ½ c_i (mean over the exact draws of |e|² − |e_S|²)
    expected = 0.5 * curvatures[None, :] * (e2[:3].mean() - e2)[:, None]
    torch.testing.assert_close(error[3:], expected[3:], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(shared.mean_delta_theta, own.mean_delta_theta, rtol=1e-14, atol=1e-16)
    torch.testing.assert_close(shared.norm, own.norm, rtol=1e-14, atol=0)
    residuals = 0.5 * curvatures.mean() * e2[:3]  # each exact draw's mean residual: the draws' own curvature term
    assert own.correction_var == 0.0
    assert shared.correction_var == pytest.approx(float(residuals.var()) / 3 * (1 - 3 / 8), rel=1e-9)


def test_the_pool_must_be_larger_than_the_trainers_batch():
    check_pool(32, 8, "trajectory.B_U")
    with pytest.raises(ProbeError, match=r"trajectory.B_U = 8 U prompt groups is not more than the trainer's 8"):
        check_pool(8, 8, "trajectory.B_U")
    with pytest.raises(ProbeError, match="trainer_B_U"):
        check_pool(8, 0, "trajectory.B_U")


# ------------------------------------------------------------------------------------------------------------------
# validation: a real TRL run with clipping, at a step size outside the linear regime

CURVED_RUN = {  # LoRA r = 8, lr 0.01, 4 prompts × 4 completions per step, every step saved: clipped on 5 of 7 steps
    "max_operand": 5,
    "rl_lr": 0.01,
    "lora_rank": 8,
    "prompts_per_step": 4,
    "num_generations": 4,
    "rl_steps": 7,
    "save_steps": 1,
}
SEEDS = (0, 1, 2)


# the run is trained on the generic CPU kernels (ATen's portable ones, MKL's vendor-independent path), one thread:
# TRL's sampling makes a run chaotic in the last bit of every logit, so the default kernels of an Intel and an AMD CPU
# train two different runs; these make it the same run on every x86 machine, so the calibration is checked on a fixed
# run. The forecast is not calibrated on every run: an Intel CPU's default kernels train a run whose z SD is 1.59 (its
# last step: σ_T estimated near 0 for two of the three probe seeds, z −3.2 and −5.2) where this run gives 0.90
PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1"}


def train_portable_run(demo: dict, out) -> None:
    """stages.demo's run of `demo` params into `out`, in a child process on PORTABLE_KERNELS."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, sys; from entropy_probe.params import validate_params; from stages import demo; "
        "demo.run(validate_params({'demo': json.loads(sys.argv[1])}), sys.argv[2])"
    )
    env = {**os.environ, **PORTABLE_KERNELS}
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(demo), str(out)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def curved_steps(tmp_path_factory):
    """The run (built once), and per step its Probe at θ(k), the shared Setup and the exact Observation."""
    from entropy_probe.params import validate_params
    from entropy_probe.probe import Probe
    from entropy_probe.tiny import one_thread
    from entropy_probe.trajectory import observe, setup_of, step_pairs

    out = tmp_path_factory.mktemp("curved") / "demo"
    train_portable_run(CURVED_RUN, out)
    params = validate_params(
        {
            "batch_config": {"dataset_name": str(out / "prompts.jsonl")},
            "trajectory": {"run_dir": str(out / "run"), "trainer_draws": 8, "exact_draws": 4},  # §11.4's shared δH₂
        }
    )
    steps, setup = [], None
    with one_thread():
        for pair in step_pairs(params.trajectory.run_dir):
            probe = Probe.from_checkpoint(pair.this, params=params.model_copy(deep=True))
            setup = setup or setup_of(params, probe)
            steps.append((pair, probe, observe(pair, probe, setup)))  # exact ΔH_obs, once per step
    return out, setup, steps


def test_forecast_is_calibrated_on_a_clipped_curved_trl_run(curved_steps):
    """The trajectory's forecast z over 6 steps × 3 probe seeds: SD within 0.7–1.4 and ≥ 80% within ±2, where the
    first order alone is not calibrated (δH₂/δH₁ along the real steps reaches −3.7 and −71). Measured on the run
    trained on the portable kernels (K 8, 4 own δH₂): forecast z mean −0.16, SD 0.90, 94% within ±2; first order
    alone mean +0.73, SD 1.75, 78%. Run here with the shared difference and 4 own (trajectory.exact_draws). When
    written (an AMD run on its default kernels, K 8, every draw its own δH₂): forecast −0.14, 0.93, 94%; first
    order +0.71, 1.82, 78%; on that run at K 16: every draw its own −0.13, 0.98, 94%; exact_draws 4 +0.03, 1.00,
    94%; exact_draws 2 −0.25, 1.22, 89%."""
    import json

    from entropy_probe.calibration import z_summary
    from entropy_probe.tiny import one_thread
    from entropy_probe.trajectory import forecast_step, forecast_zs

    run, setup, steps = curved_steps
    log = json.loads((run / "run" / "checkpoint-7" / "trainer_state.json").read_text())["log_history"]
    norms = [e["grad_norm"] for e in log if "grad_norm" in e]
    assert sum(n > 1.0 for n in norms) >= 4, f"clipping (max_grad_norm 1) should be active: {norms}"
    assert (setup.trainer_B_U, setup.B_U) == (4, 16), "from the trainer's own batch settings"
    ratios = [obs.exact.delta_h2 / obs.exact.delta_h1 for _, _, obs in steps]
    assert max(abs(r) for r in ratios) > 1, f"a step outside the linear regime: δH₂/δH₁ = {ratios}"
    z, z_first = [], []
    with one_thread():
        for pair, probe, observation in steps:
            for seed in SEEDS:
                probe.params.trajectory.seed = seed
                # score_step's forecast and its two z (without the rest of the step's numbers, unused here)
                _, result = forecast_step(pair, probe, setup, observation)
                z_step, z_first_step = forecast_zs(result.forecast, observation)
                z.append(z_step)
                z_first.append(z_first_step)
    forecast, first = z_summary(z), z_summary(z_first)
    assert forecast.n == 18
    assert 0.7 <= forecast.sd <= 1.4 and forecast.share_within_2 >= 0.8, forecast
    assert abs(forecast.mean) < 2 / math.sqrt(forecast.n) * 1.5, forecast
    assert first.sd > 1.4 or first.share_within_2 < 0.8, f"the first order alone should not be calibrated: {first}"


def test_sampled_delta_h_obs_is_calibrated_against_the_exact_one(curved_steps):
    """trajectory.observed=sampled on the same 6 steps × 3 seeds (256 rows): z = (sampled − exact)/SE with SD
    within 0.7–1.4 and mean near 0. Measured when written: see the assertion message on failure; on the demo's
    12 steps × 3 seeds the same gave mean −0.10, SD 0.95."""
    from entropy_probe.calibration import z_summary
    from entropy_probe.tiny import one_thread
    from entropy_probe.trajectory import observe_sampled

    _, _, steps = curved_steps
    z = []
    with one_thread():
        for pair, probe, observation in steps:
            for seed in SEEDS:
                probe.params.trajectory.seed = 100 + seed
                sampled = observe_sampled(probe, pair, observation.rule.observed.delta_theta)
                z.append((sampled.delta_h - observation.exact.delta_h_obs) / sampled.se)
    summary = z_summary(z)
    assert summary.n == 18 and 0.7 <= summary.sd <= 1.4 and abs(summary.mean) < 3 / math.sqrt(18), (summary, z)
