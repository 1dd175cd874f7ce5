"""FSDP2 checkpoints of the Hugging Face Trainer (through accelerate) → named weights + AdamW state.

Layout of `checkpoint-N/` when the Trainer runs FSDP2 with fsdp_config state_dict_type SHARDED_STATE_DICT (W ranks):

    pytorch_model_fsdp_0/       torch distributed checkpoint (DCP) of {"model": module state dict}
        .metadata               a pickled DCP `Metadata`: every entry's global shape, dtype and chunks, and where
                                each chunk lies (file, byte offset, length)
        __R_0.distcp            rank R's chunks, one torch.save blob after another
    optimizer_0/                DCP of {"optimizer": torch's optimizer state dict keyed by parameter *name*}
    scheduler.pt                the LambdaLR's state_dict (`_last_lr`: the next step's lr)
    trainer_state.json          global_step and log_history (the lr each step applied)

No config.json, weights file or tokenizer is saved beside them (the Trainer saves a model itself only under
FULL_STATE_DICT, and training_args.bin only with such a model), so the architecture and tokenizer come from
`checkpoint.base_model`, the model the run started from; it is refused unset.

A DCP entry is a flattened key of the saved dict (`.metadata`'s planner_data gives its path): the model's are
("model", <state-dict name>), every parameter's global tensor cut into chunks of rows, one per rank, as FSDP2
shards dim 0 (a later rank may hold fewer rows, or none); a tied weight (lm_head.weight = embed_tokens.weight)
is saved under both names. The optimizer's are ("optimizer", "state", <parameter name>, "exp_avg" |
"exp_avg_sq" | "step") — moments chunked like the parameter, step a 0-d tensor saved once — and ("optimizer",
"param_groups", g, <key>): each group's lr (the next step's), betas, eps, weight_decay, amsgrad, ... and
`params`, the names of its parameters. The Trainer builds two groups, decay then no-decay; the names say which
parameter is in which, so nothing is inferred. The tied weight has one state, under the name the module lists
first (the embedding's).

Reading without torch's DCP loader: that loader unpickles `.metadata` and every non-tensor entry with Python's
full unpickler. Here `.metadata` is read with an allow-list of exactly DCP's metadata types (plus torch.Size,
dtypes, layouts and pathlib paths), every tensor chunk and value with torch's weights-only unpickler; any
other type is refused unless the user trusts the files (`trust_pickles`). No process group is needed.
"""

from __future__ import annotations

import io
import math
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (
    SCHEDULER,
    TOKENIZER_FILES,
    TRAINER_CONFIG,
    TRAINER_STATE,
    TRAINING_ARGS,
    CheckpointPaths,
    _resolve_base,
    checkpoint_root,
    first_line,
)
from ..errors import ProbeError
from ..optimizer_state import OptimizerState, optimizer_state_from
from .trainer_files import (
    TRUST_OPT_IN,
    TrainerFilesSource,
    finite_moment,
    hash_files,
    model_with_weights,
    require_adam_keys,
)

MODEL_DIR = "pytorch_model_fsdp_0"
OPTIM_DIR = "optimizer_0"
METADATA = ".metadata"
# what accelerate writes for the other state_dict types and for use_dcp=False
FULL_STATE_FILES = ("pytorch_model_fsdp.bin", "optimizer.bin")
FSDP1_LOCAL_FILE = re.compile(r"pytorch_model_fsdp_rank\d+\.bin")  # FSDP1's LOCAL_STATE_DICT: flat shards
PER_RANK_FILE = re.compile(r"pytorch_model_fsdp_0_rank\d+\.bin")  # save_fsdp_model(use_dcp=False)
MOMENTS = ("exp_avg", "exp_avg_sq")

