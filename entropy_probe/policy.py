"""The policy π_θ(·|prefix): softmax(logits / T), top-p truncated and renormalised when top_p < 1.

Sampling, teacher forcing, entropies and log-probs all go through `policy_logprobs`, so every stage
scores exactly the distribution it samples from. The top-p truncation set is computed without
gradient (treated as a constant; docs/math.md §2.1, §10).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, fields

import torch
from torch.utils.checkpoint import checkpoint

from .params import ComputeParams

log = logging.getLogger(__name__)
DEFAULT_LOGITS_CHUNK_MB: float = ComputeParams.model_fields["logits_chunk_mb"].default


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
    surrogate: with coefficients (a, c) given, a_k H_k + c_k log π(y_k|y_<k), the one output an E backward
    needs (its gradient is X_i's share); else None.
    """

    logprobs: torch.Tensor
    entropies: torch.Tensor | None
    top1_prob: torch.Tensor | None
    margin: torch.Tensor | None
    mask: torch.Tensor
    surrogate: torch.Tensor | None = None

    def rows(self, index: slice) -> "TokenStats":
        """The statistics of rows `index` (views, still on the graph)."""
        values = (getattr(self, f.name) for f in fields(self))
        return TokenStats(*(None if t is None else t[index] for t in values))


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
    logits_chunk_mb: float = DEFAULT_LOGITS_CHUNK_MB,
    coefs: tuple[torch.Tensor, torch.Tensor] | None = None,
    logprob_grad: bool = True,
) -> TokenStats:
    """Score the response columns of `input_ids` [N, P+R] under π_θ: one decoder pass, then the LM head on chunks.

    Response token k (column P+k) is scored by the hidden state at column P+k−1, so the LM head runs on
    the R columns P−1 … P+R−2 only, never on the whole [N, P+R, V] block. Position ids =
    cumsum(attention_mask) − 1, clamped at 0 — the same as `generate` uses for non-padding positions, so
    teacher forcing reproduces the sampler's distribution.

    The vocabulary-wide work (LM head, 1/T, top-p, log-softmax, gather, entropy, features) runs on chunks
    of columns of about `logits_chunk_mb` MiB of float32 logits each ([N, c, V], rows kept apart so per-row
    hooks on the head see rows). With a graph and more than one chunk, a frozen Linear head takes each
    position's gradient w.r.t. its hidden state in the forward (`_FrozenHeadScores`); a trainable head has
    each chunk activation-checkpointed, its [N, c, V] tensors recomputed in the backward. Either way no
    full-vocabulary tensor of the whole microbatch stays alive. Trailing columns that are padding in every
    row are not scored (their entries are 0 anyway). Models whose logits are not exactly
    head(decoder(...)) (`split_lm_head` is None) are scored unchunked, with a warning; so, without one, is a model
    sharded by FSDP2 (`is_fsdp`).
    `entropies=False` / `features=False` skip those vocabulary-wide reductions (the fields are None):
    the policy-gradient passes need only the log-probs.

    coefs = (a, c) [N, R] (detached, known before the pass: the E estimator's coefficients) adds the
    output `surrogate` = a·H + c·ℓ per token. Its backward is the E backward; through a frozen chunked
    head it costs one [c, V]×[V, d] product per chunk instead of one for H and one for ℓ. The entropies
    then carry no graph of their own, and the log-probs only with `logprob_grad` (token_mean's β pass).
    """
    n_rows, n_cols = input_ids.shape
    n_resp = response_mask.shape[1]
    if n_prompt_cols < 1 or n_cols != n_prompt_cols + n_resp:
        raise ValueError(f"input_ids has {n_cols} columns, expected P + R = {n_prompt_cols} + {n_resp} with P >= 1")
    opts = _HeadOptions(temperature, top_p, entropies, features, logprob_grad)
    parts = None if is_fsdp(model) else split_lm_head(model)
    if parts is None:
        if not is_fsdp(model):
            _warn_unchunked(model)
        args = (model, input_ids, attention_mask, n_prompt_cols, response_mask, temperature, top_p, with_grad)
        return teacher_force_unchunked(*args, entropies, features, coefs)
    decoder, head = parts
    mask = response_mask.bool()
    targets = input_ids[:, n_prompt_cols:]
    live = mask.any(0).nonzero()
    n_live = int(live.max()) + 1 if live.numel() else 1  # at least one column: the outputs keep a graph
    step = max(1, chunk_tokens(head, logits_chunk_mb) // n_rows)
    with torch.set_grad_enabled(with_grad):
        hidden = decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=(attention_mask.long().cumsum(-1) - 1).clamp(min=0),
            use_cache=False,
        ).last_hidden_state[:, n_prompt_cols - 1 : n_prompt_cols - 1 + n_live]
        score = functools.partial(_score_columns, head, opts)
        several = torch.is_grad_enabled() and n_live > step  # one chunk: plain autograd, nothing to save
        if several and _frozen_linear(head):
            # gradients w.r.t. each position's hidden state taken in the forward: nothing to recompute
            score = functools.partial(_score_columns_frozen_head, head, opts)
        checkpointed = several and not _frozen_linear(head)
        chunks = []
        for start in range(0, n_live, step):
            cols = slice(start, min(start + step, n_live))
            args = (hidden[:, cols], targets[:, cols], mask[:, cols])
            args += (None, None) if coefs is None else (coefs[0][:, cols], coefs[1][:, cols])
            chunks.append(checkpoint(score, *args, use_reentrant=False) if checkpointed else score(*args))
        joined = [_join(list(field), n_resp) for field in zip(*chunks)]
    return TokenStats(*joined[:4], mask=mask, surrogate=joined[4])


