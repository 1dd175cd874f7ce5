"""Several AdamW steps per U batch (mini-batches × epochs, PPO's clipped ratio after the first step) against the
real thing: TRL's own GRPO loss (`GRPOTrainer.compute_loss`) and torch's AdamW stepping the model, on the same
mini-batches, in float64."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from trainer_ckpt import grpo_args

from entropy_probe.multi_step import chain_coefficients, clipped_gradient, mini_batch_rows, rows_of, run_chain
from entropy_probe.optimizer_state import build_adamw
from entropy_probe.params import validate_params
from entropy_probe.perturb import as_float64
from entropy_probe.probe import Probe
from entropy_probe.tiny import one_thread
from entropy_probe.update import AdamState, adam_advance, clipped_ratio_coefficients

CHAIN = {"mini_batches": 2, "epochs": 2, "clip_ratio": [0.2, 0.28]}


def test_clipped_ratio_coefficients_follow_ppo():
    coef = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0]], dtype=torch.float64)
    log_ratio = torch.tensor([[0.3, -0.3, 0.3, -0.3, 0.0]], dtype=torch.float64).clamp(-10, 10)
    mask = torch.tensor([[True, True, True, True, False]])
    out = clipped_ratio_coefficients(coef, log_ratio, mask, 0.2, 0.28)
    r = log_ratio.exp()
    # A > 0 and r > 1.28: dropped; A > 0, r < 1: kept (the min is the unclipped term); A < 0 and r > 1: kept;
    # A < 0 and r < 0.8: dropped; off the mask: 0
    assert out.tolist() == [[0.0, r[0, 1].item(), -r[0, 2].item(), 0.0, 0.0]]
    assert torch.equal(clipped_ratio_coefficients(coef, torch.zeros_like(coef), mask, 0.2, 0.2), coef * mask)


def test_adam_advance_is_torch_adamw_step_after_step():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, foreach=False)
    n = 5
    state = AdamState(
        theta=p.detach().clone(),
        exp_avg=torch.zeros(n, dtype=torch.float64),
        exp_avg_sq=torch.zeros(n, dtype=torch.float64),
        step=torch.zeros(n, dtype=torch.float64),
        lr=torch.full((n,), 1e-2, dtype=torch.float64),
        beta1=torch.full((n,), 0.9, dtype=torch.float64),
        beta2=torch.full((n,), 0.99, dtype=torch.float64),
        eps=torch.full((n,), 1e-8, dtype=torch.float64),
        weight_decay=torch.full((n,), 0.1, dtype=torch.float64),
    )
    for _ in range(3):
        g = torch.randn(n, dtype=torch.float64)  # ∇J: the loss gradient is −g
        before = p.detach().clone()
        p.grad = -g
        opt.step()
        delta, state = adam_advance(g, state, None)
        assert torch.allclose(delta, p.detach() - before, rtol=0, atol=1e-15)
        assert torch.allclose(state.theta, p.detach(), rtol=0, atol=1e-15)


def _trl_inputs(U, rows, logp_old):
    """The dict TRL's GRPO loss reads for these U rows (prompt left-padded, completion right-padded)."""
    P = U.n_prompt_cols
    return {
        "prompt_ids": U.input_ids[rows, :P],
        "prompt_mask": U.attention_mask[rows, :P],
        "completion_ids": U.input_ids[rows, P:],
        "completion_mask": U.mask[rows].long(),
        "advantages": U.tensors["advantages"][rows].double(),
        "old_per_token_logps": logp_old[rows],
    }


