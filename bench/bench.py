"""Benchmark of the probe's cost as ratios to the passes it cannot avoid (issue 6, SPEC §6).

    python bench/bench.py [--quick] [--out bench/results/bench.json] [--device cuda --dtype bf16 [--qlora]]

One run builds a random Qwen2 larger than the demo (eager attention) with a LoRA adapter, samples an E
and a U batch with the product's own `generate_responses`, and measures, with the same thread count,
one warm-up and the median of a few interleaved rounds:

    delta_h1   = t(compute_delta_h1 on E, U)                          / t(plain fwd+bwd over E and U)   ≤ 1.2
    se_extra   = [t(entropy_pass with tangents) − t(without tangents)
                  + t(logprob_tangents)]                              / t(plain fwd+bwd over E and U)   ≤ 0.5
    sample     = t(generate_responses)                                / t(plain model.generate)         ≤ 1.05
    memory     = peak(compute_delta_h1) / peak(plain fwd+bwd), above the post-load baseline, each in a
                 fresh process (CPU: VmHWM after clear_refs; CUDA: max_memory_allocated)

"plain fwd+bwd" is what a trainer's step costs on the same tokens: forward on the same padded
input_ids (logits only for the response columns), log_softmax(logits / T), gather, masked sum, and
`.backward()` into `.grad`, in the same token-budget microbatches.

It also times bench-only alternatives of the passes and checks each against the product's pass:
lean scoring (no unused vocabulary-wide statistics), per-row directional derivatives from one ordinary
backward (`RowDots`, instead of the double backward), and forward-mode AD (`torch.autograd.forward_ad`
dual numbers; eager attention, not QLoRA). `--profile` writes a torch.profiler table of one
compute_delta_h1 call; `--memory-passes` measures the peak memory of every pass and alternative.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.autograd.forward_ad as fwAD  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stages.delta_h1 import (  # noqa: E402
    Batch,
    UpdateSpec,
    compute_delta_h1,
    entropy_pass,
    logprob_tangents,
    policy_gradient,
)
from stages.estimators import entropy_coefficients  # noqa: E402
from stages.params import EstimatorParams  # noqa: E402
from stages.policy import entropy_from_logprobs, policy_logprobs  # noqa: E402
from stages.sampling import generate_responses, neutral_generation_config  # noqa: E402
from stages.tangents import grad_and_tangents  # noqa: E402
from stages.update import AdamState, FlatLayout, group_advantages, pg_coefficients, update_direction  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EOS, PAD = "<eos>", "<pad>"

# sizes: full run ≲ 3 min on 2 CPU cores, --quick ≲ 1 min
FULL = dict(hidden=256, layers=4, heads=4, kv_heads=2, vocab=2048, lora_rank=16, prompt_len=24,
            new_tokens=64, B_E=32, B_U=8, G=4, max_tokens=4096, repeats=3)  # fmt: skip
QUICK = dict(FULL, B_E=16, B_U=4, repeats=2)


# ----------------------------------------------------------------------------- model, tokenizer, batches


def build_tokenizer(vocab: int):
    """A word-level tokenizer over `vocab` tokens: w0 … w{vocab−3}, eos, pad (whitespace-separated)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(vocab - 2)] + [EOS, PAD]
    core = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD, padding_side="left")


