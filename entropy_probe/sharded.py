"""Sharded probing on torch's FSDP2 (compute.shard: fsdp, under torchrun): the policy and every parameter-sized
vector stay split over the processes, as a trainer's FSDP shards them (docs/design.md, "Sharded mode").

    torchrun --nproc_per_node=W --no-python entropy-probe delta-h1 -S compute.shard=fsdp

`shard_policy` applies `fully_shard` to every decoder layer and to the whole model, so each process holds one
W-th of each parameter (rows of dim 0, torch.chunk's split: a DTensor `Shard(0)`). Then:
  - the passes run as ordinary backwards into `.grad`, whose reduce-scatter sums every process's rows into
    each process's shard (`passes.gradients`; the sum, not FSDP's default mean): g and X̄ are shards;
  - the AdamW state is cut to the same shards (`local_optimizer`), so Δθ = rule(g) is elementwise on them; the
    few sums over all elements (‖g‖ for clipping, X̄·Δθ, norms) are all-reduced (`AdamState.sharded`);
  - the per-row hooks of SE_E, SE_U and the attributions gather one parameter's direction at a time
    (`tangents._full`), as FSDP gathers the parameter itself;
  - rows (E, U) are split over the processes as in the replicated mode, and every process runs the same
    number of microbatches (`scoring.Batch.fsdp`), since each forward and backward gathers from all of them.
Each process reads only its rows of verify's AdamW moments (`moment_rows`). Only bars.safetensors (X̄ and Δθ
whole, for the exact and truth stages) is gathered, one tensor at a time (`gather_named`), and kept on rank 0
alone, which writes it.

δH₂ moves the shards in place (`perturb.perturbed`, which drops FSDP's gathered copies so that the next forward
sees θ ± εΔθ) and reuses the same sharded E passes.

Not sharded yet (one-line refusals, `check_supported`, `refuse`): several steps per U batch, the per-group U
gradients (SE_U comes from the delta method), per-token tangents (compute.all_targets), 4-bit bases, an observed
step, what-if rows and the forecast.
The policy's weights are still loaded whole (into host memory) before they are cut: the checkpoint sources give
whole tensors.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from . import distributed
from .errors import ProbeError
from .optimizer_state import OptimizerState
from .tangents import RowDirectional
from .update import FlatLayout

log = logging.getLogger(__name__)


def local_tensor(p: Tensor) -> Tensor:
    """This process's shard of an FSDP parameter (a DTensor), or the tensor itself."""
    to_local = getattr(p, "to_local", None)
    return p if to_local is None else to_local()


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `shard_policy` has sharded this model (its parameters are DTensors)."""
    return any(hasattr(p, "to_local") for p in model.parameters())


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a transformers causal LM (a PeftModel unwrapped): FSDP's units."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "get_decoder", lambda: None)(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ProbeError(
            f"compute.shard fsdp cannot find the decoder layers of {type(base).__name__}",
            "use a transformers causal LM whose decoder has .layers (Llama, Qwen2, Mistral, …), or compute.shard none",
        )
    return layers


def check_supported(model: torch.nn.Module, names: list[str], params) -> None:
    """Refuse, in one line, what the sharded mode does not compute (see the module docstring)."""
    why = None
    if params.compute.all_targets:
        why = "per-token tangents (compute.all_targets)", "set compute.all_targets: false"
    elif any(type(m).__name__ == "Linear4bit" for m in model.modules()):
        why = "a 4-bit (QLoRA) base", "set checkpoint.use_qlora: false"
    elif not RowDirectional.supports(model, names):
        why = "a trainable tensor used by a module the row hooks do not know", "set compute.shard: none"
    if why is not None:
        raise ProbeError(f"compute.shard fsdp does not support {why[0]}", why[1])


def refuse(what: str, shard: str) -> None:
    """One line for a computation the sharded mode does not run (`what`: its name) when compute.shard is fsdp."""
    if shard == "fsdp":
        raise ProbeError(f"compute.shard fsdp does not run {what}", "set compute.shard: none")


def shard_policy(model: torch.nn.Module, device_map: str = "cpu") -> None:
    """`fully_shard` every decoder layer and then the whole model (embedding, final norm, head) in place, over
    all processes (gloo on CPU, nccl on GPUs); gradients reduce-scatter as sums (the passes add rows, not means).

    device_map "cuda": the shards go to this process's GPU (FSDP moves one unit's parameters there at a time, so
    a policy loaded into host memory is never whole on the device); otherwise they stay where the model is."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    device_type = (
        "cuda" if distributed.resolve_device_map(device_map) == "cuda" else next(model.parameters()).device.type
    )
    mesh = init_device_mesh(device_type, (distributed.world_size(),))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # Σ over the processes: a plain SUM (gloo has no pre-scaled sum)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    log.info("compute.shard fsdp: the policy is sharded over %d processes", distributed.world_size())


