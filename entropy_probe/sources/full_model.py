"""The full-model source: a model saved by the HF / TRL Trainer without an adapter — `checkpoint-N/` with
config.json, model.safetensors (or shards + model.safetensors.index.json), optimizer.pt, scheduler.pt,
trainer_state.json, training_args.bin.

Every parameter is trainable; the weights on disk are θ in the model's storage dtype (the Trainer keeps no
separate fp32 master copy: a model trained in bf16 is stepped in bf16). optimizer.pt's ids follow the Trainer's
decay / no-decay groups over `named_parameters()`, which lists a tied weight once (lm_head's moments live under
the embedding's name), so `optimizer_state` maps it as it maps an adapter's. A parameter that never had a
gradient has an id but no state: refused, naming it. An observed step is the difference of the two
checkpoints' weights (`observed.observed_full_delta_theta`).
"""

from __future__ import annotations

from ..observed import observed_full_delta_theta
from .trainer_files import TrainerFilesSource


class FullModelSource(TrainerFilesSource):
    name = "full-model"

    def observed_step(self, paths, next_paths, layout, model):
        return observed_full_delta_theta(paths.weights_dir, next_paths.weights_dir, layout, model)
