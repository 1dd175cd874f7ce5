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


# RMSNorms whose forward is w ⊙ x̂, x̂ = x / sqrt(mean(x²) + eps) computed in ≥ float32 and cast back (the
# Qwen2/Qwen3/Llama/Mistral families of transformers); others (e.g. Gemma's (1 + w) ⊙ x̂) get no hook
PLAIN_RMSNORMS = frozenset(
    {"Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm", "LlamaRMSNorm", "MistralRMSNorm"}
)


def _kind(module: torch.nn.Module, parts: set[str]) -> str | None:
    """Which per-row rule a module owning trainable tensors `parts` follows (None: no hook knows it)."""
    if isinstance(module, torch.nn.Linear) and parts <= {"weight", "bias"}:
        return "linear"
    if isinstance(module, torch.nn.Embedding) and module.max_norm is None and parts == {"weight"}:
        return "embedding"
    if type(module).__name__ in PLAIN_RMSNORMS and parts == {"weight"}:
        return "rmsnorm"
    return None


def normalised(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x̂ = x / sqrt(mean(x²) + eps) as the plain RMSNorms compute it (in ≥ float32, cast back to x's dtype)."""
    wide = x.to(torch.promote_types(x.dtype, torch.float32))
    return (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)).to(x.dtype)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A direction tensor whole: a DTensor shard (compute.shard fsdp) gathered from every process, in the forward
    or backward of the one module that reads it, so only one parameter's direction is whole at a time."""
    full_tensor = getattr(t, "full_tensor", None)
    return t if full_tensor is None else full_tensor()


def _looked_up(module: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """[.., 1] mask of the positions whose row gets a gradient (nn.Embedding gives its padding_idx row none)."""
    keep = torch.ones_like(ids, dtype=torch.bool) if module.padding_idx is None else ids != module.padding_idx
    return keep.unsqueeze(-1)


def _check_stacked(model: torch.nn.Module, names: list[str], direction: list[torch.Tensor]) -> None:
    """Stacked directions must be [K, *param.shape] with one K for every tensor."""
    params = dict(model.named_parameters())
    ks = {v.shape[0] if v.dim() else None for v in direction}
    if len(ks) != 1 or any(v.shape[1:] != params[n].shape for n, v in zip(names, direction)):
        shapes = {n: tuple(v.shape) for n, v in zip(names, direction)}
        raise ValueError(f"stacked directions must be [K, *param.shape] with one K; got {shapes}")


def _summed(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """[rows, K]: Σ over all but the row of a ⊙ b_k, a [rows, ..], b [K, rows, ..]; product in a's dtype, sum in acc."""
    return (a * b.to(a.dtype)).flatten(2).sum(-1, dtype=acc).T


def _position_sum(t: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """[rows, d]: Σ_p t_p over every position of each row, in acc."""
    return t.reshape(t.shape[0], -1, t.shape[-1]).sum(1, dtype=acc)


class _ParamHooks:
    """Forward hooks on every module that directly owns one of the named trainable tensors; subclasses build
    `_hook(kind, module, parts)`. A tensor two modules share (a head tied to the embedding) is hooked in both.

    Modules: nn.Linear (weight, bias; LoRA A/B are Linear), nn.Embedding (weight) and the plain RMSNorms
    (weight). `parts` maps "weight"/"bias" to what the subclass attaches to that tensor (a direction, a name).
    Use as a context manager: the hooks are removed on exit.
    """

    def __init__(self, model: torch.nn.Module, names: list[str], values: list):
        params = dict(model.named_parameters())
        by_id = {id(params[n]): value for n, value in zip(names, values)}
        self.plan = []
        for module in model.modules():
            parts = {k: by_id[id(p)] for k, p in module.named_parameters(recurse=False) if id(p) in by_id}
            if parts:
                self.plan.append((module, _kind(module, set(parts)), parts))
        self.handles: list = []

    @staticmethod
    def supports(model: torch.nn.Module, names: list[str]) -> bool:
        """Whether every module that uses one of the named tensors is one the hooks know."""
        params = dict(model.named_parameters())
        wanted = {id(params[n]) for n in names}
        for module in model.modules():
            parts = {k for k, p in module.named_parameters(recurse=False) if id(p) in wanted}
            if parts and _kind(module, parts) is None:
                return False
        return True

    def __enter__(self):
        for module, kind, parts in self.plan:
            self.handles.append(module.register_forward_hook(self._hook(kind, module, parts)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, kind: str, module: torch.nn.Module, parts: dict):
        raise NotImplementedError


class RowDirectional(_ParamHooks):
    """Per-row directional derivatives ⟨∇_θ Σ_t c_t y_t(row i), v⟩ for all rows from ONE ordinary backward.

    Rows of a batch never interact (attention stays within a row), so row i's gradient of a module's tensor is
    a sum over its positions p of δ_p = ∂L/∂y_p times what the forward read:

        Linear y = x Wᵀ + b:        ⟨G_i, V⟩ = Σ_p δ_p · (x_p Vᵀ),   ⟨g_i^b, v_b⟩ = Σ_p δ_p · v_b
        Embedding y = W[t]:         ⟨G_i, V⟩ = Σ_p δ_p · V[t_p]       (none at nn.Embedding's padding_idx)
        RMSNorm y = w ⊙ x̂:          ⟨g_i, v⟩ = Σ_p δ_p · (v ⊙ x̂_p)

    which need only the module's input (forward hook) and δ (a hook on the output's gradient): no per-row
    gradient, no double backward, no forward-mode AD, and a frozen (even 4-bit) base is never touched.
    `supports` tells whether every module using a trainable tensor is one of these.
    Use: `with RowDirectional(model, names, direction) as rd:` … backward … `rd.take()`.

    `stacked=True`: every direction tensor is [K, *param.shape] (one K for all) and `take()` gives [rows, K],
    ⟨G_i, V_k⟩ for K directions from the same backward (`_stacked_dots`); without it, [rows] as above.
    """

    def __init__(self, model: torch.nn.Module, names: list[str], direction: list[torch.Tensor], stacked: bool = False):
        super().__init__(model, names, direction)
        if stacked:
            _check_stacked(model, names, direction)
        self.stacked = stacked
        self.acc: torch.Tensor | None = None

    @staticmethod
    def _dots(kind: str, module, x: torch.Tensor, parts: dict) -> list:
        """Functions (δ, acc) ↦ [rows] ⟨G_i, V⟩ (products in the model's dtype, sums in acc), one per part.

        A sharded direction (DTensor) is gathered where it is read (`_full`): in the backward, or in the forward
        for a projection kept until then, so one parameter's direction is whole at a time; every process reaches
        these hooks in the same order."""

        def dot(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
            return (a * b.to(a.dtype)).flatten(1).sum(-1, dtype=acc)

        if kind == "embedding":
            return [
                lambda d, acc: dot(
                    d, torch.nn.functional.embedding(x, _full(parts["weight"])) * _looked_up(module, x), acc
                )
            ]
        if kind == "rmsnorm":
            return [lambda d, acc: dot(d, normalised(module, x) * _full(parts["weight"]).to(x.dtype), acc)]
        dots = []
        weight = parts.get("weight")
        if weight is not None:
            if weight.shape[0] <= weight.shape[1]:
                # out ≤ in: keep x·Vᵀ [.., out] from the forward (LoRA A: r numbers per token), not x [.., in]
                projected = x @ _full(weight).to(x.dtype).T
                dots.append(lambda d, acc: dot(d, projected, acc))
            else:
                # out > in (a head, LoRA B): contract on the input side at the backward, Σ_p (Vᵀ δ_p)·x_p — a
                # [.., in] temporary where x·Vᵀ would be [.., out] (for the head, a second logits-sized tensor)
                dots.append(lambda d, acc: dot(d @ _full(weight).to(d.dtype), x, acc))
        if "bias" in parts:
            dots.append(lambda d, acc: dot(d, _full(parts["bias"]).expand_as(d), acc))
        return dots

    def _hook(self, kind: str, module, parts: dict[str, torch.Tensor]):
        def forward_hook(module, inputs, output):
            if not output.requires_grad:
                return
            if self.stacked:
                output.register_hook(self._stacked_on_grad(kind, module, inputs[0].detach(), parts))
                return
            dots = self._dots(kind, module, inputs[0].detach(), parts)

            def on_grad(delta):
                acc = _at_least_float32(delta)  # float32 for half-precision models, float64 for float64 ones
                rows = sum(dot(delta, acc) for dot in dots)
                self.acc = rows if self.acc is None else self.acc + rows

            output.register_hook(on_grad)

        return forward_hook

    @staticmethod
    def _stacked_dots(kind: str, module, x: torch.Tensor, parts: dict) -> list:
        """Functions (δ, acc) ↦ [rows, K] ⟨G_i, V_k⟩ = Σ_p δ_p · a_kp for stacked V [K, *shape], one per part.

            Linear  Σ_p δ_p · (V_k x_p) = Σ_p (V_kᵀ δ_p) · x_p,   bias (Σ_p δ_p) · v_bk
            Embedding Σ_p δ_p · V_k[t_p],                         RMSNorm (Σ_p δ_p ⊙ x̂_p) · v_k

        Products in the model's dtype and sums in acc, as in the single-direction hooks.
        """
        if kind == "embedding":  # V[:, t]: [K, rows, .., d], a gather that copies nothing of V
            return [lambda d, acc: _summed(d * _looked_up(module, x), parts["weight"][:, x], acc)]
        if kind == "rmsnorm":  # the position sum first: one [rows, d] @ [d, K] product
            return [lambda d, acc: _position_sum(d * normalised(module, x), acc) @ parts["weight"].to(acc).T]
        dots = []
        weight = parts.get("weight")
        if weight is not None:
            k, n_out, n_in = weight.shape[0], weight.shape[-2], weight.shape[-1]
            if k * n_out <= n_in:
                # keep x·V_kᵀ [K, .., out] (LoRA A: K·r numbers per token) rather than x [.., in]
                projected = torch.einsum("...i,koi->k...o", x, weight.to(x.dtype))
                dots.append(lambda d, acc: _summed(d, projected, acc))
            else:
                # keep x; at the backward contract on the input side, V_kᵀ δ_p [K, .., in]: for out > in (LoRA B,
                # a head) K·in numbers per token instead of K·out (δ broadcast over K by matmul, not copied)
                def lazy(d, acc):
                    back = (d.reshape(-1, n_out) @ weight.to(d.dtype)).view(k, *d.shape[:-1], n_in)
                    return _summed(x, back, acc)

                dots.append(lazy)
        if "bias" in parts:
            dots.append(lambda d, acc: _position_sum(d, acc) @ parts["bias"].to(acc).T)
        return dots

    def _stacked_on_grad(self, kind: str, module, x: torch.Tensor, parts: dict):
        """The hook on the output's gradient δ adding [rows, K] into the accumulator (stacked directions)."""
        dots = self._stacked_dots(kind, module, x, parts)

        def on_grad(delta):
            acc = _at_least_float32(delta)  # float32 for half-precision models, float64 for float64 ones
            rows = sum(dot(delta, acc) for dot in dots)
            self.acc = rows if self.acc is None else self.acc + rows

        return on_grad

    def take(self) -> torch.Tensor | None:
        """The per-row sums accumulated since the last take, [rows] or stacked [rows, K] (None if no hooked
        layer saw a gradient)."""
        out, self.acc = self.acc, None
        return out


class GroupGradients(_ParamHooks):
    """Per-group gradients G_b = Σ_{i ∈ group b} ∇_θ Σ_t c_t y_t(row i) of the hooked modules' tensors, from the
    same ordinary backward that gives the batch gradient (docs/math.md §5.2).

    As in `RowDirectional`, row i's gradient is a sum over its positions: Linear Σ_p δ_p x_pᵀ (bias Σ_p δ_p),
    Embedding δ_p added into row t_p, RMSNorm Σ_p δ_p ⊙ x̂_p; a forward hook keeps the input and a hook on the
    output's gradient adds each row's share into its group's slot (index_add). Memory: n_groups × trainable
    parameters, in float32 or better. Set `rows_group` (the group id of every row of the current microbatch)
    before each backward.
    """

    def __init__(self, model: torch.nn.Module, names: list[str], n_groups: int):
        super().__init__(model, names, names)
        self.rows_group: torch.Tensor | None = None
        params = dict(model.named_parameters())
        self.sums = {
            n: torch.zeros((n_groups, *params[n].shape), dtype=_at_least_float32(params[n]), device=params[n].device)
            for n in names
        }

    def _hook(self, kind: str, module, parts: dict[str, str]):
        def forward_hook(module, inputs, output):
            if not output.requires_grad:
                return
            x = inputs[0].detach()

            def on_grad(delta):
                groups = self.rows_group  # read at backward time: set after the forward, before the backward
                target = self.sums[parts["weight"]] if "weight" in parts else None
                if kind == "embedding":
                    n_rows = target.shape[1]  # [G, V, d] viewed as [G·V, d]: row t of group b at b·V + t
                    slots = (groups.view(-1, *[1] * (x.dim() - 1)) * n_rows + x).reshape(-1)
                    kept = (delta * _looked_up(module, x)).to(target.dtype)
                    target.view(-1, target.shape[-1]).index_add_(0, slots, kept.reshape(-1, target.shape[-1]))
                    return
                if kind == "rmsnorm":
                    rows = (delta * normalised(module, x)).to(target.dtype)
                    target.index_add_(0, groups, rows.reshape(delta.shape[0], -1, delta.shape[-1]).sum(1))
                    return
                if target is not None:
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
