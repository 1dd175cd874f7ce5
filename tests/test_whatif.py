"""Tokens and what-if (docs/math.md §12): per-token shares of δH₁, the trainer's extra loss terms, the what-if rows
against full delta-h1 runs with those settings, and the entropy-neutral bonus."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from conftest import make_lora_model
from test_probe import adamw_state, small_params
from tolerances import FP32_REL, FP64_REL, assert_close_scaled, assert_vectors_close
from typer.testing import CliRunner

from entropy_probe import Probe
from entropy_probe.artifacts.delta_h1 import DeltaH1Report
from entropy_probe.artifacts.samples import Samples
from entropy_probe.artifacts.whatif import WhatIfReport
from entropy_probe.delta_h1 import Clock, reference_kl_slope, u_gradient
from entropy_probe.errors import ProbeError
from entropy_probe.loss_terms import LossTerms, UCoefficients, covariance_terms, top_fraction
from entropy_probe.params import WhatIfRow
from entropy_probe.passes import policy_gradient, token_advantage_covariance, u_token_terms
from entropy_probe.tokens import average_ranks, spearman
from entropy_probe.trainer_config import TrainerConfig, TrainerSettings
from entropy_probe.update import group_advantages, pg_coefficients
from entropy_probe.whatif_result import WhatIfResult
from stages.cli import app

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0])


def make_probe(tokenizer, rule: str = "adam_step", **update) -> Probe:
    """A float64 tiny LoRA policy with a plausible AdamW state (exact identities hold to round-off)."""
    model = make_lora_model(seed=3, rank=2, head_scale=4.0).double()
    trainer = TrainerSettings(TrainerConfig(loss_type="dapo", max_grad_norm=0.5, temperature=1.0))
    params = small_params(update={"rule": rule, **update})
    return Probe(model, tokenizer, adamw_state(model), trainer, params)


def with_rewards(U: Samples) -> Samples:
    """Rewards that move g in every group, and their std-scaled group advantages (the sample stage's rule)."""
    U.rewards = REWARDS[: len(U.rewards)].clone()
    U.advantages = group_advantages(U.rewards.view(-1, 4), True, 1e-4).reshape(-1).float()
    return U


@pytest.fixture(scope="module")
def samples(tokenizer):
    probe = make_probe(tokenizer)
    return probe.sample_e(), with_rewards(probe.sample_u())


def with_update(probe: Probe, **update) -> Probe:
    """The same policy and state under other `update` params (a fresh Probe: the rule is resolved from params)."""
    params = probe.params.model_copy(deep=True)
    for key, value in update.items():
        setattr(params.update, key, value)
    return Probe(probe.model, probe.tokenizer, probe.optimizer, probe.trainer, params)


# ------------------------------------------------------------------------------------------ masks and proxies


def test_top_fraction_picks_that_many_response_tokens():
    scores = torch.tensor([[3.0, 1.0, 9.0], [2.0, 8.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    chosen = top_fraction(scores, mask, 0.4)  # round(0.4 × 5) = 2 of the 5 response tokens: 8 and 3 (not the 9)
    assert chosen.tolist() == [[True, False, False], [False, True, False]]
    assert not top_fraction(scores, mask, 0.0).any() and top_fraction(scores, mask, 1.0).sum() == 5


def test_covariance_terms_average_to_the_batch_covariance(samples):
    _, U = samples
    mask = U.response_mask()
    terms = covariance_terms(U.logprobs, U.advantages, mask)
    expected = token_advantage_covariance(U.logprobs, U.advantages, mask)
    assert float(terms[mask].mean()) == pytest.approx(expected, rel=1e-12)
    assert (terms[~mask] == 0).all()


def test_spearman_ranks_ties_and_signs():
    assert average_ranks(torch.tensor([5.0, 1.0, 5.0, 3.0])).tolist() == [2.5, 0.0, 2.5, 1.0]
    x = torch.tensor([0.1, 0.4, 0.2, 0.9])
    assert spearman(x, x**3) == pytest.approx(1.0) and spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, torch.ones(4)) is None


def test_loss_terms_refuse_bad_settings():
    with pytest.raises(ProbeError, match="unknown token mask"):
        LossTerms(token_mask="top_surprise", mask_fraction=0.1)
    with pytest.raises(ProbeError, match="not in \\[0, 1\\]"):
        LossTerms(token_mask="top_cov", mask_fraction=1.5)


# ------------------------------------------------------------------------------------------ the U objective


def test_entropy_bonus_and_mask_gradient_equals_autograd_of_the_written_out_loss(tokenizer, samples):
    """g for J = Σ keep·c·ℓ + β Σ w H equals autograd of that loss built from teacher forcing by hand."""
    _, U = samples
    probe = make_probe(tokenizer)
    batch = probe.batch(U)
    params = [p for p in probe.model.parameters() if p.requires_grad]
    mask = batch.mask
    advantages = batch.tensors["advantages"].double()
    c = pg_coefficients(advantages, mask, "token-mean")
    w = pg_coefficients(torch.ones_like(advantages), mask, "token-mean")
    terms = LossTerms(entropy_coef=0.3, token_mask="top_entropy", mask_fraction=0.25)
    coefs = UCoefficients.of(terms, c, w, batch.tensors, mask)
    g = policy_gradient(probe.model, params, probe.layout, batch, coefs, max_tokens=7)

    stats = batch.score(probe.model, slice(0, len(batch)), with_grad=True, entropies=True)
    keep = ~top_fraction(batch.tensors["entropies"], mask, 0.25)
    loss = (keep * c * stats.logprobs).sum() + 0.3 * (w * stats.entropies).sum()
    expected = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, params)])
    assert int((~keep & mask).sum()) == round(0.25 * int(mask.sum()))
    assert_vectors_close(g, expected, rel=FP64_REL, what="g with an entropy bonus and a mask")


