"""The update direction Δθ (docs/math.md §4): advantages, policy-gradient coefficients, update rules.

θ = the trainable parameters, as one flat vector (`FlatLayout`). Training minimises −J, so Δθ
increases J; g = ∇J. Everything here is a pure function of tensors.

- `group_advantages`: A = r − mean_group(r), optionally / (std_group + eps).
- `pg_coefficients`: c [N, R] with J = Σ_ij c_ij logp_ij for the trainer's loss aggregation
  (verl's names). At the on-policy point the clipped ratio π/π_old = 1, so ∇J = Σ c ∇logp.
- `group_terms_from_rows`: per-prompt-group attributions of u·g and influence values for SE_U.
- Update rules on flat vectors: `adam_step_delta` (the exact next AdamW step), `adam_precond_delta`,
  `sgd_delta`; `update_direction`, `zero_gradient_part` and `linearise` dispatch on the rule.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, fields, replace
from typing import Mapping, Sequence

import torch
from torch import Tensor

from . import distributed
from .errors import ProbeError

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
RULES = ("adam_step", "adam_precond", "sgd")
# TRL GRPOConfig.loss_type -> verl loss_agg_mode (see trl/trainer/grpo_trainer.py, the loss branch).
_TRL_LOSS_TYPES = {
    "dapo": "token-mean",  # Σ_all / tokens of the whole generation batch
    "bnpo": "token-mean",  # Σ_all / tokens of the local batch (the same when the U batch is one batch)
    "cispo": "token-mean",  # same normalisation as dapo (the clipping differs only off-policy)
    "grpo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "luspo": "seq-mean-token-sum",
}


# --------------------------------------------------------------------------------------------------
# Advantages and the policy-gradient objective


def group_advantages(rewards: Tensor, scale: bool, eps: float) -> Tensor:
    """A = r − mean_group(r), and / (std_group + eps) when `scale`. rewards: [B, G] → [B, G].

    std is the unbiased (Bessel-corrected, G − 1) standard deviation, as TRL's GRPO computes it
    (trl.trainer.utils.nanstd), so an all-equal group gets A = 0 either way.
    """
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ProbeError(f"rewards must be [B, G] with G ≥ 2, got {tuple(rewards.shape)}", "set batch_config.G ≥ 2")
    if not torch.isfinite(rewards).all():
        raise ProbeError("non-finite rewards in the U batch", "check the reward function")
    adv = rewards - rewards.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (rewards.std(dim=1, keepdim=True) + eps)
    return adv


def resolve_loss_agg_mode(mode: str, trainer_config: Mapping | None) -> tuple[str, int | None, str]:
    """(mode, max_len, reason). "auto" follows the trainer's TRL loss_type; max_len is the trainer's
    max_completion_length (the Dr. GRPO constant), needed only by seq-mean-token-sum-norm."""
    config = dict(trainer_config or {})
    max_len = config.get("max_completion_length")
    if mode == "auto":
        loss_type = config.get("loss_type")
        if loss_type in _TRL_LOSS_TYPES:
            mode, reason = _TRL_LOSS_TYPES[loss_type], f"auto: trainer loss_type '{loss_type}'"
        elif loss_type is None:
            mode, reason = "token-mean", "auto: trainer loss_type unknown, assumed token-mean (TRL's default, dapo)"
        else:
            mode, reason = "token-mean", f"auto: trainer loss_type '{loss_type}' not recognised, assumed token-mean"
    elif mode in LOSS_AGG_MODES:
        reason = "set by update.loss_agg_mode"
    else:
        raise ProbeError(f"unknown loss aggregation mode '{mode}'", f"use auto or one of {', '.join(LOSS_AGG_MODES)}")
    if mode == "seq-mean-token-sum-norm":
        if not isinstance(max_len, int) or max_len < 1:
            raise ProbeError(
                "seq-mean-token-sum-norm needs the trainer's max_completion_length, which is unknown",
                "set update.loss_agg_mode to another mode, or probe a checkpoint whose trainer args are readable",
            )
        return mode, max_len, reason
    return mode, None, reason


def pg_coefficients(
    advantages: Tensor, mask: Tensor, mode: str, max_len: int | None = None, seq_weights: Tensor | None = None
) -> Tensor:
    """c [N, R] with J = Σ_ij c_ij logp_ij (N sequences, L_i = Σ_j mask_ij):
    token-mean               c_ij = A_i / Σ_all L
    seq-mean-token-mean      c_ij = A_i / (N L_i)
    seq-mean-token-sum       c_ij = A_i / N
    seq-mean-token-sum-norm  c_ij = A_i / (N · max_len)   (Dr. GRPO)
    `seq_weights` ω_i (importance weights normalised to mean 1, for samples drawn by another
    checkpoint) multiply every sequence's terms, and its tokens in the token-mean denominator Σ ω L.
    """
    m = mask.to(torch.float64)
    if seq_weights is not None:
        m = m * seq_weights.to(torch.float64)[:, None]
    a = advantages.detach().to(torch.float64)[:, None] * m
    n = mask.shape[0]
    if mode == "token-mean":
        return a / m.sum()
    if mode == "seq-mean-token-mean":
        return a / (n * mask.to(torch.float64).sum(-1, keepdim=True).clamp(min=1))
    if mode == "seq-mean-token-sum":
        return a / n
    if mode == "seq-mean-token-sum-norm":
        if max_len is None or max_len < 1:
            raise ValueError("seq-mean-token-sum-norm needs max_len ≥ 1")
        return a / (n * max_len)
    raise ProbeError(f"unknown loss aggregation mode '{mode}'", f"use one of {', '.join(LOSS_AGG_MODES)}")


def group_terms_from_rows(
    row_terms: Tensor, mask: Tensor, group_index: Tensor, mode: str, seq_weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(attribution [B], influence [B]) from row_terms_i = Σ_j c_ij u·∇logp_ij (c = `pg_coefficients`).

    attribution_b = Σ_{i ∈ b} row_terms_i, so Σ_b attribution_b = u·g. Groups (prompts) are the
    independent units of U, so SE_U = std(influence)/√B with mean(influence) = u·g:
    - token-mean, u·g = Σ_b N_b / Σ_b D_b (D_b = tokens of group b) has a random denominator; delta
      method: influence_b = r + (N_b − r D_b)/D̄, r = u·g, D̄ = mean_b D_b.
    - the others are means over sequences with a fixed count: influence_b = B · attribution_b.
    Groups are numbered by sorted unique group_index. `seq_weights`: as in `pg_coefficients` (the
    fluctuation of the weights' normalisation is ignored in the influence values).
    """
    _, group = torch.unique(group_index, return_inverse=True)
    n_groups = int(group.max()) + 1
    per_seq = row_terms.to(torch.float64)
    attribution = torch.zeros(n_groups, dtype=torch.float64, device=per_seq.device).index_add_(0, group, per_seq)
    if mode == "token-mean":
        lengths = mask.to(torch.float64).sum(-1)
        if seq_weights is not None:
            lengths = lengths * seq_weights.to(torch.float64)
        tokens = torch.zeros_like(attribution).index_add_(0, group, lengths)
        total = attribution.sum()
        numer = attribution * tokens.sum()  # N_b = Σ_{i∈b} A_i Σ_j dlogp_ij
        influence = total + (numer - total * tokens) / tokens.mean()
    else:
        influence = n_groups * attribution
    return attribution, influence


