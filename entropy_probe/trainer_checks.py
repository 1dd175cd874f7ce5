"""The probe's settings checked against the trainer's (TRL GRPOConfig names, `TrainerConfig`; None = unknown).

Pure functions; unknown trainer values are skipped silently.

- `trainer_prompts_per_step`: the prompt groups one optimizer step of the trainer uses.
- `resolve_sampling_knobs`: top_k / min_p / repetition_penalty, which the probe does not apply (it samples and
  scores π_θ at temperature T with top_p only), resolved and refused unless off.
- `check_against_trainer`: probe settings that differ from the trainer's. A difference that changes what the
  observed entropy change ΔH_obs = H(θ(k+1)) − H(θ(k)) measures, relative to what the probe predicts, is a
  ProbeError when the probe is scored against the trainer's own steps; every other difference is a warning.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from .errors import ProbeError
from .trainer_config import TrainerConfig

log = logging.getLogger(__name__)

# the value of each sampling knob that leaves π_θ (temperature T, top_p) unchanged
NEUTRAL_SAMPLING = {"top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
_EFFECT = {
    "top_k": "keeps only the top_k most likely tokens",
    "min_p": "drops the tokens less likely than min_p × the most likely one",
    "repetition_penalty": "reweights the tokens already in the prompt or response",
}


# ----------------------------------------------------------------------------------------------- batch


def trainer_processes(config: TrainerConfig) -> int | None:
    """The trainer's number of processes, from what TRL's GRPOConfig.__post_init__ stored:

        processes = generation_batch_size ÷ (per_device_train_batch_size × steps_per_generation)

    (it sets generation_batch_size = per_device_train_batch_size × world_size × steps_per_generation).
    None when one of them is unknown; a ProbeError when they do not divide.
    """
    per_device, spg, gen_batch = (
        config.per_device_train_batch_size,
        config.steps_per_generation,
        config.generation_batch_size,
    )
    if None in (per_device, spg, gen_batch):
        return None
    if gen_batch % (per_device * spg):
        raise ProbeError(
            f"the trainer's generation_batch_size={gen_batch} is not a multiple of per_device_train_batch_size="
            f"{per_device} × steps_per_generation={spg} (TRL sets it to their product × the number of processes)",
            "fix the batch settings in trainer_config.json, or delete the inconsistent one",
        )
    return gen_batch // (per_device * spg)


def trainer_prompts_per_step(config: TrainerConfig) -> int | None:
    """The prompts (groups of num_generations completions) in one optimizer step of the trainer:

        prompts = per_device_train_batch_size × gradient_accumulation_steps × processes ÷ num_generations

    per_device_train_batch_size counts completions, not prompts, in TRL. For one process (processes = 1) this is
    per_device_train_batch_size × gradient_accumulation_steps ÷ num_generations; a multi-process run multiplies
    it by the number of processes, which the saved args record only through generation_batch_size (see
    `trainer_processes`); when that is unknown one process is assumed.
    With num_iterations = μ > 1 a group can take μ of these places (`check_against_trainer` warns).

    None when per_device_train_batch_size, gradient_accumulation_steps or num_generations is unknown; a
    ProbeError when the step's completions are not whole groups.
    """
    per_device, accumulation, G = (
        config.per_device_train_batch_size,
        config.gradient_accumulation_steps,
        config.num_generations,
    )
    if None in (per_device, accumulation, G):
        return None
    processes = trainer_processes(config) or 1
    completions = per_device * accumulation * processes
    if completions % G:
        raise ProbeError(
            f"the trainer's optimizer step uses per_device_train_batch_size={per_device} × "
            f"gradient_accumulation_steps={accumulation}"
            + (f" × {processes} processes" if processes > 1 else "")
            + f" = {completions} completions, not a whole number of groups of num_generations={G} (a step takes "
            "part of each group)",
            "train with per_device_train_batch_size × gradient_accumulation_steps a multiple of num_generations",
        )
    return completions // G


# ----------------------------------------------------------------------------------------------- sampling


def _is_neutral(knob: str, value: float) -> bool:
    return math.isclose(value, NEUTRAL_SAMPLING[knob], rel_tol=0, abs_tol=1e-12)


def resolve_sampling_knobs(gen: Any, config: TrainerConfig) -> dict:
    """top_k, min_p, repetition_penalty (each with `<knob>_source`): params generation.<knob>, or with `auto`
    the trainer's value, else off (top_k 0, min_p 0.0, repetition_penalty 1.0).

    The probe's estimators need samples from π_θ at temperature T (top_p only): a resolved value other than
    off is a ProbeError naming it and where it came from. An explicit off value where the trainer sampled with
    another one probes the untruncated policy knowingly: a warning naming both values (logged).

    `gen` is a `GenerationParams`. Returns e.g. {"top_k": 0, "top_k_source": "the trainer's top_k", ...}.
    """
    out: dict[str, Any] = {}
    for knob, off in NEUTRAL_SAMPLING.items():
        setting, recorded = getattr(gen, knob), getattr(config, knob)
        if setting != "auto":
            value, source = setting, f"params generation.{knob}"
        elif recorded is not None:
            value, source = recorded, f"the trainer's {knob}"
        else:
            value, source = off, f"off ({off}; the trainer's {knob} is not recorded)"
        if not _is_neutral(knob, value):
            fix = (
                f"train and probe without it, or set generation.{knob}: {off} to probe the untruncated policy knowingly"
                if setting == "auto"
                else f"set generation.{knob}: auto or {off}"
            )
            raise ProbeError(
                f"{source} = {value!r} {_EFFECT[knob]}, but the probe's estimators need samples from π_θ at "
                f"temperature T (with top_p only)",
                fix,
            )
        if setting != "auto" and recorded is not None and not _is_neutral(knob, recorded):
            log.warning(
                "params generation.%s = %r probes the untruncated policy, but the trainer sampled with %s = %r: "
                "the probe's step is not the trainer's — train without it, or accept the difference",
                knob,
                setting,
                knob,
                recorded,
            )
        out[knob], out[f"{knob}_source"] = value, source
    return out


# ----------------------------------------------------------------------------------------------- cross-check


def _differs(a: float, b: float) -> bool:
    return not math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)


def _reuse_warning(config: TrainerConfig) -> str | None:
    """Why the trainer's step k→k+1 is not the on-policy step the probe emulates (None: it is, or unknown).

    TRL draws completions once every steps_per_generation × num_iterations micro-batches and steps once every
    gradient_accumulation_steps; unless the latter is a multiple of the former, a step (partly) uses
    completions drawn at an earlier θ (grpo_trainer.py then computes old_per_token_logps for the ratio).
    """
    accumulation, spg, mu = config.gradient_accumulation_steps, config.steps_per_generation, config.num_iterations
    if accumulation is not None and spg is not None:
        every = spg * (mu or 1)
        if accumulation % every:
            return (
                f"the trainer draws completions once every steps_per_generation={spg} × num_iterations={mu or 1} = "
                f"{every} micro-batches but steps every gradient_accumulation_steps={accumulation}: its step "
                "k→k+1 reuses completions drawn at an earlier θ, so it is not the on-policy step the probe "
                "emulates — train with steps_per_generation dividing gradient_accumulation_steps and num_iterations=1"
            )
    if mu is not None and mu > 1:
        if accumulation is None or spg is None:
            return (
                f"the trainer's num_iterations={mu} uses each completion {mu} times, possibly in later steps at an "
                "earlier θ: its step k→k+1 is not the on-policy step the probe emulates — train with num_iterations=1"
            )
        try:
            prompts = trainer_prompts_per_step(config)
        except ProbeError:
            prompts = None
        distinct = "" if prompts is None else f" ({prompts // mu} distinct prompts, not {prompts})"
        count = "its distinct prompts" if prompts is None else prompts // mu
        return (
            f"the trainer's num_iterations={mu} passes {mu} times over each generation batch within one step (at "
            f"the same θ): each group enters the step's gradient {mu} times, so the step has 1/{mu} of its "
            f"prompts distinct{distinct} — train with num_iterations=1, or set trajectory.trainer_B_U: {count}"
        )
    return None


def check_against_trainer(
    params: Any, config: TrainerConfig, *, scoring_observed_steps: bool, groups: bool = True
) -> list[str]:
    """Warnings (also logged) for probe settings that differ from the trainer's; each names both values and
    the params key to change. `params` is a `Params`.

    Estimand mismatches — generation.max_new_tokens ≠ max_completion_length, an explicit generation.temperature
    ≠ temperature, generation.top_p ≠ top_p — make the probe predict the entropy change of another sampling
    policy than the one whose change ΔH_obs the trainer's step shows: a ProbeError (all of them, one line) when
    `scoring_observed_steps`, else warnings. Always warnings: batch_config.G ≠ num_generations (other groups and
    advantages), and completions reused across θ (steps_per_generation ∤ gradient_accumulation_steps or
    num_iterations > 1). `groups`: compare G (False for E batches, which have no groups). Unknown (None) trainer
    values are skipped.
    """
    gen = params.generation
    estimand: list[str] = []
    warnings: list[str] = []

    G = params.batch_config.G if groups else None
    if G is not None and config.num_generations is not None and G != config.num_generations:
        warnings.append(
            f"batch_config.G={G} differs from the trainer's num_generations={config.num_generations}: the probe's "
            f"groups and advantages are not the trainer's — set batch_config.G: {config.num_generations}"
        )
    if config.max_completion_length is not None and gen.max_new_tokens != config.max_completion_length:
        estimand.append(
            f"generation.max_new_tokens={gen.max_new_tokens} differs from the trainer's max_completion_length="
            f"{config.max_completion_length}: the probe's responses are cut at another length than the trainer's "
            f"— set generation.max_new_tokens: {config.max_completion_length}"
        )
    if gen.temperature != "auto" and config.temperature is not None and _differs(gen.temperature, config.temperature):
        estimand.append(
            f"generation.temperature={gen.temperature:g} differs from the trainer's temperature="
            f"{config.temperature:g}: the probe samples and scores another policy than the trainer's — set "
            f"generation.temperature: auto (or {config.temperature:g})"
        )
    if config.top_p is not None and _differs(gen.top_p, config.top_p):
        estimand.append(
            f"generation.top_p={gen.top_p:g} differs from the trainer's top_p={config.top_p:g}: the probe samples "
            f"and scores another policy than the trainer's — set generation.top_p: {config.top_p:g}"
        )
    reuse = _reuse_warning(config)
    if reuse is not None:
        warnings.append(reuse)

    if not scoring_observed_steps:
        warnings += estimand
        estimand = []
    for message in warnings:
        log.warning("%s", message)
    if estimand:
        raise ProbeError(
            "; ".join(estimand),
            "scoring against the trainer's own steps needs the trainer's sampling policy (ΔH_obs is its entropy "
            "change)",
        )
    return warnings