def test_kl_penalty_gradient_equals_autograd_of_the_k3_loss_against_the_base(tokenizer, samples):
    """g for J = Σ c ℓ − β_KL Σ w (exp(r − ℓ) − (r − ℓ) − 1), r under the base (adapter off), equals autograd of
    that loss written out; the trainer's beta is the default β_KL; a full-parameter model is refused."""
    _, U = samples
    probe = make_probe(tokenizer)
    probe.trainer = TrainerSettings(TrainerConfig(loss_type="dapo", max_grad_norm=0.5, temperature=1.0, beta=0.3))
    update = probe.update_rule()
    assert update.terms.kl_coef == 0.3 and update.record().kl_coef == 0.3
    batch = probe.batch(U)
    named = dict(probe.model.named_parameters())
    params = [named[n] for n in probe.layout.names]  # g is flat in the layout's (the optimizer's) order
    ug = u_gradient(probe.model, probe.layout, batch, update, None, probe.budget, Clock())

    with torch.no_grad(), probe.model.disable_adapter():
        reference = batch.score(probe.model, slice(0, len(batch)), with_grad=False, entropies=False).logprobs
    stats = batch.score(probe.model, slice(0, len(batch)), with_grad=True, entropies=False)
    advantages = batch.tensors["advantages"].double()
    c = pg_coefficients(advantages, batch.mask, "token-mean")
    w = pg_coefficients(torch.ones_like(advantages), batch.mask, "token-mean")
    log_ratio = torch.where(batch.mask, reference - stats.logprobs, 0.0)
    k3 = log_ratio.exp() - log_ratio - 1
    loss = (c * stats.logprobs).sum() - 0.3 * (w * k3).sum()
    expected = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, params)])
    assert float(k3.detach()[batch.mask].abs().max()) > 1e-3  # the adapter moves the policy: the term is not ~0
    assert_vectors_close(ug.g, expected, rel=FP64_REL, what="g with a KL penalty")

    full = copy.deepcopy(probe.model).merge_and_unload()
    with pytest.raises(ProbeError, match="KL penalty needs the reference policy.*kl_reference.*update.kl_coef: 0"):
        reference_kl_slope(full, batch, 100)


