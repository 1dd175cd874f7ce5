"""The files of a checkpoint the Trainer writes, its format and identity (fingerprint), and loading its model and
tokenizer.

Layouts read here: a Hugging Face / TRL Trainer `checkpoint-N/` of a LoRA/QLoRA run (adapter_model.safetensors,
adapter_config.json, optimizer.pt, scheduler.pt, trainer_state.json, training_args.bin), an adapter directory
with optimizer.pt inside, beside or one level above it (optionally with an `optimizer_param_names.json` name
map), or a full fine-tuning run's `checkpoint-N/` (config.json, model.safetensors or shards + index, and the
same Trainer files). `detect_format` tells these from the DeepSpeed and verl layouts (read by their sources);
`resolve_paths` finds every file (a missing piece is a ProbeError naming the key to set); the optimizer state
is mapped to named parameters by `optimizer_state`, the trainer's settings are read by `trainer_config`.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ProbeError
from .params import CheckpointParams

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
TRAINER_STATE = "trainer_state.json"
TRAINING_ARGS = "training_args.bin"
TRAINER_CONFIG = "trainer_config.json"  # the trainer's settings as plain JSON (see trainer_config.py)
NAME_MAP = "optimizer_param_names.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# a full model's weights as transformers saves them: one file or shards + an index
MODEL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
VERL_TRACKER = "latest_checkpointed_iteration.txt"  # a verl run root
ACCELERATE_FSDP_PREFIX = "pytorch_model_fsdp"  # accelerate's FSDP saves in a Trainer checkpoint-N
Format = Literal["peft-adapter", "full-model", "deepspeed-zero", "verl-fsdp", "accelerate-fsdp"]
FORMATS: tuple[str, ...] = get_args(Format)


# ----------------------------------------------------------------------------------------------
# paths


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a renamed key fails loudly when verify.json is read back


class CheckpointPaths(_Record):
    """Where each file of the checkpoint is (None: absent); verify.json records it as `checkpoint`.

    format: which layout was read (`FORMATS`); weights_dir: the adapter's dir (peft-adapter) or the dir
    holding the model's config.json and weights (full-model, whose base_model is that same dir).
    """

    format: Format = "peft-adapter"
    weights_dir: Path
    optimizer_path: Path
    scheduler_path: Path | None
    trainer_state_path: Path | None
    training_args_path: Path | None
    base_model: str  # a local directory or a hub id
    name_map_path: Path | None
    trainer_config_path: Path | None

    @property
    def base_is_local(self) -> bool:
        return Path(self.base_model).is_dir()

    @property
    def checkpoint_dir(self) -> Path:
        """The directory that names this checkpoint: a verl actor dir, the checkpoint-N holding an accelerate FSDP
        save (its weights_dir is the base model, which holds the config.json), else the weights' dir."""
        if self.format == "verl-fsdp":
            return self.optimizer_path
        if self.format == "accelerate-fsdp":
            return self.optimizer_path.parent
        return self.weights_dir


class AdapterInfo(_Record):
    """What adapter_config.json says about which tensors are trainable and how they scale (None: unset)."""

    peft_type: str | None
    rank: int | None
    alpha: int | float | None
    targets: list[str] | str | None  # a list (sorted here) or PEFT's regex string
    modules_to_save: list[str] | None
    use_rslora: bool | None
    use_dora: bool | None
    lora_bias: bool | None
    base_model_name_or_path: str | None


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


