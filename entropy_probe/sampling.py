"""E and U sample sets as `Samples` artifacts: generate batches laid out, rewards, advantages, metadata.

E batch: B_E prompts drawn with replacement, one response each (G = 1).
U batch: B_U distinct prompts, G responses each (a group's rows contiguous), rewards and group advantages.
The sample stages (under torchrun: gathered from every process) and `Probe.sample_e/u` build the same
artifact through `lay_out`, so the same seed gives the same tensors either way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from . import distributed, task
from .artifacts.samples import STAGES, Samples, SamplesMeta, decode_responses, sample_counts, tokenizer_identity
from .files import SCHEMA_VERSION
from .generation import (
    GenerationSpec,
    Plan,
    generate_share,
    place_batches,
    resolve_scale,
    resolve_temperature,
    special_ids,
)
from .trainer_checks import check_against_trainer, resolve_sampling_knobs
from .update import group_advantages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplerInfo:
    """Who draws and with which settings, as the samples' metadata records it."""

    checkpoint_path: str
    fingerprint: str
    load: dict  # {"dtype", "use_qlora"}: how the sampler was loaded (another load is another policy)
    temperature: float
    temperature_source: str
    scale: bool | None  # advantages divided by the group std (U only)


def sampler_info(params, trainer, fingerprint: str, kind: str, checkpoint_path: str, load=None) -> SamplerInfo:
    """The sampler of `kind` (samples_e | samples_u) as its samples record it: temperature and (U) advantage
    scaling from params, `auto` from the trainer's settings (`TrainerSettings`), and how it was loaded (`load`,
    default params `checkpoint`). The probe's sampling settings are checked against the trainer's first."""
    gen, cfg = params.generation, trainer.config
    temperature, t_source = resolve_temperature(gen.temperature, cfg.temperature)
    log.info(
        "%s: sampler %s (%s); temperature %g from %s, top_p %g",
        STAGES[kind],
        checkpoint_path,
        fingerprint,
        temperature,
        t_source,
        gen.top_p,
    )
    # the probe's settings against the trainer's (G, max_new_tokens, top_p: warnings naming both values) and
    # truncated sampling (top_k, min_p, repetition penalty), refused: the estimators need samples from π_θ at T
    check_against_trainer(params, cfg, scoring_observed_steps=False, groups=kind == "samples_u")
    resolve_sampling_knobs(gen, cfg)
    scale = None
    if kind == "samples_u":
        scale, s_source = resolve_scale(params.advantage.scale, cfg.scale_rewards)
        log.info("%s: advantage scale=%s from %s, eps=%g", STAGES[kind], scale, s_source, params.advantage.eps)
    if load is None:
        load = {"dtype": params.checkpoint.dtype, "use_qlora": params.checkpoint.use_qlora}
    return SamplerInfo(checkpoint_path, fingerprint, load, temperature, t_source, scale)


def rewards_and_advantages(
    batch_config, advantage, scale: bool, plan: Plan, prompt_set, responses, reward=None, completion_ids=None
) -> dict:
    """rewards r_i of the decoded responses, group advantages A_i (docs/math.md §4.1) and group_index.
    reward: a `task.BatchReward` used instead of batch_config.reward_fn (e.g. the trainer's own)."""
    answers = [prompt_set.answers[i] for i in plan.rows.tolist()]
    prompts = [prompt_set.prompts[i] for i in plan.rows.tolist()]
    if reward is None:
        values = task.score_responses(task.get_reward_fn(batch_config.reward_fn), responses, answers, prompts)
    else:
        values = task.score_batch(reward, prompts, responses, answers, completion_ids)
    rewards = torch.tensor(values, dtype=torch.float32)
    grouped = rewards.view(plan.n_prompts, plan.G)
    advantages = group_advantages(grouped, scale, advantage.eps).reshape(-1).float()
    group_index = torch.arange(plan.n_prompts).repeat_interleave(plan.G)
    return {"rewards": rewards, "advantages": advantages, "group_index": group_index}


