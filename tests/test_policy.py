"""π_θ = top-p(softmax(logits/T)) against hand computations; teacher forcing against a brute-force forward.

Identities run in float64 with tight tolerances (tests/tolerances.py): the hand formulas are exact, and
a padded batch scores each row exactly as its own unpadded forward."""

from __future__ import annotations

import math

import pytest
import torch

from entropy_probe.policy import (
    entropy_from_logprobs,
    policy_logprobs,
    teacher_force,
    token_budget_slices,
    top_p_keep_mask,
)

NEG_INF = float("-inf")
pytestmark = pytest.mark.numerics  # floating-point results of the policy's kernels (see tests/tolerances.py)


def _expected_logp(probs: list[float], keep: set[int], temperature: float = 1.0) -> torch.Tensor:
    """Hand formula: q_v ∝ p_v^(1/T), restricted to `keep`, renormalised; log, −inf outside (float64)."""
    tempered = [p ** (1 / temperature) for p in probs]
    total = sum(tempered[v] for v in keep)
    return torch.tensor(
        [math.log(tempered[v] / total) if v in keep else NEG_INF for v in range(len(probs))], dtype=torch.float64
    )


@pytest.mark.parametrize(
    "probs, top_p, keep",
    [
        ([0.5, 0.2, 0.2, 0.1], 0.6, {0, 1}),  # 0.5 < 0.6 → add one 0.2; the tie goes to the lower id
        ([0.1, 0.2, 0.2, 0.5], 0.6, {3, 1}),  # same distribution, reversed ids: still the lower tied id
        ([0.5, 0.2, 0.2, 0.1], 0.85, {0, 1, 2}),  # 0.9 ≥ 0.85 after three tokens
        ([0.5, 0.2, 0.2, 0.1], 0.95, {0, 1, 2, 3}),  # needs all of them
        ([0.5, 0.2, 0.2, 0.1], 0.01, {0}),  # the top token is always kept
        ([0.25, 0.25, 0.25, 0.25], 0.3, {0, 1}),  # all tied: lowest ids first
    ],
)
def test_top_p_against_hand_computation(probs, top_p, keep):
    logits = torch.tensor(probs, dtype=torch.float64).log() + 3.0  # a shift must not matter
    mask = top_p_keep_mask(logits, top_p)
    assert set(mask.nonzero().flatten().tolist()) == keep
    logp = policy_logprobs(logits, 1.0, top_p)
    expected = _expected_logp(probs, keep)
    assert torch.equal(torch.isinf(logp), torch.isinf(expected))
    assert torch.allclose(logp[~torch.isinf(logp)], expected[~torch.isinf(expected)], rtol=0, atol=1e-12)
    assert math.isclose(float(logp.exp().sum()), 1.0, abs_tol=1e-12)  # renormalised mass


def test_top_p_applies_to_the_tempered_distribution():
    probs = [0.5, 0.2, 0.2, 0.1]
    # T = 2: q ∝ sqrt(p) = [.369, .233, .233, .165]; mass before the 3rd token .602 ≥ 0.6 → keep {0, 1}
    logp = policy_logprobs(torch.tensor(probs, dtype=torch.float64).log(), 2.0, 0.6)
    assert torch.allclose(logp[:2], _expected_logp(probs, {0, 1}, 2.0)[:2], rtol=0, atol=1e-12)
    assert torch.isinf(logp[2:]).all()
    # top_p = 0.7: at T = 2 the mass before the 3rd token is .602 < .7 → three kept;
    # at T = 0.5 (q ∝ p² = [.735, .118, .118, .029]) the first token alone reaches .7 → one kept
    assert top_p_keep_mask(torch.tensor(probs).log() / 2.0, 0.7).sum() == 3
    assert top_p_keep_mask(torch.tensor(probs).log() / 0.5, 0.7).sum() == 1
    # batched rows are independent
    batch = torch.stack([torch.tensor(probs).log(), torch.tensor(probs[::-1]).log()])
    assert top_p_keep_mask(batch, 0.6).tolist() == [[True, True, False, False], [False, True, False, True]]


def test_temperature_without_top_p_is_tempered_softmax():
    logits = torch.tensor([1.0, -0.5, 2.0, 0.25], dtype=torch.float64)
    for T in (0.5, 1.0, 1.7):
        expected = torch.tensor([math.exp(x / T) for x in logits.tolist()], dtype=torch.float64)
        expected = (expected / expected.sum()).log()
        assert torch.allclose(policy_logprobs(logits, T, 1.0), expected, rtol=0, atol=1e-12)
    half = policy_logprobs(logits.to(torch.bfloat16), 0.7, 0.9)
    assert half.dtype == torch.float32  # low-precision logits are scored in float32


