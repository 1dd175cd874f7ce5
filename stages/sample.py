"""The sample-e and sample-u stages: draw the E and U batches from π_θ of the sampler checkpoint.

E batch: B_E prompts drawn with replacement, one response each (G = 1).
U batch: B_U distinct prompts, G responses each (the rows of a group contiguous), rewards and advantages.

Under torchrun rank 0 makes the index plan and broadcasts it; each process generates a contiguous share of
the generate batches, each seeded by its global batch index, and rank 0 lays the gathered batches out (global
P and R), scores them and writes one artifact — the same tensors as one process draws (`sampling.draw`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from entropy_probe import distributed, outputs, task
from entropy_probe.artifacts.samples import STAGES, SamplesMeta
from entropy_probe.generation import Plan, make_plan


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
    stage = STAGES[kind]
    prompt_set = task.load_prompts(params.batch_config)
    plan = distributed.on_rank0(lambda: make_plan(params, kind, len(prompt_set)))  # every rank uses rank 0's
    if dry_run:
        return _plan_line(stage, plan, prompt_set, params.generation, out_dir)

    from entropy_probe.sampling import draw, sampler_info
    from entropy_probe.sources import source_for

    sampler = sampler_checkpoint(params)  # it need not be verified: no optimizer state is read
    source = source_for(sampler)
    paths = source.resolve(sampler)
    model = source.load_model(sampler, paths)
    trainer = source.trainer_settings(paths, sampler.trust_pickles)
    settings = params.model_copy(update={"checkpoint": sampler})
    info = sampler_info(settings, trainer, source.fingerprint(paths), kind, sampler.path)
    t_gen = time.perf_counter()
    samples = draw(params, model, source.load_tokenizer(paths), plan, prompt_set, info, stage)
    gen_seconds = time.perf_counter() - t_gen

    def write() -> str:  # no timings in either file: same seed + inputs ⇒ byte-identical artifacts
        with outputs.staged_output_dir(out_dir) as tmp:
            samples.write(tmp)
        return _summary(stage, plan, samples.meta, gen_seconds, out_dir)

    return distributed.on_rank0(write)


def _plan_line(stage: str, plan: Plan, prompt_set, gen, out_dir: Path) -> str:
    n_batches, world = math.ceil(len(plan.rows) / gen.gen_batch_size), distributed.world_size()
    return (
        f"{stage} plan: {plan.n_prompts} prompts {plan.replacement} from '{prompt_set.name}' "
        f"({len(prompt_set)} records), G={plan.G}, {len(plan.rows)} sequences "
        f"({int(plan.rows.unique().numel())} distinct prompts), {n_batches} generate batches of "
        f"<= {gen.gen_batch_size}, max_new_tokens={gen.max_new_tokens}, seed={plan.seed}, "
        f"{world} process{'es' if world > 1 else ''}, output {out_dir}"
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
