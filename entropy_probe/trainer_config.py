"""The trainer's settings (loss_type, temperature, max_grad_norm, ...) and its last step and learning rate.

Sources, first found: `trainer_config.json` beside the checkpoint (plain JSON; the demo writes it, anyone can
write it by hand), else `training_args.bin` — a pickled TrainingArguments/GRPOConfig, unpickled (which runs
code) only when the user trusts it (checkpoint.trust_pickles); else the settings are unknown (None).
`trainer_state.json` gives global_step and the last logged learning rate (the lr of the last applied step).
"""

from __future__ import annotations

import enum
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .checkpoint import TRAINER_CONFIG, TRAINING_ARGS, CheckpointPaths, first_line
from .errors import ProbeError

log = logging.getLogger(__name__)


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
    # the batch: one optimizer step (one process) uses per_device_train_batch_size × gradient_accumulation_steps
    # completions; completions are drawn once every steps_per_generation × num_iterations micro-batches, in
    # batches of generation_batch_size = per_device_train_batch_size × processes × steps_per_generation (TRL's
    # GRPOConfig.__post_init__ sets both; steps_per_generation defaults to gradient_accumulation_steps)
    per_device_train_batch_size: int | None = Field(None, ge=1)
    gradient_accumulation_steps: int | None = Field(None, ge=1)
    steps_per_generation: int | None = Field(None, ge=1)
    num_iterations: int | None = Field(None, ge=1)  # μ: passes over each generation batch
    epsilon: float | None = Field(None, ge=0)  # the clipped ratio's ε_low (TRL's default 0.2)
    epsilon_high: float | None = Field(None, ge=0)  # its ε_high (TRL: None = epsilon)
    generation_batch_size: int | None = Field(None, ge=1)
    # sampling knobs besides temperature and top_p; off = top_k 0, min_p 0.0, repetition_penalty 1.0
    top_k: int | None = Field(None, ge=0)  # 0: no top-k filtering (TRL's default)
    min_p: float | None = Field(None, ge=0, le=1)  # 0.0: no min-p filtering (TRL's None is stored as 0.0)
    repetition_penalty: float | None = Field(None, gt=0)  # 1.0: no penalty (TRL's default)


TRAINER_CONFIG_KEYS = tuple(TrainerConfig.model_fields)


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
    if not isinstance(st, dict):
        raise ProbeError(f"{path} holds a {type(st).__name__}, not a trainer state", "re-save the checkpoint")
    step = st.get("global_step")
    out["global_step"] = None if step is None else _finite_number(step, int, path, "global_step")
    logged = [e for e in st.get("log_history", []) if isinstance(e, dict) and "learning_rate" in e]
    if logged:
        out["learning_rate_last"] = float(_finite_number(logged[-1]["learning_rate"], float, path, "learning_rate"))
        out["learning_rate_last_step"] = logged[-1].get("step")
    return out


def _finite_number(value: Any, kind: type, path: Path, key: str) -> int | float:
    """`value` when it is a finite number of `kind` (float admits ints), else a ProbeError."""
    kinds = (int, float) if kind is float else (int,)
    if isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value):
        return value
    raise ProbeError(f"{path}: {key} is {value!r}, not a finite number", "re-save the checkpoint")


# TRL reads None as "off" for these sampling knobs (GRPOConfig: min_p=None; top_k=None in older TRL); None here
# means "unknown", so an args object that has the attribute stores the off value instead
_OFF_WHEN_NONE = {"top_k": 0, "min_p": 0.0}
# sampling-only knobs that GRPOConfig.generation_kwargs overrides (grpo_trainer.py: generation_kwargs.update(
# args.generation_kwargs) before GenerationConfig, and vLLM's SamplingParams likewise); a None there is "off"
_GENERATION_KWARGS_OFF = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}


def _generation_kwargs(args: Any) -> dict:
    extra = getattr(args, "generation_kwargs", None)
    if isinstance(extra, str):  # a JSON string from the command line
        try:
            extra = json.loads(extra)
        except json.JSONDecodeError:
            return {}
    return extra if isinstance(extra, dict) else {}


def trainer_config_from_args(args: Any) -> dict:
    """TRAINER_CONFIG_KEYS of a TrainingArguments/GRPOConfig, JSON-ready (what trainer_config.json holds).

    The sampling knobs are the ones the trainer sampled with: generation_kwargs' top_p/top_k/min_p/
    repetition_penalty override the named arguments, and TRL's None ("off") for top_k/min_p is stored as 0.
    """
    cfg = {k: _plain(getattr(args, k, None)) for k in TRAINER_CONFIG_KEYS}
    for key, off in _OFF_WHEN_NONE.items():
        if cfg[key] is None and hasattr(args, key):
            cfg[key] = off
    if cfg["epsilon_high"] is None and hasattr(args, "epsilon_high"):  # TRL: None means ε_high = ε
        cfg["epsilon_high"] = cfg["epsilon"]
    extra = _generation_kwargs(args)
    for key, off in _GENERATION_KWARGS_OFF.items():
        if key in extra:
            cfg[key] = off if extra[key] is None else _plain(extra[key])
    return cfg


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
            f"cannot unpickle {path} ({first_line(exc)})",
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
            TRAINER_CONFIG,
            TRAINING_ARGS,
            TRAINER_CONFIG,
        )
    elif not trust_pickles:
        log.info(
            "skipped %s (a pickle, unpickling runs code); to use loss_type, temperature, max_grad_norm, ... write "
            "them into %s beside it, or set checkpoint.trust_pickles: true if you trust the file",
            args_path,
            TRAINER_CONFIG,
        )
    else:
        cfg.update(_unpickle_training_args(args_path))
        source = TRAINING_ARGS
    cfg["trainer_config_source"] = source
    return cfg


@dataclass(frozen=True)
class TrainerSettings:
    """The trainer's settings as the probe uses them (typed view of `read_trainer_config`'s result)."""

    config: TrainerConfig = field(default_factory=TrainerConfig)
    source: str | None = None  # the file the settings came from (None: unknown)
    global_step: int | None = None
    learning_rate_last: float | None = None  # trainer_state's last logged lr: the last applied step's
    learning_rate_last_step: int | None = None  # the step it was logged at

    @classmethod
    def of(cls, raw: dict) -> TrainerSettings:
        """From `read_trainer_config`'s dict."""
        return cls(
            TrainerConfig(**{k: raw[k] for k in TRAINER_CONFIG_KEYS}),
            raw.get("trainer_config_source"),
            raw.get("global_step"),
            raw.get("learning_rate_last"),
            raw.get("learning_rate_last_step"),
        )
