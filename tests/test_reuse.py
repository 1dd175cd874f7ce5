"""Cached sample reuse: samples drawn by one checkpoint, δH₁ probed at another (importance-weighted)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import copy_demo_repo, make_lora_model, repo_env
from test_delta_h1 import MAX_NEW, PROMPTS, TEMPERATURE, adam_state, directional, sample_batch, sample_u
from test_readme import untracked_reads
from typer.testing import CliRunner

from entropy_probe.delta_h1 import compute_delta_h1
from entropy_probe.enumeration import exact_gradients
from entropy_probe.errors import ProbeError
from entropy_probe.importance import Reuse, importance_weights, reuse_weights
from entropy_probe.params import EstimatorParams
from entropy_probe.specs import ComputeBudget
from entropy_probe.update_rule import UpdateRule
from stages.cli import app

REPO = Path(__file__).resolve().parents[1]


def peaked_model(seed: int, lora_shift: float = 0.0):
    """The test_delta_h1 model (peaked policy); `lora_shift` moves the adapter to make 'another checkpoint'."""
    torch.manual_seed(0)
    model = make_lora_model(seed=3, rank=2, head_scale=40.0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(lora_shift * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.numerics
def test_same_checkpoint_weights_are_one_and_change_nothing(tokenizer):
    """Explicit uniform weights reproduce the unweighted computation (the plain path forms no weights)."""
    model = peaked_model(0)
    E = sample_batch(model, tokenizer, PROMPTS * 8, seed=1)
    U = sample_u(model, tokenizer, n_groups=4, G=4, seed=2)
    layout, state = adam_state(model)
    spec = UpdateRule("adam_step", state, "token-mean", max_grad_norm=1.0)
    plain = compute_delta_h1(model, E, U, layout, spec, EstimatorParams(), ComputeBudget(4096))
    ones = compute_delta_h1(
        model,
        E,
        U,
        layout,
        spec,
        EstimatorParams(),
        ComputeBudget(4096),
        Reuse(torch.full((len(E),), 1 / len(E)), torch.ones(len(U))),
    )
    for key in ("delta_h1", "se_E", "se_U", "entropy"):
        if getattr(plain, key) is None:  # SE_U when fewer than 2 groups have non-zero advantage
            assert getattr(ones, key) is None, key
            continue
        assert getattr(ones, key) == pytest.approx(getattr(plain, key), rel=1e-9, abs=1e-15), key
    # and re-scoring under the sampler itself gives log-ratios ~0, i.e. ESS = N
    log_ratio = E.rescore(model, 4096)
    assert log_ratio.abs().max() < 1e-4
    assert importance_weights(log_ratio)[1] == pytest.approx(len(E), rel=1e-6)


def test_reweighted_delta_h1_matches_exact_at_the_probed_checkpoint(tokenizer):
    """Samples from checkpoint A, probed at B: the weighted δH₁ agrees with B's exact ∇H·Δθ (z-test)."""
    sampler, probed = peaked_model(0), peaked_model(7, lora_shift=0.008)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    _, grads, _ = exact_gradients(
        probed,
        ids,
        [1.0] * len(ids),
        eos_id=tokenizer.eos_token_id,
        max_new_tokens=MAX_NEW,
        temperature=TEMPERATURE,
        top_p=1.0,
        max_sequences=100_000,
    )
    layout, state = adam_state(probed)
    zs, fractions = [], []
    for seed in range(3):
        E = sample_batch(sampler, tokenizer, PROMPTS * 64, seed=40 + seed)
        U = sample_u(sampler, tokenizer, n_groups=8, G=4, seed=50 + seed)
        reuse = reuse_weights(probed, {"E": E, "U": U}, {"E": "A", "U": "A"}, 4096, min_ess_fraction=0.1, force=False)
        fractions.append(reuse.ess["E"] / len(E))
        r = compute_delta_h1(
            probed,
            E,
            U,
            layout,
            UpdateRule("adam_step", state, "token-mean", max_grad_norm=1.0),
            EstimatorParams(),
            ComputeBudget(4096),
            reuse,
        )
        for t, res in r.targets.items():
            zs.append((res.delta_h1 - directional(grads[t], layout.unflatten(r.delta_theta))) / res.se_E)
    assert 0.2 < min(fractions) and max(fractions) < 0.999  # a real reweighting, not a trivial one
    assert max(abs(z) for z in zs) < 4, zs


