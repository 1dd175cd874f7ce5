"""`integrations.trl.EntropyProbeCallback` inside a real TRL GRPOTrainer run: it logs the forecast every k steps,
never changes training (bit-identical weights with and without it), and its saved samples reproduce each
logged δH₁ with the offline probe on the checkpoint the trainer saved at that step."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from entropy_probe.demo import build_demo
from entropy_probe.params import DemoParams, Params

RUN = {
    "max_operand": 3,
    "hidden_size": 32,
    "warmup_steps": 40,
    "warmup_lr": 0.003,
    "rl_steps": 5,  # the last step has no next one: not probed
    "save_steps": 1,
    "prompts_per_step": 4,
    "num_generations": 4,
    "lora_rank": 2,
    "rl_lr": 0.01,
}
EVERY = 2


def _probe_params(run: Path) -> Params:
    params = Params()
    params.checkpoint.dtype = "fp32"  # the trainer's dtype, for the offline probe on its checkpoints
    params.batch_config.dataset_name = str(run / "prompts.jsonl")
    params.batch_config.B_E, params.batch_config.B_U = 32, 4
    return params


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same seeded run twice: without the callback, and with it (every 2 steps, saving its samples)."""
    from entropy_probe.integrations.trl import EntropyProbeCallback

    root = tmp_path_factory.mktemp("callback")
    plain, probed = root / "plain", root / "probed"
    build_demo(DemoParams(**RUN), plain, plain)
    callbacks = []

    def attach(trainer):
        callbacks.append(EntropyProbeCallback(trainer, EVERY, _probe_params(probed), save_dir=probed / "probe", seed=7))
        trainer.add_callback(callbacks[0])

    build_demo(DemoParams(**RUN), probed, probed, on_trainer=attach)
    return plain, probed, callbacks[0]


def test_the_callback_never_changes_training(runs):
    plain, probed, _ = runs
    for k in range(1, RUN["rl_steps"] + 1):
        a = load_file(plain / "run" / f"checkpoint-{k}" / "adapter_model.safetensors")
        b = load_file(probed / "run" / f"checkpoint-{k}" / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), f"checkpoint-{k} differs"
        sa = torch.load(plain / "run" / f"checkpoint-{k}" / "optimizer.pt", weights_only=True)["state"]
        sb = torch.load(probed / "run" / f"checkpoint-{k}" / "optimizer.pt", weights_only=True)["state"]
        assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_the_forecast_is_logged_every_k_steps(runs):
    _, probed, callback = runs
    history = json.loads((probed / "run" / "checkpoint-5" / "trainer_state.json").read_text())["log_history"]
    logged = [e for e in history if "entropy_probe/delta_h1" in e]
    assert [e["step"] for e in logged] == [2, 4] == [h["step"] for h in callback.history]
    for e in logged:
        assert {"entropy_probe/se", "entropy_probe/se_E", "entropy_probe/delta_h2", "entropy_probe/entropy"} <= set(e)
        assert e["entropy_probe/se"] > 0 and 0 < e["entropy_probe/entropy"]
    assert any("reward" in e for e in history if e.get("step") == 2), "the trainer's own metrics still logged"
    assert "entropy_probe/observed_delta_h" not in logged[0] and logged[1]["entropy_probe/observed_since"] == 2


def test_the_observed_change_since_the_last_probe_step_agrees_with_enumeration(runs):
    """H(θ(4)) − H(θ(2)) sampled by the callback (fresh responses with common random numbers + SNIS) against the
    exact change over the whole prompt population (float64 enumeration of the saved checkpoints): |z| < 3."""
    import copy

    from entropy_probe.exact import float64_policy
    from entropy_probe.probe import Probe
    from entropy_probe.trajectory import population_of

    _, probed, callback = runs
    params = _probe_params(probed)
    exact = []
    for k in (2, 4):
        probe = Probe.from_checkpoint(probed / "run" / f"checkpoint-{k}", params=params)
        population = population_of(params, probe.tokenizer, probe.model.config.vocab_size, temperature=1.0)
        exact.append(population.entropy(float64_policy(copy.deepcopy(probe.model), set(probe.layout.names))))
    record = callback.history[1]
    z = (record["entropy_probe/observed_delta_h"] - (exact[1] - exact[0])) / record["entropy_probe/observed_se"]
    assert abs(z) < 3, (record, exact)


