"""Exact identities of the gradient and tangent machinery, in float64 with a tight tolerance.

delta-h1 rests on three identities of `entropy_probe.tangents`; here they are checked on a float64 copy
(`perturb.as_float64`) of the tiny LoRA transformer of test_delta_h1, so they hold to ~1e-12 of the
size of the summed terms on any CPU (the float32 product path is checked, with magnitude-scaled
tolerances, in test_delta_h1):
  - per U row, the RowDirectional hooks (one ordinary backward) = Σ_t c_t (∇logp_t·v) by double
    backward = ∇(Σ_t c_t logp_t of that row scored alone, without padding)·v;
  - ∇(Σ_ik w_i (a_ik H_ik + c_ik logp_ik))·v = Σ_i w_i s_i: X̄·v is the mean of the influence values;
  - rows never interact, so gradients summed over token-budget microbatches, and tangents computed
    microbatch by microbatch, equal those of the whole batch.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from test_delta_h1 import sample_batch, trainable
from tolerances import FP64_REL, assert_close_scaled, dot_scale, sum_scale

from entropy_probe.estimators import BASELINES, TARGETS, entropy_coefficients
from entropy_probe.perturb import as_float64
from entropy_probe.policy import policy_logprobs
from entropy_probe.tangents import RowDirectional, grad_and_tangents
from entropy_probe.update import group_advantages, pg_coefficients

pytestmark = pytest.mark.numerics

PROMPTS = ["1+2=", "12+34=", "7+8=", "100+1="]  # two lengths: the batches have left padding


def lora_model(lora_bias: bool = False, peaked: bool = True):
    """Tiny Qwen2 + LoRA, optionally with LoRA biases; `peaked`: test_delta_h1's policy far from uniform
    (where ∇H_k does not vanish), else one that often ends early (responses of several lengths)."""
    from peft import LoraConfig, get_peft_model

    from entropy_probe.tiny import build_model

    torch.manual_seed(0)
    targets = ["q_proj", "v_proj", "down_proj"] if lora_bias else ["q_proj", "v_proj"]
    config = LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.0, target_modules=targets, init_lora_weights=False, lora_bias=lora_bias
    )
    model = get_peft_model(build_model(hidden_size=32, seed=3 if peaked else 5), config).eval()
    if peaked:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(40.0)
    return model


def sample_u(model, tokenizer, n_groups: int, G: int, seed: int):
    """A U batch of groups of G responses, rewarded by the parity of their token sum (varies within groups)."""
    U = sample_batch(model, tokenizer, [PROMPTS[b % len(PROMPTS)] for b in range(n_groups) for _ in range(G)], seed)
    rewards = ((U.input_ids[:, U.n_prompt_cols :] * U.mask).sum(-1) % 2).double()
    U.tensors["advantages"] = group_advantages(rewards.view(n_groups, G), True, 1e-4).view(-1)
    return U


def random_direction(params, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]


def naive_row_directional(model, U, coef, params, direction) -> torch.Tensor:
    """Per row i: ∇(Σ_t coef_it logp_it)·v with the row scored alone (no padding, natural positions)."""
    out = []
    for i in range(len(U)):
        prompt = U.input_ids[i, : U.n_prompt_cols][U.attention_mask[i, : U.n_prompt_cols].bool()]
        response = U.input_ids[i, U.n_prompt_cols :][U.mask[i]]
        logits = model(input_ids=torch.cat([prompt, response])[None]).logits[0, len(prompt) - 1 : -1]
        logp = policy_logprobs(logits, U.temperature, U.top_p).gather(-1, response[:, None])[:, 0]
        grads = torch.autograd.grad((coef[i, : len(response)] * logp).sum(), params, allow_unused=True)
        out.append(sum((g * v).sum() for g, v in zip(grads, direction) if g is not None))
    return torch.stack(out)


@pytest.mark.parametrize("lora_bias", [False, True])
def test_row_hooks_equal_double_backward_equal_naive_loss(tokenizer, lora_bias):
    model = lora_model(lora_bias, peaked=False)
    U = sample_u(model, tokenizer, n_groups=4, G=4, seed=31)  # left-padded prompts, right-padded responses
    m64 = as_float64(copy.deepcopy(model))
    named = trainable(m64)
    names, params = list(named), list(named.values())
    assert RowDirectional.supports(m64, names) and any(n.endswith(".bias") for n in names) == lora_bias
    assert (U.attention_mask[:, 0] == 0).any() and not U.mask.all()
    coef = pg_coefficients(U.tensors["advantages"], U.mask, "token-mean").double()
    direction = random_direction(params, seed=1)

    with RowDirectional(m64, names, direction) as hooks:
        stats = U.score(m64, slice(0, len(U)), entropies=False)
        torch.autograd.grad([stats.logprobs], params, grad_outputs=[coef], allow_unused=True)
        by_hooks = hooks.take()
    stats = U.score(m64, slice(0, len(U)), entropies=False)
    _, (dlogp,) = grad_and_tangents([stats.logprobs], [U.mask.double()], params, direction)
    by_double_backward = (coef * dlogp).sum(-1)
    by_naive_loss = naive_row_directional(m64, U, coef, params, direction)

    assert by_hooks.dtype == torch.float64 and dlogp.dtype == torch.float64
    scale = sum_scale(coef * dlogp)
    assert_close_scaled(by_hooks, by_double_backward, scale, FP64_REL, "hooks vs double backward")
    assert_close_scaled(by_naive_loss, by_double_backward, scale, FP64_REL, "naive loss vs double backward")
    assert by_double_backward.abs().min() > 1e-6 * scale  # every row carries signal


def full_model(tied: bool):
    """A tiny Qwen2 trained in full: every tensor trainable (embedding, norms, biases, head — tied or not), with
    the pad token's embedding row moved off zero (nn.Embedding's padding_idx row)."""
    from entropy_probe.tiny import build_model

    model = build_model(hidden_size=32, seed=5, tie_word_embeddings=tied).requires_grad_(True)
    with torch.no_grad():
        pad = model.model.embed_tokens.padding_idx
        model.model.embed_tokens.weight[pad] = torch.randn(32, generator=torch.Generator().manual_seed(0))
    return model


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_row_hooks_cover_a_full_model(tokenizer, tied):
    """Embedding (a head tied to it: both uses), RMSNorm weights, Linear weights and biases: the hooks' per-row
    X_i·v equals the double backward's, for the trainer's gradient (padding row 0) and the true one."""
    from entropy_probe.policy import true_embedding_gradients

    m64 = as_float64(full_model(tied))
    U = sample_u(m64, tokenizer, n_groups=4, G=4, seed=31)
    U.input_ids[0, U.n_prompt_cols] = m64.model.embed_tokens.padding_idx  # the pad token as a real response token
    named = trainable(m64)
    names, params = list(named), list(named.values())
    assert RowDirectional.supports(m64, names) and ("lm_head.weight" in names) != tied
    kinds = {type(m).__name__ for m, _, _ in RowDirectional(m64, names, params).plan}
    assert kinds == {"Embedding", "Linear", "Qwen2RMSNorm"}
    coef = pg_coefficients(U.tensors["advantages"], U.mask, "token-mean").double()
    direction = random_direction(params, seed=1)
    for context in (contextlib.nullcontext, lambda: true_embedding_gradients(m64)):
        with context(), RowDirectional(m64, names, direction) as hooks:
            stats = U.score(m64, slice(0, len(U)), entropies=False)
            torch.autograd.grad([stats.logprobs], params, grad_outputs=[coef], allow_unused=True)
            by_hooks = hooks.take()
            stats = U.score(m64, slice(0, len(U)), entropies=False)
            _, (dlogp,) = grad_and_tangents([stats.logprobs], [U.mask.double()], params, direction)
        scale = sum_scale(coef * dlogp)
        assert_close_scaled(by_hooks, (coef * dlogp).sum(-1), scale, FP64_REL, "hooks vs double backward")


def test_the_hooks_refuse_a_module_they_do_not_know(tokenizer):
    """A trainable tensor used by a module without a rule (here a LayerNorm) makes `supports` false: the passes
    then take the double backward, never a silently missing term."""
    model = full_model(tied=False)
    model.model.norm = torch.nn.LayerNorm(32)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not RowDirectional.supports(model, names)
    assert RowDirectional.supports(model, [n for n in names if not n.startswith("model.norm.")])


def entropy_pass_float64(model, E, coefs, direction, max_tokens: int):
    """(X̄ per parameter, dH, dlogp) as delta-h1's E pass forms them, microbatch by microbatch, in float64."""
    params = list(trainable(model).values())
    w = coefs.weights[:, None]
    a, c = coefs.a.double() * w, coefs.c.double() * w
    xbar = [torch.zeros_like(p) for p in params]
    dH, dlogp = torch.zeros_like(a), torch.zeros_like(a)
    for rows in E.slices(max_tokens):
        stats = E.score(model, rows)
        grads, (dH[rows], dlogp[rows]) = grad_and_tangents(
            [stats.entropies, stats.logprobs], [a[rows], c[rows]], params, direction
        )
        xbar = [x + g for x, g in zip(xbar, grads)]
    return xbar, dH, dlogp


