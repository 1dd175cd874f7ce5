"""Exact enumeration: brute-force parity, normalisation, ∇H·Δθ vs finite differences, exact restore,
the max_sequences refusal, the calibration of the population z-score, and the `exact` stage end to end on
hand-made artifacts."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging

import pytest
import torch
from artifact_builders import delta_h1_json, verify_json, write_e_samples
from conftest import make_lora_model
from test_delta_h1 import MAX_NEW, TEMPERATURE, adam_state, sample_batch, sample_u
from test_delta_h1 import PROMPTS as U_PROMPTS
from tolerances import assert_close_scaled, dot_scale

from entropy_probe import enumeration, perturb
from entropy_probe.artifacts.delta_h1 import Bars
from entropy_probe.artifacts.exact import ExactReport
from entropy_probe.artifacts.samples import Samples, tokenizer_identity
from entropy_probe.delta_h1 import compute_delta_h1
from entropy_probe.errors import ProbeError
from entropy_probe.files import write_json
from entropy_probe.params import EstimatorParams, Params
from entropy_probe.policy import policy_logprobs
from entropy_probe.probe import Probe
from entropy_probe.specs import ComputeBudget
from entropy_probe.task import load_prompts
from entropy_probe.tiny import build_tokenizer
from entropy_probe.update_rule import UpdateRule
from stages import exact as exact_stage

# floating-point results of the model's kernels, compared to tight tolerances (see tests/tolerances.py)
pytestmark = pytest.mark.numerics

PROMPTS = [[1, 2, 3], [7], [3, 3, 10, 11, 0]]  # different lengths: exercises left padding
MULT = [2, 1, 3]


def small_vocab_model(seed: int = 3):
    """Tiny Qwen2 + LoRA with a 6-token vocabulary (eos = 4), so depth 3 stays cheap to brute-force."""
    from peft import LoraConfig, get_peft_model

    from entropy_probe.tiny import build_model

    base = build_model(
        vocab_size=6, hidden_size=16, num_layers=2, num_heads=2, seed=seed, eos_token_id=4, pad_token_id=5
    )
    torch.manual_seed(seed + 1000)
    config = LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    return get_peft_model(base, config).eval()


def all_responses(vocab: int, eos: int, horizon: int):
    """Every candidate response: ends at its first eos, or has exactly `horizon` tokens."""
    for n in range(1, horizon + 1):
        for y in itertools.product(range(vocab), repeat=n):
            if eos in y[:-1] or (n < horizon and y[-1] != eos):
                continue
            yield y


@torch.no_grad()
def brute_force(model, prompts, mult, eos, horizon, temperature, top_p):
    """Score every candidate sequence with its own forward pass; return per-sequence stats and targets."""
    vocab = model.config.vocab_size
    seqs, w = {}, torch.tensor(mult, dtype=torch.float64) / sum(mult)
    A = D = M = 0.0
    for x, (prompt, wx) in enumerate(zip(prompts, w.tolist())):
        for y in all_responses(vocab, eos, horizon):
            ids = torch.tensor([list(prompt) + list(y)])
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) + len(y) - 1]
            logp = policy_logprobs(logits.double(), temperature, top_p)
            probs = logp.exp()
            H = -(probs * torch.where(probs > 0, logp, torch.zeros_like(logp))).sum(-1)
            p = float(logp[torch.arange(len(y)), torch.tensor(y)].sum().exp())
            S, L = float(H.sum()), len(y)
            if p > 0:
                seqs[(x, y)] = (p, S, L)
            A, D, M = A + wx * p * S, D + wx * p * L, M + wx * p * S / L
    return seqs, {"sequence": A, "token_mean": A / D, "seq_mean_token_mean": M}


@pytest.mark.parametrize(
    "which,horizon,temperature,top_p",
    [("v16", 2, 0.7, 1.0), ("v16", 2, 1.3, 0.8), ("v6", 3, 1.0, 1.0), ("v6", 3, 0.8, 0.6)],
)
def test_exact_matches_brute_force(which, horizon, temperature, top_p):
    model = perturb.as_float64(make_lora_model() if which == "v16" else small_vocab_model())
    eos = model.config.eos_token_id
    prompts = PROMPTS if which == "v16" else [[1, 2, 3], [0], [3, 3, 1, 5, 0]]  # v6: token ids < 6
    seqs, truth = brute_force(model, prompts, MULT, eos, horizon, temperature, top_p)
    kw = dict(eos_id=eos, max_new_tokens=horizon, temperature=temperature, top_p=top_p, max_sequences=10**6)
    with torch.no_grad():
        enum = enumeration.enumerate_forest(model, prompts, **kw)
    got = {}
    for i in range(enum.n_sequences):
        L = int(enum.lengths[i])
        y = tuple(enum.tokens[i, :L].tolist())
        assert (enum.tokens[i, L:] == -1).all()
        assert bool(enum.truncated[i]) == (y[-1] != eos)
        got[(int(enum.prompt_index[i]), y)] = (float(enum.logprob[i].exp()), float(enum.entropy_sum[i]), L)
    # the same set of positive-probability sequences, with the same probabilities and entropy sums
    assert got.keys() == seqs.keys()
    if top_p < 1:
        assert len(got) < len(prompts) * len(list(all_responses(model.config.vocab_size, eos, horizon)))
    for key, (p, S, L) in seqs.items():
        assert got[key] == pytest.approx((p, S, L), rel=1e-9, abs=1e-14)
    values = enumeration.exact_moments(model, prompts, MULT, with_grad=False, **kw)
    for t in enumeration.TARGETS:
        assert float(values[t]) == pytest.approx(truth[t], rel=1e-10)


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_probabilities_sum_to_one_per_prompt(lora_model, top_p):
    kw = dict(eos_id=14, max_new_tokens=3, temperature=0.9, top_p=top_p, max_sequences=10**6)
    with torch.no_grad():
        enum = enumeration.enumerate_forest(lora_model, PROMPTS, **kw)
    mass = torch.zeros(len(PROMPTS), dtype=torch.float64).index_add_(0, enum.prompt_index, enum.logprob.double().exp())
    torch.testing.assert_close(mass, torch.ones_like(mass), rtol=0, atol=1e-5)
    assert torch.isfinite(enum.logprob).all()
    assert enum.n_sequences == len(enumeration.enumerate_tree(lora_model, PROMPTS[0], **kw).lengths) + sum(
        len(enumeration.enumerate_tree(lora_model, p, **kw).lengths) for p in PROMPTS[1:]
    )


def test_kv_cache_matches_whole_prefix_forwards():
    """Feeding only the newest token with a gathered KV cache == re-running every whole prefix, grads too."""
    model = perturb.as_float64(make_lora_model(seed=4))
    kw = dict(eos_id=14, max_new_tokens=3, temperature=0.8, top_p=0.7, max_sequences=10**6)
    a = enumeration.enumerate_forest(model, PROMPTS, kv_cache=True, **kw)
    b = enumeration.enumerate_forest(model, PROMPTS, kv_cache=False, **kw)
    assert a.forward_tokens < b.forward_tokens
    for field in ("prompt_index", "tokens", "lengths", "truncated"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    torch.testing.assert_close(a.token_logprobs, b.token_logprobs, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(a.entropies, b.entropies, rtol=1e-11, atol=1e-12)
    params = list(enumeration.trainable(model).values())
    w = torch.tensor([0.2, 0.3, 0.5])
    ga = torch.autograd.grad(enumeration.weighted_sums(a, w)["mean_h"], params)
    gb = torch.autograd.grad(enumeration.weighted_sums(b, w)["mean_h"], params)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-13)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    model = perturb.as_float64(make_lora_model(seed=4))
    kw = dict(eos_id=14, max_new_tokens=2, temperature=0.8, top_p=0.9, max_sequences=10**6)
    cpu = enumeration.exact_moments(model, PROMPTS, MULT, with_grad=False, **kw)
    values, grads, _ = enumeration.exact_gradients(model.cuda(), PROMPTS, MULT, **kw)
    delta = {n: d.cuda() for n, d in random_direction(model).items()}
    with perturb.perturbed(model, delta, 0.5):
        pass
    for t in enumeration.TARGETS:
        assert values[t] == pytest.approx(cpu[t].item(), rel=1e-9)
        assert all(g.is_cuda for g in grads[t].values())


def test_every_token_an_eos_stops_after_one_step():
    """All prefixes end at depth 0: the loop stops early; several eos ids are honoured (float64: exact sums)."""
    model = perturb.as_float64(make_lora_model())
    kw = dict(max_new_tokens=3, temperature=1.0, top_p=1.0, max_sequences=10**6)
    with torch.no_grad():
        enum = enumeration.enumerate_forest(model, PROMPTS, eos_id=list(range(16)), **kw)
    assert enum.n_sequences == 16 * len(PROMPTS)
    assert (enum.lengths == 1).all() and not enum.truncated.any()
    values = enumeration.exact_moments(model, PROMPTS, eos_id=list(range(16)), with_grad=False, **kw)
    assert float(values["mass"]) == pytest.approx(1.0, abs=1e-12)
    assert float(values["token_mean"]) == pytest.approx(float(values["sequence"]), rel=1e-12)  # L = 1


def test_as_float64_is_float64_end_to_end_and_twice_differentiable():
    """as_float64: attention in float64 (transformers' eager softmax would round to float32, and turn the
    fully masked rows of left padding into NaN), so a left-padded batch scores each row exactly as its
    unpadded forward; and a double backward exists (SDPA's CPU kernel has none), giving directional
    derivatives that match central finite differences."""
    from entropy_probe.policy import teacher_force
    from entropy_probe.tangents import grad_and_tangents

    model = perturb.as_float64(make_lora_model(seed=4))
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.config._attn_implementation == perturb.FLOAT64_ATTENTION
    rows = [[1, 2, 3, 4, 5], [7, 8, 9]]  # prompt of 3 and of 1 token, two response tokens each
    ids = torch.tensor([rows[0], [15, 15] + rows[1]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    scored = teacher_force(model, ids, mask, 3, torch.ones(2, 2, dtype=torch.bool), 1.0, 1.0, with_grad=True)
    assert scored.logprobs.dtype == torch.float64 and torch.isfinite(scored.logprobs).all()
    for i, row in enumerate(rows):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row])).logits[0, -3:-1]
        alone = policy_logprobs(logits, 1.0).gather(-1, torch.tensor(row[-2:])[:, None])[:, 0]
        torch.testing.assert_close(scored.logprobs[i], alone, rtol=0, atol=1e-12)

    params = list(enumeration.trainable(model).values())
    direction = [
        torch.randn(p.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        for k, p in enumerate(params)
    ]
    _, (tangents,) = grad_and_tangents([scored.logprobs], [torch.ones(2, 2, dtype=torch.float64)], params, direction)
    delta, h = dict(zip(enumeration.trainable(model), direction)), 1e-6

    def scored_at(step: float) -> torch.Tensor:
        with torch.no_grad(), perturb.perturbed(model, delta, step):
            return teacher_force(model, ids, mask, 3, torch.ones(2, 2, dtype=torch.bool), 1.0, 1.0).logprobs

    assert torch.equal(scored_at(0.0), scored.logprobs.detach())
    # central differences: truncation O(h²) and round-off ~1e-16/h, both ~1e-10 here
    torch.testing.assert_close(tangents, (scored_at(h) - scored_at(-h)) / (2 * h), rtol=1e-7, atol=1e-9)
    assert tangents.abs().min() > 1e-4


def random_direction(model, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        n: scale * p.detach().abs().mean() * torch.randn(p.shape, generator=g, dtype=torch.float64)
        for n, p in enumeration.trainable(model).items()
    }


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_delta_h1_matches_finite_difference_slope(top_p):
    model = perturb.as_float64(make_lora_model(seed=1))
    kw = dict(eos_id=14, max_new_tokens=2, temperature=1.1, top_p=top_p, max_sequences=10**6)
    delta = random_direction(model)
    values, grads, n = enumeration.exact_gradients(model, PROMPTS, MULT, prompts_per_chunk=1, **kw)  # chunked
    slopes = enumeration.fd_slopes(model, delta, PROMPTS, MULT, step=1e-3, **kw)
    full = enumeration.exact_moments(model, PROMPTS, MULT, with_grad=True, **kw)  # one graph, no chunks
    params = enumeration.trainable(model)
    for t in enumeration.TARGETS:
        dh1 = enumeration.directional(grads[t], delta)
        assert abs(dh1) > 1e-6  # a direction that actually moves H
        assert abs(dh1 - slopes[t]) / abs(slopes[t]) < 1e-3, (t, dh1, slopes[t])
        # chunked gradient accumulation == autograd through the single full graph
        ref = torch.autograd.grad(full[t], list(params.values()), retain_graph=True)
        for name, g in zip(params, ref):
            torch.testing.assert_close(grads[t][name], g, rtol=1e-9, atol=1e-12)
        assert values[t] == pytest.approx(full[t].item(), rel=1e-12)
    # ΔH(η) is second-order close to the linear prediction for small η, and exactly 0 at η = 0
    curve = enumeration.delta_h_curve(model, delta, [0.0, 0.01], PROMPTS, MULT, **kw)
    for t in enumeration.TARGETS:
        assert curve[t][0] == 0.0
        lin = 0.01 * enumeration.directional(grads[t], delta)
        assert abs(curve[t][1] - lin) < 0.05 * abs(lin)


# ---------------------------------------------------------------------------------------------- z-scores

# E is drawn from this population. Δθ (from test_delta_h1's U prompts) moves the entropies of these prompts by
# very different amounts, so which prompts E drew is a large part of SE_E, as on the demo.
POPULATION = U_PROMPTS + ["7", "77", "777", "7777"]


def per_prompt_moments(model, prompt_ids, delta, **kw) -> torch.Tensor:
    """[n, 3, 2] float64: per prompt, (value, ∇ · Δθ) of A_x = Σ_y p S, D_x = Σ_y p L and M_x = Σ_y p S/L."""
    params = enumeration.trainable(model)
    rows = []
    for _, sums, _ in enumeration.chunk_sums(model, prompt_ids, None, 1, **kw):
        row = []
        for k in ("sum_h", "length", "mean_h"):
            grads = torch.autograd.grad(sums[k], list(params.values()), retain_graph=True)
            row.append((float(sums[k].detach()), enumeration.directional(dict(zip(params, grads)), delta)))
        rows.append(row)
    return len(prompt_ids) * torch.tensor(rows, dtype=torch.float64)  # chunk_sums weighs each prompt 1/n


def exact_delta_h1(moments: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """Exact δH₁ over the prompt multiset with these counts: w = counts / Σ counts, A = Σ w_x A_x (…),
    δ(A/D) = (δA·D − A·δD) / D²."""
    w = counts.double() / counts.sum()
    (A, dA), (D, dD), (_, dM) = ((w @ moments[:, k, :]).tolist() for k in range(3))
    return {"sequence": dA, "token_mean": (dA * D - A * dD) / D**2, "seq_mean_token_mean": dM}


def test_population_z_is_calibrated_and_the_conditional_z_is_not(tokenizer):
    """Over repeated E draws (fixed U, so fixed Δθ), z_population = (δH₁ − exact over the whole population) / SE_E
    has mean ≈ 0 and SD ≈ 1, while z against the exact value over each draw's own prompt multiset has SD well
    below 1: SE_E counts the variance of which prompts were drawn, which that comparison holds fixed."""
    model = make_lora_model(seed=3, rank=2, head_scale=40.0)
    layout, state = adam_state(model)
    spec = UpdateRule("sgd", state, "token-mean")
    U = sample_u(model, tokenizer, n_groups=8, G=4, seed=2)
    kw = dict(eos_id=tokenizer.eos_token_id, max_new_tokens=MAX_NEW, temperature=TEMPERATURE, top_p=1.0)
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in POPULATION]
    moments, population = None, None
    z_pop, z_cond = ({t: [] for t in enumeration.TARGETS} for _ in range(2))
    for d in range(120):
        # B_E = 64 prompts uniformly with replacement, as sample-e draws them (generation.plan_e)
        rows = torch.randint(len(POPULATION), (64,), generator=torch.Generator().manual_seed(5000 + d))
        E = sample_batch(model, tokenizer, [POPULATION[i] for i in rows.tolist()], seed=6000 + d)
        result = compute_delta_h1(
            model, E, U, layout, spec, EstimatorParams(baseline="mean"), ComputeBudget(4096, all_targets=True)
        )
        if moments is None:  # Δθ depends on U only: the same for every draw
            delta = layout.unflatten(result.delta_theta)
            moments = per_prompt_moments(model, ids, delta, max_sequences=10**6, **kw)
            population = exact_delta_h1(moments, torch.ones(len(ids)))
            # the stage's population value (exact_gradients, uniform weights, other chunks) is this one, up to
            # float32 rounding (scale: the magnitude of the terms of the dot product ∇H·Δθ, not its cancelling value)
            _, grads, _ = enumeration.exact_gradients(model, ids, None, prompts_per_chunk=3, max_sequences=10**6, **kw)
            scale = max(sum(dot_scale(grads[t][n], delta[n]) for n in delta) for t in enumeration.TARGETS)
            for t in enumeration.TARGETS:
                got = enumeration.directional(grads[t], delta)
                assert_close_scaled(got, population[t], scale, what=f"population δH₁ ({t})")
        drawn = exact_delta_h1(moments, torch.bincount(rows, minlength=len(ids)))
        for t in enumeration.TARGETS:
            r = result.targets[t]
            z_pop[t].append((r.delta_h1 - population[t]) / r.se_E)
            z_cond[t].append((r.delta_h1 - drawn[t]) / r.se_E)
    sd = {t: (torch.tensor(z_pop[t]).std().item(), torch.tensor(z_cond[t]).std().item()) for t in z_pop}
    for t in enumeration.TARGETS:
        mean = sum(z_pop[t]) / len(z_pop[t])
        assert 0.6 < sd[t][0] < 1.5 and abs(mean) < 0.5, (t, mean, sd[t])
        assert sd[t][1] < sd[t][0], (t, sd[t])
    # measured: SD 1.05 (population) vs 0.71 (given the drawn prompts) for token_mean, 1.04 vs 0.72 for sequence
    for t in ("sequence", "token_mean"):
        assert sd[t][1] < 0.8 * sd[t][0], (t, sd[t])


def test_perturbed_restores_bit_exactly(lora_model):
    before = {n: p.detach().clone() for n, p in lora_model.named_parameters()}
    delta = {n: torch.randn_like(p) for n, p in enumeration.trainable(lora_model).items()}
    with perturb.perturbed(lora_model, delta, 0.37):
        name = next(iter(delta))
        torch.testing.assert_close(dict(lora_model.named_parameters())[name], before[name] + 0.37 * delta[name])
    with pytest.raises(KeyError):  # restored even when the body fails
        with perturb.perturbed(lora_model, delta, 1e-3):
            raise KeyError("boom")
    for n, p in lora_model.named_parameters():
        assert torch.equal(p.detach().view(torch.int32), before[n].view(torch.int32)), n
    with pytest.raises(ProbeError, match="does not have"):
        with perturb.perturbed(lora_model, {"nope": torch.zeros(1)}, 1.0):
            pass


def test_max_sequences_refusal(lora_model):
    kw = dict(eos_id=14, max_new_tokens=3, temperature=1.0, top_p=1.0)
    with torch.no_grad():
        n = enumeration.enumerate_tree(lora_model, PROMPTS[0], max_sequences=10**6, **kw).n_sequences
        assert enumeration.enumerate_tree(lora_model, PROMPTS[0], max_sequences=n, **kw).n_sequences == n
        with pytest.raises(ProbeError) as err:
            enumeration.enumerate_tree(lora_model, PROMPTS[0], max_sequences=n - 1, **kw)
        msg = str(err.value)
        assert f"exact.max_sequences = {n - 1}" in msg and "generation.max_new_tokens" in msg and "\n" not in msg
        with pytest.raises(ProbeError, match=r"at least \d+ sequences by depth 2 of 3"):
            enumeration.enumerate_tree(lora_model, PROMPTS[0], max_sequences=100, **kw)
        with pytest.raises(ProbeError, match="at least 3 sequences by depth 0"):  # each prompt needs one
            enumeration.enumerate_forest(lora_model, PROMPTS, max_sequences=2, **kw)
        # the limit is on the total over prompt chunks, not per chunk
        with pytest.raises(ProbeError, match=r"at least (\d+) sequences") as err:
            enumeration.exact_moments(
                lora_model, PROMPTS, max_sequences=n + 10, with_grad=False, prompts_per_chunk=1, **kw
            )
        assert int(str(err.value).split("at least ")[1].split()[0]) > n + 10


# ---------------------------------------------------------------------------------------------- stage


def write_stage_inputs(root, prompts_rows, horizon, delta, lr, estimates, fingerprint="abc123", **generation):
    """Hand-made E samples (each response a lone eos: the exact stage reads only the prompts and the generation
    settings), bars, delta_h1.json and verify.json, all valid artifacts of their stages."""
    write_e_samples(root / "sample_e", prompts_rows, horizon, eos=14, pad=15, **generation)
    zeros = {n: torch.zeros_like(v, dtype=torch.float32) for n, v in delta.items()}
    Bars(xbar=zeros, delta_theta=delta, learning_rate=lr, target="token_mean").write(root / "delta_h1")
    dh1 = delta_h1_json(learning_rate=lr, checkpoint_fingerprint="abc123", targets=estimates, se_delta_h1=2e-3)
    write_json(root / "delta_h1" / "delta_h1.json", dh1)
    write_json(root / "verify" / "verify.json", verify_json(2, lr, fingerprint))


# arithmetic:1 = "0+0=", "0+1=", "1+0=", "1+1=", as the tiny tokenizer writes them (one token per character)
ARITHMETIC_1 = [[0, 10, 0, 12], [0, 10, 1, 12], [1, 10, 0, 12], [1, 10, 1, 12]]


def drawn_from_arithmetic(root, prompt_index: list[int]) -> None:
    """Make the E samples in root/sample_e records `prompt_index` of arithmetic:1, drawn with the tiny tokenizer."""
    prompt_set = load_prompts(Params().batch_config.model_copy(update={"dataset_name": "arithmetic:1"}))
    samples = Samples.read(root / "sample_e", "samples_e")
    dataset = {"name": "arithmetic:1", "fingerprint": prompt_set.fingerprint, "size": len(prompt_set)}
    meta = samples.meta.model_copy(
        update={
            "dataset": samples.meta.dataset.model_copy(update=dataset),
            "tokenizer": samples.meta.tokenizer.model_copy(update=tokenizer_identity(build_tokenizer())),
        }
    )
    dataclasses.replace(samples, prompt_index=torch.tensor(prompt_index), meta=meta).write(root / "sample_e")


def stage_params(root) -> Params:
    params = Params()
    params.paths.sample_e, params.paths.delta_h1, params.paths.verify = (
        str(root / "sample_e"),
        str(root / "delta_h1"),
        str(root / "verify"),
    )
    params.exact.eta_multipliers = [0.5, 1.0]
    params.exact.prompts_per_chunk = 2
    params.batch_config.dataset_name = "arithmetic:1"
    return params


def use_policy(monkeypatch, fingerprint: str = "abc123") -> None:
    """The stage's policy: the tiny model in memory, as the checkpoint `fingerprint` (delta-h1's by default)."""

    def policy(cls, params):
        return cls(make_lora_model(seed=2), build_tokenizer(), None, params=params, fingerprint=fingerprint)

    monkeypatch.setattr(Probe, "policy", classmethod(policy))


def test_exact_refuses_a_checkpoint_delta_h1_did_not_probe(tmp_path, monkeypatch):
    """checkpoint.path names another checkpoint than the one delta-h1 (and verify) described: exact refuses in
    one line before enumerating, instead of writing the other checkpoint's values under delta-h1's label."""
    use_policy(monkeypatch, fingerprint="another")
    delta = {n: v.float().double() for n, v in random_direction(make_lora_model(seed=2), seed=5).items()}
    write_stage_inputs(
        tmp_path, [ARITHMETIC_1[1]], 2, delta, 1e-2, {"token_mean": {"delta_h1": 0.0, "se_E": 1e-3, "entropy": 2.5}}
    )
    drawn_from_arithmetic(tmp_path, [1])
    with pytest.raises(
        ProbeError, match="delta_h1.json is for checkpoint abc123, but the probed checkpoint is another"
    ) as err:
        exact_stage.run(stage_params(tmp_path), tmp_path / "exact", dry_run=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "exact").exists()


def test_exact_stage_end_to_end(tmp_path, monkeypatch, capsys):
    use_policy(monkeypatch)
    reference = perturb.as_float64(make_lora_model(seed=2))
    index = [1, 3, 1, 1]  # 2 distinct prompts of the 4, multiplicities 3 and 1
    delta = {n: v.float().double() for n, v in random_direction(reference, seed=5).items()}
    estimates = {
        "token_mean": {"delta_h1": 0.0, "se_E": 1e-3, "entropy": 2.5},
        "sequence": {"delta_h1": 1e-3, "se_E": 0.0, "entropy": 5.0},
    }
    write_stage_inputs(tmp_path, [ARITHMETIC_1[i] for i in index], 2, delta, 1e-2, estimates)
    drawn_from_arithmetic(tmp_path, index)
    params = stage_params(tmp_path)

    # --dry-run counts from the config alone: no model load, no enumeration
    monkeypatch.setattr(exact_stage, "_base_config", lambda params: reference.config)
    with monkeypatch.context() as m:
        m.setattr(Probe, "policy", classmethod(lambda cls, params: pytest.fail("--dry-run loaded the model")))
        printed = exact_stage.run(params, tmp_path / "dry", dry_run=True)
    assert not (tmp_path / "dry").exists()
    assert "2 distinct prompts (4 E rows), exactly 482 sequences" in printed  # 2 × (1 + 16·15)
    assert "the whole population: 4 prompts, exactly 964 sequences;" in printed

    summary = exact_stage.run(params, tmp_path / "exact", dry_run=False)
    out = json.loads((tmp_path / "exact" / "exact.json").read_text())
    assert ExactReport.read(tmp_path / "exact").model_dump(mode="json") == out  # written through the contract
    assert "\n" not in summary and summary.startswith("exact: ")
    assert summary.endswith(str(tmp_path / "exact" / "exact.json"))
    assert f"{out['targets']['token_mean']['delta_h1_exact']:.4e} exact δH₁ (token_mean)" in summary
    assert out["n_distinct_prompts"] == 2 and out["n_e_rows"] == 4 and out["n_sequences"] == 482
    assert out["n_population_prompts"] == 4 and out["n_population_sequences"] == 964
    kw = dict(eos_id=14, max_new_tokens=2, temperature=0.9, top_p=1.0, max_sequences=10**6)
    full = enumeration.exact_moments(reference, [ARITHMETIC_1[1], ARITHMETIC_1[3]], [3, 1], with_grad=True, **kw)
    whole = enumeration.exact_moments(reference, ARITHMETIC_1, None, with_grad=True, **kw)  # each prompt 1/4
    params_ref = enumeration.trainable(reference)
    for t in enumeration.TARGETS:
        r = out["targets"][t]
        g = dict(zip(params_ref, torch.autograd.grad(full[t], list(params_ref.values()), retain_graph=True)))
        g_pop = dict(zip(params_ref, torch.autograd.grad(whole[t], list(params_ref.values()), retain_graph=True)))
        assert r["entropy_exact"] == pytest.approx(full[t].item(), rel=1e-10)
        assert r["delta_h1_exact"] == pytest.approx(enumeration.directional(g, delta), rel=1e-9)
        assert r["entropy_exact_population"] == pytest.approx(whole[t].item(), rel=1e-10)
        assert r["delta_h1_exact_population"] == pytest.approx(enumeration.directional(g_pop, delta), rel=1e-9)
        assert r["delta_h1_exact_population"] != pytest.approx(r["delta_h1_exact"], rel=1e-3)  # another reference
        assert r["rel_err_fd"] < 1e-3
        linear = [e["delta_h1_exact_linear"] for e in r["eta_grid"]]
        assert linear == pytest.approx([0.5 * r["delta_h1_exact"], r["delta_h1_exact"]])
        assert [e["eta"] for e in r["eta_grid"]] == pytest.approx([0.5e-2, 1e-2])
    tm = out["targets"]["token_mean"]
    assert tm["z"] == pytest.approx((0.0 - tm["delta_h1_exact"]) / 1e-3)
    assert tm["z_population"] == pytest.approx((0.0 - tm["delta_h1_exact_population"]) / 1e-3)
    assert f"z_population {tm['z_population']:+.2f} (given E's prompts {tm['z']:+.2f})" in summary
    assert tm["se_delta_h1"] == 2e-3 and out["targets"]["sequence"]["se_delta_h1"] is None  # configured target only
    assert out["targets"]["sequence"]["z"] is None and out["targets"]["sequence"]["z_population"] is None  # SE_E = 0
    assert [e["delta_h1_linear"] for e in out["targets"]["sequence"]["eta_grid"]] == pytest.approx([5e-4, 1e-3])

    # Δθ naming a parameter the model lacks: one-line error, previous output untouched
    nope = {"xbar": {"nope": torch.zeros(2)}, "delta_theta": {"nope": torch.zeros(2)}}
    Bars(**nope, learning_rate=1e-2, target="token_mean").write(tmp_path / "delta_h1")
    with pytest.raises(ProbeError, match="'nope'"):
        exact_stage.run(params, tmp_path / "exact", dry_run=False)
    assert json.loads((tmp_path / "exact" / "exact.json").read_text()) == out


def test_exact_stage_skips_a_population_over_the_limit(tmp_path, monkeypatch, caplog):
    """The population (4 × 241 sequences) over exact.max_sequences while E (2 × 241) fits: counted before any
    enumeration, a warning, null population fields; E's values as usual."""
    use_policy(monkeypatch)
    delta = {n: v.float().double() for n, v in random_direction(make_lora_model(seed=2), seed=5).items()}
    estimates = {"token_mean": {"delta_h1": 0.0, "se_E": 1e-3, "entropy": 2.5}}
    write_stage_inputs(tmp_path, [ARITHMETIC_1[i] for i in (1, 3)], 2, delta, 1e-2, estimates)
    drawn_from_arithmetic(tmp_path, [1, 3])
    params = stage_params(tmp_path)
    params.exact.max_sequences = 900
    with caplog.at_level(logging.WARNING, logger=exact_stage.__name__):
        summary = exact_stage.run(params, tmp_path / "exact", dry_run=False)
    assert "up to 964 sequences > exact.max_sequences = 900" in caplog.text
    assert "z_population n/a" in summary
    out = ExactReport.read(tmp_path / "exact")
    assert out.n_population_prompts == 4 and out.n_population_sequences is None and out.n_sequences == 482
    for r in out.targets.values():
        assert r.entropy_exact_population is None and r.delta_h1_exact_population is None and r.z_population is None
    assert out.targets["token_mean"].z is not None


