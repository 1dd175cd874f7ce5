"""The passes over E and U that δH₁ is made of (docs/math.md §4–§6); `delta_h1.compute_delta_h1` runs them.

Passes over the data (each in token-budget microbatches, `scoring.Batch.scored`):
  1. U, one ordinary backward: g = ∇J = ∇ Σ c_ij logp_ij (policy gradient, §4.2) and, with `GroupGradients`
     hooks, the per-prompt-group gradients g_b (Σ_b g_b = g) when B × trainable parameters fit
     `u_cache_mb` and the hooks know every module using a trainable tensor (Linear/LoRA, embedding, RMSNorm).
  2.              Δθ = update(g)                                   (adam_step | adam_precond | sgd, §4.4–4.5)
     or Δθ given (an observed step θ(next) − θ(this); then there is no U batch).
  3. E, one ordinary backward: X̄ = ∇ Σ_i w_i Σ_k (a_ik H_ik + c_ik logp_ik) (the true gradient: an embedding's
     padding row included, `true_embedding_gradients`) for estimator.entropy and, with
     `RowDirectional` hooks, every row's w_i X_i·Δθ (§6.2) — SE_E and the E attributions; for token_mean a
     second backward through the same graph gives β = ∇E[L]·Δθ for the delta method (§5.1).
     `all_targets`: instead per-token tangents dH_ik, dlogp_ik by double backward (§6.1), which give all
     three targets and the naive estimate, at about twice the memory.
  4. SE_U and the U attributions (§5.2): with the group gradients, a jackknife over prompt groups through
     the real update rule (clipping and Adam included) and leave-one-group-out attributions — no further
     pass; without them, the delta method from one more U backward with `RowDirectional` hooks along
     u = (∂Δθ/∂g)ᵀ X̄. With fewer than two groups of non-zero advantage SE_U cannot be estimated (None).
No per-sample parameter-sized gradient is ever formed. Sums are kept in the trainable parameters' dtype
promoted to at least float32 (float32 for float32/half models, float64 for a float64 model).

Under torchrun every process runs each pass over its share of the rows (`Batch.shard`) and all-reduces
the sums, so every process ends with the one-process results (up to summation order).
"""

from __future__ import annotations

import torch

from .estimators import EntropyCoefs
from .loss_terms import UCoefficients
from .policy import true_embedding_gradients
from .scoring import Batch, accumulation_dtype
from .sharded import as_dtensors, local_tensor
from .tangents import GroupGradients, RowDirectional, grad_and_tangents
from .update import FlatLayout


def _add_flat(acc: torch.Tensor, grads, params) -> None:
    """acc += the gradients laid out flat (acc's dtype), parameter by parameter into views of acc (no flat copy of
    the gradients); None (a parameter off the outputs' path) adds nothing. Under FSDP (`sharded`) each gradient
    and each stretch of acc is this process's shard."""
    for view, x in zip(acc.split([local_tensor(p).numel() for p in params]), grads):
        if x is not None:
            view += x.reshape(-1)


def gradients(outputs, params, grad_outputs=None, retain_graph: bool = False) -> list:
    """∇_params Σ outputs·grad_outputs, None for a parameter off the outputs' path (`torch.autograd.grad`).

    FSDP parameters (DTensors, compute.shard fsdp) are not leaves of the graph (their gathered copies are), so
    there the gradient goes through an ordinary backward into `.grad`, whose reduce-scatter sums every process's
    rows into each process's shard (`sharded.shard_policy` sets the sum, not the mean), and is taken from there:
    the shards are returned and `.grad` is cleared."""
    if not hasattr(params[0], "to_local"):
        return list(torch.autograd.grad(outputs, params, grad_outputs, retain_graph=retain_graph, allow_unused=True))
    torch.autograd.backward(outputs, grad_outputs, retain_graph=retain_graph)
    out = []
    for p in params:
        out.append(None if p.grad is None else p.grad.to_local())  # the shard outlives the cleared .grad
        p.grad = None
    return out


