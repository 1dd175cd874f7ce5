"""The step the trainer really took: Δθ_obs = θ(next) − θ(this) from two consecutive checkpoints (docs/math.md §4.8).

A Trainer run that saves `checkpoint-N/` (verl: `global_step_N/`) every step holds every step it took. The
trained weights of two consecutive checkpoints give Δθ_obs (for LoRA the step in A and B; for a full model
every parameter; lr, momentum and weight decay included), with no U batch and no optimizer emulation;
δH₁_obs = X̄ · Δθ_obs is then the first-order entropy change along the step actually taken. Each checkpoint
source reads its own weights (`sources`); the adapter and full-model files are read here.

- `next_checkpoint`: the `checkpoint-M` after `checkpoint-N` in the same run dir (smallest M > N).
- `check_next_checkpoint`: refuses a "next" checkpoint that is not a later save of the same run (a step
  backwards, another base or adapter config, an Adam state that does not continue this one, another log).
- `adapter_parameter_names`: adapter-file key → trainable parameter name, as PEFT saves the loaded model.
- `observed_delta_theta`: the flat float64 Δθ_obs of two adapters in a `FlatLayout`'s order; refuses two adapters
  of different layouts (a tensor missing on either side, another shape, another adapter_config.json).
- `observed_full_delta_theta`: the same for two full models' weight files (tied aliases once, buffers not θ);
  `delta_theta`: the difference of two {name: tensor} maps, checked, for every source.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Mapping

import torch

from .checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CheckpointPaths, first_line
from .errors import ProbeError
from .trainer_config import read_trainer_state
from .update import FlatLayout, is_long

log = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)|global_step_(\d+)")  # the HF Trainer's, verl's
# adapter_config.json entries that decide which tensors the adapter has, their shapes and what they mean
LAYOUT_KEYS = (
    "peft_type",
    "base_model_name_or_path",
    "r",
    "lora_alpha",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "use_dora",
    "lora_bias",
    "modules_to_save",
)
SAME_RUN = "set update.next_checkpoint to the checkpoint saved one step after checkpoint.path by the same run"


# ----------------------------------------------------------------------------------------------
# which checkpoint is next


def checkpoint_number(path: Path) -> int | None:
    """N of a directory named `checkpoint-N` (the Trainer's global step) or `global_step_N` (verl's; also of its
    `actor/` dir), else None."""
    path = Path(path)
    if path.name == "actor":
        path = path.parent
    match = CHECKPOINT_NAME.fullmatch(path.name)
    return int(match.group(1) or match.group(2)) if match else None


def next_checkpoint(this: str | Path) -> Path:
    """The checkpoint saved next beside `this` = `checkpoint-N` (or verl's `global_step_N[/actor]`): the sibling
    with the smallest M > N (numeric order: checkpoint-2 → checkpoint-3 even when checkpoint-10 exists)."""
    this = Path(this)
    if not this.is_dir():
        raise ProbeError(f"checkpoint {this} not found", "set checkpoint.path to a Trainer checkpoint-N/ dir")
    if checkpoint_number(this) is None:
        this = this.resolve()  # e.g. "." inside the checkpoint dir
    n = checkpoint_number(this)
    if n is None:
        raise ProbeError(
            f"{this} is not named checkpoint-N (or global_step_N), so the next checkpoint of its run is unknown",
            f"{SAME_RUN}",
        )
    inner = this.name if this.name == "actor" else None  # verl: global_step_N/actor
    step_dir = this.parent if inner else this
    later = sorted(
        (m, d)
        for d in step_dir.parent.iterdir()
        if (m := checkpoint_number(d)) is not None and m > n and (d / (inner or "")).is_dir()
    )
    if not later:
        raise ProbeError(
            f"no checkpoint after {step_dir.name} in {step_dir.parent}",
            "keep the next checkpoint of the run (save every step: save_steps=1), or " + SAME_RUN,
        )
    found = step_dir.parent / later[0][1].name
    return found / inner if inner else found


# ----------------------------------------------------------------------------------------------
# is it the same run, one save later


def check_next_checkpoint(this: CheckpointPaths, nxt: CheckpointPaths) -> None:
    """Refuse `nxt` unless it is a later checkpoint of the run that saved `this` (ProbeError, one line).

    Checked, cheapest first: the same format; the same base model and adapter_config.json layout (rank,
    alpha, target modules, ...), or for the full-parameter formats the same config.json; a later step
    (checkpoint-N / global_step_N names and trainer_state.json's global_step, where known); the same logged
    history up to this step (trainer_state.json's log_history: a run with another seed logs other losses); for
    the formats with one optimizer.pt, an Adam state that continues this one (`_check_adam_continues`). A gap
    of more than one trainer step is a warning: Δθ_obs is then the sum of the steps.
    """
    if this.format != nxt.format:
        raise ProbeError(
            f"the next checkpoint {nxt.checkpoint_dir} is a {nxt.format} checkpoint, checkpoint.path a {this.format} "
            "one, so θ(next) − θ(this) is not a step",
            SAME_RUN,
        )
    if this.format != "peft-adapter":
        _check_same_config(this.weights_dir, nxt.weights_dir)
    else:
        if _base_identity(this) != _base_identity(nxt):
            raise ProbeError(
                f"the next checkpoint {nxt.weights_dir} is on base model {nxt.base_model}, checkpoint.path on "
                f"{this.base_model}, so θ(next) − θ(this) is not a step",
                SAME_RUN,
            )
        _check_same_adapter(this.weights_dir, nxt.weights_dir)
    state, next_state = read_trainer_state(this.trainer_state_path), read_trainer_state(nxt.trainer_state_path)
    gaps = [
        _step_gap(checkpoint_step(this), checkpoint_step(nxt), "its checkpoint-N name", this, nxt),
        _step_gap(state["global_step"], next_state["global_step"], "trainer_state.json's global_step", this, nxt),
    ]
    _check_same_history(this, nxt, state["global_step"])
    if this.format in ("peft-adapter", "full-model"):  # one optimizer.pt; the others' moments are rank shards
        _check_adam_continues(this.optimizer_path, nxt.optimizer_path)
    gap = next((g for g in gaps if g is not None), None)
    if gap is not None and gap > 1:
        log.warning(
            "%s is %d trainer steps after %s: Δθ_obs is their sum, not one step",
            nxt.checkpoint_dir,
            gap,
            this.checkpoint_dir,
        )


def _base_identity(paths: CheckpointPaths) -> str:
    """The base model as one string: its resolved directory, or the hub id."""
    return str(Path(paths.base_model).resolve()) if paths.base_is_local else paths.base_model


def checkpoint_step(paths: CheckpointPaths) -> int | None:
    """N of the `checkpoint-N` (or verl `global_step_N`) dir that names the checkpoint (`checkpoint_dir`, itself or
    its parent; not the base model an accelerate FSDP save takes its config from), else None."""
    for d in (paths.checkpoint_dir, paths.checkpoint_dir.parent, paths.optimizer_path.parent):
        n = checkpoint_number(d.resolve())
        if n is not None:
            return n
    return None


def _step_gap(step: int | None, next_step: int | None, how: str, this: CheckpointPaths, nxt: CheckpointPaths):
    """next_step − step (None when either is unknown), refused unless > 0."""
    if step is None or next_step is None:
        return None
    if next_step <= step:
        raise ProbeError(
            f"the next checkpoint {nxt.checkpoint_dir} is at step {next_step} and checkpoint.path {this.checkpoint_dir} "
            f"at step {step} (by {how}): the next checkpoint must be a later one",
            SAME_RUN,
        )
    return next_step - step


def _adam_moments(path: Path) -> tuple[dict, float]:
    """({param id: (step, exp_avg_sq or None)}, the smallest β₂ of its groups) of an optimizer.pt, memory-mapped
    (the moments are not copied)."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated, foreign pickle: unreadable either way (verify says more)
        raise ProbeError(
            f"optimizer state {path} is unreadable ({first_line(exc)})", "re-save the checkpoint"
        ) from None
    state = saved.get("state") if isinstance(saved, dict) else None
    if not isinstance(state, dict) or not isinstance(saved.get("param_groups"), list):
        raise ProbeError(f"{path} is not a torch optimizer state_dict", "point at the optimizer.pt the Trainer saved")
    moments = {}
    for pid, st in state.items():
        if isinstance(st, dict) and "step" in st:
            v = st.get("exp_avg_sq")
            moments[pid] = (float(st["step"]), v if isinstance(v, torch.Tensor) else None)
    betas = [float(g["betas"][1]) for g in saved["param_groups"] if isinstance(g, dict) and "betas" in g]
    return moments, min(betas, default=0.0)  # the smallest β₂: the weakest bound in `_check_adam_continues`


def _check_adam_continues(this_path: Path, next_path: Path) -> None:
    """The next optimizer.pt is this one k ≥ 1 Adam steps later.

    The step count must advance. And Adam's second moment can only decay by β₂ per step,
    v ← β₂·v + (1 − β₂)·g², so v_next ≥ β₂^k · v_this element by element (up to the rounding of k products):
    an Adam state of another run (another seed, the same layout) falls below that bound somewhere.
    """
    (this, beta2), (nxt, _) = _adam_moments(this_path), _adam_moments(next_path)
    last, next_last = max((s for s, _ in this.values()), default=None), max((s for s, _ in nxt.values()), default=None)
    if last is not None and next_last is not None and next_last <= last:
        raise ProbeError(
            f"the optimizer state of the next checkpoint ({next_path}) is at Adam step {next_last:g}, "
            f"checkpoint.path's at {last:g}: it does not advance",
            SAME_RUN,
        )
    for pid, (step, v) in this.items():
        next_step, next_v = nxt.get(pid, (None, None))
        if v is None or next_v is None or next_v.shape != v.shape or next_step is None:
            continue  # another layout is refused elsewhere (adapter config, shapes)
        k = next_step - step
        rounding = 4 * max(k, 1) * torch.finfo(v.dtype).eps
        floor = v.double() * beta2 ** max(k, 0) * (1 - rounding)
        if k < 0 or bool((next_v.double() < floor).any()):
            raise ProbeError(
                f"the Adam state of the next checkpoint ({next_path}) does not continue checkpoint.path's "
                f"(parameter {pid}: {'its step count falls' if k < 0 else 'exp_avg_sq fell below β₂^k × its value'})"
                ", so it is not a later save of the same run",
                SAME_RUN,
            )


def _check_same_history(this: CheckpointPaths, nxt: CheckpointPaths, step: int | None) -> None:
    """The next checkpoint's trainer_state.json logged the same history up to this checkpoint's step."""
    if this.trainer_state_path is None or nxt.trainer_state_path is None or step is None:
        return
    history, next_history = (_log_history(p, step) for p in (this.trainer_state_path, nxt.trainer_state_path))
    if history != next_history:
        raise ProbeError(
            f"the trainer_state.json log of the next checkpoint {nxt.checkpoint_dir} differs from checkpoint.path's up "
            f"to step {step}, so it is another run",
            SAME_RUN,
        )


def _log_history(path: Path, step: int) -> list:
    """log_history entries up to `step` (read_trainer_state has already checked the file is a JSON object)."""
    history = json.loads(path.read_text()).get("log_history", [])
    return [e for e in history if isinstance(e, dict) and isinstance(e.get("step"), int) and e["step"] <= step]


# ----------------------------------------------------------------------------------------------
# adapter files


def adapter_parameter_names(model) -> dict[str, str]:
    """{adapter-file key: parameter name} for the loaded `PeftModel`, e.g.
    `…q_proj.lora_A.weight` → `…q_proj.lora_A.default.weight`.

    The mapping is PEFT's own: `get_peft_model_state_dict` builds the dict `save_pretrained` writes; run on the
    live parameters (keep_vars) its values are the Parameter objects, matched to their names by identity.
    """
    from peft.utils import get_peft_model_state_dict

    name_of = {id(p): n for n, p in model.named_parameters()}
    saved = get_peft_model_state_dict(model, state_dict=model.state_dict(keep_vars=True), save_embedding_layers=False)
    names = {}
    for key, tensor in saved.items():
        if id(tensor) not in name_of:
            raise ProbeError(
                f"adapter entry {key} is not a parameter of the loaded model (PEFT transforms it when saving)",
                "observed steps need an adapter whose saved tensors are its parameters (LoRA)",
            )
        names[key] = name_of[id(tensor)]
    return names


def _adapter_layout(weights_dir: Path) -> dict:
    """The LAYOUT_KEYS of adapter_config.json (target_modules sorted: PEFT writes a set as a list)."""
    config = _json_object(weights_dir / ADAPTER_CONFIG)
    layout = {k: config.get(k) for k in LAYOUT_KEYS}
    if isinstance(layout["target_modules"], list):
        layout["target_modules"] = sorted(layout["target_modules"])
    return layout


def read_adapter_tensors(weights_dir: str | Path) -> dict[str, torch.Tensor]:
    """{key: tensor} of the adapter weights file in `weights_dir` (safetensors, else PEFT's .bin)."""
    weights_dir = Path(weights_dir)
    path = next((weights_dir / w for w in ADAPTER_WEIGHTS if (weights_dir / w).is_file()), None)
    if path is None:
        raise ProbeError(f"no {ADAPTER_WEIGHTS[0]} in {weights_dir}", "point at a checkpoint with its adapter saved")
    fix = "the adapter weights are damaged (an interrupted copy or save?): copy or re-save the checkpoint"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # SafetensorError, truncated zip, foreign pickle: unreadable input either way
        raise ProbeError(f"adapter weights {path} are unreadable ({first_line(exc)})", fix) from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ProbeError(f"adapter weights {path} are not a dict of tensors", fix)
    return tensors


def _check_same_adapter(this_dir: Path, next_dir: Path) -> None:
    this, nxt = _adapter_layout(this_dir), _adapter_layout(next_dir)
    for key in LAYOUT_KEYS:
        if this[key] != nxt[key]:
            raise ProbeError(
                f"the adapters of {this_dir} and {next_dir} differ in {ADAPTER_CONFIG} '{key}' "
                f"({this[key]!r} vs {nxt[key]!r}), so θ(next) − θ(this) is not a step",
                SAME_RUN,
            )


def _check_same_keys(this: Mapping, nxt: Mapping, this_dir: Path, next_dir: Path, names: Mapping[str, str]) -> None:
    """Both files hold the same tensors, and each is a trainable parameter of the model."""
    for a, b, a_dir, b_dir in ((this, nxt, this_dir, next_dir), (nxt, this, next_dir, this_dir)):
        missing = sorted(set(a) - set(b))
        if missing:
            raise ProbeError(f"adapter tensor {missing[0]} of {a_dir} is missing in {b_dir}", SAME_RUN)
    foreign = sorted(set(this) - set(names))
    if foreign:
        raise ProbeError(
            f"adapter tensor {foreign[0]} of {this_dir} is no parameter of the loaded model",
            "set checkpoint.path to a checkpoint of the same run as the adapter loaded",
        )


def observed_delta_theta(
    this_dir: str | Path, next_dir: str | Path, layout: FlatLayout, names: Mapping[str, str]
) -> torch.Tensor:
    """Δθ_obs = θ(next) − θ(this) of two adapters, flat float64 in `layout` order (`delta_theta`; its names:
    trainable parameter names).

    this_dir, next_dir: the adapter dirs of two checkpoints (adapter_config.json + weights);
    names: {adapter-file key: parameter name} (`adapter_parameter_names` of the loaded model).
    Refuses (one line naming the tensor): another adapter_config.json layout, a tensor missing on either side,
    a shape differing from the other file or the model, a trainable parameter absent from the files,
    non-floating or non-finite values.
    """
    this_dir, next_dir = Path(this_dir), Path(next_dir)
    _check_same_adapter(this_dir, next_dir)
    this, nxt = read_adapter_tensors(this_dir), read_adapter_tensors(next_dir)
    _check_same_keys(this, nxt, this_dir, next_dir, names)
    by_name = [{names[k]: t for k, t in tensors.items()} for tensors in (this, nxt)]
    fix = "observed steps cover only the adapter's saved tensors: train only the adapter"
    return delta_theta(*by_name, layout, (this_dir, next_dir), fix)


def observed_full_delta_theta(this_dir: str | Path, next_dir: str | Path, layout: FlatLayout, model) -> torch.Tensor:
    """Δθ_obs = θ(next) − θ(this) of two full-model checkpoints (config.json + weights, one file or shards),
    flat float64 in `layout` order (float32 over a long layout: `delta_theta`). A tied weight saved under both names (lm_head beside the embedding) is one
    parameter; the file's other entries (buffers) are not θ."""
    this_dir, next_dir = Path(this_dir), Path(next_dir)
    _check_same_config(this_dir, next_dir)
    name_of = full_parameter_names(model)
    by_name = []
    for where in (this_dir, next_dir):
        tensors = read_model_tensors(where)
        by_name.append({name_of[k]: t for k, t in tensors.items() if k in name_of})
    fix = "save the whole model at every checkpoint (the Trainer's save_pretrained does)"
    return delta_theta(*by_name, layout, (this_dir, next_dir), fix)


def delta_theta(this: Mapping, nxt: Mapping, layout: FlatLayout, where: tuple[Path, Path], fix: str) -> torch.Tensor:
    """θ(next) − θ(this) in float64 (exact: a difference of two floats), flat in `layout` order, from
    {parameter name: tensor} of each checkpoint; refused unless every trainable parameter is there, of its shape,
    floating and finite on both sides. Over a long layout (a full-parameter model: more than UPDATE_CHUNK elements)
    each tensor's difference is taken in float64 and stored in float32, as the emulated rules store Δθ there
    (`update.long_dtype`): 4 bytes per parameter, rounded to 6e-8 of each element."""
    delta = torch.empty(layout.numel, dtype=torch.float32 if is_long(layout.numel) else torch.float64)
    for name, shape, part in zip(layout.names, layout.shapes, delta.split(layout.numels)):
        for tensors, place in zip((this, nxt), where):
            t = tensors.get(name)
            if t is None:
                raise ProbeError(f"trainable parameter {name} is not in the weights of {place}", fix)
            if tuple(t.shape) != tuple(shape):
                raise ProbeError(
                    f"tensor {name} of {place} has shape {tuple(t.shape)}, the parameter {tuple(shape)}", SAME_RUN
                )
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ProbeError(
                    f"tensor {name} of {place} is {t.dtype} with non-finite or non-float values",
                    "observe steps before training diverged (an earlier checkpoint pair)",
                )
        part.copy_((nxt[name].double() - this[name].double()).reshape(-1))
    log.info("observed step %s → %s: ‖Δθ_obs‖ = %.4g", *where, float(delta.norm()))
    return delta


# ----------------------------------------------------------------------------------------------
# full-model files


# config.json entries a save writes that say nothing about the model's layout
CONFIG_NOISE = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache")


def full_parameter_names(model) -> dict[str, str]:
    """{state-dict key: trainable parameter name}, tied aliases included (lm_head.weight → the embedding's
    name when the two are one tensor), matched by identity; buffers are not parameters."""
    name_of = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    return {k: name_of[id(v)] for k, v in model.state_dict(keep_vars=True).items() if id(v) in name_of}


def read_model_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """{key: tensor} of a saved model's weights (safetensors, else torch's .bin), every shard."""
    from .checkpoint import weight_files

    tensors = {}
    for path in weight_files(Path(model_dir)):
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                tensors.update(load_file(str(path)))
            else:
                tensors.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:  # SafetensorError, truncated zip, foreign pickle: unreadable input either way
            raise ProbeError(
                f"model weights {path} are unreadable ({first_line(exc)})", "copy or re-save the checkpoint"
            ) from None
    return tensors


def _check_same_config(this_dir: Path, next_dir: Path) -> None:
    """Both checkpoints hold the same model (config.json equal up to CONFIG_NOISE)."""
    this, nxt = (_model_config(d) for d in (this_dir, next_dir))
    for key in sorted(set(this) | set(nxt)):
        if this.get(key) != nxt.get(key):
            raise ProbeError(
                f"the models of {this_dir} and {next_dir} differ in config.json '{key}' "
                f"({this.get(key)!r} vs {nxt.get(key)!r}), so θ(next) − θ(this) is not a step",
                SAME_RUN,
            )


def _model_config(model_dir: Path) -> dict:
    return {k: v for k, v in _json_object(model_dir / "config.json").items() if k not in CONFIG_NOISE}


def _json_object(path: Path) -> dict:
    """A checkpoint's JSON file as a dict, else a one-line ProbeError."""
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ProbeError(f"{path} is not readable JSON ({first_line(exc)})", "copy or re-save the checkpoint") from None
    if not isinstance(config, dict):
        raise ProbeError(f"{path} is not a JSON object", "copy or re-save the checkpoint")
    return config


__all__ = [
    "adapter_parameter_names",
    "check_next_checkpoint",
    "checkpoint_number",
    "next_checkpoint",
    "observed_delta_theta",
    "observed_full_delta_theta",
]
