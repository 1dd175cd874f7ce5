"""The PEFT source: a LoRA/QLoRA adapter dir (Trainer `checkpoint-N/` or a bare adapter) with the Trainer's
optimizer.pt beside or above it, trainer_config.json / training_args.bin and trainer_state.json.

The file logic lives in `checkpoint` (paths, fingerprint, model and tokenizer), `optimizer_state`
(optimizer.pt → named AdamW state) and `trainer_config` (the trainer's settings); this class is their
`CheckpointSource` face.
"""

from __future__ import annotations

from .. import checkpoint as files
from ..optimizer_state import OptimizerState, load_optimizer_state
from ..trainer_config import TrainerSettings, read_trainer_config


class PeftAdapterSource:
    name = "peft-adapter"

    def resolve(self, checkpoint) -> files.CheckpointPaths:
        return files.resolve_paths(checkpoint)

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
