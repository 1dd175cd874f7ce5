"""`Probe`, the in-memory API: built from live objects, it samples, resolves the update once and computes δH₁
exactly as the library's pieces do; its results round-trip through the stage artifacts.

(Its parity with the pipeline's files on the demo checkpoint is tested in test_readme.py, which runs the
README's in-memory example after `dvc repro` and compares it with the delta-h1 stage's output.)
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_lora_model
from tolerances import assert_close_scaled, dot_scale

from entropy_probe import Params, Probe
from entropy_probe.artifacts.delta_h1 import DeltaH1Report
from entropy_probe.artifacts.samples import Samples
from entropy_probe.delta_h1 import compute_delta_h1
from entropy_probe.errors import ProbeError
from entropy_probe.optimizer_state import OptimizerState, ParamGroup
from entropy_probe.scoring import Batch
from entropy_probe.specs import ComputeBudget
from entropy_probe.trainer_config import TrainerConfig, TrainerSettings
from entropy_probe.update import update_direction
from entropy_probe.update_rule import HF_DEFAULT_MAX_GRAD_NORM

LR = 2e-2


def adamw_state(model, lrs=(LR, LR)) -> OptimizerState:
    """A plausible AdamW state after 10 steps, in the Trainer's two groups (decay: the A matrices here)."""
    gen = torch.Generator().manual_seed(0)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [[n for n, _ in named if "lora_A" in n], [n for n, _ in named if "lora_A" not in n]]
    return OptimizerState(
        names=groups[0] + groups[1],
        exp_avg={n: 1e-3 * torch.randn(p.shape, generator=gen) for n, p in named},
        exp_avg_sq={n: 1e-6 * torch.rand(p.shape, generator=gen) for n, p in named},
        step={n: 10.0 for n, _ in named},
        groups=[
            ParamGroup(lr=lr, betas=[0.9, 0.999], eps=1e-8, weight_decay=wd, names=names)
            for lr, wd, names in zip(lrs, (0.01, 0.0), groups)
        ],
        mapping="test: built in memory",
    )


def small_params(**sections) -> Params:
    params = Params()
    params.batch_config.dataset_name = "arithmetic:1"
    params.batch_config.B_E, params.batch_config.B_U, params.batch_config.G = 8, 3, 4
    params.generation.max_new_tokens = 3
    params.second_order.enabled = False
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(params, section), key, value)
    return params


@pytest.fixture(scope="module")
def probe(tokenizer) -> Probe:
    model = make_lora_model(seed=3, rank=2, head_scale=4.0)
    trainer = TrainerSettings(TrainerConfig(loss_type="dapo", max_grad_norm=0.5, temperature=1.0))
    return Probe(model, tokenizer, adamw_state(model), trainer, small_params())


