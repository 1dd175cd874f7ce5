"""The next update, resolved once: which rule turns U's gradient into Δθ, with what state and settings.

`UpdateRule` holds everything that decides Δθ (docs/math.md §4): the rule (adam_step | adam_precond | sgd,
or `observed`: the step the trainer took, given), the AdamW state as flat per-element vectors (lr included),
the loss aggregation and gradient clipping. `resolve_update_rule` is the one place that turns params and
the trainer's settings into it — the delta-h1 stage, the trajectory, `Probe` and the tests all call it, so
the lr choice, max_grad_norm and loss aggregation cannot drift between them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .artifacts.delta_h1 import ObservedRecord, StepsRecord, UpdateRecord
from .errors import ProbeError
from .loss_terms import LossTerms
from .multi_step import StepChain
from .sharded import local_tensor
from .update import (
    AdamState,
    leave_one_group_out,
    linearise,
    resolve_loss_agg_mode,
    update_direction,
    zero_gradient_dot,
    zero_gradient_part,
)

log = logging.getLogger(__name__)

HF_DEFAULT_MAX_GRAD_NORM = 1.0  # transformers.TrainingArguments.max_grad_norm
EMULATED_RULES = ("adam_step", "adam_precond", "sgd")
DEFAULT_CLIP_RATIO = 0.2  # TRL's GRPOConfig.epsilon, verl's clip_ratio
BATCH_TOKEN_LOSS_TYPES = ("dapo", "cispo")  # TRL normalises these by the whole generation batch's tokens


@dataclass(frozen=True)
class ObservedStep:
    """Δθ_obs = θ(next) − θ(this): a step the trainer took (flat float64, float32 over a long layout; layout
    order), and where from."""

    delta_theta: Tensor
    record: ObservedRecord


@dataclass(frozen=True)
class UpdateRule:
    """How Δθ is formed. Emulated rules: Δθ = rule(g) with `state` (θ, moments, per-element lr), clipping
    at `max_grad_norm` and g = ∇J under `loss_agg_mode`. Observed: Δθ is `observed.delta_theta`."""

    rule: str  # adam_step | adam_precond | sgd | observed
    state: AdamState
    loss_agg_mode: str | None = None
    loss_agg_reason: str | None = None
    max_len: int | None = None  # seq-mean-token-sum-norm's constant length (the trainer's max_completion_length)
    max_grad_norm: float | None = None
    max_grad_norm_source: str | None = None
    observed: ObservedStep | None = None
    chain: StepChain | None = None  # several AdamW steps on U (None: the one on-policy step)
    terms: LossTerms = LossTerms()  # an entropy bonus, a token mask (docs/math.md §12)

    def __post_init__(self) -> None:
        if self.chain is not None and not self.terms.plain:
            raise ProbeError(
                f"an entropy bonus or token mask ({self.terms.describe()}) is emulated for one step per U batch, "
                f"not {self.chain.steps}",
                "set update.mini_batches: 1 and update.epochs: 1, or update.entropy_coef: 0 and update.token_mask: none",
            )
        if (self.rule == "observed") != (self.observed is not None):
            raise ValueError("an observed step comes with rule 'observed', and only with it")
        if self.chain is not None and self.rule != "adam_step":
            raise ProbeError(
                f"update.mini_batches × update.epochs = {self.chain.steps} steps per U batch need update.rule "
                f"adam_step, not {self.rule}",
                "set update.rule: adam_step, or update.mini_batches: 1 and update.epochs: 1",
            )
        if self.rule not in (*EMULATED_RULES, "observed"):
            raise ProbeError(f"unknown update rule '{self.rule}'", f"use one of {', '.join(EMULATED_RULES)}, observed")

    @property
    def emulated(self) -> bool:
        """Whether Δθ comes from U's gradient (False: the step is given)."""
        return self.observed is None

    @property
    def learning_rate(self) -> float:
        """The mean over parameters of the lr in Δθ (for an observed step: the lr the trainer's optimizer held)."""
        return self.state.mean(self.state.lr)

    def delta_theta(self, g: Tensor) -> Tensor:
        """Δθ(g) for the emulated rules (float64; a long g's in `update.long_dtype`)."""
        return update_direction(self.rule, g, self.state, self.max_grad_norm)

    def momentum_part(self) -> Tensor:
        """Δθ(g = 0): the U-independent part (momentum and weight decay) of adam_step, 0 for the others."""
        return zero_gradient_part(self.rule, self.state, self.max_grad_norm)

    def momentum_dot(self, xbar: Tensor) -> float:
        """X̄·Δθ(g = 0): the momentum/decay part of δH₁, without forming Δθ(g = 0) for a long state."""
        return float(zero_gradient_dot(self.rule, xbar, self.state))

    def linearised(self, g: Tensor, xbar: Tensor, out: Tensor | None = None) -> Tensor:
        """u = (∂Δθ/∂g)ᵀ X̄ at g: X̄·Δθ(g + dg) ≈ X̄·Δθ(g) + u·dg (`out`: a long g's buffer to write u into)."""
        return linearise(self.rule, g, xbar, self.state, self.max_grad_norm, out)

    def leave_one_group_out(self, g: Tensor, g_groups: Tensor, denominators: Tensor, xbar: Tensor) -> Tensor:
        """[B] X̄·Δθ(g₋b) through this rule (clipping and Adam included)."""
        return leave_one_group_out(
            self.rule, g.double(), g_groups, denominators, xbar.double(), self.state, self.max_grad_norm
        )

    def record(self) -> UpdateRecord:
        """delta_h1.json's `update` entry."""
        if self.observed is not None:
            return UpdateRecord(rule="observed", observed=self.observed.record)
        return UpdateRecord(
            rule=self.rule,
            loss_agg_mode=self.loss_agg_mode,
            loss_agg_reason=self.loss_agg_reason,
            max_len=self.max_len,
            max_grad_norm=self.max_grad_norm,
            max_grad_norm_source=self.max_grad_norm_source,
            steps=None if self.chain is None else StepsRecord.of(self.chain),
            entropy_coef=self.terms.entropy_coef or None,
            kl_coef=self.terms.kl_coef or None,
            token_mask=None if self.terms.token_mask == "none" else self.terms.token_mask,
            token_mask_fraction=None if self.terms.token_mask == "none" else self.terms.mask_fraction,
        )

    def describe(self) -> str:
        """One phrase for plans and logs."""
        if self.observed is not None:
            return f"observed step to {self.observed.record.next_checkpoint}"
        steps = "" if self.chain is None else f", {self.chain.steps} steps"
        terms = "" if self.terms.plain else f", {self.terms.describe()}"
        return (
            f"{self.rule} ({self.loss_agg_mode}, clip {self.max_grad_norm}, lr {self.learning_rate:.3g}{steps}{terms})"
        )


