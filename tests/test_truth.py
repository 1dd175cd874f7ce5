"""The truth stage: SNIS and fresh-sample ΔH(η) vs exact enumeration, exact restore, the pure estimators
(by hand and by SE calibration), and the stage end to end on a Trainer-layout checkpoint."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from test_delta_h1 import delta_h1_report

from entropy_probe import ground_truth as truth
from entropy_probe.artifacts.delta_h1 import Bars
from entropy_probe.artifacts.truth import TruthReport
from entropy_probe.enumeration import delta_h_curve, entropy_at
from entropy_probe.errors import ProbeError
from entropy_probe.estimators import TARGETS
from entropy_probe.files import write_json
from entropy_probe.generation import GenerationSpec, generate_responses
from entropy_probe.importance import effective_sample_size, paired_difference, ratio_estimate
from entropy_probe.perturb import as_float64, perturbed
from entropy_probe.scoring import Batch, SeqStats
from stages import truth as truth_stage

T = 1.3  # ≠ 1 so a forgotten temperature shows up
MAX_NEW = 3
PROMPTS = ["1+2=", "3+4=", "5+5=", "9+0="]
ROWS = PROMPTS * 128  # the E batch: every prompt 128 times, so the exact target uses multiplicities 1:1:1:1
MULTIPLIERS = [0.5, 1.0, 2.0]


def gaussian_step(model, scale: float) -> dict[str, torch.Tensor]:
    """A known update: Gaussian (seed 0), scaled to `scale` × each adapter tensor's mean magnitude."""
    g = torch.Generator().manual_seed(0)
    return {
        n: scale * p.detach().abs().mean() * torch.randn(p.shape, generator=g)
        for n, p in model.named_parameters()
        if p.requires_grad
    }


@pytest.fixture(scope="module")
def delta(model):
    """A known small update: 10% of each adapter tensor's mean magnitude."""
    return gaussian_step(model, 0.1)


@pytest.fixture(scope="module")
def exact_curve(model, tokenizer, delta):
    """Exact ΔH(m) per target (and H(θ) under "base") for the E prompt multiset, by enumeration on a float64 copy."""
    m64 = as_float64(copy.deepcopy(model))
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    kw = dict(eos_id=tokenizer.eos_token_id, max_new_tokens=MAX_NEW, temperature=T, top_p=1.0, max_sequences=10**6)
    d64 = {n: v.double() for n, v in delta.items()}
    with torch.no_grad():
        base = entropy_at(m64, d64, 0.0, ids, [1] * 4, **kw)
        curve = delta_h_curve(m64, d64, MULTIPLIERS, ids, [1] * 4, base=base, **kw)
    return {**curve, "base": base}


def sample_e(model, tokenizer, seed: int, rows=ROWS) -> Batch:
    spec = GenerationSpec(T, 1.0, MAX_NEW, batch_size=512, seed=seed)
    tensors = generate_responses(model, tokenizer, rows, spec, progress=False)
    tensors["prompt_index"] = torch.arange(len(rows)) % len(PROMPTS)
    return Batch.from_tensors(tensors, T, 1.0, torch.device("cpu"))


def run_truth(model, tokenizer, E, delta, multipliers, behaviour_is_model=True, fresh_seed=3, max_tokens=4096):
    fresh = truth.FreshSampling(tokenizer, ROWS[: len(E)], GenerationSpec(T, 1.0, MAX_NEW, 512, fresh_seed))
    return truth.estimate_truth(
        model, E, delta, multipliers, max_tokens=max_tokens, behaviour_is_model=behaviour_is_model, fresh=fresh
    )


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_identical(model, before: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p.detach().view(torch.int32), before[n].view(torch.int32)), n


# ---------------------------------------------------------------------------------------------- pure estimators


