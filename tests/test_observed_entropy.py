"""The sampled observed entropy change ΔH_obs = H(θ + Δθ) − H(θ) (`observed_entropy.sampled_delta_h`): exact 0 for
Δθ = 0, z-tests against exact enumeration, the combined SE against the two single ones, the fresh-only fallback
below the ESS floor, and a bit-exact restore of θ (also when a pass fails)."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch
from test_truth import gaussian_step

from entropy_probe.enumeration import entropy_at
from entropy_probe.estimators import TARGETS
from entropy_probe.generation import GenerationSpec, generate_responses
from entropy_probe.ground_truth import FreshSampling
from entropy_probe.observed_entropy import COMBINED, FRESH_ONLY, fresh_weight, sampled_delta_h
from entropy_probe.perturb import as_float64
from entropy_probe.scoring import Batch

T = 1.3  # ≠ 1 so a forgotten temperature shows up
MAX_NEW = 3
PROMPTS = ["1+2=", "3+4=", "5+5=", "9+0="]
N = 1024  # E rows; the fresh draw answers the same prompts, row by row
STEP = 0.005  # Δθ: Gaussian at 0.5% of each adapter tensor's mean |θ| — ΔH ≈ 4e-3 nats/token on `model`
KW = dict(target="token_mean", max_tokens=4096, min_ess_fraction=0.1)


@pytest.fixture(scope="module")
def delta(model):
    return gaussian_step(model, STEP)


@pytest.fixture(scope="module")
def exact(model, tokenizer, delta):
    """Exact ΔH per target for prompts drawn uniformly from PROMPTS, by enumeration on a float64 copy."""
    m64 = as_float64(copy.deepcopy(model))
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    kw = dict(eos_id=tokenizer.eos_token_id, max_new_tokens=MAX_NEW, temperature=T, top_p=1.0, max_sequences=10**6)
    d64 = {n: v.double() for n, v in delta.items()}
    with torch.no_grad():
        h0 = entropy_at(m64, d64, 0.0, ids, [1] * len(ids), **kw)
        h1 = entropy_at(m64, d64, 1.0, ids, [1] * len(ids), **kw)
    return {t: h1[t] - h0[t] for t in TARGETS}


def draw(model, tokenizer, seed: int, n: int = N) -> tuple[Batch, FreshSampling]:
    """An E batch as sample-e draws it (prompts with replacement, one response each, at θ) and the fresh
    sampling of the same rows' prompts with another seed."""
    index = torch.randint(len(PROMPTS), (n,), generator=torch.Generator().manual_seed(seed))
    rows = [PROMPTS[i] for i in index.tolist()]
    tensors = generate_responses(model, tokenizer, rows, GenerationSpec(T, 1.0, MAX_NEW, 512, seed=100 + seed))
    tensors["prompt_index"] = index
    E = Batch.from_tensors(tensors, T, 1.0, torch.device("cpu"))
    return E, FreshSampling(tokenizer, rows, GenerationSpec(T, 1.0, MAX_NEW, 512, seed=10_000 + seed))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_identical(model, before: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        assert p.dtype == before[n].dtype and torch.equal(p.detach().view(torch.uint8), before[n].view(torch.uint8)), n


def z(estimate: float, se: float, truth: float) -> float:
    return (estimate - truth) / se


# ---------------------------------------------------------------------------------------------- λ by hand


def test_fresh_weight_minimises_the_variance_of_the_combination():
    """λ = argmin over [0, 1] of var(λa + (1 − λ)b) (checked on a grid), clamped, and 1 where undetermined."""
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(2000, generator=g, dtype=torch.float64)
    a = 2.0 * torch.randn(2000, generator=g, dtype=torch.float64) + 0.5 * shared
    b = torch.randn(2000, generator=g, dtype=torch.float64) + 0.5 * shared
    lam = fresh_weight(a, b)
    grid = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    best = grid[torch.stack([(x * a + (1 - x) * b).var() for x in grid]).argmin()]
    assert 0 < lam < 0.5 and lam == pytest.approx(float(best), abs=1e-4)
    assert fresh_weight(b, a) == pytest.approx(1 - lam, abs=1e-12)  # symmetric roles
    assert fresh_weight(a, a + 10 * b) == 1.0  # the minimiser lies beyond λ = 1: clamped
    assert fresh_weight(a + 10 * b, a) == 0.0  # … below λ = 0
    zero = torch.zeros(5, dtype=torch.float64)
    assert fresh_weight(zero, zero) == 1.0 and fresh_weight(a[:1], b[:1]) == 1.0  # var(b − a) = 0; one row


# ---------------------------------------------------------------------------------------------- on a transformer


@pytest.mark.numerics
def test_zero_step_is_exactly_zero_and_theta_is_restored(model, tokenizer):
    """Δθ = 0 on a float64 model: every estimate exactly 0 with SE 0, ESS/N = 1, θ bit-identical after."""
    m64 = as_float64(copy.deepcopy(model))
    zero = {n: torch.zeros_like(p) for n, p in m64.named_parameters() if p.requires_grad}
    E, fresh = draw(m64, tokenizer, seed=1, n=64)
    before = snapshot(m64)
    r = sampled_delta_h(m64, E, zero, fresh, **{**KW, "max_tokens": 100})  # several microbatches
    assert_bit_identical(m64, before)
    assert (r.delta_h, r.se, r.fresh_delta_h, r.fresh_se, r.snis_delta_h, r.snis_se) == (0.0,) * 6
    assert r.snis_ess_fraction == 1.0 and r.n_sequences == 64 and r.method == COMBINED


def test_agrees_with_exact_enumeration(model, tokenizer, delta, exact):
    """One fixed seed, every target: |z| < 3 for the combined estimate (and each single one), the exact ΔH is a
    realistic 1e-3..1e-2 nats/token and many SEs from 0, and the combined SE ≤ both single SEs."""
    assert 1e-3 < abs(exact["token_mean"]) < 1e-2
    E, fresh = draw(model, tokenizer, seed=0)
    before = snapshot(model)
    for target in TARGETS:
        r = sampled_delta_h(model, E, delta, fresh, **{**KW, "target": target})
        assert r.method == COMBINED and r.snis_ess_fraction > 0.9 and 0 <= r.weight_fresh <= 1
        assert abs(z(r.delta_h, r.se, exact[target])) < 3, (target, r, exact[target])
        assert abs(z(r.fresh_delta_h, r.fresh_se, exact[target])) < 3, (target, r)
        assert abs(z(r.snis_delta_h, r.snis_se, exact[target])) < 3, (target, r)
        assert abs(exact[target]) > 10 * r.se  # the test has teeth
        # λ minimises the rows' variance over [0, 1], with λ = 0 and 1 being the single estimates
        assert r.se <= 1.05 * min(r.fresh_se, r.snis_se), r
        lam = r.weight_fresh
        assert r.delta_h == pytest.approx(lam * r.fresh_delta_h + (1 - lam) * r.snis_delta_h, rel=1e-12)
    assert_bit_identical(model, before)


def test_pooled_z_scores_are_calibrated(model, tokenizer, delta, exact):
    """Over independent seeds, z = (ΔH − exact)/SE has mean ≈ 0 and SD ≈ 1 (λ is estimated from the same rows,
    which makes the SE a little optimistic at small N; the SD band allows for that and for K = 12 draws)."""
    zs = []
    for seed in range(1, 13):
        E, fresh = draw(model, tokenizer, seed)
        r = sampled_delta_h(model, E, delta, fresh, **KW)
        zs.append(z(r.delta_h, r.se, exact["token_mean"]))
    mean, sd = statistics.mean(zs), statistics.stdev(zs)
    assert abs(mean) < 3 / math.sqrt(len(zs)), zs
    assert 0.5 < sd < 1.6, zs


def test_below_the_ess_floor_only_fresh_samples_count(model, tokenizer, delta):
    """ESS/N under min_ess_fraction (1.01: always): λ = 1, the estimate and SE are the fresh ones, and the method
    says so; the SNIS numbers are still reported."""
    E, fresh = draw(model, tokenizer, seed=2, n=256)
    r = sampled_delta_h(model, E, delta, fresh, **{**KW, "min_ess_fraction": 1.01})
    assert r.method == FRESH_ONLY and r.weight_fresh == 1.0
    assert (r.delta_h, r.se) == (r.fresh_delta_h, r.fresh_se)
    assert math.isfinite(r.snis_delta_h) and 0 < r.snis_ess_fraction <= 1
    usual = sampled_delta_h(model, E, delta, fresh, **KW)  # the same rows above the floor: combined
    assert usual.method == COMBINED and (usual.fresh_delta_h, usual.fresh_se) == (r.fresh_delta_h, r.fresh_se)


def test_theta_is_restored_when_a_pass_fails(model, tokenizer, delta, monkeypatch):
    """A fresh draw failing at θ' (inside the perturbation) leaves every parameter bit-identical."""
    E, fresh = draw(model, tokenizer, seed=3, n=16)
    before = snapshot(model)
    calls = []
    real = FreshSampling.draw

    def failing(self, m):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(self, m)

    monkeypatch.setattr(FreshSampling, "draw", failing)
    with pytest.raises(RuntimeError, match="boom"):
        sampled_delta_h(model, E, delta, fresh, **KW)
    assert len(calls) == 2
    assert_bit_identical(model, before)


def test_refuses_mismatched_inputs(model, tokenizer, delta):
    E, fresh = draw(model, tokenizer, seed=4, n=8)
    with pytest.raises(ValueError, match="unknown entropy target"):
        sampled_delta_h(model, E, delta, fresh, **{**KW, "target": "tokens"})
    hotter = FreshSampling(tokenizer, fresh.prompts, GenerationSpec(2 * T, 1.0, MAX_NEW, 512, 3))
    with pytest.raises(ValueError, match="temperature and top_p"):
        sampled_delta_h(model, E, delta, hotter, **KW)
