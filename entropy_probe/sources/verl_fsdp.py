"""verl FSDP2 checkpoints (the actor of a full-parameter or LoRA run) → named fp32 weights + AdamW state.

Layout written by verl's FSDPCheckpointManager (W ranks, one file of each kind per rank R) under the run's
trainer.default_local_dir:

    latest_checkpointed_iteration.txt        text: N, the newest complete global_step_N (the trainer writes it)
    global_step_N/
        data.pt                              the dataloader's state (not read)
        actor/
            fsdp_config.json                 {"FSDP_version": 1 or 2, "world_size": W}
            model_world_size_W_rank_R.pt     module.state_dict() on rank R: {name: DTensor}
            optim_world_size_W_rank_R.pt     optimizer.state_dict() on rank R: {"state", "param_groups"}
            extra_state_world_size_W_rank_R.pt   {"lr_scheduler": LambdaLR.state_dict() or None, "rng": {...}}
            lora_train_meta.json             LoRA runs: {"r", "lora_alpha", "task_type"}
            lora_adapter/                    LoRA runs of older verl (its legacy fsdp_workers): PEFT's files; verl
                                             0.9 no longer writes it, and the reader does not use it
            huggingface/                     config.json, tokenizer; model.safetensors only when the run saves
                                             `hf_model` (its config.json then says bfloat16: the tensors are fp32)

Model file (FSDP2): every parameter is a DTensor on a 1-D mesh of the W ranks, placement Shard(d) (d = 0 in
verl): the rank's slice of the fp32 parameter, so the full tensor is the ranks' pieces concatenated on dim d
(FSDP2 cuts dim d like torch.chunk: later ranks may hold fewer rows, or none). Names are the module's
state_dict names: Hugging Face names for a full-parameter run; for a LoRA run PEFT's wrapped names,
`base_model.model.<name>` with `.base_layer.` inside each adapted layer and `.lora_A.default.weight`,
`.lora_B.default.weight` beside it. A tied weight (lm_head.weight = embed_tokens.weight) appears under both
names, the second a view of the first's storage; the optimizer knows only the first. Plain (non-DTensor)
values are buffers, not parameters.

Optimizer file: torch's own optimizer.state_dict(), parameters by integer id: `param_groups[g]["params"]`
lists the ids of group g with its lr, betas, eps, weight_decay; the ids count `module.parameters()`, which is
the model file's parameter order without tied aliases. `state[id]` holds "step" (a 0-d float32 tensor, one per
parameter), "exp_avg" and "exp_avg_sq" (DTensors sharded like the parameter). verl builds one group with every
parameter of the module: in a LoRA run the frozen base weights are listed too, but only the adapter has state.
With checkpoint.save_lora_only the model file keeps only the adapter: its names, in order, are then the ids that
have state, in order.

The lr of the next step: verl steps its LambdaLR after the optimizer step and saves after both, so the
scheduler's `_last_lr` (extra_state) and the param group's `lr` (optimizer file) are the same number, the lr
the next optimizer step applies; the reader takes the scheduler's and refuses files where the two differ.
The scheduler steps once per global step, the optimizer once per PPO mini-batch: Adam's `step` counts
optimizer steps, and grows by more than 1 between checkpoints when a global step has several mini-batches.

Unpickling: the model and optimizer files need no type beyond torch's own (DTensor, its mesh and placements);
the extra_state files also pickle numpy's RNG state (an ndarray), read with an allow-list of exactly the numpy
types involved. Any other type is refused unless the user trusts the files (`trust_pickles`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.tensor  # registers DTensor, DeviceMesh and the placements with the weights-only unpickler
from torch.distributed.tensor import DTensor, Shard

from ..checkpoint import CheckpointPaths, checkpoint_root
from ..errors import ProbeError
from ..optimizer_state import OptimizerState, optimizer_state_from
from .trainer_files import (
    TrainerFilesSource,
    finite_moment,
    hash_files,
    load_allow_listed,
    model_with_weights,
    named_adam_state,
    require_adam_keys,
)

TRACKER = "latest_checkpointed_iteration.txt"
FSDP_CONFIG = "fsdp_config.json"
LORA_META = "lora_train_meta.json"
RANK_FILE = re.compile(r"(model|optim|extra_state)_world_size_(\d+)_rank_(\d+)\.pt")
PEFT_ADAPTER = "default"  # the adapter name PEFT gives verl's one adapter; its saved files drop it from names
MOMENTS = ("exp_avg", "exp_avg_sq")
COPY_ALL_RANKS = "copy the whole actor directory: every rank writes its own shard"
OTHER_RUN = "remove the files of another run from the actor directory"
USE_FSDP2 = (
    "train with FSDP2 (actor_rollout_ref.actor.strategy=fsdp2) to probe it; verl's model merger recovers the "
    "weights of an FSDP1 checkpoint, but not the optimizer moments"
)
USE_ADAMW = "train with torch AdamW (actor_rollout_ref.actor.optim.optimizer_impl=torch.optim, optimizer=AdamW)"

# numpy's RNG state, pickled in extra_state: the full name a file refers to → the object it unpickles as
NUMPY_ALLOWED: dict[str, Any] = {
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
    "numpy.dtypes.UInt32DType": type(np.dtype(np.uint32)),  # the key array's dtype is rebuilt as an instance of it
    "numpy._core.multiarray._reconstruct": np._core.multiarray._reconstruct,  # numpy >= 2
    "numpy.core.multiarray._reconstruct": np._core.multiarray._reconstruct,  # the same, as numpy 1 named it
}


@contextlib.contextmanager
def _quiet_device_mesh():
    """Unpickling a DeviceMesh without a process group logs a warning per tensor; none applies to reading."""
    mesh_logger = logging.getLogger("torch.distributed.device_mesh")
    level = mesh_logger.level
    mesh_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        mesh_logger.setLevel(level)


def load_verl_file(path: Path, trust_pickles: bool = False) -> Any:
    """torch.load of one verl file with the weights-only unpickler, numpy's RNG types allowed; any other type
    refused unless `trust_pickles` (then a full unpickle)."""

    def hint(foreign: list[str]) -> str:
        low_bit = any(name.startswith(("torchao.", "bitsandbytes.")) for name in foreign)
        return f" (low-bit optimizer state: {USE_ADAMW})" if low_bit else ""

    with _quiet_device_mesh():
        return load_allow_listed(path, NUMPY_ALLOWED, trust_pickles, "verl", hint)


# ----------------------------------------------------------------------------------------------
# finding the files


@dataclass(frozen=True)
class VerlFiles:
    """The files of one verl actor checkpoint; each list indexed by rank (extra_files empty when not saved)."""

    actor_dir: Path  # <run>/global_step_N/actor
    fsdp_version: int
    world_size: int
    model_files: list[Path]
    optim_files: list[Path]
    extra_files: list[Path]


def _actor_dir(path: Path) -> Path | None:
    """The actor dir at `path`: itself, its actor/, or (a run root) the actor of the step its tracker names, else
    of its only global_step_*; None when `path` is none of these."""
    if (path / FSDP_CONFIG).is_file() or any(RANK_FILE.fullmatch(p.name) for p in path.glob("*.pt")):
        return path
    if (path / "actor").is_dir():
        return path / "actor"
    tracker = path / TRACKER
    if tracker.is_file():
        step = tracker.read_text().strip()
        step_dir = path / f"global_step_{step}"
        if not (step_dir / "actor").is_dir():
            raise ProbeError(
                f"{tracker} names step {step!r}, but {step_dir / 'actor'} is not a directory", COPY_ALL_RANKS
            )
        return step_dir / "actor"
    steps = sorted(p for p in path.glob("global_step_*") if (p / "actor").is_dir())
    if len(steps) > 1:
        raise ProbeError(
            f"{path} holds several verl checkpoints ({', '.join(p.name for p in steps)}) and no {TRACKER}",
            "set checkpoint.path to the global_step_N/actor directory to probe",
        )
    return steps[0] / "actor" if steps else None


def _rank_files(actor_dir: Path, kind: str, world_size: int, required: bool) -> list[Path]:
    """{kind}_world_size_W_rank_R.pt for R < W, in rank order; [] when not `required` and none exists."""
    paths = [actor_dir / f"{kind}_world_size_{world_size}_rank_{rank}.pt" for rank in range(world_size)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing and (required or len(missing) < world_size):
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ProbeError(
            f"verl checkpoint {actor_dir} (world size {world_size}) lacks {missing[0]}{more}", COPY_ALL_RANKS
        )
    return paths if not missing else []


def find_verl_checkpoint(path: Path) -> VerlFiles | None:
    """The verl actor files at `path` (an actor dir, a global_step_N dir, or the run root with its tracker), or
    None when it is no verl checkpoint. Refuses FSDP1, a missing rank file (named), files of another world size.

    fsdp_config.json gives the FSDP version and world size; without it (older verl) the world size comes from
    the file names and the version from the model file's values when read.
    """
    actor_dir = _actor_dir(Path(path))
    if actor_dir is None:
        return None
    sizes = {int(m.group(2)) for p in actor_dir.iterdir() if (m := RANK_FILE.fullmatch(p.name))}
    config_path = actor_dir / FSDP_CONFIG
    if not sizes:
        raise ProbeError(f"verl checkpoint {actor_dir} holds no model_world_size_W_rank_R.pt", COPY_ALL_RANKS)
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        version, world_size = int(config.get("FSDP_version", 0)), int(config.get("world_size", 0))
    elif len(sizes) == 1:
        version, world_size = 2, sizes.pop()
    else:
        raise ProbeError(
            f"verl checkpoint {actor_dir} has no {FSDP_CONFIG} and rank files of world sizes {sorted(sizes)}",
            OTHER_RUN,
        )
    if version == 1:
        raise ProbeError(f"{config_path} records FSDP_version 1: FSDP1 saves flat shards without names", USE_FSDP2)
    if version != 2 or world_size < 1:
        raise ProbeError(
            f"{config_path} records FSDP_version {version} and world_size {world_size}, not an FSDP2 checkpoint",
            USE_FSDP2,
        )
    if sizes - {world_size}:
        raise ProbeError(
            f"verl checkpoint {actor_dir} (world size {world_size}) holds rank files of world size "
            f"{min(sizes - {world_size})}",
            OTHER_RUN,
        )
    return VerlFiles(
        actor_dir=actor_dir,
        fsdp_version=version,
        world_size=world_size,
        model_files=_rank_files(actor_dir, "model", world_size, required=True),
        optim_files=_rank_files(actor_dir, "optim", world_size, required=True),
        extra_files=_rank_files(actor_dir, "extra_state", world_size, required=False),
    )


# ----------------------------------------------------------------------------------------------
# joining the ranks' pieces


def _full_tensor(pieces: list[Any], what: str, where: Path) -> torch.Tensor:
    """The full fp32 tensor of one parameter (or moment) from each rank's DTensor piece, in rank order."""
    first = pieces[0]
    if not all(isinstance(piece, DTensor) for piece in pieces):
        kind = next(type(p).__name__ for p in pieces if not isinstance(p, DTensor))
        raise ProbeError(f"{where}: {what} is a {kind}, not an FSDP2 DTensor", USE_FSDP2)
    placements = first.placements
    if first.device_mesh.ndim != 1 or any(piece.placements != placements for piece in pieces):
        raise ProbeError(
            f"{where}: {what} is sharded over a {first.device_mesh.ndim}-D mesh as {placements} (HSDP or tensor "
            "parallelism): only a 1-D FSDP mesh is supported",
            "train with actor_rollout_ref.actor.fsdp_config.fsdp_size=-1 (one FSDP group over all ranks)",
        )
    if not isinstance(placements[0], Shard):
        raise ProbeError(f"{where}: {what} has placement {placements[0]}, not FSDP2's Shard", USE_FSDP2)
    full = torch.cat([piece.to_local() for piece in pieces], dim=placements[0].dim)
    if full.shape != first.shape:
        raise ProbeError(
            f"{where}: the ranks' pieces of {what} join to {tuple(full.shape)}, its shape is {tuple(first.shape)}: "
            "the sizes do not add up",
            COPY_ALL_RANKS,
        )
    return full.float()