def with_moving_advantages(U: Samples) -> Samples:
    """The tiny random policy rarely earns a reward: give every group advantages that move g."""
    U.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5]).repeat(len(U.advantages) // 4)
    return U


def test_sampling_is_the_sample_stages_draw_and_reproducible(probe):
    E, U = probe.sample_e(), probe.sample_u()
    assert E.kind == "samples_e" and len(E.input_ids) == 8 and E.meta.checkpoint_fingerprint == "in-memory"
    assert U.kind == "samples_u" and len(U.input_ids) == 12 and U.meta.G == 4
    assert len(set(U.prompt_index.view(3, 4)[:, 0].tolist())) == 3  # distinct prompts, G rows each
    again = probe.sample_e()
    assert all(torch.equal(a, b) for a, b in zip(E.tensors().values(), again.tensors().values()))
    other = probe.sample_e(seed=99)
    assert not torch.equal(other.input_ids, E.input_ids) or not torch.equal(other.prompt_index, E.prompt_index)


def test_update_rule_takes_the_trainer_settings_and_the_lr_choice(probe, tokenizer):
    rule = probe.update_rule()
    assert (rule.rule, rule.loss_agg_mode, rule.max_grad_norm) == ("adam_step", "token-mean", 0.5)
    assert rule.max_grad_norm_source == "the trainer's max_grad_norm"
    assert rule.learning_rate == pytest.approx(LR)
    # unknown trainer settings: the HF Trainer's default clip, said so
    bare = Probe(probe.model, tokenizer, probe.optimizer, None, small_params())
    assert bare.update_rule().max_grad_norm == HF_DEFAULT_MAX_GRAD_NORM
    assert "not recorded" in bare.update_rule().max_grad_norm_source
    # groups with their own lr: "next" keeps each group's, a number replaces them all
    two_lrs = adamw_state(probe.model, lrs=(1e-2, 3e-2))
    per_group = Probe(probe.model, tokenizer, two_lrs, None, small_params()).update_rule()
    assert sorted(set(per_group.state.lr.tolist())) == pytest.approx([1e-2, 3e-2])
    with pytest.raises(ProbeError, match="different learning rates"):
        Probe(probe.model, tokenizer, two_lrs, None, small_params(checkpoint={"learning_rate": 5e-3}))
    fixed = Probe(probe.model, tokenizer, probe.optimizer, None, small_params(checkpoint={"learning_rate": 5e-3}))
    assert set(fixed.update_rule().state.lr.tolist()) == {5e-3}


def test_delta_h1_is_the_library_computation_and_round_trips(probe, tmp_path):
    """Probe.delta_h1 = compute_delta_h1 on the same batches with the resolved rule (identical numbers), and
    its result saves the stage's artifacts, which read back to the same report."""
    E, U = probe.sample_e(), with_moving_advantages(probe.sample_u())
    result = probe.delta_h1(E, U)
    rule = probe.update_rule()
    batches = [Batch.from_samples(s, probe.device) for s in (E, U)]
    direct = compute_delta_h1(probe.model, *batches, probe.layout, rule, probe.params.estimator, ComputeBudget())
    assert result.delta_h1 == direct.delta_h1 and result.se == direct.se_delta_h1
    assert result.report.update.rule == "adam_step" and result.report.checkpoint_fingerprint == "in-memory"
    result.save(tmp_path / "dh1")
    assert DeltaH1Report.read(tmp_path / "dh1") == result.report
    assert (tmp_path / "dh1" / "attributions.csv").read_bytes() == result.attributions.encode()
    # the sign: sgd moves along +g, so flipping every advantage flips the gradient part of δH₁
    sgd = probe.update_rule("sgd")
    up = probe.delta_h1(E, U, sgd)
    U.advantages = -U.advantages
    down = probe.delta_h1(E, U, sgd)
    scale = dot_scale(up.estimate.xbar, up.estimate.delta_theta)
    assert abs(up.delta_h1) > 1e-3 * scale
    assert_close_scaled(down.delta_h1, -up.delta_h1, scale, what="δH₁ with flipped advantages")
    g_step = update_direction("sgd", up.estimate.delta_theta / LR, sgd.state)  # lr·g again: Δθ is sgd's
    assert torch.allclose(g_step, up.estimate.delta_theta, rtol=1e-12, atol=0)


def test_refusals_are_one_line(probe, tokenizer):
    E, U = probe.sample_e(), probe.sample_u()
    U.advantages = torch.zeros_like(U.advantages)
    with pytest.raises(ProbeError, match="all advantages are 0") as err:
        probe.delta_h1(E, U, probe.update_rule("sgd"))
    assert "\n" not in str(err.value)
    momentum_only = probe.delta_h1(E, U).report  # adam_step: the trainer still takes its momentum/decay step
    assert (
        momentum_only.delta_h1_gradient_part == 0.0 and momentum_only.delta_h1 == momentum_only.delta_h1_momentum_part
    )
    with pytest.raises(ProbeError, match="needs a U batch"):
        probe.delta_h1(E)
    with pytest.raises(ProbeError, match="needs the checkpoint's files"):
        probe.observed_step()
    policy_only = Probe(probe.model, tokenizer, None, None, small_params())
    with pytest.raises(ProbeError, match="no AdamW state"):
        policy_only.update_rule()
