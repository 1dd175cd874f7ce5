"""Knobs that travel together, as small frozen dataclasses (each built from its params section by `of`).

They carry settings, not data, through the library's layers, so a function takes one `budget` instead of
four loose numbers. The dtype of each computation is stated where it is fixed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ComputeBudget:
    """How the passes over E and U are cut and what they keep (params `compute`).

    Sums are kept in the trainable parameters' dtype promoted to at least float32 (float64 for a float64
    model); δH₁ and the update rules are accumulated in float64.
    """

    max_tokens: int = 4096  # rows × columns per microbatch
    logits_chunk_mb: float = 256.0  # MiB of float32 [tokens × vocabulary] logits per chunk of the LM head
    u_cache_mb: float = 4096.0  # per-group U gradients kept below this size (jackknife SE_U); 0: never
    all_targets: bool = False  # per-token tangents by double backward: all three targets and the naive estimate

    @classmethod
    def of(cls, compute) -> ComputeBudget:
        """From params `compute` (ComputeParams)."""
        return cls(
            compute.max_tokens_per_microbatch, compute.logits_chunk_mb, compute.u_gradient_cache_mb, compute.all_targets
        )


@dataclass(frozen=True)
class SecondOrderSpec:
    """δH₂ by a finite difference of the reweighted directional derivative at θ ± εΔθ (params `second_order`),
    in the model's dtype (float32 sums), refused where the dtype loses the shift (docs/math.md §5.6)."""

    fd_eps: float = 0.01  # ε, a multiple of Δθ
    fraction: float = 0.1  # f: s* is where |s² δH₂| = f |s δH₁|
    z_resolve: float = 2.0  # δH₂ counts as resolved from 0 when |δH₂| > z_resolve · SE

    @classmethod
    def of(cls, second_order) -> SecondOrderSpec:
        """From params `second_order` (SecondOrderParams)."""
        return cls(second_order.fd_eps, second_order.fraction, second_order.z_resolve)


@dataclass(frozen=True)
class EnumerationSpec:
    """How `enumeration` walks every continuation of a prompt: on a float64 copy of the policy, the policy
    the samples were drawn from (temperature, top_p, eos, max_new_tokens)."""

    eos_id: tuple[int, ...]  # the tokens that end a response (the sampler's stopping rule)
    max_new_tokens: int
    temperature: float
    top_p: float
    max_sequences: int  # refuse beyond this many continuations
    prompts_per_chunk: int | None = None  # prompts enumerated together (bounds an autograd graph)

    def kwargs(self, prompts_per_chunk: bool = True) -> dict:
        """The keyword arguments of the `enumeration` functions."""
        out = asdict(self)
        out["eos_id"] = list(self.eos_id)
        if not prompts_per_chunk:
            out.pop("prompts_per_chunk")
        return out


__all__ = ["ComputeBudget", "EnumerationSpec", "SecondOrderSpec"]
