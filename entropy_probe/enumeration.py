"""Exact entropy, its gradient, δH₁ and ΔH(η) by enumerating every continuation (tiny models only).

For each prompt x the tree of all responses y with π(y|x) > 0 is built level by level (docs/math.md
§7.1): at depth k one batched forward over every live prefix (all prompts at once, left-padded; with a
KV cache gathered from parent to child, so each depth feeds only the newest token) gives
π(·|x, y_<k) = policy_logprobs(logits/T, top_p) and H_k = −Σ_v π(v) log π(v) over the whole
vocabulary; every token in the nucleus spawns a child; a child ending in eos, or reaching
max_new_tokens, is a complete sequence. Tokens outside the nucleus have π = 0 and are pruned.

With p(y) = Π_k π(y_k|x, y_<k), S(y) = Σ_k H_k(y), L(y) = len(y) (eos included) and prompt weights
w_x (the E batch's prompt multiset, normalised; or the whole prompt population, each 1/n):

    A = Σ_x w_x Σ_y p(y) S(y),   D = Σ_x w_x Σ_y p(y) L(y),   M = Σ_x w_x Σ_y p(y) S(y)/L(y)
    sequence = A,     token_mean = A / D,     seq_mean_token_mean = M

Every quantity is a differentiable function of θ, so ∇_θ H is plain autograd through the enumeration
(score-function and pathwise parts both included, §7.2); A, D, M are additive over prompts, so their
gradients are accumulated over chunks of prompts and combined at the end, ∇(A/D) = ∇A/D − A ∇D/D².
δH₁ = ∇H · Δθ is then exact; the finite-difference slope and ΔH(η) = H(θ + mΔθ) − H(θ), η = m·lr,
come from re-enumerating at perturbed θ (§7.3), on a float64 model (`perturb.as_float64`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .errors import ProbeError
from .estimators import TARGETS
from .perturb import perturbed
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
        "raise exact.max_sequences, or enumerate shorter responses: the E samples' max_new_tokens (set "
        "generation.max_new_tokens and rerun sample-e; exact reads it from the samples) or fewer prompts",
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
                "check the checkpoint for NaN weights; for float64 use perturb.as_float64(model)",
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
    return _assembled(done, R, len(prompts), forward_tokens, device)


def _assembled(done: list[tuple], R: int, n_prompts: int, forward_tokens: int, device) -> Enumeration:
    """The completed sequences of every depth (owner, tokens, log-probs, entropies, ended on eos) as one
    `Enumeration`, right-padded to R columns."""

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
        n_prompts=n_prompts,
        forward_tokens=forward_tokens,
    )


def enumerate_tree(model, prompt_ids: Sequence[int], **kwargs) -> Enumeration:
    """Every response y with π(y|x) > 0 of one prompt; kwargs as for `enumerate_forest`."""
    return enumerate_forest(model, [list(prompt_ids)], **kwargs)


def sequences_per_prompt(vocab_size: int, n_eos: int, max_new_tokens: int) -> int:
    """Leaves of the full response tree when every token has π > 0 (top_p = 1).

    A response ends at depth d < R only on an eos token (n_eos · (V − n_eos)^(d−1) of them); at depth R
    every token ends it (V · (V − n_eos)^(R−1)). With top_p < 1 the nucleus prunes, so this is an upper bound.
    """
    open_prefixes = vocab_size - n_eos
    ended_early = sum(n_eos * open_prefixes ** (d - 1) for d in range(1, max_new_tokens))
    return ended_early + vocab_size * open_prefixes ** (max_new_tokens - 1)


def row_prompts(input_ids: torch.Tensor, prompt_lens: torch.Tensor, n_prompt_cols: int) -> list[list[int]]:
    """Each E row's prompt tokens: the last prompt_lens[i] of its first `n_prompt_cols` (left-padded) columns."""
    P = n_prompt_cols
    if (prompt_lens < 1).any() or (prompt_lens > P).any():
        raise ProbeError("E samples have prompt_lens outside [1, P]", "rerun sample-e")
    return [input_ids[i, P - int(n) : P].tolist() for i, n in enumerate(prompt_lens)]


def e_batch_prompts(
    input_ids: torch.Tensor, prompt_lens: torch.Tensor, n_prompt_cols: int
) -> tuple[list[list[int]], list[int]]:
    """Distinct prompts of the E batch (first-seen order) and how often each was drawn."""
    counts = Counter(tuple(p) for p in row_prompts(input_ids, prompt_lens, n_prompt_cols))
    return [list(p) for p in counts], list(counts.values())


