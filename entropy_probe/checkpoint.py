"""Load a LoRA/QLoRA checkpoint and its AdamW state, mapped to *named* trainable parameters.

Layouts read (SPEC §4): a Hugging Face / TRL Trainer `checkpoint-N/` (adapter_model.safetensors,
adapter_config.json, optimizer.pt, scheduler.pt, trainer_state.json, training_args.bin), or an adapter
directory with optimizer.pt inside, beside or one level above it (optionally with an
`optimizer_param_names.json` name map).
The trainer's settings (loss_type, temperature, ...) come from a plain `trainer_config.json` beside the
adapter when there is one (the demo writes it), else from training_args.bin — a pickle, so only when
the user trusts it.

optimizer.pt holds `{"state": {int: {...}}, "param_groups": [{"params": [int, ...], lr, ...}]}`: the ints
are positions, not names. The Trainer builds two groups — decay then no-decay, each in
`model.named_parameters()` order over trainable parameters — so the k-th id of group g is the k-th
trainable parameter of that group. Every mapped tensor is checked against the live parameter's shape;
any mismatch is a ProbeError naming the parameter, never a silently fresh optimizer.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ProbeError
from .params import CheckpointParams

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
TRAINER_STATE = "trainer_state.json"
TRAINING_ARGS = "training_args.bin"
TRAINER_CONFIG = "trainer_config.json"  # a JSON copy of TRAINER_CONFIG_KEYS from training_args.bin
NAME_MAP = "optimizer_param_names.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrainerConfig(BaseModel):
    """What the probe needs from the trainer's arguments (GRPOConfig names); None when unknown.

    Strict and finite: a hand-edited trainer_config.json gets no silent coercion ("0.7" is not 0.7).
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    loss_type: str | None = None
    scale_rewards: bool | str | None = None
    temperature: float | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    max_grad_norm: float | None = None  # the HF Trainer clips only when > 0
    beta: float | None = None
    max_completion_length: int | None = Field(None, ge=1)
    num_generations: int | None = Field(None, ge=1)
    learning_rate: float | None = Field(None, ge=0)
    lr_scheduler_type: str | None = None


TRAINER_CONFIG_KEYS = tuple(TrainerConfig.model_fields)
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")
EIGHT_BIT_KEYS = ("state1", "state2", "__bnb_optimizer_quant_state__")  # bitsandbytes optimizers


# ----------------------------------------------------------------------------------------------
# paths


@dataclass
class CheckpointPaths:
    adapter_dir: Path
    optimizer_path: Path
    scheduler_path: Path | None
    trainer_state_path: Path | None
    training_args_path: Path | None
    base_model: str  # a local directory or a hub id
    name_map_path: Path | None
    trainer_config_path: Path | None = None

    @property
    def base_is_local(self) -> bool:
        return Path(self.base_model).is_dir()

    def as_dict(self) -> dict[str, str | None]:
        return {k: (None if v is None else str(v)) for k, v in self.__dict__.items()}


def _first_existing(dirs: list[Path], name: str) -> Path | None:
    for d in dirs:
        if (d / name).is_file():
            return d / name
    return None


def _unique(dirs: list[Path]) -> list[Path]:
    seen, out = set(), []
    for d in dirs:
        key = d.resolve()
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _find_adapter_dir(root: Path) -> Path:
    """`root` itself when it holds adapter_config.json, else its single sub-directory that does."""
    if (root / ADAPTER_CONFIG).is_file():
        return root
    subs = sorted(d for d in root.iterdir() if d.is_dir() and (d / ADAPTER_CONFIG).is_file())
    if len(subs) == 1:
        return subs[0]
    where = f"{len(subs)} sub-directories have one" if subs else "nor does any sub-directory"
    raise ProbeError(
        f"no {ADAPTER_CONFIG} in {root} ({where})",
        "set checkpoint.path to a Trainer checkpoint-N/ dir or a PEFT adapter dir",
    )


