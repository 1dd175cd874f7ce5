"""Multi-process runs under `torchrun` (torch.distributed): process group, rank helpers, collectives.

    torchrun --standalone --nproc_per_node=N --no-python entropy-probe sample-e|sample-u|delta-h1 ...
    torchrun --standalone --nproc_per_node=N -m stages.cli sample-e|sample-u|delta-h1 ...      (the same)

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK and the rendezvous address; `process_group` turns them
into a process group (gloo on CPU, nccl with one GPU per process, picked by LOCAL_RANK). Every helper
here is a no-op (or the identity) in a single process, so the stages run the same code either way.

Errors and collectives: every rank must reach the same collectives in the same order. Work done by
one rank only (the plan, writing the artifact) goes through `on_rank0`, which broadcasts its result
*or its exception*, so a failure there is raised on every rank at the same point instead of leaving
the others blocked in the next collective.

torch is imported inside the functions that use it, not at the top: the CLI imports this module for every
stage (and for --help), and a single process (WORLD_SIZE unset or 1) never needs torch.distributed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from .errors import ProbeError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

# Generous: ranks wait in a collective for the slowest rank's share (long generations on a 7B model);
# a rank that dies makes torchrun stop the others, so this only bounds a true hang.
TIMEOUT = timedelta(hours=2)


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when unset): the size the process group will have."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _dist():
    """torch.distributed (imported on first use; see the module docstring)."""
    import torch.distributed

    return torch.distributed


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    return _dist().get_world_size() if is_distributed() else 1


def is_rank0() -> bool:
    return rank() == 0


def resolve_device_map(device_map: str) -> str:
    """The per-process device map under torchrun: one whole model per process.

    "auto" would spread every process's model over all GPUs; it becomes "cuda" (the process's own GPU,
    cuda:LOCAL_RANK, which transformers picks for "cuda") when CUDA is available, else "cpu".
    """
    if device_map == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device_map


def backend_for(device_map: str) -> str:
    """nccl when the models live on CUDA, gloo on CPU."""
    return "nccl" if resolve_device_map(device_map) == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(device_map: str = "cpu") -> Iterator[None]:
    """Init the default process group when WORLD_SIZE > 1; always end with barrier + destroy.

    On CUDA the process's device is cuda:LOCAL_RANK. On a normal exit every rank meets at a barrier
    before destroy_process_group (a gloo process that exits with its group alive aborts now and then
    with "terminate called without an active exception"). On an exception the group is
    destroyed without the barrier: a peer may be inside another collective, which a barrier would
    mis-pair with or wait on forever (torchrun stops the other ranks when one fails). Errors that
    every rank raises at the same point (`on_rank0`) have no pending collective, so nothing is lost.
    """
    if env_world_size() <= 1 or is_distributed():
        yield
        return
    import torch

    dist = _dist()
    backend = backend_for(device_map)
    device_id = None
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ProbeError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible",
                "run torchrun with --nproc_per_node at most the number of GPUs",
            )
        torch.cuda.set_device(local_rank)
        device_id = torch.device("cuda", local_rank)
    dist.init_process_group(backend, timeout=TIMEOUT, device_id=device_id)
    log.info("rank %d of %d: process group up (%s)", rank(), world_size(), backend)
    ok = False
    try:
        yield
        ok = True
    finally:
        if ok:
            dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# collectives (identity / no-op in a single process)


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (picklable objects, CPU tensors included)."""
    if not is_distributed():
        return obj
    box = [obj if is_rank0() else None]
    _dist().broadcast_object_list(box, src=0)  # pickles travel via the current CUDA device under nccl
    return box[0]


def gather_objects_to_rank0(obj: Any) -> list[Any] | None:
    """[obj of rank 0, obj of rank 1, …] on rank 0, None elsewhere; [obj] in a single process."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size() if is_rank0() else None
    _dist().gather_object(obj, out, dst=0)
    return out


def all_reduce_sum(tensor: torch.Tensor, dtype: torch.dtype | str | None = "float64") -> torch.Tensor:
    """In place: tensor ← Σ_ranks tensor, summed in `dtype` (a torch dtype or its name, float64 by default;
    None = the tensor's own). The default is a name so that defining this function needs no torch.

    Partial sums of float32 gradients are added in float64 and rounded once, so N ranks add no more
    rounding than one add. Tensors that are zero outside this rank's rows sum exactly in any dtype.
    """
    if not is_distributed():
        return tensor
    import torch

    dist = _dist()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is None or tensor.dtype == dtype or not tensor.is_floating_point():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
    wide = tensor.to(dtype)
    dist.all_reduce(wide, op=dist.ReduceOp.SUM)
    tensor.copy_(wide)
    return tensor


def on_rank0(fn: Callable[[], T]) -> T:
    """Run fn on rank 0 only and return its result on every rank; an exception is raised on every rank.

    In a single process this is just fn(). The result must be picklable.
    """
    if not is_distributed():
        return fn()
    result: tuple[bool, Any] = (True, None)
    error = None
    if is_rank0():
        try:
            result = (True, fn())
        except Exception as exc:  # re-raised below, on every rank
            error, result = exc, (False, _portable(exc))
    ok, value = broadcast_object(result)
    if error is not None:
        raise error  # rank 0 keeps its own traceback
    if not ok:
        raise value
    return value


def gather_results_to_rank0(fn: Callable[[], T]) -> list[T] | None:
    """Every rank runs fn; rank 0 gets the list of results in rank order (None elsewhere).

    An exception on any rank is raised on every rank after the gather (rank 0 re-raises the first
    rank's; a failing rank its own), so no rank is left waiting in a later collective.
    """
    error = None
    try:
        mine: tuple[bool, Any] = (True, fn())
    except Exception as exc:
        if not is_distributed():
            raise
        error, mine = exc, (False, _portable(exc))
    gathered = gather_objects_to_rank0(mine)
    failures = on_rank0(lambda: [v for ok, v in gathered if not ok][:1])
    if error is not None:
        raise error
    if failures:
        raise failures[0]
    return [v for _, v in gathered] if is_rank0() else None


def _portable(exc: Exception) -> Exception:
    """exc itself when it survives pickling (ProbeError does), else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__} on rank {rank()}: {exc}")


def row_slice(n_items: int, rank: int, world: int) -> slice:
    """The contiguous share of range(n_items) of process `rank` of `world`; sizes differ by at most 1.

    The first n_items % world ranks get one more item; ranks past n_items get an empty slice.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    base, extra = divmod(n_items, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))
