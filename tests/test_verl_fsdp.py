"""The verl FSDP2 reader against checkpoints written by verl's own FSDPCheckpointManager.

The fixtures (tests/fixtures/verl/<run>/, made by tests/fixtures/make_verl_checkpoints.py, which names the
versions) are 2 GRPO steps of the tiny tied Qwen2 on CPU/gloo, a checkpoint after each: full-parameter runs on
1 and 2 ranks and a LoRA run on 2 ranks. Each checkpoint comes with the live state gathered at save time
(DTensor.full_tensor() of every parameter and moment), independent of this reader. No test trains or launches
torchrun, and verl need not be installed: reading the files needs torch (and numpy) only.
"""

from __future__ import annotations

import fractions
import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from entropy_probe.errors import ProbeError
from entropy_probe.sources.verl_fsdp import VerlState, find_verl_checkpoint, load_verl_file, read_verl_state

FIXTURES = Path(__file__).parent / "fixtures" / "verl"
RUNS = ["full_w1", "full_w2", "lora_w2"]
STEPS = (1, 2)
LEARNING_RATE, SCHEDULE_STEPS = 1e-2, 3  # the generator's cosine schedule without warmup
MOMENTS = ("exp_avg", "exp_avg_sq")
FLOAT32_EPS = torch.finfo(torch.float32).eps


def next_lr(step: int) -> float:
    """The lr verl's cosine schedule sets after `step` optimizer steps: the lr of step + 1."""
    return LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * step / SCHEDULE_STEPS))


def read(run: str, step: int = 2, trust_pickles: bool = False) -> VerlState:
    files = find_verl_checkpoint(FIXTURES / run / f"global_step_{step}")
    assert files is not None
    return read_verl_state(files, trust_pickles)


def copy_actor(run: str, tmp_path: Path, step: int = 2) -> Path:
    return Path(shutil.copytree(FIXTURES / run / f"global_step_{step}" / "actor", tmp_path / run / "actor"))


def resave(path: Path, edit) -> None:
    """Load a verl file (allow-listed), edit it, save it back."""
    saved = load_verl_file(path)
    edit(saved)
    buffer = io.BytesIO()  # serialise before overwriting: the loaded tensors are memory-mapped from `path`
    torch.save(saved, buffer)
    path.write_bytes(buffer.getvalue())


# ----------------------------------------------------------------------------------------------
# finding the files


def test_finds_the_actor_from_the_run_root_the_step_or_the_actor_dir():
    run = FIXTURES / "full_w2"
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    for path in (run, run / "global_step_2", run / "global_step_2" / "actor"):
        files = find_verl_checkpoint(path)
        assert files.actor_dir == run / "global_step_2" / "actor"
        assert (files.fsdp_version, files.world_size) == (2, 2)
        assert [p.name for p in files.model_files] == [f"model_world_size_2_rank_{r}.pt" for r in range(2)]
        assert [p.name for p in files.optim_files] == [f"optim_world_size_2_rank_{r}.pt" for r in range(2)]
        assert [p.name for p in files.extra_files] == [f"extra_state_world_size_2_rank_{r}.pt" for r in range(2)]