@pytest.fixture(scope="module")
def e_batch(tokenizer):
    model = lora_model()
    E = sample_batch(model, tokenizer, PROMPTS * 8, seed=5)
    return as_float64(copy.deepcopy(model)), E


def test_xbar_dot_v_equals_the_mean_influence(e_batch):
    """X̄·v by reverse mode = Σ w s = mean ψ from the per-token tangents, every target and baseline."""
    m64, E = e_batch
    params = list(trainable(m64).values())
    features = torch.stack([E.tensors["top1_prob"], E.tensors["margin"]], -1).double()
    for t in TARGETS:
        for b in BASELINES:
            coefs = entropy_coefficients(
                E.tensors["entropies"].double(), E.mask, target=t, baseline=b, features=features, folds=4
            )
            direction = random_direction(params, seed=7)
            xbar, dH, dlogp = entropy_pass_float64(m64, E, coefs, direction, 10_000)
            dot = sum(float((x * v).sum()) for x, v in zip(xbar, direction))
            scale = sum(dot_scale(x, v) for x, v in zip(xbar, direction))
            assert_close_scaled(coefs.estimate(dH, dlogp)[0], dot, scale, FP64_REL, f"{t}/{b}: mean ψ vs X̄·v")


def test_microbatches_change_nothing(e_batch):
    """Token budgets of 10 000 (one microbatch), 30 (a few rows each) and 7 (one row each): the same X̄ and tangents."""
    m64, E = e_batch
    params = list(trainable(m64).values())
    coefs = entropy_coefficients(E.tensors["entropies"].double(), E.mask, target="token_mean", baseline="mean")
    direction = random_direction(params, seed=8)
    assert len(E.slices(10_000)) == 1 and 1 < len(E.slices(30)) < len(E) and len(E.slices(7)) == len(E)
    whole = entropy_pass_float64(m64, E, coefs, direction, 10_000)
    for budget in (30, 7):
        split = entropy_pass_float64(m64, E, coefs, direction, budget)
        for x, y in zip(split[0], whole[0]):
            assert_close_scaled(x, y, float(y.norm()), FP64_REL, f"X̄ at budget {budget}")
        for x, y in zip(split[1:], whole[1:]):
            assert_close_scaled(x, y, float(y.norm()), FP64_REL, f"tangents at budget {budget}")