def test_saved_samples_reproduce_the_logged_delta_h1_offline(runs):
    """The offline probe on checkpoint-k (files the trainer saved after the same step) with the callback's saved
    samples: the same δH₁ up to the importance weights' round-off (the samples' sampler is the live, in-memory
    policy, so the offline probe weights them by π(files)/π(live) = 1 up to float32 kernels)."""
    from entropy_probe.artifacts.samples import Samples
    from entropy_probe.probe import Probe

    _, probed, callback = runs
    for record in callback.history:
        k = record["step"]
        saved = probed / "probe" / f"step-{k}"
        probe = Probe.from_checkpoint(probed / "run" / f"checkpoint-{k}", params=_probe_params(probed))
        E, U = Samples.read(saved / "sample_e", "samples_e"), Samples.read(saved / "sample_u", "samples_u")
        assert U.meta.reward_fn == "trainer: exact_number_reward"  # U scored by the trainer's own reward function
        offline = probe.delta_h1(E, U)
        assert offline.delta_h1 == pytest.approx(record["entropy_probe/delta_h1"], abs=1e-3 * offline.se)
        assert offline.report.update.loss_agg_mode == "token-mean" and offline.report.update.max_grad_norm == 1.0


def test_the_forecast_is_scored_inside_the_run(tmp_path):
    """every = 1 with forecast_draws: from the second probe step on, z of the previous forecast against the change
    observed since, computed from the logged numbers, and its running mean; training still untouched."""
    import math

    from entropy_probe.integrations.trl import EntropyProbeCallback

    run = tmp_path / "forecast"
    callbacks = []

    def attach(trainer):
        callbacks.append(EntropyProbeCallback(trainer, 1, _probe_params(run), seed=3, forecast_draws=4))
        trainer.add_callback(callbacks[0])

    build_demo(DemoParams(**{**RUN, "rl_steps": 4}), run, run, on_trainer=attach)
    h = callbacks[0].history
    assert [r["step"] for r in h] == [1, 2, 3] and all(r["entropy_probe/seconds"] > 0 for r in h)
    assert "entropy_probe/z" not in h[0]
    for before, after in zip(h, h[1:]):
        spread = math.sqrt(before["entropy_probe/forecast_spread"] ** 2 + after["entropy_probe/observed_se"] ** 2)
        z = (after["entropy_probe/observed_delta_h"] - before["entropy_probe/forecast"]) / spread
        assert after["entropy_probe/z"] == pytest.approx(z, rel=1e-12)
    assert h[2]["entropy_probe/z_mean"] == pytest.approx((h[1]["entropy_probe/z"] + h[2]["entropy_probe/z"]) / 2)
    assert "entropy_probe/z_sd" in h[2] and h[0]["entropy_probe/forecast_sd_trainer"] >= 0


