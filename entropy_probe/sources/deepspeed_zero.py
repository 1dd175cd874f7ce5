"""DeepSpeed ZeRO-1/2/3 checkpoints (as the Hugging Face Trainer saves them) → named fp32 weights + AdamW state.

Layout of `checkpoint-N/` (the Trainer's files beside DeepSpeed's):

    latest                      text: the tag of the DeepSpeed checkpoint, e.g. `global_step4`
    global_step4/
        [bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt    one per data-parallel rank R (bf16_: bf16 training)
        mp_rank_00_model_states.pt                          ZeRO-1/2: one file
        zero_pp_rank_R_mp_rank_00_model_states.pt           ZeRO-3: one per rank (never a bf16_ prefix)
    model.safetensors           the weights in the *training* dtype (bf16 under bf16), not the fp32 master;
                                absent under ZeRO-3 unless stage3_gather_16bit_weights_on_model_save is set

A model-states file holds `param_shapes`: one {name: shape} dict per flat group, in the order the names were
flattened. A name is the model's `named_parameters()` name; a weight tied to another (lm_head ↔ embed_tokens)
appears once, under the first name; rank 0's model-states file records the alias in `shared_params`.

An optimizer file holds `optimizer_state_dict`: the torch optimizer's state over *flat* tensors (one per flat
group; its `param_groups[g]["params"]` lists the flat ids of param group g with its lr/betas/eps/weight_decay,
the lr being the next step's) and this rank's slice of every flat fp32 master tensor:

    ZeRO-1/2  `single_partition_of_fp32_groups[k]` and `base_optimizer_state["state"][k]["exp_avg"|...]`: the
              flat group k cut into equal contiguous slices, one per rank, so a rank boundary may fall inside
              a parameter; `param_slice_mappings[k][name]` = (start, numel) of the name's piece on this rank.
              The last rank's slice may end in padding (dropped from the fp32 slice, kept in the moments).
    ZeRO-3    `fp32_flat_groups[k]` and `optimizer_state_dict["state"][k][...]`: every parameter of flat group
              k cut into ceil(numel / world) elements per rank (the last ranks' pieces padded), the pieces
              laid end to end in `param_shapes[k]` order. A param group may be split into several flat
              sub-groups (DeepSpeed's `sub_group_size`).

The files pickle three DeepSpeed types besides tensors and containers; they are read with torch's weights-only
unpickler and plain stand-ins for exactly these types (deepspeed need not be installed). Any other type is
refused unless the user trusts the files (`trust_pickles`).
"""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ..checkpoint import (
    SCHEDULER,
    TRAINER_CONFIG,
    TRAINER_STATE,
    TRAINING_ARGS,
    CheckpointPaths,
    checkpoint_root,
)
from ..errors import ProbeError
from ..optimizer_state import OptimizerState, optimizer_state_from
from .trainer_files import (
    TrainerFilesSource,
    finite_moment,
    hash_files,
    load_allow_listed,
    model_with_weights,
    named_adam_state,
)

OPTIM_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
ZERO3_MODEL_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt")
ZERO12_MODEL_FILE = "mp_rank_00_model_states.pt"
COPY_ALL_RANKS = "copy the whole checkpoint directory: every data-parallel rank writes its own shard"


# ----------------------------------------------------------------------------------------------
# what the files pickle besides tensors: stand-ins, by the name the pickle refers to


@dataclass
class FragmentAddress:
    """deepspeed.utils.tensor_fragment.fragment_address: a parameter's piece of one rank's flat slice."""

    numel: int
    start: int


class LossScaler:
    """deepspeed.runtime.fp16.loss_scaler.LossScaler (static loss scale; its attributes only, no behaviour)."""


STAND_INS: dict[str, Any] = {  # the full name a DeepSpeed file pickles → what we unpickle it as
    "deepspeed.utils.tensor_fragment.fragment_address": FragmentAddress,
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": LossScaler,
    "deepspeed.runtime.zero.config.ZeroStageEnum": int,  # an IntEnum, pickled as ZeroStageEnum(stage)
}