def _find_optimizer(ckpt: CheckpointParams, root: Path, adapter_dir: Path) -> Path:
    if ckpt.optimizer_path is not None:
        p = Path(ckpt.optimizer_path)
        p = p / OPTIMIZER if p.is_dir() else p
        if not p.is_file():
            raise ProbeError(f"optimizer state {p} not found", "fix checkpoint.optimizer_path")
        return p
    # A Trainer checkpoint-N/ keeps its own optimizer.pt: never borrow one from the run dir above it.
    # A bare adapter dir may have it inside, beside it (in its parent), or one level above that.
    trainer_dir = any(
        (d / TRAINER_STATE).is_file() or re.fullmatch(r"checkpoint-\d+", d.name) for d in (root, adapter_dir)
    )
    dirs = [root, adapter_dir] + ([] if trainer_dir else [adapter_dir.parent, adapter_dir.parent.parent])
    dirs = _unique(dirs)
    found = _first_existing(dirs, OPTIMIZER)
    if found is None:
        looked = ", ".join(str(d) for d in dirs)
        raise ProbeError(
            f"{OPTIMIZER} not found (looked in {looked})",
            "set checkpoint.optimizer_path to the optimizer.pt saved with this adapter",
        )
    return found


def _adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ProbeError(f"{path} is not readable JSON ({exc.__class__.__name__})", "re-save the adapter") from None


def _resolve_base(name: str, anchors: list[Path]) -> str:
    """A local model dir (absolute; relative to cwd; relative to the checkpoint dirs) or a hub id."""
    fix = "set checkpoint.base_model to the base model's directory or hub id"
    p = Path(name).expanduser()
    candidates = [p] if p.is_absolute() else [p] + [a / p for a in anchors]
    for c in candidates:
        if c.is_dir():
            if not (c / "config.json").is_file():
                raise ProbeError(f"base model dir {c} has no config.json", fix)
            return str(c)
    if p.is_absolute() or name.startswith(".") or name.count("/") > 1:
        raise ProbeError(f"base model dir '{name}' not found (looked relative to cwd and {anchors[0]})", fix)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ProbeError(f"base model '{name}' is neither an existing directory nor a valid hub id", fix) from None
    return name


def resolve_paths(ckpt: CheckpointParams) -> CheckpointPaths:
    """Find every file of the checkpoint; a missing required piece is a ProbeError naming the key to set."""
    root = Path(ckpt.path)
    if not root.exists():
        raise ProbeError(
            f"checkpoint {root} not found", "set checkpoint.path to a Trainer checkpoint-N/ dir or an adapter dir"
        )
    if not root.is_dir():
        raise ProbeError(f"checkpoint path {root} is a file, not a directory", "set checkpoint.path to its directory")
    adapter_dir = _find_adapter_dir(root)
    weights = next((adapter_dir / w for w in ADAPTER_WEIGHTS if (adapter_dir / w).is_file()), None)  # PEFT's order
    if weights is None:
        raise ProbeError(f"no {ADAPTER_WEIGHTS[0]} in {adapter_dir}", "point checkpoint.path at a saved adapter")
    _check_adapter_weights(weights)
    optimizer_path = _find_optimizer(ckpt, root, adapter_dir)
    side = _unique([optimizer_path.parent, adapter_dir, root])  # where the Trainer's other files live
    base = ckpt.base_model
    if base is None:
        base = _adapter_config(adapter_dir).get("base_model_name_or_path")
        if not base:
            raise ProbeError(f"{adapter_dir / ADAPTER_CONFIG} names no base model", "set checkpoint.base_model")
    return CheckpointPaths(
        adapter_dir=adapter_dir,
        optimizer_path=optimizer_path,
        scheduler_path=_first_existing(side, SCHEDULER),
        trainer_state_path=_first_existing(side, TRAINER_STATE),
        training_args_path=_first_existing(side, TRAINING_ARGS),
        base_model=_resolve_base(base, _unique([root, adapter_dir])),
        name_map_path=_first_existing(_unique([optimizer_path.parent, adapter_dir]), NAME_MAP),
        trainer_config_path=_first_existing(side, TRAINER_CONFIG),
    )


def _check_adapter_weights(path: Path) -> None:
    """Refuse an empty or cut-off adapter weights file now, not deep inside PEFT after the base is loaded.

    safe_open reads only the header and checks that the data it describes covers the file exactly.
    """
    fix = "the adapter weights are damaged (an interrupted copy or save?): copy or re-save the checkpoint"
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt"):
                pass
        else:
            torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as exc:  # SafetensorError, truncated zip, ...: unreadable input either way
        raise ProbeError(f"adapter weights {path} are unreadable ({_first_line(exc)})", fix) from None