def test_a_full_parameter_policy_takes_its_kl_reference_from_the_given_model(tokenizer, samples):
    """The policy merged into a full model, with the base as `kl_reference` (TRL's ref_model): U carries the base's
    log-probs (the reference's mode restored), and the KL slope equals the LoRA policy's with its adapter off."""
    _, U = samples
    probe = make_probe(tokenizer)
    lora_batch = probe.batch(U)
    full = copy.deepcopy(probe.model).merge_and_unload()
    base = copy.deepcopy(probe.model).unload().train()
    full_probe = Probe(full, tokenizer, None, probe.trainer, probe.params, kl_reference=base)
    batch = full_probe.batch(U)
    assert base.training  # the trainer's reference model is left as it was
    with torch.no_grad(), probe.model.disable_adapter():
        expected = lora_batch.score(probe.model, slice(0, len(lora_batch)), with_grad=False, entropies=False).logprobs
    reference = batch.tensors["reference_logprobs"]
    assert_vectors_close(reference[batch.mask], expected[lora_batch.mask], rel=FP64_REL, what="r")
    slope = reference_kl_slope(full, batch, 100)
    assert float(slope[batch.mask].abs().max()) > 1e-3
    assert_vectors_close(slope, reference_kl_slope(probe.model, lora_batch, 100), rel=FP64_REL, what="KL slope")


