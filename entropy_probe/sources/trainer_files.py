"""What every Trainer-written checkpoint shares: files found by `checkpoint.resolve_paths` (which follows the
layout's `format`), its fingerprint, the policy and tokenizer loaded by `checkpoint`, the optimizer.pt mapped by
`optimizer_state`, the trainer's settings read by `trainer_config`. A layout's source adds its name and how
an observed step is read from two of its checkpoints."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .. import checkpoint as files
from ..checkpoint import first_line
from ..errors import ProbeError
from ..optimizer_state import OptimizerState, load_optimizer_state
from ..trainer_config import TrainerSettings, read_trainer_config

TRUST_OPT_IN = "set checkpoint.trust_pickles: true if you trust these files (unpickling runs arbitrary code)"


class TrainerFilesSource:
    name = ""

    def resolve(self, checkpoint) -> files.CheckpointPaths:
        return files.resolve_paths(checkpoint.model_copy(update={"format": self.name}))

    def fingerprint(self, paths: files.CheckpointPaths) -> str:
        return files.checkpoint_fingerprint(paths)

    def load_model(self, checkpoint, paths: files.CheckpointPaths):
        return files.load_policy_model(checkpoint, paths)

    def load_tokenizer(self, paths: files.CheckpointPaths):
        return files.load_tokenizer(paths)

    def load_optimizer(self, model, paths: files.CheckpointPaths) -> OptimizerState:
        return load_optimizer_state(model, paths)

    def trainer_settings(self, paths: files.CheckpointPaths, trust_pickles: bool) -> TrainerSettings:
        return TrainerSettings.of(read_trainer_config(paths, trust_pickles))


def hash_files(paths: Iterable[Path]) -> str:
    """A short sha256 over the names and bytes of `paths`, in order (a checkpoint's fingerprint)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def model_with_weights(checkpoint, config_dir: Path, weights: dict[str, torch.Tensor], where: Path):
    """The architecture of config_dir/config.json (eager attention; its dtype entry ignored) holding `weights`
    ({parameter name: tensor}, every parameter once, a tied alias under its first name) cast to
    checkpoint.dtype; every parameter trainable, eval mode, activation checkpointing as asked. Refused when
    the names differ from the model's."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_dir)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=files.DTYPES[checkpoint.dtype])
    named = dict(model.named_parameters())
    odd = sorted(set(named) ^ set(weights))
    if odd:
        raise ProbeError(
            f"parameter {odd[0]} is in one of {where} and the model of {config_dir / 'config.json'}, not in both",
            "probe the checkpoint dir whose config.json was saved with these weights",
        )
    with torch.no_grad():
        for name, value in weights.items():
            named[name].copy_(value)
    model.requires_grad_(True).eval()
    if checkpoint.use_checkpointing:
        files.enable_checkpointing(model)
    return model


def named_adam_state(state) -> dict[str, dict]:
    """{name: {exp_avg, exp_avg_sq, step}} of a reader's joined state (names, exp_avg, exp_avg_sq, step), the input
    of `optimizer_state.optimizer_state_from`."""
    return {
        n: {"exp_avg": state.exp_avg[n], "exp_avg_sq": state.exp_avg_sq[n], "step": state.step[n]} for n in state.names
    }


def load_allow_listed(
    path: Path,
    allowed: dict[str, Any],
    trust_pickles: bool,
    what: str,
    hint: Callable[[list[str]], str] = lambda foreign: "",
    pickle_module=None,
) -> Any:
    """torch.load of one file with the weights-only unpickler and exactly the `allowed` globals ({the full name
    the file refers to: the object it unpickles as}). A file naming any other type is refused (one line naming it,
    plus `hint(names)`) unless `trust_pickles`, which unpickles it fully (arbitrary code; `pickle_module` may map
    names to stand-ins). A damaged file is a one-line ProbeError too."""
    try:
        foreign = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - set(allowed))
        if foreign and not trust_pickles:
            raise ProbeError(
                f"{path} pickles {', '.join(foreign)}, which is not on the {what} allow-list{hint(foreign)}",
                TRUST_OPT_IN,
            )
        if foreign:
            extra = {} if pickle_module is None else {"pickle_module": pickle_module}
            return torch.load(path, map_location="cpu", weights_only=False, **extra)
        with torch.serialization.safe_globals([(obj, name) for name, obj in allowed.items()]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except ProbeError:
        raise
    except Exception as exc:  # truncated zip, legacy format, an unpickling failure: unreadable input
        raise ProbeError(
            f"{path} is not a readable {what} checkpoint file ({first_line(exc)})",
            "re-save the checkpoint, or copy the file again",
        ) from None


def require_adam_keys(where, name: str, entry: dict, fix: str) -> None:
    """One parameter's optimizer state must hold torch Adam's exp_avg, exp_avg_sq and step; else a one-line refusal
    naming the file (`where`), the parameter and the keys found (an 8-bit optimizer's state1/state2, ...)."""
    if not {"exp_avg", "exp_avg_sq", "step"} <= set(entry):
        raise ProbeError(
            f"{where}: the optimizer state of {name} has {sorted(entry) or 'no entries'}, not exp_avg, exp_avg_sq "
            "and step (not an Adam/AdamW state: e.g. an 8-bit optimizer)",
            fix,
        )


def finite_moment(name: str, key: str, tensor: torch.Tensor, what: str) -> torch.Tensor:
    """`tensor` (a weight or moment of `name` read from a `what` checkpoint), refused when not finite or, for
    exp_avg_sq, negative."""
    if not bool(torch.isfinite(tensor).all()):
        raise ProbeError(
            f"{key} of {name} in the {what} checkpoint contains NaN/inf",
            "probe an earlier checkpoint (training diverged before this one was saved)",
        )
    if key == "exp_avg_sq" and bool((tensor < 0).any()):
        raise ProbeError(f"exp_avg_sq of {name} has negative entries (corrupt state)", "re-save the checkpoint")
    return tensor