def adapter_info(paths: CheckpointPaths) -> dict:
    """rank, alpha, targets (+ the other knobs that change which tensors are trainable)."""
    cfg = _adapter_config(paths.adapter_dir)
    targets = cfg.get("target_modules")
    return {
        "peft_type": cfg.get("peft_type"),
        "rank": cfg.get("r"),
        "alpha": cfg.get("lora_alpha"),
        "targets": sorted(targets) if isinstance(targets, list) else targets,
        "modules_to_save": cfg.get("modules_to_save"),
        "use_rslora": cfg.get("use_rslora"),
        "use_dora": cfg.get("use_dora"),
        "lora_bias": cfg.get("lora_bias"),
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
    }


def _base_model_dir(paths: CheckpointPaths) -> Path | None:
    """The local directory of the base model: itself, or its hub-cache snapshot (never downloads)."""
    if paths.base_is_local:
        return Path(paths.base_model)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(paths.base_model, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def checkpoint_fingerprint(paths: CheckpointPaths) -> str:
    """Short sha256 over adapter files + optimizer.pt + the base's config.json and the names/sizes of
    its weight files (multi-GB weights are identified by name and size, not hashed)."""
    digest = hashlib.sha256()

    def add_file(p: Path) -> None:
        digest.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)

    for name in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS):
        if (paths.adapter_dir / name).is_file():
            add_file(paths.adapter_dir / name)
    add_file(paths.optimizer_path)
    base_dir = _base_model_dir(paths)
    if base_dir is None:
        digest.update(f"hub:{paths.base_model}".encode())
    else:
        add_file(base_dir / "config.json")
        for w in sorted(base_dir.iterdir()):
            if w.is_file() and w.name.endswith(WEIGHT_SUFFIXES):
                digest.update(f"{w.name}:{w.stat().st_size}".encode())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# model + tokenizer