def test_not_a_verl_checkpoint_is_none(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert find_verl_checkpoint(tmp_path) is None


def test_tracker_naming_a_missing_step_is_refused(tmp_path):
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(ProbeError, match=r"names step '7', but .*global_step_7/actor is not a directory"):
        find_verl_checkpoint(tmp_path)


# ----------------------------------------------------------------------------------------------
# the state against the live optimizer


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("step", STEPS)
def test_matches_the_live_state_at_save_time(run, step):
    """Bit for bit the fp32 weights and moments gathered from the live module and optimizer when verl saved,
    the same Adam step per parameter, and the scheduler's lr, which is the live group's: the next step's."""
    state = read(run, step)
    path = FIXTURES / run / "reference" / f"global_step_{step}.live.safetensors"
    live = load_file(path)
    assert sorted(state.weights) == sorted(key.split("/", 1)[1] for key in live if key.startswith("weight/"))
    assert sorted(state.names) == sorted(key.split("/", 1)[1] for key in live if key.startswith("exp_avg/"))
    for name, weight in state.weights.items():
        assert weight.dtype == torch.float32 and torch.equal(weight, live[f"weight/{name}"]), name
    for name in state.names:
        for key in MOMENTS:
            assert torch.equal(getattr(state, key)[name], live[f"{key}/{name}"]), (name, key)
        assert state.step[name] == live[f"step/{name}"].item() == step
    with safe_open(path, "pt") as f:
        live_groups, scheduler_lr = json.loads(f.metadata()["groups"]), json.loads(f.metadata()["scheduler_last_lr"])
    assert [{k: v for k, v in g.items() if k != "names"} for g in state.groups] == live_groups
    assert [g["lr"] for g in state.groups] == scheduler_lr == [pytest.approx(next_lr(step))]


@pytest.mark.parametrize("run", RUNS)
def test_one_adamw_group_in_module_order_with_the_tied_head_once(run):
    """verl's one group: weight decay 0.01 on every parameter, betas (0.9, 0.999), eps 1e-8; its names are
    named_parameters() order; lm_head.weight is embed_tokens.weight (a view of its storage in the model file)."""
    from entropy_probe.tiny import build_model

    state = read(run)
    model = build_model(hidden_size=32, num_layers=1, num_heads=4, tie_word_embeddings=True)
    hf_names = [name for name, _ in model.named_parameters()]
    assert [(g["weight_decay"], g["betas"], g["eps"]) for g in state.groups] == [(0.01, [0.9, 0.999], 1e-8)]
    assert state.names == state.groups[0]["names"]
    if run.startswith("full"):
        assert state.tied == {"lm_head.weight": "model.embed_tokens.weight"}
        assert state.names == list(state.weights) == hf_names
        assert state.unstepped == [] and state.lora is None
    else:
        prefix = "base_model.model."
        assert state.tied == {f"{prefix}lm_head.weight": f"{prefix}model.embed_tokens.weight"}
        assert all(".lora_A.default." in n or ".lora_B.default." in n for n in state.names)
        base = [n.replace(".base_layer.", ".").removeprefix(prefix) for n in state.unstepped]
        assert base == hf_names  # the frozen base: in the group, no state


# ----------------------------------------------------------------------------------------------
# world size, consecutive checkpoints


@pytest.mark.parametrize("step", STEPS)
def test_world_size_does_not_change_the_state(step):
    """Same seed, same global batch on 1 and 2 ranks, fp32 compute: the runs differ only in how the gradient is
    summed (one mean over 8 rows, or two means over 4 averaged by the reduce-scatter). The moments agree to a few
    float32 ulps of each tensor's largest entry (measured: 12). A weight moves by about lr per step with the
    direction m/(sqrt(v)+eps), which rounds differently only where the gradient nearly vanishes, so the weights
    agree to 1e-3 of the lr applied (measured: 6e-5)."""
    one, two = read("full_w1", step), read("full_w2", step)
    assert one.names == two.names and one.groups == two.groups and one.step == two.step and one.tied == two.tied
    lr_applied = sum(next_lr(k) for k in range(step))
    for name in one.names:
        for key in MOMENTS:
            x, y = getattr(one, key)[name], getattr(two, key)[name]
            assert (x - y).abs().max() <= 64 * FLOAT32_EPS * x.abs().max(), (name, key)
        assert (one.weights[name] - two.weights[name]).abs().max() <= 1e-3 * lr_applied, name


def adamw_step(theta, exp_avg, exp_avg_sq, step, lr, betas, eps, weight_decay):
    """torch's AdamW update of theta, given the moments after the step (the single-tensor CPU path, op for op)."""
    beta1, beta2 = betas
    decayed = theta * (1 - lr * weight_decay)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    return decayed.addcdiv(exp_avg, denom, value=-lr / (1 - beta1**step))


@pytest.mark.numerics
@pytest.mark.parametrize("run", RUNS)
def test_consecutive_checkpoints_differ_by_one_adamw_step(run):
    """θ(2) is AdamW applied to θ(1) with checkpoint 2's moments and step, and checkpoint 1's lr: checkpoint k
    stores the lr of step k + 1. Bit for bit on this machine; asserted to a few ulps of θ (CPU kernels differ)."""
    first, second = read(run, 1), read(run, 2)
    group = first.groups[0]
    assert first.names == second.names and group["lr"] == pytest.approx(next_lr(1))
    for name in second.names:
        old, new = first.weights[name], second.weights[name]
        expected = adamw_step(
            old, second.exp_avg[name], second.exp_avg_sq[name], second.step[name], group["lr"], group["betas"],
            group["eps"], group["weight_decay"],
        )  # fmt: skip
        assert (new - old).abs().max() > 0, name
        assert ((expected - new).abs() <= 4 * FLOAT32_EPS * (old.abs() + new.abs())).all(), name
    for name in second.unstepped:  # LoRA's frozen base
        assert torch.equal(first.weights[name], second.weights[name]), name


def test_verls_gathered_hf_model_is_the_fp32_weights():
    """With save_contents hf_model verl gathers the weights into huggingface/model.safetensors: fp32, the same
    tensors, the tied head dropped, although the config.json written with it says bfloat16."""
    actor = FIXTURES / "full_w2" / "global_step_2" / "actor"
    state = read("full_w2")
    hf_weights = load_file(actor / "huggingface" / "model.safetensors")
    assert sorted(hf_weights) == sorted(state.weights)
    for name, weight in hf_weights.items():
        assert weight.dtype == torch.float32 and torch.equal(weight, state.weights[name]), name
    assert json.loads((actor / "huggingface" / "config.json").read_text())["dtype"] == "bfloat16"


# ----------------------------------------------------------------------------------------------
# LoRA


def test_lora_adapter_has_peft_names_and_the_meta_files_alpha():
    """The adapter's names are those PEFT saves (its state dict without the `.default` adapter name), with the
    shapes PEFT builds for r 4; r and alpha come from lora_train_meta.json; the frozen base is the seed-0 model."""
    from peft import LoraConfig, TaskType, get_peft_model
    from peft.utils import get_peft_model_state_dict

    from entropy_probe.tiny import build_model

    state = read("lora_w2")
    assert (state.lora.r, state.lora.alpha) == (4, 8.0)
    model = build_model(hidden_size=32, num_layers=1, num_heads=4, tie_word_embeddings=True, seed=0)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules="all-linear")
    peft_model = get_peft_model(model, config)
    peft_saved = get_peft_model_state_dict(peft_model)
    assert sorted(state.lora.adapter) == sorted(peft_saved)
    for peft_name, tensor in state.lora.adapter.items():
        assert tensor.shape == peft_saved[peft_name].shape, peft_name
    assert state.lora.peft_names == {name: name.replace(".default.", ".") for name in state.names}
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert state.names == trainable  # the PeftModel's own names
    for name, p in peft_model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(state.weights[name], p.detach()), name
    assert all(state.lora.adapter[n].abs().max() > 0 for n in state.lora.adapter if ".lora_B." in n)