def group_denominators(mask: Tensor, group_index: Tensor, mode: str, seq_weights: Tensor | None = None) -> Tensor:
    """D_b [B], float64: group b's share of the loss aggregation's denominator D = Σ_b D_b (`pg_coefficients`).

    token-mean: D_b = Σ_{i∈b} ω_i L_i (its tokens); the seq-mean modes: D_b = n_b (its sequences; the constant
    max_len of seq-mean-token-sum-norm cancels in D/(D − D_b)). Groups numbered as in `group_terms_from_rows`.
    """
    _, group = torch.unique(group_index, return_inverse=True)
    n_groups = int(group.max()) + 1
    if mode == "token-mean":
        share = mask.to(torch.float64).sum(-1)
        if seq_weights is not None:
            share = share * seq_weights.to(torch.float64)
    else:
        share = torch.ones(mask.shape[0], dtype=torch.float64, device=mask.device)
    return torch.zeros(n_groups, dtype=torch.float64, device=mask.device).index_add_(0, group, share)


def leave_one_group_out(
    rule: str,
    g: Tensor,
    g_groups: Tensor,
    denominators: Tensor,
    xbar: Tensor,
    state: AdamState,
    max_grad_norm: float | None,
) -> Tensor:
    """[B] X̄·Δθ(g₋b): the δH₁ the update rule (clipping and Adam included) gives without prompt group b.

    g = Σ_b g_b (`g_groups` [B, P], each with the full batch's normalisation 1/D). Advantages are relative to
    the group, so dropping group b leaves the other groups' terms and changes only the normaliser:
    g₋b = (g − g_b) · D / (D − D_b), with D_b from `group_denominators`.

    All B at once, slice by slice over the parameters ([B, slice] temporaries, UPDATE_CHUNK elements in all): the
    state is read once per slice instead of once per group, and no parameter-sized g₋b is formed. Clipping needs
    ‖g₋b‖ first, so then the slices are visited twice.
    """
    total = denominators.sum()
    scale = (total / (total - denominators)).to(g.dtype)[:, None]
    n_groups = g_groups.shape[0]
    step = max(1, UPDATE_CHUNK // n_groups)
    slices = [slice(start, start + step) for start in range(0, g.numel(), step)]

    def g_minus(rows: slice) -> Tensor:
        return (g[rows] - g_groups[:, rows].to(g.dtype)) * scale

    factor = torch.ones(n_groups, 1, dtype=g.dtype, device=g.device)
    if rule == "adam_step" and max_grad_norm is not None and max_grad_norm > 0:  # the other rules do not clip
        squares = sum((g_minus(rows) ** 2).sum(-1) for rows in slices)
        factor = torch.clamp(max_grad_norm / (squares.sqrt() + 1e-6), max=1.0)[:, None]  # `clip_factor` per group
    values = torch.zeros(n_groups, dtype=torch.float64, device=g.device)
    for rows in slices:
        delta = _update_direction(rule, g_minus(rows) * factor, state.rows(rows), None)
        values += (xbar[rows] * delta).sum(-1).double()
    return values


def jackknife_se(leave_one_out: Tensor) -> float:
    """SE = √((B−1)/B · Σ_b (v₋b − mean v₋)²), the delete-one jackknife over B independent groups."""
    n = leave_one_out.numel()
    v = leave_one_out.double()
    return float(((n - 1) / n * ((v - v.mean()) ** 2).sum()).sqrt())


# --------------------------------------------------------------------------------------------------
# Flat parameter vectors


@dataclass
class FlatLayout:
    """Order, shapes and sizes of the named trainable parameters inside one flat vector."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    numels: list[int]

    @classmethod
    def from_named(cls, tensors: Mapping[str, Tensor], names: Sequence[str] | None = None) -> "FlatLayout":
        names = list(tensors) if names is None else list(names)
        shapes = [tuple(tensors[n].shape) for n in names]
        return cls(names, shapes, [tensors[n].numel() for n in names])

    @property
    def numel(self) -> int:
        return sum(self.numels)

    def flatten(self, tensors: Mapping[str, Tensor], dtype: torch.dtype | None = None) -> Tensor:
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ValueError(f"missing tensors for {missing[:3]}")
        parts = [tensors[n] for n in self.names]
        flat = self.consecutive(parts)  # the moments of an OptimizerState: one buffer already, no copy
        flat = torch.cat([t.reshape(-1) for t in parts]) if flat is None else flat
        return flat if dtype is None else flat.to(dtype)

    @staticmethod
    def consecutive(parts: Sequence[Tensor]) -> Tensor | None:
        """The flat view that holds `parts` one after another (contiguous pieces of one storage, in order), or None."""
        if not parts or any(t.numel() == 0 or not t.is_contiguous() for t in parts):
            return None
        first = parts[0]
        storage, start = first.untyped_storage().data_ptr(), first.storage_offset()
        offset = start
        for t in parts:
            same = t.dtype == first.dtype and t.device == first.device and t.untyped_storage().data_ptr() == storage
            if not same or t.storage_offset() != offset:
                return None
            offset += t.numel()
        return first.as_strided((offset - start,), (1,), start)

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        if vec.shape != (self.numel,):
            raise ValueError(f"expected a flat vector of {self.numel} elements, got {tuple(vec.shape)}")
        return {n: t.view(s) for n, t, s in zip(self.names, vec.split(self.numels), self.shapes)}

    def per_element(
        self, values: Mapping[str, float] | Sequence[float], dtype=torch.float64, device=None
    ) -> Tensor | PerParameter:
        """A per-parameter scalar (lr, step, ...) broadcast to a per-element vector; one value everywhere is an
        expanded view of one number (no memory: a full-parameter model has hundreds of millions of elements), and
        several values over a long layout (the weight decay of two param groups) a `PerParameter`."""
        vals = [values[n] for n in self.names] if isinstance(values, Mapping) else list(values)
        vals = torch.tensor([float(v) for v in vals], dtype=dtype, device=device)
        if vals.numel() and bool((vals == vals[0]).all()):
            return vals[:1].expand(self.numel)
        if is_long(self.numel):
            return PerParameter(vals, self.numels)
        return vals.repeat_interleave(torch.tensor(self.numels, device=vals.device))


class PerParameter:
    """A per-element vector that is constant on each parameter (a hyperparameter of several param groups), held as
    one value per parameter instead of one per element (8 bytes per element in float64). Indexing gives plain
    tensors — a slice at a time in the update rules (`AdamState.rows`) — and a scalar multiple stays one."""

    def __init__(self, values: Tensor, numels: Sequence[int]) -> None:
        self.values = values  # [parameters]
        self.numels = list(numels)
        self.ends = torch.tensor(self.numels, device=values.device).cumsum(0)  # each parameter's end, exclusive
        self.shape = torch.Size([sum(self.numels)])
        self.dtype, self.device = values.dtype, values.device

    def numel(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice | int) -> Tensor:
        if isinstance(index, slice):  # the slice's positions only (never an index over every element)
            positions = torch.arange(*index.indices(self.numel()), device=self.device)
        else:
            positions = torch.tensor(range(self.numel())[index], device=self.device)
        return self.values[torch.searchsorted(self.ends, positions, right=True)]

    def dense(self) -> Tensor:
        """The whole per-element vector (as `FlatLayout.per_element` would otherwise hold it)."""
        return self.values.repeat_interleave(torch.tensor(self.numels, device=self.device))

    def __mul__(self, scale: float) -> PerParameter:
        return PerParameter(self.values * scale, self.numels)

    __rmul__ = __mul__

    def double(self) -> PerParameter:
        return PerParameter(self.values.double(), self.numels)

    def sum(self) -> Tensor:
        """Σ over the elements."""
        return (self.values * torch.tensor(self.numels, dtype=self.values.dtype, device=self.device)).sum()


def _one_if_shared(x: Tensor) -> Tensor:
    """x[:1] when x is one number expanded over every element (stride 0), else x. One element, not 0-d: a 0-d tensor
    would not take part in type promotion, and float64 hyperparameters must promote float32 moments to float64."""
    return x[:1] if x.dim() == 1 and x.numel() > 1 and x.stride(0) == 0 else x


class FlatView:
    """Tensors (the model's parameters) read as one flat vector without a copy: a slice is gathered from the
    tensors it spans when indexed — a slice at a time in the update rules (`AdamState.rows`) — so θ for the
    decoupled weight decay takes no memory of its own (4 bytes per parameter for an fp32 full-parameter model).
    The values are read when the rule is evaluated: the model must hold θ then (`perturb.perturbed` restores it
    bit for bit; nothing steps the model while a probe computes)."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.parts = [t.detach().reshape(-1) for t in tensors]  # views of contiguous tensors
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + part.numel())
        self.shape = torch.Size([self.starts[-1]])
        self.dtype, self.device = self.parts[0].dtype, self.parts[0].device

    @classmethod
    def of(cls, tensors: Sequence[Tensor]) -> "FlatView | None":
        """A view of `tensors` when they can be read in place (contiguous, one dtype and device), else None."""
        ok = tensors and all(t.is_contiguous() for t in tensors)
        ok = ok and len({(t.dtype, t.device) for t in tensors}) == 1
        return cls(tensors) if ok else None

    def numel(self) -> int:
        return self.shape[0]

    def dense(self) -> Tensor:
        """The whole flat vector (a copy)."""
        return torch.cat(self.parts)

    def __getitem__(self, index: slice) -> Tensor:
        if not isinstance(index, slice):
            raise TypeError("a FlatView is read by slices")
        start, stop, step = index.indices(self.numel())
        if step != 1:
            raise ValueError("a FlatView is read by contiguous slices")
        first = max(0, bisect.bisect_right(self.starts, start) - 1)
        pieces = []
        for i in range(first, len(self.parts)):
            if self.starts[i] >= stop:
                break
            lo, hi = max(start, self.starts[i]) - self.starts[i], min(stop, self.starts[i + 1]) - self.starts[i]
            pieces.append(self.parts[i][lo:hi])
        if not pieces:
            return self.parts[0][:0]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def realised_step(theta: Tensor, delta_theta: Tensor) -> Tensor:
    """The step the next forward sees when θ is stored in `theta.dtype`: round(θ + Δθ) − θ, in float64.

    In bf16 (8 bits of mantissa) an element moves only if |Δθ_i| reaches about half its spacing, |θ_i|·2⁻⁸:
    a full-parameter step at lr ~1e-6 is mostly lost. In float32/float64 this is Δθ up to rounding.
    """
    theta64 = theta.detach().double()
    return (theta64 + delta_theta.to(theta64)).to(theta.dtype).double() - theta64


@dataclass
class AdamState:
    """AdamW state and hyperparameters as per-element flat vectors (all [P])."""

    theta: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    step: Tensor
    lr: Tensor
    beta1: Tensor
    beta2: Tensor
    eps: Tensor
    weight_decay: Tensor
    # True: these vectors are this process's shard of every parameter (`sharded`, compute.shard fsdp), so a sum over
    # the elements (‖g‖ for clipping, X̄·Δθ) is the sum over every process's shard (`total`)
    sharded: bool = False

    def rows(self, index: slice) -> "AdamState":
        """The state of the elements in `index`, for the rules' arithmetic on a slice (views; a `PerParameter`
        hyperparameter as a tensor of those rows, one shared by every element — an expanded view — as one element,
        so that the rules' powers and quotients of hyperparameters are taken once per slice, not per element)."""
        return AdamState(
            *(_one_if_shared(getattr(self, f.name)[index]) for f in fields(self) if f.name != "sharded"), self.sharded
        )

    def dense(self) -> "AdamState":
        """This state with every vector a tensor (`PerParameter` and `FlatView` made whole: for whole-vector arithmetic)."""
        lazy = [f.name for f in fields(self) if isinstance(getattr(self, f.name), (PerParameter, FlatView))]
        return replace(self, **{name: getattr(self, name).dense() for name in lazy}) if lazy else self

    def total(self, x: Tensor) -> Tensor:
        """Σ_i x_i over every element of the parameters, in float64 (all-reduced over the processes when sharded)."""
        out = x.double().sum()
        return distributed.all_reduce_sum(out) if self.sharded else out

    def dot(self, a: Tensor, b: Tensor) -> Tensor:
        """Σ_i a_i b_i over every element of the parameters, in float64: a long pair slice by slice (no
        parameter-sized float64 copies), all-reduced when sharded."""
        if not is_long(a.numel()):
            out = (a.double() * b.double()).sum()
        else:
            out = sum((a[rows].double() * b[rows].double()).sum() for rows in _slices(a.numel()))
        return distributed.all_reduce_sum(out) if self.sharded else out

    def mean(self, x: Tensor) -> float:
        """The mean of x over every element of the parameters."""
        count = torch.tensor(float(x.numel()), dtype=torch.float64)
        return float(self.total(x) / (distributed.all_reduce_sum(count) if self.sharded else count))

    def norm(self, x: Tensor) -> Tensor:
        """‖x‖ over every element of the parameters (float64)."""
        if not self.sharded and not is_long(x.numel()):
            return torch.linalg.vector_norm(x.double())
        return self.dot(x, x).sqrt()

    @classmethod
    def from_groups(
        cls,
        layout: FlatLayout,
        theta: Mapping[str, Tensor],
        exp_avg: Mapping[str, Tensor],
        exp_avg_sq: Mapping[str, Tensor],
        step: Mapping[str, float | Tensor],
        param_groups: Sequence[Mapping],
        lr: float | None = None,
        dtype: torch.dtype | None = torch.float64,
    ) -> "AdamState":
        """From named state and param groups ({lr, betas, eps, weight_decay, names} each).

        θ, m and v are flattened in `dtype` (None: as given — lossless, and the update rules' arithmetic promotes
        them to float64 against the float64 hyperparameters); the hyperparameters are float64, a value shared by
        every element an expanded view of one number (`FlatLayout.per_element`).

        A parameter absent from exp_avg/exp_avg_sq/step never had a gradient: AdamW would start it
        from zero state at step 0, and so does this (verify refuses such checkpoints, so this serves
        in-memory use, e.g. the AdamW parity tests). `lr` replaces every group's lr when given.
        """
        hyper: dict[str, tuple] = {}
        for group in param_groups:
            b1, b2 = group["betas"]
            for name in group["names"]:
                hyper[name] = (group["lr"] if lr is None else lr, b1, b2, group["eps"], group["weight_decay"])
        missing = [n for n in layout.names if n not in hyper]
        if missing:
            raise ProbeError(
                f"parameter {missing[0]} is in no optimizer param group", "re-run verify on this checkpoint"
            )
        device = next(iter(theta.values())).device if theta else None
        zeros = {n: torch.zeros(s) for n, s in zip(layout.names, layout.shapes)}

        def vec(d: Mapping[str, Tensor]) -> Tensor:
            return layout.flatten({n: d.get(n, zeros[n]).to(device) for n in layout.names}, dtype)

        def theta_vec() -> Tensor | FlatView:
            """θ flat: read in place from the tensors given for a long layout (no copy: `FlatView`)."""
            parts = [theta.get(n) for n in layout.names]
            if any(t is None or t.device != device for t in parts):
                return vec(theta)
            view = FlatView.of(parts) if is_long(layout.numel) and dtype in (None, parts[0].dtype) else None
            return vec(theta) if view is None or FlatLayout.consecutive(parts) is not None else view

        cols = list(zip(*(hyper[n] for n in layout.names)))
        hyper_dtype = dtype or torch.float64
        per = [layout.per_element(col, hyper_dtype, device) for col in cols]
        steps = layout.per_element([float(step.get(n, 0.0)) for n in layout.names], hyper_dtype, device)
        return cls(theta_vec(), vec(exp_avg), vec(exp_avg_sq), steps, *per)


# --------------------------------------------------------------------------------------------------
# Update rules on flat vectors


def clipped(g: Tensor, max_grad_norm: float | None) -> Tensor:
    """g·coef with HF Trainer's clip of the loss gradient −g (same norm): torch clip_grad_norm_,
    coef = min(1, max_norm / (‖g‖ + 1e-6)). None or ≤ 0: no clipping (the Trainer skips it)."""
    if max_grad_norm is None or max_grad_norm <= 0:
        return g
    return g * clip_factor(g, max_grad_norm)


def clip_factor(g: Tensor, max_grad_norm: float, norm: Tensor | None = None) -> Tensor:
    """min(1, max_norm / (‖g‖ + 1e-6)) as a 0-d tensor (`norm`: ‖g‖ given, e.g. over every process's shard)."""
    norm = torch.linalg.vector_norm(g) if norm is None else norm
    return torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt with a zero (not NaN) gradient at x = 0, where AdamW's v' = 0 (no state, zero gradient)."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def adam_step_delta(
    g: Tensor,
    theta: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor | float,
    lr: Tensor | float,
    beta1: Tensor | float,
    beta2: Tensor | float,
    eps: Tensor | float,
    weight_decay: Tensor | float,
    max_grad_norm: float | None,
) -> Tensor:
    """Δθ of torch.optim.AdamW.step() (non-amsgrad, non-fused) after the Trainer clips the loss gradient.

    ĝ = −clip(g) (the loss gradient), t = step + 1:
      m' = β₁ m + (1−β₁) ĝ,   v' = β₂ v + (1−β₂) ĝ²
      Δθ = −lr·wd·θ − (lr / (1 − β₁ᵗ)) · m' / (sqrt(v') / sqrt(1 − β₂ᵗ) + eps)
    m, v are the stored state (momentum of the loss gradient); every argument may be per-element.
    """
    grad = -clipped(g, max_grad_norm)
    t = step + 1
    m_new = beta1 * exp_avg + (1 - beta1) * grad
    v_new = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    bc1 = 1 - beta1**t
    bc2 = 1 - beta2**t
    denom = _safe_sqrt(v_new) / bc2**0.5 + eps
    return -lr * weight_decay * theta - (lr / bc1) * m_new / denom