def mixed_model():
    """A tiny Qwen2 whose head is tied to its embedding (the pad row off zero), with LoRA (biases too) on q/v,
    training besides the adapters the embedding (so the head), every RMSNorm and k_proj's weight and bias:
    every kind the row hooks know, and both Linear branches (lora_A keeps x·Vᵀ, the others keep x)."""
    from peft import LoraConfig, get_peft_model

    from entropy_probe.tiny import build_model

    torch.manual_seed(0)
    base = build_model(hidden_size=32, seed=5, tie_word_embeddings=True)
    with torch.no_grad():
        pad = base.model.embed_tokens.padding_idx
        base.model.embed_tokens.weight[pad] = torch.randn(32, generator=torch.Generator().manual_seed(0))
    config = LoraConfig(
        r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        lora_bias=True,
    )  # fmt: skip
    model = get_peft_model(base, config).eval()
    for name, p in model.named_parameters():
        if "embed_tokens" in name or "norm" in name or ".k_proj." in name:
            p.requires_grad_(True)
    return model


@pytest.fixture(scope="module")
def mixed(tokenizer):
    """(the float64 mixed model, a batch of it with the pad token as one real response token)."""
    model = mixed_model()
    batch = sample_u(model, tokenizer, n_groups=4, G=4, seed=31)
    batch.input_ids[0, batch.n_prompt_cols] = model.get_input_embeddings().padding_idx
    return as_float64(copy.deepcopy(model)), batch


def stacked_directions(params, K: int, seed: int):
    """K random directions (lists shaped like params) and the same stacked, [K, *param.shape] per parameter."""
    singles = [random_direction(params, seed + k) for k in range(K)]
    return singles, [torch.stack(vs) for vs in zip(*singles)]