def _device_map(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise ProbeError(
            "checkpoint.device_map is 'cuda' but no CUDA device is available", "set checkpoint.device_map: cpu"
        )
    return name


def _disable_bnb_cpu_packing(model: torch.nn.Module) -> int:
    """Keep bitsandbytes 4-bit layers on their autograd path on CPU.

    bitsandbytes 0.50 on an AVX512-BF16 CPU repacks a Linear4bit's weight (absmax cast to bf16) the first
    time it runs in eval mode on an input that does not require grad, and from then on uses an
    inference-only kernel: gradients through that layer break, outputs shift by the bf16 rounding (so
    no-grad sampling and grad-enabled scoring would disagree), and in_features < 64 crashes.
    """
    n = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing with dropout still off.

    transformers only checkpoints a GradientCheckpointingLayer when `layer.training` is true, so the
    layers themselves are flagged as training while every submodule (dropout included) stays in eval.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = model.get_base_model()
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    for module in base.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True


def load_policy_model(ckpt: CheckpointParams, paths: CheckpointPaths):
    """Base (eager attention, ckpt.dtype, 4-bit nf4 when ckpt.use_qlora) + adapter, trainable, eval mode.

    Returns a `peft.PeftModel` whose only parameters with requires_grad are the adapter's.
    No `prepare_model_for_kbit_training`: TRL's GRPOTrainer does not call it either, so non-quantised
    weights keep ckpt.dtype as in training.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = DTYPES[ckpt.dtype]
    kwargs: dict[str, Any] = dict(dtype=dtype, device_map=_device_map(ckpt.device_map), attn_implementation="eager")
    if ckpt.use_qlora:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ProbeError(f"checkpoint.use_qlora needs bitsandbytes ({exc})", "pip install bitsandbytes") from None
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    try:
        base = AutoModelForCausalLM.from_pretrained(paths.base_model, **kwargs)
    except OSError as exc:
        where = "directory" if paths.base_is_local else "hub id (offline, or not in the local Hugging Face cache)"
        raise ProbeError(
            f"cannot load base model '{paths.base_model}' as a {where}: {_first_line(exc)}",
            "set checkpoint.base_model to a local model directory",
        ) from None
    if ckpt.use_qlora:
        _disable_bnb_cpu_packing(base)
    try:
        model = PeftModel.from_pretrained(base, str(paths.adapter_dir), is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ProbeError(
            f"adapter {paths.adapter_dir} does not fit base '{paths.base_model}': {_first_line(exc)}",
            "set checkpoint.base_model to the base the adapter was trained on",
        ) from None
    model.eval()  # dropout off everywhere (SPEC §3)
    if ckpt.use_checkpointing:
        _enable_checkpointing(model)
    return model


def load_tokenizer(paths: CheckpointPaths):
    """The tokenizer saved with the adapter (Trainer checkpoints carry one), else the base model's."""
    from transformers import AutoTokenizer

    has_own = any((paths.adapter_dir / f).is_file() for f in TOKENIZER_FILES)
    source = str(paths.adapter_dir) if has_own else paths.base_model
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ProbeError(
            f"cannot load a tokenizer from '{source}': {_first_line(exc)}",
            "save the tokenizer into the adapter dir or set checkpoint.base_model to a local dir that has one",
        ) from None


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------
# optimizer state


@dataclass
class OptimizerState:
    """AdamW state per named trainable parameter (CPU tensors, dtype as saved).

    names: trainable parameter names in optimizer order (group 0's, then group 1's, ...);
    groups: [{lr, betas, eps, weight_decay, names}] — lr is the saved one (the lr of the *next* step).
    """

    names: list[str]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: dict[str, float]
    groups: list[dict]
    mapping: str = ""  # how positions were matched to names
    group_of: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.group_of = {n: gi for gi, g in enumerate(self.groups) for n in g["names"]}

    def hyper(self, name: str) -> dict:
        """lr, betas, eps, weight_decay of the group that holds `name`."""
        g = self.groups[self.group_of[name]]
        return {k: g[k] for k in ("lr", "betas", "eps", "weight_decay")}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{exc.__class__.__name__}: {text.splitlines()[0][:160]}" if text else exc.__class__.__name__


def _torch_load(path: Path, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, non-tensor globals: all unreadable input
        raise ProbeError(
            f"{what} {path} is not readable with torch.load(weights_only=True) ({_first_line(exc)})",
            "point checkpoint.optimizer_path at an intact optimizer.pt (re-save the checkpoint)",
        ) from None


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """The HF Trainer's weight-decay rule, reused from transformers (`Trainer.get_decay_parameter_names`
    does not touch `self`)."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))


def trainer_param_groups(model: torch.nn.Module) -> list[list[str]]:
    """Names per Trainer group: [decay, no-decay], each trainable-only, in named_parameters() order."""
    decay = decay_parameter_names(model)
    names = [n for n, _ in trainable_parameters(model)]
    return [[n for n in names if n in decay], [n for n in names if n not in decay]]


def _names_from_map(path: Path, sizes: list[int]) -> list[list[str]]:
    fix = f"write {NAME_MAP} as a list of names or {{group_index: [names]}} in optimizer order"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ProbeError(f"{path} is not readable JSON ({exc.__class__.__name__})", fix) from None
    if isinstance(raw, list):
        if len(raw) != sum(sizes):
            raise ProbeError(f"{path} lists {len(raw)} names but optimizer.pt holds {sum(sizes)} parameters", fix)
        bounds = [0, *itertools.accumulate(sizes)]
        return [list(map(str, raw[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
    if isinstance(raw, dict):
        try:
            by_group = {int(k): list(map(str, v)) for k, v in raw.items()}
        except (TypeError, ValueError):
            raise ProbeError(f"{path} has non-integer group keys", fix) from None
        if set(by_group) - set(range(len(sizes))):
            raise ProbeError(f"{path} names groups {sorted(by_group)} but optimizer.pt has {len(sizes)}", fix)
        groups = [by_group.get(gi, []) for gi in range(len(sizes))]
        for gi, (names, size) in enumerate(zip(groups, sizes)):
            if len(names) != size:
                raise ProbeError(f"{path} lists {len(names)} names for group {gi}, optimizer.pt has {size}", fix)
        return groups
    raise ProbeError(f"{path} is neither a list nor a dict", fix)


def _group_names(
    model: torch.nn.Module, saved_groups: list[dict], name_map: Path | None
) -> tuple[list[list[str]], str]:
    """Names for the saved ids of each group, and how they were found."""
    sizes = [len(g["params"]) for g in saved_groups]
    if name_map is not None:
        return _names_from_map(name_map, sizes), f"name map {name_map.name}"
    if saved_groups and all("param_names" in g for g in saved_groups):  # optimizer built from named params
        return [list(g["param_names"]) for g in saved_groups], "param_names stored in optimizer.pt"
    expected = trainer_param_groups(model)
    fix = (
        "the adapter does not match this optimizer state: check checkpoint.path / checkpoint.optimizer_path, "
        f"or write {NAME_MAP} (names in optimizer order) beside optimizer.pt"
    )
    if len(saved_groups) == 2:
        if sizes != [len(g) for g in expected]:
            raise ProbeError(
                f"optimizer.pt has param groups of sizes {sizes}, but the model's trainable parameters form "
                f"Trainer groups (decay, no-decay) of sizes {[len(g) for g in expected]}",
                fix,
            )
        return expected, "Trainer groups (decay, no-decay)"
    flat = expected[0] + expected[1]
    if len(saved_groups) == 1 and sizes[0] == len(flat):  # e.g. AdamW(model.parameters()) built by hand
        order = [n for n, _ in trainable_parameters(model)]
        return [order], "one group in named_parameters() order"
    raise ProbeError(
        f"optimizer.pt has {len(saved_groups)} param groups of sizes {sizes}; the Trainer layout for this model is "
        f"2 groups of sizes {[len(g) for g in expected]}",
        fix,
    )


def _group_hyper(g: dict, gi: int) -> dict:
    missing = [k for k in ("lr", "betas", "eps", "weight_decay") if k not in g]
    if missing:
        raise ProbeError(
            f"optimizer.pt param group {gi} lacks {missing} (not an Adam/AdamW state)",
            "the probe needs a torch AdamW optimizer.pt (Trainer optim=adamw_torch)",
        )
    if g.get("amsgrad") or g.get("maximize"):
        which = "amsgrad" if g.get("amsgrad") else "maximize"
        raise ProbeError(f"optimizer.pt param group {gi} uses {which}=True, which the probe does not model",
                         "probe a checkpoint trained with plain AdamW")
    if g.get("decoupled_weight_decay") is False and float(g["weight_decay"]) != 0.0:
        raise ProbeError(f"optimizer.pt param group {gi} is Adam with L2 weight decay (not decoupled AdamW)",
                         "probe a checkpoint trained with AdamW")
    return {
        "lr": float(g["lr"]),
        "betas": [float(b) for b in g["betas"]],
        "eps": float(g["eps"]),
        "weight_decay": float(g["weight_decay"]),
    }


def _refuse_eight_bit(model: torch.nn.Module, saved_groups: list[dict], state: dict, name_map: Path | None) -> None:
    """bitsandbytes 8-bit / paged optimizers store `state1`/`state2` (quantised, or fp32 for small tensors;
    bitsandbytes 0.50 nests them under `__bnb_optimizer_quant_state__`): refuse, naming a parameter."""
    quantised = [pid for pid, st in state.items() if isinstance(st, dict) and any(k in st for k in EIGHT_BIT_KEYS)]
    if quantised:
        try:
            group_names, _ = _group_names(model, saved_groups, name_map)
            id_to_name = {i: n for g, ns in zip(saved_groups, group_names) for i, n in zip(g["params"], ns)}
        except ProbeError:
            id_to_name = {}
        pid = quantised[0]
        raise ProbeError(
            f"optimizer.pt holds bitsandbytes 8-bit/paged optimizer state (state1/state2) for "
            f"{id_to_name.get(pid, f'param id {pid}')}; bitsandbytes optimizer state is not supported",
            "save a 32-bit torch AdamW state: train (or resume from this checkpoint for one step) "
            "with optim='adamw_torch'",
        )


def load_optimizer_state(model: torch.nn.Module, paths: CheckpointPaths) -> OptimizerState:
    """Read optimizer.pt (weights_only) and map its positional ids to named trainable parameters.

    Refuses (ProbeError naming the parameter): group/count mismatch, unknown or duplicate names, a trainable
    parameter without state (lazy state: it never had a gradient), shape mismatch, missing exp_avg /
    exp_avg_sq / step, non-finite moments, negative exp_avg_sq, 8-bit/paged state.
    """
    saved = _torch_load(paths.optimizer_path, "optimizer state")
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or not isinstance(
        saved.get("param_groups"), list
    ):
        raise ProbeError(
            f"{paths.optimizer_path} is not a torch optimizer state_dict (no 'state'/'param_groups')",
            "point checkpoint.optimizer_path at the optimizer.pt the Trainer saved",
        )
    saved_groups, state = saved["param_groups"], saved["state"]
    params = dict(trainable_parameters(model))
    _refuse_eight_bit(model, saved_groups, state, paths.name_map_path)
    group_names, how = _group_names(model, saved_groups, paths.name_map_path)

    fix = "check that checkpoint.path's adapter and checkpoint.optimizer_path come from the same checkpoint"
    names = [n for names in group_names for n in names]
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ProbeError(
            f"optimizer state names parameter {unknown[0]}, which is not a trainable parameter of the model", fix
        )
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ProbeError(f"parameter {dup} appears twice in the optimizer's groups", fix)
    uncovered = [n for n in params if n not in set(names)]
    if uncovered:
        raise ProbeError(f"trainable parameter {uncovered[0]} is in no optimizer param group", fix)

    exp_avg, exp_avg_sq, step = {}, {}, {}
    for g, gnames in zip(saved_groups, group_names):
        for pid, name in zip(g["params"], gnames):
            st = state.get(pid)
            if not st:
                raise ProbeError(
                    f"trainable parameter {name} has no optimizer state (it never received a gradient: "
                    "torch creates Adam state lazily)",
                    "the probe needs state for every trainable parameter; check the adapter matches optimizer.pt "
                    "or probe a checkpoint where every adapter tensor was updated",
                )
            missing = [k for k in ADAM_STATE_KEYS if k not in st]
            if missing:
                raise ProbeError(f"optimizer state of {name} lacks {missing} (not an Adam/AdamW state)",
                                 "the probe needs a torch AdamW optimizer.pt (Trainer optim=adamw_torch)")
            shape = tuple(params[name].shape)
            for key in ("exp_avg", "exp_avg_sq"):
                t = st[key]
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ProbeError(f"{key} of {name} has shape {got}, the parameter has {shape} "
                                     "(e.g. a different LoRA rank)", fix)
                if not bool(torch.isfinite(t).all()):
                    raise ProbeError(f"{key} of {name} contains NaN/inf",
                                     "probe an earlier checkpoint (training diverged before this one was saved)")
            if bool((st["exp_avg_sq"] < 0).any()):
                raise ProbeError(f"exp_avg_sq of {name} has negative entries (corrupt state)", "re-save the checkpoint")
            s = float(st["step"])
            if not math.isfinite(s) or s < 1:
                raise ProbeError(f"optimizer step of {name} is {s}, expected >= 1", "re-save the checkpoint")
            exp_avg[name], exp_avg_sq[name], step[name] = st["exp_avg"], st["exp_avg_sq"], s
    groups = [{**_group_hyper(g, gi), "names": gnames} for gi, (g, gnames) in enumerate(zip(saved_groups, group_names))]
    return OptimizerState(names=names, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, step=step, groups=groups, mapping=how)


def build_adamw(model: torch.nn.Module, state: OptimizerState, lr: float | None = None) -> torch.optim.AdamW:
    """A real torch AdamW over `model`'s named parameters carrying `state` (for validating update rules).

    lr (optional) replaces every group's lr — e.g. the chosen learning rate.
    """
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(
        [
            {
                "params": [params[n] for n in g["names"]],
                "lr": g["lr"] if lr is None else lr,
                "betas": tuple(g["betas"]),
                "eps": g["eps"],
                "weight_decay": g["weight_decay"],
            }
            for g in state.groups
        ],
        foreach=False,
    )
    for n in state.names:
        p = params[n]
        opt.state[p] = {
            "step": torch.tensor(state.step[n], dtype=torch.float32),
            "exp_avg": state.exp_avg[n].to(device=p.device, dtype=p.dtype).clone(),
            "exp_avg_sq": state.exp_avg_sq[n].to(device=p.device, dtype=p.dtype).clone(),
        }
    return opt


# ----------------------------------------------------------------------------------------------
# trainer config


def _plain(value: Any) -> Any:
    """JSON-friendly: enums to their value, tensors to numbers."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    return value if isinstance(value, (int, float, str, bool, type(None), list)) else str(value)


def read_trainer_state(path: Path | None) -> dict:
    """global_step and the last logged learning rate (= the lr the last applied step used) with its step."""
    out = {"global_step": None, "learning_rate_last": None, "learning_rate_last_step": None}
    if path is None:
        return out
    try:
        st = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ProbeError(f"{path} is not readable JSON ({exc.__class__.__name__})", "re-save the checkpoint") from None
    out["global_step"] = st.get("global_step")
    logged = [e for e in st.get("log_history", []) if isinstance(e, dict) and "learning_rate" in e]
    if logged:
        out["learning_rate_last"] = float(logged[-1]["learning_rate"])
        out["learning_rate_last_step"] = logged[-1].get("step")
    return out


def trainer_config_from_args(args: Any) -> dict:
    """TRAINER_CONFIG_KEYS of a TrainingArguments/GRPOConfig, JSON-ready (what trainer_config.json holds)."""
    return {k: _plain(getattr(args, k, None)) for k in TRAINER_CONFIG_KEYS}


def _validated_trainer_config(raw: Any, path: Path, fix: str) -> dict:
    if not isinstance(raw, dict):
        raise ProbeError(f"{path} holds a {type(raw).__name__}, not a mapping of trainer settings", fix)
    try:
        return TrainerConfig.model_validate(raw).model_dump()
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(map(str, err["loc"])) or "?"
        raise ProbeError(f"{path}: bad trainer setting '{key}' = {err.get('input')!r} ({err['msg']})", fix) from None


def _read_trainer_config_json(path: Path) -> dict:
    fix = f"fix {path} (keys: {', '.join(TRAINER_CONFIG_KEYS)}; null when unknown) or delete it"
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ProbeError(f"{path} is not readable JSON ({exc.__class__.__name__})", fix) from None
    return _validated_trainer_config(raw, path, fix)


def _unpickle_training_args(path: Path) -> dict:
    try:
        args = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ProbeError(
            f"cannot unpickle {path} ({_first_line(exc)})",
            "install the package that wrote it, or set checkpoint.trust_pickles: false",
        ) from None
    fix = f"write the settings into {path.parent / TRAINER_CONFIG} instead (it is read first)"
    return _validated_trainer_config(trainer_config_from_args(args), path, fix)


def read_trainer_config(paths: CheckpointPaths, trust_pickles: bool) -> dict:
    """TRAINER_CONFIG_KEYS (None when unknown) + global_step, learning_rate_last, learning_rate_last_step,
    and `trainer_config_source`: the file the settings came from (None: unknown).

    Sources, first found: trainer_config.json (plain JSON); training_args.bin, a pickle (arbitrary code
    on load), only when `trust_pickles`; else the settings are unknown.
    """
    cfg: dict[str, Any] = {k: None for k in TRAINER_CONFIG_KEYS}
    cfg.update(read_trainer_state(paths.trainer_state_path))
    source = None
    args_path = paths.training_args_path
    if paths.trainer_config_path is not None:
        cfg.update(_read_trainer_config_json(paths.trainer_config_path))
        source = TRAINER_CONFIG
    elif args_path is None:
        log.info(
            "no %s or %s beside the checkpoint: trainer settings (loss_type, temperature, ...) unknown; "
            "write them into %s to use them",
            TRAINER_CONFIG, TRAINING_ARGS, TRAINER_CONFIG,
        )  # fmt: skip
    elif not trust_pickles:
        log.info(
            "skipped %s (a pickle, unpickling runs code); to use loss_type, temperature, max_grad_norm, ... write "
            "them into %s beside it, or set checkpoint.trust_pickles: true if you trust the file",
            args_path, TRAINER_CONFIG,
        )  # fmt: skip
    else:
        cfg.update(_unpickle_training_args(args_path))
        source = TRAINING_ARGS
    cfg["trainer_config_source"] = source
    return cfg