def backward_into(outputs, params, acc: torch.Tensor | None, grad_outputs=None, retain_graph: bool = False) -> bool:
    """acc += ∇_params Σ outputs·grad_outputs laid out flat (`_add_flat`; acc None: the gradients are discarded, for
    a backward that only feeds row hooks); True when some parameter got a gradient.

    Each parameter's gradient is added into its stretch of acc the moment autograd has it and then freed (a hook
    after accumulation), so a backward holds one parameter's gradient at a time, not a parameter-sized list of
    them: for a full-parameter model 4 bytes per parameter less than `gradients`. The parameters' own `.grad` is
    left as it was. FSDP parameters (DTensors) go through `gradients` (their reduce-scatter fills `.grad`)."""
    if hasattr(params[0], "to_local"):
        grads = gradients(outputs, params, grad_outputs, retain_graph=retain_graph)
        if acc is not None:
            _add_flat(acc, grads, params)
        return any(g is not None for g in grads)
    views = [None] * len(params) if acc is None else acc.split([p.numel() for p in params])
    saved = [p.grad for p in params]
    got = []

    def taken(view):
        def hook(p):
            got.append(True)
            if view is not None:
                view.add_(p.grad.reshape(-1))
            p.grad = None

        return hook

    handles = []
    try:
        for p, view in zip(params, views):
            p.grad = None
            handles.append(p.register_post_accumulate_grad_hook(taken(view)))
        inputs = [p for p in params if p.requires_grad]
        torch.autograd.backward(outputs, grad_outputs, retain_graph=retain_graph, inputs=inputs)
    finally:
        for handle, p, grad in zip(handles, params, saved):
            handle.remove()
            p.grad = grad
    return bool(got)


def as_direction(flat: torch.Tensor, layout: FlatLayout, params) -> list[torch.Tensor]:
    """A flat vector as per-parameter tensors in the parameters' dtypes (for the hooks and tangents); for FSDP
    parameters (a flat vector of this process's shards) DTensors the hooks gather one at a time."""
    dtype = accumulation_dtype(params[0])
    parts = [d.to(p.dtype) for d, p in zip(layout.unflatten(flat.to(dtype)).values(), params)]
    return as_dtensors(parts, params) if hasattr(params[0], "to_local") else parts


def _coefficients(coefs: UCoefficients | torch.Tensor) -> UCoefficients:
    """J's coefficients; a plain [N, R] tensor c is J = Σ c_ij logp_ij (no entropy bonus)."""
    return coefs if isinstance(coefs, UCoefficients) else UCoefficients(coefs)


def _u_scored(model, U: Batch, coefs: UCoefficients, max_tokens: int, desc: str):
    """U's microbatches, scored with a graph for the outputs `coefs` weighs (ℓ, and H under an entropy bonus)."""
    return U.scored(model, max_tokens, desc, with_grad=True, entropies=coefs.needs_entropies)


def policy_gradient(
    model, params, layout: FlatLayout, U: Batch, coefs: UCoefficients | torch.Tensor, max_tokens: int
) -> torch.Tensor:
    """g = ∇_θ J = ∇_θ Σ_ij (c_ij logp_ij [+ β_H w_ij H_ij]) over U (`loss_terms`), flat in the accumulation dtype."""
    coefs = _coefficients(coefs)
    dtype = accumulation_dtype(params[0])
    g = torch.zeros(layout.numel, dtype=dtype, device=coefs.logp.device)
    for rows, stats in _u_scored(model, U, coefs, max_tokens, "U gradient"):
        backward_into(coefs.outputs(stats), params, g, coefs.rows(rows))
    return U.reduce_params(g)


def group_gradients(
    model, params, names, U: Batch, coefs: UCoefficients | torch.Tensor, groups: torch.Tensor, max_tokens: int
):
    """(g flat, g_b [B, P]) from one ordinary backward per microbatch with `GroupGradients` hooks.

    `groups` [N]: every U row's group number 0..B−1. Σ_b g_b = g up to summation order.
    """
    coefs = _coefficients(coefs)
    dtype = accumulation_dtype(params[0])
    g = torch.zeros(sum(local_tensor(p).numel() for p in params), dtype=dtype, device=coefs.logp.device)
    hooks = GroupGradients(model, names, int(groups.max()) + 1)
    with hooks:
        for rows, stats in _u_scored(model, U, coefs, max_tokens, "U gradient"):
            hooks.rows_group = groups[rows]
            backward_into(coefs.outputs(stats), params, g, coefs.rows(rows))
    return U.reduce_params(g), U.reduce(hooks.flat(names))