def _finite(name: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
    return finite_moment(name, key, tensor, "verl")


def _tied_aliases(model_sd: dict[str, Any]) -> dict[str, str]:
    """{alias: name} for the parameters whose local piece is a view of an earlier one's (same storage, offset,
    shape): torch.save keeps that sharing, and a tied weight is the one case of it in a model file."""
    seen: dict[tuple, str] = {}
    tied = {}
    for name, value in model_sd.items():
        if not isinstance(value, DTensor) or value.to_local().numel() == 0:
            continue
        local = value.to_local()
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape), local.stride())
        if key in seen:
            tied[name] = seen[key]
        else:
            seen[key] = name
    return tied


# ----------------------------------------------------------------------------------------------
# reading the state


@dataclass
class VerlLora:
    """The LoRA adapter of a verl run: r and alpha from lora_train_meta.json; the adapter's tensors (fp32, full
    shapes) under the names PEFT saves them by (adapter_model.safetensors: the `.default` adapter name dropped)."""

    r: int
    alpha: float
    adapter: dict[str, torch.Tensor]
    peft_names: dict[str, str]  # model-file name (…lora_A.default.weight) → PEFT's saved name (…lora_A.weight)


@dataclass
class VerlState:
    """A verl actor checkpoint per parameter name (CPU, fp32, full shapes).

    names: the parameters the optimizer steps (those with state), in optimizer order, by model-file name;
    weights: every parameter of the model file (a tied alias once, under its first name; LoRA: base and
    adapter; cast to fp32 if saved in another dtype); exp_avg, exp_avg_sq, step: AdamW's state per name in `names` (step: one count per parameter);
    groups: each param group's {lr, betas, eps, weight_decay, names}, lr being the next step's (the
    scheduler's); tied: {alias: name}; unstepped: parameters in a group without state (LoRA's frozen base);
    lora: the adapter with r and alpha, None for a full-parameter run.
    """

    names: list[str]
    weights: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: dict[str, float]
    groups: list[dict]
    tied: dict[str, str]
    unstepped: list[str]
    lora: VerlLora | None