def _find_optimizer(ckpt: CheckpointParams, root: Path, weights_dir: Path) -> Path:
    if ckpt.optimizer_path is not None:
        p = Path(ckpt.optimizer_path)
        p = p / OPTIMIZER if p.is_dir() else p
        if not p.is_file():
            raise ProbeError(f"optimizer state {p} not found", "fix checkpoint.optimizer_path")
        return p
    # A Trainer checkpoint-N/ keeps its own optimizer.pt: never borrow one from the run dir above it.
    # A bare adapter dir may have it inside, beside it (in its parent), or one level above that.
    trainer_dir = any(
        (d / TRAINER_STATE).is_file() or re.fullmatch(r"checkpoint-\d+", d.name) for d in (root, weights_dir)
    )
    dirs = [root, weights_dir] + ([] if trainer_dir else [weights_dir.parent, weights_dir.parent.parent])
    dirs = _unique(dirs)
    found = _first_existing(dirs, OPTIMIZER)
    if found is None and ((root / "latest").is_file() or any(d.is_dir() for d in root.glob("global_step*"))):
        raise ProbeError(
            f"{root} is a LoRA run under DeepSpeed: its AdamW state is in the ZeRO partitions of its global_step "
            "dir, which the probe maps to full-parameter runs only",
            "probe a LoRA run trained without DeepSpeed (its optimizer.pt), or a full-parameter DeepSpeed run",
        )
    if found is None:
        looked = ", ".join(str(d) for d in dirs)
        raise ProbeError(
            f"{OPTIMIZER} not found (looked in {looked})",
            "set checkpoint.optimizer_path to the optimizer.pt saved with this adapter",
        )
    return found


def _adapter_config(weights_dir: Path) -> dict:
    path = weights_dir / ADAPTER_CONFIG
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


def checkpoint_root(ckpt: CheckpointParams) -> Path:
    """checkpoint.path as an existing directory, else a one-line ProbeError."""
    root = Path(ckpt.path)
    if not root.exists():
        raise ProbeError(
            f"checkpoint {root} not found", "set checkpoint.path to a Trainer checkpoint-N/ dir or an adapter dir"
        )
    if not root.is_dir():
        raise ProbeError(f"checkpoint path {root} is a file, not a directory", "set checkpoint.path to its directory")
    return root


def detect_format(ckpt: CheckpointParams) -> str:
    """checkpoint.format, or (auto) the layout of checkpoint.path: a verl actor (fsdp_config.json, here or in actor/,
    or a run root's tracker), an accelerate FSDP save of the Trainer (pytorch_model_fsdp_0/), a PEFT adapter
    (adapter_config.json in it or in its one sub-directory that has one), then a DeepSpeed tag (`latest` or
    global_step*), then a full model (config.json + model weights): a Trainer checkpoint of a LoRA run is read as
    the adapter it trained, one of a DeepSpeed run by its fp32 masters."""
    if ckpt.format != "auto":
        return ckpt.format
    root = checkpoint_root(ckpt)
    if any((d / name).is_file() for d in (root, root / "actor") for name in ("fsdp_config.json", VERL_TRACKER)):
        return "verl-fsdp"  # first: an older verl LoRA actor also holds a PEFT lora_adapter/ dir
    if any(p.name.startswith(ACCELERATE_FSDP_PREFIX) for p in root.iterdir()):
        return "accelerate-fsdp"  # pytorch_model_fsdp_0/ (and the FSDP saves its source refuses, with their fix)
    if (root / ADAPTER_CONFIG).is_file() or any(d.is_dir() and (d / ADAPTER_CONFIG).is_file() for d in root.iterdir()):
        return "peft-adapter"
    if (root / "latest").is_file() or any(d.is_dir() for d in root.glob("global_step*")):
        return "deepspeed-zero"  # checked before full-model: ZeRO-1/2 also save model.safetensors, in bf16
    if (root / "config.json").is_file() and any((root / w).is_file() for w in MODEL_WEIGHTS):
        return "full-model"
    raise ProbeError(
        f"{root} is neither a PEFT adapter ({ADAPTER_CONFIG}) nor a DeepSpeed checkpoint (latest, global_step*) nor "
        f"a verl actor (fsdp_config.json) nor an FSDP save ({ACCELERATE_FSDP_PREFIX}_0/) nor a full model "
        f"(config.json + {MODEL_WEIGHTS[0]} or its shards)",
        "set checkpoint.path to a Trainer checkpoint-N/ dir, a PEFT adapter dir or a saved model dir",
    )


