"""The demo stage: determinism, the real Trainer checkpoint layout, round-trips, dry-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL_DEMO
from safetensors.torch import load_file

from entropy_probe import demo
from entropy_probe.artifacts.demo import DemoReport
from entropy_probe.errors import ProbeError
from entropy_probe.outputs import MANIFEST
from entropy_probe.params import Params, validate_params
from entropy_probe.task import make_arithmetic_prompts
from stages import demo as demo_stage

# What a transformers/TRL Trainer `checkpoint-N/` holds for a PEFT model (single process)
TRAINER_FILES = [
    "adapter_model.safetensors",
    "adapter_config.json",
    "optimizer.pt",
    "scheduler.pt",
    "trainer_state.json",
    "training_args.bin",
    "rng_state.pth",
]
SMALL = SMALL_DEMO  # conftest's small_demo fixture builds it once per test run


def small_params(**overrides) -> Params:
    return validate_params({"demo": {**SMALL, **overrides}})


@pytest.fixture(scope="module")
def two_runs(small_demo, tmp_path_factory) -> tuple[Path, Path]:
    """The session's small demo and a second, independent build of the same params (for determinism)."""
    out = tmp_path_factory.mktemp("demo") / "b" / "demo"
    summary = demo_stage.run(small_params(), out, dry_run=False)
    # the stage's one-line result (the CLI prints it)
    assert summary.startswith("demo: reward rate ") and f"-> {out} (" in summary and "\n" not in summary
    return small_demo, out


