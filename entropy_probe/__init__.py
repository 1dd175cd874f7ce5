"""entropy-probe: predict the first-order entropy change δH₁ = ∇H · Δθ of the next RL update.

    from entropy_probe import Probe, load_params
    probe = Probe.from_checkpoint("data/demo/run/checkpoint-6", params=load_params("params.yaml"))
    result = probe.delta_h1(probe.sample_e(), probe.sample_u())      # δH₁ ± SE, δH₂, attributions

The library: one module per concept. The pipeline stages that call it are in `stages/` (one thin module
per stage); docs/design.md has the data flow, docs/math.md every formula (§n below is its section).

The in-memory API
  probe            `Probe`: one loaded checkpoint (from files, verify's artifacts, or live objects) and every
                   computation on it — sample E/U, δH₁ (`DeltaH1Result`), the observed step, δH₂, exact, truth
  sources          checkpoint sources: one layout → policy, named AdamW state, trainer settings, fingerprint,
                   observed step (`peft_adapter`: PEFT adapter + the Trainer's optimizer.pt; `full_model`: the
                   Trainer's full fine-tuning; `deepspeed_zero`: ZeRO-1/2/3 partitions of the HF Trainer;
                   `verl_fsdp`: verl's FSDP2 actor shards)
  update_rule      `UpdateRule`: the next update resolved once (rule, AdamW state with the chosen lr, loss
                   aggregation, clipping, or an observed step) and `resolve_update_rule`
  specs            knobs that travel together: `ComputeBudget`, `SecondOrderSpec`, `EnumerationSpec`
  integrations.trl `EntropyProbeCallback`: the probe inside a running transformers/TRL Trainer every k steps

Inputs: knobs, checkpoints, the task
  params           typed, validated knobs: params.yaml + `-S key=value` overrides, every default
  checkpoint       a checkpoint's files (Trainer, adapter or full-model layout), format, fingerprint, model + tokenizer
                   loading (eager attention: the all_targets tangents need a double backward)
  optimizer_state  optimizer.pt mapped to named trainable parameters (AdamW only), its flat form for the
                   update rules (`OptimizerState.flat`); lr of the next step (§4.4)
  trainer_config   the trainer's settings (loss_type §4.2, scale_rewards §4.1, max_grad_norm §4.3,
                   temperature, batch and sampling settings) and its last step and lr, from trainer_config.json /
                   training_args.bin
  trainer_checks   the trainer's prompts per step; the probe's settings checked against the trainer's (§11)
  checks           the verify stage's checks of a loaded checkpoint (passed, warnings)
  task             prompt sets (built-in arithmetic task, local files, hub datasets) and the reward registry
  tiny             the tiny character tokenizer and tiny Qwen2 of the demo and the tests
  demo             builds the demo: SFT warm-up, then TRL GRPO with LoRA + AdamW, Trainer-layout checkpoints

The policy and sampling
  policy           π = top-p(softmax(z/T)) (§2.1), H_k, top1, margin (§2.2), teacher forcing (§2.3)
  generation       drawing from exactly π with `generate`, recording ℓ_k, H_k, top1, margin per step;
                   seeds (derive_seed), E/U index plans (§2.3); temperature and advantage scale from the trainer
  sampling         the E and U `Samples` artifacts: batches laid out, rewards, advantages, metadata
  scoring          `Batch`: a sample artifact on the device and the one teacher-forcing loop in token-budget
                   microbatches; re-scoring λ_i (§5.4) and per-sequence sums ℓ_i, S_i, L_i (§8.1)

The math
  estimators       RB entropy-gradient coefficients a, c for three targets (§3.1, §3.3–§3.6), baselines
                   (§3.2), influence values ψ and SE_E (§3.8); pure tensor math
  update           advantages (§4.1), policy-gradient coefficients (§4.2), clipping (§4.3), adam_step /
                   adam_precond / sgd (§4.4–§4.5), gradient/momentum split (§4.6), linearisation u (§4.7),
                   the realised half-precision step (§4.9), one AdamW step with its state, PPO's clipped ratio,
                   SE_U: jackknife over U groups through the update rule, or the delta method (§5.2);
                   pure functions on flat vectors
  multi_step       several AdamW steps on one U batch: mini-batches × epochs with the clipped ratio (§4.10)
  tangents         gradient + per-token directional derivatives by double backward (§6.1); per-row
                   directional derivatives and per-group gradients of Linear/LoRA, embedding and RMSNorm tensors by hooks,
                   `RowDirectional`, `GroupGradients` (§6.2)
  passes           the U and E passes over the data (policy gradient, group gradients, X̄ with row hooks,
                   tangents, U row terms) and Cui et al.'s covariance diagnostic (§5.5)
  delta_h1         `compute_delta_h1`: the passes in order → δH₁, SE_E, SE_U, total SE, attributions (§5.1–§5.3),
                   as a typed `DeltaH1Estimate`
  second_order     δH₂ = ½ Δθᵀ∇²HΔθ ± SE by a finite difference of the reweighted directional derivative, η* of
                   the linear regime (§5.6); per-row δH₁, δH₂ influence values along any Δθ (`taylor_rows`)
  forecast         the trainer's next ΔH: δH₁ + δH₂ along simulated steps of the trainer's batch size through the
                   real update rule, its SE and the trainer's own spread (§11.2)
  observed_entropy a sampled ΔH between two parameter vectors: fresh responses with common random numbers + SNIS,
                   combined, with an SE (§11.3)
  observed         the step a trainer took: the next checkpoint-N and Δθ_obs = θ(next) − θ(this) (§4.8)
  importance       importance weights ŵ, w, ESS (§3.7); self-normalised ratio R, its ψ and paired SE (§8.1);
                   `reuse_weights` for samples another checkpoint drew (§5.4)
  enumeration      exact A, D, M and the three targets by enumerating every continuation (§7.1); exact ∇H
                   and δH₁ (§7.2); FD slope and ΔH(η) (§7.3)
  exact            the exact stage's report: exact values over E's prompts and the prompt population beside
                   delta-h1's estimate (§7.4); the population shared with the trajectory
  perturb          θ + s·Δθ in place with a bit-exact restore and checksum (§7.3, §8); float64 model (§7.2)
  ground_truth     ΔH(η) by SNIS over E (§8.1) and by fresh samples with common random numbers (§8.2);
                   prediction, ratios and the quadratic fit (§8.3); the truth stage's report

I/O
  files            atomic writes, strict JSON, schema-checked safetensors (kind, schema_version)
  outputs          output dirs: manifest, staging + swap, lock, leftovers (docs/design.md, "Output safety")
  artifacts/       typed contracts, one per artifact file (see `entropy_probe.artifacts`)

Runtime
  distributed      torchrun process group, rank helpers, collectives (no-ops in one process)
  sharded          compute.shard fsdp: the policy FSDP2-sharded, AdamW state and flat vectors as shards
  errors           `ProbeError(problem, fix)`: the one-line user error

Reporting
  reporting        the report's row per checkpoint, z, δH₁(η) band and ratio (§9); markdown, plot CSVs, PNGs;
                   the trajectory's table and figures
  trajectory       the probe scored against a run's own steps: per checkpoint pair ΔH_obs (exact or sampled),
                   δH₁/δH₂ along the real step, the forecast and its z, emulation cosines, the trainer's log (§11)
  calibration      z-scores of prediction vs observation, their summary, explained fractions (§11); pure
"""

_LAZY = {"Probe": "probe", "DeltaH1Result": "probe", "Params": "params", "load_params": "params"}


def __getattr__(name: str):
    """`from entropy_probe import Probe` without importing torch for `entropy_probe.errors` (the CLI's --help)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'entropy_probe' has no attribute '{name}'")


__all__ = ["DeltaH1Result", "Params", "Probe", "load_params"]