@dataclass(frozen=True)
class _HeadOptions:
    """How one chunk is scored: the policy's T and top-p, which reductions to form, and (with coefficients)
    whether ℓ keeps a gradient of its own besides the surrogate's."""

    temperature: float
    top_p: float
    entropies: bool
    features: bool
    logprob_grad: bool = True


def _score_columns(head, opts: _HeadOptions, hidden, targets, mask, coef_a=None, coef_c=None):
    """(ℓ, H, top1, margin, surrogate) [N, c] of one chunk of columns from its hidden states [N, c, d]; 0 where
    mask is False (`where`, not a product: a padding token may lie outside the nucleus, and 0·−inf = nan)."""
    logp = policy_logprobs(head(hidden), opts.temperature, opts.top_p)
    token_logp = torch.where(mask, logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), 0.0)
    entropy = None
    if opts.entropies or coef_a is not None:
        entropy = torch.where(mask, entropy_from_logprobs(logp), 0.0)
    surrogate = None if coef_a is None else coef_a * entropy + coef_c * token_logp
    top1 = margin = None
    if opts.features:
        top1, margin = (torch.where(mask, f, 0.0) for f in distribution_features(logp))
    return token_logp, entropy if opts.entropies else None, top1, margin, surrogate


def _frozen_linear(head: torch.nn.Module) -> bool:
    """A plain nn.Linear LM head with no trainable parameter (the usual LoRA setup: adapters in the decoder)."""
    return type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters())