def build_model(cfg: dict, device: str, dtype: torch.dtype, qlora: bool, seed: int = 0):
    """Random Qwen2 (eager attention) + LoRA on every linear layer with non-zero B, eval mode.

    The LM head is scaled up so the policy is peaked like a trained model's (entropy of a few nats,
    rather than log V), which keeps the sampled lengths and the top-p nucleus realistic.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["hidden"],
        intermediate_size=3 * cfg["hidden"],
        num_hidden_layers=cfg["layers"],
        num_attention_heads=cfg["heads"],
        num_key_value_heads=cfg["kv_heads"],
        max_position_embeddings=cfg["prompt_len"] + cfg["new_tokens"] + 8,
        eos_token_id=cfg["vocab"] - 2,
        pad_token_id=cfg["vocab"] - 1,
        bos_token_id=None,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        base = Qwen2ForCausalLM(config)
        with torch.no_grad():
            base.lm_head.weight.mul_(8.0)
    if qlora:
        from transformers import BitsAndBytesConfig

        with tempfile.TemporaryDirectory() as tmp:
            base.save_pretrained(tmp)
            base = AutoModelForCausalLM.from_pretrained(
                tmp,
                dtype=dtype,
                device_map={"": device},
                attn_implementation="eager",
                quantization_config=BitsAndBytesConfig(
                    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=dtype,
                ),  # fmt: skip
            )
        if device == "cpu":
            from stages.checkpoint import _disable_bnb_cpu_packing

            _disable_bnb_cpu_packing(base)
    else:
        base = base.to(device=device, dtype=dtype)
    lora = LoraConfig(
        r=cfg["lora_rank"], lora_alpha=2 * cfg["lora_rank"], lora_dropout=0.0, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = get_peft_model(base, lora)
        with torch.no_grad():  # init_lora_weights=False draws B like A; keep the adapter a perturbation
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.1)
    return model.eval()


def random_prompts(cfg: dict, n: int, seed: int) -> list[str]:
    """n prompts of random words, lengths between prompt_len/2 and prompt_len (so left padding occurs)."""
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(cfg["prompt_len"] // 2, cfg["prompt_len"] + 1, (n,), generator=gen)
    return [" ".join(f"w{int(t)}" for t in torch.randint(0, cfg["vocab"] - 2, (int(k),), generator=gen)) for k in lens]


def sample(model, tok, prompts: list[str], cfg: dict, seed: int) -> dict:
    return generate_responses(
        model, tok, prompts, temperature=cfg["temperature"], top_p=cfg["top_p"], max_new_tokens=cfg["new_tokens"],
        batch_size=len(prompts), seed=seed, progress=False,
    )  # fmt: skip


def to_batches(E_t: dict, U_t: dict, cfg: dict, device) -> tuple[Batch, Batch]:
    meta = {"generation": {"temperature": cfg["temperature"], "top_p": cfg["top_p"]}}
    E_t = dict(E_t, prompt_index=torch.arange(len(E_t["input_ids"])))
    n_groups, G = cfg["B_U"], cfg["G"]
    gen = torch.Generator().manual_seed(7)
    rewards = torch.randint(0, 2, (n_groups * G,), generator=gen).float()  # verifiable 0/1 rewards
    U_t = dict(
        U_t,
        prompt_index=torch.arange(n_groups).repeat_interleave(G),
        rewards=rewards,
        advantages=group_advantages(rewards.view(n_groups, G), True, 1e-4).view(-1),
        group_index=torch.arange(n_groups).repeat_interleave(G),
    )
    return Batch.from_artifact(E_t, meta, device), Batch.from_artifact(U_t, meta, device)


def adam_spec(model, seed: int = 0) -> tuple[FlatLayout, UpdateSpec]:
    """A synthetic AdamW state after 10 steps (momentum and second moment of plausible size)."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    layout = FlatLayout.from_named(named)
    gen = torch.Generator().manual_seed(seed)
    m = {n: 1e-3 * torch.randn(p.shape, generator=gen) for n, p in named.items()}
    v = {n: 1e-6 * torch.rand(p.shape, generator=gen) for n, p in named.items()}
    groups = [{"lr": 1e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01, "names": list(named)}]
    theta = {n: p.detach().float() for n, p in named.items()}
    state = AdamState.from_groups(layout, theta, m, v, {n: 10.0 for n in named}, groups)
    return layout, UpdateSpec("adam_step", state, 1.0, "token-mean", None)


def trainable(model, layout: FlatLayout) -> list[torch.Tensor]:
    named = dict(model.named_parameters())
    return [named[n] for n in layout.names]


# ----------------------------------------------------------------------------- the plain baselines


def plain_forward_backward(model, batches: list[Batch], max_tokens: int) -> None:
    """A trainer's step on the same tokens: Σ_ij A_i·log π(y_ij) over the response, backward into .grad."""
    for B in batches:
        adv = B.tensors.get("advantages", torch.ones(len(B), device=B.mask.device))
        for rows in B.slices(max_tokens):
            ids, am = B.input_ids[rows], B.attention_mask[rows]
            position_ids = (am.cumsum(-1) - 1).clamp(min=0)
            keep = torch.arange(B.n_prompt_cols - 1, ids.shape[1] - 1, device=ids.device)
            logits = model(input_ids=ids, attention_mask=am, position_ids=position_ids, logits_to_keep=keep,
                           use_cache=False).logits  # fmt: skip
            logp = torch.log_softmax(logits.float() / B.temperature, dim=-1)
            token_logp = logp.gather(-1, ids[:, B.n_prompt_cols :].unsqueeze(-1)).squeeze(-1)
            loss = -(token_logp * B.mask * adv[rows].unsqueeze(1)).sum() / B.mask.sum()
            loss.backward()
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def plain_generate(model, tok, prompts: list[str], cfg: dict, seed: int) -> int:
    """transformers' own sampling (same T, top-p, no top-k, KV cache) on the same prompts; returns steps."""
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    device = model.get_input_embeddings().weight.device
    config = neutral_generation_config(cfg["new_tokens"], tok.eos_token_id, tok.pad_token_id)
    config.temperature, config.top_p = cfg["temperature"], cfg["top_p"]
    torch.manual_seed(seed)
    out = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                         generation_config=config)  # fmt: skip
    return out.shape[1] - enc["input_ids"].shape[1]


# ----------------------------------------------------------------------------- forward-mode alternatives (bench only)


class _FrozenLinear(torch.autograd.Function):
    """y = x Wᵀ + b for a frozen W, with an explicit forward-mode rule dy = dx Wᵀ.

    torch's own forward-AD rule for linear/mm is dx Wᵀ + x dWᵀ and materialises dW = 0 for a weight
    without tangent, so every frozen matmul runs three times instead of two (seen in the profile).
    """

    @staticmethod
    def forward(x, weight, bias):
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.weight = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.weight, None, None

    @staticmethod
    def jvp(ctx, dx, dweight, dbias):
        return dx @ ctx.weight.T