def test_ratio_estimate_and_ess_by_hand():
    w = torch.tensor([1.0, 2.0, 0.0, 1.0], dtype=torch.float64)
    a = torch.tensor([3.0, 1.0, 7.0, 2.0], dtype=torch.float64)
    b = torch.tensor([2.0, 1.0, 5.0, 3.0], dtype=torch.float64)
    value, psi = ratio_estimate(w.log() + 5.0, a, b)  # weights are scale-free: +5 in log space is no-op
    R = (1 * 3 + 2 * 1 + 1 * 2) / (1 * 2 + 2 * 1 + 1 * 3)
    assert value == pytest.approx(R, rel=1e-14)
    torch.testing.assert_close(psi, w * (a - R * b) / (w * b).mean(), rtol=1e-12, atol=1e-14)
    assert float(psi.sum()) == pytest.approx(0.0, abs=1e-12)
    assert effective_sample_size(w.log()) == pytest.approx(16 / 6)  # (Σw)²/Σw²
    assert effective_sample_size(torch.zeros(7, dtype=torch.float64)) == 7.0
    with pytest.raises(ProbeError, match="every importance weight is 0.*truth.eta_multipliers"):
        truth.target_estimates(torch.full((3,), -math.inf), SeqStats(torch.zeros(3), a[:3], b[:3]))
    # the three targets: (S,1), (S,L), (S/L,1)
    stats = SeqStats(logprob=torch.zeros(4), entropy=a, length=b)
    est = truth.target_estimates(torch.zeros(4, dtype=torch.float64), stats)
    assert est["sequence"][0] == pytest.approx(float(a.mean()))
    assert est["token_mean"][0] == pytest.approx(float(a.sum() / b.sum()))
    assert est["seq_mean_token_mean"][0] == pytest.approx(float((a / b).mean()))


def test_snis_delta_and_its_standard_error_are_calibrated():
    """Synthetic discrete 'responses': E[ΔH estimate] = true ΔH, and mean SE ≈ spread over repeats."""
    gen = torch.Generator().manual_seed(0)
    K, N, reps = 12, 400, 300
    q = torch.softmax(torch.randn(K, generator=gen, dtype=torch.float64), 0)  # behaviour = θ
    p = torch.softmax(q.log() + 0.4 * torch.randn(K, generator=gen, dtype=torch.float64), 0)  # θ'
    S0 = 1 + torch.rand(K, generator=gen, dtype=torch.float64)  # S under θ
    S1 = S0 + 0.3 * torch.randn(K, generator=gen, dtype=torch.float64)  # S under θ' (entropies move too)
    L = torch.randint(1, 5, (K,), generator=gen).double()
    true = (p * S1).sum() / (p * L).sum() - (q * S0).sum() / (q * L).sum()
    values, ses = [], []
    for _ in range(reps):
        y = torch.multinomial(q, N, replacement=True, generator=gen)
        old = ratio_estimate(torch.zeros(N, dtype=torch.float64), S0[y], L[y])
        new = ratio_estimate((p / q).log()[y], S1[y], L[y])
        d = paired_difference(new, old)
        values.append(d["delta_h"])
        ses.append(d["se"])
    values = torch.tensor(values)
    assert abs(float(values.mean() - true)) < 4 * float(values.std()) / math.sqrt(reps)
    assert 0.85 < (sum(ses) / reps) / float(values.std()) < 1.15


def test_quadratic_fit():
    ms = [0.25, 0.5, 1.0, 2.0, 4.0]
    a, b = truth.quadratic_fit(ms, [-3e-3 * m + 2e-4 * m * m for m in ms])
    assert a == pytest.approx(-3e-3, rel=1e-9) and b == pytest.approx(2e-4, rel=1e-9)
    assert truth.quadratic_fit([0.0, 2.0], [0.0, 0.5]) == (0.25, None)
    assert truth.quadratic_fit([0.0], [0.0]) == (None, None)


# ---------------------------------------------------------------------------------------------- on a transformer


@pytest.mark.numerics
def test_zero_step_is_exact_and_parameters_are_restored(model, tokenizer, delta):
    """m = 0: ΔH = 0 exactly with SE 0 (SNIS and fresh) and ESS = N; every parameter bit-identical after."""
    E = sample_e(model, tokenizer, seed=1, rows=ROWS[:64])
    before = snapshot(model)
    r = run_truth(model, tokenizer, E, delta, [0.0, 1.0], max_tokens=100)  # several microbatches
    assert_bit_identical(model, before)
    assert r["restored_exactly"] is True and r["checksum"] == truth.model_checksum(model, list(delta))
    assert r["n_sequences"] == 64 and r["ess_theta"] == 64.0
    assert r["max_abs_logp_diff"] < 1e-4  # teacher forcing reproduces the sampler's log-probs
    zero, one = r["etas"]
    assert zero["ess"] == 64.0
    for t in TARGETS:
        assert zero["snis"][t] == {"delta_h": 0.0, "se": 0.0}
        assert zero["fresh"][t] == {"delta_h": 0.0, "se": 0.0}
        assert one["snis"][t]["delta_h"] != 0.0 and one["fresh"][t]["delta_h"] != 0.0
    assert one["ess"] < 64.0