class _FrozenHeadScores(torch.autograd.Function):
    """(ℓ, H, surrogate) [N, c] of one chunk from hidden states h [N, c, d] through a frozen Linear head z = W h + b.

    ℓ_t and H_t depend on position t's own h_t only, so their gradients w.r.t. h_t are d-vectors that the
    forward computes while the [N, c, V] tensors are at hand (u = z/T, p = π, nucleus held constant):

        ∂ℓ_t/∂h_t = (W_y − Σ_v p_v W_v) / T                (W_y: 0 if the token lies outside the nucleus)
        ∂H_t/∂h_t = −Σ_v p_v (log p_v + H_t) W_v / T
        ∂(a H_t + c ℓ_t)/∂h_t = (c W_y − Σ_v p_v (c + a (log p_v + H_t)) W_v) / T     (the surrogate: one product)

    The backward is then the incoming gradients times these vectors: no [N, c, V] tensor is kept or
    recomputed (checkpointing a chunk would redo the head's matmul and softmax). It is linear in the incoming
    gradients, so the double-backward tangents (docs/math.md §6.1) work through it. Only outputs that need
    a gradient get a vector (each costs one [c, V]×[V, d] product); the others are non-differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, coef_a, coef_c, opts: _HeadOptions):
        z = torch.nn.functional.linear(hidden, weight, bias)
        logp = policy_logprobs(z, opts.temperature, opts.top_p)
        del z
        p = logp.exp()
        m = mask.unsqueeze(-1)
        token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        w_y = torch.where((token_logp.isfinite() & mask).unsqueeze(-1), weight[targets], 0.0).to(p.dtype)
        token_logp = torch.where(mask, token_logp, 0.0)

        def through_head(weights_v):  # Σ_v weights_v W_v / T, in the head's dtype for the product
            return (weights_v.to(weight.dtype) @ weight).to(p.dtype) / opts.temperature

        surrogate = coef_a is not None
        outputs, vectors, differentiable = [token_logp], [], []
        if opts.logprob_grad or not surrogate:
            vectors.append((w_y / opts.temperature - through_head(p)) * m)
            differentiable.append(0)
        features = distribution_features(logp) if opts.features else None
        if opts.entropies or surrogate:
            # each [N, c, V] pass counts at a 152k vocabulary: log π is overwritten in place, 0 outside the
            # support (π log π = 0 there; 0·−inf would be nan), and the products below are fused where possible
            logp.masked_fill_(logp == float("-inf"), 0.0)
            entropy = -(p * logp).sum(-1)
            h_col = entropy.unsqueeze(-1)
        if opts.entropies:
            outputs.append(torch.where(mask, entropy, 0.0))
            if not surrogate:
                vectors.append(-through_head(torch.add(logp, h_col).mul_(p)) * m)
                differentiable.append(len(outputs) - 1)
        if surrogate:
            a, c = coef_a.unsqueeze(-1).to(p.dtype), coef_c.unsqueeze(-1).to(p.dtype)
            outputs.append(torch.where(mask, coef_a * entropy + coef_c * token_logp, 0.0))
            mixed = torch.addcmul(c + a * h_col, a, logp).mul_(p)  # p_v (c + a (log p_v + H))
            vectors.append((c * w_y / opts.temperature - through_head(mixed)) * m)
            differentiable.append(len(outputs) - 1)
        if features is not None:
            outputs += [torch.where(mask, f, 0.0) for f in features]
        ctx.mark_non_differentiable(*(x for i, x in enumerate(outputs) if i not in differentiable))
        ctx.save_for_backward(*vectors)
        ctx.differentiable = differentiable
        ctx.hidden_dtype = hidden.dtype
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        grad = None
        for index, vector in zip(ctx.differentiable, ctx.saved_tensors):
            g = grad_outputs[index]
            if g is not None:
                term = g.unsqueeze(-1).to(vector.dtype) * vector
                grad = term if grad is None else grad + term
        return grad if grad is None else grad.to(ctx.hidden_dtype), *([None] * 7)


def _score_columns_frozen_head(head, opts: _HeadOptions, hidden, targets, mask, coef_a=None, coef_c=None):
    """`_score_columns` through `_FrozenHeadScores` (same values, gradient w.r.t. the hidden states only)."""
    out = list(_FrozenHeadScores.apply(hidden, head.weight, head.bias, targets, mask, coef_a, coef_c, opts))
    token_logp = out.pop(0)
    entropy = out.pop(0) if opts.entropies else None
    surrogate = out.pop(0) if coef_a is not None else None
    top1, margin = (out[0], out[1]) if opts.features else (None, None)
    return token_logp, entropy, top1, margin, surrogate


def _join(chunks: list, n_resp: int) -> torch.Tensor | None:
    """The chunks' [N, c] pieces side by side, zero-padded on the right to R columns (None stays None)."""
    if chunks[0] is None:
        return None
    out = torch.cat(chunks, dim=1)
    pad = n_resp - out.shape[1]
    return torch.cat([out, out.new_zeros(out.shape[0], pad)], dim=1) if pad else out