def max_grad_norm_of(setting: float | str | None, trainer_max_grad_norm: float | None) -> tuple[float | None, str]:
    """(max_grad_norm, where it came from): `auto` takes the trainer's, else the HF Trainer default."""
    if setting != "auto":
        return setting, "update.max_grad_norm"
    if trainer_max_grad_norm is not None:
        return trainer_max_grad_norm, "the trainer's max_grad_norm"
    return HF_DEFAULT_MAX_GRAD_NORM, (
        f"default {HF_DEFAULT_MAX_GRAD_NORM} (the trainer's is not recorded: set update.max_grad_norm, write "
        "trainer_config.json beside the checkpoint, or set checkpoint.trust_pickles for a checkpoint you trust)"
    )


def resolve_update_rule(update, trainer_config: dict, state: AdamState, observed: ObservedStep | None = None):
    """The `UpdateRule` of params `update` (UpdateParams) for a checkpoint whose trainer settings are
    `trainer_config` (TrainerConfig fields; None = unknown) and whose AdamW state is `state` (lr chosen).

    rule observed needs `observed` (the step); the emulated rules take loss aggregation and clipping from
    params, `auto` from the trainer's settings.
    """
    if update.rule == "observed":
        if observed is None:
            raise ValueError("update.rule observed needs the observed step (Probe.observed_step)")
        return UpdateRule("observed", state, observed=observed)
    mode, max_len, why = resolve_loss_agg_mode(update.loss_agg_mode, trainer_config)
    max_grad_norm, clip_source = max_grad_norm_of(update.max_grad_norm, trainer_config.get("max_grad_norm"))
    log.info(
        "update: %s, loss aggregation %s (%s), clipping at %s from %s",
        update.rule,
        mode,
        why,
        max_grad_norm,
        clip_source,
    )
    chain = step_chain(update, trainer_config)
    kl_coef = update.kl_coef
    if kl_coef == "auto":
        kl_coef = trainer_config.get("beta") or 0.0
        if kl_coef:
            log.info("update: KL penalty β_KL %s from the trainer's beta", kl_coef)
    terms = LossTerms(update.entropy_coef, update.token_mask, update.token_mask_fraction, float(kl_coef))
    return UpdateRule(update.rule, state, mode, why, max_len, max_grad_norm, clip_source, chain=chain, terms=terms)