def test_lora_without_its_meta_file_is_refused(tmp_path):
    actor = copy_actor("lora_w2", tmp_path)
    (actor / "lora_train_meta.json").unlink()
    with pytest.raises(ProbeError, match=r"has no lora_train_meta\.json: its lora_alpha is unknown .*lora_rank"):
        read_verl_state(find_verl_checkpoint(actor))


def test_lora_only_model_files_map_to_the_ids_with_state(tmp_path):
    """checkpoint.save_lora_only keeps only the adapter in the model files; the optimizer still lists every id."""
    actor = copy_actor("lora_w2", tmp_path)
    for rank in range(2):
        path = actor / f"model_world_size_2_rank_{rank}.pt"
        resave(path, lambda sd: [sd.pop(name) for name in list(sd) if "lora_" not in name])
    adapter_only, full = read_verl_state(find_verl_checkpoint(actor)), read("lora_w2")
    assert adapter_only.names == full.names and adapter_only.unstepped == []
    for name in full.names:
        assert torch.equal(adapter_only.weights[name], full.weights[name])
        assert torch.equal(adapter_only.exp_avg_sq[name], full.exp_avg_sq[name])


# ----------------------------------------------------------------------------------------------
# refusals: one line naming the problem and the fix


@pytest.mark.parametrize("missing", ["model_world_size_2_rank_1.pt", "optim_world_size_2_rank_0.pt"])
def test_missing_rank_file_is_named(tmp_path, missing):
    actor = copy_actor("full_w2", tmp_path)
    (actor / missing).unlink()
    with pytest.raises(ProbeError, match=rf"\(world size 2\) lacks {missing} .*every rank writes its own shard"):
        find_verl_checkpoint(actor)


def test_fsdp1_is_refused_with_the_way_out(tmp_path):
    actor = copy_actor("full_w2", tmp_path)
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 1, "world_size": 2}))
    with pytest.raises(ProbeError, match=r"FSDP_version 1.*strategy=fsdp2.*model merger.*not the optimizer moments"):
        find_verl_checkpoint(actor)


def test_foreign_pickled_type_is_refused_unless_trusted(tmp_path):
    actor = copy_actor("full_w2", tmp_path)
    resave(actor / "optim_world_size_2_rank_1.pt", lambda sd: sd.update(extra=fractions.Fraction(1, 3)))
    files = find_verl_checkpoint(actor)
    with pytest.raises(ProbeError, match=r"pickles fractions\.Fraction.*checkpoint\.trust_pickles: true") as refused:
        read_verl_state(files)
    assert "\n" not in str(refused.value)
    trusted, original = read_verl_state(files, trust_pickles=True), read("full_w2")
    for name in original.names:
        assert torch.equal(trusted.weights[name], original.weights[name])
        assert torch.equal(trusted.exp_avg[name], original.exp_avg[name])


def test_numpy_rng_state_passes_the_allow_list():
    """extra_state pickles numpy's RNG state; the allow-list reads it without trust, as numpy objects."""
    extra = load_verl_file(FIXTURES / "full_w2" / "global_step_2" / "actor" / "extra_state_world_size_2_rank_1.pt")
    assert extra["rng"]["numpy"][0] == "MT19937" and extra["rng"]["numpy"][1].shape == (624,)
    assert extra["lr_scheduler"]["_last_lr"] == [pytest.approx(next_lr(2))]


