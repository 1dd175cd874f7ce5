"""Complete, contract-valid stage artifacts for tests that hand-make a stage's inputs.

Each builder fills every key its contract requires with plain defaults and takes the numbers a test cares
about as overrides; the result is validated by the contract, so a test input can never be a file the real
stage would not write (and a contract change shows up here, not as a confusing failure downstream).
"""

from __future__ import annotations

from pathlib import Path

import torch

from entropy_probe.artifacts.delta_h1 import DeltaH1Report
from entropy_probe.artifacts.samples import TOKEN_KEYS, Samples, SamplesMeta
from entropy_probe.artifacts.truth import TruthReport
from entropy_probe.artifacts.verify import VerifyReport
from entropy_probe.estimators import TARGETS
from entropy_probe.files import SCHEMA_VERSION

PARAM = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"


def verify_json(step: int, lr: float, fingerprint: str) -> dict:
    """verify.json of a one-tensor adapter at Adam step `step` with learning rate `lr`."""
    group = {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "names": [PARAM]}
    return VerifyReport.model_validate(
        {
            "fingerprint": fingerprint,
            "checkpoint": {
                "weights_dir": f"run/checkpoint-{step}",
                "optimizer_path": f"run/checkpoint-{step}/optimizer.pt",
                "scheduler_path": None,
                "trainer_state_path": None,
                "training_args_path": None,
                "base_model": "base",
                "name_map_path": None,
                "trainer_config_path": None,
            },
            "base_model": "base",
            "adapter": {
                "peft_type": "LORA",
                "rank": 2,
                "alpha": 4,
                "targets": ["q_proj"],
                "modules_to_save": None,
                "use_rslora": False,
                "use_dora": False,
                "lora_bias": False,
                "base_model_name_or_path": "base",
            },
            "use_qlora": False,
            "dtype": "fp32",
            "device_map": "cpu",
            "parameters": [{"name": PARAM, "shape": [2, 16], "numel": 32, "group": 0}],
            "n_trainable": 32,
            "n_trainable_tensors": 1,
            "optimizer_mapping": "by order",
            "param_groups": [group],
            "learning_rate": lr,
            "learning_rate_setting": "next",
            "learning_rate_next": lr,
            "learning_rate_last": lr,
            "step": step,
            "global_step": step,
            "max_grad_norm": 1.0,
            "trainer_config": {},
            "trainer_config_source": None,
            "checks": [],
            "warnings": [],
        }
    ).model_dump(mode="json")


def delta_h1_json(target: str = "token_mean", targets: dict | None = None, reuse: dict | None = None, **top) -> dict:
    """delta_h1.json for the configured `target`; `top` overrides top-level numbers (delta_h1, se_E, …),
    `targets` the per-target estimates ({target: {delta_h1, se_E, entropy}}; default: the top-level ones),
    `reuse` the reuse record (default: not re-weighted)."""
    body = {
        "delta_h1": -1e-3,
        "delta_h1_from_tangents": -1e-3,
        "bars_dot": -0.1,
        "learning_rate": 1e-2,
        "entropy": 0.8,
        "se_delta_h1": 5e-4,
        "se_E": 4e-4,
        "se_U": 3e-4,
        "delta_h1_gradient_part": -1.2e-3,
        "delta_h1_momentum_part": 2e-4,
        "delta_h1_gradient_part_linearised": -1.2e-3,
        "delta_h1_naive": -2e-3,
        "se_E_naive": 1e-3,
        "cov_logp_advantage": 0.1,
        "norm_xbar": 1.0,
        "norm_delta_theta": 1e-2,
        "norm_g": 1.0,
        "B_E": 8,
        "B_U": 4,
        "G": 2,
        "n_E_tokens": 16,
        "n_U_tokens": 16,
        "estimator": {"entropy": target, "baseline": "mean", "ridge": 1e-3, "crossfit_folds": 2},
        "update": {
            "rule": "adam_step",
            "loss_agg_mode": "token-mean",
            "loss_agg_reason": "trainer_config",
            "max_len": None,
            "max_grad_norm": 1.0,
            "max_grad_norm_source": "trainer_config",
        },
        "checkpoint_fingerprint": "fp",
        "world_size": 1,
        **top,
    }
    estimates = {t: {"delta_h1": body["delta_h1"], "se_E": body["se_E"], "entropy": body["entropy"]} for t in TARGETS}
    estimates.update(targets or {})
    estimates[target] = {**estimates[target], "se_U": body["se_U"], "se_delta_h1": body["se_delta_h1"]}
    body["targets"] = estimates
    body["reuse"] = reuse or {
        "weighted": False,
        "sampler_fingerprint": {"E": body["checkpoint_fingerprint"], "U": body["checkpoint_fingerprint"]},
        "ess_fraction_E": 1.0,
        "ess_fraction_U": 1.0,
    }
    return DeltaH1Report.model_validate(body).model_dump(mode="json")


