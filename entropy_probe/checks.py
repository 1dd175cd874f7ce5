"""The verify stage's checks of a loaded checkpoint, beyond those `load_optimizer_state` enforces.

`run_checks` returns (passed, warnings) as lines for verify.json; a hard failure is a ProbeError.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ProbeError
from .optimizer_state import OptimizerState, whole
from .trainer_config import TrainerSettings


def scheduler_last_lrs(path: Path | None) -> list[float] | None:
    """The lrs scheduler.pt last set (one per param group); None when absent or not a torch LRScheduler's."""
    if path is None:
        return None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        return [float(x) for x in sd["_last_lr"]]
    except Exception:  # schedulers with non-tensor state, or foreign files: the check is advisory
        return None


def _check_model(model: torch.nn.Module, state: OptimizerState, use_checkpointing: bool) -> list[str]:
    """Only adapter tensors are trainable (a PeftModel) or every parameter is (a full model), and every module
    is in eval mode (dropout off)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if hasattr(model, "peft_config"):
        adapter_tag = f".{getattr(model, 'active_adapter', 'default')}."
        foreign = [n for n in state.names if adapter_tag not in n]
        if foreign:
            raise ProbeError(f"base parameter {foreign[0]} requires grad", "probe an adapter checkpoint (LoRA/QLoRA)")
        trainable = f"only adapter parameters are trainable ({len(state.names)} tensors)"
    else:
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        if frozen:  # the full-model source makes every parameter trainable: the optimizer state must cover them
            raise ProbeError(f"parameter {frozen[0]} of the full model is frozen", "report this as a bug")
        trainable = f"full fine-tuning: every parameter is trainable ({len(state.names)} tensors)"
    # with checkpointing the decoder layers carry training=True on purpose (checkpoint.py); their submodules don't
    flagged = (GradientCheckpointingLayer,) if use_checkpointing else ()
    training = [n for n, m in model.named_modules() if m.training and not isinstance(m, flagged)]
    if training:
        raise ProbeError(f"module {training[0]} is in training mode after loading", "report this as a bug")
    return [trainable, "eval mode: dropout off"]


def _check_steps(state: OptimizerState, trainer: TrainerSettings) -> tuple[list[str], list[str]]:
    """Adam's step is one number and equals trainer_state's global_step; the last logged lr is the last step's."""
    checks, warnings = [], []
    steps = sorted(set(state.step.values()))
    if len(steps) == 1:
        checks.append(f"Adam step {whole(steps[0])} for every parameter")
    else:
        warnings.append(f"Adam steps differ across parameters ({whole(steps[0])}..{whole(steps[-1])})")
    gs = trainer.global_step
    if gs is not None:
        if int(gs) == int(steps[-1]):
            checks.append(f"Adam step matches trainer_state global_step {gs}")
        else:
            warnings.append(f"Adam step {whole(steps[-1])} != trainer_state global_step {gs} (skipped steps?)")
    last_step = trainer.learning_rate_last_step
    if trainer.learning_rate_last is not None and gs is not None and last_step != gs:
        warnings.append(f"last logged learning_rate is from step {last_step}, not the last step {gs}")
    return checks, warnings


def _check_lrs(state: OptimizerState, scheduler_lrs: list[float] | None) -> tuple[list[str], list[str]]:
    """The scheduler's last lrs equal the optimizer's group lrs; the groups share one lr."""
    checks, warnings = [], []
    group_lrs = [g["lr"] for g in state.groups]
    if scheduler_lrs is not None:
        close = all(abs(a - b) <= 1e-12 + 1e-6 * abs(b) for a, b in zip(scheduler_lrs, group_lrs))
        if len(scheduler_lrs) == len(group_lrs) and close:
            checks.append("scheduler.pt last lr equals the optimizer's param-group lr")
        else:
            warnings.append(
                f"scheduler.pt last lr {scheduler_lrs} differs from the optimizer's param-group lrs {group_lrs}"
            )
    if len({g["lr"] for g in state.groups if g["names"]}) > 1:
        warnings.append(f"param groups have different lrs {group_lrs}; each keeps its own")
    return checks, warnings


def run_checks(
    model: torch.nn.Module,
    state: OptimizerState,
    trainer: TrainerSettings,
    scheduler_lrs: list[float] | None,
    use_checkpointing: bool,
) -> tuple[list[str], list[str]]:
    """(passed, warnings) for verify.json; `trainer`: the trainer's settings. Hard failures raise."""
    checks = _check_model(model, state, use_checkpointing)
    sizes = [len(g["names"]) for g in state.groups]
    checks.append(f"optimizer state mapped by {state.mapping}: group sizes {sizes}")
    checks.append("exp_avg / exp_avg_sq: every trainable parameter has state of its shape, finite, exp_avg_sq >= 0")
    step_checks, step_warnings = _check_steps(state, trainer)
    lr_checks, lr_warnings = _check_lrs(state, scheduler_lrs)
    return checks + step_checks + lr_checks, step_warnings + lr_warnings
