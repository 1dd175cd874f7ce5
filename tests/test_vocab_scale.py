"""Vocabulary-scale teacher forcing: the LM head, top-p, log-softmax and entropy run on chunks of columns,
each activation-checkpointed, and give what the whole [N, R, V] block gives — values, gradients (through
LoRA on the decoder and on the LM head), double-backward tangents and per-row hook dots — with top_p < 1,
T ≠ 1, left and right padding. Activation checkpointing of the decoder changes no gradient either.

Identities run on float64 copies (`perturb.as_float64`) with FP64_REL; the float32 product path is
compared as whole vectors with FP32_REL (tests/tolerances.py).
"""

from __future__ import annotations

import logging

import pytest
import torch
from tolerances import FP32_REL, FP64_REL, assert_close_scaled, assert_vectors_close

from entropy_probe.checkpoint import enable_checkpointing
from entropy_probe.estimators import entropy_coefficients
from entropy_probe.params import ComputeParams
from entropy_probe.passes import entropy_pass, entropy_rows, policy_gradient, u_row_terms
from entropy_probe.perturb import as_float64
from entropy_probe.policy import (
    DEFAULT_LOGITS_CHUNK_MB,
    chunk_tokens,
    split_lm_head,
    teacher_force,
    teacher_force_unchunked,
)
from entropy_probe.scoring import Batch
from entropy_probe.tangents import grad_and_tangents
from entropy_probe.update import FlatLayout, group_advantages, pg_coefficients

pytestmark = pytest.mark.numerics

V, P, R = 64, 6, 9  # R = 9 columns, the longest response 7: two trailing columns are padding in every row
PAD = 15
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [9], [3, 3], [7, 1, 2, 5]]
RESPONSES = [[3, 40, 14], [5], [6, 7, 8, 9, 50, 60, 2], [33, 2, 1, 8], [11, 12, 13, 14, 15, 16]]


def lora_model(lm_head: bool = False, float64: bool = True, seed: int = 0):
    """Tiny Qwen2 (vocab 64) + LoRA on q, v (and the LM head), peaked so top-p cuts a real nucleus."""
    from peft import LoraConfig, get_peft_model

    from entropy_probe.tiny import build_model

    base = build_model(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, seed=seed)
    with torch.no_grad():
        base.lm_head.weight.mul_(8.0)
    targets = ["q_proj", "v_proj"] + (["lm_head"] if lm_head else [])
    torch.manual_seed(seed + 1)
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    return as_float64(model) if float64 else model


def batch_tensors() -> dict:
    """Left-padded prompts, right-padded responses (lengths 1 … 7 in R = 9 columns), in the artifact layout."""
    n = len(PROMPTS)
    ids, attn = torch.full((n, P + R), PAD), torch.zeros((n, P + R), dtype=torch.long)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        ids[i, P - len(p) : P], ids[i, P : P + len(r)] = torch.tensor(p), torch.tensor(r)
        attn[i, P - len(p) : P + len(r)] = 1
    lens = torch.tensor([len(r) for r in RESPONSES])
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    z = torch.zeros(n, R)
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "prompt_lens": torch.tensor([len(p) for p in PROMPTS]),
        "response_lens": lens,
        "truncated": torch.zeros(n, dtype=torch.bool),
        "prompt_index": torch.arange(n),
        "logprobs": z,
        "entropies": z,
        "top1_prob": z,
        "margin": z,
        "rewards": rewards,
        "advantages": group_advantages(rewards.view(1, n), True, 1e-4).view(-1),
        "group_index": torch.zeros(n, dtype=torch.long),
    }


def mb_for_columns(columns: int, dtype: torch.dtype) -> float:
    """The logits_chunk_mb that makes chunks of `columns` columns over the test batch's rows."""
    width = max(4, torch.empty((), dtype=dtype).element_size())
    return (columns * len(PROMPTS) * V * width + 0.5) / 2**20


def trainable(model) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def score(model, chunk_mb: float | None, T: float, top_p: float, with_grad: bool):
    t = batch_tensors()
    mask = torch.arange(R)[None, :] < t["response_lens"][:, None]
    args = (model, t["input_ids"], t["attention_mask"], P, mask, T, top_p, with_grad)
    if chunk_mb is None:
        return teacher_force_unchunked(*args)
    return teacher_force(*args, logits_chunk_mb=chunk_mb)