def _optimizer_dict(path: Path, trust_pickles: bool) -> dict:
    saved = load_verl_file(path, trust_pickles)
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict) and saved.get("param_groups")):
        raise ProbeError(
            f"{path} is not a torch optimizer state_dict (state, param_groups)",
            "probe a checkpoint written by verl's FSDPCheckpointManager",
        )
    return saved


def _names_by_id(parameter_names: list[str], optim_sd: dict, path: Path) -> dict[int, str]:
    """{optimizer id: parameter name}. torch numbers the parameters of its groups in order; verl's one group is
    module.parameters(), i.e. the model file's parameters without tied aliases. A save_lora_only model file
    holds only the parameters with state, in id order. Groups saved with `param_names` name their ids."""
    groups = optim_sd["param_groups"]
    ids = [i for group in groups for i in group["params"]]
    saved_names = [name for group in groups for name in group.get("param_names", [])]
    if saved_names:
        unknown = [name for name in saved_names if name not in parameter_names]
        if unknown:
            raise ProbeError(f"{path} names {unknown[0]}, which the model file lacks", OTHER_RUN)
        return dict(zip(ids, saved_names))
    if len(groups) > 1:
        raise ProbeError(
            f"{path} holds {len(groups)} param groups without param_names: which id is which parameter is unknown",
            "probe a run of verl's FSDP engine (one param group over module.parameters())",
        )
    with_state = sorted(optim_sd["state"])
    if len(ids) == len(parameter_names) and set(with_state) <= set(ids):
        return dict(zip(ids, parameter_names))
    if len(ids) > len(parameter_names) == len(with_state) and set(with_state) <= set(ids):  # save_lora_only
        return dict(zip(with_state, parameter_names))
    raise ProbeError(
        f"{path} lists {len(ids)} parameters ({len(with_state)} with state), the model file holds "
        f"{len(parameter_names)} (tied aliases excluded): the sizes do not add up",
        OTHER_RUN,
    )