COPY_ALL = "copy the whole checkpoint-N dir (hidden .metadata files included: every rank writes its own __R_0.distcp)"
OTHER_RUN = "remove the files of another run from the checkpoint dir"
USE_SHARDED = (
    "train with fsdp_config version: 2 and state_dict_type: SHARDED_STATE_DICT (the Trainer then saves "
    "pytorch_model_fsdp_0/ and optimizer_0/)"
)
USE_FSDP2 = "train with FSDP2 (the Trainer's fsdp_config version: 2, state_dict_type: SHARDED_STATE_DICT)"
USE_ADAMW = "train with torch AdamW (the Trainer's optim=adamw_torch)"
SET_BASE = "set checkpoint.base_model to the model the run started from (its local dir, or a hub id in the local cache)"

# the globals a DCP .metadata may name: (module, name) → the object it unpickles as
_DCP_METADATA_TYPES = (
    "Metadata",
    "TensorStorageMetadata",
    "BytesStorageMetadata",
    "ChunkStorageMetadata",
    "TensorProperties",
    "MetadataIndex",
    "StorageMeta",
    "_MEM_FORMAT_ENCODING",
)


def _metadata_allowed() -> dict[tuple[str, str], Any]:
    import pathlib

    import torch.distributed.checkpoint.filesystem as dcp_filesystem
    import torch.distributed.checkpoint.metadata as dcp_metadata

    allowed: dict[tuple[str, str], Any] = {
        ("torch.distributed.checkpoint.metadata", name): getattr(dcp_metadata, name) for name in _DCP_METADATA_TYPES
    }
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = dcp_filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout  # a layout by its name
    for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):  # StorageMeta.checkpoint_id
        allowed[("pathlib", name)] = allowed[("pathlib._local", name)] = getattr(pathlib, name)  # 3.13: _local
    return allowed


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata types and torch's dtypes; any other global is recorded and refused."""

    def __init__(self, file, allowed: dict[tuple[str, str], Any]) -> None:
        super().__init__(file)
        self.allowed = allowed
        self.foreign: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        self.foreign.append(f"{module}.{name}")
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def read_dcp_metadata(folder: Path, trust_pickles: bool = False) -> Any:
    """The DCP `Metadata` of `folder`/.metadata: with the allow-list, or (trust_pickles) Python's full unpickler."""
    path = folder / METADATA
    try:
        data = path.read_bytes()
        unpickler = _MetadataUnpickler(io.BytesIO(data), _metadata_allowed())
        try:
            metadata = unpickler.load()
        except pickle.UnpicklingError:
            if not unpickler.foreign:
                raise
            if not trust_pickles:
                raise ProbeError(
                    f"{path} pickles {unpickler.foreign[0]}, which is not on the torch distributed checkpoint "
                    "allow-list",
                    TRUST_OPT_IN,
                ) from None
            metadata = pickle.loads(data)
        if not isinstance(getattr(metadata, "state_dict_metadata", None), dict) or metadata.storage_data is None:
            raise ProbeError(f"{path} holds no DCP entries and their places (not a DCP Metadata)", COPY_ALL)
        return metadata
    except ProbeError:
        raise
    except Exception as exc:  # truncated, not a pickle, another object: unreadable either way
        raise ProbeError(
            f"{path} is not a readable torch distributed checkpoint metadata file ({first_line(exc)})", COPY_ALL
        ) from None


def _load_blob(blob: bytes, what: str, trust_pickles: bool) -> Any:
    """One torch.save blob of a .distcp file: weights-only; a foreign type refused unless `trust_pickles`."""
    try:
        foreign = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(blob))
        if foreign and not trust_pickles:
            raise ProbeError(
                f"{what} pickles {', '.join(sorted(foreign))}, which is not on the torch distributed checkpoint "
                "allow-list (a low-bit optimizer's tensor subclass?)",
                f"{USE_ADAMW}; or {TRUST_OPT_IN}",
            )
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=not foreign)
    except ProbeError:
        raise
    except Exception as exc:
        raise ProbeError(f"{what} is unreadable ({first_line(exc)})", COPY_ALL) from None


# ----------------------------------------------------------------------------------------------
# finding the files