class frozen_linears:
    """Context: every frozen nn.Linear of `model` runs through `_FrozenLinear` (not for 4-bit layers)."""

    def __init__(self, model):
        self.modules = [m for m in model.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]

    def __enter__(self):
        for m in self.modules:
            m.forward = (lambda mod: lambda x: _FrozenLinear.apply(x, mod.weight, mod.bias))(m)

    def __exit__(self, *exc):
        for m in self.modules:
            del m.forward


def _dual_logits(model, params, direction, B: Batch, rows: slice):
    """One forward with θ + ε·v as dual numbers: (logits with graph, their tangent along v)."""
    from torch.func import functional_call

    by_id = {id(p): n for n, p in model.named_parameters()}
    names = [by_id[id(p)] for p in params]
    ids, am = B.input_ids[rows], B.attention_mask[rows]
    position_ids = (am.cumsum(-1) - 1).clamp(min=0)
    keep = torch.arange(B.n_prompt_cols - 1, ids.shape[1] - 1, device=ids.device)
    with fwAD.dual_level(), frozen_linears(model):
        duals = {n: fwAD.make_dual(p, v) for n, p, v in zip(names, params, direction)}
        kwargs = dict(input_ids=ids, attention_mask=am, position_ids=position_ids, logits_to_keep=keep, use_cache=False)
        logits = functional_call(model, duals, args=(), kwargs=kwargs, strict=False).logits
        primal, dlogits = fwAD.unpack_dual(logits)
    return primal, dlogits.detach()


def _stats_and_tangents(logits, dlogits, B: Batch, rows: slice, entropy: bool):
    """(logp, H) of the primal logits with graph; (dlogp, dH) from the logit tangent in closed form.

    With z = logits / T (top-p set constant), π = softmax(z), dz = dlogits / T:
      dlogp_v = dz_v − Σ_u π_u dz_u,     dH = −Σ_v π_v (log π_v + H) dlogp_v  (sums over the nucleus)
    """
    logp = policy_logprobs(logits, B.temperature, B.top_p)
    mask = B.mask[rows]
    targets = B.input_ids[rows, B.n_prompt_cols :].unsqueeze(-1)
    token_logp = torch.where(mask, logp.gather(-1, targets).squeeze(-1), 0.0)
    H = torch.where(mask, entropy_from_logprobs(logp), 0.0) if entropy else None
    with torch.no_grad():
        lp = logp.detach()
        p = lp.exp()
        dz = dlogits.float() / B.temperature
        if B.top_p < 1.0:
            dz = torch.where(torch.isfinite(lp), dz, 0.0)
        dlp = dz - (p * dz).sum(-1, keepdim=True)
        dlogp = torch.where(mask, dlp.gather(-1, targets).squeeze(-1), 0.0)
        dH = None
        if entropy:
            plogp = torch.where(torch.isfinite(lp), p * lp, 0.0) if B.top_p < 1.0 else p * lp
            dH = torch.where(mask, -((plogp + p * H.detach().unsqueeze(-1)) * dlp).sum(-1), 0.0)
    return token_logp, H, dlogp, dH


def entropy_pass_forward_mode(model, params, layout, E: Batch, coefs, direction, max_tokens: int):
    """Same outputs as `entropy_pass`: X̄ by one backward, tangents by forward-mode AD in the same forward."""
    w = coefs.weights.unsqueeze(1).to(coefs.a.dtype)
    a, c = (coefs.a * w).float(), (coefs.c * w).float()
    xbar = torch.zeros(layout.numel, dtype=torch.float32, device=a.device)
    dH, dlogp = torch.zeros_like(a), torch.zeros_like(a)
    for rows in E.slices(max_tokens):
        logits, dlogits = _dual_logits(model, params, direction, E, rows)
        token_logp, H, dlogp[rows], dH[rows] = _stats_and_tangents(logits, dlogits, E, rows, entropy=True)
        del dlogits
        grads = torch.autograd.grad([H, token_logp], params, grad_outputs=[a[rows], c[rows]], allow_unused=True)
        xbar += torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float() for g, p in zip(grads, params)])
    return xbar, dH, dlogp


def logprob_tangents_forward_mode(model, params, U: Batch, direction, max_tokens: int) -> torch.Tensor:
    """Same output as `logprob_tangents`: one no-grad forward with dual numbers, no backward at all."""
    dlogp = torch.zeros(U.mask.shape, dtype=torch.float32, device=U.mask.device)
    with torch.no_grad():
        for rows in U.slices(max_tokens):
            logits, dlogits = _dual_logits(model, params, direction, U, rows)
            dlogp[rows] = _stats_and_tangents(logits, dlogits, U, rows, entropy=False)[2]
    return dlogp


def entropy_pass_gradient_only(model, params, layout, E: Batch, coefs, max_tokens: int) -> torch.Tensor:
    """`entropy_pass` without tangents (direction None): X̄ alone — what δH₁ needs without SE_E."""
    w = coefs.weights.unsqueeze(1).to(coefs.a.dtype)
    a, c = (coefs.a * w).float(), (coefs.c * w).float()
    xbar = torch.zeros(layout.numel, dtype=torch.float32, device=a.device)
    for rows in E.slices(max_tokens):
        stats = E.score(model, rows)
        grads, _ = grad_and_tangents([stats.entropies, stats.logprobs], [a[rows], c[rows]], params, None)
        xbar += torch.cat([x.reshape(-1).float() for x in grads])
    return xbar


