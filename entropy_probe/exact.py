"""Exact entropy, its gradient, δH₁ and ΔH(η) by enumerating every continuation (tiny models only).

For each prompt x the tree of all responses y with π(y|x) > 0 is built level by level: at depth k one
batched forward over every live prefix (all prompts at once, left-padded; with a KV cache gathered
from parent to child, so each depth feeds only the newest token) gives
π(·|x, y_<k) = policy_logprobs(logits/T, top_p) and H_k = −Σ_v π(v) log π(v) over the whole
vocabulary; every token in the nucleus spawns a child; a child ending in eos, or reaching
max_new_tokens, is a complete sequence. Tokens outside the nucleus have π = 0 and are pruned.

With p(y) = Π_k π(y_k|x, y_<k), S(y) = Σ_k H_k(y), L(y) = len(y) (eos included) and prompt weights
w_x (the E batch's prompt multiset, normalised):

    sequence             H = Σ_x w_x Σ_y p(y) S(y)
    token_mean           H = Σ_x w_x Σ_y p(y) S(y)  /  Σ_x w_x Σ_y p(y) L(y)
    seq_mean_token_mean  H = Σ_x w_x Σ_y p(y) S(y) / L(y)

Every quantity is a differentiable function of θ, so ∇_θ H is plain autograd through the enumeration
(score-function and pathwise parts both included), and δH₁ = ∇H · Δθ is exact. The `exact` stage
compares it with the sampled estimate (z-test against se_E) and with the finite-difference slope of
the exact ΔH(η) = H(θ + (η/lr)Δθ) − H(θ), computed on a float64 copy of the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .files import read_json, read_tensors, write_json
from .outputs import staged_output_dir
from .errors import ProbeError
from .estimators import TARGETS
from .params import Params
from .policy import entropy_from_logprobs, policy_logprobs

log = logging.getLogger(__name__)



# ----------------------------------------------------------------------------------------------
# enumeration


@dataclass
class Enumeration:
    """All complete responses of a set of prompts. S sequences, R = max_new_tokens.

    tokens [S, R] (−1 after the end), lengths [S] (eos counted), truncated [S] (no eos, cut at R),
    prompt_index [S] (which prompt), token_logprobs [S, R] and entropies [S, R] (0 after the end;
    differentiable w.r.t. θ when built with grad enabled).
    """

    prompt_index: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor
    truncated: torch.Tensor
    token_logprobs: torch.Tensor
    entropies: torch.Tensor
    n_prompts: int
    forward_tokens: int  # tokens pushed through the model, all depths together (padding included)

    @property
    def n_sequences(self) -> int:
        return int(self.lengths.numel())

    @property
    def logprob(self) -> torch.Tensor:
        """log p(y) = Σ_k log π(y_k | x, y_<k)."""
        return self.token_logprobs.sum(-1)

    @property
    def entropy_sum(self) -> torch.Tensor:
        """S(y) = Σ_k H_k(y)."""
        return self.entropies.sum(-1)


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P] token matrix and attention mask with each prompt right-aligned (left padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
            mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _cache_field() -> str:
    """The KV-cache argument/output name: `cache` in recent transformers 5.x, `past_key_values` before."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def _next_logprobs(model, input_ids, attention_mask, position_ids, temperature: float, top_p: float, past, use_cache):
    """(log π(·|prefix) at the last position of every row [n, V], the updated KV cache or None)."""
    cache = _cache_field()
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=use_cache,
        logits_to_keep=1,
        **{cache: past},
    )
    return policy_logprobs(out.logits[:, -1, :], temperature, top_p), getattr(out, cache) if use_cache else None


def _too_many(count: int, limit: int, depth: int, max_new_tokens: int) -> ProbeError:
    return ProbeError(
        f"exact enumeration needs at least {count} sequences by depth {depth} of {max_new_tokens}, "
        f"more than exact.max_sequences = {limit}",
        "raise exact.max_sequences, or lower generation.max_new_tokens (or generation.top_p / fewer prompts)",
    )