def truth_json(**top) -> dict:
    """truth.json; `top` overrides top-level keys (target, learning_rate, delta_h1, etas, linearity, …)."""
    body = {
        "target": "token_mean",
        "learning_rate": 1e-2,
        "delta_h1": -1e-3,
        "se_delta_h1": 5e-4,
        "etas": [],
        "linearity": {
            "delta_h1": -1e-3,
            "slope_snis": None,
            "curvature_snis": None,
            "slope_fresh": None,
            "curvature_fresh": None,
        },
        "n_sequences": 64,
        "restored_exactly": True,
        "checkpoint_fingerprint": "fp",
        "sampler_fingerprint": "fp",
        "same_checkpoint": True,
        "ess_theta": 64.0,
        "max_abs_logp_diff": 0.0,
        "param_checksum": "0" * 64,
        "generation": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 3, "stop": None},
        "fresh_seed": None,
        **top,
    }
    n = len(body["etas"])
    body["targets"] = {
        t: {
            "delta_h1": body["delta_h1"],
            "se_E": 4e-4,
            "entropy_snis": 0.8,
            "entropy_snis_se": 1e-3,
            "entropy_fresh": None,
            "entropy_fresh_se": None,
            "delta_h_snis": [0.0] * n,
            "se_snis": [None] * n,
            "delta_h_fresh": None,
            "se_fresh": None,
        }
        for t in TARGETS
    }
    return TruthReport.model_validate(body).model_dump(mode="json")


def write_e_samples(directory: Path, prompts: list[list[int]], horizon: int, eos: int, pad: int, **generation) -> None:
    """An E sample artifact, one row per prompt (left-padded), each response a lone eos; `generation`
    overrides temperature, top_p, stop (max_new_tokens = horizon)."""
    P, N = max(len(p) for p in prompts), len(prompts)
    ids = torch.full((N, P + horizon), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) : P] = torch.tensor(p)
        mask[i, P - len(p) : P + 1] = 1
        ids[i, P] = eos
    gen = {
        "temperature": 0.9,
        "temperature_source": "params",
        "top_p": 1.0,
        "max_new_tokens": horizon,
        "stop": None,
        **generation,
    }
    meta = SamplesMeta.model_validate(
        {
            "schema_version": SCHEMA_VERSION,
            "kind": "samples_e",
            "checkpoint_fingerprint": "fp",
            "checkpoint_path": "run/checkpoint",
            "load": {"dtype": "fp32", "use_qlora": False},
            "tokenizer": {"vocab_size": 16, "vocab_sha256": "0" * 16},
            "generation": gen,
            "seed": 0,
            "dataset": {"name": "prompts.jsonl", "split": "train", "fingerprint": "0", "size": N},
            "reward_fn": None,
            "advantage": None,
            "world_size": 1,
            "n_prompts": N,
            "n_sequences": N,
            "n_distinct_prompts": len({tuple(p) for p in prompts}),
            "with_replacement": True,
            "G": 1,
            "mean_reward": None,
            "frac_all_equal_groups": None,
            "mean_response_len": 1.0,
            "frac_truncated": 0.0,
        }
    )
    Samples(
        input_ids=ids,
        attention_mask=mask,
        prompt_lens=torch.tensor([len(p) for p in prompts]),
        response_lens=torch.ones(N, dtype=torch.long),
        truncated=torch.zeros(N, dtype=torch.bool),
        prompt_index=torch.arange(N),
        **{k: torch.zeros(N, horizon) for k in TOKEN_KEYS},
        meta=meta,
    ).write(directory)