# ----------------------------------------------------------------------------- lean scoring (bench only)


def lean_score(model, B: Batch, rows: slice, entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logp [n, R], H [n, R] or None) with graph: `teacher_force` minus what the delta-h1 passes never use.

    Differences from teacher_force (same numbers): no top-1/margin features (a topk over [n, R, V];
    delta-h1 reads those from the artifact), no entropy at all when the pass does not need it (the U
    passes), no division by T = 1, and H = −Σ π log π without the isfinite/where guard when top_p = 1
    (no −inf entries then) — each is a full pass over [n, R, V] forward and again backward.
    """
    ids, am = B.input_ids[rows], B.attention_mask[rows]
    position_ids = (am.cumsum(-1) - 1).clamp(min=0)
    keep = torch.arange(B.n_prompt_cols - 1, ids.shape[1] - 1, device=ids.device)
    logits = model(input_ids=ids, attention_mask=am, position_ids=position_ids, logits_to_keep=keep,
                   use_cache=False).logits  # fmt: skip
    if B.top_p < 1.0 or B.temperature != 1.0 or logits.dtype != torch.float32:
        logp = policy_logprobs(logits, B.temperature, B.top_p)
    else:
        logp = torch.log_softmax(logits, dim=-1)
    del logits
    mask = B.mask[rows]
    token_logp = torch.where(mask, logp.gather(-1, ids[:, B.n_prompt_cols :].unsqueeze(-1)).squeeze(-1), 0.0)
    if not entropy:
        return token_logp, None
    H = entropy_from_logprobs(logp) if B.top_p < 1.0 else -(logp.exp() * logp).sum(-1)
    return token_logp, torch.where(mask, H, 0.0)


def lean_policy_gradient(model, params, layout, U: Batch, coef: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """`policy_gradient` with `lean_score(entropy=False)`."""
    g = torch.zeros(layout.numel, dtype=torch.float32, device=coef.device)
    for rows in U.slices(max_tokens):
        logp, _ = lean_score(model, U, rows, entropy=False)
        grads, _ = grad_and_tangents([logp], [coef[rows]], params, None)
        g += torch.cat([x.reshape(-1).float() for x in grads])
    return g


def lean_entropy_pass(model, params, layout, E: Batch, coefs, direction, max_tokens: int):
    """`entropy_pass` with `lean_score(entropy=True)`."""
    w = coefs.weights.unsqueeze(1).to(coefs.a.dtype)
    a, c = (coefs.a * w).float(), (coefs.c * w).float()
    xbar = torch.zeros(layout.numel, dtype=torch.float32, device=a.device)
    dH, dlogp = torch.zeros_like(a), torch.zeros_like(a)
    for rows in E.slices(max_tokens):
        logp, H = lean_score(model, E, rows, entropy=True)
        grads, (dH[rows], dlogp[rows]) = grad_and_tangents([H, logp], [a[rows], c[rows]], params, direction)
        xbar += torch.cat([x.reshape(-1).float() for x in grads])
    return xbar, dH, dlogp


# ----------------------------------------------------------------------------- per-row directional derivatives by hooks (bench only)


class RowDots:
    """Per-row ⟨∇_θ Σ_t c_t y_t(row i), v⟩ for all rows in ONE ordinary backward, θ = LoRA weights.

    Rows of a batch never interact (causal attention within a row only), so row i's gradient of a
    Linear weight W (y = x Wᵀ) is G_i = Σ_{p in row i} δ_p x_pᵀ with δ_p = ∂L/∂y_p, and
        ⟨G_i, V⟩ = Σ_p δ_p · (x_p Vᵀ)
    needs only the layer input x (forward hook) and δ (hook on the output's gradient) — no per-row
    gradient, no double backward, no forward-mode AD, and the frozen (even 4-bit) base is untouched.
    Every trainable parameter must be the weight of an nn.Linear (LoRA A and B are).
    """

    def __init__(self, model, layout: FlatLayout, direction: list[torch.Tensor]):
        modules = dict(model.named_modules())
        self.handles, self.acc = [], None
        for name, v in zip(layout.names, direction):
            module = modules[name.removesuffix(".weight")]
            if not (isinstance(module, torch.nn.Linear) and name.endswith(".weight")):
                raise ValueError(f"RowDots handles Linear weights only, not {name}")
            self.handles.append(module.register_forward_hook(self._forward_hook(v)))

    def _forward_hook(self, v: torch.Tensor):
        def hook(module, inputs, output):
            if not output.requires_grad:
                return
            x = inputs[0].detach()

            def on_grad(delta):
                dots = (delta * (x @ v.to(x.dtype).T)).flatten(1).sum(-1, dtype=torch.float32)  # [n]
                self.acc = dots if self.acc is None else self.acc + dots

            output.register_hook(on_grad)

        return hook

    def take(self) -> torch.Tensor:
        out, self.acc = self.acc, None
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def row_dot_logprob_tangents(model, params, layout, U: Batch, coef: torch.Tensor, direction, max_tokens: int):
    """Per U row: Σ_j coef_ij dlogp_ij along `direction` — all `pg_group_terms` needs from `logprob_tangents`."""
    dots = RowDots(model, layout, direction)
    out = torch.zeros(len(U), dtype=torch.float32, device=coef.device)
    try:
        for rows in U.slices(max_tokens):
            logp, _ = lean_score(model, U, rows, entropy=False)
            torch.autograd.grad([logp], params, grad_outputs=[coef[rows]], allow_unused=True)
            out[rows] = dots.take()
    finally:
        dots.remove()
    return out


def row_dot_entropy_pass(model, params, layout, E: Batch, coefs, direction, max_tokens: int):
    """(X̄, s_i, β) of the main target from one backward (X̄ and s) plus one more (β, token_mean only).

    s_i = X_i·v = Σ_k a_ik dH_ik + c_ik dlogp_ik (`EntropyCoefs.scalars`), β = Σ_i w_i Σ_j len_c_ij dlogp_ij:
    with these, `EntropyCoefs.influence` needs no per-token tangents. (The other targets' SEs would
    each need their own backward.)
    """
    w = coefs.weights.unsqueeze(1).to(coefs.a.dtype)
    a, c = (coefs.a * w).float(), (coefs.c * w).float()
    len_c = None if coefs.len_c is None else (coefs.len_c * w).float()
    xbar = torch.zeros(layout.numel, dtype=torch.float32, device=a.device)
    s = torch.zeros(len(E), dtype=torch.float32, device=a.device)
    beta = torch.zeros((), dtype=torch.float64, device=a.device)
    dots = RowDots(model, layout, direction)
    try:
        for rows in E.slices(max_tokens):
            logp, H = lean_score(model, E, rows, entropy=True)
            grads = torch.autograd.grad([H, logp], params, grad_outputs=[a[rows], c[rows]], allow_unused=True,
                                        retain_graph=len_c is not None)  # fmt: skip
            xbar += torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float() for g, p in zip(grads, params)])
            s[rows] = dots.take() / coefs.weights[rows].float()
            if len_c is not None:
                torch.autograd.grad([logp], params, grad_outputs=[len_c[rows]], allow_unused=True)
                beta += dots.take().double().sum()
    finally:
        dots.remove()
    return xbar, s, beta


# ----------------------------------------------------------------------------- timing and memory


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_times(fns: dict, repeats: int, device: str) -> dict[str, float]:
    """Warm each up once, then `repeats` interleaved rounds; the median per function (seconds)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    _LAST_TIMES.clear()
    _LAST_TIMES.update(times)
    return {k: statistics.median(v) for k, v in times.items()}


_LAST_TIMES: dict[str, list[float]] = {}  # the raw times of the last median_times call


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> int:
    """Return freed heap to the OS, reset the kernel's RSS high-water mark to the current RSS; return it (bytes).

    Why not ru_maxrss: a child's ru_maxrss starts at its *parent's* peak (fork copies the page
    counters and exec keeps the old mm's high-water mark in signal->maxrss), so below the parent's
    peak nothing registers. VmHWM in /proc/self/status is this process's own, and writing 5 to
    /proc/self/clear_refs resets it (Linux ≥ 4.0). The child runs with MALLOC_MMAP_THRESHOLD_=65536
    so freed tensors leave RSS (glibc's dynamic threshold keeps them in the heap: peaks then double
    and wobble by ~5% between runs).
    """
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _proc_status_kb("VmRSS") * 1024


def peak_rss_above(baseline: int) -> int:
    return _proc_status_kb("VmHWM") * 1024 - baseline


def peak_memory_child(args) -> None:
    """Subprocess entry (--measure-memory KIND): build everything, then the peak above the post-load baseline.

    A one-row forward+backward first initialises the libraries (thread pools, kernel caches), so
    the measurement sees the work's own tensors and graph only.
    """
    cfg = json.loads(args.cfg_json)
    torch.set_num_threads(args.threads)
    model, tok, E, U, layout, spec = setup(cfg, args.device, DTYPES[args.dtype], args.qlora, batches=args.batches)
    est = EstimatorParams()
    mt = cfg["max_tokens"]
    one = Batch(E.input_ids[:1], E.attention_mask[:1], E.mask[:1], E.n_prompt_cols, E.temperature, E.top_p, {})
    plain_forward_backward(model, [one], mt)
    params = trainable(model, layout)
    coef = pg_coefficients(U.tensors["advantages"].float(), U.mask, spec.loss_agg_mode, spec.max_len).float()
    delta = update_direction(spec.rule, policy_gradient(model, params, layout, U, coef, mt).double(), spec.state, spec.max_grad_norm)
    d = [x.to(p.dtype) for x, p in zip(layout.unflatten(delta.float()).values(), params)]
    coefs = entropy_coefficients(E.tensors["entropies"].float(), E.mask, target=est.entropy, baseline=est.baseline)
    work = {
        "plain": lambda: plain_forward_backward(model, [E, U], mt),
        "delta_h1": lambda: compute_delta_h1(model, E, U, layout, spec, est, mt),
        # the passes one by one (--memory-passes)
        "u_gradient": lambda: policy_gradient(model, params, layout, U, coef, mt),
        "e_pass": lambda: entropy_pass(model, params, layout, E, coefs, d, mt),
        "e_pass_gradient_only": lambda: entropy_pass_gradient_only(model, params, layout, E, coefs, mt),
        "u_tangents": lambda: logprob_tangents(model, params, U, d, mt),
        "lean_e_pass": lambda: lean_entropy_pass(model, params, layout, E, coefs, d, mt),
        "row_dot_e_pass": lambda: row_dot_entropy_pass(model, params, layout, E, coefs, d, mt),
        "row_dot_u_tangents": lambda: row_dot_logprob_tangents(model, params, layout, U, coef, d, mt),
        "fwd_mode_u_tangents": lambda: logprob_tangents_forward_mode(model, params, U, d, mt),
    }[args.measure_memory]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        work()
        torch.cuda.synchronize()
        peak, how = torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated"
    else:
        base = reset_peak_rss()
        work()
        peak, how = peak_rss_above(base), "VmHWM after clear_refs"
    print(json.dumps({"peak_bytes": peak, "baseline_bytes": base, "method": how}))


def peak_memory(kind: str, cfg: dict, args, batches_file: str) -> dict:
    cmd = [sys.executable, __file__, "--measure-memory", kind, "--cfg-json", json.dumps(cfg), "--batches", batches_file,
           "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]  # fmt: skip
    if args.qlora:
        cmd.append("--qlora")
    # every block ≥ 64 KiB mmapped and returned to the OS when freed: RSS follows live memory (see reset_peak_rss)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def setup(cfg: dict, device: str, dtype: torch.dtype, qlora: bool, batches: str | None = None):
    """Model, tokenizer, E and U batches (sampled, or loaded from `batches`), layout and AdamW spec."""
    tok = build_tokenizer(cfg["vocab"])
    model = build_model(cfg, device, dtype, qlora)
    if batches is None:
        E_t = sample(model, tok, random_prompts(cfg, cfg["B_E"], seed=1), cfg, seed=11)
        U_prompts = [p for p in random_prompts(cfg, cfg["B_U"], seed=2) for _ in range(cfg["G"])]
        U_t = sample(model, tok, U_prompts, cfg, seed=12)
    else:
        E_t, U_t = torch.load(batches, weights_only=True)
    E, U = to_batches(E_t, U_t, cfg, torch.device(device))
    layout, spec = adam_spec(model)
    return model, tok, E, U, layout, spec


def max_rel_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """max |x − y| / max |y| (0 when both are 0)."""
    x, y = x.double(), y.double()
    return float((x - y).abs().max() / y.abs().max().clamp_min(1e-300))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats (≲ 1 min on 2 CPU cores)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/bench.json"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--qlora", action="store_true", help="4-bit NF4 base (bitsandbytes); skips forward-mode AD")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads for every measurement (1: least disturbed by other load on a shared machine)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds after the warm-up (median)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=INT", help="override a size, e.g. B_E=64")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--profile", action="store_true", help="also write a torch.profiler table of one compute_delta_h1")
    # internal: one peak-memory measurement in a fresh process
    ap.add_argument("--memory-passes", action="store_true", help="also the peak memory of each pass and alternative")
    ap.add_argument("--measure-memory", help=argparse.SUPPRESS)
    ap.add_argument("--cfg-json", help=argparse.SUPPRESS)
    ap.add_argument("--batches", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.measure_memory:
        return peak_memory_child(args)

    cfg = dict(QUICK if args.quick else FULL, temperature=args.temperature, top_p=args.top_p)
    for item in args.set:
        key, value = item.split("=", 1)
        cfg[key] = type(cfg[key])(value)
    if args.repeats:
        cfg["repeats"] = args.repeats
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    wall = time.perf_counter()

    # --- sampling: the product's generate_responses vs plain generate, same prompts and settings
    tok = build_tokenizer(cfg["vocab"])
    model = build_model(cfg, args.device, dtype, args.qlora)
    E_prompts = random_prompts(cfg, cfg["B_E"], seed=1)
    U_prompts = [p for p in random_prompts(cfg, cfg["B_U"], seed=2) for _ in range(cfg["G"])]
    outs: dict = {}
    sample_t = median_times(
        {
            "generate_responses": lambda: outs.__setitem__("E_t", sample(model, tok, E_prompts, cfg, seed=11)),
            "plain_generate": lambda: outs.__setitem__("steps", plain_generate(model, tok, E_prompts, cfg, seed=11)),
        },
        cfg["repeats"],
        args.device,
    )
    E_t = outs["E_t"]
    U_t = sample(model, tok, U_prompts, cfg, seed=12)
    E, U = to_batches(E_t, U_t, cfg, torch.device(args.device))
    layout, spec = adam_spec(model)
    params = trainable(model, layout)
    est = EstimatorParams()
    max_tokens = cfg["max_tokens"]

    # --- delta-h1, its parts, and bench-only alternatives, all on the same E and U
    coef = pg_coefficients(U.tensors["advantages"].float(), U.mask, spec.loss_agg_mode, spec.max_len).float()
    g = policy_gradient(model, params, layout, U, coef, max_tokens)
    delta = update_direction(spec.rule, g.double(), spec.state, spec.max_grad_norm).float()
    direction = [d.to(p.dtype) for d, p in zip(layout.unflatten(delta).values(), params)]
    coefs = entropy_coefficients(
        E.tensors["entropies"].float(), E.mask, target=est.entropy, baseline=est.baseline,
        features=torch.stack([E.tensors["top1_prob"], E.tensors["margin"]], -1).float(),
    )  # fmt: skip
    phases: dict[str, list[float]] = {}

    def run_delta_h1():
        result = compute_delta_h1(model, E, U, layout, spec, est, max_tokens)
        for k, v in result["timings"].items():
            phases.setdefault(k, []).append(v)
        return result

    def keep(name, fn):  # every call stores its output, so the first (warm-up) call serves the equality checks
        return lambda: outs.__setitem__(name, fn())

    fns = {
        "plain_fwd_bwd": lambda: plain_forward_backward(model, [E, U], max_tokens),
        "delta_h1": keep("delta_h1", run_delta_h1),
        "u_gradient": keep("u_gradient", lambda: policy_gradient(model, params, layout, U, coef, max_tokens)),
        "e_pass": keep("e_pass", lambda: entropy_pass(model, params, layout, E, coefs, direction, max_tokens)),
        "e_pass_gradient_only": lambda: entropy_pass_gradient_only(model, params, layout, E, coefs, max_tokens),
        "u_tangents": keep("u_tangents", lambda: logprob_tangents(model, params, U, direction, max_tokens)),
        "lean_u_gradient": keep("lean_u_gradient", lambda: lean_policy_gradient(model, params, layout, U, coef, max_tokens)),
        "lean_e_pass": keep("lean_e_pass", lambda: lean_entropy_pass(model, params, layout, E, coefs, direction, max_tokens)),
        "row_dot_u_tangents": keep(
            "row_dot_u_tangents", lambda: row_dot_logprob_tangents(model, params, layout, U, coef, direction, max_tokens)
        ),
        "row_dot_e_pass": keep(
            "row_dot_e_pass", lambda: row_dot_entropy_pass(model, params, layout, E, coefs, direction, max_tokens)
        ),
    }
    forward_mode = not args.qlora  # forward-mode AD segfaults through bitsandbytes 4-bit layers (SPEC §3)
    if forward_mode:
        fns["fwd_mode_e_pass"] = keep(
            "fwd_mode_e_pass", lambda: entropy_pass_forward_mode(model, params, layout, E, coefs, direction, max_tokens)
        )
        fns["fwd_mode_u_tangents"] = keep(
            "fwd_mode_u_tangents", lambda: logprob_tangents_forward_mode(model, params, U, direction, max_tokens)
        )
    t = median_times(fns, cfg["repeats"], args.device)
    t_min = {k: min(v) for k, v in _LAST_TIMES.items()}

    def ratios_from(t: dict) -> dict:
        plain = t["plain_fwd_bwd"]
        se_extra = (t["e_pass"] - t["e_pass_gradient_only"]) + t["u_tangents"]
        # drop-in replacements (same outputs as the product's passes): lean scoring, forward mode, row dots for U
        e_drop_in = min(t["lean_e_pass"], t.get("fwd_mode_e_pass", float("inf")))
        u_drop_in = min(t["row_dot_u_tangents"], t.get("fwd_mode_u_tangents", float("inf")))
        return {
            "delta_h1": t["delta_h1"] / plain,
            "se_extra": se_extra / plain,
            "delta_h1_without_se": (t["u_gradient"] + t["e_pass_gradient_only"]) / plain,
            "sample": sample_t["generate_responses"] / sample_t["plain_generate"],
            "delta_h1_drop_in_alternatives": (t["lean_u_gradient"] + e_drop_in + u_drop_in) / plain,
            "se_extra_drop_in_alternatives": (e_drop_in - t["e_pass_gradient_only"] + u_drop_in) / plain,
            # row dots in the E pass too: main target's SE only (each other target would cost one more backward)
            "delta_h1_row_dots": (t["lean_u_gradient"] + t["row_dot_e_pass"] + t["row_dot_u_tangents"]) / plain,
            "se_extra_row_dots": (t["row_dot_e_pass"] - t["e_pass_gradient_only"] + t["row_dot_u_tangents"]) / plain,
        }

    ratios = ratios_from(t)
    ratios_min = ratios_from({**t_min, **{k: v for k, v in t.items() if k not in t_min}})

    # equality of every alternative with the product's pass (max relative difference)
    xbar, dH, dlogp = outs["e_pass"]
    ref_u = outs["u_tangents"]
    checks = {
        "lean_u_gradient": max_rel_diff(outs["lean_u_gradient"], outs["u_gradient"]),
        "lean_e_pass": max(max_rel_diff(x, y) for x, y in zip(outs["lean_e_pass"], outs["e_pass"])),
        "row_dot_u_tangents": max_rel_diff(outs["row_dot_u_tangents"], (coef * ref_u).sum(-1)),
        "row_dot_e_pass": max(
            max_rel_diff(outs["row_dot_e_pass"][0], xbar), max_rel_diff(outs["row_dot_e_pass"][1], coefs.scalars(dH, dlogp))
        ),
        "delta_h1_vs_own_passes": max_rel_diff(outs["delta_h1"]["xbar"], xbar),
    }
    if forward_mode:
        checks["fwd_mode_e_pass"] = max(max_rel_diff(x, y) for x, y in zip(outs["fwd_mode_e_pass"], outs["e_pass"]))
        checks["fwd_mode_u_tangents"] = max_rel_diff(outs["fwd_mode_u_tangents"], ref_u)

    memory = {}
    if not args.no_memory:
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "batches.pt")
            torch.save((E_t, U_t), path)
            kinds = ["plain", "delta_h1"]
            if args.memory_passes:
                kinds += ["u_gradient", "e_pass", "e_pass_gradient_only", "u_tangents", "lean_e_pass", "row_dot_e_pass",
                          "row_dot_u_tangents"] + ([] if args.qlora else ["fwd_mode_u_tangents"])  # fmt: skip
            memory = {k: peak_memory(k, cfg, args, path) for k in kinds}
        ratios["memory"] = memory["delta_h1"]["peak_bytes"] / max(1, memory["plain"]["peak_bytes"])

    out = Path(args.out)
    if args.profile:
        profile_path = out.with_name(out.stem + "_profile.txt")
        profile(model, E, U, layout, spec, est, max_tokens, args.device, profile_path)

    n_params = sum(p.numel() for p in model.parameters())
    report = {
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "ratios_from_min_times": {k: round(v, 3) for k, v in ratios_min.items()},
        "targets": {"delta_h1": 1.2, "se_extra": 0.5, "sample": 1.05},
        "times_s": {k: round(v, 4) for k, v in {**t, **sample_t}.items()},
        "delta_h1_phases_s": {k: round(statistics.median(v), 4) for k, v in phases.items()},
        "alternatives_max_rel_diff": checks,
        "memory": memory,
        "config": cfg,
        "tokens": {
            "E_sequences": len(E), "U_sequences": len(U), "columns": [E.input_ids.shape[1], U.input_ids.shape[1]],
            "E_response_tokens": int(E.mask.sum()), "U_response_tokens": int(U.mask.sum()),
            "generate_steps": {"generate_responses": E_t["logprobs"].shape[1], "plain_generate": outs["steps"]},
        },  # fmt: skip
        "model": {"parameters": n_params, "trainable": layout.numel, "dtype": args.dtype, "qlora": args.qlora,
                  "hidden": cfg["hidden"], "layers": cfg["layers"], "vocab": cfg["vocab"], "attn_implementation": "eager"},  # fmt: skip
        "env": {
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "peft": __import__("peft").__version__, "python": platform.python_version(), "device": device_name(args.device),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },  # fmt: skip
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    print_report(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def profile(model, E, U, layout, spec, est, max_tokens: int, device: str, path: Path) -> None:
    """torch.profiler table of one compute_delta_h1 call (ops by self time, then by input shape)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch_profile(activities=activities, record_shapes=True) as prof:
        compute_delta_h1(model, E, U, layout, spec, est, max_tokens)
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    text = prof.key_averages().table(sort_by=key, row_limit=30)
    text += "\n" + prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=40, max_shapes_column_width=80)
    path.write_text(text)
    print(f"wrote {path}")


def print_report(report: dict) -> None:
    r, rm, tg = report["ratios"], report["ratios_from_min_times"], report["targets"]
    m = report["model"]
    print(f"model {m['parameters'] / 1e6:.1f}M params ({m['trainable'] / 1e6:.2f}M trainable, hidden {m['hidden']}, "
          f"{m['layers']} layers, vocab {m['vocab']}), {report['env']['device']}, {report['env']['threads']} threads, "
          f"{m['dtype']}{' QLoRA' if m['qlora'] else ''}")  # fmt: skip
    print(f"  {'ratio':32s} {'median':>7s} {'min':>7s}")
    for k in r:
        extra = f"   (target ≤ {tg[k]})" if k in tg else ""
        print(f"  {k:32s} {r[k]:7.3f} {rm.get(k, float('nan')):7.3f}{extra}")
    print("  times (s, median): " + ", ".join(f"{k} {v:.3f}" for k, v in report["times_s"].items()))
    print("  compute_delta_h1 phases (s): " + ", ".join(f"{k} {v:.3f}" for k, v in report["delta_h1_phases_s"].items()))
    if report["memory"]:
        print("  peak memory above baseline (MB): " + ", ".join(
            f"{k} {v['peak_bytes'] / 2**20:.1f}" for k, v in report["memory"].items()))  # fmt: skip
    print("  alternatives vs product, max rel diff: " + ", ".join(f"{k} {v:.1e}" for k, v in report["alternatives_max_rel_diff"].items()))
    print(f"  wall {report['wall_s']} s")


if __name__ == "__main__":
    main()