def test_token_shares_match_one_backward_per_token(tokenizer, samples):
    """a_ij = c_ij ∇ℓ_ij·v from the double-backward pass equals brute force: one gradient per token."""
    _, U = samples
    probe = make_probe(tokenizer)
    batch = probe.batch(U)
    params = [p for p in probe.model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(5)
    direction = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    c = pg_coefficients(batch.tensors["advantages"].double(), batch.mask, "seq-mean-token-mean")
    a, entropies = u_token_terms(probe.model, params, batch, c, direction, max_tokens=9)

    stats = batch.score(probe.model, slice(0, len(batch)), with_grad=True, entropies=True)
    expected = torch.zeros_like(a)
    for i, j in batch.mask.nonzero().tolist():
        grads = torch.autograd.grad(stats.logprobs[i, j], params, retain_graph=True)
        expected[i, j] = c[i, j] * sum((gr * v).sum() for gr, v in zip(grads, direction))
    # the tiny Qwen2's RMSNorm computes in float32 even in a float64 model, and the double backward rounds there
    # in another order than one backward per token: agreement to float32 round-off
    assert_vectors_close(a, expected, rel=FP32_REL, what="per-token shares")
    assert_vectors_close(entropies, stats.entropies.detach(), rel=FP64_REL, what="H")


def test_a_bad_kl_reference_is_a_one_line_error(tokenizer, samples, tmp_path):
    """checkpoint.kl_reference that is not a model dir, or a model of another vocabulary: refused, naming it."""
    from entropy_probe.tiny import build_model

    _, U = samples
    probe = make_probe(tokenizer)
    for where, problem in (
        (tmp_path / "missing", "cannot load checkpoint.kl_reference"),
        (tmp_path / "other", "vocab"),
    ):
        if where.name == "other":
            build_model(vocab_size=len(tokenizer) + 3, hidden_size=8, num_layers=1, num_heads=2).save_pretrained(where)
        params = probe.params.model_copy(deep=True)
        params.checkpoint.kl_reference = str(where)
        with pytest.raises(ProbeError, match=f"{problem}.*set checkpoint.kl_reference"):
            Probe(probe.model, tokenizer, probe.optimizer, probe.trainer, params).batch(U)


# ------------------------------------------------------------------------------------------ the whatif computation


ROWS = [
    WhatIfRow(name="half lr", lr_scale=0.5),
    WhatIfRow(name="seq-mean-token-mean", loss_agg_mode="seq-mean-token-mean"),
    WhatIfRow(name="no clipping", max_grad_norm=0.0),
    WhatIfRow(name="no std scaling", advantage_scale=False),
    WhatIfRow(name="bonus", entropy_coef=0.05),
    WhatIfRow(name="clip-cov", token_mask="top_cov", token_mask_fraction=0.25),
    WhatIfRow(name="bottom entropy", token_mask="bottom_entropy", token_mask_fraction=0.5),
    WhatIfRow(name="KL penalty", kl_coef=0.2),
]


@pytest.fixture(scope="module")
def whatif(tokenizer, samples):
    E, U = samples
    probe = make_probe(tokenizer)
    probe.params.whatif.rows = ROWS
    probe.params.whatif.forking_fraction = 0.25
    result = probe.delta_h1(E, U)
    return probe, result, probe.whatif(E, U, result)


def test_token_shares_sum_to_the_linearised_gradient_part(whatif):
    """Σ a = u·g. Clipping is active here (‖g‖ > 0.5), which makes u ⟂ g and u·g ~0: compared at the scale of
    the summed shares (float32 round-off: the tiny Qwen2's RMSNorm rounds to float32 in a float64 model)."""
    _, result, w = whatif
    tokens = w.report.tokens
    scale = float(w.outcome.token_a.abs().sum())
    assert_close_scaled(tokens.sum_a, tokens.gradient_part_linearised, scale, rel=FP32_REL, what="Σ a vs u·g")
    assert_close_scaled(
        tokens.gradient_part_linearised, result.report.delta_h1_gradient_part_linearised, scale, rel=FP32_REL
    )  # the same u·g as delta-h1's Σ_b u·g_b
    assert tokens.n_tokens == int(w.table.a.numel()) and len(w.tokens_csv.splitlines()) == tokens.n_tokens + 1


def test_under_sgd_the_token_shares_sum_to_delta_h1(tokenizer, samples):
    """sgd: Δθ = lr·g is linear with no momentum (and no clipping), so Σ a = δH₁ up to round-off."""
    E, U = samples
    probe = make_probe(tokenizer, rule="sgd")
    probe.params.whatif.rows = []
    result = probe.delta_h1(E, U)
    w = probe.whatif(E, U, result)
    scale = float(w.outcome.token_a.abs().sum())
    assert abs(result.delta_h1) > 0.1 * scale  # no cancellation: a real check of the sum
    assert_close_scaled(w.report.tokens.sum_a, result.delta_h1, scale, rel=FP32_REL, what="Σ a vs δH₁ (sgd)")
    assert result.report.delta_h1_momentum_part == 0.0


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.name)
def test_each_row_equals_a_delta_h1_run_with_its_settings(whatif, samples, row):
    probe, result, w = whatif
    E, U = samples
    settings = {
        "lr_scale": {},
        "loss_agg_mode": {"loss_agg_mode": row.loss_agg_mode},
        "max_grad_norm": {"max_grad_norm": row.max_grad_norm},
        "entropy_coef": {"entropy_coef": row.entropy_coef},
        "token_mask": {"token_mask": row.token_mask, "token_mask_fraction": row.token_mask_fraction},
        "advantage_scale": {},
        "kl_coef": {"kl_coef": row.kl_coef},
    }[next(k for k in row.model_dump(exclude={"name"}, exclude_none=True) if k != "token_mask_fraction")]
    other = with_update(probe, **settings)
    update = other.update_rule()
    if row.lr_scale is not None:
        update = copy.copy(update)
        object.__setattr__(update, "state", type(update.state)(**{**vars(update.state), "lr": update.state.lr * 0.5}))
    U_row = U
    if row.advantage_scale is not None:
        U_row = copy.deepcopy(U)
        grouped = U.rewards.view(-1, 4).double()
        U_row.advantages = (grouped - grouped.mean(1, keepdim=True)).reshape(-1).float()
    full = other.delta_h1(E, U_row, update)
    got = next(r for r in w.report.rows if r.name == row.name)
    # an entropy-bonus row is g + β h from two backwards, the delta-h1 run one backward of the sum: equal up to the
    # float32 rounding of the tiny Qwen2's RMSNorm (which computes in float32 even in a float64 model)
    rel = 1e-6 if row.entropy_coef is not None else 1e-9
    assert got.delta_h1 == pytest.approx(full.delta_h1, rel=rel, abs=1e-15)
    assert got.se_E == pytest.approx(full.report.se_E, rel=1e-6)
    assert got.se_U == pytest.approx(full.report.se_U, rel=rel)
    assert got.delta_h1 != pytest.approx(w.report.configured.delta_h1, rel=1e-6)  # the row changes something