@pytest.mark.numerics
@pytest.mark.parametrize("loss_type, mode", [("grpo", "seq-mean-token-mean"), ("dapo", "token-mean")])
def test_the_chain_is_trls_loss_stepped_by_torch_adamw(full_run, tmp_path, loss_type, mode):
    """k = 2 mini-batches × 2 epochs on one U batch of a full-parameter checkpoint, against torch AdamW (the
    checkpoint's state, lr, weight decay, grad clipping) stepping the model on TRL's own GRPO loss with the clipped
    ratio, mini-batch by mini-batch (dapo normalises by the generation batch's tokens ÷ steps_per_generation, grpo
    per sequence):
    - at every step of the real chain, the probe's gradient at that θ equals TRL's up to TRL's float32 head
      (its fused log-softmax): ≤ 1e-6 relative, in float64 models;
    - the emulated Δθ follows the real one within 1e-3 relative (Adam's normalisation amplifies that float32
      rounding in elements whose gradient is ~0), where the same chain without the clip is off by far more."""
    import datasets
    from trl import GRPOTrainer

    lr = 0.05  # large enough that the later steps leave the clip range
    raw = {
        "checkpoint": {"path": str(full_run / "run" / "checkpoint-2"), "dtype": "fp32", "device_map": "cpu"},
        "batch_config": {"dataset_name": str(full_run / "prompts.jsonl"), "G": 4},
        "generation": {"top_p": 1.0},
        "update": {**CHAIN, "max_grad_norm": 1.0},
    }
    raw["checkpoint"]["learning_rate"] = lr
    probe = Probe.from_checkpoint(raw["checkpoint"]["path"], params=validate_params(raw))
    probe.trainer.config.loss_type = loss_type
    with one_thread():
        U_samples = probe.sample_u(n=4)
    as_float64(probe.model)  # float64 end to end (RMSNorm and attention too)
    update = probe.update_rule()
    assert update.chain is not None and update.chain.steps == 4 and update.loss_agg_mode == mode
    U = probe.batch(U_samples)
    model, layout = probe.model, probe.layout
    with one_thread():
        chain = run_chain(model, layout, U, update, update.chain, 4096)
        no_clip = replace(update.chain, clip_low=0.999, clip_high=1e9)
        unclipped = run_chain(model, layout, U, update, no_clip, 4096)
    assert max(chain.clipped_fraction[1:]) > 0 and chain.clipped_fraction[0] == 0

    args = grpo_args(tmp_path, lr=lr, weight_decay=0.0)
    args.temperature, args.epsilon, args.epsilon_high, args.max_grad_norm = U.temperature, 0.2, 0.28, 1.0
    args.loss_type, args.steps_per_generation, args.gradient_accumulation_steps = loss_type, 2, 1
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
        args=args,
        train_dataset=datasets.Dataset.from_list([{"prompt": "1+1="}]),
        processing_class=probe.tokenizer,
    )
    trainer.current_gradient_accumulation_steps = 1
    optimizer = build_adamw(model, probe.optimizer, lr=lr)
    params = [dict(model.named_parameters())[n] for n in layout.names]
    theta0 = layout.flatten({n: p.detach().clone() for n, p in zip(layout.names, params)})
    logp_old = U.token_stats(model, 4096)["logprobs"]
    parts = mini_batch_rows(len(U), CHAIN["mini_batches"], update.chain.seed)
    tokens = int(U.mask.sum())
    with one_thread():
        for _ in range(CHAIN["epochs"]):
            for rows in parts:
                M = rows_of(U, rows)
                coef = chain_coefficients(M, update, update.chain, tokens)
                model.eval()
                ours, _ = clipped_gradient(model, params, layout, M, logp_old[rows], coef, update.chain, 4096)
                model.train()  # TRL rescales dapo's normaliser in train mode (this model has no dropout)
                inputs = {**_trl_inputs(U, rows, logp_old), "num_items_in_batch": torch.tensor(float(tokens))}
                trainer.compute_loss(model, inputs).backward()
                trls = -layout.flatten({n: p.grad for n, p in zip(layout.names, params)})
                assert float((ours - trls).norm()) <= 1e-6 * float(trls.norm())
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    model.eval()
    real = layout.flatten({n: p.detach() for n, p in zip(layout.names, params)}) - theta0
    off = float((chain.delta_theta - real).norm()) / float(real.norm())
    assert off <= 1e-3
    assert float((unclipped.delta_theta - real).norm()) / float(real.norm()) > 10 * off


def test_delta_h1_along_the_chain(full_run):
    """delta-h1 with k = 4 steps: δH₁ = X̄·Δθ of the chain, SE_U by the jackknife through whole chains, the steps
    recorded in delta_h1.json; the momentum part is the chain at zero gradients."""
    params = validate_params(
        {
            "checkpoint": {"path": str(full_run / "run" / "checkpoint-2"), "dtype": "fp32", "device_map": "cpu"},
            "batch_config": {"dataset_name": str(full_run / "prompts.jsonl"), "G": 4},
            "update": CHAIN,
        }
    )
    probe = Probe.from_checkpoint(params.checkpoint.path, params=params)
    with one_thread():
        E, U = probe.sample_e(n=8), probe.sample_u(n=8)
        result = probe.delta_h1(E, U, with_second_order=False)
        chain = run_chain(
            probe.model, probe.layout, probe.batch(U), probe.update_rule(), probe.update_rule().chain, 4096
        )
    report = result.report
    assert report.update.steps.mini_batches == 2 and report.update.steps.epochs == 2
    assert report.update.steps.clip_high == 0.28 and report.update.steps.source == "params"
    assert torch.equal(result.estimate.delta_theta, chain.delta_theta)  # deterministic: the same chain
    assert report.se_U > 0 and report.se_U_method == "jackknife over U prompt groups"
    assert report.delta_h1_gradient_part + report.delta_h1_momentum_part == pytest.approx(report.delta_h1)
    single = probe.delta_h1(E, U, replace(probe.update_rule(), chain=None), with_second_order=False)
    assert single.delta_h1 != pytest.approx(report.delta_h1, rel=1e-3)  # four steps are not one


def test_the_chain_follows_the_trainers_settings_and_refuses_other_rules(full_run):
    from entropy_probe.errors import ProbeError

    params = validate_params(
        {"checkpoint": {"path": str(full_run / "run" / "checkpoint-2"), "dtype": "fp32", "device_map": "cpu"}}
    )
    probe = Probe.from_checkpoint(params.checkpoint.path, params=params)
    assert probe.update_rule().chain is None  # the demo's TRL run: one step per generation batch
    config = probe.trainer.config
    config.steps_per_generation, config.gradient_accumulation_steps, config.num_iterations = 4, 2, 3
    config.epsilon, config.epsilon_high, config.loss_type = 0.1, 0.3, "dapo"
    chain = probe.update_rule().chain
    assert (chain.mini_batches, chain.epochs, chain.clip_low, chain.clip_high) == (2, 3, 0.1, 0.3)
    assert chain.token_normaliser == "batch" and "steps_per_generation" in chain.source
    with pytest.raises(ProbeError, match="6 steps per U batch need update.rule adam_step, not sgd"):
        probe.update_rule("sgd")
    with pytest.raises(ProbeError, match="a forecast scores one trainer step per checkpoint pair"):
        probe.forecast(None, None, 1)
