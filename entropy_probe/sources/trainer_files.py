"""What every Trainer-written checkpoint shares: files found by `checkpoint.resolve_paths` (which follows the
layout's `format`), its fingerprint, the policy and tokenizer loaded by `checkpoint`, the optimizer.pt mapped by
`optimizer_state`, the trainer's settings read by `trainer_config`. A layout's source adds its name and how
an observed step is read from two of its checkpoints."""

from __future__ import annotations

from .. import checkpoint as files
from ..optimizer_state import OptimizerState, load_optimizer_state
from ..trainer_config import TrainerSettings, read_trainer_config


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