def _check_adamw(group: dict, index: int, path: Path) -> None:
    missing = [key for key in ("lr", "betas", "eps", "weight_decay") if key not in group]
    if missing:
        raise ProbeError(f"{path}: param group {index} lacks {missing} (not an Adam/AdamW state)", USE_ADAMW)
    if group.get("amsgrad") or group.get("maximize"):
        which = "amsgrad" if group.get("amsgrad") else "maximize"
        raise ProbeError(f"{path}: param group {index} sets {which}=True, not plain AdamW", USE_ADAMW)
    if group.get("decoupled_weight_decay") is False and group["weight_decay"] != 0:
        raise ProbeError(
            f"{path}: param group {index} is Adam with L2 weight decay {group['weight_decay']}, not AdamW", USE_ADAMW
        )


def _next_lrs(files: VerlFiles, optim_sd: dict, trust_pickles: bool) -> list[float]:
    """Each group's lr of the next step: the scheduler's _last_lr (rank 0's extra_state), checked against the
    optimizer's group lr; the group lr alone when extra_state was not saved or holds no scheduler."""
    group_lrs = [float(group["lr"]) for group in optim_sd["param_groups"]]
    if not files.extra_files:
        return group_lrs
    scheduler = (load_verl_file(files.extra_files[0], trust_pickles) or {}).get("lr_scheduler")
    if scheduler is None:
        return group_lrs
    scheduler_lrs = [float(lr) for lr in scheduler.get("_last_lr", [])]
    if scheduler_lrs != group_lrs:
        raise ProbeError(
            f"{files.extra_files[0]}: the scheduler's last lr {scheduler_lrs} is not the optimizer's group lr "
            f"{group_lrs} in {files.optim_files[0]}",
            OTHER_RUN,
        )
    return scheduler_lrs