def test_the_entropy_neutral_bonus_zeroes_delta_h1(whatif, samples):
    """delta-h1 with update.entropy_coef = β* gives δH₁ at the target (0) to round-off: well within its SE."""
    probe, result, w = whatif
    E, U = samples
    neutral = w.report.entropy_neutral
    assert neutral.entropy_coef is not None and neutral.entropy_coef_se > 0
    assert neutral.delta_h1_at == pytest.approx(0.0, abs=1e-9 * abs(result.delta_h1))
    at_beta = with_update(probe, entropy_coef=neutral.entropy_coef).delta_h1(E, U)
    assert abs(at_beta.delta_h1 - neutral.target) < 1e-6 * at_beta.se
    assert at_beta.se == pytest.approx(neutral.se_at, rel=1e-6)
    # the bonus has the sign users expect: it raises δH₁ (δH₁ < 0 here needs β* > 0, and vice versa)
    assert (neutral.entropy_coef > 0) == (result.delta_h1 < 0)
    assert neutral.lr_scale == (0.0 if neutral.target == 0 else neutral.lr_scale)


def test_whatif_round_trips_and_refuses_a_given_step(whatif, samples, tmp_path):
    probe, result, w = whatif
    w.save(tmp_path / "whatif")
    back = WhatIfResult.read(tmp_path / "whatif")
    assert back.report == w.report and back.tokens_csv == w.tokens_csv
    header, first = w.tokens_csv.splitlines()[:2]
    assert header.startswith("row,group,position,token,a,")
    assert float(first.split(",")[4]) == pytest.approx(min(w.table.a.tolist()))  # most lowering first
    E, U = samples
    with pytest.raises(ProbeError, match="one emulated step"):
        probe.whatif(E, U, result, update=with_update(probe, mini_batches=2).update_rule())


# ------------------------------------------------------------------------------------------ the stage