def entropy_rows(
    model, params, names, E: Batch, coefs: EntropyCoefs, direction, max_tokens: int, stacked: bool = False
):
    """(X̄ flat, w_i X_i·v per row [N], β or None) for one target from ordinary backwards with row hooks.

    X̄ = ∇ Σ_i w_i Σ_k (a_ik H_ik + c_ik logp_ik); the hooks give each row's share of X̄·v. token_mean's
    delta method also needs β = Σ_i w_i Σ_j len_c_ij dlogp_ij = v·∇ Σ w len_c logp: a second backward
    through the same graph (`retain_graph`), hooks only.
    `stacked`: direction tensors [K, *param.shape] (K alternative updates v_k, `RowDirectional`), then the
    rows are [N, K] (w_i X_i·v_k) and β is [K] — SE_E for K what-if updates from the one pass over E.
    """
    dtype = accumulation_dtype(params[0])
    w = coefs.weights.unsqueeze(1).to(coefs.a.dtype)
    a, c = (coefs.a * w).to(dtype), (coefs.c * w).to(dtype)
    len_c = None if coefs.len_c is None else (coefs.len_c * w).to(dtype)
    xbar = torch.zeros(sum(local_tensor(p).numel() for p in params), dtype=dtype, device=a.device)
    k = (direction[0].shape[0],) if stacked else ()
    rows_out = torch.zeros((len(E), *k), dtype=dtype, device=a.device)
    beta = torch.zeros(k, dtype=dtype, device=a.device)
    hooks = RowDirectional(model, names, direction, stacked=stacked)
    beta_pass = len_c is not None
    with hooks, true_embedding_gradients(model):
        passes = E.scored(
            model, max_tokens, "E gradient", with_grad=True, entropies=False, coefs=(a, c), logprob_grad=beta_pass
        )
        for rows, stats in passes:
            got = backward_into(stats.surrogate.sum(), params, xbar, retain_graph=beta_pass)
            rows_out[rows] = _taken(hooks, got)
            if beta_pass:  # the hooks' sums only: the parameters' gradients are discarded as they come
                got = backward_into([stats.logprobs], params, None, [len_c[rows]])
                beta += _taken(hooks, got).sum(0)  # over the rows: [] or stacked [K]
    return E.reduce_params(xbar), E.reduce(rows_out), (E.reduce(beta) if beta_pass else None)


# bytes of stacked directions (K × trainable parameters) one E backward carries; more directions take more passes
STACKED_BYTES = 1 << 30