def test_entropy_hand_and_outside_nucleus_is_zero():
    p = [0.5, 0.25, 0.25, 0.0]
    logp = torch.tensor([math.log(x) if x > 0 else NEG_INF for x in p], dtype=torch.float64)
    h = entropy_from_logprobs(logp)
    assert math.isclose(float(h), -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), rel_tol=1e-12)
    assert torch.isfinite(h)


def _brute_force_logps(model, rows: list[list[int]], n_prompt: list[int], temperature, top_p):
    """Score each row alone (no padding at all): log π of every response token, and H at each position."""
    out_lp, out_h = [], []
    with torch.no_grad():
        for ids, p in zip(rows, n_prompt):
            logits = model(input_ids=torch.tensor([ids])).logits[0]  # natural positions 0..len-1
            logp = policy_logprobs(logits[p - 1 : len(ids) - 1], temperature, top_p)
            out_lp.append(logp.gather(-1, torch.tensor(ids[p:])[:, None]).squeeze(-1))
            out_h.append(entropy_from_logprobs(logp))
    return out_lp, out_h


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_teacher_force_matches_unpadded_forward(temperature, top_p):
    """An exact identity, so in float64: left and right padding change no log-prob and no entropy."""
    from conftest import make_lora_model

    from entropy_probe.perturb import as_float64

    lora_model = as_float64(make_lora_model())
    torch.manual_seed(0)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9]]  # different prompt lengths → left padding
    responses = [[3, 4, 14], [5], [6, 7, 8, 9]]  # different response lengths → right padding
    P, R, pad = 5, 4, 15
    ids = torch.full((3, P + R), pad)
    mask = torch.zeros((3, P + R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, P - len(p) : P] = torch.tensor(p)
        ids[i, P : P + len(r)] = torch.tensor(r)
        mask[i, P - len(p) : P + len(r)] = 1
    resp_mask = mask[:, P:].bool()
    stats = teacher_force(lora_model, ids, mask, P, resp_mask, temperature, top_p)
    lps, hs = _brute_force_logps(
        lora_model, [p + r for p, r in zip(prompts, responses)], [len(p) for p in prompts], temperature, top_p
    )
    for i, r in enumerate(responses):
        n = len(r)
        finite = torch.isfinite(lps[i])  # a hand-picked token may lie outside the nucleus: −inf in both
        assert torch.equal(torch.isfinite(stats.logprobs[i, :n]), finite)
        torch.testing.assert_close(stats.logprobs[i, :n][finite], lps[i][finite], rtol=0, atol=1e-12)
        torch.testing.assert_close(stats.entropies[i, :n], hs[i], rtol=0, atol=1e-12)
    for x in (stats.logprobs, stats.entropies, stats.top1_prob, stats.margin):
        assert (x[~resp_mask] == 0).all()
    assert ((stats.margin >= 0) & (stats.margin <= stats.top1_prob)).all()


def test_teacher_force_gradients(lora_model):
    ids = torch.tensor([[1, 2, 3, 4, 5, 14]])
    mask = torch.ones_like(ids)
    resp = torch.ones((1, 3), dtype=torch.bool)
    off = teacher_force(lora_model, ids, mask, 3, resp, 0.9, 1.0)
    assert not off.logprobs.requires_grad and not off.entropies.requires_grad
    on = teacher_force(lora_model, ids, mask, 3, resp, 0.9, 1.0, with_grad=True)
    assert on.logprobs.requires_grad and on.entropies.requires_grad
    assert not on.top1_prob.requires_grad and not on.margin.requires_grad
    (on.logprobs.sum() + on.entropies.sum()).backward()
    lora = [p for n, p in lora_model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert torch.allclose(on.logprobs.detach(), off.logprobs) and torch.allclose(on.entropies.detach(), off.entropies)


@pytest.mark.parametrize("n_rows, row_len, budget", [(10, 7, 30), (10, 7, 7), (10, 7, 3), (1, 5, 100), (9, 4, 36)])
def test_token_budget_slices(n_rows, row_len, budget):
    slices = token_budget_slices(n_rows, row_len, budget)
    covered = [i for s in slices for i in range(s.start, s.stop)]
    assert covered == list(range(n_rows))  # every row exactly once, in order
    for s in slices:
        rows = s.stop - s.start
        assert rows >= 1 and (rows * row_len <= budget or rows == 1)
    assert len(slices) == math.ceil(n_rows / max(1, budget // row_len))  # as few microbatches as the budget allows
