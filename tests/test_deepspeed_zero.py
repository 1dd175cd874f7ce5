"""The DeepSpeed ZeRO reader against checkpoints written by the real Hugging Face Trainer + DeepSpeed.

The fixtures (tests/fixtures/deepspeed/<run>/, made by tests/fixtures/make_deepspeed_checkpoints.py, which
names the library versions) are 3 steps of the tiny Qwen2 on CPU, one run per ZeRO stage / world size; each
run's checkpoint-2 comes with two references made independently of this reader: what DeepSpeed's
ds_to_universal recovers per parameter, and the live optimizer's state gathered per parameter at save time.
No test trains: reading committed files needs neither deepspeed nor a compiler. Where deepspeed is installed,
one test also runs ds_to_universal now.
"""

from __future__ import annotations

import fractions
import importlib.util
import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from entropy_probe.errors import ProbeError
from entropy_probe.sources.deepspeed_zero import (
    ZeroState,
    find_zero_checkpoint,
    load_deepspeed_file,
    read_zero_state,
)

FIXTURES = Path(__file__).parent / "fixtures" / "deepspeed"
GENERATOR = Path(__file__).parent / "fixtures" / "make_deepspeed_checkpoints.py"
RUNS = ["zero2_w1", "zero2_w2", "zero3_w2", "zero1_w3", "zero3_w3_tied", "zero2_w1_tied", "zero2_w2_bf16"]
PAIR_RUNS = ["zero2_w1", "zero2_w2", "zero3_w2"]  # runs that keep checkpoint-1 beside checkpoint-2
LEARNING_RATE, STEPS = 1e-2, 3  # the generator's linear schedule: step k applies lr (1 - (k-1)/3)
MOMENTS = ("exp_avg", "exp_avg_sq")


def read(run: str, step: int = 2, trust_pickles: bool = False) -> ZeroState:
    files = find_zero_checkpoint(FIXTURES / run / f"checkpoint-{step}")
    assert files is not None
    return read_zero_state(files, trust_pickles)


def state_tensors(state: ZeroState, key: str) -> dict[str, torch.Tensor]:
    return state.master if key == "fp32" else getattr(state, key)


def copy_checkpoint(run: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURES / run / "checkpoint-2", tmp_path / run / "checkpoint-2"))


def resave(path: Path, edit) -> None:
    """Load a ZeRO-3 optimizer file, edit it, save it back. The loss scaler (a stand-in after loading) is dropped:
    the reader does not use it, and pickled anew it would name our stand-in class instead of DeepSpeed's."""
    saved = load_deepspeed_file(path)
    saved["optimizer_state_dict"]["loss_scaler"] = None
    edit(saved["optimizer_state_dict"])
    buffer = io.BytesIO()  # serialise before overwriting: the loaded tensors are memory-mapped from `path`
    torch.save(saved, buffer)
    path.write_bytes(buffer.getvalue())


# ----------------------------------------------------------------------------------------------
# the layout: files, groups, names


def test_finds_stage_world_size_and_rank_files():
    zero3 = find_zero_checkpoint(FIXTURES / "zero3_w3_tied" / "checkpoint-2")
    assert (zero3.stage, zero3.world_size, zero3.tag_dir.name) == (3, 3, "global_step2")
    assert [p.name for p in zero3.model_files] == [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(3)]
    bf16 = find_zero_checkpoint(FIXTURES / "zero2_w2_bf16" / "checkpoint-2")
    assert (bf16.stage, bf16.world_size) == (2, 2)
    assert [p.name for p in bf16.optim_files] == [f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)]
    assert [p.name for p in bf16.model_files] == ["mp_rank_00_model_states.pt"]
    assert find_zero_checkpoint(FIXTURES / "zero1_w3" / "checkpoint-2").stage == 1