def _lora(files: VerlFiles, weights: dict[str, torch.Tensor]) -> VerlLora | None:
    """The adapter and its r/alpha, None when the model file has no LoRA tensor. alpha is read from
    lora_train_meta.json only: verl's model merger writes lora_alpha 0 into the adapter_config.json it makes
    when that file is missing, so a merged adapter's alpha is not evidence."""
    marker = f".{PEFT_ADAPTER}."
    peft_names = {name: name.replace(marker, ".") for name in weights if ".lora_" in name and marker in name}
    if not peft_names:
        return None
    meta_path = files.actor_dir / LORA_META
    if not meta_path.is_file():
        raise ProbeError(
            f"verl LoRA checkpoint {files.actor_dir} has no {LORA_META}: its lora_alpha is unknown",
            f'write {meta_path} as {{"r": R, "lora_alpha": A}} with the run\'s actor_rollout_ref.model.lora_rank '
            "and lora_alpha (a newer verl writes it)",
        )
    meta = json.loads(meta_path.read_text())
    r, alpha = int(meta.get("r", 0)), float(meta.get("lora_alpha", 0))
    if r < 1 or alpha <= 0:
        raise ProbeError(f"{meta_path} records r {r} and lora_alpha {alpha}: both must be positive", "re-save it")
    for name in peft_names:
        rows = weights[name].shape[0] if ".lora_A." in name else weights[name].shape[-1]
        if rows != r:
            raise ProbeError(f"{name} has rank {rows}, {meta_path} records r {r}: the sizes do not add up", OTHER_RUN)
    return VerlLora(r, alpha, {peft: weights[name] for name, peft in peft_names.items()}, peft_names)


