"""Per-token gradients and directional derivatives in one pass, without per-sample gradients.

For per-token outputs y_t(θ) (RB entropies H_t and log-probs log π_t) and coefficient tensors c_t:

    grad      = ∇_θ Σ_t c_t · y_t(θ)              (one reverse pass)
    tangent_t = ∇_θ y_t(θ) · v                     (directional derivative of every token along v)

The tangents use the double-backward trick (docs/math.md §6.1): make the coefficients a leaf w that
requires grad, take grad = J(θ)ᵀ w with create_graph, then ∂(grad · v)/∂w = J(θ) v. Unlike forward-mode
`torch.func.jvp` this works through bitsandbytes 4-bit (QLoRA) layers. Every op on the path needs a
double backward: SDPA's CPU kernel has none, so models are loaded with eager attention
(`checkpoint.load_policy_model`, `tiny.build_model`). `RowDirectional` (§6.2) needs no double backward.
"""

from __future__ import annotations

import torch


def _at_least_float32(t: torch.Tensor) -> torch.dtype:
    """The dtype to sum t in: float32 for half precision, t's own dtype for float32 and float64."""
    return torch.promote_types(t.dtype, torch.float32)


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
    # in float32 or better: half-precision grads are summed in float32, float64 ones stay float64
    dtypes = [_at_least_float32(g) for g in grads]
    directional = sum((g.to(d) * v.to(d)).sum() for g, v, d in zip(grads, direction, dtypes))
    tangents = torch.autograd.grad(directional, leaves, allow_unused=True)
    tangents = [torch.zeros_like(c) if t is None else t for t, c in zip(tangents, coefficients)]
    return [g.detach() for g in grads], [t.detach() for t in tangents]


class _LinearHooks:
    """Forward hooks on the Linear modules that own trainable weights/biases; subclasses build `_hook(parts)`.

    `parts` maps "weight"/"bias" to what the subclass attaches to that parameter (a direction, a name).
    Use as a context manager: the hooks are removed on exit.
    """

    def __init__(self, model: torch.nn.Module, names: list[str], values: list):
        modules = dict(model.named_modules())
        by_module: dict[str, dict] = {}
        for name, value in zip(names, values):
            module_name, kind = name.rsplit(".", 1)
            by_module.setdefault(module_name, {})[kind] = value
        self.plan = [(modules[m], parts) for m, parts in by_module.items()]
        self.handles: list = []

    @staticmethod
    def supports(model: torch.nn.Module, names: list[str]) -> bool:
        """Whether every name is the weight or bias of an nn.Linear (LoRA A/B are)."""
        modules = dict(model.named_modules())
        for name in names:
            module_name, kind = name.rsplit(".", 1)
            if kind not in ("weight", "bias") or not isinstance(modules.get(module_name), torch.nn.Linear):
                return False
        return True

    def __enter__(self):
        for module, parts in self.plan:
            self.handles.append(module.register_forward_hook(self._hook(parts)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, parts: dict):
        raise NotImplementedError


class RowDirectional(_LinearHooks):
    """Per-row directional derivatives ⟨∇_θ Σ_t c_t y_t(row i), v⟩ for all rows from ONE ordinary backward.

    Rows of a batch never interact (attention stays within a row), and for a Linear layer y = x Wᵀ + b
    row i's gradient is G_i = Σ_{p ∈ row i} δ_p x_pᵀ (and Σ_p δ_p for b), δ_p = ∂L/∂y_p. So

        ⟨G_i, V⟩ = Σ_p δ_p · (x_p Vᵀ),      ⟨g_i^b, v_b⟩ = Σ_p δ_p · v_b

    need only the layer's input x (forward hook) and δ (a hook on the output's gradient): no per-row
    gradient, no double backward, no forward-mode AD, and a frozen (even 4-bit) base is never touched.
    Works when every trainable parameter is the weight or bias of an nn.Linear (LoRA A/B are);
    `supports` tells. Use: `with RowDirectional(model, names, direction) as rd:` … backward … `rd.take()`.
    """

    def __init__(self, model: torch.nn.Module, names: list[str], direction: list[torch.Tensor]):
        super().__init__(model, names, direction)
        self.acc: torch.Tensor | None = None

    def _hook(self, parts: dict[str, torch.Tensor]):
        def forward_hook(module, inputs, output):
            if not output.requires_grad:
                return
            # keep the smaller of x [.., in] and x·Vᵀ [.., out] until the backward reaches this layer:
            # for LoRA that is r numbers per token for A (x·V_Aᵀ) and for B (its input A·x)
            x = inputs[0].detach()
            weight = parts.get("weight")
            x_vt = None
            if weight is not None and weight.shape[0] <= weight.shape[1]:
                x_vt, x = x @ weight.to(x.dtype).T, None

            def on_grad(delta):
                acc = _at_least_float32(delta)  # float32 for half-precision models, float64 for float64 ones
                dots = torch.zeros(delta.shape[0], dtype=acc, device=delta.device)
                if weight is not None:
                    projected = x_vt if x_vt is not None else x @ weight.to(x.dtype).T
                    dots += (delta * projected).flatten(1).sum(-1, dtype=acc)
                if "bias" in parts:
                    dots += (delta * parts["bias"].to(delta.dtype)).flatten(1).sum(-1, dtype=acc)
                self.acc = dots if self.acc is None else self.acc + dots

            output.register_hook(on_grad)

        return forward_hook

    def take(self) -> torch.Tensor | None:
        """The per-row sums accumulated since the last take (None if no hooked layer saw a gradient)."""
        out, self.acc = self.acc, None
        return out


class GroupGradients(_LinearHooks):
    """Per-group gradients G_b = Σ_{i ∈ group b} ∇_θ Σ_t c_t y_t(row i) of Linear weights/biases, from the
    same ordinary backward that gives the batch gradient (docs/math.md §5.2).

    As in `RowDirectional`, row i's gradient of a Linear layer is Σ_{p ∈ row i} δ_p x_pᵀ (bias: Σ_p δ_p), so
    a forward hook keeps x and a hook on the output's gradient adds each row's outer products into its
    group's slot (index_add over rows). Memory: n_groups × trainable parameters, in float32 or better.
    Set `rows_group` (the group id of every row of the current microbatch) before each backward.
    """

    def __init__(self, model: torch.nn.Module, names: list[str], n_groups: int):
        super().__init__(model, names, names)
        self.rows_group: torch.Tensor | None = None
        params = dict(model.named_parameters())
        self.sums = {
            n: torch.zeros((n_groups, *params[n].shape), dtype=_at_least_float32(params[n]), device=params[n].device)
            for n in names
        }

    def _hook(self, parts: dict[str, str]):
        def forward_hook(module, inputs, output):
            if not output.requires_grad:
                return
            x = inputs[0].detach()

            def on_grad(delta):
                groups = self.rows_group  # read at backward time: set after the forward, before the backward
                if "weight" in parts:
                    target = self.sums[parts["weight"]]
                    rows = torch.einsum("n...o,n...i->noi", delta.to(target.dtype), x.to(target.dtype))
                    target.index_add_(0, groups, rows)
                if "bias" in parts:
                    target = self.sums[parts["bias"]]
                    target.index_add_(
                        0, groups, delta.to(target.dtype).reshape(delta.shape[0], -1, delta.shape[-1]).sum(1)
                    )

            output.register_hook(on_grad)

        return forward_hook

    def flat(self, names: list[str]) -> torch.Tensor:
        """[n_groups, Σ numel] in the order of `names` (a FlatLayout's)."""
        return torch.cat([self.sums[n].flatten(1) for n in names], dim=1)