def test_exact_stage_refuses_a_population_that_is_not_e_s(tmp_path, monkeypatch):
    """batch_config naming another dataset than E's, or a record that tokenises to other tokens than its E row:
    one line, nothing written."""
    use_policy(monkeypatch)
    delta = {n: v.float().double() for n, v in random_direction(make_lora_model(seed=2), seed=5).items()}
    write_stage_inputs(tmp_path, [ARITHMETIC_1[1], ARITHMETIC_1[3]], 2, delta, 1e-2, None)
    drawn_from_arithmetic(tmp_path, [1, 3])
    params = stage_params(tmp_path)
    params.batch_config.dataset_name = "arithmetic:2"
    with pytest.raises(ProbeError, match=r"drawn from dataset \w+ \(4 records\), batch_config names \w+ \(9"):
        exact_stage.run(params, tmp_path / "exact", dry_run=False)
    drawn_from_arithmetic(tmp_path, [1, 2])  # row 1 holds "1+1=", record 2 is "1+0="
    with pytest.raises(ProbeError, match="E row 1's prompt tokens differ from dataset record 2") as err:
        exact_stage.run(stage_params(tmp_path), tmp_path / "exact", dry_run=False)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "exact").exists()


def test_exact_stage_refuses_mismatched_inputs(tmp_path, monkeypatch):
    """delta-h1 and verify of different checkpoints, or stop strings the enumeration cannot model: one line,
    before any model is loaded."""
    monkeypatch.setattr(Probe, "policy", classmethod(lambda cls, params: pytest.fail("loaded the model")))
    delta = {"w": torch.zeros(2, dtype=torch.float64)}
    write_stage_inputs(tmp_path, [[1, 2]], 2, delta, 1e-2, None, fingerprint="other")
    with pytest.raises(ProbeError, match=r"delta_h1\.json is for checkpoint abc123, but .*verify describes other"):
        exact_stage.run(stage_params(tmp_path), tmp_path / "exact", dry_run=False)
    write_stage_inputs(tmp_path, [[1, 2]], 2, delta, 1e-2, None, stop="\n")
    with pytest.raises(ProbeError, match="does not model generation.stop"):
        exact_stage.run(stage_params(tmp_path), tmp_path / "exact", dry_run=True)
    assert not (tmp_path / "exact").exists()