def enumerate_forest(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    eos_id: int | Sequence[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    max_sequences: int,
    counted_before: int = 0,
    kv_cache: bool = True,
) -> Enumeration:
    """Every response y with π(y|x) > 0 for every prompt x, one batched forward per depth.

    Depth k runs the model once over all live prefixes x·y_<k of all prompts (left-padded); with
    `kv_cache` the prompts go through once and each later depth feeds only the newest token, the
    cache rows being gathered from parent to child (index_select, so gradients flow through it).
    Raises ProbeError as soon as the number of sequences (`counted_before` included, for callers
    that enumerate in chunks) would exceed `max_sequences`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ProbeError("exact enumeration got an empty prompt list or an empty prompt", "check the E samples")
    device = next(model.parameters()).device
    eos = torch.as_tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), dtype=torch.long, device=device)
    R = max_new_tokens
    prompt_ids, prompt_mask = _left_pad(prompts, int(eos[0]), device)
    if counted_before + len(prompts) > max_sequences:  # every prompt has at least one response
        raise _too_many(counted_before + len(prompts), max_sequences, 0, max_new_tokens)

    # live prefixes: which prompt, response tokens so far, per-position log-probs and entropies
    owner = torch.arange(len(prompts), device=device)
    resp = torch.zeros((len(prompts), 0), dtype=torch.long, device=device)
    done: list[tuple] = []
    n_done, forward_tokens = 0, 0
    past = None
    for k in range(R):
        # attention over prompt + y_<k; with the KV cache only the newest token goes through the model
        mask = torch.cat([prompt_mask[owner], torch.ones_like(resp)], dim=1)
        if kv_cache and k > 0:
            input_ids, position_ids = resp[:, -1:], mask.sum(-1, keepdim=True) - 1
        else:
            input_ids, position_ids = torch.cat([prompt_ids[owner], resp], dim=1), (mask.cumsum(-1) - 1).clamp(min=0)
        forward_tokens += int(input_ids.numel())
        logp, past = _next_logprobs(model, input_ids, mask, position_ids, temperature, top_p, past, kv_cache)
        if kv_cache and past is None:  # e.g. gradient checkpointing in train mode drops the cache
            log.warning("exact: the model returned no KV cache; feeding whole prefixes at every depth instead")
            kv_cache = False
        if torch.isnan(logp).any():  # a NaN row would have no children and silently lose its mass
            raise ProbeError(
                f"the model produced NaN logits at depth {k} of exact enumeration",
                "check the checkpoint for NaN weights; for float64 use exact.as_float64(model)",
            )
        H = entropy_from_logprobs(logp)  # [n]
        if k == 0:
            lp_cols = h_cols = logp.new_zeros((logp.shape[0], 0))
        parent, tok = torch.isfinite(logp).nonzero(as_tuple=True)  # children: nucleus tokens only
        c_resp = torch.cat([resp[parent], tok[:, None]], dim=1)
        c_lp = torch.cat([lp_cols[parent], logp[parent, tok][:, None]], dim=1)
        c_h = torch.cat([h_cols[parent], H[parent][:, None]], dim=1)
        ended = torch.isin(tok, eos) | (k + 1 == R)
        n_done += int(ended.sum())
        live = ~ended
        # every live prefix yields at least one more sequence: refuse before the next forward
        if counted_before + n_done + int(live.sum()) > max_sequences:
            raise _too_many(counted_before + n_done + int(live.sum()), max_sequences, k + 1, R)
        if ended.any():
            done.append((owner[parent[ended]], c_resp[ended], c_lp[ended], c_h[ended], torch.isin(tok[ended], eos)))
        owner, resp, lp_cols, h_cols = owner[parent[live]], c_resp[live], c_lp[live], c_h[live]
        log.debug("depth %d: %d prefixes, %d complete so far", k, int(live.sum()), n_done)
        if not live.any():
            break
        if past is not None:
            past.reorder_cache(parent[live])  # cache row i = prefix i (index_select: keeps the graph)

    def pad(x: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, R - x.shape[1]), value=value)

    lengths = torch.cat([torch.full((d[1].shape[0],), d[1].shape[1], device=device) for d in done])
    return Enumeration(
        prompt_index=torch.cat([d[0] for d in done]),
        tokens=torch.cat([pad(d[1], -1) for d in done]),
        lengths=lengths,
        truncated=~torch.cat([d[4] for d in done]),
        token_logprobs=torch.cat([pad(d[2], 0.0) for d in done]),
        entropies=torch.cat([pad(d[3], 0.0) for d in done]),
        n_prompts=len(prompts),
        forward_tokens=forward_tokens,
    )


def enumerate_tree(model, prompt_ids: Sequence[int], **kwargs) -> Enumeration:
    """Every response y with π(y|x) > 0 of one prompt; kwargs as for `enumerate_forest`."""
    return enumerate_forest(model, [list(prompt_ids)], **kwargs)


# ----------------------------------------------------------------------------------------------
# moments and targets


def weighted_sums(enum: Enumeration, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ_x w_x Σ_y p(y) f(y) for f = 1 (mass), S (sum_h), L (length), S/L (mean_h); weights [n_prompts]."""
    p = enum.logprob.exp() * weights.to(enum.token_logprobs)[enum.prompt_index]
    S, L = enum.entropy_sum, enum.lengths.to(p.dtype)
    return {"mass": p.sum(), "sum_h": (p * S).sum(), "length": (p * L).sum(), "mean_h": (p * S / L).sum()}


def targets_from_sums(sums: dict) -> dict:
    """The three entropy targets from the weighted sums (works on tensors and on floats)."""
    return {
        "sequence": sums["sum_h"],
        "token_mean": sums["sum_h"] / sums["length"],
        "seq_mean_token_mean": sums["mean_h"],
    }


def _weights(prompts: Sequence, multiplicities: Sequence[float] | None) -> torch.Tensor:
    m = torch.ones(len(prompts), dtype=torch.float64) if multiplicities is None else torch.as_tensor(
        list(multiplicities), dtype=torch.float64
    )
    if m.shape != (len(prompts),) or (m < 0).any() or m.sum() <= 0:
        raise ProbeError("bad prompt multiplicities", "give one non-negative number per prompt, not all zero")
    return m / m.sum()


def _chunks(n: int, size: int | None) -> Iterator[slice]:
    size = n if size is None else max(1, size)
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def exact_moments(
    model,
    prompts: Sequence[Sequence[int]],
    multiplicities: Sequence[float] | None = None,
    *,
    eos_id: int | Sequence[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    max_sequences: int,
    with_grad: bool = True,
    prompts_per_chunk: int | None = None,
) -> dict[str, torch.Tensor]:
    """Exact H for each target (plus `mass` = Σ_x w_x Σ_y p(y), which is 1, and `n_sequences`).

    With `with_grad` the values carry the autograd graph w.r.t. θ (all prompts in one enumeration);
    without, prompts are enumerated `prompts_per_chunk` at a time and the sums added up.
    """
    w = _weights(prompts, multiplicities)
    totals: dict[str, torch.Tensor] = {}
    counted = 0
    ctx = contextlib.nullcontext() if with_grad else torch.no_grad()
    with ctx:
        for sl in _chunks(len(prompts), None if with_grad else prompts_per_chunk):
            enum = enumerate_forest(
                model, prompts[sl], eos_id=eos_id, max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, max_sequences=max_sequences, counted_before=counted,
            )  # fmt: skip
            counted += enum.n_sequences
            for key, value in weighted_sums(enum, w[sl]).items():
                totals[key] = totals[key] + value if key in totals else value
    out = targets_from_sums(totals)
    out["mass"] = totals["mass"]
    out["n_sequences"] = torch.tensor(counted)
    return out


def trainable(model) -> dict[str, torch.Tensor]:
    """θ: the parameters that require grad, by `named_parameters()` name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def exact_gradients(
    model,
    prompts: Sequence[Sequence[int]],
    multiplicities: Sequence[float] | None = None,
    *,
    eos_id: int | Sequence[int],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    max_sequences: int,
    prompts_per_chunk: int | None = None,
) -> tuple[dict[str, float], dict[str, dict[str, torch.Tensor]], int]:
    """(H per target, ∇_θ H per target and parameter name in float64, number of sequences).

    Memory stays bounded by enumerating `prompts_per_chunk` prompts at a time: the sums
    A = Σ w p S, D = Σ w p L, M = Σ w p S/L are additive over prompts, so ∇A, ∇D, ∇M are
    accumulated chunk by chunk and combined at the end, ∇(A/D) = ∇A/D − A ∇D/D².
    """
    params = trainable(model)
    if not params:
        raise ProbeError("the model has no trainable parameters (θ is empty)", "load the adapter as trainable")
    names, tensors = list(params), list(params.values())
    w = _weights(prompts, multiplicities)
    keys = ("sum_h", "length", "mean_h")
    vals = {k: 0.0 for k in keys}
    grads = {k: [torch.zeros_like(t, dtype=torch.float64) for t in tensors] for k in keys}
    counted = 0
    for sl in _chunks(len(prompts), prompts_per_chunk):
        enum = enumerate_forest(
            model, prompts[sl], eos_id=eos_id, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, max_sequences=max_sequences, counted_before=counted,
        )  # fmt: skip
        counted += enum.n_sequences
        sums = weighted_sums(enum, w[sl])
        for i, k in enumerate(keys):
            gs = torch.autograd.grad(sums[k], tensors, retain_graph=i < len(keys) - 1, allow_unused=True)
            for acc, g in zip(grads[k], gs):
                if g is not None:
                    acc += g.double()
            vals[k] += float(sums[k].detach().double())
        log.info("exact gradient: prompts %d-%d of %d, %d sequences so far", sl.start, sl.stop, len(prompts), counted)
    A, D = vals["sum_h"], vals["length"]
    values = targets_from_sums(vals)
    per_target = {
        "sequence": grads["sum_h"],
        "token_mean": [ga / D - A * gd / D**2 for ga, gd in zip(grads["sum_h"], grads["length"])],
        "seq_mean_token_mean": grads["mean_h"],
    }
    out = {t: dict(zip(names, gs)) for t, gs in per_target.items()}
    return values, out, counted


def exact_gradient(model, prompts, multiplicities=None, *, target: str, **kwargs) -> dict[str, torch.Tensor]:
    """∇_θ H for one target (float64, by parameter name); kwargs as for `exact_gradients`."""
    if target not in TARGETS:
        raise ProbeError(f"unknown entropy target '{target}'", f"use one of {', '.join(TARGETS)}")
    return exact_gradients(model, prompts, multiplicities, **kwargs)[1][target]


def directional(grad: dict[str, torch.Tensor], delta_theta: dict[str, torch.Tensor]) -> float:
    """∇H · Δθ = Σ_names Σ_i ∇H_i Δθ_i, accumulated in float64."""
    missing = sorted(set(grad) ^ set(delta_theta))
    if missing:
        raise ProbeError(f"Δθ and ∇H disagree on parameter '{missing[0]}'", "use Δθ computed for this checkpoint")
    return float(sum((grad[n].double() * delta_theta[n].to(grad[n].device).double()).sum() for n in grad))


# ----------------------------------------------------------------------------------------------
# perturbations, finite differences, ΔH(η)


def _rmsnorm_in_input_dtype(module: torch.nn.Module):
    """RMSNorm y = w · x / sqrt(mean(x²) + eps), computed in x's dtype (HF upcasts only to float32)."""

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return module.weight * (hidden_states * torch.rsqrt(variance + module.variance_epsilon))

    return forward


# The attention that `as_float64` selects: transformers' eager attention computed in the input dtype.
FLOAT64_ATTENTION = "eager_input_dtype"


def _eager_attention_in_input_dtype(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """softmax(q kᵀ · scaling + mask) v with every step in the input dtype; returns (output, weights).

    transformers' eager attention runs the softmax in float32 whatever the model dtype: ~1e-7 rounding
    that depends on θ, and in float64 the fully masked query rows of left padding (every score at
    finfo(float64).min, which is −inf in float32) become NaN that leaks through the value matmul. SDPA
    computes in the input dtype but its CPU kernel has no double backward (the tangents need one).
    Keys and values are repeated per query group as in transformers' `repeat_kv`.
    """
    unsupported = [k for k in ("softcap", "s_aux", "sinks") if kwargs.get(k) is not None]
    if unsupported:  # computing without them would silently give another model
        raise ProbeError(
            f"float64 exact enumeration does not implement attention with {', '.join(unsupported)}",
            "run the exact stage on a model without attention logit soft-capping or attention sinks",
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = torch.softmax(scores, dim=-1)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _register_float64_attention() -> None:
    """Make FLOAT64_ATTENTION a transformers attention implementation, with eager's additive float mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(FLOAT64_ATTENTION, _eager_attention_in_input_dtype)
    ALL_MASK_ATTENTION_FUNCTIONS.register(FLOAT64_ATTENTION, eager_mask)


def as_float64(model):
    """`model.double()` in eval mode, made float64 end to end (in place; returns the model).

    Two places in transformers' Llama-family code compute in float32 whatever the model dtype,
    which leaves θ-dependent rounding of ~1e-7 and ruins float64 finite differences and identities:
    - RMSNorm upcasts to float32 (not float64): its instances get a forward in the input dtype;
    - eager attention runs its softmax in float32 (and turns left padding into NaN in float64): the
      model gets eager attention computed in the input dtype (FLOAT64_ATTENTION), which, unlike SDPA
      on CPU, also has a double backward. (Rotary cos/sin stay float32: they do not depend on θ.)
    """
    model = model.double().eval()
    _register_float64_attention()
    model.set_attn_implementation(FLOAT64_ATTENTION)
    if getattr(model.config, "_attn_implementation", None) != FLOAT64_ATTENTION:
        raise ProbeError(
            f"{type(model).__name__} cannot switch its attention implementation, so it cannot run in float64",
            "use a transformers model that supports set_attn_implementation (Llama, Qwen2, Mistral, …)",
        )
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = _rmsnorm_in_input_dtype(module)
    return model


def param_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and raw bytes of the given tensors (bit-exact restore checks)."""
    digest = hashlib.sha256()
    for name, t in tensors.items():
        digest.update(name.encode())
        digest.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def perturbed(model, delta_theta: dict[str, torch.Tensor], scale: float) -> Iterator[None]:
    """θ ← θ + scale·Δθ in place for the parameters named in Δθ; restored bit-exactly on exit.

    The originals are saved as copies and restored with `copy_` (θ + sΔθ − sΔθ is not θ in
    floating point); a checksum over the raw bytes verifies the restore.
    """
    params = dict(model.named_parameters())
    unknown = [n for n in delta_theta if n not in params]
    if unknown:
        raise ProbeError(f"Δθ names parameter '{unknown[0]}' that the model does not have", "use Δθ for this model")
    touched = {n: params[n] for n in delta_theta}
    for n, p in touched.items():
        if p.shape != delta_theta[n].shape:
            raise ProbeError(f"Δθ for '{n}' has shape {tuple(delta_theta[n].shape)}, parameter {tuple(p.shape)}")
    saved = {n: p.detach().clone() for n, p in touched.items()}
    before = param_checksum(saved)
    try:
        with torch.no_grad():
            for n, p in touched.items():
                p.add_(delta_theta[n].to(device=p.device, dtype=p.dtype), alpha=scale)
        yield
    finally:
        with torch.no_grad():
            for n, p in touched.items():
                p.copy_(saved[n])
        if param_checksum(touched) != before:
            raise RuntimeError("perturbed(): parameters were not restored exactly")


def entropy_at(model, delta_theta, scale: float, prompts, multiplicities, **kwargs) -> dict[str, float]:
    """H(θ + scale·Δθ) for every target (no grad); kwargs as for `exact_moments`."""
    with perturbed(model, delta_theta, scale):
        out = exact_moments(model, prompts, multiplicities, with_grad=False, **kwargs)
    return {t: float(out[t].double()) for t in TARGETS}


def fd_slopes(model, delta_theta, prompts, multiplicities, *, step: float, **kwargs) -> dict[str, float]:
    """Central difference (H(θ + hΔθ) − H(θ − hΔθ)) / 2h ≈ d/ds H(θ + sΔθ) at s = 0, h = `step`.

    Run it on a float64 model: the truncation error is O(h²) and the round-off O(ε/h).
    """
    plus = entropy_at(model, delta_theta, step, prompts, multiplicities, **kwargs)
    minus = entropy_at(model, delta_theta, -step, prompts, multiplicities, **kwargs)
    return {t: (plus[t] - minus[t]) / (2 * step) for t in TARGETS}


def delta_h_curve(
    model, delta_theta, multipliers, prompts, multiplicities, *, base: dict[str, float] | None = None, **kwargs
) -> dict[str, list[float]]:
    """Exact ΔH(η) = H(θ + mΔθ) − H(θ) for η = m·lr, every multiplier m (Δθ already includes lr).

    `base` = H(θ) per target when already known (saves one enumeration).
    """
    base = base or entropy_at(model, delta_theta, 0.0, prompts, multiplicities, **kwargs)
    curve = {t: [] for t in TARGETS}
    for m in multipliers:
        h = entropy_at(model, delta_theta, m, prompts, multiplicities, **kwargs)
        for t in TARGETS:
            curve[t].append(h[t] - base[t])
        log.info("exact ΔH at η = %g·lr: %s", m, {t: f"{curve[t][-1]:.3e}" for t in TARGETS})
    return curve


# ----------------------------------------------------------------------------------------------
# the `exact` stage


def e_batch_prompts(samples: dict[str, torch.Tensor]) -> tuple[list[list[int]], list[int]]:
    """Distinct prompts of the E batch (first-seen order) and how often each was drawn.

    Row i's prompt is the last prompt_lens[i] tokens of its first P = [P+R] − R columns.
    """
    ids, plens = samples["input_ids"], samples["prompt_lens"]
    P = ids.shape[1] - samples["logprobs"].shape[1]
    if (plens < 1).any() or (plens > P).any():
        raise ProbeError("E samples have prompt_lens outside [1, P]", "rerun sample-e")
    counts = Counter(tuple(ids[i, P - int(n) : P].tolist()) for i, n in enumerate(plens))
    return [list(p) for p in counts], list(counts.values())


def _eos_id(model) -> list[int]:
    for config in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(config, "eos_token_id", None) if config is not None else None
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
    raise ProbeError("the model config names no eos_token_id", "set eos_token_id in the base model's config")


def _load_model(params: Params):
    """The probed policy (base + adapter), as every other stage loads it."""
    from .checkpoint import load_policy_model, resolve_paths

    return load_policy_model(params.checkpoint, resolve_paths(params.checkpoint))


def sequences_per_prompt(vocab_size: int, n_eos: int, max_new_tokens: int) -> int:
    """Leaves of the full response tree when every token has π > 0 (top_p = 1).

    A response ends at depth d < R only on an eos token (n_eos · (V − n_eos)^(d−1) of them); at depth R
    every token ends it (V · (V − n_eos)^(R−1)). With top_p < 1 the nucleus prunes, so this is an upper bound.
    """
    open_prefixes = vocab_size - n_eos
    ended_early = sum(n_eos * open_prefixes ** (d - 1) for d in range(1, max_new_tokens))
    return ended_early + vocab_size * open_prefixes ** (max_new_tokens - 1)


def _base_config(params: Params):
    """The base model's config (vocabulary, eos), read without loading any weights."""
    from transformers import AutoConfig

    from .checkpoint import resolve_paths

    return AutoConfig.from_pretrained(resolve_paths(params.checkpoint).base_model)


def _prepare_float64(model, names: list[str]):
    """The exact stage's model: float64, θ = the parameters Δθ names (and only those) require grad."""
    if any(not p.is_floating_point() for p in model.parameters()):
        raise ProbeError(
            "exact enumeration needs a floating-point model; this one is quantised", "set checkpoint.use_qlora=false"
        )
    model = as_float64(model)
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ProbeError(f"bars.safetensors has Δθ for '{missing[0]}', which the model lacks", "rerun delta-h1")
    for n, p in params.items():
        p.requires_grad_(n in names)
    return model


def _generation(samples_meta: dict) -> tuple[float, float, int]:
    gen = samples_meta.get("generation") or {}
    try:
        temperature, max_new = float(gen["temperature"]), int(gen["max_new_tokens"])
        top_p = float(gen.get("top_p", 1.0))
    except (KeyError, TypeError, ValueError):
        raise ProbeError("samples.json lacks generation.temperature / max_new_tokens", "rerun sample-e") from None
    if gen.get("stop"):
        raise ProbeError("exact enumeration does not model generation.stop strings", "set generation.stop: null")
    return temperature, top_p, max_new


def run(params: Params, out_dir: str | Path, dry_run: bool = False) -> dict | None:
    """Exact H, ∇H, δH₁, FD slope and ΔH(η) for the E prompts; writes `out_dir/exact.json`."""
    t0 = time.perf_counter()
    ep = params.exact
    sample_dir = Path(params.paths.sample_e)
    samples, _ = read_tensors(sample_dir / "samples.safetensors", "samples_e")
    temperature, top_p, max_new = _generation(read_json(sample_dir / "samples.json", "E samples report"))
    prompts, mult = e_batch_prompts(samples)
    if dry_run:
        config = _base_config(params)
        eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        bound = len(prompts) * sequences_per_prompt(config.vocab_size, len(eos), max_new)
        exactly = "exactly" if top_p >= 1.0 else "at most (top_p < 1 prunes the tree)"
        print(f"exact: {len(prompts)} distinct prompts ({sum(mult)} E rows), {exactly} {bound} sequences to "
              f"enumerate (vocab {config.vocab_size}, max_new_tokens={max_new}); limit exact.max_sequences="
              f"{ep.max_sequences}; writes {Path(out_dir) / 'exact.json'}")  # fmt: skip
        return None
    model = _load_model(params)
    eos = _eos_id(model)
    kw = dict(eos_id=eos, max_new_tokens=max_new, temperature=temperature, top_p=top_p, max_sequences=ep.max_sequences)
    log.info("exact: %d distinct prompts (%d E rows), T=%g, top_p=%g, max_new_tokens=%d",
             len(prompts), sum(mult), temperature, top_p, max_new)  # fmt: skip


    bars, _ = read_tensors(Path(params.paths.delta_h1) / "bars.safetensors", "bars")
    delta = {k[len("delta_theta.") :]: v for k, v in bars.items() if k.startswith("delta_theta.")}
    if not delta:
        raise ProbeError("bars.safetensors holds no delta_theta.* tensors", "rerun delta-h1")
    report = read_json(Path(params.paths.delta_h1) / "delta_h1.json", "delta-h1 report")
    verify = read_json(Path(params.paths.verify) / "verify.json", "verify report")
    if report.get("checkpoint_fingerprint") != verify.get("fingerprint"):
        raise ProbeError(
            f"delta_h1.json is for checkpoint {report.get('checkpoint_fingerprint')}, "
            f"but {params.paths.verify} describes {verify.get('fingerprint')}",
            "point paths.delta_h1 and paths.verify at the same checkpoint's outputs (dvc repro)",
        )
    lr = report.get("learning_rate")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise ProbeError(f"delta_h1.json has learning_rate {lr!r}, need a positive number", "rerun delta-h1")
    model = _prepare_float64(model, list(delta))
    delta = {n: v.to(torch.float64) for n, v in delta.items()}

    values, grads, n_seq = exact_gradients(model, prompts, mult, prompts_per_chunk=ep.prompts_per_chunk, **kw)
    exact_dh1 = {t: directional(grads[t], delta) for t in TARGETS}
    log.info("exact δH₁: %s", {t: f"{v:.4e}" for t, v in exact_dh1.items()})
    kw_nograd = dict(kw, prompts_per_chunk=ep.prompts_per_chunk)
    with torch.no_grad():
        slopes = fd_slopes(model, delta, prompts, mult, step=ep.fd_eps, **kw_nograd)
        curve = delta_h_curve(model, delta, ep.eta_multipliers, prompts, mult, base=values, **kw_nograd)

    estimates = report.get("targets") or {}
    targets = {}
    for t in TARGETS:
        est = estimates.get(t) or {}
        dh1, se_E = est.get("delta_h1"), est.get("se_E")
        z = (dh1 - exact_dh1[t]) / se_E if dh1 is not None and se_E and math.isfinite(se_E) else None
        targets[t] = {
            "entropy_exact": values[t],
            "entropy_estimate": est.get("entropy"),
            "delta_h1_exact": exact_dh1[t],
            "delta_h1": dh1,
            "se_E": se_E,
            "se_delta_h1": est.get("se_delta_h1"),
            "z": z,
            "fd_slope": slopes[t],
            "rel_err_fd": abs(exact_dh1[t] - slopes[t]) / max(abs(slopes[t]), 1e-300),
            "eta_grid": [
                {
                    "multiplier": m,
                    "eta": m * lr,
                    "delta_h_exact": curve[t][j],
                    "delta_h1_exact_linear": m * exact_dh1[t],
                    "delta_h1_linear": None if dh1 is None else m * dh1,
                }
                for j, m in enumerate(ep.eta_multipliers)
            ],
        }
    result = {
        "configured_target": params.estimator.entropy,
        "targets": targets,
        "learning_rate": lr,
        "generation": {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new, "eos_id": eos},
        "checkpoint_fingerprint": verify.get("fingerprint"),
        "dtype": "float64",
        "fd_step": ep.fd_eps,
        "n_distinct_prompts": len(prompts),
        "n_e_rows": sum(mult),
        "n_sequences": n_seq,
        "n_parameters": sum(v.numel() for v in delta.values()),
    }
    with staged_output_dir(out_dir) as tmp:
        write_json(tmp / "exact.json", result)
    for t in TARGETS:
        r = targets[t]
        z = "n/a" if r["z"] is None else f"{r['z']:+.2f}"
        log.info("%s: H=%.5f  δH₁ exact %.4e  estimate %s  z %s  FD rel err %.1e",
                 t, r["entropy_exact"], r["delta_h1_exact"], r["delta_h1"], z, r["rel_err_fd"])  # fmt: skip
    log.info("exact: wrote %s in %.1f s", Path(out_dir) / "exact.json", time.perf_counter() - t0)
    return result


__all__ = [
    "Enumeration",
    "TARGETS",
    "as_float64",
    "delta_h_curve",
    "directional",
    "e_batch_prompts",
    "entropy_at",
    "enumerate_forest",
    "enumerate_tree",
    "exact_gradient",
    "exact_gradients",
    "exact_moments",
    "fd_slopes",
    "perturbed",
    "run",
    "targets_from_sums",
    "trainable",
    "weighted_sums",
]
