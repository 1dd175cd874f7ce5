"""The policy π_θ(·|prefix): softmax(logits / T), top-p truncated and renormalised when top_p < 1.

Sampling, teacher forcing, entropies and log-probs all go through `policy_logprobs`, so every stage
scores exactly the distribution it samples from. The top-p truncation set is computed without
gradient (treated as a constant; docs/math.md §2.1, §10).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def top_p_keep_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask of the nucleus: token kept iff the mass of strictly-more-probable tokens < top_p.

    Ties are broken by token id (stable sort: the lower id counts as more probable), so sampling and
    teacher forcing pick the same nucleus; the most probable token is always kept. Matches the usual
    nucleus definition (smallest set whose mass reaches top_p).
    """
    with torch.no_grad():
        probs = torch.softmax(logits.float(), dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep_sorted = mass_before < top_p
        keep_sorted[..., 0] = True
        return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def policy_logprobs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """log π(v|prefix) for every vocabulary entry v, in float32 or better; −inf outside the nucleus.

    log π = log_softmax(logits / T) restricted to the top-p set of that same tempered distribution.
    """
    scaled = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if temperature != 1.0:  # (x / 1.0 == x; skipping it saves a [N, R, V] pass)
        scaled = scaled / temperature
    if top_p < 1.0:
        scaled = scaled.masked_fill(~top_p_keep_mask(scaled, top_p), float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


def entropy_from_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """H = −Σ_v π(v) log π(v) over the last dim; entries with π = 0 (−inf log-prob) contribute 0.

    The −inf entries are zeroed *before* the product: a `where` after it would still send
    0·(−inf) = NaN into the backward pass when top_p < 1.
    """
    return -(logp.exp() * logp.masked_fill(~torch.isfinite(logp), 0.0)).sum(dim=-1)


@dataclass
class TokenStats:
    """Per-token statistics of response tokens, all [N, R]; padding entries (mask False) are 0.

    logprobs: log π(y_k | y_<k) of the token actually in the sequence (behaviour or teacher-forced).
    entropies: H_k = −Σ_v π(v|y_<k) log π(v|y_<k) over the full vocabulary (Rao-Blackwellised).
    top1_prob, margin: max_v π(v|y_<k) and (top-1 − top-2) probability; features, always detached.
    """

    logprobs: torch.Tensor
    entropies: torch.Tensor | None
    top1_prob: torch.Tensor | None
    margin: torch.Tensor | None
    mask: torch.Tensor


def distribution_features(logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-1 probability, top-1 − top-2 probability) over the last dim of log π; detached.

    Outside the nucleus π = 0, so a one-token nucleus has margin = top-1 = 1.
    """
    with torch.no_grad():
        top2 = logp.detach().topk(2, dim=-1).values.exp()
        return top2[..., 0], top2[..., 0] - top2[..., 1]


def teacher_force(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_prompt_cols: int,
    response_mask: torch.Tensor,
    temperature: float,
    top_p: float,
    with_grad: bool = False,
    entropies: bool = True,
    features: bool = True,
) -> TokenStats:
    """Score the response columns of `input_ids` [N, P+R] under π_θ in one forward pass.

    Response token k (column P+k) is scored by the logits at column P+k−1, so the LM head runs on
    the R columns P−1 … P+R−2 only (`logits_to_keep`), never on the whole [N, P+R, V] block.
    Position ids = cumsum(attention_mask) − 1, clamped at 0 — the same as `generate` uses for
    non-padding positions, so teacher forcing reproduces the sampler's distribution.
    `entropies=False` / `features=False` skip those vocabulary-wide reductions (the fields are None):
    the policy-gradient passes need only the log-probs.
    """
    n_rows, n_cols = input_ids.shape
    n_resp = response_mask.shape[1]
    if n_prompt_cols < 1 or n_cols != n_prompt_cols + n_resp:
        raise ValueError(f"input_ids has {n_cols} columns, expected P + R = {n_prompt_cols} + {n_resp} with P >= 1")
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    keep = torch.arange(n_prompt_cols - 1, n_cols - 1, device=input_ids.device)
    with torch.set_grad_enabled(with_grad):
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=keep,
            use_cache=False,
        ).logits  # [N, R, V]
        logp = policy_logprobs(logits, temperature, top_p)
        del logits
        mask = response_mask.bool()
        targets = input_ids[:, n_prompt_cols:].unsqueeze(-1)
        token_logp = logp.gather(-1, targets).squeeze(-1)
        # where (not multiply): padding tokens may sit outside the nucleus (−inf), and 0·−inf = nan
        token_logp = torch.where(mask, token_logp, torch.zeros_like(token_logp))
        zero = torch.zeros_like(token_logp)
        entropy = torch.where(mask, entropy_from_logprobs(logp), zero) if entropies else None
    top1 = margin = None
    if features:
        top1, margin = (torch.where(mask, f, zero.detach()) for f in distribution_features(logp))
    return TokenStats(logprobs=token_logp, entropies=entropy, top1_prob=top1, margin=margin, mask=mask)


def token_budget_slices(n_rows: int, row_len: int, max_tokens: int) -> list[slice]:
    """Consecutive row ranges with rows·row_len ≤ max_tokens each (at least one row per range)."""
    per = max(1, max_tokens // max(1, row_len))
    return [slice(start, min(start + per, n_rows)) for start in range(0, n_rows, per)]