def test_whatif_stage_on_a_full_parameter_trl_run(full_run, tmp_path):
    """verify → sample-e → sample-u → delta-h1 → whatif through the CLI on a TRL full fine-tuning run (tied head,
    every parameter): the artifacts, Σ a = u·g, a delta-h1 at the entropy-neutral bonus lands at 0 within its SE;
    pointed at another checkpoint's delta-h1 the stage refuses in one line and writes nothing."""
    runner = CliRunner()
    params = {
        "paths": {k: str(tmp_path / k) for k in ("verify", "sample_e", "sample_u", "delta_h1", "whatif")},
        "checkpoint": {"path": str(full_run / "run" / "checkpoint-2"), "dtype": "fp32", "device_map": "cpu"},
        "batch_config": {"dataset_name": str(full_run / "prompts.jsonl"), "B_E": 32, "B_U": 4, "G": 4},
        "second_order": {"enabled": False},
        "whatif": {"rows": [{"name": "half lr", "lr_scale": 0.5}, {"name": "bonus", "entropy_coef": 0.02}]},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    def cli(stage, *args):
        return runner.invoke(app, [stage, "--params", str(tmp_path / "params.yaml"), *args])

    for stage in ("verify", "sample-e", "sample-u", "delta-h1", "whatif"):
        result = cli(stage)
        assert result.exit_code == 0, (stage, result.output)
    assert "whatif: δH₁" in result.output and "entropy-neutral bonus" in result.output
    report = WhatIfReport.read(tmp_path / "whatif")
    delta_h1 = DeltaH1Report.read(tmp_path / "delta_h1")
    assert report.configured.delta_h1 == pytest.approx(delta_h1.delta_h1, rel=1e-12)
    assert report.rows[0].delta_h1 == pytest.approx(0.5 * delta_h1.delta_h1, rel=1e-9)  # δH₁ ∝ lr
    tokens = report.tokens
    lines = (tmp_path / "whatif" / "tokens.csv").read_text().splitlines()
    a = [float(line.split(",")[4]) for line in lines[1:]]
    assert len(a) == tokens.n_tokens == delta_h1.n_U_tokens and a == sorted(a)
    assert_close_scaled(sum(a), tokens.gradient_part_linearised, sum(map(abs, a)), what="Σ a vs u·g")
    assert (tmp_path / "whatif" / "tokens.png").stat().st_size > 10_000

    beta = report.entropy_neutral.entropy_coef
    assert beta is not None
    result = cli("delta-h1", "-S", f"update.entropy_coef={beta!r}", "--out", str(tmp_path / "neutral"))
    assert result.exit_code == 0, result.output
    neutral = DeltaH1Report.read(tmp_path / "neutral")
    assert abs(neutral.delta_h1) < 0.01 * neutral.se_delta_h1 and neutral.update.entropy_coef == beta

    other = {**params, "checkpoint": {**params["checkpoint"], "path": str(full_run / "run" / "checkpoint-3")}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(other))
    assert cli("verify", "--out", str(tmp_path / "verify3")).exit_code == 0
    result = cli("whatif", "-S", f"paths.verify={tmp_path / 'verify3'}", "--out", str(tmp_path / "stale"))
    assert result.exit_code == 2 and "error:" in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "stale").exists()


def test_whatif_rows_are_validated():
    from entropy_probe.params import validate_params

    with pytest.raises(ProbeError, match="row name 'a' is used twice"):
        validate_params({"whatif": {"rows": [{"name": "a", "lr_scale": 0.5}, {"name": "a", "entropy_coef": 0.1}]}})
    with pytest.raises(ProbeError, match="whatif.rows"):
        validate_params({"whatif": {"rows": [{"name": "b", "learning_rate": 0.5}]}})  # not a row setting
    with pytest.raises(ProbeError, match="whatif.rows"):
        validate_params({"whatif": {"rows": [{"name": "c", "lr_scale": -1.0}]}})


def test_shares_of_a_cancelled_sum_are_not_reported():
    """Under binding clipping Σ a = u·g ≈ 0: a share of it would be round-off divided by round-off, so it is None,
    while the share of Σ |a| stays defined."""
    from entropy_probe.tokens import TokenTable

    def table(a):
        a = torch.tensor(a, dtype=torch.float64)
        zeros = torch.zeros_like(a)
        flags = torch.tensor([True, False, False, False])
        return TokenTable(zeros, zeros, zeros, a, zeros, zeros, zeros, zeros, zeros, zeros, flags, ~flags)

    cancelled, plain = table([3e-4, -1e-4, -2e-4, 1e-12]), table([3e-4, 1e-4, 0.0, 0.0])
    assert cancelled.share(cancelled.forking) is None
    assert cancelled.magnitude_share(cancelled.forking) == pytest.approx(0.5)
    assert plain.share(plain.forking) == pytest.approx(0.75) and plain.share(plain.clip_cov) == pytest.approx(0.25)
