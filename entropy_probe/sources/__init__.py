"""Checkpoint sources: the one place that turns a trainer's checkpoint layout into what every stage needs.

A source reads one layout (a PEFT adapter beside the Trainer's optimizer.pt, `peft_adapter`; a full model
saved by the Trainer with its optimizer.pt, `full_model`; a DeepSpeed ZeRO-1/2/3 checkpoint of the Trainer,
`deepspeed_zero`; a verl FSDP2 actor checkpoint, `verl_fsdp`; the Trainer's FSDP2 checkpoint through accelerate,
`accelerate_fsdp`) and gives the named trainable parameters (the loaded policy), the AdamW state per name with
its group's hyperparameters, the trainer's settings, the next lr, and a fingerprint of the files. `Probe` and the
verify stage reach a checkpoint only through `source_for(checkpoint params)`; a new layout (full-parameter
Trainer, DeepSpeed, verl) is a new module here implementing `CheckpointSource`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..optimizer_state import OptimizerState
from ..trainer_config import TrainerSettings


class CheckpointSource(Protocol):
    """What a checkpoint layout provides. `paths` is the source's own record of the files it found."""

    name: str

    def resolve(self, checkpoint) -> Any:
        """The checkpoint's files for params `checkpoint` (CheckpointParams), or a one-line ProbeError."""

    def fingerprint(self, paths) -> str:
        """A short hash identifying the checkpoint (weights, optimizer state, trainer settings, base)."""

    def load_model(self, checkpoint, paths):
        """The policy in eval mode, exactly the checkpoint's trainable parameters requiring grad."""

    def load_tokenizer(self, paths):
        """The tokenizer the checkpoint was trained with."""

    def load_optimizer(self, model, paths) -> OptimizerState:
        """The AdamW state per named trainable parameter of `model`, with its groups' hyperparameters."""

    def trainer_settings(self, paths, trust_pickles: bool) -> TrainerSettings:
        """The trainer's settings (loss type, temperature, clipping, ...), its last step and lr."""

    def observed_step(self, paths, next_paths, layout, model):
        """Δθ_obs = θ(next) − θ(this), flat float64 in `layout` order, from the two checkpoints' files."""


@dataclass
class LoadedCheckpoint:
    """A checkpoint read by its source: everything `Probe` is built from."""

    source: CheckpointSource
    paths: Any
    fingerprint: str
    model: Any
    tokenizer: Any
    trainer: TrainerSettings
    optimizer: OptimizerState | None  # None when the state comes from verify's artifact instead


def source_for(checkpoint) -> CheckpointSource:
    """The source that reads params `checkpoint` (CheckpointParams): checkpoint.format, or the layout found."""
    from ..checkpoint import detect_format
    from .accelerate_fsdp import AccelerateFsdpSource
    from .deepspeed_zero import DeepSpeedZeroSource
    from .full_model import FullModelSource
    from .peft_adapter import PeftAdapterSource
    from .verl_fsdp import VerlFsdpSource

    every = (PeftAdapterSource(), FullModelSource(), DeepSpeedZeroSource(), VerlFsdpSource(), AccelerateFsdpSource())
    sources = {s.name: s for s in every}
    return sources[detect_format(checkpoint)]


def load_checkpoint(checkpoint, with_optimizer: bool = True) -> LoadedCheckpoint:
    """Resolve, fingerprint and load params `checkpoint`: model, tokenizer, trainer settings, AdamW state."""
    source = source_for(checkpoint)
    paths = source.resolve(checkpoint)
    fingerprint = source.fingerprint(paths)
    model = source.load_model(checkpoint, paths)
    optimizer = source.load_optimizer(model, paths) if with_optimizer else None
    trainer = source.trainer_settings(paths, checkpoint.trust_pickles)
    return LoadedCheckpoint(source, paths, fingerprint, model, source.load_tokenizer(paths), trainer, optimizer)


__all__ = ["CheckpointSource", "LoadedCheckpoint", "load_checkpoint", "source_for"]