def _optimizer_tensors(path: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(path, weights_only=True)
    return {f"{i}.{k}": v for i, state in sd["state"].items() for k, v in state.items()}


def test_layout_is_a_trainer_checkpoint(two_runs):
    out = two_runs[0]
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "base", "demo.json", "prompts.jsonl", "run"])
    assert not list(out.parent.glob(".*"))  # the staging dir is gone
    ckpts = sorted(p.name for p in (out / "run").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-1", "checkpoint-2"]
    for step, name in enumerate(ckpts, start=1):
        ckpt = out / "run" / name
        for f in TRAINER_FILES:
            assert (ckpt / f).is_file(), f"{name}/{f} missing"
        adapter_config = json.loads((ckpt / "adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == str(out / "base")  # final dir, not the staging dir
        assert adapter_config["r"] == SMALL["lora_rank"] and adapter_config["peft_type"] == "LORA"
        state = json.loads((ckpt / "trainer_state.json").read_text())
        assert state["global_step"] == step and state["max_steps"] == SMALL["rl_steps"]
        opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
        steps = {float(s["step"]) for s in opt["state"].values()}
        assert steps == {float(step)}
        # linear schedule, no warm-up: the stored lr is the one for the NEXT step
        expected_lr = SMALL["rl_lr"] * (1 - step / SMALL["rl_steps"])
        assert all(g["lr"] == pytest.approx(expected_lr) for g in opt["param_groups"])
        n_state = sum(len(g["params"]) for g in opt["param_groups"])
        assert n_state == len(load_file(ckpt / "adapter_model.safetensors")) == len(opt["state"])


def test_demo_json_counts(two_runs):
    out = two_runs[0]
    info = json.loads((out / "demo.json").read_text())
    adapter = load_file(out / "run" / "checkpoint-2" / "adapter_model.safetensors")
    base = load_file(out / "base" / "model.safetensors")
    assert info["n_trainable"] == sum(t.numel() for t in adapter.values())
    assert info["n_params"] == sum(t.numel() for t in base.values())
    assert info["n_prompts"] == 16 and info["vocab_size"] == 16
    assert info["checkpoints"] == [str(out / "run" / f"checkpoint-{s}") for s in (1, 2)]
    assert 0.0 <= info["reward_rate_base"] <= 1.0 and 0.0 <= info["reward_rate_final"] <= 1.0
    prompts = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert prompts == make_arithmetic_prompts(3)
    report = DemoReport.read(out)  # written through the contract
    assert report.model_dump(mode="json") == info
    assert report.grpo.optim == "adamw_torch" and report.grpo.lr_scheduler_type == "linear"
    assert report.params == small_params().demo and report.grpo.learning_rate == SMALL["rl_lr"]


def test_demo_json_malformed_is_one_line(two_runs, tmp_path):
    info = json.loads((two_runs[0] / "demo.json").read_text())
    info["grpo"]["num_generations"] = "two"
    (tmp_path / "demo.json").write_text(json.dumps(info))
    with pytest.raises(ProbeError, match=r"demo\.json is not a valid .*grpo\.num_generations.*rerun the demo stage"):
        DemoReport.read(tmp_path)


def test_two_runs_are_identical(two_runs):
    a, b = two_runs
    tensor_files = ["base/model.safetensors"] + [f"run/checkpoint-{s}/adapter_model.safetensors" for s in (1, 2)]
    for rel in tensor_files:
        ta, tb = load_file(a / rel), load_file(b / rel)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{rel}:{k}"
    for step in (1, 2):
        oa = _optimizer_tensors(a / "run" / f"checkpoint-{step}" / "optimizer.pt")
        ob = _optimizer_tensors(b / "run" / f"checkpoint-{step}" / "optimizer.pt")
        assert oa.keys() == ob.keys()
        for k in oa:
            assert torch.equal(oa[k], ob[k]), k
    ja, jb = (json.loads((d / "demo.json").read_text()) for d in (a, b))
    assert ja["reward_rate_base"] == jb["reward_rate_base"] and ja["reward_rate_final"] == jb["reward_rate_final"]


def _assert_same_sampled_rate(rate: float, reported: float, n_samples: int) -> None:
    """A reward rate re-sampled with the same seed by a model reloaded from disk, against the reported one.

    The reloaded model computes the same probabilities only up to float32 rounding (its tensors are new,
    and the kernels' rounding depends on layout and CPU). A draw whose uniform number falls within that
    rounding (~1e-7) of a category boundary can pick another token and so another response: at most one
    such sample among n is expected, so the rates may differ by one sample's reward (0 or 1), 1/n.
    """
    assert abs(rate * n_samples - round(rate * n_samples)) < 1e-9  # a mean of n rewards in {0, 1}
    assert abs(rate - reported) <= 1 / n_samples, (rate, reported)


@pytest.mark.numerics
def test_the_adapter_trained_and_reloads_to_the_reported_policy(two_runs):
    """base + last adapter loaded from disk (as the verify stage will) reproduce demo.json's reward rates."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = two_runs[0]
    info = json.loads((out / "demo.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out / "base")
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    assert base.config._attn_implementation == "eager" and base.dtype == torch.float32
    records = make_arithmetic_prompts(3)
    n = info["reward_rate_samples"]
    assert n == len(records) * demo.EVAL_SAMPLES_PER_PROMPT
    rate = demo.reward_rate(base, tokenizer, records, demo.EVAL_SAMPLES_PER_PROMPT, demo.EVAL_SEED)
    _assert_same_sampled_rate(rate, info["reward_rate_base"], n)
    policy = PeftModel.from_pretrained(base, out / "run" / "checkpoint-2").eval()
    lora_b = [p for n, p in policy.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at 0: non-zero means RL moved it
    rate = demo.reward_rate(policy, tokenizer, records, demo.EVAL_SAMPLES_PER_PROMPT, demo.EVAL_SEED)
    _assert_same_sampled_rate(rate, info["reward_rate_final"], n)


def test_default_warmup_leaves_room_for_rl():
    """The default warm-up makes the policy right sometimes, not always, at temperature 1."""
    from entropy_probe.tiny import build_model, build_tokenizer

    p = Params().demo
    tokenizer = build_tokenizer()
    model = build_model(hidden_size=p.hidden_size, num_layers=p.num_layers, num_heads=p.num_heads, seed=p.seed)
    records = make_arithmetic_prompts(p.max_operand)
    torch.manual_seed(p.seed)
    demo.warmup(model, demo.sft_batch(tokenizer, records), p.warmup_steps, p.warmup_lr)
    rate = demo.reward_rate(model, tokenizer, records, demo.EVAL_SAMPLES_PER_PROMPT, demo.EVAL_SEED)
    assert 0.3 <= rate <= 0.7


def test_sft_labels_cover_answer_and_eos_only(tokenizer):
    records = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "9+9=", "answer": "18"}]
    batch = demo.sft_batch(tokenizer, records)
    eos = tokenizer.eos_token_id
    for i, r in enumerate(records):
        labelled = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert labelled == tokenizer.encode(r["answer"]) + [eos]
        n = int(batch["attention_mask"][i].sum())
        assert tokenizer.decode(batch["input_ids"][i, :n]) == r["prompt"] + r["answer"] + tokenizer.eos_token


def test_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "sub" / "demo"
    printed = demo_stage.run(Params(), out, dry_run=True)
    assert not (tmp_path / "sub").exists()
    assert printed.startswith("demo plan:")
    assert "n_prompts: 100" in printed
    for step in range(1, 14):  # a checkpoint every step (the trajectory scores each one)
        assert str(out / "run" / f"checkpoint-{step}") in printed


def test_checkpoint_steps_include_the_last():
    assert demo.checkpoint_steps(Params().demo) == list(range(1, 14))
    assert demo.checkpoint_steps(small_params(rl_steps=5, save_steps=2).demo) == [2, 4, 5]


def test_bad_shapes_are_refused(tmp_path):
    with pytest.raises(ProbeError, match="num_heads"):
        demo_stage.run(small_params(hidden_size=30, num_heads=4), tmp_path / "x", dry_run=True)
    assert not (tmp_path / "x").exists()


def test_cli_dry_run(tmp_path):
    from typer.testing import CliRunner

    from stages.cli import app

    out = tmp_path / "cli_demo"
    args = ["demo", "--params", "params.yaml", "-S", "demo.rl_steps=4", "--out", str(out), "--dry-run"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(out / "run" / "checkpoint-4") in result.output and "checkpoint-6" not in result.output
    assert not out.exists()


def test_shipped_demo_saves_every_step_and_probes_moving_checkpoints():
    """params.yaml's demo keeps a checkpoint every step (>= 12 observed steps for the trajectory stage), and every
    probed checkpoint still has a step to take (a linear schedule's last checkpoint has next lr 0)."""
    from entropy_probe.params import load_params

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    steps = demo.checkpoint_steps(params.demo)
    assert steps == list(range(1, params.demo.rl_steps + 1)) and len(steps) - 1 >= 12
    for c in params.probe.checkpoints:
        step = int(Path(c.path).name.removeprefix("checkpoint-"))
        assert step in steps and step < params.demo.rl_steps, c
    assert params.trajectory.run_dir == f"{params.demo.out_dir}/run"