def lay_out(
    params, plan: Plan, prompt_set, spec: GenerationSpec, info: SamplerInfo, tokenizer, batches, reward=None
) -> Samples:
    """Generate batches (all of them, in batch order) in one layout (global P and R), with (U) rewards and
    advantages, and metadata. `params`: Params (batch_config, advantage); reward: see `rewards_and_advantages`."""
    placed = place_batches(batches, special_ids(tokenizer)[1])
    placed["prompt_index"] = plan.rows
    if info.scale is not None:
        responses = decode_responses(tokenizer, placed)
        ids = response_token_ids(placed)
        placed.update(
            rewards_and_advantages(
                params.batch_config, params.advantage, info.scale, plan, prompt_set, responses, reward, ids
            )
        )
    meta = samples_meta(params, plan, prompt_set, spec, info, tokenizer_identity(tokenizer), placed, reward)
    return Samples(**placed, meta=meta)


def response_token_ids(placed: dict) -> list[list[int]]:
    """Every row's response token ids (the response columns up to its length)."""
    n_resp = placed["logprobs"].shape[1]
    responses = placed["input_ids"][:, placed["input_ids"].shape[1] - n_resp :]
    return [row[:length].tolist() for row, length in zip(responses, placed["response_lens"].tolist())]


def samples_meta(
    params, plan: Plan, prompt_set, spec, info: SamplerInfo, tokenizer: dict, placed: dict, reward=None
) -> SamplesMeta:
    is_u = plan.kind == "samples_u"
    reward_name = None  # U only (E has no rewards, and sample-e does not depend on batch_config.reward_fn)
    if is_u:
        reward_name = params.batch_config.reward_fn if reward is None else getattr(reward, "name", "custom reward")
    return SamplesMeta(
        schema_version=SCHEMA_VERSION,
        kind=plan.kind,
        checkpoint_fingerprint=info.fingerprint,
        checkpoint_path=info.checkpoint_path,
        load=info.load,
        tokenizer=tokenizer,
        generation={
            "temperature": spec.temperature,
            "temperature_source": info.temperature_source,
            "top_p": spec.top_p,
            "max_new_tokens": spec.max_new_tokens,
            "stop": spec.stop,
        },
        seed=plan.seed,
        dataset={
            "name": prompt_set.name,
            "split": prompt_set.split,
            "fingerprint": prompt_set.fingerprint,
            "size": len(prompt_set),
        },
        reward_fn=reward_name,
        advantage={"scale": info.scale, "eps": params.advantage.eps} if is_u else None,
        world_size=distributed.world_size(),
        with_replacement=not is_u,
        **sample_counts(placed, plan.G),
    )


def generation_spec(generation, info: SamplerInfo, seed: int) -> GenerationSpec:
    """The generate settings of params `generation` with the sampler's temperature."""
    g = generation
    return GenerationSpec(info.temperature, g.top_p, g.max_new_tokens, g.gen_batch_size, seed, g.stop)


def draw(
    params, model, tokenizer, plan: Plan, prompt_set, info: SamplerInfo, stage: str = "sample", reward=None
) -> Samples:
    """Generate `plan` (under torchrun each process its share, seeded by global batch index) and lay it out
    on rank 0; every process returns the same Samples. `params`: Params (generation, batch_config, advantage);
    reward: a `task.BatchReward` instead of batch_config.reward_fn."""
    spec = generation_spec(params.generation, info, plan.seed)
    prompts = [prompt_set.prompts[i] for i in plan.rows.tolist()]
    gathered = distributed.gather_results_to_rank0(lambda: generate_share(model, tokenizer, prompts, spec, stage))

    def laid_out() -> Samples:
        return lay_out(params, plan, prompt_set, spec, info, tokenizer, [b for part in gathered for b in part], reward)

    return distributed.on_rank0(laid_out)


__all__ = [
    "SamplerInfo",
    "draw",
    "sampler_info",
    "generation_spec",
    "lay_out",
    "rewards_and_advantages",
    "samples_meta",
]
