"""The policy π_θ(·|prefix): softmax(logits / T), top-p truncated and renormalised when top_p < 1.

Sampling, teacher forcing, entropies and log-probs all go through `policy_logprobs`, so every stage
scores exactly the distribution it samples from. The top-p truncation set is computed without
gradient (treated as a constant), as SPEC §3 prescribes.
"""

from __future__ import annotations

import torch


def top_p_keep_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Boolean mask of the nucleus: token kept iff the mass of strictly-more-probable tokens < top_p.

    Ties are broken by sort order; the most probable token is always kept. Matches the usual
    nucleus definition (smallest set whose mass reaches top_p).
    """
    with torch.no_grad():
        probs = torch.softmax(logits.float(), dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        keep_sorted = mass_before < top_p
        keep_sorted[..., 0] = True
        return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def policy_logprobs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """log π(v|prefix) for every vocabulary entry v, in float32 or better; −inf outside the nucleus.

    log π = log_softmax(logits / T) restricted to the top-p set of that same tempered distribution.
    """
    scaled = logits.float() / temperature if logits.dtype in (torch.float16, torch.bfloat16) else logits / temperature
    if top_p < 1.0:
        scaled = scaled.masked_fill(~top_p_keep_mask(scaled, top_p), float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


def entropy_from_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """H = −Σ_v π(v) log π(v) over the last dim; entries with π = 0 (−inf log-prob) contribute 0."""
    p_logp = torch.where(torch.isfinite(logp), logp.exp() * logp, torch.zeros_like(logp))
    return -p_logp.sum(dim=-1)
