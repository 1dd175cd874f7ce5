"""The sample-e and sample-u stages: draw the E and U batches from π_θ of the sampler checkpoint.

E batch: B_E prompts drawn with replacement, one response each (G = 1).
U batch: B_U distinct prompts, G responses each (the rows of a group contiguous), rewards and advantages.

Under torchrun rank 0 makes the index plan and broadcasts it; each process generates a contiguous share of
the generate batches, each seeded by its global batch index, and rank 0 lays the gathered batches out (global
P and R), scores them and writes one artifact — the same tensors as one process draws.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from entropy_probe import distributed, outputs, task
from entropy_probe.artifacts.samples import (
    STAGES,
    Samples,
    SamplesMeta,
    decode_responses,
    sample_counts,
    tokenizer_identity,
)
from entropy_probe.files import SCHEMA_VERSION
from entropy_probe.generation import (
    GenerationSpec,
    Plan,
    generate_share,
    make_plan,
    place_batches,
    resolve_scale,
    resolve_temperature,
    special_ids,
)

log = logging.getLogger(__name__)


def run_sample_e(params, out_dir: str | Path, dry_run: bool = False) -> str | None:
    """The sample-e stage: B_E prompts with replacement, one response each."""
    return _run(params, Path(out_dir), dry_run, "samples_e")


def run_sample_u(params, out_dir: str | Path, dry_run: bool = False) -> str | None:
    """The sample-u stage: B_U distinct prompts, G responses each, rewards and group advantages."""
    return _run(params, Path(out_dir), dry_run, "samples_u")


def sampler_checkpoint(params):
    """CheckpointParams of the checkpoint that draws the samples: `sampling.checkpoint`, else `checkpoint.path`.

    Samples record its fingerprint, so delta-h1 can probe other checkpoints with the same samples
    (importance-weighted) — which is why sampling reads the checkpoint itself and not verify's report.
    """
    path = params.sampling.checkpoint or params.checkpoint.path
    return params.checkpoint.model_copy(update={"path": path})


def _run(params, out_dir: Path, dry_run: bool, kind: str) -> str | None:
    stage, gen = STAGES[kind], params.generation
    prompt_set = task.load_prompts(params.batch_config)
    plan = distributed.on_rank0(lambda: make_plan(params, kind, len(prompt_set)))  # every rank uses rank 0's
    if dry_run:
        if distributed.is_rank0():
            print(_plan_line(stage, plan, prompt_set, gen, out_dir))
        return None

    from entropy_probe import checkpoint

    sampler = sampler_checkpoint(params)
    paths = checkpoint.resolve_paths(sampler)
    source = _source(params, kind, sampler, paths)
    model = checkpoint.load_policy_model(sampler, paths).eval()
    tokenizer = checkpoint.load_tokenizer(paths)
    spec = GenerationSpec(source.temperature, gen.top_p, gen.max_new_tokens, gen.gen_batch_size, plan.seed, gen.stop)
    prompts = [prompt_set.prompts[i] for i in plan.rows.tolist()]
    t_gen = time.perf_counter()
    gathered = distributed.gather_results_to_rank0(lambda: generate_share(model, tokenizer, prompts, spec, stage))
    gen_seconds = time.perf_counter() - t_gen

    def finish() -> str:  # rank 0: one layout with the global P and R, rewards, metadata, the write
        batches = [b for part in gathered for b in part]
        samples = _lay_out(params, plan, prompt_set, spec, source, tokenizer, batches)
        with outputs.staged_output_dir(out_dir) as tmp:
            samples.write(tmp)  # no timings in either file: same seed + inputs ⇒ byte-identical artifacts
        return _summary(stage, plan, samples.meta, gen_seconds, out_dir)

    return distributed.on_rank0(finish)


def _plan_line(stage: str, plan: Plan, prompt_set, gen, out_dir: Path) -> str:
    n_batches, world = math.ceil(len(plan.rows) / gen.gen_batch_size), distributed.world_size()
    return (
        f"{stage} plan: {plan.n_prompts} prompts {plan.replacement} from '{prompt_set.name}' "
        f"({len(prompt_set)} records), G={plan.G}, {len(plan.rows)} sequences "
        f"({int(plan.rows.unique().numel())} distinct prompts), {n_batches} generate batches of "
        f"<= {gen.gen_batch_size}, max_new_tokens={gen.max_new_tokens}, seed={plan.seed}, "
        f"{world} process{'es' if world > 1 else ''}, output {out_dir}"
    )


@dataclass(frozen=True)
class Source:
    """The sampler and the settings taken from its trainer, as recorded in the samples' metadata."""

    sampler: object  # CheckpointParams of the sampler
    fingerprint: str
    temperature: float
    temperature_source: str
    scale: bool | None  # advantages divided by the group std (U only)