def test_a_full_parameter_run_with_a_kl_penalty_is_probed_against_the_trainers_reference(tmp_path):
    """TRL full fine-tuning with beta = 0.5 (its ref_model: the model the run started from): the callback takes the
    trainer's ref_model as the KL reference, and the offline probe on the saved checkpoint with checkpoint.kl_reference
    = the start model reproduces the logged δH₁ — which the KL term moves by far more than the tolerance."""
    from entropy_probe.artifacts.samples import Samples
    from entropy_probe.demo import save_base, train_grpo, warm_base
    from entropy_probe.files import write_text
    from entropy_probe.integrations.trl import EntropyProbeCallback
    from entropy_probe.probe import Probe

    demo = DemoParams(**{**RUN, "finetune": "full", "rl_steps": 3})
    records, tokenizer, model, _ = warm_base(demo)
    write_text(tmp_path / "prompts.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    save_base(model, tokenizer, tmp_path / "base")
    callbacks = []

    def attach(trainer):
        assert trainer.ref_model is not None
        callbacks.append(EntropyProbeCallback(trainer, EVERY, _probe_params(tmp_path), save_dir=tmp_path / "probe"))
        trainer.add_callback(callbacks[0])

    train_grpo(model, tokenizer, records, demo, tmp_path / "run", str(tmp_path / "base"), attach, beta=0.5)
    [record] = callbacks[0].history
    saved = tmp_path / "probe" / f"step-{EVERY}"
    E, U = Samples.read(saved / "sample_e", "samples_e"), Samples.read(saved / "sample_u", "samples_u")
    params = _probe_params(tmp_path)
    params.checkpoint.kl_reference = str(tmp_path / "base")
    params.checkpoint.trust_pickles = True  # the trainer's settings from its training_args.bin (written just now)
    probe = Probe.from_checkpoint(tmp_path / "run" / f"checkpoint-{EVERY}", params=params)
    offline = probe.delta_h1(E, U)
    assert offline.report.update.kl_coef == 0.5
    tolerance = 1e-3 * offline.se  # the importance weights' round-off (see the LoRA test above)
    assert offline.delta_h1 == pytest.approx(record["entropy_probe/delta_h1"], abs=tolerance)
    params.update.kl_coef = 0.0
    without = Probe.from_checkpoint(tmp_path / "run" / f"checkpoint-{EVERY}", params=params).delta_h1(E, U)
    assert abs(without.delta_h1 - offline.delta_h1) > 20 * tolerance  # here: 2.7e-3, 48 tolerances


def test_trainer_rewards_are_the_trainers_weighted_sum():
    """TrainerRewards calls every reward function as TRL does (keyword arguments, the answer column, completion
    ids, the trainer's state) and sums them with the trainer's weights, a None reward left out (NaN in nansum);
    a reward model is refused in one line."""
    from types import SimpleNamespace

    from entropy_probe.errors import ProbeError
    from entropy_probe.integrations.trl import TrainerRewards
    from entropy_probe.task import score_batch

    seen = {}

    def correct(prompts, completions, completion_ids, answer, trainer_state, **_):
        seen.update(prompts=prompts, ids=completion_ids, state=trainer_state)
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    def short(completions, **_):
        return [None if len(c) > 3 else 1.0 for c in completions]

    trainer = SimpleNamespace(
        reward_funcs=[correct, short], reward_weights=[2.0, 0.5], reward_func_names=["correct", "short"], state="s"
    )
    reward = TrainerRewards(trainer, "answer")
    values = score_batch(reward, ["1+1=", "2+2="], ["2", "5 or so"], ["2", "4"], [[7], [8, 9]])
    assert values == [2.0 * 1 + 0.5 * 1, 2.0 * 0]  # the second: correct 0, short None (left out)
    assert seen == {"prompts": ["1+1=", "2+2="], "ids": [[7], [8, 9]], "state": "s"}
    assert reward.name == "trainer: correct + short"
    with pytest.raises(ProbeError, match="reward model"):
        TrainerRewards(SimpleNamespace(reward_funcs=[torch.nn.Linear(1, 1)]), "answer")
    with pytest.raises(ProbeError, match="gave 1 rewards for 2 responses"):
        score_batch(lambda *a: [1.0], ["p", "q"], ["a", "b"], [None, None], [[], []])


# ---------------------------------------------------------------------------------------------- two processes

DDP_RUN = {**RUN, "rl_steps": 3, "prompts_per_step": 2}  # per process: 2 prompts × 4, so 4 prompts per step


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """tests/callback_ddp.py under torchrun (2 processes, DDP, gloo on CPU): the run without and with the callback
    (every step, forecast_draws 4, save_dir)."""
    import subprocess
    import sys

    from test_distributed import HANG_GUARD_S, REPO, free_port

    out = tmp_path_factory.mktemp("callback_ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={free_port()}", "tests/callback_ddp.py", str(out)]
    done = subprocess.run([*cmd, json.dumps(DDP_RUN)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_under_ddp_the_callback_never_changes_training(ddp_runs):
    for k in range(1, DDP_RUN["rl_steps"] + 1):
        a = load_file(ddp_runs / "plain" / "run" / f"checkpoint-{k}" / "adapter_model.safetensors")
        b = load_file(ddp_runs / "probed" / "run" / f"checkpoint-{k}" / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), f"checkpoint-{k} differs"


def test_under_ddp_both_ranks_log_what_the_offline_probe_computes(ddp_runs):
    """Every rank logs the same numbers (the passes split rows and all-reduce), and one process on the checkpoint
    rank 0 saved, with the samples the callback saved, reproduces each logged δH₁, δH₂ and forecast, and the observed
    change since the previous step (fresh responses with the callback's seed, SNIS of E, θ(k−1) from its checkpoint)
    to round-off."""
    from entropy_probe.artifacts.samples import Samples
    from entropy_probe.generation import derive_seed
    from entropy_probe.ground_truth import fresh_sampling
    from entropy_probe.observed_entropy import sampled_delta_h
    from entropy_probe.probe import Probe

    ranks = [json.loads((ddp_runs / f"rank{r}" / "history.json").read_text()) for r in (0, 1)]
    for record in ranks:
        for entry in record:
            entry.pop("entropy_probe/seconds")
    assert ranks[0] == ranks[1] and [e["step"] for e in ranks[0]] == [1, 2]
    params = _probe_params(ddp_runs / "rank0")
    run = ddp_runs / "probed" / "run"
    probes = {k: Probe.from_checkpoint(run / f"checkpoint-{k}", params=params) for k in (1, 2)}
    for record in ranks[0]:
        k, probe = record["step"], probes[record["step"]]
        saved = ddp_runs / "probe" / f"step-{k}"
        E, U = Samples.read(saved / "sample_e", "samples_e"), Samples.read(saved / "sample_u", "samples_u")
        offline = probe.forecast(E, U, 4, n_draws=4, seed=derive_seed(7, "callback draws", k))
        pool = offline.pool.report
        assert pool.delta_h1 == pytest.approx(record["entropy_probe/delta_h1"], abs=1e-3 * pool.se_delta_h1)
        second = pool.second_order
        assert second.delta_h2 == pytest.approx(record["entropy_probe/delta_h2"], abs=1e-3 * second.se_delta_h2)
        f = offline.forecast
        assert f.delta_h == pytest.approx(record["entropy_probe/forecast"], abs=1e-3 * f.se)
    previous, current = (dict(probes[k].model.named_parameters()) for k in (1, 2))
    back = {n: (previous[n] - current[n]).detach() for n in probes[2].layout.names}
    E = Samples.read(ddp_runs / "probe" / "step-2" / "sample_e", "samples_e")
    fresh = fresh_sampling(
        E, probes[2].prompt_set, probes[2].tokenizer, params.generation.gen_batch_size, derive_seed(7, "fresh", 2)
    )
    observed = sampled_delta_h(
        probes[2].model, probes[2].batch(E), back, fresh, target=params.estimator.entropy,
        max_tokens=params.compute.max_tokens_per_microbatch, min_ess_fraction=params.reuse.min_ess_fraction,
    )  # fmt: skip
    logged = ranks[0][1]
    assert -observed.delta_h == pytest.approx(logged["entropy_probe/observed_delta_h"], abs=1e-3 * observed.se)