def adam_advance(g: Tensor, state: AdamState, max_grad_norm: float | None) -> tuple[Tensor, AdamState]:
    """One torch AdamW step at g = ∇J: (Δθ, the state after it — θ + Δθ, m', v', step + 1), for chains of steps."""
    s = state.dense()
    delta = adam_step_delta(
        g, s.theta, s.exp_avg, s.exp_avg_sq, s.step, s.lr, s.beta1, s.beta2, s.eps, s.weight_decay, max_grad_norm
    )
    grad = -clipped(g, max_grad_norm)
    after = replace(
        s,
        theta=s.theta + delta,
        exp_avg=s.beta1 * s.exp_avg + (1 - s.beta1) * grad,
        exp_avg_sq=s.beta2 * s.exp_avg_sq + (1 - s.beta2) * grad * grad,
        step=s.step + 1,
    )
    return delta, after


def clipped_ratio_coefficients(
    coef: Tensor, log_ratio: Tensor, mask: Tensor, clip_low: float, clip_high: float
) -> Tensor:
    """The coefficients of ∇J for PPO's clipped surrogate, J = Σ c · min(r A, clip(r, 1 − ε_low, 1 + ε_high) A) / A
    at r = π_θ/π_old = exp(log_ratio) per token (c = the aggregation weight × A, so sign c = sign A):

        ∂J/∂logp = c · r    where the unclipped term is the minimum, 0 where the clipped one is
                              (A > 0 and r > 1 + ε_high, or A < 0 and r < 1 − ε_low).

    At r = 1 (the first step on fresh samples) this is c: the on-policy gradient.
    """
    ratio = log_ratio.exp()
    clipped_away = ((coef > 0) & (ratio > 1 + clip_high)) | ((coef < 0) & (ratio < 1 - clip_low))
    return torch.where(mask.bool() & ~clipped_away, coef * ratio, torch.zeros_like(coef))