@pytest.mark.parametrize("max_new", [1, 2, 3])
def test_sequence_count_formula_matches_enumeration(max_new):
    """--dry-run's count (no model needed) equals the number of leaves exact enumeration produces at top_p = 1."""
    model = perturb.as_float64(make_lora_model(seed=2))
    V = model.config.vocab_size
    with torch.no_grad():
        enum = enumeration.enumerate_forest(
            model, [[1, 2]], eos_id=14, max_new_tokens=max_new, temperature=1.0, top_p=1.0, max_sequences=10**6
        )
    assert enum.tokens.shape[0] == enumeration.sequences_per_prompt(V, 1, max_new)


def exact_report(**changes) -> dict:
    """A valid exact.json body (every target, one η point); `changes` replace top-level keys."""
    point = {
        "multiplier": 1.0,
        "eta": 1e-2,
        "delta_h_exact": -2e-3,
        "delta_h1_exact_linear": -1.9e-3,
        "delta_h1_linear": -1.7e-3,
    }
    target = {
        "entropy_exact": 2.5,
        "entropy_estimate": 2.4,
        "delta_h1_exact": -1.9e-3,
        "delta_h1": -1.7e-3,
        "se_E": 1e-3,
        "se_delta_h1": None,
        "z": 0.2,
        "fd_slope": -1.9e-3,
        "rel_err_fd": 1e-9,
        "eta_grid": [point],
        "entropy_exact_population": 2.45,
        "delta_h1_exact_population": -2.0e-3,
        "z_population": 0.3,
    }
    body = {
        "configured_target": "token_mean",
        "targets": {t: dict(target) for t in enumeration.TARGETS},
        "learning_rate": 1e-2,
        "generation": {"temperature": 0.9, "top_p": 1.0, "max_new_tokens": 2, "eos_id": [14]},
        "checkpoint_fingerprint": "abc123",
        "dtype": "float64",
        "fd_step": 1e-3,
        "n_distinct_prompts": 2,
        "n_e_rows": 4,
        "n_sequences": 482,
        "n_parameters": 640,
        "n_population_prompts": 4,
        "n_population_sequences": 964,
    }
    return {**body, **changes}