def _trainer_files(ckpt: CheckpointParams, root: Path, weights_dir: Path, fmt: str, base: str) -> CheckpointPaths:
    """The optimizer state and the Trainer's other files found around `weights_dir`."""
    optimizer_path = _find_optimizer(ckpt, root, weights_dir)
    side = _unique([optimizer_path.parent, weights_dir, root])  # where the Trainer's other files live
    return CheckpointPaths(
        format=fmt,
        weights_dir=weights_dir,
        optimizer_path=optimizer_path,
        scheduler_path=_first_existing(side, SCHEDULER),
        trainer_state_path=_first_existing(side, TRAINER_STATE),
        training_args_path=_first_existing(side, TRAINING_ARGS),
        base_model=base,
        name_map_path=_first_existing(_unique([optimizer_path.parent, weights_dir]), NAME_MAP),
        trainer_config_path=_first_existing(side, TRAINER_CONFIG),
    )


def resolve_paths(ckpt: CheckpointParams) -> CheckpointPaths:
    """Find every file of the checkpoint; a missing required piece is a ProbeError naming the key to set."""
    root = checkpoint_root(ckpt)
    if detect_format(ckpt) == "full-model":
        return _resolve_full_model(ckpt, root)
    weights_dir = _find_adapter_dir(root)
    weights = next((weights_dir / w for w in ADAPTER_WEIGHTS if (weights_dir / w).is_file()), None)  # PEFT's order
    if weights is None:
        raise ProbeError(f"no {ADAPTER_WEIGHTS[0]} in {weights_dir}", "point checkpoint.path at a saved adapter")
    _check_weights_file(weights, "adapter weights")
    base = ckpt.base_model
    if base is None:
        base = _adapter_config(weights_dir).get("base_model_name_or_path")
        if not base:
            raise ProbeError(f"{weights_dir / ADAPTER_CONFIG} names no base model", "set checkpoint.base_model")
    base = _resolve_base(base, _unique([root, weights_dir]))
    return _trainer_files(ckpt, root, weights_dir, "peft-adapter", base)


def _resolve_full_model(ckpt: CheckpointParams, root: Path) -> CheckpointPaths:
    """A full fine-tuning checkpoint: the model's own config.json and weights are θ (no base, no adapter)."""
    if ckpt.base_model is not None:
        raise ProbeError(
            f"checkpoint.base_model is set ({ckpt.base_model}), but {root} is a full-parameter checkpoint: its own "
            "weights are the policy",
            "unset checkpoint.base_model (null)",
        )
    if ckpt.use_qlora:
        raise ProbeError(
            f"checkpoint.use_qlora is true, but {root} is a full-parameter checkpoint (QLoRA trains an adapter on a "
            "4-bit base; these weights are trained themselves)",
            "set checkpoint.use_qlora: false",
        )
    if not (root / "config.json").is_file():
        raise ProbeError(f"{root} has no config.json", "point checkpoint.path at a model saved with save_pretrained")
    for path in weight_files(root):
        _check_weights_file(path)
    return _trainer_files(ckpt, root, root, "full-model", str(root))


