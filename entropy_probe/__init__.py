"""entropy-probe: predict the first-order entropy change of the next RL update.

One module per concept:
  params      typed, validated knobs (params.yaml + -S overrides)
  artifacts   atomic safetensors/JSON writing, schema-checked loading, safe output dirs
  task        the embedded synthetic arithmetic task, prompt datasets and reward registry
  demo        builds the embedded demo (tokenizer, tiny Qwen2, warm-up, GRPO run with LoRA)
  checkpoint  loads base + adapter (LoRA/QLoRA) and maps AdamW state to named parameters
  verify      the load-and-verify stage
  policy      the tempered / top-p policy, teacher forcing (log-probs, RB entropies)
  sampling    sample-e / sample-u stages
  estimators  Rao-Blackwellised entropy-gradient estimators and baselines (pure tensor math)
  update      policy-gradient aggregation and update rules (adam_step, adam_precond, sgd)
  delta_h1    the delta-h1 stage
  exact       exact enumeration for tiny models
  cli         the typer app
"""