def coefficients(mask: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    a, c = torch.randn(mask.shape, generator=gen, dtype=dtype), torch.randn(mask.shape, generator=gen, dtype=dtype)
    return a * mask, c * mask


def assert_stats_close(got, ref, close) -> None:
    assert torch.equal(got.mask, ref.mask)
    finite = torch.isfinite(ref.logprobs)  # a token outside the nucleus has log π = −inf in both
    assert not finite.all() and finite[ref.mask].any()  # the nucleus really cuts some response tokens
    assert torch.equal(torch.isfinite(got.logprobs), finite)
    close(got.logprobs[finite], ref.logprobs[finite], "logprobs")
    for name in ("entropies", "top1_prob", "margin"):
        close(getattr(got, name), getattr(ref, name), name)
    for x in (got.logprobs, got.entropies, got.top1_prob, got.margin):
        assert (x[~got.mask] == 0).all()


@pytest.mark.parametrize("lm_head", [False, True], ids=["lora-decoder", "lora-decoder+head"])
@pytest.mark.parametrize("columns", [1, 3])
def test_chunked_equals_whole_block_float64(lm_head, columns, monkeypatch):
    """Values, gradients and double-backward tangents: chunks of 1 or 3 columns = the whole block. A frozen
    head takes its per-position gradients in the forward (`_FrozenHeadScores`), a LoRA head is checkpointed."""
    import entropy_probe.policy as policy

    calls = []
    forward = policy._FrozenHeadScores.forward
    monkeypatch.setattr(
        policy._FrozenHeadScores, "forward", staticmethod(lambda ctx, *a: calls.append(1) or forward(ctx, *a))
    )
    model = lora_model(lm_head)
    params = trainable(model)
    assert any("lm_head" in n for n, p in model.named_parameters() if p.requires_grad) == lm_head
    T, top_p = 0.7, 0.8
    close = lambda a, b, what: assert_close_scaled(a, b, float(b.detach().abs().sum()), FP64_REL, what)  # noqa: E731
    ref = score(model, None, T, top_p, with_grad=True)
    got = score(model, mb_for_columns(columns, torch.float64), T, top_p, with_grad=True)
    assert_stats_close(got, ref, close)
    assert_stats_close(score(model, mb_for_columns(columns, torch.float64), T, top_p, False), ref, close)

    a, c = coefficients(ref.mask, torch.float64)
    direction = [torch.randn_like(p) for p in params]
    g_ref, tan_ref = grad_and_tangents([ref.entropies, ref.logprobs], [a, c], params, direction)
    g_got, tan_got = grad_and_tangents([got.entropies, got.logprobs], [a, c], params, direction)
    for x, y in zip(g_got + tan_got, g_ref + tan_ref):
        close(x, y, "gradient / tangent")
    assert all(float(x.abs().sum()) > 0 for x in g_ref)  # every LoRA tensor (the head's too) gets a gradient
    assert bool(calls) == (not lm_head)  # the path under test is the one taken


def test_chunked_equals_whole_block_float32():
    """The production dtype, T = 1 and top_p = 1 as well as T ≠ 1, top_p < 1: compared as whole vectors."""
    model = lora_model(lm_head=True, float64=False)
    params = trainable(model)
    for T, top_p in ((1.0, 1.0), (1.3, 0.9)):
        ref = score(model, None, T, top_p, with_grad=True)
        got = score(model, mb_for_columns(2, torch.float32), T, top_p, with_grad=True)
        finite = torch.isfinite(ref.logprobs)
        assert torch.equal(torch.isfinite(got.logprobs), finite)
        for x, y in zip(
            (got.logprobs[finite], got.entropies, got.top1_prob, got.margin),
            (ref.logprobs[finite], ref.entropies, ref.top1_prob, ref.margin),
        ):
            assert_vectors_close(x, y, FP32_REL)
        a, c = coefficients(ref.mask, torch.float32)
        g_ref, _ = grad_and_tangents([ref.entropies, ref.logprobs], [a, c], params, None)
        g_got, _ = grad_and_tangents([got.entropies, got.logprobs], [a, c], params, None)
        assert_vectors_close(torch.cat([g.flatten() for g in g_got]), torch.cat([g.flatten() for g in g_ref]))


def test_surrogate_through_a_frozen_head_float32():
    """The production dtype: the surrogate a·H + c·ℓ of one-column chunks through a frozen head (one product per
    chunk) has the values and LoRA gradient of Σ a H + c ℓ over the whole block, compared as whole vectors."""
    model = lora_model(lm_head=False, float64=False)
    params = trainable(model)
    t = batch_tensors()
    mask = torch.arange(R)[None, :] < t["response_lens"][:, None]
    a, c = coefficients(mask, torch.float32)
    args = (model, t["input_ids"], t["attention_mask"], P, mask, 1.3, 0.9, True)
    ref = teacher_force_unchunked(*args)
    got = teacher_force(*args, logits_chunk_mb=mb_for_columns(1, torch.float32), coefs=(a, c), logprob_grad=False)
    assert got.entropies is not None and not got.logprobs.requires_grad  # ℓ gets no product of its own
    finite = torch.isfinite(ref.logprobs)
    want = torch.where(finite, a * ref.entropies + c * ref.logprobs, 0.0)
    assert_vectors_close(torch.where(finite, got.surrogate, 0.0).detach(), want.detach(), FP32_REL)
    g_ref, _ = grad_and_tangents([ref.entropies, ref.logprobs], [a, c], params, None)
    g_got = torch.autograd.grad(got.surrogate.sum(), params)
    assert_vectors_close(torch.cat([g.flatten() for g in g_got]), torch.cat([g.flatten() for g in g_ref]))


def _passes(model, chunk_mb: float) -> dict[str, torch.Tensor]:
    """probe's three passes (U gradient, E pass with tangents, U row dots by hooks) on the test batch."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    layout = FlatLayout.from_named(named)
    params = list(named.values())
    B = Batch.from_tensors(batch_tensors(), 0.7, 0.8, torch.device("cpu"), logits_chunk_mb=chunk_mb)
    coef = pg_coefficients(B.tensors["advantages"].double(), B.mask, "token-mean", None)
    gen = torch.Generator().manual_seed(3)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    entropies = 0.5 + torch.rand(B.mask.shape, generator=gen, dtype=torch.float64)
    coefs = entropy_coefficients(entropies, B.mask, target="sequence", baseline="none")
    token_mean = entropy_coefficients(entropies, B.mask, target="token_mean", baseline="mean")
    max_tokens = 2 * (P + R)  # three microbatches of ≤ 2 rows
    g = policy_gradient(model, params, layout, B, coef, max_tokens)
    xbar, dH, dlogp = entropy_pass(model, params, layout, B, coefs, direction, max_tokens)
    rows = u_row_terms(model, params, layout.names, B, coef, direction, max_tokens)
    # the surrogate a·H + c·ℓ's backward (one head product per chunk when the head is frozen): X̄ alone, and X̄
    # with the row hooks and token_mean's β backward through the log-probs
    xbar_only, _, _ = entropy_pass(model, params, layout, B, coefs, None, max_tokens)
    xbar_tm, ws_tm, beta_tm = entropy_rows(model, params, layout.names, B, token_mean, direction, max_tokens)
    _, dH_tm, dlogp_tm = entropy_pass(model, params, layout, B, token_mean, direction, max_tokens)
    psi_rows, psi_tangents = token_mean.influence_from_rows(ws_tm, beta_tm), token_mean.influence(dH_tm, dlogp_tm)
    assert_close_scaled(xbar_only, xbar, float(xbar.abs().sum()), FP64_REL, "X̄ from the surrogate")
    assert_close_scaled(psi_rows, psi_tangents, float(psi_tangents.abs().sum()), FP64_REL, "token_mean ψ")
    return {"g": g, "xbar": xbar, "dH": dH, "dlogp": dlogp, "u_rows": rows, "xbar_tm": xbar_tm, "psi_tm": psi_rows}


def _assert_passes_equal(got: dict, ref: dict) -> None:
    for k in ref:
        assert float(ref[k].abs().sum()) > 0, k
        assert_close_scaled(got[k], ref[k], float(ref[k].abs().sum()), FP64_REL, k)


@pytest.mark.parametrize("lm_head", [False, True], ids=["frozen-head", "lora-head"])
def test_probe_passes_with_chunked_head_equal_one_chunk(lm_head):
    """delta-h1's passes — row dots by hooks (on a LoRA LM head too), the E surrogate's backward with and
    without token_mean's β pass — are the same whether the head runs in one-column chunks (a frozen head:
    `_FrozenHeadScores`; a LoRA head: checkpointed) or in one piece, and the surrogate's X̄ and ψ equal
    those from per-token tangents (`_passes`)."""
    model = lora_model(lm_head=lm_head)
    _assert_passes_equal(_passes(model, mb_for_columns(1, torch.float64)), _passes(model, 1e6))


def test_frozen_head_forms_one_product_per_differentiated_output(monkeypatch):
    """Each vector a frozen chunked head takes in the forward costs a [c, V]×[V, d] product: the U passes and
    the X̄ pass (the surrogate a·H + c·ℓ) take one, as a training step's backward does; token_mean's β pass
    (surrogate and ℓ) and the double backward (ℓ and H) take two."""
    import entropy_probe.policy as policy

    products: list[int] = []
    forward = policy._FrozenHeadScores.forward

    def counted(ctx, *args):
        out = forward(ctx, *args)
        products.append(len(ctx.differentiable))
        return out

    monkeypatch.setattr(policy._FrozenHeadScores, "forward", staticmethod(counted))
    model = lora_model()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    layout, params = FlatLayout.from_named(named), list(named.values())
    B = Batch.from_tensors(batch_tensors(), 0.7, 0.8, torch.device("cpu"), mb_for_columns(1, torch.float64))
    coef = pg_coefficients(B.tensors["advantages"].double(), B.mask, "token-mean", None)
    entropies = 0.5 + torch.rand(B.mask.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    direction = [torch.ones_like(p) for p in params]

    def per_chunk(run) -> set[int]:
        products.clear()
        run()
        return set(products)

    coefs = {t: entropy_coefficients(entropies, B.mask, target=t, baseline="none") for t in ("sequence", "token_mean")}
    assert per_chunk(lambda: policy_gradient(model, params, layout, B, coef, 10**6)) == {1}
    assert per_chunk(lambda: entropy_pass(model, params, layout, B, coefs["sequence"], None, 10**6)) == {1}
    assert per_chunk(lambda: entropy_rows(model, params, layout.names, B, coefs["sequence"], direction, 10**6)) == {1}
    assert per_chunk(lambda: entropy_rows(model, params, layout.names, B, coefs["token_mean"], direction, 10**6)) == {2}
    assert per_chunk(lambda: entropy_pass(model, params, layout, B, coefs["sequence"], direction, 10**6)) == {2}


def test_activation_checkpointing_changes_no_gradient():
    """checkpoint.use_checkpointing (non-reentrant, recomputed in the backward) gives the same U gradient,
    E pass (X̄ and double-backward tangents) and U row dots (forward hooks fire again in the recompute:
    nothing is counted twice) — with the head chunked too."""
    plain, ckpt = lora_model(lm_head=True), lora_model(lm_head=True)
    enable_checkpointing(ckpt)
    calls = {"plain": 0, "ckpt": 0}
    for name, m in (("plain", plain), ("ckpt", ckpt)):
        lora_a = m.get_base_model().model.layers[0].self_attn.q_proj.lora_A.default  # as RowDirectional hooks it
        lora_a.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    chunk_mb = mb_for_columns(1, torch.float64)
    ref, got = _passes(plain, chunk_mb), _passes(ckpt, chunk_mb)
    assert calls["ckpt"] > calls["plain"]  # recomputed in the backward: the forward hooks fired again
    _assert_passes_equal(got, ref)


def test_chunk_size_from_the_memory_budget():
    head = torch.nn.Linear(896, 151936, bias=False, device="meta")
    assert chunk_tokens(head, 256) == 441  # 256 MiB of float32 logits at Qwen2.5's vocabulary
    assert chunk_tokens(head.to(torch.float64), 256) == 220
    assert chunk_tokens(head.to(torch.bfloat16), 256) == 441  # scored in float32
    assert chunk_tokens(head, 1e-6) == 1
    with pytest.raises(ValueError):
        chunk_tokens(head, 0.0)
    assert DEFAULT_LOGITS_CHUNK_MB == ComputeParams().logits_chunk_mb == 256
    tensors = batch_tensors()
    assert Batch.from_tensors(tensors, 1.0, 1.0, torch.device("cpu")).logits_chunk_mb == 256


def test_models_with_more_than_a_linear_head_are_scored_unchunked(caplog):
    """A head followed by soft-capping (Gemma 2) cannot be split: the whole-block path, with a warning."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    qwen = lora_model(float64=False)
    decoder, head = split_lm_head(qwen)
    assert decoder is qwen.get_base_model().model and head is qwen.get_base_model().lm_head
    config = Gemma2Config(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        final_logit_softcapping=30.0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(config).eval()
    assert split_lm_head(gemma) is None
    with caplog.at_level(logging.WARNING, logger="entropy_probe.policy"):
        got = score(gemma, 1e-6, 0.7, 0.8, with_grad=False)
    assert "unchunked" in caplog.text
    ref = score(gemma, None, 0.7, 0.8, with_grad=False)
    assert torch.equal(got.entropies, ref.entropies) and torch.equal(got.logprobs, ref.logprobs)