@dataclass(frozen=True)
class FsdpFiles:
    """The two DCP folders of one Trainer checkpoint-N (model and optimizer)."""

    checkpoint_dir: Path
    model_dir: Path
    optim_dir: Path


def _refuse_other_layouts(root: Path) -> None:
    """accelerate's FSDP saves that are not two DCP folders, each refused with the way out."""
    names = {p.name for p in root.iterdir()}
    if any(FSDP1_LOCAL_FILE.fullmatch(n) for n in names):
        raise ProbeError(
            f"{root} holds pytorch_model_fsdp_rank*.bin: FSDP1's LOCAL_STATE_DICT, flat parameter shards without "
            "names or shapes",
            USE_FSDP2,
        )
    if any(PER_RANK_FILE.fullmatch(n) for n in names):
        raise ProbeError(
            f"{root} holds pytorch_model_fsdp_0_rank*.bin (accelerate's per-rank save without DCP), not the "
            f"{MODEL_DIR}/ folder",
            USE_SHARDED,
        )
    if FULL_STATE_FILES[0] in names:
        raise ProbeError(
            f"{root} holds {FULL_STATE_FILES[0]}: saved with state_dict_type FULL_STATE_DICT, which this reader does "
            "not read",
            USE_SHARDED,
        )


def _dcp_folder(root: Path, name: str) -> Path:
    folder = root / name
    if not folder.is_dir():
        raise ProbeError(f"FSDP checkpoint {root} lacks its {name}/ folder", COPY_ALL)
    if not (folder / METADATA).is_file():
        shards = sorted(p.name for p in folder.glob("*.distcp"))
        what = f"holds {len(shards)} .distcp files but" if shards else "is empty:"
        raise ProbeError(
            f"{folder} {what} no {METADATA} (not a complete torch distributed checkpoint: an interrupted save, or "
            "copied without its hidden file)",
            COPY_ALL,
        )
    return folder


def find_fsdp_checkpoint(path: Path) -> FsdpFiles | None:
    """The DCP folders of the Trainer checkpoint-N at `path`, None when there is no FSDP save of accelerate there.
    Refuses FSDP1's flat shards, FULL_STATE_DICT and per-rank saves, and a missing folder or .metadata."""
    path = Path(path)
    if not any(p.name.startswith("pytorch_model_fsdp") for p in path.iterdir()):
        return None
    _refuse_other_layouts(path)
    return FsdpFiles(path, _dcp_folder(path, MODEL_DIR), _dcp_folder(path, OPTIM_DIR))


# ----------------------------------------------------------------------------------------------
# reading a DCP folder


def _boxes_overlap(a: tuple, b: tuple) -> bool:
    """Whether two chunks ((offsets), (sizes)) share an element."""
    return all(oa < ob + sb and ob < oa + sa for oa, sa, ob, sb in zip(a[0], a[1], b[0], b[1]))