def test_reuse_weights_reweight_only_foreign_batches_and_refuse_a_low_ess(tokenizer):
    """Only the batches another checkpoint drew are re-scored (their statistics replaced by the probed policy's)
    and weighted: E by w (sum 1), U by N·w (mean 1); an ESS/N below the floor is refused unless forced."""
    sampler, probed = peaked_model(0), peaked_model(7, lora_shift=0.008)
    E = sample_batch(sampler, tokenizer, PROMPTS * 16, seed=60)
    U = sample_u(sampler, tokenizer, n_groups=4, G=4, seed=61)
    e_before, u_before = E.tensors["entropies"].clone(), U.tensors["entropies"].clone()
    reuse = reuse_weights(probed, {"E": E, "U": U}, {"U": "A"}, 4096, min_ess_fraction=0.0, force=False)
    assert reuse.e_weights is None and set(reuse.ess) == {"U"} and torch.equal(E.tensors["entropies"], e_before)
    assert not torch.equal(U.tensors["entropies"], u_before)  # re-scored under the probed checkpoint
    assert reuse.u_weights.sum().item() == pytest.approx(len(U), rel=1e-12)
    assert reuse.ess["U"] == pytest.approx(float(reuse.u_weights.sum() ** 2 / (reuse.u_weights**2).sum()), rel=1e-12)
    fraction = reuse.ess["U"] / len(U)
    assert fraction < 0.999
    with pytest.raises(ProbeError, match=r"the E samples \(drawn by checkpoint A\) have ESS/N = .* reuse.force"):
        reuse_weights(probed, {"E": E, "U": U}, {"E": "A"}, 4096, min_ess_fraction=0.9999, force=False)
    E = sample_batch(sampler, tokenizer, PROMPTS * 16, seed=60)  # re-scoring replaced the behaviour log-probs
    forced = reuse_weights(probed, {"E": E, "U": U}, {"E": "A"}, 4096, min_ess_fraction=0.9999, force=True)
    assert forced.ess["E"] / len(E) < 0.9999 and forced.u_weights is None
    assert forced.e_weights.sum().item() == pytest.approx(1.0, rel=1e-12)


@pytest.mark.slow
@pytest.mark.e2e
def test_adding_a_checkpoint_runs_only_its_own_stages(demo_pipeline, tmp_path, monkeypatch):
    """dvc in a copy of the repo after a run of the pipeline (conftest's demo_pipeline, probing step6): adding a
    probed checkpoint re-runs no sampling stage (and its importance-weighted δH₁ reads only params dvc.yaml
    tracks), and a far-away checkpoint is refused for low ESS unless forced."""
    first = (demo_pipeline / "repro.log").read_text()
    assert "Running stage 'sample-e'" in first and "Running stage 'delta-h1@step6'" in first
    repo = copy_demo_repo(demo_pipeline, tmp_path / "repo")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert list(params["probe"]["checkpoints"]) == ["step6"]
    reads = tmp_path / "params_reads.jsonl"  # outside the repo: no stage owns it
    env = repo_env(ENTROPY_PROBE_RECORD_PARAMS=str(reads))

    def dvc(*args: str) -> str:
        out = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    params["probe"]["checkpoints"]["step4"] = "data/demo/run/checkpoint-4"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = dvc("repro", "delta-h1@step6", "delta-h1@step4")
    assert "Running stage 'verify@step4'" in second and "Running stage 'delta-h1@step4'" in second
    for stage in ("demo", "sample-e", "sample-u", "verify@step6", "delta-h1@step6"):
        assert f"Running stage '{stage}'" not in second, (stage, second)
    reuse = yaml.safe_load((repo / "data/probe/step4/delta_h1/delta_h1.json").read_text())["reuse"]
    assert reuse["weighted"] and 0 < reuse["ess_fraction_E"] < 1
    records = [json.loads(line) for line in reads.read_text().splitlines()]
    assert [r["stage"] for r in records] == ["verify", "delta-h1"]
    assert any(key.startswith("reuse.") for key in records[1]["reads"])  # the weighted path read its settings
    missing = untracked_reads(records)
    assert not missing, f"params read but not listed in dvc.yaml: {sorted(missing)}"

    # the same probe with a stricter ESS threshold is refused: one line, exit 2, nothing written (the console
    # script's command run in this process, in the repository: a fresh interpreter would only add its imports)
    monkeypatch.chdir(repo)
    step4 = ["-S", "checkpoint.path=data/demo/run/checkpoint-4", "-S", "paths.verify=data/probe/step4/verify"]
    out = CliRunner().invoke(app, ["delta-h1", *step4, "-S", "reuse.min_ess_fraction=0.9999", "--out", "strict"])
    assert out.exit_code == 2 and "ESS/N" in out.stderr and "reuse.force" in out.stderr
    assert len([line for line in out.stderr.splitlines() if "error" in line]) == 1
    assert not (repo / "strict").exists()