def weight_files(model_dir: Path) -> list[Path]:
    """The files holding a full model's weights: the one file, or every shard its index names."""
    for single, index in ((MODEL_WEIGHTS[0], MODEL_WEIGHTS[1]), (MODEL_WEIGHTS[2], MODEL_WEIGHTS[3])):
        if (model_dir / single).is_file():
            return [model_dir / single]
        if (model_dir / index).is_file():
            try:
                weight_map = json.loads((model_dir / index).read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ProbeError(
                    f"{model_dir / index} is not a readable weights index ({first_line(exc)})",
                    "copy or re-save the checkpoint",
                ) from None
            shards = sorted({model_dir / name for name in weight_map.values()})
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise ProbeError(
                    f"{model_dir / index} names shard {missing[0]}, which is missing", "copy the whole checkpoint dir"
                )
            return shards
    raise ProbeError(f"no {MODEL_WEIGHTS[0]} (or shards) in {model_dir}", "point checkpoint.path at a saved model")


def _check_weights_file(path: Path, what: str = "weights") -> None:
    """Refuse an empty or cut-off weights file now, not deep inside transformers or PEFT.

    safe_open reads only the header and checks that the data it describes covers the file exactly.
    """
    fix = f"the {what} are damaged (an interrupted copy or save?): copy or re-save the checkpoint"
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt"):
                pass
        else:
            torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as exc:  # SafetensorError, truncated zip, ...: unreadable input either way
        raise ProbeError(f"{what} {path} are unreadable ({first_line(exc)})", fix) from None


def adapter_info(paths: CheckpointPaths) -> AdapterInfo | None:
    """rank, alpha, targets (+ the other knobs that change which tensors are trainable); None for a full model."""
    if paths.format != "peft-adapter":
        return None
    cfg = _adapter_config(paths.weights_dir)
    targets = cfg.get("target_modules")
    try:
        return AdapterInfo(
            peft_type=cfg.get("peft_type"),
            rank=cfg.get("r"),
            alpha=cfg.get("lora_alpha"),
            targets=sorted(targets) if isinstance(targets, list) else targets,
            modules_to_save=cfg.get("modules_to_save"),
            use_rslora=cfg.get("use_rslora"),
            use_dora=cfg.get("use_dora"),
            lora_bias=cfg.get("lora_bias"),
            base_model_name_or_path=cfg.get("base_model_name_or_path"),
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ProbeError(
            f"{paths.weights_dir / ADAPTER_CONFIG}: bad value for '{err['loc'][0]}' ({err['msg']})",
            "re-save the adapter with peft",
        ) from None


def _base_model_dir(paths: CheckpointPaths) -> Path | None:
    """The local directory of the base model: itself, or its hub-cache snapshot (never downloads)."""
    if paths.base_is_local:
        return Path(paths.base_model)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(paths.base_model, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def checkpoint_fingerprint(paths: CheckpointPaths) -> str:
    """Short sha256 over the trained weights (adapter files, or a full model's config.json and weight files) +
    optimizer.pt + every other file verify reads (the trainer's settings trainer_config.json /
    training_args.bin, trainer_state.json, scheduler.pt, the optimizer name map) + for an adapter the base's
    config.json and the names/sizes of its weight files (multi-GB frozen weights are identified by name and
    size, not hashed; a full model's are hashed: they are what the step changes)."""
    digest = hashlib.sha256()

    def add_file(p: Path) -> None:
        digest.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)

    adapter = paths.format == "peft-adapter"
    weights = [paths.weights_dir / n for n in (ADAPTER_CONFIG, *ADAPTER_WEIGHTS)] if adapter else []
    for p in weights if adapter else [paths.weights_dir / "config.json", *weight_files(paths.weights_dir)]:
        if p.is_file():
            add_file(p)
    add_file(paths.optimizer_path)
    # the trainer's settings decide the emulated update (loss_type, max_grad_norm, temperature, ...): a swapped
    # training_args.bin is another checkpoint as far as verify's output is concerned
    trainer_files = (
        paths.trainer_config_path,
        paths.training_args_path,
        paths.trainer_state_path,
        paths.scheduler_path,
        paths.name_map_path,
    )
    for p in trainer_files:
        if p is not None:
            add_file(p)
    base_dir = _base_model_dir(paths) if adapter else None  # a full model is the checkpoint's own, hashed above
    if adapter and base_dir is None:
        digest.update(f"hub:{paths.base_model}".encode())
    elif adapter:
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


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Activation checkpointing with dropout still off.

    transformers only checkpoints a GradientCheckpointingLayer when `layer.training` is true, so the
    layers themselves are flagged as training while every submodule (dropout included) stays in eval.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    for module in base.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.training = True


def load_policy_model(ckpt: CheckpointParams, paths: CheckpointPaths):
    """Base (eager attention, ckpt.dtype, 4-bit nf4 when ckpt.use_qlora) + adapter, trainable, eval mode.

    Returns a `peft.PeftModel` whose only parameters with requires_grad are the adapter's; for a full-model
    checkpoint the model itself with every parameter requiring grad (tied weights are one parameter).
    No `prepare_model_for_kbit_training`: TRL's GRPOTrainer does not call it either, so non-quantised
    weights keep ckpt.dtype as in training.
    """
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
    except pickle.UnpicklingError as exc:  # transformers reads a .bin with torch.load(weights_only=True)
        found = re.search(r"GLOBAL (\S+)", str(exc))  # torch names the global it refused, e.g. posix.system
        what = f"it refers to {found.group(1)}" if found else "it holds more than tensors"
        raise ProbeError(
            f"the base model's weights in '{paths.base_model}' are a pickle that torch refuses to load with "
            f"weights_only ({what})",
            "convert them to safetensors (load and save_pretrained them where you trust the file), "
            "or set checkpoint.base_model to a base saved as safetensors",
        ) from None
    except OSError as exc:
        where = "directory" if paths.base_is_local else "hub id (offline, or not in the local Hugging Face cache)"
        raise ProbeError(
            f"cannot load base model '{paths.base_model}' as a {where}: {first_line(exc)}",
            "set checkpoint.base_model to a local model directory",
        ) from None
    if ckpt.use_qlora:
        _disable_bnb_cpu_packing(base)
    if paths.format == "full-model":
        model = base.requires_grad_(True)
    else:
        model = _with_adapter(base, paths)
    model.eval()  # dropout off everywhere: the probe measures the deterministic policy
    if ckpt.use_checkpointing:
        enable_checkpointing(model)
    return model


def load_reference_model(ckpt: CheckpointParams, policy):
    """checkpoint.kl_reference as a frozen model in eval mode (ckpt.dtype, eager attention, ckpt's device map), or
    None when unset; a model of another vocabulary than `policy`'s is refused."""
    from transformers import AutoModelForCausalLM

    if ckpt.kl_reference is None:
        return None
    kwargs: dict[str, Any] = dict(dtype=DTYPES[ckpt.dtype], device_map=_device_map(ckpt.device_map))
    try:
        reference = AutoModelForCausalLM.from_pretrained(ckpt.kl_reference, attn_implementation="eager", **kwargs)
    except (OSError, ValueError) as exc:
        raise ProbeError(
            f"cannot load checkpoint.kl_reference '{ckpt.kl_reference}': {first_line(exc)}",
            "set checkpoint.kl_reference to the local directory of the model the run started from",
        ) from None
    vocab_size = policy.config.vocab_size
    if reference.config.vocab_size != vocab_size:
        raise ProbeError(
            f"checkpoint.kl_reference has a vocabulary of {reference.config.vocab_size}, the policy {vocab_size}",
            "set checkpoint.kl_reference to the model the run started from",
        )
    return reference.requires_grad_(False).eval()


def _with_adapter(base, paths: CheckpointPaths):
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(base, str(paths.weights_dir), is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ProbeError(
            f"adapter {paths.weights_dir} does not fit base '{paths.base_model}': {first_line(exc)}",
            "set checkpoint.base_model to the base the adapter was trained on",
        ) from None
    return model


def load_tokenizer(paths: CheckpointPaths):
    """The tokenizer saved with the adapter (Trainer checkpoints carry one), else the base model's."""
    from transformers import AutoTokenizer

    has_own = any((paths.weights_dir / f).is_file() for f in TOKENIZER_FILES)
    source = str(paths.weights_dir) if has_own else paths.base_model
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ProbeError(
            f"cannot load a tokenizer from '{source}': {first_line(exc)}",
            "save the tokenizer into the adapter dir or set checkpoint.base_model to a local dir that has one",
        ) from None


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message` (160 characters at most), for one-line errors about foreign files."""
    text = str(exc).strip()
    return f"{exc.__class__.__name__}: {text.splitlines()[0][:160]}" if text else exc.__class__.__name__