def influence_along(
    model, E: Batch, layout: FlatLayout, coefs: EntropyCoefs, along: list[torch.Tensor], max_tokens: int
):
    """[N, K] influence values ψ_i (`EntropyCoefs.influence`, §5.1) of X̄·v_k for K flat directions v_k at the
    model's current θ: one E backward with stacked row hooks (§6.2) per STACKED_BYTES of directions (per-token
    tangents, one pass per direction, where a module using a trainable tensor has no hook rule)."""
    named = dict(model.named_parameters())
    params = [named[n] for n in layout.names]
    dtype = accumulation_dtype(params[0])
    if not RowDirectional.supports(model, layout.names):
        columns = []
        for v in along:
            direction = [d.to(p.dtype) for d, p in zip(layout.unflatten(v.to(dtype)).values(), params)]
            _, dH, dlogp = entropy_pass(model, params, layout, E, coefs, direction, max_tokens)
            columns.append(coefs.influence(dH, dlogp))
        return torch.stack(columns, dim=1)
    per_pass = max(1, STACKED_BYTES // (layout.numel * params[0].element_size()))
    columns = []
    for start in range(0, len(along), per_pass):
        chunk = along[start : start + per_pass]
        split = [[d.to(p.dtype) for d, p in zip(layout.unflatten(v.to(dtype)).values(), params)] for v in chunk]
        stacked = [torch.stack(parts) for parts in zip(*split)]
        _, ws, beta = entropy_rows(model, params, layout.names, E, coefs, stacked, max_tokens, stacked=True)
        columns += [coefs.influence_from_rows(ws[:, k], None if beta is None else beta[k]) for k in range(len(chunk))]
    return torch.stack(columns, dim=1)


def _taken(hooks: RowDirectional, got_gradients: bool) -> torch.Tensor | float:
    """The hooks' per-row sums of the last backward ([rows], stacked [rows, K]); 0 only when no parameter got a
    gradient either."""
    taken = hooks.take()  # None: no hooked layer is on the path to these outputs
    if taken is None and got_gradients:  # the hooks missed a path: never report 0
        raise RuntimeError("RowDirectional hooks did not fire although the parameters got gradients")
    return 0.0 if taken is None else taken


def entropy_pass(model, params, layout, E: Batch, coefs: EntropyCoefs, direction, max_tokens: int):
    """(X̄ flat, dH [N,R], dlogp [N,R]) with X̄ = ∇ Σ_i w_i Σ_k (a H + c logp), tangents along direction
    (direction None: X̄ alone, tangents None)."""
    dtype = accumulation_dtype(params[0])
    w = coefs.weights.unsqueeze(1).to(coefs.a.dtype)
    a, c = (coefs.a * w).to(dtype), (coefs.c * w).to(dtype)
    xbar = torch.zeros(layout.numel, dtype=dtype, device=a.device)
    with true_embedding_gradients(model):
        if direction is None:  # X̄ alone: one backward of the surrogate a·H + c·ℓ (one head product per chunk)
            passes = E.scored(
                model, max_tokens, "E gradient", with_grad=True, entropies=False, coefs=(a, c), logprob_grad=False
            )
            for _, stats in passes:
                backward_into(stats.surrogate.sum(), params, xbar)
            return E.reduce_params(xbar), None, None
        dH, dlogp = torch.zeros_like(a), torch.zeros_like(a)
        for rows, stats in E.scored(model, max_tokens, "E gradient", with_grad=True):
            grads, (dH[rows], dlogp[rows]) = grad_and_tangents(
                [stats.entropies, stats.logprobs], [a[rows], c[rows]], params, direction
            )
            _add_flat(xbar, grads, params)
    return E.reduce_params(xbar), E.reduce(dH), E.reduce(dlogp)  # tangents: rows of other shards are 0 here


def u_row_terms(
    model, params, names: list[str], U: Batch, coefs: UCoefficients | torch.Tensor, direction, max_tokens: int
):
    """row_i = ∇_θ J_i · direction for every U row (J_i: row i's terms of J), [N] — all the U attributions need.

    One ordinary backward per microbatch with `RowDirectional` hooks when every trainable parameter is a
    Linear/LoRA, embedding or RMSNorm tensor; otherwise per-token tangents by double backward (`u_token_terms`).
    """
    coefs = _coefficients(coefs)
    rows_out = torch.zeros(len(U), dtype=accumulation_dtype(params[0]), device=coefs.logp.device)
    if not RowDirectional.supports(model, names):
        return U.reduce(u_token_terms(model, params, U, coefs, direction, max_tokens)[0].sum(-1))
    with RowDirectional(model, names, direction) as hooks:
        for rows, stats in _u_scored(model, U, coefs, max_tokens, "U tangents"):
            got = backward_into(coefs.outputs(stats), params, None, coefs.rows(rows))
            rows_out[rows] = _taken(hooks, got)
    return U.reduce(rows_out)


def u_token_terms(model, params, U: Batch, coefs: UCoefficients | torch.Tensor, direction, max_tokens: int):
    """(a [N, R], H [N, R]): every U token's share a_ij = c_ij ∇ℓ_ij·v (+ β_H w_ij ∇H_ij·v) of ∇J·v, and the
    policy's entropy H_ij at that position (detached), from per-token tangents by double backward (§6.1).

    Σ_ij a_ij = ∇J·v: with v = u = (∂Δθ/∂g)ᵀ X̄ these are the tokens' shares of δH₁'s linearised gradient part.
    """
    coefs = _coefficients(coefs)
    dtype = accumulation_dtype(params[0])
    a = torch.zeros(U.mask.shape, dtype=dtype, device=coefs.logp.device)
    entropies = torch.zeros_like(a)
    for rows, stats in U.scored(model, max_tokens, "U tokens", with_grad=True, entropies=True):
        ones = [U.mask[rows].to(dtype)] * len(coefs.outputs(stats))
        _, tangents = grad_and_tangents(coefs.outputs(stats), ones, params, direction)
        a[rows] = sum(c * t for c, t in zip(coefs.rows(rows), tangents))
        entropies[rows] = stats.entropies.detach().to(dtype)
    return U.reduce(a), U.reduce(entropies)


def token_advantage_covariance(logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> float:
    """Cui et al. (2025) diagnostic: Cov(log π(y_t), A_t) over the U batch's response tokens (§5.5)."""
    logp = logprobs[mask].double()
    adv = advantages.unsqueeze(1).expand_as(mask)[mask].double()
    return ((logp - logp.mean()) * (adv - adv.mean())).mean().item()
