"""Parameter perturbations θ + s·Δθ with a bit-exact restore, and a float64 copy of a model.

`perturbed(model, Δθ, s)` sets θ ← θ + s·Δθ in place for the parameters Δθ names and, on exit, copies
the saved originals back (θ + sΔθ − sΔθ is not θ in floating point); `param_checksum` (sha256 over the
raw bytes) checks the restore. Used by the exact ΔH(η) curve and finite differences (docs/math.md §7.3)
and by the ground truth (§8).

`as_float64(model)` makes a transformers Llama-family model compute in float64 end to end, so exact
identities (§7.2) and central finite differences hold to ~1e-12: RMSNorm and attention, which
transformers computes in float32 whatever the model dtype, get float64-preserving replacements.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch

from .errors import ProbeError
from .sharded import local_tensor, reshard

# The attention that `as_float64` selects: transformers' eager attention computed in the input dtype.
FLOAT64_ATTENTION = "eager_input_dtype"


def _rmsnorm_in_input_dtype(module: torch.nn.Module):
    """RMSNorm y = w · x / sqrt(mean(x²) + eps), computed in x's dtype (HF upcasts only to float32)."""

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return module.weight * (hidden_states * torch.rsqrt(variance + module.variance_epsilon))

    return forward


def _eager_attention_in_input_dtype(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """softmax(q kᵀ · scaling + mask) v with every step in the input dtype; returns (output, weights).

    transformers' eager attention runs the softmax in float32 whatever the model dtype: ~1e-7 rounding
    that depends on θ, and in float64 the fully masked query rows of left padding (every score at
    finfo(float64).min, which is −inf in float32) become NaN that leaks through the value matmul. SDPA
    computes in the input dtype but its CPU kernel has no double backward (the tangents need one).
    Keys and values are repeated per query group as in transformers' `repeat_kv`.
    """
    unsupported = [k for k in ("softcap", "s_aux", "sinks") if kwargs.get(k) is not None]
    if unsupported:  # computing without them would silently give another model
        raise ProbeError(
            f"float64 exact enumeration does not implement attention with {', '.join(unsupported)}",
            "run the exact stage on a model without attention logit soft-capping or attention sinks",
        )
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    weights = torch.softmax(scores, dim=-1)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _register_float64_attention() -> None:
    """Make FLOAT64_ATTENTION a transformers attention implementation, with eager's additive float mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(FLOAT64_ATTENTION, _eager_attention_in_input_dtype)
    ALL_MASK_ATTENTION_FUNCTIONS.register(FLOAT64_ATTENTION, eager_mask)


def as_float64(model):
    """`model.double()` in eval mode, made float64 end to end (in place; returns the model).

    Two places in transformers' Llama-family code compute in float32 whatever the model dtype,
    which leaves θ-dependent rounding of ~1e-7 and ruins float64 finite differences and identities:
    - RMSNorm upcasts to float32 (not float64): its instances get a forward in the input dtype;
    - eager attention runs its softmax in float32 (and turns left padding into NaN in float64): the
      model gets eager attention computed in the input dtype (FLOAT64_ATTENTION), which, unlike SDPA
      on CPU, also has a double backward. (Rotary cos/sin stay float32: they do not depend on θ.)
    """
    model = model.double().eval()
    _register_float64_attention()
    model.set_attn_implementation(FLOAT64_ATTENTION)
    if getattr(model.config, "_attn_implementation", None) != FLOAT64_ATTENTION:
        raise ProbeError(
            f"{type(model).__name__} cannot switch its attention implementation, so it cannot run in float64",
            "use a transformers model that supports set_attn_implementation (Llama, Qwen2, Mistral, …)",
        )
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = _rmsnorm_in_input_dtype(module)
    return model


def param_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and raw bytes of the given tensors (bit-exact restore checks)."""
    digest = hashlib.sha256()
    for name, t in tensors.items():
        digest.update(name.encode())
        digest.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def perturbed(model, delta_theta: dict[str, torch.Tensor], scale: float) -> Iterator[None]:
    """θ ← θ + scale·Δθ in place for the parameters named in Δθ; restored bit-exactly on exit.

    The originals are saved as copies and restored with `copy_` (θ + sΔθ − sΔθ is not θ in
    floating point); a checksum over the raw bytes verifies the restore. For an FSDP-sharded model
    (compute.shard fsdp) Δθ holds this process's shards and the shards are moved; the gathered copies
    FSDP may keep from the last forward are dropped (`reshard`), so the next forward gathers the moved θ.
    """
    reshard(model)  # the sharded parameters, not the whole ones a forward gathered
    params = {n: local_tensor(p) for n, p in model.named_parameters()}
    unknown = [n for n in delta_theta if n not in params]
    if unknown:
        raise ProbeError(f"Δθ names parameter '{unknown[0]}' that the model does not have", "use Δθ for this model")
    touched = {n: params[n] for n in delta_theta}
    for n, p in touched.items():
        if p.shape != delta_theta[n].shape:
            raise ProbeError(
                f"Δθ for '{n}' has shape {tuple(delta_theta[n].shape)}, parameter {tuple(p.shape)}",
                "use Δθ for this model",
            )
    saved = {n: p.detach().clone() for n, p in touched.items()}
    before = param_checksum(saved)
    try:
        with torch.no_grad():
            for n, p in touched.items():
                p.add_(delta_theta[n].to(device=p.device, dtype=p.dtype), alpha=scale)
        reshard(model)
        yield
    finally:
        with torch.no_grad():
            for n, p in touched.items():
                p.copy_(saved[n])
        reshard(model)
        if param_checksum(touched) != before:
            raise RuntimeError("perturbed(): parameters were not restored exactly")


__all__ = ["FLOAT64_ATTENTION", "as_float64", "param_checksum", "perturbed"]