def _adam_state(
    name: str, per_rank: list[dict], shape: torch.Size, files: VerlFiles
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(exp_avg, exp_avg_sq, step) of one parameter from each rank's optimizer state for it, in rank order."""
    for path, state in zip(files.optim_files, per_rank):
        require_adam_keys(path, name, state, USE_ADAMW)
        for key in MOMENTS:
            if state[key].dtype != torch.float32:
                raise ProbeError(
                    f"{path}: {key} of {name} is {state[key].dtype}, not float32 (a low-bit optimizer's state)",
                    USE_ADAMW,
                )
    moments = []
    for key in MOMENTS:
        moment = _full_tensor([state[key] for state in per_rank], f"{key} of {name}", files.actor_dir)
        if moment.shape != shape:
            raise ProbeError(
                f"{key} of {name} has shape {tuple(moment.shape)}, the weight {tuple(shape)}: the sizes do not add up",
                OTHER_RUN,
            )
        moments.append(_finite(name, key, moment))
    steps = {float(state["step"]) for state in per_rank}
    if len(steps) != 1 or not (math.isfinite(min(steps)) and min(steps) >= 1):
        raise ProbeError(
            f"{files.actor_dir}: Adam's step of {name} is {sorted(steps)} across the ranks, expected one count >= 1",
            OTHER_RUN,
        )
    return moments[0], moments[1], steps.pop()


def read_verl_state(files: VerlFiles, trust_pickles: bool = False) -> VerlState:
    """Every rank's shards of `files` joined into full per-parameter fp32 weights and AdamW state.

    Refuses (one-line ProbeError): values that are not FSDP2 DTensors, a non-AdamW state (no exp_avg /
    exp_avg_sq: e.g. bitsandbytes 8-bit; moments not fp32: e.g. torchao), a type outside the allow-list (unless
    trust_pickles), pieces or counts that do not add up, non-finite moments, a LoRA run without its meta file.
    """
    model_sds = [load_verl_file(path, trust_pickles) for path in files.model_files]
    optim_sds = [_optimizer_dict(path, trust_pickles) for path in files.optim_files]
    for path, model_sd in zip(files.model_files, model_sds):
        if list(model_sd) != list(model_sds[0]):
            raise ProbeError(f"{path} holds other names than {files.model_files[0]}", OTHER_RUN)
    if not any(isinstance(value, DTensor) for value in model_sds[0].values()):
        raise ProbeError(f"{files.model_files[0]} holds no DTensor: not an FSDP2 checkpoint", USE_FSDP2)

    tied = _tied_aliases(model_sds[0])
    parameter_names = [n for n, v in model_sds[0].items() if isinstance(v, DTensor) and n not in tied]
    weights = {name: _full_tensor([sd[name] for sd in model_sds], name, files.actor_dir) for name in parameter_names}
    name_of = _names_by_id(parameter_names, optim_sds[0], files.optim_files[0])

    for index, group in enumerate(optim_sds[0]["param_groups"]):
        _check_adamw(group, index, files.optim_files[0])
    exp_avg, exp_avg_sq, step = {}, {}, {}
    for i, name in name_of.items():
        per_rank = [sd["state"].get(i) or {} for sd in optim_sds]
        # without state (LoRA's frozen base, or a parameter never given a gradient) it is `unstepped`
        if any(per_rank):
            exp_avg[name], exp_avg_sq[name], step[name] = _adam_state(name, per_rank, weights[name].shape, files)

    lrs = _next_lrs(files, optim_sds[0], trust_pickles)
    groups = []
    for group, lr in zip(optim_sds[0]["param_groups"], lrs):
        names = [name_of[i] for i in group["params"] if i in name_of and name_of[i] in step]
        hyper = {"lr": lr, "eps": float(group["eps"]), "weight_decay": float(group["weight_decay"])}
        groups.append({**hyper, "betas": [float(b) for b in group["betas"]], "names": names})
    names = [name for group in groups for name in group["names"]]
    unstepped = [name for name in parameter_names if name not in step]
    return VerlState(names, weights, exp_avg, exp_avg_sq, step, groups, tied, unstepped, _lora(files, weights))


# ----------------------------------------------------------------------------------------------
# the checkpoint source: a verl actor checkpoint (full-parameter or LoRA)


class VerlFsdpSource(TrainerFilesSource):
    """θ = the fp32 weights joined from the ranks' FSDP2 shards, the AdamW state of the same names, the one param
    group with the scheduler's next lr; the architecture and tokenizer from the actor's huggingface/ dir. verl
    keeps no trainer_config.json or trainer_state.json: the trainer's settings are unknown (stated defaults,
    logged) unless params set them. A LoRA run is a PEFT LoRA on the base its shards hold."""

    name = "verl-fsdp"

    def __init__(self) -> None:
        self._states: dict[Path, VerlState] = {}  # read once per actor dir: model and optimizer share it
        self._trust_pickles = False

    def resolve(self, checkpoint) -> CheckpointPaths:
        root = checkpoint_root(checkpoint)
        self._trust_pickles = checkpoint.trust_pickles
        if checkpoint.base_model is not None or checkpoint.use_qlora:
            raise ProbeError(
                f"checkpoint.{'base_model' if checkpoint.base_model is not None else 'use_qlora'} is set, but {root} "
                "is a verl checkpoint: its own shards hold the policy",
                "unset checkpoint.base_model (null) and set checkpoint.use_qlora: false",
            )
        files = find_verl_checkpoint(root)
        if files is None:
            raise ProbeError(f"{root} holds no verl actor checkpoint", "set checkpoint.format: auto")
        hf_dir = files.actor_dir / "huggingface"
        if not (hf_dir / "config.json").is_file():
            raise ProbeError(
                f"{hf_dir} has no config.json (verl saves it with every checkpoint)", "copy the whole actor dir"
            )
        return CheckpointPaths(
            format=self.name,
            weights_dir=hf_dir,
            optimizer_path=files.actor_dir,
            scheduler_path=None,
            trainer_state_path=None,
            training_args_path=None,
            base_model=str(hf_dir),
            name_map_path=None,
            trainer_config_path=None,
        )

    def fingerprint(self, paths: CheckpointPaths) -> str:
        """sha256 over the actor's rank files, fsdp_config.json and huggingface/config.json."""
        actor = sorted(p for p in paths.optimizer_path.iterdir() if p.is_file())
        return hash_files([paths.weights_dir / "config.json", *actor])

    def state(self, paths: CheckpointPaths) -> VerlState:
        key = paths.optimizer_path.resolve()
        if key not in self._states:
            state = read_verl_state(find_verl_checkpoint(paths.optimizer_path), self._trust_pickles)
            trained = [n for n in state.unstepped if state.lora is None or n in state.lora.peft_names]
            if trained:  # a LoRA run's frozen base has no state by design; a trained tensor must
                raise ProbeError(
                    f"parameter {trained[0]} of {paths.optimizer_path} has no optimizer state (it never "
                    "received a gradient)",
                    "probe a checkpoint where every trained tensor was updated",
                )
            self._states[key] = state
        return self._states[key]

    def load_model(self, checkpoint, paths: CheckpointPaths):
        """The architecture from huggingface/config.json (its dtype entry ignored: the shards are fp32), its
        weights the joined shards cast to checkpoint.dtype; for a LoRA run the base from the shards' base_layer
        tensors and a PEFT LoRA (r and alpha from lora_train_meta.json) holding the adapter's, only it trainable."""
        state = self.state(paths)
        if state.lora is None:
            return model_with_weights(checkpoint, paths.weights_dir, state.weights, paths.optimizer_path)
        return _lora_model(checkpoint, paths, state)

    def load_optimizer(self, model, paths: CheckpointPaths) -> OptimizerState:
        state = self.state(paths)
        mapping = f"verl FSDP2 shards ({paths.optimizer_path.parent.name})"
        return optimizer_state_from(model, named_adam_state(state), state.groups, mapping)

    def observed_step(self, paths, next_paths, layout, model):
        """θ(next) − θ(this) of the joined fp32 shards."""
        from ..observed import delta_theta

        where = (paths.optimizer_path, next_paths.optimizer_path)
        fix = "copy the whole actor dir of both steps"
        return delta_theta(self.state(paths).weights, self.state(next_paths).weights, layout, where, fix)


def _lora_model(checkpoint, paths: CheckpointPaths, state: VerlState):
    """PEFT's LoRA (dropout off) on the base the shards hold, with the adapter's tensors; eval mode."""
    from peft import LoraConfig, get_peft_model

    def base_name(name: str) -> str:  # base_model.model.<x>.base_layer.weight → <x>.weight
        return name.removeprefix("base_model.model.").replace(".base_layer.", ".")

    lora = state.lora
    base_weights = {base_name(n): w for n, w in state.weights.items() if n not in lora.peft_names}
    base = model_with_weights(checkpoint, paths.weights_dir, base_weights, paths.optimizer_path)
    targets = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora.peft_names})
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=targets)
    with torch.random.fork_rng():  # PEFT draws lora_A's initial values: overwritten below, the RNG left as it was
        model = get_peft_model(base, config)
    named = dict(model.named_parameters())
    missing = sorted(set(lora.peft_names) - set(named))
    if missing:
        raise ProbeError(
            f"adapter tensor {missing[0]} of {paths.optimizer_path} has no place in PEFT's LoRA on {targets}",
            "probe a LoRA run of verl's own PEFT setup",
        )
    with torch.no_grad():
        for name in lora.peft_names:
            named[name].copy_(state.weights[name])
    trainable = {n for n, p in named.items() if p.requires_grad}
    if trainable != set(lora.peft_names):
        odd = sorted(trainable ^ set(lora.peft_names))[0]
        raise ProbeError(f"PEFT's LoRA and the verl adapter disagree on {odd}", "probe a LoRA run of verl's own setup")
    return model.eval()