def reshard(model: torch.nn.Module) -> None:
    """Free the whole parameters FSDP2 gathered for a forward (a no-op for a model it does not shard). After a
    forward without backward the root keeps them, and `named_parameters()` then gives those, not the shards."""
    for module in model.modules():
        if hasattr(module, "reshard") and hasattr(module, "unshard"):  # an FSDPModule
            module.reshard()


def shard_rows(n_rows: int) -> slice:
    """This process's rows of a dim 0 of `n_rows` under FSDP2's Shard(0): torch.chunk's split over the processes
    (chunks of ⌈n/W⌉ rows; trailing ranks may hold none)."""
    size = -(-n_rows // distributed.world_size())
    start = min(distributed.rank() * size, n_rows)
    return slice(start, min(start + size, n_rows))


def moment_rows(name: str, shape: tuple[int, ...]) -> slice | None:
    """For `artifacts.verify.read_verify`: this process's rows of each moment (a scalar step: whole)."""
    return shard_rows(shape[0]) if shape else None


def local_rows(whole: Tensor, param: Tensor) -> Tensor:
    """The rows of `whole` (a tensor shaped like `param`) that this process's shard of `param` holds."""
    return _checked(whole[shard_rows(whole.shape[0])] if whole.dim() else whole, param)


def _checked(mine: Tensor, param: Tensor) -> Tensor:
    """`mine`, refused unless shaped as FSDP's shard of `param` (were torch to split otherwise, never cut the state
    differently from the parameters)."""
    if mine.shape != local_tensor(param).shape:
        raise RuntimeError(f"shard of shape {tuple(mine.shape)} where FSDP holds {tuple(local_tensor(param).shape)}")
    return mine


def local_layout(model: torch.nn.Module, names: list[str]) -> FlatLayout:
    """The layout of this process's shards of the named parameters (flat vectors of the sharded passes)."""
    params = dict(model.named_parameters())
    return FlatLayout.from_named({n: local_tensor(params[n]) for n in names}, names)


def local_optimizer(optimizer: OptimizerState, model: torch.nn.Module) -> OptimizerState:
    """The AdamW state of this process's shards (copies: the whole moments can be freed); a state read as shards
    already (`moment_rows`) is checked against FSDP's shards and kept."""
    params = dict(model.named_parameters())

    def cut(moments: dict[str, Tensor]) -> dict[str, Tensor]:
        if optimizer.sharded:
            return {n: _checked(t, params[n]) for n, t in moments.items()}
        return {n: local_rows(t, params[n]).clone() for n, t in moments.items()}

    return OptimizerState(
        optimizer.names,
        cut(optimizer.exp_avg),
        cut(optimizer.exp_avg_sq),
        dict(optimizer.step),
        optimizer.groups,
        optimizer.mapping,
        sharded=True,
    )


def local_flat(whole: Tensor, layout: FlatLayout, model: torch.nn.Module) -> Tensor:
    """A flat vector over the whole parameters (`layout`) cut to this process's shards, in local layout order."""
    params = dict(model.named_parameters())
    return torch.cat([local_rows(t, params[n]).reshape(-1) for n, t in layout.unflatten(whole).items()])


def as_dtensors(parts: list[Tensor], params: list[Tensor]) -> list[Tensor]:
    """Per-parameter shard tensors as DTensors shaped like the FSDP parameters (the hooks gather them whole)."""
    from torch.distributed.tensor import DTensor

    return [
        DTensor.from_local(d, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
        for d, p in zip(parts, params)
    ]


def gather_named(
    flat: Tensor, layout: FlatLayout, model: torch.nn.Module, dtype: torch.dtype | None = None
) -> dict[str, Tensor] | None:
    """The whole tensors of a sharded flat vector (in `dtype`: None keeps flat's), on rank 0's CPU (None on the
    other ranks), one at a time."""
    params = dict(model.named_parameters())
    pieces = layout.unflatten(flat if dtype is None else flat.to(dtype))
    wholes = as_dtensors(list(pieces.values()), [params[n] for n in pieces])
    out = {}
    for name, whole in zip(pieces, wholes):
        full = whole.full_tensor()  # every process takes part; rank 0 keeps it
        if distributed.is_rank0():
            out[name] = full.cpu()
    return out if distributed.is_rank0() else None


__all__ = [
    "as_dtensors",
    "check_supported",
    "gather_named",
    "is_sharded",
    "local_flat",
    "local_layout",
    "local_optimizer",
    "local_rows",
    "local_tensor",
    "moment_rows",
    "refuse",
    "reshard",
    "shard_policy",
    "shard_rows",
]