def test_exact_report_round_trip(tmp_path):
    body = exact_report()
    write_json(tmp_path / "exact.json", body)
    report = ExactReport.read(tmp_path)
    assert report.targets["token_mean"].eta_grid[0].delta_h_exact == -2e-3 and report.generation.eos_id == [14]
    report.write(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "exact.json").read_text()) == body
    assert list(report.targets) == list(enumeration.TARGETS)


@pytest.mark.parametrize(
    "changes,key",
    [
        ({"targets": {"token_mean": exact_report()["targets"]["token_mean"]}}, "targets"),  # a target missing
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"configured_target": "entropy"}, "configured_target"),
        ({"generation": {"temperature": 0.9, "top_p": 1.0, "max_new_tokens": 2}}, "generation.eos_id"),
        ({"n_sequences": "many"}, "n_sequences"),
        ({"timings": {"total": 1.0}}, "timings"),  # unknown key: a renamed or foreign field fails loudly
    ],
)
def test_exact_report_malformed_is_one_line(tmp_path, changes, key):
    write_json(tmp_path / "exact.json", exact_report(**changes))
    with pytest.raises(ProbeError) as err:
        ExactReport.read(tmp_path)
    msg = str(err.value)
    assert f"({key}" in msg and "exact.json" in msg and "rerun the exact stage" in msg and "\n" not in msg


def test_exact_report_missing_names_the_stage(tmp_path):
    with pytest.raises(ProbeError, match=r"exact output .*exact\.json not found"):
        ExactReport.read(tmp_path)