def test_not_a_deepspeed_checkpoint_is_none(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert find_zero_checkpoint(tmp_path) is None


@pytest.mark.parametrize("run", RUNS)
def test_groups_are_the_trainers_decay_groups(run):
    """DeepSpeed kept the Trainer's two AdamW groups (decay, then no-decay), each in named_parameters() order;
    every parameter is in exactly one group, a tied lm_head in none (it is embed_tokens)."""
    from entropy_probe.optimizer_state import trainer_param_groups
    from entropy_probe.tiny import build_model

    state = read(run)
    model = build_model(hidden_size=32, num_layers=1, num_heads=4)
    if run.endswith("_tied"):
        model.lm_head.weight = model.model.embed_tokens.weight
        assert state.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    else:
        assert state.tied == {}
    assert [g["names"] for g in state.groups] == trainer_param_groups(model)
    assert state.names == [n for g in state.groups for n in g["names"]]
    assert sorted(state.names) == sorted(state.master) == sorted(n for n, _ in model.named_parameters())
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in state.groups] == [
        (0.1, [0.9, 0.999], 1e-8),
        (0.0, [0.9, 0.999], 1e-8),
    ]
    for name in state.names:
        assert state.master[name].dtype == torch.float32
        assert state.master[name].shape == state.exp_avg[name].shape == state.exp_avg_sq[name].shape


# ----------------------------------------------------------------------------------------------
# (a) DeepSpeed's own converter, (b) the live optimizer


@pytest.mark.parametrize("run", RUNS)
def test_matches_ds_to_universal(run):
    """Bit for bit what ds_to_universal --inject_missing_state recovers from the same files."""
    state = read(run)
    universal = load_file(FIXTURES / run / "reference" / "checkpoint-2.universal.safetensors")
    for name in state.names:
        for key in ("fp32", *MOMENTS):
            assert torch.equal(state_tensors(state, key)[name], universal[f"{key}/{name}"].view_as(state.master[name]))
        if f"step/{name}" in universal:  # ZeRO-1/2 only
            assert state.step[name] == universal[f"step/{name}"].item() == 2
    # ds_to_universal adds a tied alias from the model weights (fp32 only): the same tensor as its target
    for key in universal:
        kind, name = key.split("/", 1)
        if name not in state.master:
            assert kind == "fp32" and torch.equal(universal[key], state.master[state.tied[name]])


