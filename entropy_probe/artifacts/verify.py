"""What the verify stage writes, as one set: `write_verify` / `read_verify`.

- `verify.json` (`VerifyReport`): the checkpoint's files and identity, the trainable parameters, the AdamW
  param groups, the chosen learning rate, the trainer's settings, the checks passed and the warnings.
- `checkpoint.json` (`CheckpointIdentity`): what identifies the checkpoint, without the lr choice, so its
  hash changes only with the checkpoint. No stage reads it (the sampling stages fingerprint the checkpoint
  themselves and do not depend on verify); it is a DVC output for anything that wants to depend on the
  checkpoint's identity alone.
- `optimizer_state.safetensors` (kind `optimizer_state`, its fingerprint in the header): `exp_avg.<name>`,
  `exp_avg_sq.<name>` (dtype as saved) and `step.<name>` (float64 scalar) per trainable parameter, named as
  the loaded PeftModel names it. Later stages read it through `read_verify`, never optimizer.pt again.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import torch
from pydantic import Field

from ..checkpoint import AdapterInfo, CheckpointPaths
from ..errors import ProbeError
from ..files import read_tensors, tensor_shapes, write_tensors
from ..optimizer_state import OptimizerState, ParamGroup
from ..trainer_config import TrainerConfig
from .base import JsonArtifact, Record

STATE_FILE = "optimizer_state.safetensors"
STATE_KIND = "optimizer_state"
STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")
RERUN = "rerun entropy-probe verify"


class Parameter(Record):
    """One trainable tensor: its name, shape, size and param group index."""

    name: str
    shape: list[int]
    numel: int
    group: int


class CheckpointIdentity(JsonArtifact):
    FILE: ClassVar[str] = "checkpoint.json"
    STAGE: ClassVar[str] = "verify"

    fingerprint: str
    checkpoint: CheckpointPaths
    base_model: str
    adapter: AdapterInfo | None  # None: a full-model checkpoint
    trainer_config: TrainerConfig
    trainer_config_source: str | None  # the file the trainer's settings came from (None: unknown)


class VerifyReport(JsonArtifact):
    FILE: ClassVar[str] = "verify.json"
    STAGE: ClassVar[str] = "verify"

    fingerprint: str  # `checkpoint.checkpoint_fingerprint`
    checkpoint: CheckpointPaths
    base_model: str
    adapter: AdapterInfo | None  # None: a full-model checkpoint
    use_qlora: bool
    dtype: Literal["bf16", "fp16", "fp32"]
    device_map: str
    parameters: list[Parameter]  # in optimizer order
    n_trainable: int  # values
    n_trainable_tensors: int
    optimizer_mapping: str  # how optimizer.pt's positions were matched to names
    param_groups: list[ParamGroup]
    learning_rate: float = Field(gt=0)  # the chosen one
    learning_rate_setting: Literal["next", "last"] | float  # checkpoint.learning_rate
    learning_rate_next: float = Field(ge=0)  # stored in the optimizer: the next step's
    learning_rate_last: float | None  # trainer_state's last logged: the last applied step's
    step: int | float  # Adam's step count (the largest over the parameters)
    global_step: int | None
    max_grad_norm: float | None  # the trainer's
    trainer_config: TrainerConfig
    trainer_config_source: str | None
    checks: list[str]
    warnings: list[str]

    def identity(self) -> CheckpointIdentity:
        return CheckpointIdentity(**{k: getattr(self, k) for k in CheckpointIdentity.model_fields})


def write_verify(directory: str | Path, report: VerifyReport, state: OptimizerState) -> None:
    """Write the three files into `directory` (the stage's staging dir)."""
    directory = Path(directory)
    if [p.name for p in report.parameters] != state.names:
        raise ValueError("the verify report lists other parameters than the optimizer state holds")
    tensors = {}
    for n in state.names:
        tensors[f"exp_avg.{n}"] = state.exp_avg[n]
        tensors[f"exp_avg_sq.{n}"] = state.exp_avg_sq[n]
        tensors[f"step.{n}"] = torch.tensor(state.step[n], dtype=torch.float64)
    write_tensors(directory / STATE_FILE, tensors, kind=STATE_KIND, meta={"fingerprint": report.fingerprint})
    report.write(directory)
    report.identity().write(directory)


def read_verify(directory: str | Path, rows=None) -> tuple[VerifyReport, OptimizerState]:
    """The verify report and the optimizer state it describes; `rows(name, shape)`: the rows of dim 0 of each
    moment to read (None: whole), as `files.read_tensors` (a sharded process reads its own shard).

    Refused with a one-line ProbeError: a missing or malformed verify.json, a state file of another
    checkpoint (fingerprint), param groups that do not list the parameters, a missing, extra or misshapen tensor.
    """
    directory = Path(directory)
    report = VerifyReport.read(directory)
    path = directory / STATE_FILE
    tensors, meta = read_tensors(path, STATE_KIND, rows)
    shapes = {k: tuple(t.shape) for k, t in tensors.items()} if rows is None else tensor_shapes(path)
    if meta.get("fingerprint") != report.fingerprint:
        raise ProbeError(
            f"{path} (checkpoint {meta.get('fingerprint')}) does not belong to {VerifyReport.FILE} "
            f"(checkpoint {report.fingerprint})",
            RERUN,
        )
    _check_groups(report, directory / VerifyReport.FILE)
    _check_tensors(report, shapes, path)
    names = [p.name for p in report.parameters]
    state = OptimizerState(
        names=names,
        exp_avg={n: tensors[f"exp_avg.{n}"] for n in names},
        exp_avg_sq={n: tensors[f"exp_avg_sq.{n}"] for n in names},
        step={n: float(tensors[f"step.{n}"]) for n in names},
        groups=[ParamGroup(**g) for g in report.param_groups],
        mapping=report.optimizer_mapping,
        sharded=rows is not None,
    )
    return report, state


def _check_groups(report: VerifyReport, path: Path) -> None:
    """The groups list the parameters, in order, and each parameter names its group."""
    in_groups = [(n, gi) for gi, g in enumerate(report.param_groups) for n in g["names"]]
    if in_groups != [(p.name, p.group) for p in report.parameters]:
        raise ProbeError(f"{path}: param_groups do not list the parameters in order", RERUN)


def _check_tensors(report: VerifyReport, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """exp_avg/exp_avg_sq of each parameter's shape and a scalar step, for the listed parameters only (`shapes`:
    the file's tensor shapes)."""
    expected = {f"{k}.{p.name}": (() if k == "step" else tuple(p.shape)) for p in report.parameters for k in STATE_KEYS}
    absent = [k for k in expected if k not in shapes]
    if absent:
        raise ProbeError(f"{path} lacks tensor {absent[0]}", RERUN)
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise ProbeError(f"{path} holds tensor {extra[0]}, which {VerifyReport.FILE} does not list", RERUN)
    for key, shape in expected.items():
        if shapes[key] != shape:
            raise ProbeError(f"{path}: {key} has shape {shapes[key]}, expected {shape}", RERUN)
