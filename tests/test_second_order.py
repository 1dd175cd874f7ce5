"""δH₂ = ½ Δθᵀ∇²HΔθ from the E samples (entropy_probe/second_order.py, docs/math.md §5.6): against the exact
second difference by enumeration, calibration of its SE over E draws, the quadratic form's symmetry, the
importance weights of reused samples, refusals, and the linear-regime verdict."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_delta_h1 import MAX_NEW, PROMPTS, TEMPERATURE, sample_batch, trainable
from tolerances import FP64_REL

from entropy_probe import enumeration
from entropy_probe.errors import ProbeError
from entropy_probe.importance import importance_weights
from entropy_probe.params import EstimatorParams, Params
from entropy_probe.perturb import as_float64, param_checksum
from entropy_probe.scoring import Batch
from entropy_probe.second_order import linear_regime, second_order, shifted_estimates
from entropy_probe.specs import SecondOrderSpec
from entropy_probe.update import FlatLayout

FD_EPS = Params().second_order.fd_eps
H_EXACT = 1e-3  # step of the exact second difference (float64: round-off ~1e-16/h² of H, truncation ~h²)
RMS_STEP = 5e-4  # RMS of Δθ per parameter: δH₂ ≈ 0.4 δH₁ here, "second order as large as first"


@pytest.fixture(scope="module")
def model64(model):
    return as_float64(copy.deepcopy(model))


@pytest.fixture(scope="module")
def layout(model):
    return FlatLayout.from_named(trainable(model))


@pytest.fixture(scope="module")
def exact_kw(tokenizer):
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    kw = dict(eos_id=tokenizer.eos_token_id, max_new_tokens=MAX_NEW, temperature=TEMPERATURE, top_p=1.0)
    return dict(prompts=ids, multiplicities=[1.0] * len(ids), max_sequences=10**6, **kw)


@pytest.fixture(scope="module")
def step(model64, layout, exact_kw):
    """An actual direction with curvature: the exact ∇H (token_mean), scaled to RMS_STEP per parameter."""
    kw = dict(exact_kw)
    prompts, mult = kw.pop("prompts"), kw.pop("multiplicities")
    _, grads, _ = enumeration.exact_gradients(model64, prompts, mult, **kw)
    d = layout.flatten({n: grads["token_mean"][n] for n in layout.names}).double()
    return d * (RMS_STEP * math.sqrt(d.numel()) / d.norm())


def exact_terms(model64, layout, delta_theta, exact_kw) -> dict[str, tuple[float, float]]:
    """Per target (δH₁, δH₂) over the E prompt multiset: central first and second differences of the exact H."""
    delta = layout.unflatten(delta_theta)
    kw = dict(exact_kw)
    prompts, mult = kw.pop("prompts"), kw.pop("multiplicities")
    h = {s: enumeration.entropy_at(model64, delta, s, prompts, mult, **kw) for s in (-H_EXACT, 0.0, H_EXACT)}
    return {
        t: (
            (h[H_EXACT][t] - h[-H_EXACT][t]) / (2 * H_EXACT),
            (h[H_EXACT][t] + h[-H_EXACT][t] - 2 * h[0.0][t]) / (2 * H_EXACT**2),
        )
        for t in enumeration.TARGETS
    }


@pytest.fixture(scope="module")
def exact(model64, layout, step, exact_kw):
    return exact_terms(model64, layout, step, exact_kw)


def run(model, E, layout, delta_theta, target, baseline="mean", lr=1e-2, fd_eps=FD_EPS, e_weights=None):
    spec = SecondOrderSpec(fd_eps=fd_eps, fraction=0.1)
    est = EstimatorParams(entropy=target, baseline=baseline)
    return second_order(model, E, layout, delta_theta, est, spec, lr=lr, e_weights=e_weights)


@pytest.mark.numerics
def test_delta_h2_matches_exact_second_difference(model, tokenizer, layout, step, exact):
    """Every target on one E batch (fixed seed): |z| < 3 against the exact δH₂, which is far from 0 relative to
    the SE; E and θ are left exactly as they were. Measured: z = 0.02 (token_mean), 0.50 (sequence),
    −0.01 (seq_mean_token_mean); δH₂/SE of the exact value ≈ 10."""
    E = sample_batch(model, tokenizer, PROMPTS * 128, seed=100)
    before = {k: v.clone() for k, v in E.tensors.items()}
    checksum = param_checksum(dict(model.named_parameters()))
    for target in enumeration.TARGETS:
        r = run(model, E, layout, step, target)
        exact_h1, exact_h2 = exact[target]
        assert abs(exact_h2) > 5 * r.se_delta_h2, (target, exact_h2, r.se_delta_h2)
        assert abs(r.delta_h2 - exact_h2) < 3 * r.se_delta_h2, (target, r.delta_h2, exact_h2, r.se_delta_h2)
        assert r.delta_h1 == pytest.approx(exact_h1, rel=0.1)  # δH₁ at s = 0 from the same samples
        assert r.delta_h1_plus_h2 == r.delta_h1 + r.delta_h2
        assert r.ess_fraction_plus > 0.999 and r.ess_fraction_minus > 0.999 and r.fd_eps == FD_EPS
        # δH₂/δH₁ ≈ 0.4: s* = 0.1 · |δH₁| / |δH₂| ≈ 0.25 < 1
        assert r.verdict == "curved" and r.step_multiplier_star < 1
        assert r.eta_star == pytest.approx(r.step_multiplier_star * 1e-2)
    assert all(torch.equal(before[k], E.tensors[k]) for k in before) and before.keys() == E.tensors.keys()
    assert param_checksum(dict(model.named_parameters())) == checksum


@pytest.mark.numerics
def test_se_is_calibrated_over_e_draws_and_pairing_cancels_the_noise(model, tokenizer, layout, step, exact):
    """Over 16 E draws (B_E = 256 prompts drawn uniformly with replacement, as sample-e draws them) z = (δH₂ −
    exact over the prompt population) / SE has mean ≈ 0 and SD ≈ 1 (token_mean; measured over 100 draws: mean
    0.10, SD 0.98; sequence 0.16, 1.02). With the prompt multiset held fixed instead, the SD is 0.65: the SE counts
    which prompts were drawn (docs/math.md §7.4). The paired SE is far below the SE of two independent estimates
    of D(±ε), ¼ √(SE(D(ε))² + SE(D(−ε))²) / ε (measured 0.0057 vs 0.29)."""
    zs = []
    for draw in range(16):
        rows = torch.randint(len(PROMPTS), (256,), generator=torch.Generator().manual_seed(5000 + draw))
        E = sample_batch(model, tokenizer, [PROMPTS[i] for i in rows.tolist()], seed=1000 + draw)
        r = run(model, E, layout, step, "token_mean")
        zs.append((r.delta_h2 - exact["token_mean"][1]) / r.se_delta_h2)
    z = torch.tensor(zs)
    assert abs(float(z.mean())) < 3 / 4 and 0.55 < float(z.std()) < 1.6, zs
    points = shifted_estimates(
        model, E, layout, step, EstimatorParams(entropy="token_mean"), 4096, (0.0, FD_EPS, -FD_EPS)
    )
    se_d = [float(points[s].influence.std()) / math.sqrt(len(E)) for s in (FD_EPS, -FD_EPS)]
    unpaired = math.hypot(*se_d) / (4 * FD_EPS)
    assert r.se_delta_h2 < 0.05 * unpaired, (r.se_delta_h2, unpaired)


@pytest.mark.numerics
def test_quadratic_form_is_even_and_delta_h1_odd(model64, tokenizer, layout, step):
    """Δθ → −Δθ swaps the points θ ± εΔθ and negates the direction: δH₂ and its SE are unchanged, δH₁ flips.
    An exact identity, on the float64 model (tolerance relative to the per-sequence terms, SE·√N)."""
    E = sample_batch(model64, tokenizer, PROMPTS * 16, seed=7)
    for target in ("token_mean", "sequence"):
        pos, neg = run(model64, E, layout, step, target), run(model64, E, layout, -step, target)
        scale = pos.se_delta_h2 * math.sqrt(len(E)) + abs(pos.delta_h2)
        assert abs(pos.delta_h2 - neg.delta_h2) <= FP64_REL * scale, (pos, neg)
        assert abs(pos.se_delta_h2 - neg.se_delta_h2) <= FP64_REL * scale
        assert abs(pos.delta_h1 + neg.delta_h1) <= FP64_REL * (abs(pos.delta_h1) + scale)
        assert pos.ess_fraction_plus == pytest.approx(neg.ess_fraction_minus, rel=1e-12)


@pytest.mark.numerics
def test_e_weights_multiply_the_shift_weights(model64, tokenizer, layout, step):
    """Importance weights of reused samples enter every point: weight 0 on half the rows gives exactly the δH₁ and
    δH₂ of the other half alone (sequence target, no baseline: each row's coefficients are its own), float64."""
    E = sample_batch(model64, tokenizer, PROMPTS * 16, seed=8)
    keep = torch.arange(len(E)) % 2 == 0
    half = Batch.from_tensors({k: v[keep] for k, v in E.tensors.items()}, E.temperature, E.top_p, "cpu")
    e_weights = keep.double() / keep.sum()
    full = run(model64, E, layout, step, "sequence", baseline="none", e_weights=e_weights)
    alone = run(model64, half, layout, step, "sequence", baseline="none")
    scale = alone.se_delta_h2 * math.sqrt(len(half)) + abs(alone.delta_h2)
    assert abs(full.delta_h2 - alone.delta_h2) <= FP64_REL * scale, (full, alone)
    assert abs(full.delta_h1 - alone.delta_h1) <= FP64_REL * (abs(alone.delta_h1) + scale)
    # ESS counts only the rows with weight: ESS/N halves with N doubled
    assert full.ess_fraction_plus == pytest.approx(alone.ess_fraction_plus / 2, rel=1e-9)
    uniform = run(model64, E, layout, step, "sequence", baseline="none", e_weights=torch.full((len(E),), 1 / len(E)))
    plain = run(model64, E, layout, step, "sequence", baseline="none")
    assert uniform.delta_h2 == pytest.approx(plain.delta_h2, rel=1e-12)


@pytest.mark.numerics
def test_samples_drawn_by_another_checkpoint(model, tokenizer, layout, step, exact):
    """E drawn by a nearby checkpoint θ_b and weighted by π_θ/π_θb (as delta-h1 reuses samples): δH₂ at θ still
    agrees with the exact value (|z| < 3, fixed seed; measured z = −0.19 for token_mean, 0.05 for sequence)."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in trainable(other).values():
            p.add_(0.006 * torch.randn(p.shape, generator=gen))  # ESS/N = 0.82
    E = sample_batch(other, tokenizer, PROMPTS * 128, seed=12)
    log_ratio = (E.token_stats(model, 4096)["logprobs"].double() - E.tensors["logprobs"].double()).sum(-1)
    e_weights, ess = importance_weights(log_ratio)
    assert 0.5 < ess / len(E) < 0.9  # really another policy, still usable
    for target in ("token_mean", "sequence"):
        r = run(model, E, layout, step, target, e_weights=e_weights)
        z = (r.delta_h2 - exact[target][1]) / r.se_delta_h2
        assert abs(z) < 3, (target, r.delta_h2, exact[target][1], r.se_delta_h2)
        assert r.ess_fraction_plus == pytest.approx(ess / len(E), rel=0.01)  # the shift barely moves the weights


def test_bad_inputs_are_refused_in_one_line(model, tokenizer, layout, step):
    E = sample_batch(model, tokenizer, PROMPTS, seed=9)
    cases = [
        (dict(delta_theta=step[:-1]), "finite vector of"),
        (dict(delta_theta=step * float("nan")), "finite vector of"),
        (dict(lr=0.0), "set lr to a number > 0"),
        (dict(fd_eps=-1e-2), "second_order.fd_eps"),
        (dict(e_weights=torch.ones(3) / 3), "E weights have shape"),
        # float32 cannot represent θ + 1e-9·Δθ: the shift would round away (to 0 for most parameters)
        (dict(fd_eps=1e-9), "raise second_order.fd_eps, or load the trainable weights in float32"),
    ]
    for change, message in cases:
        kw = {"delta_theta": step, **change}
        delta_theta = kw.pop("delta_theta")
        with pytest.raises(ProbeError, match=message) as err:
            run(model, E, layout, delta_theta, "token_mean", **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(ProbeError, match="at least 2 E sequences"):
        run(model, sample_batch(model, tokenizer, PROMPTS[:1], seed=9), layout, step, "token_mean")


@pytest.mark.parametrize(
    "dh1,dh2,se,expected_s,verdict",
    [
        (-0.2, 0.01, 0.001, 2.0, "linear"),  # resolved, s* = 0.1·0.2/0.01 = 2 ≥ 1
        (-0.2, -0.01, 0.001, 2.0, "linear"),  # the sign of δH₂ does not matter
        (0.02, 0.01, 0.001, 0.2, "curved"),  # resolved, s* = 0.2 < 1
        (0.2, 0.02, 0.01, None, "unresolved"),  # exactly 2 SE is not resolved (strict >); bound 0.1·0.2/0.04 = 0.5
        (-0.2, 0.001, 0.004, None, "linear"),  # not resolved, but even |δH₂| + 2 SE = 0.009 gives s* = 2.2 ≥ 1
        (0.02, 0.001, 0.004, None, "unresolved"),  # not resolved, bound s* = 0.22: cannot tell
        (0.0, 0.0, 0.0, None, "unresolved"),  # Δθ = 0: nothing to say
    ],
)
def test_linear_regime(dh1, dh2, se, expected_s, verdict):
    r = linear_regime(dh1, dh2, se, lr=1e-3, fraction=0.1, z=2.0)
    assert r.verdict == verdict
    if expected_s is None:
        assert r.step_multiplier_star is None and r.eta_star is None
    else:
        assert r.step_multiplier_star == pytest.approx(expected_s, rel=1e-12)
        assert r.eta_star == pytest.approx(expected_s * 1e-3, rel=1e-12)
        # at s*, the quadratic term is exactly the fraction f of the linear one
        s = r.step_multiplier_star
        assert abs(s * s * dh2) == pytest.approx(0.1 * abs(s * dh1), rel=1e-12)


def test_linear_regime_refuses_nonsense():
    for args in [
        (0.1, 0.1, -1.0, 1e-3, 0.1, 2.0),
        (0.1, float("nan"), 0.1, 1e-3, 0.1, 2.0),
        (0.1, 0.1, 0.1, 0, 0.1, 2),
    ]:
        with pytest.raises(ValueError):
            linear_regime(*args)