def adam_precond_delta(
    g: Tensor, exp_avg_sq: Tensor, step: Tensor | float, lr: Tensor | float, beta2: Tensor | float, eps: Tensor | float
) -> Tensor:
    """Δθ = lr · g / (sqrt(v / (1 − β₂^step)) + eps) (the original probe's direction; no momentum)."""
    if (torch.as_tensor(step) < 1).any():
        raise ProbeError(
            "adam_precond needs optimizer state (step ≥ 1) for every trainable parameter",
            "use update.rule=adam_step or sgd, or a checkpoint after at least one step",
        )
    return lr * g / (torch.sqrt(exp_avg_sq / (1 - beta2**step)) + eps)


def sgd_delta(g: Tensor, lr: Tensor | float) -> Tensor:
    """Δθ = lr · g."""
    return lr * g


# elements per slice of the update rules' elementwise arithmetic: its float64 temporaries (a dozen under the
# linearisation's autograd) stay ~1M × 8 bytes each instead of the size of θ (a full-parameter model has hundreds of
# millions of elements), a fixed amount per process that sharding does not divide
UPDATE_CHUNK = 1 << 20


def update_direction(rule: str, g: Tensor, state: AdamState, max_grad_norm: float | None = None) -> Tensor:
    """Δθ for `rule` (adam_step | adam_precond | sgd) at the objective gradient g = ∇J.

    The rules are elementwise once the clipping factor (from ‖g‖) is known, so a long g is taken in slices of
    UPDATE_CHUNK elements — the same numbers, bit for bit — each slice taken to float64 on its own and written
    into the one output, so no other parameter-sized vector is formed. Under autograd (`linearise`) it is taken
    whole. A sharded state (one process's shard of every parameter) clips with the norm over all processes'
    shards. Δθ is float64 — for a long g (a full-parameter model) stored in g's dtype promoted to ≥ float32, the
    dtype X̄ and the gradients are summed in: 4 bytes per parameter for a float32 model, and the E pass's direction
    is then views of it (`passes.as_direction`), not a copy."""
    if not state.sharded and (g.requires_grad or not is_long(g.numel())):
        return _update_direction(rule, g.double(), state.dense(), max_grad_norm)
    clips = rule == "adam_step" and max_grad_norm is not None and max_grad_norm > 0  # the others do not clip
    factor = clip_factor(g, max_grad_norm, _norm(g, state)) if clips else 1.0
    out = torch.empty(g.numel(), dtype=long_dtype(g), device=g.device)
    for rows in _slices(g.numel()):
        out[rows] = _update_direction(rule, g[rows].double() * factor, state.rows(rows), None)
    return out