def test_stacked_row_hooks_equal_one_direction_at_a_time(mixed):
    """K = 3 directions from one backward: column k equals the single-direction hooks along v_k (and the double
    backward), for the trainer's gradient (padding row 0) and the true one."""
    from entropy_probe.policy import true_embedding_gradients

    m64, U = mixed
    named = trainable(m64)
    names, params = list(named), list(named.values())
    plan = RowDirectional(m64, names, params).plan
    assert RowDirectional.supports(m64, names) and "lm_head.weight" not in names
    assert m64.get_output_embeddings().weight is m64.get_input_embeddings().weight
    assert {type(m).__name__ for m, _, _ in plan} == {"Embedding", "Linear", "Qwen2RMSNorm"}
    linear_shapes = [m.weight.shape for m, kind, parts in plan if kind == "linear" and "weight" in parts]
    assert {3 * o <= i for o, i in linear_shapes} == {True, False}  # both branches for K = 3
    coef = pg_coefficients(U.tensors["advantages"], U.mask, "token-mean").double()
    singles, stacked = stacked_directions(params, 3, seed=11)

    def row_dots(direction, is_stacked: bool) -> torch.Tensor:
        with RowDirectional(m64, names, direction, stacked=is_stacked) as hooks:
            stats = U.score(m64, slice(0, len(U)), entropies=False)
            torch.autograd.grad([stats.logprobs], params, grad_outputs=[coef], allow_unused=True)
            return hooks.take()

    pad_rows = []
    for context in (contextlib.nullcontext, lambda: true_embedding_gradients(m64)):
        with context():
            together = row_dots(stacked, True)
            assert together.shape == (len(U), 3) and together.dtype == torch.float64
            for k, v in enumerate(singles):
                stats = U.score(m64, slice(0, len(U)), entropies=False)
                _, (dlogp,) = grad_and_tangents([stats.logprobs], [U.mask.double()], params, v)
                scale = sum_scale(coef * dlogp)
                assert_close_scaled(together[:, k], row_dots(v, False), scale, FP64_REL, f"stacked vs single, v_{k}")
                assert_close_scaled(together[:, k], (coef * dlogp).sum(-1), scale, FP64_REL, "vs double backward")
        pad_rows.append(together[0])
    assert (pad_rows[0] - pad_rows[1]).abs().min() > 1e-9  # the padding_idx mask mattered (the pad row differs)


def test_stacked_directions_must_share_one_k(mixed):
    m64, _ = mixed
    named = trainable(m64)
    names, params = list(named), list(named.values())
    _, stacked = stacked_directions(params, 2, seed=0)
    with pytest.raises(ValueError, match="one K"):
        RowDirectional(m64, names, [stacked[0][:1], *stacked[1:]], stacked=True)
    with pytest.raises(ValueError, match="one K"):
        RowDirectional(m64, names, random_direction(params, seed=0), stacked=True)


@pytest.mark.parametrize("target", TARGETS)
def test_entropy_rows_stacked_equal_one_direction_at_a_time(mixed, target):
    """entropy_rows along K = 3 stacked directions, over several microbatches: the same X̄, each row column and
    token_mean's β as three single-direction passes (and the per-token tangents of the double backward)."""
    from entropy_probe.passes import entropy_pass, entropy_rows
    from entropy_probe.update import FlatLayout

    m64, E = mixed
    named = trainable(m64)
    names, params = list(named), list(named.values())
    coefs = entropy_coefficients(E.tensors["entropies"].double(), E.mask, target=target, baseline="mean")
    singles, stacked = stacked_directions(params, 3, seed=21)
    assert 1 < len(E.slices(30)) < len(E)
    xbar, rows, beta = entropy_rows(m64, params, names, E, coefs, stacked, 30, stacked=True)
    assert rows.shape == (len(E), 3) and (beta is None) == (target != "token_mean")
    w = coefs.weights[:, None].double()
    for k, v in enumerate(singles):
        xbar_k, rows_k, beta_k = entropy_rows(m64, params, names, E, coefs, v, 30)
        assert torch.equal(xbar, xbar_k)  # the hooks never touch the gradients
        _, dH, dlogp = entropy_pass(m64, params, FlatLayout.from_named(named), E, coefs, v, 30)
        terms = (coefs.a * w * dH, coefs.c * w * dlogp)
        scale = sum_scale(*terms)
        assert_close_scaled(rows[:, k], rows_k, scale, FP64_REL, f"{target}: stacked vs single rows, v_{k}")
        assert_close_scaled(rows[:, k], sum(terms).sum(-1), scale, FP64_REL, f"{target}: rows vs tangents")
        if beta is not None:
            beta_scale = sum_scale(coefs.len_c * w * dlogp)
            assert beta.shape == (3,) and beta_k.shape == ()
            assert_close_scaled(beta[k], beta_k, beta_scale, FP64_REL, f"stacked vs single β, v_{k}")
            assert_close_scaled(beta[k], (coefs.len_c * w * dlogp).sum(), beta_scale, FP64_REL, "β vs tangents")