def _pickle_with_stand_ins() -> ModuleType:
    """The pickle module, except that DeepSpeed's types resolve to the stand-ins (for a trusted full unpickle
    that works without deepspeed installed)."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            return STAND_INS.get(f"{module}.{name}") or super().find_class(module, name)

    module = ModuleType("pickle_with_deepspeed_stand_ins")
    module.Unpickler, module.load = Unpickler, pickle.load
    return module


def load_deepspeed_file(path: Path, trust_pickles: bool = False) -> Any:
    """torch.load of one DeepSpeed file: the weights-only unpickler, allowing the DeepSpeed stand-ins above; any
    other type refused unless `trust_pickles` (then a full unpickle, DeepSpeed's types still as stand-ins)."""
    return load_allow_listed(path, STAND_INS, trust_pickles, "DeepSpeed", pickle_module=_pickle_with_stand_ins())


# ----------------------------------------------------------------------------------------------
# finding the files


@dataclass(frozen=True)
class ZeroFiles:
    """The DeepSpeed files of one checkpoint, each list indexed by data-parallel rank."""

    tag_dir: Path  # checkpoint-N/global_stepN
    stage: int  # 1, 2 or 3
    world_size: int  # data-parallel ranks that wrote a shard
    optim_files: list[Path]
    model_files: list[Path]  # ZeRO-1/2: the one mp_rank_00_model_states.pt; ZeRO-3: one per rank


def _tag_dir(checkpoint_dir: Path) -> Path | None:
    """checkpoint_dir/<tag named in `latest`>, else the only global_step* dir; None if there is neither."""
    latest = checkpoint_dir / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if not (checkpoint_dir / tag).is_dir():
            raise ProbeError(
                f"{latest} names the DeepSpeed tag {tag!r}, but {checkpoint_dir / tag} is not a directory",
                COPY_ALL_RANKS,
            )
        return checkpoint_dir / tag
    tags = sorted(p for p in checkpoint_dir.glob("global_step*") if p.is_dir())
    if len(tags) > 1:
        raise ProbeError(
            f"{checkpoint_dir} holds several DeepSpeed tags ({', '.join(p.name for p in tags)}) and no `latest` file",
            "write the tag to probe into a file named `latest` beside them",
        )
    return tags[0] if tags else None


def _files_by_rank(tag_dir: Path, pattern: re.Pattern) -> dict[int, Path]:
    """{rank: file} of the files matching pattern (groups: data-parallel rank, model-parallel rank)."""
    by_rank = {}
    for path in sorted(tag_dir.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None:
            continue
        if int(match.group(2)) != 0:
            raise ProbeError(
                f"{path} belongs to model-parallel rank {int(match.group(2))}: tensor/pipeline-parallel DeepSpeed "
                "checkpoints are not supported",
                "convert it with DeepSpeed's ds_to_universal, or probe a data-parallel ZeRO checkpoint",
            )
        by_rank[int(match.group(1))] = path
    return by_rank


def _in_rank_order(by_rank: dict[int, Path], world_size: int, what: str, tag_dir: Path) -> list[Path]:
    missing = [r for r in range(world_size) if r not in by_rank]
    if missing:
        raise ProbeError(
            f"DeepSpeed checkpoint {tag_dir} (data-parallel world size {world_size}) lacks the {what} file of "
            f"rank {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            COPY_ALL_RANKS,
        )
    extra = sorted(r for r in by_rank if r >= world_size)
    if extra:
        raise ProbeError(
            f"DeepSpeed checkpoint {tag_dir} has a {what} file of rank {extra[0]}, but its world size is {world_size}",
            "remove the files of another run from the tag directory",
        )
    return [by_rank[r] for r in range(world_size)]


def find_zero_checkpoint(checkpoint_dir: Path, trust_pickles: bool = False) -> ZeroFiles | None:
    """The DeepSpeed files of `checkpoint_dir`, or None when it is no DeepSpeed checkpoint (no `latest`, no
    global_step*). Refuses (ProbeError) a tag without optimizer files, a missing rank, model parallelism.
    Reads the stage and world size from a model-states file (memory-mapped: its tensors are not read)."""
    tag_dir = _tag_dir(Path(checkpoint_dir))
    if tag_dir is None:
        return None
    optim_by_rank = _files_by_rank(tag_dir, OPTIM_FILE)
    if not optim_by_rank:
        raise ProbeError(
            f"DeepSpeed checkpoint {tag_dir} holds no *_optim_states.pt (saved without optimizer state)",
            "probe a checkpoint saved with its optimizer state (the Trainer's save_only_model=False)",
        )
    zero3_models = _files_by_rank(tag_dir, ZERO3_MODEL_FILE)
    first_model_file = zero3_models[min(zero3_models)] if zero3_models else tag_dir / ZERO12_MODEL_FILE
    if not first_model_file.is_file():
        raise ProbeError(f"DeepSpeed checkpoint {tag_dir} lacks {ZERO12_MODEL_FILE}", COPY_ALL_RANKS)
    model_states = load_deepspeed_file(first_model_file, trust_pickles)
    try:
        stage = int(model_states["ds_config"]["zero_optimization"]["stage"])
        world_size = int(model_states["dp_world_size"])
    except (KeyError, TypeError, ValueError):
        raise ProbeError(
            f"{first_model_file} records no ZeRO stage and data-parallel world size (ds_config, dp_world_size)",
            "probe a checkpoint written by DeepSpeed's engine.save_checkpoint (e.g. by the Hugging Face Trainer)",
        ) from None
    if (stage == 3) != bool(zero3_models) or stage not in (1, 2, 3):
        raise ProbeError(
            f"{first_model_file} records ZeRO stage {stage}, which does not match the file names in {tag_dir}",
            "remove the files of another run from the tag directory",
        )
    optim_files = _in_rank_order(optim_by_rank, world_size, "optimizer-state", tag_dir)
    model_files = _in_rank_order(zero3_models, world_size, "model-state", tag_dir) if stage == 3 else [first_model_file]
    return ZeroFiles(tag_dir, stage, world_size, optim_files, model_files)


# ----------------------------------------------------------------------------------------------
# reading the state


@dataclass
class ZeroState:
    """The fp32 master weights and AdamW state of a ZeRO checkpoint per parameter name (CPU, fp32, full shapes).

    names: every parameter in optimizer order (group 0's, then group 1's, ...); groups: each param group's
    {lr, betas, eps, weight_decay, names} as saved (lr: the next step's); step: Adam's step count per name;
    tied: {alias: name holding the data} as DeepSpeed recorded them (e.g. lm_head.weight → embed_tokens).
    """

    names: list[str]
    master: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: dict[str, float]
    groups: list[dict]
    tied: dict[str, str]


@dataclass
class _RankShard:
    """One rank's flat slices of flat group k: fp32 master, exp_avg, exp_avg_sq (1-D), and Adam's step."""

    master: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: float


def _optimizer_dicts(path: Path, stage: int, trust_pickles: bool) -> tuple[dict, dict, list[torch.Tensor]]:
    """(DeepSpeed's optimizer_state_dict, the torch optimizer's state_dict inside it, the rank's fp32 slices)."""
    saved = load_deepspeed_file(path, trust_pickles)
    try:
        zero_sd = saved["optimizer_state_dict"]
        saved_stage = int(zero_sd["zero_stage"])
        if stage == 3:
            torch_sd, master_slices = zero_sd["optimizer_state_dict"], zero_sd["fp32_flat_groups"]
        else:
            torch_sd, master_slices = zero_sd["base_optimizer_state"], zero_sd["single_partition_of_fp32_groups"]
        known = isinstance(torch_sd["state"], dict) and isinstance(torch_sd["param_groups"], list)
    except (KeyError, TypeError, ValueError):
        known = False
    if not known:
        raise ProbeError(
            f"{path} is not a DeepSpeed ZeRO-{stage} optimizer-state file of the known layout",
            "probe a checkpoint written by DeepSpeed's engine.save_checkpoint (e.g. by the Hugging Face Trainer)",
        )
    if saved_stage != stage:
        raise ProbeError(
            f"{path} holds ZeRO stage {saved_stage} state, the model-states file says stage {stage}",
            "remove the files of another run from the tag directory",
        )
    return zero_sd, torch_sd, master_slices


def _rank_shard(torch_sd: dict, master_slices: list[torch.Tensor], k: int, path: Path) -> _RankShard:
    """The rank's slices of flat group k, refused unless they carry Adam's exp_avg, exp_avg_sq and step."""
    state = torch_sd["state"].get(k) or {}
    if "exp_avg" not in state or "exp_avg_sq" not in state:
        raise ProbeError(
            f"{path}: the optimizer state of flat group {k} has {sorted(state) or 'no entries'}, not exp_avg and "
            "exp_avg_sq (not an Adam/AdamW state: e.g. an 8-bit or other optimizer)",
            "train with AdamW (the Trainer's optim=adamw_torch, or DeepSpeed's Adam/AdamW)",
        )
    step = float(state.get("step", float("nan")))
    if not (math.isfinite(step) and step >= 1):
        raise ProbeError(f"{path}: Adam's step of flat group {k} is {step}, expected >= 1", "re-save the checkpoint")
    return _RankShard(
        master=master_slices[k].detach().reshape(-1),
        exp_avg=state["exp_avg"].detach().reshape(-1),
        exp_avg_sq=state["exp_avg_sq"].detach().reshape(-1),
        step=step,
    )


def _zero12_pieces(zero_sd: dict, shard: _RankShard, k: int, path: Path) -> dict[str, slice]:
    """ZeRO-1/2: {name: its piece of the rank's flat group k} from param_slice_mappings (moments: same slice)."""
    pieces = {}
    for name, address in zero_sd["param_slice_mappings"][k].items():
        cut = slice(address.start, address.start + address.numel)
        if cut.stop > shard.master.numel() or cut.stop > shard.exp_avg.numel():
            raise ProbeError(
                f"{path}: {name} lies at [{cut.start}, {cut.stop}) of flat group {k}, past its end "
                f"({shard.master.numel()} elements): the sizes do not add up",
                "re-save the checkpoint (a file is truncated or from another run)",
            )
        pieces[name] = cut
    return pieces


def _zero3_pieces(
    shapes: dict[str, torch.Size], shard: _RankShard, rank: int, world: int, k: int, path: Path
) -> dict[str, slice]:
    """ZeRO-3: {name: slice of the rank's flat group} — ceil(numel / world) elements per parameter, end to end,
    of which the first min(that, numel - rank * that) are real (the rest is padding)."""
    pieces, offset = {}, 0
    for name, shape in shapes.items():
        per_rank = math.ceil(math.prod(shape) / world)
        real = max(0, min(per_rank, math.prod(shape) - rank * per_rank))
        pieces[name] = slice(offset, offset + real)
        offset += per_rank
    sizes = {shard.master.numel(), shard.exp_avg.numel(), shard.exp_avg_sq.numel()}
    if sizes != {offset}:
        raise ProbeError(
            f"{path}: flat group {k} has {sorted(sizes)} elements, its {len(shapes)} parameters padded to "
            f"{world} ranks need {offset}: the sizes do not add up",
            "re-save the checkpoint (a file is truncated or from another run)",
        )
    return pieces


def _finite(name: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
    return finite_moment(name, key, tensor, "DeepSpeed")


def read_zero_state(files: ZeroFiles, trust_pickles: bool = False) -> ZeroState:
    """Every rank's shards of `files` joined into full per-parameter fp32 master weights and AdamW moments.

    Refuses (one-line ProbeError): a non-Adam state (no exp_avg/exp_avg_sq), a type outside the allow-list
    (unless trust_pickles), pieces that do not add up to a parameter's shape, non-finite moments.
    """
    model_states = load_deepspeed_file(files.model_files[0], trust_pickles)
    param_shapes: list[dict[str, torch.Size]] = model_states["param_shapes"]
    ranks = [_optimizer_dicts(path, files.stage, trust_pickles) for path in files.optim_files]
    torch_sd0 = ranks[0][1]
    if len(torch_sd0["state"]) != len(param_shapes):
        raise ProbeError(
            f"{files.optim_files[0]} holds {len(torch_sd0['state'])} flat groups, {files.model_files[0]} "
            f"describes {len(param_shapes)}: the sizes do not add up",
            "remove the files of another run from the tag directory",
        )

    # pieces[name][key]: the name's pieces of master / exp_avg / exp_avg_sq, in rank order
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    step: dict[str, float] = {}
    for k, shapes in enumerate(param_shapes):
        for rank, (path, (zero_sd, torch_sd, master_slices)) in enumerate(zip(files.optim_files, ranks)):
            shard = _rank_shard(torch_sd, master_slices, k, path)
            if files.stage == 3:
                cuts = _zero3_pieces(shapes, shard, rank, files.world_size, k, path)
            else:
                cuts = _zero12_pieces(zero_sd, shard, k, path)
            for name, cut in cuts.items():
                if name not in shapes:
                    raise ProbeError(
                        f"{path} maps {name}, which {files.model_files[0]} does not list in flat group {k}",
                        "remove the files of another run from the tag directory",
                    )
                by_key = pieces.setdefault(name, {"master": [], "exp_avg": [], "exp_avg_sq": []})
                for key in by_key:
                    by_key[key].append(getattr(shard, key)[cut])
            for name in shapes:
                if step.setdefault(name, shard.step) != shard.step:
                    raise ProbeError(
                        f"{path}: Adam's step of flat group {k} is {shard.step}, rank 0 saved {step[name]}",
                        "remove the files of another run from the tag directory",
                    )

    master, exp_avg, exp_avg_sq = {}, {}, {}
    for shapes in param_shapes:
        for name, shape in shapes.items():
            joined = {key: torch.cat(parts) for key, parts in pieces.get(name, {}).items()}
            held = joined["master"].numel() if joined else 0
            if held != math.prod(shape):
                raise ProbeError(
                    f"the DeepSpeed shards hold {held} elements of {name}, its shape {tuple(shape)} has "
                    f"{math.prod(shape)}: the sizes do not add up",
                    COPY_ALL_RANKS,
                )
            master[name] = _finite(name, "master weight", joined["master"].float().reshape(shape))
            exp_avg[name] = _finite(name, "exp_avg", joined["exp_avg"].float().reshape(shape))
            exp_avg_sq[name] = _finite(name, "exp_avg_sq", joined["exp_avg_sq"].float().reshape(shape))

    groups = []
    for gi, group in enumerate(torch_sd0["param_groups"]):
        missing = [key for key in ("lr", "betas", "eps", "weight_decay") if key not in group]
        if missing:
            raise ProbeError(
                f"{files.optim_files[0]} param group {gi} lacks {missing} (not an Adam/AdamW state)",
                "train with AdamW (the Trainer's optim=adamw_torch, or DeepSpeed's Adam/AdamW)",
            )
        names = [name for k in group["params"] if k < len(param_shapes) for name in param_shapes[k]]
        hyper = {key: float(group[key]) for key in ("lr", "eps", "weight_decay")}
        groups.append({**hyper, "betas": [float(b) for b in group["betas"]], "names": names})
    names = [name for group in groups for name in group["names"]]
    if sorted(names) != sorted(master):
        raise ProbeError(
            f"the param groups of {files.optim_files[0]} list {len(names)} parameters, its flat groups hold "
            f"{len(master)}: the sizes do not add up",
            "remove the files of another run from the tag directory",
        )
    tied = dict(model_states.get("shared_params") or {})
    return ZeroState(names, master, exp_avg, exp_avg_sq, step, groups, tied)


# ----------------------------------------------------------------------------------------------
# the checkpoint source: a Trainer checkpoint-N/ with a DeepSpeed tag inside


class DeepSpeedZeroSource(TrainerFilesSource):
    """θ = the fp32 master weights of the ZeRO partitions (what the optimizer steps; model.safetensors holds them
    rounded to the training dtype, and nothing under ZeRO-3), the AdamW state per name from the same offsets,
    the groups as DeepSpeed saved them (never assumed), the Trainer's other files beside the tag."""

    name = "deepspeed-zero"

    def __init__(self) -> None:
        self._states: dict[Path, ZeroState] = {}  # read once per tag: load_model and load_optimizer share it
        self._trust_pickles = False

    def resolve(self, checkpoint) -> CheckpointPaths:
        root = checkpoint_root(checkpoint)
        self._trust_pickles = checkpoint.trust_pickles
        if checkpoint.base_model is not None or checkpoint.use_qlora:
            raise ProbeError(
                f"checkpoint.{'base_model' if checkpoint.base_model is not None else 'use_qlora'} is set, but {root} "
                "is a DeepSpeed ZeRO checkpoint of a full-parameter run: its own weights are the policy",
                "unset checkpoint.base_model (null) and set checkpoint.use_qlora: false",
            )
        files = find_zero_checkpoint(root, checkpoint.trust_pickles)
        if files is None:
            raise ProbeError(f"{root} holds no DeepSpeed tag (`latest` or global_step*)", "set checkpoint.format: auto")
        if not (root / "config.json").is_file():
            raise ProbeError(f"{root} has no config.json", "probe the Trainer's checkpoint-N/ dir (it saves one)")
        return CheckpointPaths(
            format=self.name,
            weights_dir=root,
            optimizer_path=files.tag_dir,
            scheduler_path=_here(root, SCHEDULER),
            trainer_state_path=_here(root, TRAINER_STATE),
            training_args_path=_here(root, TRAINING_ARGS),
            base_model=str(root),
            name_map_path=None,
            trainer_config_path=_here(root, TRAINER_CONFIG),
        )

    def fingerprint(self, paths: CheckpointPaths) -> str:
        """sha256 over config.json, every file of the DeepSpeed tag and the Trainer's files beside it."""
        trainer = (paths.trainer_config_path, paths.training_args_path, paths.trainer_state_path, paths.scheduler_path)
        tag = sorted(p for p in paths.optimizer_path.iterdir() if p.is_file())
        return hash_files([paths.weights_dir / "config.json", *tag, *(p for p in trainer if p is not None)])

    def state(self, paths: CheckpointPaths) -> ZeroState:
        """The checkpoint's ZeroState, read once (with the trust_pickles of the last `resolve`)."""
        key = paths.optimizer_path.resolve()
        if key not in self._states:
            files = find_zero_checkpoint(paths.weights_dir, self._trust_pickles)
            self._states[key] = read_zero_state(files, self._trust_pickles)
        return self._states[key]

    def load_model(self, checkpoint, paths: CheckpointPaths):
        """The architecture from config.json, its weights the fp32 masters cast to checkpoint.dtype."""
        return model_with_weights(checkpoint, paths.weights_dir, self.state(paths).master, paths.optimizer_path)

    def load_optimizer(self, model, paths: CheckpointPaths) -> OptimizerState:
        state = self.state(paths)
        mapping = f"DeepSpeed ZeRO partitions ({paths.optimizer_path.name})"
        return optimizer_state_from(model, named_adam_state(state), state.groups, mapping)

    def observed_step(self, paths, next_paths, layout, model):
        """θ(next) − θ(this) of the fp32 masters (what the optimizer stepped)."""
        from ..observed import delta_theta

        this, nxt = self.state(paths).master, self.state(next_paths).master
        where = (paths.optimizer_path, next_paths.optimizer_path)
        return delta_theta(this, nxt, layout, where, "copy the whole checkpoint dir of both steps")


def _here(root: Path, name: str) -> Path | None:
    return root / name if (root / name).is_file() else None