def is_long(numel: int) -> bool:
    """Whether a flat vector of `numel` elements is long (a full-parameter model's): worked on in slices."""
    return numel > UPDATE_CHUNK


def long_dtype(g: Tensor) -> torch.dtype:
    """The dtype a parameter-sized result of the rules (Δθ, u) is stored in: float64 for up to UPDATE_CHUNK
    elements (LoRA adapters, the exactness tests), else g's dtype promoted to ≥ float32 (each slice is still
    computed in float64)."""
    return torch.promote_types(g.dtype, torch.float32) if is_long(g.numel()) else torch.float64


def _slices(n: int) -> list[slice]:
    """UPDATE_CHUNK-element slices covering range(n)."""
    return [slice(start, start + UPDATE_CHUNK) for start in range(0, n, UPDATE_CHUNK)]


def _norm(g: Tensor, state: AdamState) -> Tensor:
    """‖g‖ in float64: over every process's shard for a sharded state."""
    return state.norm(g) if state.sharded else torch.linalg.vector_norm(g, dtype=torch.float64)


def _update_direction(rule: str, g: Tensor, state: AdamState, max_grad_norm: float | None) -> Tensor:
    s = state
    if rule == "adam_step":
        return adam_step_delta(
            g, s.theta, s.exp_avg, s.exp_avg_sq, s.step, s.lr, s.beta1, s.beta2, s.eps, s.weight_decay, max_grad_norm
        )
    if rule == "adam_precond":
        return adam_precond_delta(g, s.exp_avg_sq, s.step, s.lr, s.beta2, s.eps)
    if rule == "sgd":
        return sgd_delta(g, s.lr)
    raise ProbeError(f"unknown update rule '{rule}'", f"use one of {', '.join(RULES)}")


