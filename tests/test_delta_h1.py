"""delta-h1 on a real (tiny) transformer: estimates vs exact enumeration, parity, invariance, SEs.

These tests run the product's own code path end to end — generation, teacher forcing, the
double-backward tangents, the estimator coefficients — and compare with `entropy_probe.enumeration`, which
differentiates through the enumeration of every continuation.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import make_lora_model
from tolerances import FP32_REL, FP64_REL, assert_close_scaled, assert_vectors_close, dot_scale, sum_scale

from entropy_probe.artifacts.delta_h1 import Bars, DeltaH1Report
from entropy_probe.delta_h1 import NO_SE_U_FEW_GROUPS, compute_delta_h1
from entropy_probe.enumeration import exact_gradients
from entropy_probe.errors import ProbeError
from entropy_probe.estimators import BASELINES, TARGETS, entropy_coefficients
from entropy_probe.generation import GenerationSpec, generate_responses
from entropy_probe.params import EstimatorParams
from entropy_probe.passes import entropy_pass, policy_gradient, u_row_terms
from entropy_probe.perturb import as_float64
from entropy_probe.policy import policy_logprobs
from entropy_probe.scoring import Batch
from entropy_probe.specs import ComputeBudget
from entropy_probe.update import AdamState, FlatLayout, group_advantages, pg_coefficients, zero_gradient_part
from entropy_probe.update_rule import UpdateRule

MAX_NEW = 3
TEMPERATURE = 1.3  # ≠ 1 so a forgotten temperature anywhere shows up
PROMPTS = ["1+2=", "3+4=", "5+5=", "9+0="]
META = {"generation": {"temperature": TEMPERATURE, "top_p": 1.0}}
CPU = torch.device("cpu")


def sample_batch(model, tokenizer, prompts: list[str], seed: int, top_p: float = 1.0) -> Batch:
    spec = GenerationSpec(TEMPERATURE, top_p, MAX_NEW, batch_size=512, seed=seed)
    tensors = generate_responses(model, tokenizer, prompts, spec, progress=False)
    tensors["prompt_index"] = torch.arange(len(prompts))
    return Batch.from_tensors(tensors, TEMPERATURE, top_p, CPU)


def sample_u(model, tokenizer, n_groups: int, G: int, seed: int, top_p: float = 1.0) -> Batch:
    prompts = [PROMPTS[b % len(PROMPTS)] for b in range(n_groups) for _ in range(G)]
    U = sample_batch(model, tokenizer, prompts, seed, top_p)
    # a reward that is a function of the whole response and varies within groups: parity of the token sum
    rewards = ((U.input_ids[:, U.n_prompt_cols :] * U.mask).sum(-1) % 2).float()
    U.tensors["rewards"] = rewards
    U.tensors["advantages"] = group_advantages(rewards.view(n_groups, G), True, 1e-4).view(-1)
    U.tensors["group_index"] = torch.arange(n_groups).repeat_interleave(G)
    return U


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def adam_state(model, seed: int = 0, lr: float = 1e-2) -> tuple[FlatLayout, AdamState]:
    named = trainable(model)
    layout = FlatLayout.from_named(named)
    gen = torch.Generator().manual_seed(seed)
    m = {n: 1e-3 * torch.randn(p.shape, generator=gen) for n, p in named.items()}
    v = {n: 1e-5 * torch.rand(p.shape, generator=gen) for n, p in named.items()}
    groups = [{"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "names": list(named)}]
    state = AdamState.from_groups(
        layout, {n: p.detach() for n, p in named.items()}, m, v, {n: 5.0 for n in named}, groups
    )
    return layout, state


@pytest.fixture(scope="module")
def exact(model, tokenizer):
    """Exact H and ∇H (every target) for the E prompt multiset: each prompt equally often."""
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    values, grads, _ = exact_gradients(
        model,
        ids,
        [1.0] * len(ids),
        eos_id=tokenizer.eos_token_id,
        max_new_tokens=MAX_NEW,
        temperature=TEMPERATURE,
        top_p=1.0,
        max_sequences=100_000,
    )
    return values, grads


def directional(grad: dict, direction: dict) -> float:
    return float(sum((grad[n].double() * direction[n].double()).sum() for n in grad))


def random_direction(model, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=gen) for n, p in trainable(model).items()}


@pytest.mark.numerics
def test_estimators_agree_with_exact_gradient_on_a_transformer(model, tokenizer, exact):
    """Every target × baseline, projected on random directions: |z| < 4 each and mean z near 0.

    On the way, X̄·v = mean ψ in float32 (the float64 identity is in test_tangents): X̄·v is a sum of
    terms X̄ᵢvᵢ with Σ|X̄ᵢvᵢ| up to ~1000 × |X̄·v|, so the tolerance is relative to Σ|X̄ᵢvᵢ|."""
    values, grads = exact
    names = list(trainable(model))
    params = [dict(model.named_parameters())[n] for n in names]
    layout = FlatLayout.from_named(trainable(model))
    zs = {(t, b): [] for t in TARGETS for b in BASELINES}
    for seed in range(4):
        E = sample_batch(model, tokenizer, PROMPTS * 96, seed=100 + seed)
        features = torch.stack([E.tensors["top1_prob"], E.tensors["margin"]], -1)
        for d in range(2):
            v = random_direction(model, seed=10 * seed + d)
            coefs = entropy_coefficients(E.tensors["entropies"], E.mask, target="sequence", baseline="none")
            xbar, dH, dlogp = entropy_pass(model, params, layout, E, coefs, [v[n] for n in names], 10_000)
            # the X̄ vector and the tangents agree: X̄·v = mean of the per-sequence influence values
            flat_v = layout.flatten(v)
            assert_close_scaled(
                coefs.estimate(dH, dlogp)[0],
                float(xbar.double() @ flat_v.double()),
                dot_scale(xbar, flat_v),
                what="mean ψ vs X̄·v",
            )
            for t, b in zs:
                cf = entropy_coefficients(
                    E.tensors["entropies"], E.mask, target=t, baseline=b, features=features, folds=4
                )
                est, se = cf.estimate(dH, dlogp)
                zs[(t, b)].append((est - directional(grads[t], v)) / se)
    for key, z in zs.items():
        assert max(abs(x) for x in z) < 4, (key, z)
        assert abs(sum(z) / len(z)) < 4 / math.sqrt(len(z)) + 0.5, (key, z)


def test_dropping_the_pathwise_term_is_detected(model, tokenizer, exact):
    """The same z-test catches a biased estimator (no ∇H_k term) at a larger batch."""
    values, grads = exact
    names = list(trainable(model))
    params = [dict(model.named_parameters())[n] for n in names]
    layout = FlatLayout.from_named(trainable(model))
    E = sample_batch(model, tokenizer, PROMPTS * 512, seed=7)
    v = {n: g.float() for n, g in grads["sequence"].items()}  # the direction where ∇H is largest
    coefs = entropy_coefficients(E.tensors["entropies"], E.mask, target="sequence", baseline="mean")
    _, dH, dlogp = entropy_pass(model, params, layout, E, coefs, [v[n] for n in names], 10_000)
    exact_value = directional(grads["sequence"], v)
    est, se = coefs.estimate(dH, dlogp)
    assert abs(est - exact_value) / se < 4
    biased, se_b = coefs.estimate(torch.zeros_like(dH), dlogp)
    assert abs(biased - exact_value) / se_b > 6


@pytest.mark.numerics
def test_delta_h1_of_an_adam_step_matches_exact(model, tokenizer, exact):
    """The full computation with Δθ = a real next AdamW step: per-target δH₁ vs exact ∇H·Δθ (all_targets:
    double-backward tangents), and the default one-backward path (row hooks) gives the same configured
    target, SE_E and E attributions."""
    values, grads = exact
    layout, state = adam_state(model)
    zs = {t: [] for t in TARGETS}
    for seed in range(3):
        E = sample_batch(model, tokenizer, PROMPTS * 64, seed=200 + seed)
        U = sample_u(model, tokenizer, n_groups=8, G=4, seed=300 + seed)
        spec = UpdateRule("adam_step", state, "token-mean", max_grad_norm=1.0)
        result = compute_delta_h1(
            model, E, U, layout, spec, EstimatorParams(baseline="mean"), ComputeBudget(4096, all_targets=True)
        )
        hooked = compute_delta_h1(model, E, U, layout, spec, EstimatorParams(baseline="mean"), ComputeBudget(4096))
        assert list(hooked.targets) == ["token_mean"] and hooked.delta_h1_naive is None
        scale = dot_scale(result.xbar, result.delta_theta)
        for key in ("delta_h1", "delta_h1_from_tangents"):
            assert_close_scaled(
                getattr(hooked, key), getattr(result, key), scale, what=f"hooked vs double-backward {key}"
            )
        assert_close_scaled(hooked.se_E, result.se_E, result.se_E, what="hooked vs double-backward SE_E")
        assert_vectors_close(hooked.e_contributions, result.e_contributions, what="E attributions")
        delta = layout.unflatten(result.delta_theta)
        assert_close_scaled(
            result.delta_h1_from_tangents,
            result.delta_h1,
            dot_scale(result.xbar, result.delta_theta),
            what="tangents vs X̄·Δθ",
        )
        for t in TARGETS:
            r = result.targets[t]
            zs[t].append((r.delta_h1 - directional(grads[t], delta)) / r.se_E)
        assert result.entropy == pytest.approx(values["token_mean"], rel=0.05)
    for t, z in zs.items():
        assert max(abs(x) for x in z) < 4, (t, z)


def naive_objective(model, U: Batch, mode: str, max_len: int) -> torch.Tensor:
    """J written per sequence in plain Python: one forward per sequence, no padding, no masks."""
    per_seq, tokens = [], []
    for i in range(len(U)):
        prompt = U.input_ids[i, : U.n_prompt_cols][U.attention_mask[i, : U.n_prompt_cols].bool()]
        response = U.input_ids[i, U.n_prompt_cols :][U.mask[i]]
        ids = torch.cat([prompt, response]).unsqueeze(0)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        logp = policy_logprobs(logits, U.temperature, U.top_p).gather(-1, response.unsqueeze(-1)).squeeze(-1)
        a = U.tensors["advantages"][i]
        per_seq.append((a * logp).sum())
        tokens.append(len(response))
    n = len(per_seq)
    if mode == "token-mean":
        return sum(per_seq) / sum(tokens)
    if mode == "seq-mean-token-mean":
        return sum(s / t for s, t in zip(per_seq, tokens)) / n
    if mode == "seq-mean-token-sum":
        return sum(per_seq) / n
    return sum(per_seq) / (n * max_len)


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_policy_gradient_equals_autograd_of_naive_loss(model, tokenizer, mode):
    """float32, as the stage runs (the float64 identity is in test_tangents); compared as whole vectors."""
    U = sample_u(model, tokenizer, n_groups=3, G=4, seed=11)
    named = trainable(model)
    layout = FlatLayout.from_named(named)
    coef = pg_coefficients(U.tensors["advantages"], U.mask, mode, MAX_NEW).float()
    g = policy_gradient(model, list(named.values()), layout, U, coef, max_tokens=16)
    naive = torch.autograd.grad(naive_objective(model, U, mode, MAX_NEW), list(named.values()))
    assert_vectors_close(g, torch.cat([x.reshape(-1) for x in naive]), what=f"∇J ({mode}) vs naive")


REL = {"float32": FP32_REL, "float64": FP64_REL}


def in_dtype(model, dtype: str):
    """The model itself (float32, as the stage runs) or a float64 copy, float64 end to end (`as_float64`)."""
    return model if dtype == "float32" else as_float64(copy.deepcopy(model))


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_delta_h1_is_invariant_to_the_token_budget(model, tokenizer, dtype):
    """One microbatch, a few rows each, one row each: the same results up to summation order. In float32 (as
    the stage runs) to FP32_REL of the magnitude of the summed terms; on a float64 model, whose sums
    compute_delta_h1 keeps in float64, to FP64_REL: an exact identity. Dot products are compared relative to
    the magnitude of their terms, X̄ as a whole vector (an element of X̄ may be a sum that cancels to ~0)."""
    E = sample_batch(model, tokenizer, PROMPTS * 8, seed=5)
    U = sample_u(model, tokenizer, n_groups=4, G=4, seed=6)
    policy = in_dtype(model, dtype)
    layout, state = adam_state(policy)
    spec = UpdateRule("adam_step", state, "token-mean", max_grad_norm=1.0)
    results = [
        compute_delta_h1(policy, E, U, layout, spec, EstimatorParams(), ComputeBudget(budget))
        for budget in (10_000, 30, 7)
    ]
    first = results[0]
    assert first.xbar.dtype == getattr(torch, dtype) and first.u_attribution.dtype == torch.float64
    delta_zero = zero_gradient_part("adam_step", state, 1.0)
    scales = {
        "delta_h1": dot_scale(first.xbar, first.delta_theta),
        "delta_h1_momentum_part": dot_scale(first.xbar, delta_zero),
        # standard errors and the entropy are not cancelling sums: their own size is the scale
        **{key: abs(getattr(first, key)) for key in ("se_E", "entropy")},
    }
    # this U batch has a single prompt group with non-zero advantage: SE_U cannot be estimated
    assert all(r.se_U is None and r.se_U_note == NO_SE_U_FEW_GROUPS for r in results)
    for r in results[1:]:
        for key, scale in scales.items():
            assert_close_scaled(getattr(r, key), getattr(first, key), scale, rel=REL[dtype], what=key)
        assert_vectors_close(r.xbar, first.xbar, rel=REL[dtype], what="X̄")


@pytest.mark.numerics
def test_sgd_attributions_sum_to_delta_h1(model, tokenizer):
    """For a rule linear in g, the U group attributions add up to δH₁ exactly and there is no momentum part.

    Both sides are float32 sums with cancellation: compared relative to the magnitude of their terms."""
    E = sample_batch(model, tokenizer, PROMPTS * 8, seed=8)
    U = sample_u(model, tokenizer, n_groups=4, G=4, seed=9)
    layout, state = adam_state(model)
    r = compute_delta_h1(
        model, E, U, layout, UpdateRule("sgd", state, "token-mean"), EstimatorParams(), ComputeBudget(4096)
    )
    assert r.delta_h1_momentum_part == 0
    scale = dot_scale(r.xbar, r.delta_theta) + sum_scale(r.u_attribution)
    assert_close_scaled(float(r.u_attribution.sum()), r.delta_h1, scale, what="Σ attributions vs δH₁")
    # δH₁ changes sign with the advantages: the direction of the update matters, not only its size
    U.tensors["advantages"] = -U.tensors["advantages"]
    flipped = compute_delta_h1(
        model, E, U, layout, UpdateRule("sgd", state, "token-mean"), EstimatorParams(), ComputeBudget(4096)
    )
    assert abs(r.delta_h1) > 1e-3 * scale  # far from 0 on the scale of the check: the sign is meaningful
    assert_close_scaled(flipped.delta_h1, -r.delta_h1, scale, what="δH₁ with flipped advantages")


def test_standard_errors_match_spread_over_repeated_batches(model, tokenizer):
    """SE_E over repeated E batches (U fixed) and SE_U over repeated U batches (E fixed)."""
    layout, state = adam_state(model)
    spec = UpdateRule("sgd", state, "token-mean")
    est = EstimatorParams(baseline="mean")
    E0 = sample_batch(model, tokenizer, PROMPTS * 8, seed=1)
    U0 = sample_u(model, tokenizer, n_groups=8, G=4, seed=2)
    by_e = [
        compute_delta_h1(
            model,
            sample_batch(model, tokenizer, PROMPTS * 8, seed=1000 + s),
            U0,
            layout,
            spec,
            est,
            ComputeBudget(4096),
        )
        for s in range(40)
    ]
    by_u = [
        compute_delta_h1(
            model, E0, sample_u(model, tokenizer, 8, 4, seed=2000 + s), layout, spec, est, ComputeBudget(4096)
        )
        for s in range(40)
    ]
    for runs, key in ((by_e, "se_E"), (by_u, "se_U")):
        values = torch.tensor([r.delta_h1 for r in runs], dtype=torch.float64)
        mean_se = sum(getattr(r, key) for r in runs) / len(runs)
        ratio = mean_se / values.std().item()
        assert 0.65 < ratio < 1.5, (key, ratio)


def test_top_p_below_one_gives_finite_results_and_matches_exact(model, tokenizer):
    """Tokens outside the nucleus have log π = −inf; nothing may turn that into NaN, and δH₁ stays unbiased."""
    top_p = 0.8
    E = sample_batch(model, tokenizer, PROMPTS * 64, seed=21, top_p=top_p)
    U = sample_u(model, tokenizer, n_groups=4, G=4, seed=22, top_p=top_p)
    layout, state = adam_state(model)
    r = compute_delta_h1(
        model,
        E,
        U,
        layout,
        UpdateRule("adam_step", state, "token-mean", max_grad_norm=1.0),
        EstimatorParams(),
        ComputeBudget(4096),
    )
    assert all(math.isfinite(getattr(r, k)) for k in ("delta_h1", "se_E", "entropy"))
    assert r.se_U is None or math.isfinite(r.se_U)
    assert torch.isfinite(r.xbar).all()
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    _, grads, _ = exact_gradients(
        model,
        ids,
        [1.0] * len(ids),
        eos_id=tokenizer.eos_token_id,
        max_new_tokens=MAX_NEW,
        temperature=TEMPERATURE,
        top_p=top_p,
        max_sequences=100_000,
    )
    exact_value = directional(grads["token_mean"], layout.unflatten(r.delta_theta))
    assert abs(r.delta_h1 - exact_value) / r.se_E < 4


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("lora_bias", [False, True])
def test_row_directional_hooks_equal_the_double_backward(tokenizer, lora_bias, dtype):
    """u_row_terms' one-backward row dots (hooks on LoRA Linear weights and biases) = per-token double backward,
    relative to Σ|c·dlogp|: to FP32_REL in float32 as the stage runs, to FP64_REL on a float64 model."""
    from peft import LoraConfig, get_peft_model

    from entropy_probe.tangents import RowDirectional, grad_and_tangents
    from entropy_probe.tiny import build_model

    torch.manual_seed(0)
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        lora_bias=lora_bias,
    )
    model = get_peft_model(build_model(hidden_size=32, seed=5), config).eval()
    U = sample_u(model, tokenizer, n_groups=3, G=4, seed=31)
    model = in_dtype(model, dtype)
    named = trainable(model)
    names, params = list(named), list(named.values())
    assert RowDirectional.supports(model, names) and any(n.endswith(".bias") for n in names) == lora_bias
    coef = pg_coefficients(U.tensors["advantages"], U.mask, "token-mean").to(getattr(torch, dtype))
    direction = [torch.randn_like(p) for p in params]
    rows = u_row_terms(model, params, names, U, coef, direction, max_tokens=20)
    assert rows.dtype == coef.dtype
    stats = U.score(model, slice(0, len(U)), entropies=False)
    _, (dlogp,) = grad_and_tangents([stats.logprobs], [U.mask.to(coef.dtype)], params, direction)
    assert_close_scaled(
        rows, (coef * dlogp).sum(-1), sum_scale(coef * dlogp), rel=REL[dtype], what="hooks vs double backward"
    )


def test_row_directional_refuses_what_it_cannot_do():
    """A trainable tensor used by a module without a hook rule (a LayerNorm here) is not supported; the embedding
    and the Qwen2 RMSNorms are."""
    from entropy_probe.tangents import RowDirectional

    model = make_lora_model()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert RowDirectional.supports(model, names)
    base = model.get_base_model().model
    assert RowDirectional.supports(model, names + ["base_model.model.model.embed_tokens.weight"])
    assert RowDirectional.supports(model, names + ["base_model.model.model.norm.weight"])
    base.norm = torch.nn.LayerNorm(base.norm.weight.shape[0])
    assert not RowDirectional.supports(model, names + ["base_model.model.model.norm.weight"])


@pytest.mark.numerics
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_u_row_terms_fallback_path_agrees(tokenizer, monkeypatch, dtype):
    """Without the hooks (unsupported parameter types) the double-backward path gives the same row terms:
    to FP32_REL in float32, to FP64_REL on a float64 model.

    The model is not the peaked one: its groups have responses (and rewards) that differ, so the rows are not 0."""
    from entropy_probe.tangents import RowDirectional

    model = make_lora_model(seed=3, rank=2)
    U = sample_u(model, tokenizer, n_groups=3, G=4, seed=32)
    model = in_dtype(model, dtype)
    named = trainable(model)
    names, params = list(named), list(named.values())
    assert (U.tensors["advantages"] != 0).sum() >= 6
    coef = pg_coefficients(U.tensors["advantages"], U.mask, "seq-mean-token-mean").to(getattr(torch, dtype))
    direction = [torch.randn_like(p) for p in params]
    fast = u_row_terms(model, params, names, U, coef, direction, max_tokens=40)
    monkeypatch.setattr(RowDirectional, "supports", staticmethod(lambda model, names: False))
    slow = u_row_terms(model, params, names, U, coef, direction, max_tokens=40)
    assert fast.dtype == slow.dtype == coef.dtype
    assert_vectors_close(fast, slow, rel=REL[dtype], what="hooks vs double-backward fallback")


# ---------------------------------------------------------------------------------------------- the contracts


def delta_h1_report(fingerprint: str) -> DeltaH1Report:
    """A delta_h1.json with recognisable numbers (token_mean; δH₁ = −2e-3 ± 1e-3, lr 1e-2)."""
    targets = {t: {"delta_h1": -1e-3 * (i + 1), "se_E": 1e-3, "entropy": 1.0 + i} for i, t in enumerate(TARGETS)}
    targets["token_mean"].update(se_U=1e-4, se_delta_h1=1e-3)
    numbers = dict.fromkeys(
        (
            "delta_h1_from_tangents",
            "bars_dot",
            "entropy",
            "se_E",
            "se_U",
            "delta_h1_gradient_part",
            "delta_h1_momentum_part",
            "delta_h1_gradient_part_linearised",
            "delta_h1_naive",
            "se_E_naive",
            "cov_logp_advantage",
            "norm_xbar",
            "norm_delta_theta",
            "norm_g",
        ),
        0.5,
    )
    return DeltaH1Report(
        delta_h1=-2e-3,
        se_delta_h1=1e-3,
        learning_rate=1e-2,
        **numbers,
        targets=targets,
        B_E=24,
        B_U=4,
        G=4,
        n_E_tokens=50,
        n_U_tokens=40,
        estimator={"entropy": "token_mean", "baseline": "mean", "ridge": 1.0, "crossfit_folds": 5},
        update={
            "rule": "adam_step",
            "loss_agg_mode": "token-mean",
            "loss_agg_reason": "params",
            "max_len": None,
            "max_grad_norm": 1.0,
            "max_grad_norm_source": "params",
        },
        checkpoint_fingerprint=fingerprint,
        reuse={
            "weighted": False,
            "sampler_fingerprint": {"E": fingerprint, "U": fingerprint},
            "ess_fraction_E": 1.0,
            "ess_fraction_U": 1.0,
        },
        world_size=1,
    )


def test_delta_h1_report_round_trip_and_refusals(tmp_path):
    """delta_h1.json keeps today's keys (se_U/se_delta_h1 only for the configured target, ess_E/ess_U only
    when re-weighted), reads back equal, and a malformed file is one line naming the stage to re-run."""
    report = delta_h1_report("abc")
    report.write(tmp_path)
    raw = json.loads((tmp_path / "delta_h1.json").read_text())
    assert set(raw["targets"]["sequence"]) == {"delta_h1", "se_E", "entropy"}
    assert set(raw["targets"]["token_mean"]) == {"delta_h1", "se_E", "entropy", "se_U", "se_delta_h1"}
    assert set(raw["reuse"]) == {"weighted", "sampler_fingerprint", "ess_fraction_E", "ess_fraction_U"}
    assert DeltaH1Report.read(tmp_path) == report and report.target == "token_mean"
    weighted = report.model_copy(update={"reuse": report.reuse.model_copy(update={"weighted": True, "ess_E": 3.5})})
    weighted.write(tmp_path)
    assert json.loads((tmp_path / "delta_h1.json").read_text())["reuse"]["ess_E"] == 3.5
    assert DeltaH1Report.read(tmp_path) == weighted
    # only the configured target (compute.all_targets false) is a valid file; without it, it is not
    configured_only = {**raw, "targets": {"token_mean": raw["targets"]["token_mean"]}}
    (tmp_path / "delta_h1.json").write_text(json.dumps(configured_only))
    assert list(DeltaH1Report.read(tmp_path).targets) == ["token_mean"]
    targets_missing = {**raw, "targets": {k: v for k, v in raw["targets"].items() if k != "token_mean"}}
    for broken, key in (
        ({**raw, "learning_rate": 0.0}, "learning_rate"),
        (targets_missing, ".*configured target 'token_mean'"),
        ({**raw, "extra": 1}, "extra"),
        ({k: v for k, v in raw.items() if k != "se_U"}, ".*se_U is null without se_U_note"),
    ):
        (tmp_path / "delta_h1.json").write_text(json.dumps(broken))
        with pytest.raises(ProbeError, match=rf"delta_h1.json of this version \({key}.*rerun the delta-h1 stage"):
            DeltaH1Report.read(tmp_path)
    with pytest.raises(ProbeError, match="non-finite value at se_U"):
        report.model_copy(update={"se_U": float("nan")}).write(tmp_path / "nan")
    with pytest.raises(ProbeError, match="delta_h1.json is for checkpoint abc, but checkpoint.path x is def"):
        report.check_checkpoint("def", "checkpoint.path x is", "rerun")


def test_bars_round_trip_and_refusals(tmp_path):
    """bars.safetensors: X̄ and Δθ per name read back bit-exact; a foreign kind, a missing or misshapen part,
    a non-positive lr, and a Δθ the model cannot take are one-line ProbeErrors."""
    from entropy_probe.files import write_tensors

    model = make_lora_model()
    named = trainable(model)
    gen = torch.Generator().manual_seed(0)
    xbar = {n: torch.randn(p.shape, generator=gen) for n, p in named.items()}
    delta = {n: torch.randn(p.shape, generator=gen) for n, p in named.items()}
    Bars(xbar, delta, 1e-3, "sequence").write(tmp_path)
    bars = Bars.read(tmp_path)
    assert (bars.learning_rate, bars.target, list(bars.delta_theta)) == (1e-3, "sequence", list(named))
    assert all(torch.equal(bars.xbar[n], xbar[n]) and torch.equal(bars.delta_theta[n], delta[n]) for n in named)
    bars.check_fits(model)
    name = next(iter(named))
    cases = {
        "holds 'other', expected 'bars'": ({f"xbar.{name}": xbar[name]}, "other", {}),
        "xbar.. and delta_theta.. name different": (
            {f"delta_theta.{name}": delta[name]},
            "bars",
            {"learning_rate": 1.0, "target": "sequence"},
        ),
        "metadata learning_rate is None": (
            {f"xbar.{name}": xbar[name], f"delta_theta.{name}": delta[name]},
            "bars",
            {},
        ),
        "learning_rate -1.0 is not a positive": (
            {f"xbar.{name}": xbar[name], f"delta_theta.{name}": delta[name]},
            "bars",
            {"learning_rate": -1.0, "target": "sequence"},
        ),
        "unexpected tensor 'g.x'": ({"g.x": xbar[name]}, "bars", {"learning_rate": 1.0, "target": "sequence"}),
        "are torch.float32 ": (
            {f"xbar.{name}": xbar[name], f"delta_theta.{name}": delta[name][:1]},
            "bars",
            {"learning_rate": 1.0, "target": "sequence"},
        ),
    }
    for message, (tensors, kind, meta) in cases.items():
        write_tensors(tmp_path / "bars.safetensors", tensors, kind, meta)
        with pytest.raises(ProbeError, match=message.replace("..", r".\*")):
            Bars.read(tmp_path)
    with pytest.raises(ProbeError, match="'nope', which the model lacks"):
        Bars({"nope": torch.zeros(2)}, {"nope": torch.zeros(2)}, 1.0, "sequence").check_fits(model)
    with pytest.raises(ProbeError, match=f"Δθ for '{name}' has shape"):
        Bars({name: torch.zeros(1)}, {name: torch.zeros(1)}, 1.0, "sequence").check_fits(model)
