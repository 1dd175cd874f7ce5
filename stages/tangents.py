"""Per-token gradients and directional derivatives in one pass, without per-sample gradients.

For per-token outputs y_t(θ) (RB entropies H_t and log-probs log π_t) and coefficient tensors c_t:

    grad      = ∇_θ Σ_t c_t · y_t(θ)              (one reverse pass)
    tangent_t = ∇_θ y_t(θ) · v                     (directional derivative of every token along v)

The tangents use the double-backward trick (SPEC §3): make the coefficients a leaf w that requires
grad, take grad = J(θ)ᵀ w with create_graph, then ∂(grad · v)/∂w = J(θ) v. Unlike forward-mode
`torch.func.jvp` this works through eager, SDPA and bitsandbytes 4-bit (QLoRA) models alike.
"""

from __future__ import annotations

import torch


def grad_and_tangents(
    outputs: list[torch.Tensor],
    coefficients: list[torch.Tensor],
    params: list[torch.Tensor],
    direction: list[torch.Tensor] | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Return (∇_θ Σ_j Σ_t c_jt y_jt per param, [∇y_j · v per token] or None when direction is None).

    outputs[j] and coefficients[j] have the same shape; `direction` is a list shaped like `params`.
    """
    leaves = [c.detach().clone().requires_grad_(direction is not None) for c in coefficients]
    grads = torch.autograd.grad(
        outputs, params, grad_outputs=leaves, create_graph=direction is not None, allow_unused=True
    )
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    if direction is None:
        return grads, None
    directional = sum((g.float() * v.float()).sum() for g, v in zip(grads, direction))
    tangents = torch.autograd.grad(directional, leaves, allow_unused=True)
    tangents = [torch.zeros_like(c) if t is None else t for t, c in zip(tangents, coefficients)]
    return [g.detach() for g in grads], [t.detach() for t in tangents]