def test_parameters_are_restored_when_a_pass_fails(model, tokenizer, delta, monkeypatch):
    E = sample_e(model, tokenizer, seed=2, rows=ROWS[:16])
    before = snapshot(model)
    calls = []
    real = Batch.sequence_sums

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # inside the perturbation
            raise RuntimeError("boom")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Batch, "sequence_sums", failing)
    with pytest.raises(RuntimeError, match="boom"):
        truth.estimate_truth(model, E, delta, [1.0], max_tokens=4096, behaviour_is_model=True)
    assert len(calls) == 2
    assert_bit_identical(model, before)


def test_fresh_samples_must_answer_the_e_prompts(model, tokenizer, delta):
    """Fresh samples of other prompts than the E rows' (or another temperature) are refused before any estimate."""
    E = sample_e(model, tokenizer, seed=2, rows=ROWS[:8])
    other = truth.FreshSampling(tokenizer, ROWS[1:9], GenerationSpec(T, 1.0, MAX_NEW, 512, 3))
    with pytest.raises(ProbeError, match="prompts re-tokenised for fresh samples differ"):
        truth.estimate_truth(model, E, delta, [1.0], max_tokens=4096, behaviour_is_model=True, fresh=other)
    hotter = truth.FreshSampling(tokenizer, ROWS[:8], GenerationSpec(2 * T, 1.0, MAX_NEW, 512, 3))
    with pytest.raises(ValueError, match="temperature and top_p"):
        truth.estimate_truth(model, E, delta, [1.0], max_tokens=4096, behaviour_is_model=True, fresh=hotter)


def _assert_agrees_with_exact(r: dict, curve: dict, kinds: tuple[str, ...]) -> None:
    for kind in kinds:  # H(θ) itself
        for t in TARGETS:
            assert abs(r["entropy"][kind][t] - curve["base"][t]) < 4 * r["entropy_se"][kind][t], (kind, t)
    for j, e in enumerate(r["etas"]):
        for t in TARGETS:
            for kind in kinds:
                est = e[kind][t]
                assert abs(est["delta_h"] - curve[t][j]) < 4 * est["se"], (kind, t, e["multiplier"], est, curve[t][j])
    # the test has teeth: at m = 1 the exact ΔH is far from 0 in units of the SEs
    one = r["etas"][MULTIPLIERS.index(1.0)]
    for kind in kinds:
        assert abs(curve["token_mean"][1]) > 8 * one[kind]["token_mean"]["se"]


def test_snis_and_fresh_agree_with_exact(model, tokenizer, delta, exact_curve):
    """θ drew E: SNIS (a) and fresh samples with CRN (b) vs exact ΔH(η), z-tests for every target and η."""
    E = sample_e(model, tokenizer, seed=1)
    r = run_truth(model, tokenizer, E, delta, MULTIPLIERS)
    _assert_agrees_with_exact(r, exact_curve, ("snis", "fresh"))
    for e in r["etas"]:  # (a) and (b) agree with each other
        for t in TARGETS:
            a, b = e["snis"][t], e["fresh"][t]
            assert abs(a["delta_h"] - b["delta_h"]) < 4 * math.hypot(a["se"], b["se"])


def test_snis_reweights_samples_drawn_by_another_policy(model, tokenizer, delta, exact_curve):
    """E drawn by another policy (θ at temperature 2.5): the stored behaviour log-probs make SNIS agree
    with exact again, while treating the samples as θ's own (w(θ) ≡ 1) misses H(θ) by many SEs."""
    rows = PROMPTS * 512
    tensors = generate_responses(
        model, tokenizer, rows, GenerationSpec(2.5, 1.0, MAX_NEW, batch_size=2048, seed=4), progress=False
    )
    tensors["prompt_index"] = torch.arange(len(rows)) % len(PROMPTS)
    E = Batch.from_tensors(tensors, T, 1.0, torch.device("cpu"))  # scored under θ at T, drawn at 2.5
    kw = dict(max_tokens=8192)
    r = truth.estimate_truth(model, E, delta, MULTIPLIERS, behaviour_is_model=False, **kw)
    assert 0.3 * len(rows) < r["ess_theta"] < 0.9 * len(rows)  # the weights at θ are far from 1
    assert r["max_abs_logp_diff"] > 1e-2
    assert all(e["fresh"] is None for e in r["etas"]) and r["entropy"]["fresh"] is None
    _assert_agrees_with_exact(r, exact_curve, ("snis",))
    wrong = truth.estimate_truth(model, E, delta, [1.0], behaviour_is_model=True, **kw)
    for t in TARGETS:
        assert abs(wrong["entropy"]["snis"][t] - exact_curve["base"][t]) > 5 * wrong["entropy_se"]["snis"][t], t