@pytest.mark.parametrize("run", ["zero2_w2", "zero3_w3_tied"])
def test_matches_ds_to_universal_run_now(run):
    """The installed DeepSpeed's converter gives what the reader reads (and what the stored reference holds)."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install deepspeed==0.19.8 runs this test; no compiler needed)")
    spec = importlib.util.spec_from_file_location("make_deepspeed_checkpoints", GENERATOR)
    generator = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = generator  # dataclasses look their module up there
    spec.loader.exec_module(generator)
    universal = generator.universal_reference(FIXTURES / run / "checkpoint-2")
    state = read(run)
    for name in state.names:
        for key in ("fp32", *MOMENTS):
            assert torch.equal(state_tensors(state, key)[name], universal[f"{key}/{name}"].view_as(state.master[name]))


@pytest.mark.parametrize("run", RUNS)
def test_matches_the_live_optimizer_at_save_time(run):
    """Bit for bit the state DeepSpeed's safe_get_full_* gathered from the live optimizer when the checkpoint was
    saved; the saved lr is the live group's, i.e. the next step's (step 3 of the linear schedule)."""
    state = read(run)
    path = FIXTURES / run / "reference" / "checkpoint-2.live.safetensors"
    live = load_file(path)
    assert sorted(live) == sorted(f"{key}/{name}" for key in ("fp32", *MOMENTS) for name in state.names)
    for name in state.names:
        for key in ("fp32", *MOMENTS):
            assert torch.equal(state_tensors(state, key)[name], live[f"{key}/{name}"])
    with safe_open(path, "pt") as f:
        live_groups = json.loads(f.metadata()["groups"])
    assert [{k: v for k, v in g.items() if k != "names"} for g in state.groups] == live_groups
    assert [g["lr"] for g in state.groups] == pytest.approx([LEARNING_RATE * (1 - 2 / STEPS)] * 2)


def test_model_safetensors_holds_the_master_in_the_training_dtype():
    """What the Trainer's model.safetensors holds beside the DeepSpeed files: the fp32 master under fp32, its bf16
    rounding under bf16 (not the master), and nothing under ZeRO-3 (no stage3_gather_16bit_weights_on_model_save)."""
    for run, dtype in [("zero2_w2", torch.float32), ("zero2_w2_bf16", torch.bfloat16)]:
        weights = load_file(FIXTURES / run / "checkpoint-2" / "model.safetensors")
        state = read(run)
        for name in state.names:
            assert weights[name].dtype == dtype
            assert torch.equal(weights[name], state.master[name].to(dtype))
    assert not (FIXTURES / "zero3_w2" / "checkpoint-2" / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# (c) world size, (e) consecutive checkpoints


@pytest.mark.parametrize(
    ("base", "other", "step"),
    [
        ("zero2_w1", "zero2_w2", 1),
        ("zero2_w1", "zero2_w2", 2),
        ("zero2_w1", "zero3_w2", 1),
        ("zero2_w1", "zero3_w2", 2),
        ("zero2_w1", "zero1_w3", 2),
        ("zero2_w1_tied", "zero3_w3_tied", 2),
    ],
)
def test_world_size_and_stage_do_not_change_the_state(base, other, step):
    """Same seed, same global batch: the named state agrees across world sizes and stages up to the round-off
    of the cross-rank gradient mean. The moments agree to a few dozen float32 ulps of each tensor's largest entry.
    An Adam step moves an element by about lr, with the direction m/(sqrt(v)+eps) rounding differently only
    where the gradient nearly vanishes (and eps damps it there): the master agrees to 1e-3 of the lr applied."""
    a, b = read(base, step), read(other, step)
    assert a.names == b.names and a.groups == b.groups and a.step == b.step
    float32_eps = torch.finfo(torch.float32).eps
    lr_applied = sum(LEARNING_RATE * (1 - k / STEPS) for k in range(step))
    for name in a.names:
        for key in MOMENTS:
            x, y = getattr(a, key)[name], getattr(b, key)[name]
            assert (x - y).abs().max() <= 128 * float32_eps * x.abs().max(), (name, key)
        assert (a.master[name] - b.master[name]).abs().max() <= 1e-3 * lr_applied, name


@pytest.mark.parametrize("run", PAIR_RUNS)
def test_consecutive_checkpoints_differ_by_one_step(run):
    """checkpoint-2 is checkpoint-1 plus one AdamW step: every weight moved, Adam's step went 1 → 2, and each
    checkpoint stores the lr of its next step (trainer_state.json logs the lr of the step just applied)."""
    first, second = read(run, 1), read(run, 2)
    assert first.names == second.names
    assert set(first.step.values()) == {1.0} and set(second.step.values()) == {2.0}
    for name in first.names:
        assert (second.master[name] - first.master[name]).abs().max() > 0, name
        assert not torch.equal(second.exp_avg[name], first.exp_avg[name]), name
    for step, state in [(1, first), (2, second)]:
        assert [g["lr"] for g in state.groups] == pytest.approx([LEARNING_RATE * (1 - step / STEPS)] * 2)
        logged = json.loads((FIXTURES / run / f"checkpoint-{step}" / "trainer_state.json").read_text())
        assert logged["log_history"][-1]["learning_rate"] == pytest.approx(LEARNING_RATE * (1 - (step - 1) / STEPS))


# ----------------------------------------------------------------------------------------------
# (d) refusals: one line naming the problem and the fix


@pytest.mark.parametrize(
    ("run", "missing", "rank"),
    [
        ("zero3_w2", "zero_pp_rank_1_mp_rank_00_optim_states.pt", 1),
        ("zero3_w3_tied", "zero_pp_rank_2_mp_rank_00_model_states.pt", 2),
        ("zero2_w2_bf16", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", 0),
    ],
)
def test_missing_rank_file_is_named(tmp_path, run, missing, rank):
    ckpt = copy_checkpoint(run, tmp_path)
    (ckpt / "global_step2" / missing).unlink()
    with pytest.raises(ProbeError, match=rf"lacks the .* file of rank {rank}\b.*every data-parallel rank"):
        find_zero_checkpoint(ckpt)


def test_foreign_pickled_type_is_refused_unless_trusted(tmp_path):
    ckpt = copy_checkpoint("zero3_w2", tmp_path)
    resave(
        ckpt / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt",
        lambda sd: sd.update(extra=fractions.Fraction(1, 3)),
    )
    files = find_zero_checkpoint(ckpt)
    with pytest.raises(ProbeError, match=r"pickles fractions\.Fraction.*checkpoint\.trust_pickles: true") as refused:
        read_zero_state(files)
    assert "\n" not in str(refused.value)
    trusted, original = read_zero_state(files, trust_pickles=True), read("zero3_w2")
    for name in original.names:
        assert torch.equal(trusted.master[name], original.master[name])
        assert torch.equal(trusted.exp_avg_sq[name], original.exp_avg_sq[name])


def test_trusted_read_of_the_original_files_needs_no_deepspeed():
    """trust_pickles unpickles fully, still resolving DeepSpeed's types to the reader's stand-ins."""
    trusted, safe = read("zero2_w2", trust_pickles=True), read("zero2_w2")
    assert trusted.groups == safe.groups
    assert all(torch.equal(trusted.master[n], safe.master[n]) for n in safe.names)


def test_state_without_adam_moments_is_refused(tmp_path):
    """e.g. an 8-bit optimizer's quantised state1/state2 instead of exp_avg/exp_avg_sq."""
    ckpt = copy_checkpoint("zero3_w2", tmp_path)

    def eight_bit(sd):
        for flat_state in sd["optimizer_state_dict"]["state"].values():
            flat_state["state1"], flat_state["state2"] = flat_state.pop("exp_avg"), flat_state.pop("exp_avg_sq")

    resave(ckpt / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", eight_bit)
    with pytest.raises(ProbeError, match=r"\['state1', 'state2', 'step'\], not exp_avg and exp_avg_sq .* AdamW"):
        read_zero_state(find_zero_checkpoint(ckpt))


def test_non_finite_moment_is_refused_naming_the_parameter(tmp_path):
    ckpt = copy_checkpoint("zero3_w2", tmp_path)

    def nan_in_group1(sd):  # rank 1's first element of the no-decay group: its half of q_proj.bias
        sd["optimizer_state_dict"]["state"][1]["exp_avg"][0] = float("nan")

    resave(ckpt / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt", nan_in_group1)
    with pytest.raises(ProbeError, match=r"exp_avg of model\.layers\.0\.self_attn\.q_proj\.bias .* NaN/inf"):
        read_zero_state(find_zero_checkpoint(ckpt))


def test_sizes_that_do_not_add_up_are_refused(tmp_path):
    zero3 = copy_checkpoint("zero3_w2", tmp_path)

    def truncate(sd):
        sd["fp32_flat_groups"][0] = sd["fp32_flat_groups"][0][:-1].clone()

    resave(zero3 / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt", truncate)
    with pytest.raises(
        ProbeError, match=r"flat group 0 has \[5631, 5632\] elements.*need 5632: the sizes do not add up"
    ):
        read_zero_state(find_zero_checkpoint(zero3))

    zero2 = copy_checkpoint("zero2_w2", tmp_path)  # rank 0's shard twice: gate_proj gets 1024 elements too many
    tag = zero2 / "global_step2"
    shutil.copy(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(ProbeError, match=r"hold \d+ elements of model\.embed_tokens\.weight.*do not add up"):
        read_zero_state(find_zero_checkpoint(zero2))


def test_truncated_file_is_refused(tmp_path):
    ckpt = copy_checkpoint("zero2_w1", tmp_path)
    optim = ckpt / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:1000])
    with pytest.raises(ProbeError, match=r"is not a readable DeepSpeed checkpoint file"):
        read_zero_state(find_zero_checkpoint(ckpt))