def test_eight_bit_state_is_refused(tmp_path):
    """bitsandbytes' AdamW8bit keeps state1/state2 (quantised), not exp_avg/exp_avg_sq."""
    actor = copy_actor("full_w2", tmp_path)

    def eight_bit(sd):
        for state in sd["state"].values():
            state["state1"], state["state2"] = state.pop("exp_avg"), state.pop("exp_avg_sq")

    resave(actor / "optim_world_size_2_rank_0.pt", eight_bit)
    with pytest.raises(ProbeError, match=r"\['state1', 'state2', 'step'\], not exp_avg, exp_avg_sq and step .*AdamW"):
        read_verl_state(find_verl_checkpoint(actor))


def test_low_precision_moments_are_refused(tmp_path):
    """torchao's low-bit AdamW variants keep moments in another dtype (or a tensor subclass, refused unpickling)."""
    actor = copy_actor("full_w2", tmp_path)

    def bf16_moments(sd):
        for state in sd["state"].values():
            state["exp_avg"] = state["exp_avg"].to(torch.bfloat16)

    resave(actor / "optim_world_size_2_rank_1.pt", bf16_moments)
    with pytest.raises(ProbeError, match=r"exp_avg of model\.embed_tokens\.weight is .*bfloat16.*not float32"):
        read_verl_state(find_verl_checkpoint(actor))


def test_non_finite_moment_is_refused_naming_the_parameter(tmp_path):
    actor = copy_actor("full_w2", tmp_path)

    def nan_in_norm(sd):  # id 13: model.norm.weight, rank 1's half
        sd["state"][13]["exp_avg_sq"].to_local()[0] = float("nan")

    resave(actor / "optim_world_size_2_rank_1.pt", nan_in_norm)
    with pytest.raises(ProbeError, match=r"exp_avg_sq of model\.norm\.weight .* NaN/inf"):
        read_verl_state(find_verl_checkpoint(actor))


def test_sizes_that_do_not_add_up_are_refused(tmp_path):
    actor = copy_actor("full_w2", tmp_path)

    def truncate(sd):  # rank 1's half of the final norm loses an element
        sd["model.norm.weight"]._local_tensor = sd["model.norm.weight"].to_local()[:-1].clone()

    resave(actor / "model_world_size_2_rank_1.pt", truncate)
    with pytest.raises(ProbeError, match=r"pieces of model\.norm\.weight join to \(31,\), its shape is \(32,\)"):
        read_verl_state(find_verl_checkpoint(actor))

    actor = copy_actor("lora_w2", tmp_path / "lora")
    (actor / "lora_train_meta.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    with pytest.raises(ProbeError, match=r"has rank 4, .* records r 8: the sizes do not add up"):
        read_verl_state(find_verl_checkpoint(actor))


def test_optimizer_of_another_model_is_refused(tmp_path):
    actor = copy_actor("full_w1", tmp_path)
    optim = actor / "optim_world_size_1_rank_0.pt"
    resave(optim, lambda sd: sd["param_groups"][0]["params"].pop())  # id 13 keeps its state, no group lists it
    with pytest.raises(ProbeError, match=r"lists 13 parameters \(14 with state\), the model file holds 14 .*add up"):
        read_verl_state(find_verl_checkpoint(actor))

    def one_more(sd):  # a 15th parameter with state: another model's optimizer
        sd["param_groups"][0]["params"].append(14)
        sd["state"][14] = sd["state"][13]

    actor = copy_actor("full_w1", tmp_path / "more")
    resave(actor / "optim_world_size_1_rank_0.pt", one_more)
    with pytest.raises(ProbeError, match=r"lists 15 parameters \(15 with state\), the model file holds 14"):
        read_verl_state(find_verl_checkpoint(actor))


def test_scheduler_and_optimizer_disagreeing_on_the_lr_is_refused(tmp_path):
    actor = copy_actor("full_w1", tmp_path)
    resave(actor / "extra_state_world_size_1_rank_0.pt", lambda sd: sd["lr_scheduler"].update(_last_lr=[0.5]))
    with pytest.raises(ProbeError, match=r"scheduler's last lr \[0\.5\] is not the optimizer's group lr"):
        read_verl_state(find_verl_checkpoint(actor))


def test_truncated_file_is_refused(tmp_path):
    actor = copy_actor("full_w1", tmp_path)
    optim = actor / "optim_world_size_1_rank_0.pt"
    optim.write_bytes(optim.read_bytes()[:1000])
    with pytest.raises(ProbeError, match=r"is not a readable verl checkpoint file"):
        read_verl_state(find_verl_checkpoint(actor))