def test_common_random_numbers_couple_the_fresh_samples(model, tokenizer, delta):
    """Same seed under θ and θ + ½Δθ: most responses coincide and the paired SE beats the unpaired one."""
    fresh = truth.FreshSampling(tokenizer, ROWS, GenerationSpec(T, 1.0, MAX_NEW, 512, seed=9))
    a = fresh.draw(model)
    with perturbed(model, delta, 0.5):
        b = fresh.draw(model)
    same = (a["input_ids"] == b["input_ids"]).all(1) if a["input_ids"].shape == b["input_ids"].shape else None
    assert same is not None and same.float().mean() > 0.6
    zeros = torch.zeros(len(ROWS), dtype=torch.float64)
    old = truth.target_estimates(zeros, SeqStats.of_samples(a))["token_mean"]
    new = truth.target_estimates(zeros, SeqStats.of_samples(b))["token_mean"]
    paired = paired_difference(new, old)["se"]
    unpaired = math.hypot(float(old[1].std()), float(new[1].std())) / math.sqrt(len(ROWS))
    assert paired < 0.7 * unpaired


# ---------------------------------------------------------------------------------------------- the stage


def bars_for(delta: dict[str, torch.Tensor]) -> Bars:
    return Bars({n: torch.ones_like(v) for n, v in delta.items()}, delta, 1e-2, "token_mean")