def _source(params, kind: str, sampler, paths) -> Source:
    """The sampler's fingerprint; temperature and (U) advantage scaling from params, else from its trainer."""
    from entropy_probe import checkpoint
    from entropy_probe.trainer_config import read_trainer_config

    stage, gen = STAGES[kind], params.generation
    fingerprint = checkpoint.checkpoint_fingerprint(paths)
    trainer = read_trainer_config(paths, sampler.trust_pickles)
    temperature, t_source = resolve_temperature(gen.temperature, trainer.get("temperature"))
    log.info(
        "%s: sampler %s (%s); temperature %g from %s, top_p %g",
        stage,
        sampler.path,
        fingerprint,
        temperature,
        t_source,
        gen.top_p,
    )
    if trainer.get("top_p") not in (None, gen.top_p):
        log.warning("%s: generation.top_p=%g differs from the trainer's top_p=%s", stage, gen.top_p, trainer["top_p"])
    scale = None
    if kind == "samples_u":
        scale, s_source = resolve_scale(params.advantage.scale, trainer.get("scale_rewards"))
        log.info("%s: advantage scale=%s from %s, eps=%g", stage, scale, s_source, params.advantage.eps)
    return Source(sampler, fingerprint, temperature, t_source, scale)


def _rewards_and_advantages(params, scale: bool, plan: Plan, prompt_set, responses: list[str]) -> dict:
    """rewards r_i of the decoded responses, group advantages A_i (docs/math.md §4.1) and group_index."""
    from entropy_probe.update import group_advantages

    reward_fn = task.get_reward_fn(params.batch_config.reward_fn)
    answers = [prompt_set.answers[i] for i in plan.rows.tolist()]
    rewards = torch.tensor(task.score_responses(reward_fn, responses, answers), dtype=torch.float32)
    grouped = rewards.view(plan.n_prompts, plan.G)
    advantages = group_advantages(grouped, scale, params.advantage.eps).reshape(-1).float()
    group_index = torch.arange(plan.n_prompts).repeat_interleave(plan.G)
    return {"rewards": rewards, "advantages": advantages, "group_index": group_index}


def _lay_out(params, plan: Plan, prompt_set, spec: GenerationSpec, source: Source, tokenizer, batches) -> Samples:
    """The gathered generate batches in one layout (global P and R), with (U) rewards and advantages, and metadata."""
    placed = place_batches(batches, special_ids(tokenizer)[1])
    placed["prompt_index"] = plan.rows
    if source.scale is not None:
        responses = decode_responses(tokenizer, placed)
        placed.update(_rewards_and_advantages(params, source.scale, plan, prompt_set, responses))
    return Samples(**placed, meta=_meta(params, plan, prompt_set, spec, source, tokenizer_identity(tokenizer), placed))


def _meta(params, plan: Plan, prompt_set, spec, source: Source, tokenizer: dict, placed: dict) -> SamplesMeta:
    sampler, is_u = source.sampler, plan.kind == "samples_u"
    return SamplesMeta(
        schema_version=SCHEMA_VERSION,
        kind=plan.kind,
        checkpoint_fingerprint=source.fingerprint,
        checkpoint_path=sampler.path,
        load={"dtype": sampler.dtype, "use_qlora": sampler.use_qlora},
        tokenizer=tokenizer,
        generation={
            "temperature": spec.temperature,
            "temperature_source": source.temperature_source,
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
        reward_fn=params.batch_config.reward_fn if is_u else None,
        advantage={"scale": source.scale, "eps": params.advantage.eps} if is_u else None,
        world_size=distributed.world_size(),
        with_replacement=not is_u,
        **sample_counts(placed, plan.G),
    )


def _summary(stage: str, plan: Plan, meta: SamplesMeta, gen_seconds: float, out_dir: Path) -> str:
    mean_reward, frac_equal = meta.mean_reward, meta.frac_all_equal_groups
    return (
        f"{stage}: {plan.n_prompts} prompts {plan.replacement} ({meta.n_distinct_prompts} distinct), G={plan.G}, "
        f"{meta.n_sequences} sequences; mean reward {'n/a' if mean_reward is None else f'{mean_reward:.3f}'}, "
        f"all-equal groups {'n/a' if frac_equal is None else f'{100 * frac_equal:.1f}%'}, mean response length "
        f"{meta.mean_response_len:.2f}, truncated {100 * meta.frac_truncated:.1f}%; {gen_seconds:.1f}s generating "
        f"-> {out_dir}"
    )
