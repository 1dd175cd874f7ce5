"""demo.json: what the demo stage built (sizes, reward rates before and after RL, the GRPO settings, where).

Written by the demo stage next to base/, run/ and prompts.jsonl; no later stage reads it (they read the
checkpoints), so it may hold the build's timings (`seconds`).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import field_validator

from ..params import DemoParams
from .base import JsonArtifact, Record

GRPO_KEYS = (  # the trainer settings the probe mirrors, recorded in demo.json
    "loss_type",
    "scale_rewards",
    "temperature",
    "top_p",
    "beta",
    "max_grad_norm",
    "num_generations",
    "max_completion_length",
    "learning_rate",
    "lr_scheduler_type",
    "optim",
    "weight_decay",
)


class GrpoSettings(Record):
    """The GRPOConfig values of GRPO_KEYS (enums as their string values)."""

    loss_type: str
    scale_rewards: str | bool
    temperature: float
    top_p: float
    beta: float
    max_grad_norm: float
    num_generations: int
    max_completion_length: int
    learning_rate: float
    lr_scheduler_type: str
    optim: str
    weight_decay: float

    @field_validator("lr_scheduler_type", "optim", "scale_rewards", mode="before")
    @classmethod
    def _enum_value(cls, v):
        return getattr(v, "value", v)  # transformers' SchedulerType / OptimizerNames are str enums


class DemoReport(JsonArtifact):
    FILE: ClassVar[str] = "demo.json"
    STAGE: ClassVar[str] = "demo"

    n_params: int  # the base model's
    n_trainable: int  # the LoRA adapter's (every parameter for demo.finetune full)
    vocab_size: int
    n_prompts: int
    warmup_final_loss: float | None  # None with no warm-up steps
    reward_rate_base: float  # mean exact_number reward at temperature 1, after the warm-up
    reward_rate_final: float  # the same after GRPO
    reward_rate_samples: int
    grpo: GrpoSettings
    seconds: dict[str, float]  # warmup, grpo, eval, total
    base: str
    checkpoints: list[str]
    params: DemoParams


__all__ = ["DemoReport", "GRPO_KEYS", "GrpoSettings"]
