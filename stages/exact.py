"""The `exact` stage: exact H, ∇H · Δθ, the FD slope and ΔH(η) for the E prompts (docs/math.md §7), by
`Probe.exact`.

Reads the E samples (prompts and generation settings), delta-h1's report and Δθ, and verify's artifacts;
loads the checkpoint, refused unless it is the one verify described and delta-h1 probed; enumerates on a
float64 copy of the policy; writes exact.json (`ExactReport`). Also enumerates the whole prompt population E
was drawn from (every dataset record, each 1/n), the reference of the calibrated z-score (§7.4), when it
fits in exact.max_sequences.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from entropy_probe import task
from entropy_probe.artifacts.exact import ExactReport
from entropy_probe.artifacts.samples import Samples
from entropy_probe.artifacts.verify import VerifyReport
from entropy_probe.enumeration import e_batch_prompts
from entropy_probe.errors import ProbeError
from entropy_probe.exact import check_population, sequence_bound
from entropy_probe.outputs import staged_output_dir
from entropy_probe.params import Params

log = logging.getLogger(__name__)


def run(params: Params, out_dir: str | Path, dry_run: bool = False) -> str | None:
    """Exact H, ∇H, δH₁, FD slope and ΔH(η) for the E prompts; writes `out_dir/exact.json`."""
    t0 = time.perf_counter()
    samples = Samples.read(params.paths.sample_e, "samples_e")
    if samples.meta.generation.stop:
        raise ProbeError("exact enumeration does not model generation.stop strings", "set generation.stop: null")
    if dry_run:
        return _plan(params, samples, out_dir)
    from entropy_probe.probe import DeltaH1Result, Probe

    estimate = DeltaH1Result.read(params.paths.delta_h1)
    estimate.report.check_checkpoint(
        VerifyReport.read(params.paths.verify).fingerprint,
        f"{params.paths.verify} describes",
        "point paths.delta_h1 and paths.verify at the same checkpoint's outputs (dvc repro)",
    )
    result = Probe.policy(params).exact(samples, estimate)  # refuses a checkpoint.path delta-h1 did not probe
    with staged_output_dir(out_dir) as tmp:
        result.write(tmp)
    for t, r in result.targets.items():
        log.info(
            "%s: H=%.5f  δH₁ exact %.4e (population %s)  estimate %s  z_population %s (given E's prompts %s)  "
            "FD rel err %.1e",
            t,
            r.entropy_exact,
            r.delta_h1_exact,
            _fmt(r.delta_h1_exact_population, ".4e"),
            _fmt(r.delta_h1, ".4e"),
            _fmt(r.z_population, "+.2f"),
            _fmt(r.z, "+.2f"),
            r.rel_err_fd,
        )
    log.info("exact: done in %.1f s", time.perf_counter() - t0)
    main = result.targets[result.configured_target]
    return (
        f"exact: {main.delta_h1_exact:.4e} exact δH₁ ({result.configured_target}), z_population "
        f"{_fmt(main.z_population, '+.2f')} (given E's prompts {_fmt(main.z, '+.2f')}), FD rel err "
        f"{main.rel_err_fd:.1e}, {result.n_sequences} sequences -> {Path(out_dir) / ExactReport.FILE}"
    )


def _base_config(params: Params):
    """The base model's config (vocabulary, eos), read without loading any weights."""
    from transformers import AutoConfig

    from entropy_probe.sources import source_for

    return AutoConfig.from_pretrained(source_for(params.checkpoint).resolve(params.checkpoint).base_model)


def _plan(params: Params, samples: Samples, out_dir) -> str:
    """Sequence counts from the samples and the base model's config alone (no weights loaded)."""
    gen, ep = samples.meta.generation, params.exact
    vocab = _base_config(params).vocab_size
    prompts, mult = e_batch_prompts(samples.input_ids, samples.prompt_lens, samples.n_prompt_cols)
    prompt_set = task.load_prompts(params.batch_config)
    check_population(prompt_set, samples)
    n_eos = 1  # responses end on the tokenizer's eos alone, as sampling stopped them
    bound = sequence_bound(len(prompts), vocab, n_eos, gen.max_new_tokens)
    pop_bound = sequence_bound(len(prompt_set), vocab, n_eos, gen.max_new_tokens)
    exactly = "exactly" if gen.top_p >= 1.0 else "at most (top_p < 1 prunes the tree)"
    return (
        f"exact plan: {len(prompts)} distinct prompts ({sum(mult)} E rows), {exactly} {bound} sequences to enumerate "
        f"(vocab {vocab}, max_new_tokens={gen.max_new_tokens} from the E samples); the whole population: "
        f"{len(prompt_set)} prompts, {exactly} {pop_bound} sequences"
        f"{' (over the limit: skipped)' if pop_bound > ep.max_sequences else ''}; limit "
        f"exact.max_sequences={ep.max_sequences}; writes {Path(out_dir) / ExactReport.FILE}"
    )


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)