class DcpReader:
    """The entries of one DCP folder, by their path in the saved dict, read chunk by chunk (CPU)."""

    def __init__(self, folder: Path, trust_pickles: bool = False) -> None:
        self.folder = folder
        self.trust_pickles = trust_pickles
        self.metadata = read_dcp_metadata(folder, trust_pickles)
        self.paths: dict[str, tuple] = {
            key: tuple(path) for key, path in (self.metadata.planner_data or {}).items()
        }  # flattened key → its path in the saved dict
        self.where = {
            (index.fqn, tuple(index.offset) if index.offset is not None else None): info
            for index, info in self.metadata.storage_data.items()
        }
        files = sorted({info.relative_path for info in self.where.values()})
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ProbeError(f"FSDP checkpoint {folder} lacks {missing[0]}{more}, which its {METADATA} names", COPY_ALL)
        self.sizes = {name: (folder / name).stat().st_size for name in files}

    def keys(self) -> list[str]:
        return list(self.metadata.state_dict_metadata)

    def path(self, key: str) -> tuple:
        return self.paths.get(key, (key,))

    def _blob(self, key: str, offsets: tuple | None) -> bytes:
        info = self.where.get((key, offsets))
        if info is None:
            raise ProbeError(
                f"{self.folder / METADATA} lists a chunk of {key} at {offsets} but no place for it", COPY_ALL
            )
        if getattr(info, "transform_descriptors", None):
            raise ProbeError(
                f"{self.folder}: {key} is stored with transforms {list(info.transform_descriptors)} (e.g. compressed)",
                "save the checkpoint with torch's default FileSystemWriter (no extensions)",
            )
        if info.offset + info.length > self.sizes[info.relative_path]:
            raise ProbeError(
                f"{self.folder / info.relative_path} ends before the chunk of {key} it should hold (truncated)",
                COPY_ALL,
            )
        with open(self.folder / info.relative_path, "rb") as f:
            f.seek(info.offset)
            return f.read(info.length)

    def read(self, key: str) -> Any:
        """The entry `key`: a full tensor joined from its chunks, or the saved value."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        entry = self.metadata.state_dict_metadata[key]
        what = f"{key} in {self.folder}"
        if not isinstance(entry, TensorStorageMetadata):
            return _load_blob(self._blob(key, None), what, self.trust_pickles)
        shape, dtype = tuple(entry.size), entry.properties.dtype
        full = torch.empty(shape, dtype=dtype)
        boxes = [(tuple(c.offsets), tuple(c.sizes)) for c in entry.chunks]
        for i, box in enumerate(boxes):
            if any(_boxes_overlap(box, other) for other in boxes[:i]):
                raise ProbeError(f"{what}: two chunks overlap at {box[0]}", OTHER_RUN)
            if any(o < 0 or o + s > n for o, s, n in zip(*box, shape)):
                raise ProbeError(f"{what}: the chunk at {box[0]} of size {box[1]} exceeds the shape {shape}", OTHER_RUN)
        if sum(math.prod(size) for _, size in boxes) != math.prod(shape):
            raise ProbeError(
                f"{what}: its chunks hold {sum(math.prod(s) for _, s in boxes)} of its {math.prod(shape)} elements "
                f"(shape {shape}): the sizes do not add up",
                COPY_ALL,
            )
        for offsets, sizes in boxes:
            piece = _load_blob(self._blob(key, offsets), f"{what} (chunk at {offsets})", self.trust_pickles)
            if not isinstance(piece, torch.Tensor) or tuple(piece.shape) != sizes or piece.dtype != dtype:
                got = f"{piece.dtype} {tuple(piece.shape)}" if isinstance(piece, torch.Tensor) else type(piece).__name__
                raise ProbeError(
                    f"{what}: the chunk at {offsets} is {got}, its metadata says {dtype} {sizes}", COPY_ALL
                )
            full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))] = piece
        return full


# ----------------------------------------------------------------------------------------------
# the model and optimizer state


@dataclass
class FsdpState:
    """An accelerate FSDP2 checkpoint per name (CPU, full shapes, dtype as saved).

    weights: the model state dict as saved ({state-dict name: tensor}; a tied weight under both names);
    names: the parameters the optimizer steps, in group order; exp_avg, exp_avg_sq, step: their AdamW state;
    groups: each param group's {lr (the next step's), betas, eps, weight_decay, amsgrad, maximize,
    decoupled_weight_decay, names} as saved.
    """

    weights: dict[str, torch.Tensor]
    names: list[str]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: dict[str, float]
    groups: list[dict]


def _nested(reader: DcpReader, top: str) -> dict:
    """The saved dict under `top` ("model" or "optimizer"), rebuilt from the flattened entries' paths."""
    out: dict = {}
    for key in reader.keys():
        path = reader.path(key)
        if not path or path[0] != top:
            raise ProbeError(
                f"{reader.folder} holds {key}, not an entry of {{{top!r}: ...}} as accelerate saves it", OTHER_RUN
            )
        node = out
        for part in path[1:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = reader.read(key)
    return out


def read_model(files: FsdpFiles, trust_pickles: bool = False) -> dict[str, torch.Tensor]:
    """{state-dict name: full tensor} of the model folder; refuses FSDP1's flat parameters and a LoRA adapter."""
    reader = DcpReader(files.model_dir, trust_pickles)
    for key in reader.keys():
        path = reader.path(key)
        name = ".".join(map(str, path[1:]))
        if "flat_param" in name or "_fsdp_wrapped_module" in name:
            raise ProbeError(f"{files.model_dir} holds {name}: FSDP1's flat parameters, without names", USE_FSDP2)
        if ".lora_" in name:
            raise ProbeError(
                f"{files.model_dir} holds {name}: a LoRA run's adapter, which this reader does not map",
                "probe a full-parameter FSDP2 run, or a LoRA run's adapter saved with save_pretrained (peft-adapter)",
            )
        if len(path) != 2:
            raise ProbeError(f"{files.model_dir} holds {key}, not a module state dict entry", OTHER_RUN)
    weights = _nested(reader, "model")
    for name, value in weights.items():
        if not isinstance(value, torch.Tensor):
            raise ProbeError(f"{files.model_dir}: {name} is a {type(value).__name__}, not a tensor", OTHER_RUN)
    return weights


def _group(group: dict, index: int, where: Path) -> dict:
    """One saved param group: Adam's hyperparameters and the names it lists (checked further by
    optimizer_state_from); refused when it is no Adam group."""
    missing = [key for key in ("lr", "betas", "eps", "weight_decay", "params") if key not in group]
    if missing:
        raise ProbeError(f"{where}: param group {index} lacks {missing} (not an Adam/AdamW state)", USE_ADAMW)
    names = group["params"]
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ProbeError(
            f"{where}: param group {index} lists its parameters as {type(names).__name__} of ids, not names "
            "(not torch's get_optimizer_state_dict of an FSDP2 module)",
            USE_FSDP2,
        )
    kept = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay")
    return {**{key: group[key] for key in kept if key in group}, "names": list(names)}


def read_optimizer(files: FsdpFiles, trust_pickles: bool = False) -> tuple[dict, list[dict]]:
    """({name: {exp_avg, exp_avg_sq, step}}, the param groups) of the optimizer folder; refuses a state that is not
    torch AdamW's (other keys, moments that are no float tensors) and non-finite moments."""
    saved = _nested(DcpReader(files.optim_dir, trust_pickles), "optimizer")
    state, raw_groups = saved.get("state", {}), saved.get("param_groups", {})
    if not isinstance(raw_groups, dict) or not raw_groups:
        raise ProbeError(f"{files.optim_dir} holds no param_groups: not a torch optimizer state dict", OTHER_RUN)
    groups = [_group(raw_groups[i], i, files.optim_dir) for i in sorted(raw_groups)]
    adam = {}
    for name, entry in state.items():
        require_adam_keys(files.optim_dir, name, entry if isinstance(entry, dict) else {}, USE_ADAMW)
        for key in MOMENTS:
            if not isinstance(entry[key], torch.Tensor) or not entry[key].is_floating_point():
                kind = entry[key].dtype if isinstance(entry[key], torch.Tensor) else type(entry[key]).__name__
                raise ProbeError(
                    f"{files.optim_dir}: {key} of {name} is {kind}, not a float tensor (a low-bit optimizer's state)",
                    USE_ADAMW,
                )
            finite_moment(name, key, entry[key], "accelerate FSDP")
        step = float(entry["step"])
        if not (math.isfinite(step) and step >= 1):
            raise ProbeError(
                f"{files.optim_dir}: Adam's step of {name} is {step}, expected >= 1", "re-save the checkpoint"
            )
        adam[name] = {"exp_avg": entry["exp_avg"], "exp_avg_sq": entry["exp_avg_sq"], "step": step}
    return adam, groups


def read_fsdp_state(files: FsdpFiles, trust_pickles: bool = False) -> FsdpState:
    """The model and optimizer folders of `files`, joined into full tensors by name."""
    weights = read_model(files, trust_pickles)
    adam, groups = read_optimizer(files, trust_pickles)
    names = [name for group in groups for name in group["names"]]
    unknown = [name for name in list(adam) + names if name not in weights]
    if unknown:
        raise ProbeError(f"{files.optim_dir} holds state for {unknown[0]}, which {files.model_dir} lacks", OTHER_RUN)
    for name in adam:
        for key in MOMENTS:
            moment, weight = adam[name][key], weights[name]
            if moment.shape != weight.shape:
                raise ProbeError(
                    f"{key} of {name} has shape {tuple(moment.shape)}, the weight {tuple(weight.shape)}: the sizes "
                    "do not add up",
                    OTHER_RUN,
                )
            if moment.dtype != weight.dtype:  # torch AdamW keeps its moments in the parameter's dtype
                raise ProbeError(
                    f"{key} of {name} is {moment.dtype}, the weight {weight.dtype}: not torch AdamW's state (a "
                    "low-bit optimizer's?)",
                    USE_ADAMW,
                )
    exp_avg = {n: s["exp_avg"] for n, s in adam.items()}
    exp_avg_sq = {n: s["exp_avg_sq"] for n, s in adam.items()}
    return FsdpState(weights, names, exp_avg, exp_avg_sq, {n: s["step"] for n, s in adam.items()}, groups)


# ----------------------------------------------------------------------------------------------
# the checkpoint source


def _local_base(base: str) -> Path:
    """The local directory of checkpoint.base_model: itself, or a hub id's snapshot in the local cache."""
    if Path(base).is_dir():
        return Path(base)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(base, "config.json")
    if not isinstance(cached, str):
        raise ProbeError(f"base model '{base}' is not a local directory nor in the local Hugging Face cache", SET_BASE)
    return Path(cached).parent


def _parameter_names(config_dir: Path) -> tuple[dict[str, str], set[str]]:
    """({state-dict name: parameter name}, the buffers' state-dict names) of the architecture of
    config_dir/config.json, built on the meta device (no memory): a tied alias maps to the parameter it shares."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..observed import full_parameter_names

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = full_parameter_names(skeleton.requires_grad_(True))
    return names, set(skeleton.state_dict()) - set(names)


class AccelerateFsdpSource(TrainerFilesSource):
    """θ = the weights joined from the model folder's chunks (fp32: FSDP2 keeps fp32 parameters under mixed
    precision; a run without it keeps the model's dtype), the AdamW state by name with the groups as saved
    (the Trainer's decay / no-decay), on the architecture and tokenizer of checkpoint.base_model; the Trainer's
    scheduler.pt and trainer_state.json beside them. No training_args.bin is saved with such a checkpoint: the
    trainer's settings are unknown (stated defaults, logged) unless a trainer_config.json or params set them."""

    name = "accelerate-fsdp"

    def __init__(self) -> None:
        self._states: dict[Path, FsdpState] = {}  # read once per checkpoint: model and optimizer share it
        self._trust_pickles = False

    def resolve(self, checkpoint) -> CheckpointPaths:
        root = checkpoint_root(checkpoint)
        self._trust_pickles = checkpoint.trust_pickles
        if checkpoint.use_qlora:
            raise ProbeError(
                f"checkpoint.use_qlora is true, but {root} is an FSDP checkpoint of a full-parameter run",
                "set checkpoint.use_qlora: false",
            )
        files = find_fsdp_checkpoint(root)
        if files is None:
            raise ProbeError(
                f"{root} holds no {MODEL_DIR}/ folder (an FSDP checkpoint of the Trainer)",
                "set checkpoint.format: auto",
            )
        if checkpoint.base_model is None:
            raise ProbeError(
                f"{files.checkpoint_dir} is an FSDP checkpoint of the Trainer, saved without config.json or tokenizer: "
                "the model it trained is unknown",
                SET_BASE,
            )
        base = _local_base(_resolve_base(checkpoint.base_model, [files.checkpoint_dir]))
        here = files.checkpoint_dir

        def beside(name: str) -> Path | None:
            return here / name if (here / name).is_file() else None

        return CheckpointPaths(
            format=self.name,
            weights_dir=base,
            optimizer_path=files.optim_dir,
            scheduler_path=beside(SCHEDULER),
            trainer_state_path=beside(TRAINER_STATE),
            training_args_path=beside(TRAINING_ARGS),
            base_model=str(base),
            name_map_path=None,
            trainer_config_path=beside(TRAINER_CONFIG),
        )

    def fingerprint(self, paths: CheckpointPaths) -> str:
        """sha256 over the base's config.json and tokenizer files, both DCP folders and the Trainer's files."""
        base = [paths.weights_dir / n for n in ("config.json", *TOKENIZER_FILES) if (paths.weights_dir / n).is_file()]
        dcp = [p for d in (paths.optimizer_path.parent / MODEL_DIR, paths.optimizer_path) for p in sorted(d.iterdir())]
        trainer = (paths.trainer_config_path, paths.training_args_path, paths.trainer_state_path, paths.scheduler_path)
        return hash_files([*base, *(p for p in dcp if p.is_file()), *(p for p in trainer if p is not None)])

    def state(self, paths: CheckpointPaths) -> FsdpState:
        key = paths.optimizer_path.resolve()
        if key not in self._states:
            files = find_fsdp_checkpoint(paths.optimizer_path.parent)
            self._states[key] = read_fsdp_state(files, self._trust_pickles)
        return self._states[key]

    def load_model(self, checkpoint, paths: CheckpointPaths):
        """The architecture of the base's config.json holding the checkpoint's weights (cast to checkpoint.dtype),
        every parameter trainable, eval mode. A tied alias saved beside its parameter must equal it."""
        weights = self.state(paths).weights
        name_of, buffers = _parameter_names(paths.weights_dir)
        where = paths.optimizer_path.parent / MODEL_DIR
        params = {}
        for key, tensor in weights.items():
            if key in buffers:  # a persistent buffer saved with the module: not θ
                continue
            name = name_of.get(key)
            if name is None:
                raise ProbeError(
                    f"{where} holds {key}, which the model of {paths.weights_dir / 'config.json'} has no parameter for",
                    SET_BASE,
                )
            if name != key:  # a tied alias: one parameter, saved twice
                if name in weights and not torch.equal(weights[name], tensor):
                    raise ProbeError(
                        f"{where} holds {key} and {name} with different values, but the model of "
                        f"{paths.weights_dir / 'config.json'} ties them (one parameter)",
                        SET_BASE,
                    )
                params.setdefault(name, tensor)
            else:
                params[name] = tensor
        return model_with_weights(checkpoint, paths.weights_dir, params, where)

    def load_optimizer(self, model, paths: CheckpointPaths) -> OptimizerState:
        state = self.state(paths)
        states = {
            n: {"exp_avg": state.exp_avg[n], "exp_avg_sq": state.exp_avg_sq[n], "step": state.step[n]}
            for n in state.step
        }
        mapping = f"accelerate FSDP2 checkpoint by name ({paths.optimizer_path.parent.name}/{OPTIM_DIR})"
        return optimizer_state_from(model, states, state.groups, mapping)

    def observed_step(self, paths, next_paths, layout, model):
        """θ(next) − θ(this) of the joined fp32 weights."""
        from ..observed import delta_theta

        where = (paths.optimizer_path.parent, next_paths.optimizer_path.parent)
        fix = "copy the whole checkpoint-N dir of both steps"
        return delta_theta(self.state(paths).weights, self.state(next_paths).weights, layout, where, fix)