@pytest.fixture(scope="module")
def stage_setup(tmp_path_factory, tokenizer, trainer_checkpoint):
    """A Trainer-layout checkpoint, E samples drawn by it (the sample-e stage), and hand-made delta-h1 outputs."""
    from entropy_probe import checkpoint
    from entropy_probe.params import validate_params
    from stages.sample import run_sample_e

    root = tmp_path_factory.mktemp("truth_stage")
    ckpt = trainer_checkpoint(steps=1, total_steps=2, hidden_size=32)  # shared: read only
    tree = {
        "paths": {k: str(root / k) for k in ("verify", "sample_e", "delta_h1")},
        "checkpoint": {"path": str(ckpt), "dtype": "fp32", "device_map": "cpu"},
        "batch_config": {"dataset_name": "arithmetic:3", "B_E": 24},
        "generation": {"temperature": T, "max_new_tokens": MAX_NEW, "gen_batch_size": 10},
        "compute": {"max_tokens_per_microbatch": 64},
        "truth": {"eta_multipliers": [0.0, 1.0, 2.0], "fresh_samples": True, "seed": 5},
    }
    params = validate_params(tree)
    run_sample_e(params, root / "sample_e")
    paths = checkpoint.resolve_paths(params.checkpoint)
    model = checkpoint.load_policy_model(params.checkpoint, paths)
    g = torch.Generator().manual_seed(1)
    delta = {
        n: 0.05 * p.detach().abs().mean() * torch.randn(p.shape, generator=g)
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    report = delta_h1_report(checkpoint.checkpoint_fingerprint(paths))
    bars_for(delta).write(root / "delta_h1")
    report.write(root / "delta_h1")
    return root, params, report


def test_truth_stage_end_to_end(stage_setup, capsys):
    root, params, report = stage_setup
    plan = truth_stage.run(params, root / "dry", dry_run=True)
    assert not (root / "dry").exists() and plan.startswith("truth plan:")
    assert "m in [0 (0), 1 (0.01), 2 (0.02)]" in plan and "24 E sequences" in plan
    assert "4 teacher-forcing passes" in plan and "4 generate passes" in plan

    line = truth_stage.run(params, root / "truth", dry_run=False)
    assert line.startswith("truth: token_mean ΔH(m·lr) by SNIS m=0: +0.000e+00") and str(root / "truth") in line
    out = json.loads((root / "truth" / "truth.json").read_text())
    assert TruthReport.read(root / "truth").model_dump(mode="json") == out  # the contract reads what it wrote
    for broken in ({k: v for k, v in out.items() if k != "linearity"}, {**out, "target": "tokens"}, {**out, "x": 1}):
        write_json(root / "broken" / "truth.json", broken)
        with pytest.raises(ProbeError, match=r"truth.json is not a valid truth.json .* rerun the truth stage"):
            TruthReport.read(root / "broken")
    for key in (
        "target",
        "learning_rate",
        "delta_h1",
        "se_delta_h1",
        "etas",
        "linearity",
        "targets",
        "n_sequences",
        "restored_exactly",
    ):
        assert key in out, key
    assert out["target"] == "token_mean" and out["learning_rate"] == 1e-2 and out["n_sequences"] == 24
    assert out["delta_h1"] == -2e-3 and out["se_delta_h1"] == 1e-3
    assert out["restored_exactly"] is True and out["same_checkpoint"] is True
    assert "seconds" not in out and "timings" not in out  # a re-run must not change what report depends on
    assert [e["multiplier"] for e in out["etas"]] == [0.0, 1.0, 2.0]
    for e in out["etas"]:
        assert set(e) == {"multiplier", "eta", "delta_h1_pred", "snis", "fresh", "ratio_snis", "ratio_fresh"}
        assert set(e["snis"]) == {"delta_h", "se", "ess", "ess_fraction"} and set(e["fresh"]) == {"delta_h", "se"}
        assert e["eta"] == pytest.approx(e["multiplier"] * 1e-2)
        assert e["delta_h1_pred"] == pytest.approx(e["multiplier"] * -2e-3)
        assert e["snis"]["ess_fraction"] == pytest.approx(e["snis"]["ess"] / 24)
        if e["multiplier"] == 0:
            assert e["snis"]["delta_h"] == 0.0 and e["fresh"]["delta_h"] == 0.0 and e["snis"]["ess"] == 24.0
            assert e["ratio_snis"] is None and e["ratio_fresh"] is None
        else:
            assert e["ratio_snis"] == pytest.approx(e["snis"]["delta_h"] / e["delta_h1_pred"])
            assert e["ratio_fresh"] == pytest.approx(e["fresh"]["delta_h"] / e["delta_h1_pred"])
    lin = out["linearity"]
    a, b = truth.quadratic_fit([0.0, 1.0, 2.0], [e["snis"]["delta_h"] for e in out["etas"]])
    assert lin["delta_h1"] == -2e-3
    assert lin["slope_snis"] == pytest.approx(a) and lin["curvature_snis"] == pytest.approx(b)
    assert lin["slope_fresh"] is not None and lin["curvature_fresh"] is not None
    assert set(out["targets"]) == set(TARGETS)
    tm = out["targets"]["token_mean"]
    assert tm["delta_h_snis"] == [e["snis"]["delta_h"] for e in out["etas"]]
    assert tm["delta_h_fresh"] == [e["fresh"]["delta_h"] for e in out["etas"]]
    assert out["targets"]["sequence"]["delta_h1"] == report.targets["sequence"].delta_h1


def test_truth_stage_refuses_foreign_inputs(stage_setup, tmp_path):
    root, params, report = stage_setup
    out_dir = tmp_path / "truth"
    write_json(out_dir / "truth.json", {"previous": True})
    params = params.model_copy(deep=True)
    params.truth.fresh_samples = False
    other = tmp_path / "delta_h1"
    report.model_copy(update={"checkpoint_fingerprint": "0123456789abcdef"}).write(other)
    (other / "bars.safetensors").write_bytes((root / "delta_h1" / "bars.safetensors").read_bytes())
    params.paths.delta_h1 = str(other)
    with pytest.raises(ProbeError, match="delta_h1.json is for checkpoint 0123456789abcdef"):
        truth_stage.run(params, out_dir, dry_run=False)
    report.write(other)
    bars_for({"nope": torch.zeros(2)}).write(other)
    with pytest.raises(ProbeError, match="'nope', which the model lacks"):
        truth_stage.run(params, out_dir, dry_run=False)
    params.truth.eta_multipliers = []
    with pytest.raises(ProbeError, match="eta_multipliers"):
        truth_stage.run(params, out_dir, dry_run=False)
    assert json.loads((out_dir / "truth.json").read_text()) == {"previous": True}  # nothing half-written
