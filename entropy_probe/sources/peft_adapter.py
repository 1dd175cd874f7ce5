"""The PEFT source: a LoRA/QLoRA adapter dir (Trainer `checkpoint-N/` or a bare adapter) with the Trainer's
optimizer.pt beside or above it, trainer_config.json / training_args.bin and trainer_state.json.

The file logic lives in `checkpoint` (paths, fingerprint, model and tokenizer), `optimizer_state`
(optimizer.pt → named AdamW state) and `trainer_config` (the trainer's settings); an observed step is the
difference of two adapter files (`observed.observed_delta_theta`).
"""

from __future__ import annotations

from ..observed import adapter_parameter_names, observed_delta_theta
from .trainer_files import TrainerFilesSource


class PeftAdapterSource(TrainerFilesSource):
    name = "peft-adapter"

    def observed_step(self, paths, next_paths, layout, model):
        names = adapter_parameter_names(model)
        return observed_delta_theta(paths.weights_dir, next_paths.weights_dir, layout, names)