def chunk_tokens(head: torch.nn.Module, logits_chunk_mb: float) -> int:
    """Tokens per vocabulary chunk: logits_chunk_mb MiB of [tokens × V] logits in float32 (float64 for a
    float64 head), at least 1."""
    if not logits_chunk_mb > 0:
        raise ValueError(f"logits_chunk_mb must be > 0, got {logits_chunk_mb}")
    linear = getattr(head, "base_layer", head)
    n_vocab = getattr(linear, "out_features", None) or linear.weight.shape[0]  # (a 4-bit weight is packed)
    width = max(4, torch.empty((), dtype=linear.weight.dtype).element_size())
    return max(1, int(logits_chunk_mb * 2**20 // (n_vocab * width)))


# causal LMs of transformers whose forward is exactly `logits = lm_head(model(...).last_hidden_state)`: no
# soft-capping, logit scale or other op after the head (checked in their modeling code); others score unchunked
PLAIN_HEAD_MODEL_TYPES = frozenset({"qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "llama", "mistral"})


def split_lm_head(model) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, LM head) with logits = head(decoder(...).last_hidden_state), or None when the model's head
    may do more than that Linear (or its type is not one of PLAIN_HEAD_MODEL_TYPES).

    A PeftModel is unwrapped with get_base_model(); the LoRA layers sit inside the base model's modules, so
    calling the decoder and the head (itself possibly a LoRA layer) runs the adapter as the full forward does.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    if getattr(config, "final_logit_softcapping", None) is not None:  # defensive: none of those types has one
        return None
    head = base.get_output_embeddings()
    linear = getattr(head, "base_layer", head)  # a LoRA-wrapped head computes base_layer(x) + s·B(A(x))
    if not isinstance(linear, torch.nn.Linear):
        return None
    return base.get_decoder(), head


def is_fsdp(model: torch.nn.Module) -> bool:
    """Whether `model` is sharded by FSDP2 (compute.shard fsdp). Its root's forward gathers the embedding, final
    norm and head, so it is scored through that forward (`teacher_force_unchunked`: the [N, R, V] logits of a
    microbatch at once, bounded by compute.max_tokens_per_microbatch), never by calling decoder and head apart."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


_warned: set[str] = set()


def _warn_unchunked(model) -> None:
    name = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
    if name not in _warned:
        _warned.add(name)
        log.warning(
            "teacher forcing: %s is not known to compute logits = lm_head(hidden states) alone; scoring it "
            "unchunked (every [tokens × vocabulary] tensor of a microbatch stays in memory)",
            name,
        )


def teacher_force_unchunked(
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
    coefs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> TokenStats:
    """`teacher_force` through the model's own forward (`logits_to_keep`), the whole [N, R, V] block at once:
    for models `split_lm_head` does not know, and the reference the chunked path is tested against."""
    n_prompt, n_cols = n_prompt_cols, input_ids.shape[1]
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    keep = torch.arange(n_prompt - 1, n_cols - 1, device=input_ids.device)
    with torch.set_grad_enabled(with_grad):
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=keep,
            use_cache=False,
        ).logits  # [N, R, V]
        mask = response_mask.bool()
        opts = _HeadOptions(temperature, top_p, entropies, features)
        stats = _score_columns(lambda x: x, opts, logits, input_ids[:, n_prompt:], mask, *(coefs or (None, None)))
    return TokenStats(*stats[:4], mask=mask, surrogate=stats[4])


def token_budget_slices(n_rows: int, row_len: int, max_tokens: int) -> list[slice]:
    """Consecutive row ranges with rows·row_len ≤ max_tokens each (at least one row per range)."""
    per = max(1, max_tokens // max(1, row_len))
    return [slice(start, min(start + per, n_rows)) for start in range(0, n_rows, per)]


@contextlib.contextmanager
def true_embedding_gradients(model: torch.nn.Module):
    """Inside the block, the gradient of a trainable embedding's `padding_idx` row is its true derivative.

    nn.Embedding zeroes that row's gradient by design (the forward still reads the row), so when the pad
    token is an input at a real position (the policy may generate it) autograd's ∇ is not the derivative of
    the entropy, and ∇H·Δθ misses the row's weight-decay step. The E passes (X̄) and exact enumeration need the
    true ∇H; the U gradient keeps the trainer's semantics (its AdamW never saw that row's gradient).
    """
    touched = [
        (m, m.padding_idx)
        for m in model.modules()
        if isinstance(m, torch.nn.Embedding) and m.padding_idx is not None and m.weight.requires_grad
    ]
    for module, _ in touched:
        module.padding_idx = None
    try:
        yield
    finally:
        for module, index in touched:
            module.padding_idx = index