def zero_gradient_part(rule: str, state: AdamState, max_grad_norm: float | None = None) -> Tensor:
    """Δθ at g = 0: the U-independent part (momentum + weight decay) for adam_step, 0 otherwise."""
    if rule not in RULES:
        raise ProbeError(f"unknown update rule '{rule}'", f"use one of {', '.join(RULES)}")
    if rule != "adam_step":
        return _zeros_like(state.theta)
    return update_direction(rule, _zeros_like(state.theta), state, max_grad_norm)


def _zeros_like(x: Tensor | FlatView) -> Tensor:
    return torch.zeros(x.shape, dtype=x.dtype, device=x.device)


def zero_gradient_dot(rule: str, xbar: Tensor, state: AdamState) -> Tensor:
    """X̄·Δθ(g = 0) in float64 (`zero_gradient_part`): a long state slice by slice, no parameter-sized Δθ(0)."""
    if state.sharded or is_long(xbar.numel()):
        if rule not in RULES:
            raise ProbeError(f"unknown update rule '{rule}'", f"use one of {', '.join(RULES)}")
        if rule != "adam_step":
            return state.total(torch.zeros(()))
        zero = torch.zeros((), dtype=torch.float64)  # g = 0: no clipping factor to find
        out = torch.zeros((), dtype=torch.float64)  # (a process may hold no element at all)
        for rows in _slices(xbar.numel()):
            s = state.rows(rows)
            out += (xbar[rows].double() * _update_direction(rule, zero.expand(s.theta.shape), s, None)).sum()
        return distributed.all_reduce_sum(out) if state.sharded else out
    return (xbar.double() * zero_gradient_part(rule, state)).sum()