# ----------------------------------------------------------------------------------------------
# moments, targets and gradients


def weighted_sums(enum: Enumeration, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ_x w_x Σ_y p(y) f(y) for f = 1 (mass), S (sum_h), L (length), S/L (mean_h); weights [n_prompts]."""
    p = enum.logprob.exp() * weights.to(enum.token_logprobs)[enum.prompt_index]
    S, L = enum.entropy_sum, enum.lengths.to(p.dtype)
    return {"mass": p.sum(), "sum_h": (p * S).sum(), "length": (p * L).sum(), "mean_h": (p * S / L).sum()}


def targets_from_sums(sums: dict) -> dict:
    """The three entropy targets from the weighted sums A = sum_h, D = length, M = mean_h (tensors or floats)."""
    return {
        "sequence": sums["sum_h"],
        "token_mean": sums["sum_h"] / sums["length"],
        "seq_mean_token_mean": sums["mean_h"],
    }


def _weights(prompts: Sequence, multiplicities: Sequence[float] | None) -> torch.Tensor:
    """w_x = n_x / Σ n (all 1 when multiplicities is None)."""
    m = (
        torch.ones(len(prompts), dtype=torch.float64)
        if multiplicities is None
        else torch.as_tensor(list(multiplicities), dtype=torch.float64)
    )
    if m.shape != (len(prompts),) or (m < 0).any() or m.sum() <= 0:
        raise ProbeError("bad prompt multiplicities", "give one non-negative number per prompt, not all zero")
    return m / m.sum()


def chunk_sums(
    model,
    prompts: Sequence[Sequence[int]],
    multiplicities: Sequence[float] | None,
    prompts_per_chunk: int | None,
    **enumerate_kwargs,
) -> Iterator[tuple[slice, dict[str, torch.Tensor], int]]:
    """Enumerate `prompts_per_chunk` prompts at a time (all at once for None); per chunk yield
    (its slice of prompts, its `weighted_sums` with the global weights w_x, sequences counted so far).

    The sums are additive over chunks; `max_sequences` bounds the total over all chunks.
    """
    w = _weights(prompts, multiplicities)
    size = len(prompts) if prompts_per_chunk is None else max(1, prompts_per_chunk)
    counted = 0
    for start in range(0, len(prompts), size):
        sl = slice(start, min(len(prompts), start + size))
        enum = enumerate_forest(model, prompts[sl], counted_before=counted, **enumerate_kwargs)
        counted += enum.n_sequences
        yield sl, weighted_sums(enum, w[sl]), counted


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
    enumerate_kwargs = dict(
        eos_id=eos_id, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, max_sequences=max_sequences
    )
    totals: dict[str, torch.Tensor] = {}
    counted = 0
    with contextlib.nullcontext() if with_grad else torch.no_grad():
        chunk = None if with_grad else prompts_per_chunk
        for _, sums, counted in chunk_sums(model, prompts, multiplicities, chunk, **enumerate_kwargs):  # noqa: B007 (the last count is the total)
            for key, value in sums.items():
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
    enumerate_kwargs = dict(
        eos_id=eos_id, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, max_sequences=max_sequences
    )
    keys = ("sum_h", "length", "mean_h")
    vals = {k: 0.0 for k in keys}
    grads = {k: [torch.zeros_like(t, dtype=torch.float64) for t in tensors] for k in keys}
    counted = 0
    for sl, sums, counted in chunk_sums(model, prompts, multiplicities, prompts_per_chunk, **enumerate_kwargs):
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


def directional(grad: dict[str, torch.Tensor], delta_theta: dict[str, torch.Tensor]) -> float:
    """∇H · Δθ = Σ_names Σ_i ∇H_i Δθ_i, accumulated in float64."""
    missing = sorted(set(grad) ^ set(delta_theta))
    if missing:
        raise ProbeError(f"Δθ and ∇H disagree on parameter '{missing[0]}'", "use Δθ computed for this checkpoint")
    return float(sum((grad[n].double() * delta_theta[n].to(grad[n].device).double()).sum() for n in grad))


# ----------------------------------------------------------------------------------------------
# finite differences and ΔH(η) (docs/math.md §7.3)


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


__all__ = [
    "Enumeration",
    "TARGETS",
    "chunk_sums",
    "delta_h_curve",
    "directional",
    "e_batch_prompts",
    "entropy_at",
    "enumerate_forest",
    "enumerate_tree",
    "exact_gradients",
    "exact_moments",
    "fd_slopes",
    "row_prompts",
    "sequences_per_prompt",
    "targets_from_sums",
    "trainable",
    "weighted_sums",
]