def step_chain(update, trainer_config: dict) -> StepChain | None:
    """The k-step chain of params `update` (mini_batches, epochs, clip_ratio; auto: the trainer's), None for one
    step. TRL's trainer takes steps_per_generation ÷ gradient_accumulation_steps steps per pass over a generation
    batch and num_iterations passes."""
    spg, accumulation = trainer_config.get("steps_per_generation"), trainer_config.get("gradient_accumulation_steps")
    sources = []
    mini_batches = update.mini_batches
    if mini_batches == "auto":
        known = spg is not None and accumulation is not None and spg % accumulation == 0
        mini_batches = spg // accumulation if known else 1
        sources.append(
            "mini_batches: the trainer's steps_per_generation ÷ gradient_accumulation_steps" if known else ""
        )
    epochs = update.epochs
    if epochs == "auto":
        epochs = trainer_config.get("num_iterations") or 1
        sources.append("epochs: the trainer's num_iterations" if trainer_config.get("num_iterations") else "")
    if mini_batches * epochs == 1:
        return None
    if update.clip_ratio == "auto":
        low = trainer_config.get("epsilon")
        low = DEFAULT_CLIP_RATIO if low is None else low
        high = trainer_config.get("epsilon_high")
        high = low if high is None else high
        sources.append("clip ratio: the trainer's epsilon" if trainer_config.get("epsilon") is not None else "")
    else:
        low, high = update.clip_ratio
    source = "; ".join(s for s in sources if s) or "params"
    normaliser = "batch" if trainer_config.get("loss_type") in BATCH_TOKEN_LOSS_TYPES else "mini_batch"
    return StepChain(mini_batches, epochs, float(low), float(high), source, normaliser)


def flat_state(optimizer, model, layout, lr: float | None) -> AdamState:
    """The AdamW state of `optimizer` (OptimizerState) for `layout`, θ from `model`; lr None keeps each
    group's stored next lr, a number replaces them all (checkpoint.learning_rate last | number)."""
    named = dict(model.named_parameters())
    with torch.no_grad():
        state = optimizer.flat(layout, {n: local_tensor(named[n].detach()) for n in optimizer.names}, lr)
    # FSDP parameters: `optimizer` and `layout` are this process's shards (`sharded.local_optimizer`, `local_layout`)
    return replace(state, sharded=any(hasattr(p, "to_local") for p in named.values()))


__all__ = [
    "EMULATED_RULES",
    "HF_DEFAULT_MAX_GRAD_NORM",
    "ObservedStep",
    "UpdateRule",
    "flat_state",
    "max_grad_norm_of",
    "resolve_update_rule",
]