def linearise(
    rule: str,
    g: Tensor,
    xbar: Tensor,
    state: AdamState,
    max_grad_norm: float | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """u = (∂Δθ/∂g)ᵀ X̄ at g (one vector-Jacobian product), so that X̄·Δθ(g + dg) ≈ X̄·Δθ(g) + u·dg.

    Up to UPDATE_CHUNK elements by autograd through the rule, in float64. A long g is taken in UPDATE_CHUNK slices,
    u stored in `long_dtype`: with Δθ_i = F_i(c g_i) and the clipping factor c = min(1, M/(‖g‖ + 1e-6)),
    d_i = X̄_i F_i'(c g_i) (`direction_derivative`, in float64) and

        u_j = c d_j − K g_j,      K = M Σ_i d_i g_i / (‖g‖ (‖g‖ + 1e-6)²) while clipping (c < 1), else 0.

    `out` (long g only): where u is written — g itself, when g is not needed afterwards, so that u takes no memory
    of its own (each slice of g is read before its u is written; with clipping K is summed in a first visit)."""
    if not state.sharded and not is_long(g.numel()):
        g, xbar = g.double(), xbar.double()
        with torch.enable_grad():
            g = g.detach().clone().requires_grad_(True)
            delta = update_direction(rule, g, state, max_grad_norm)
            (u,) = torch.autograd.grad(delta, g, grad_outputs=xbar.to(delta.dtype), allow_unused=True)
        return torch.zeros_like(g) if u is None else u.detach()
    clips = rule == "adam_step" and max_grad_norm is not None and max_grad_norm > 0
    norm = _norm(g, state)
    factor = clip_factor(g, max_grad_norm, norm) if clips else torch.ones((), dtype=torch.float64)

    def d(rows: slice) -> Tensor:
        return xbar[rows].double() * direction_derivative(rule, g[rows].double() * factor, state.rows(rows))

    correction = 0.0
    if clips and max_grad_norm / (norm + 1e-6) < 1:  # the factor depends on g
        along_g = sum((d(rows) * g[rows].double()).sum() for rows in _slices(g.numel()))
        along_g = (
            distributed.all_reduce_sum(torch.as_tensor(along_g, dtype=torch.float64)) if state.sharded else along_g
        )
        correction = float(max_grad_norm * along_g / (norm * (norm + 1e-6) ** 2))
    u = torch.empty(g.numel(), dtype=long_dtype(g), device=g.device) if out is None else out
    for rows in _slices(g.numel()):
        u[rows] = factor * d(rows) - correction * g[rows].double()
    return u


def direction_derivative(rule: str, x: Tensor, state: AdamState) -> Tensor:
    """∂Δθ_i/∂x_i of `rule` at the clipped gradient x = c g, elementwise (float64 x): the rules' Jacobian is diagonal
    once c is fixed. With ĝ = −x, m' = β₁m + (1−β₁)ĝ, v' = β₂v + (1−β₂)ĝ², D = √v'/√(1−β₂ᵗ) + eps:

        adam_step     (lr/(1−β₁ᵗ)) · ((1−β₁)/D − m' (1−β₂) ĝ / (√(1−β₂ᵗ) √v' D²))   (the second term 0 where v' = 0)
        adam_precond  lr / (√(v/(1−β₂^step)) + eps)
        sgd           lr
    """
    s = state
    if rule == "sgd":
        return s.lr * torch.ones_like(x)
    if rule == "adam_precond":
        return s.lr / (torch.sqrt(s.exp_avg_sq / (1 - s.beta2**s.step)) + s.eps) * torch.ones_like(x)
    if rule != "adam_step":
        raise ProbeError(f"unknown update rule '{rule}'", f"use one of {', '.join(RULES)}")
    grad = -x
    t = s.step + 1
    m_new = s.beta1 * s.exp_avg + (1 - s.beta1) * grad
    v_new = s.beta2 * s.exp_avg_sq + (1 - s.beta2) * grad * grad
    root_bc2 = (1 - s.beta2**t) ** 0.5
    root_v = _safe_sqrt(v_new)
    denom = root_v / root_bc2 + s.eps
    slope = torch.where(
        root_v > 0, (1 - s.beta2) * grad / (root_bc2 * root_v.clamp(min=torch.finfo(x.dtype).tiny)), 0.0
    )
    return (s.lr / (1 - s.beta1**t)) * ((1 - s.beta1) / denom - m_new * slope / denom**2)
