"""Checkpoint loading: paths, LoRA/QLoRA model, AdamW state mapped to named parameters, trainer config.

Ground truth is the live optimizer of a real (tiny) training run saved in the Trainer layout
(tests/trainer_ckpt.py): every mapped tensor must equal `optimizer.state[param]` of the parameter
with that name.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from trainer_ckpt import set_base_in_adapter_config, write_trainer_checkpoint  # noqa: E402

from entropy_probe.checkpoint import (  # noqa: E402
    adapter_info,
    checkpoint_fingerprint,
    load_policy_model,
    load_tokenizer,
    resolve_paths,
)
from entropy_probe.errors import ProbeError  # noqa: E402
from entropy_probe.optimizer_state import build_adamw, load_optimizer_state  # noqa: E402
from entropy_probe.params import CheckpointParams  # noqa: E402
from entropy_probe.trainer_config import read_trainer_config  # noqa: E402

# peft mistakes 1-D LoRA-B biases for un-gathered ZeRO-3 shards when saving
pytestmark = pytest.mark.filterwarnings("ignore:.*LoRA tensor.*invalid shape")


def ck_params(path, **kw) -> CheckpointParams:
    return CheckpointParams(path=str(path), dtype="fp32", device_map="cpu", **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """3 of 6 linear-schedule steps, LoRA-B biases (a non-empty no-decay group interleaved in name order)."""
    return write_trainer_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def loaded(trained):
    ck = ck_params(trained.dir)
    paths = resolve_paths(ck)
    model = load_policy_model(ck, paths)
    return paths, model, load_optimizer_state(model, paths)


def live_state(trained) -> dict[str, dict]:
    params = dict(trained.model.named_parameters())
    return {n: trained.optimizer.state[p] for n, p in params.items() if p.requires_grad}


# ---------------------------------------------------------------------------------------------- mapping


def test_mapping_round_trips_every_tensor_to_its_name(trained, loaded):
    _, model, state = loaded
    live = live_state(trained)
    assert sorted(state.names) == sorted(live)  # every trainable parameter, nothing else
    for name in state.names:
        assert torch.equal(state.exp_avg[name], live[name]["exp_avg"]), name
        assert torch.equal(state.exp_avg_sq[name], live[name]["exp_avg_sq"]), name
        assert state.step[name] == float(live[name]["step"]) == 3.0
    # the groups are the Trainer's: LoRA-B biases (no decay) form group 1, weights group 0
    assert all(".bias" not in n for n in state.groups[0]["names"])
    assert state.groups[1]["names"] and all(n.endswith("lora_B.default.bias") for n in state.groups[1]["names"])
    assert [g["weight_decay"] for g in state.groups] == [0.1, 0.0]
    for g, live_g in zip(state.groups, trained.optimizer.param_groups):
        assert g["lr"] == live_g["lr"] and tuple(g["betas"]) == tuple(live_g["betas"]) and g["eps"] == live_g["eps"]
    # non-trivial: optimizer order differs from named_parameters() order, so positional flat mapping is wrong
    assert state.names != [n for n, p in model.named_parameters() if p.requires_grad]


def test_loaded_adapter_equals_trained_weights(trained, loaded):
    _, model, _ = loaded
    live = dict(trained.model.named_parameters())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(torch.equal(p, live[n]) for n, p in trainable.items())
    assert not any(m.training for m in model.modules())  # eval mode: dropout off
    assert all(".default." in n for n in trainable)  # only adapter tensors require grad


def test_build_adamw_takes_the_same_next_step_as_the_live_optimizer(tmp_path):
    """The loaded state reproduces training's next AdamW step (the live optimizer is the reference)."""
    run = write_trainer_checkpoint(tmp_path)  # own run: the live optimizer is stepped below
    ck = ck_params(run.dir)
    paths = resolve_paths(ck)
    model = load_policy_model(ck, paths)
    state = load_optimizer_state(model, paths)
    live = dict(run.model.named_parameters())
    gen = torch.Generator().manual_seed(7)
    grads = {n: torch.randn(p.shape, generator=gen) for n, p in live.items() if p.requires_grad}
    before = {n: live[n].detach().clone() for n in grads}
    for mdl in (run.model, model):
        for n, p in mdl.named_parameters():
            if n in grads:
                p.grad = grads[n].clone()
    run.optimizer.step()
    build_adamw(model, state).step()
    loaded = dict(model.named_parameters())
    for n in grads:
        assert not torch.equal(live[n], before[n])  # the step moved it
        torch.testing.assert_close(loaded[n], live[n], rtol=1e-5, atol=1e-7)


def test_qlora_loads_same_checkpoint_with_same_names_and_state(trained, loaded):
    import bitsandbytes as bnb

    _, lora_model, lora_state = loaded
    ck = ck_params(trained.dir, use_qlora=True)
    paths = resolve_paths(ck)
    qmodel = load_policy_model(ck, paths)
    qstate = load_optimizer_state(qmodel, paths)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in qmodel.modules())
    assert qstate.names == lora_state.names
    assert [n for n, p in qmodel.named_parameters() if p.requires_grad] == [
        n for n, p in lora_model.named_parameters() if p.requires_grad
    ]
    assert all(torch.equal(qstate.exp_avg_sq[n], lora_state.exp_avg_sq[n]) for n in qstate.names)
    # a no-grad pass (sampling) must not switch bitsandbytes to its inference-only CPU kernel:
    # the grad-enabled pass afterwards gives the same logits and gradients reach every adapter tensor
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    with torch.no_grad():
        sampled = qmodel(input_ids=ids).logits
        lora_logits = lora_model(input_ids=ids).logits
    scored = qmodel(input_ids=ids).logits
    torch.testing.assert_close(scored.detach(), sampled, rtol=0, atol=0)
    scored.logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in qmodel.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    # nf4 quantisation changes logits a little, not wholesale
    assert (sampled - lora_logits).abs().max() < 0.2 * lora_logits.abs().max()


def test_bf16_base_loads_with_same_names(trained, loaded):
    _, lora_model, lora_state = loaded
    ck = CheckpointParams(path=str(trained.dir), dtype="bf16", device_map="cpu")
    paths = resolve_paths(ck)
    model = load_policy_model(ck, paths)
    state = load_optimizer_state(model, paths)
    assert state.names == lora_state.names
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    logits.float().logsumexp(-1).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_gradient_checkpointing_engages_with_dropout_off(trained, loaded):
    from transformers.modeling_layers import GradientCheckpointingLayer

    _, plain, _ = loaded
    ck = ck_params(trained.dir, use_checkpointing=True)
    model = load_policy_model(ck, resolve_paths(ck))
    calls = []
    layer = next(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer))
    layer.self_attn.register_forward_hook(lambda *a: calls.append(1))  # inside the checkpointed forward
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.Dropout))
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2]])
    out = {}
    for tag, mdl in (("ckpt", model), ("plain", plain)):
        mdl.zero_grad(set_to_none=True)
        mdl(input_ids=ids).logits.logsumexp(-1).sum().backward()
        out[tag] = {n: p.grad.clone() for n, p in mdl.named_parameters() if p.requires_grad}
    assert len(calls) == 2  # forward + recomputation in backward
    for n in out["plain"]:
        torch.testing.assert_close(out["ckpt"][n], out["plain"][n])


# ---------------------------------------------------------------------------------------------- paths


def test_trainer_layout_paths(trained):
    paths = resolve_paths(ck_params(trained.dir))
    assert paths.weights_dir == trained.dir and paths.optimizer_path == trained.dir / "optimizer.pt"
    assert paths.scheduler_path.name == "scheduler.pt" and paths.trainer_state_path.name == "trainer_state.json"
    assert paths.training_args_path.name == "training_args.bin" and paths.name_map_path is None
    assert Path(paths.base_model) == trained.base_dir


@pytest.mark.parametrize("depth", [1, 2])
def test_weights_dir_with_optimizer_above(trained, tmp_path, depth):
    top = tmp_path / "exp"
    adapter = top / "model" / "adapter" if depth == 2 else top / "adapter"
    adapter.mkdir(parents=True)
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(trained.dir / f, adapter / f)
    shutil.copy(trained.dir / "optimizer.pt", top / "optimizer.pt")
    paths = resolve_paths(ck_params(adapter))
    assert paths.optimizer_path == top / "optimizer.pt" and paths.trainer_state_path is None
    model = load_policy_model(ck_params(adapter), paths)
    state = load_optimizer_state(model, paths)
    live = live_state(trained)
    assert all(torch.equal(state.exp_avg[n], live[n]["exp_avg"]) for n in state.names)


def test_relative_base_resolved_against_checkpoint_dir(trained, tmp_path):
    ckdir = tmp_path / "run" / "checkpoint-3"
    shutil.copytree(trained.dir, ckdir)
    shutil.copytree(trained.base_dir, tmp_path / "base")
    set_base_in_adapter_config(ckdir, "../../base")  # not valid from the cwd (the repo root)
    paths = resolve_paths(ck_params(ckdir))
    assert Path(paths.base_model).resolve() == (tmp_path / "base").resolve()
    # an explicit checkpoint.base_model wins over adapter_config.json
    assert Path(resolve_paths(ck_params(ckdir, base_model=str(trained.base_dir))).base_model) == trained.base_dir


def test_unreachable_hub_id_is_a_probe_error(trained, tmp_path):
    ck = ck_params(trained.dir, base_model="someone/not-in-any-cache-model")
    paths = resolve_paths(ck)
    assert paths.base_model == "someone/not-in-any-cache-model" and not paths.base_is_local
    with pytest.raises(ProbeError, match="hub id.*checkpoint.base_model"):
        load_policy_model(ck, paths)


@pytest.mark.parametrize(
    "setup, pattern",
    [
        ("no_optimizer", r"optimizer\.pt not found.*checkpoint\.optimizer_path"),
        ("no_adapter_config", r"neither a PEFT adapter \(adapter_config\.json\) nor a DeepSpeed .*checkpoint\.path"),
        ("missing_dir", r"checkpoint .* not found.*checkpoint\.path"),
        ("bad_base", r"base model dir .* not found.*checkpoint\.base_model"),
        ("bad_optimizer_path", r"optimizer state .* not found.*checkpoint\.optimizer_path"),
        ("save_only_model", r"optimizer\.pt not found.*checkpoint\.optimizer_path"),  # not the run dir's
        ("deepspeed_lora", r"is a LoRA run under DeepSpeed: its AdamW state is in the ZeRO partitions"),
    ],
)
def test_resolve_errors_name_the_file_and_the_key(trained, tmp_path, setup, pattern):
    ckdir = tmp_path / "run" / "checkpoint-3"
    shutil.copytree(trained.dir, ckdir)
    kw = {}
    if setup == "save_only_model":
        (ckdir / "optimizer.pt").rename(tmp_path / "run" / "optimizer.pt")
    elif setup == "no_optimizer":
        (ckdir / "optimizer.pt").unlink()
    elif setup == "deepspeed_lora":  # the HF Trainer + DeepSpeed + peft: adapter files, a ZeRO tag, no optimizer.pt
        (ckdir / "optimizer.pt").unlink()
        (ckdir / "global_step3").mkdir()
        (ckdir / "latest").write_text("global_step3")
    elif setup == "no_adapter_config":
        (ckdir / "adapter_config.json").unlink()
    elif setup == "missing_dir":
        ckdir = tmp_path / "nope"
    elif setup == "bad_base":
        kw["base_model"] = "no/such/base/dir"
    elif setup == "bad_optimizer_path":
        kw["optimizer_path"] = str(tmp_path / "elsewhere" / "optimizer.pt")
    with pytest.raises(ProbeError, match=pattern) as err:
        resolve_paths(ck_params(ckdir, **kw))
    assert "\n" not in str(err.value)


def test_tokenizer_from_checkpoint_then_base(trained, tmp_path):
    from entropy_probe.tiny import VOCAB

    paths = resolve_paths(ck_params(trained.dir))
    assert load_tokenizer(paths).convert_tokens_to_ids("<eos>") == VOCAB.index("<eos>")
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt"):
        shutil.copy(trained.dir / f, bare / f)
    paths = resolve_paths(ck_params(bare))
    assert load_tokenizer(paths).convert_tokens_to_ids("<pad>") == VOCAB.index("<pad>")


def test_fingerprint_tracks_adapter_and_optimizer_not_weight_bytes(trained, tmp_path):
    ckdir = tmp_path / "ck"
    shutil.copytree(trained.dir, ckdir)
    fp = checkpoint_fingerprint(resolve_paths(ck_params(ckdir)))
    assert fp == checkpoint_fingerprint(resolve_paths(ck_params(trained.dir)))  # content, not location
    sd = torch.load(ckdir / "optimizer.pt", weights_only=True)
    sd["state"][0]["exp_avg"] += 1e-3
    torch.save(sd, ckdir / "optimizer.pt")
    assert checkpoint_fingerprint(resolve_paths(ck_params(ckdir))) != fp


# ---------------------------------------------------------------------------------------------- name maps


def _handmade_optimizer_checkpoint(trained, tmp_path, named: bool):
    """One AdamW group in *reversed* name order (not the Trainer's layout), stepped twice and saved."""
    ck = ck_params(trained.dir)
    model = load_policy_model(ck, resolve_paths(ck))
    pairs = [(n, p) for n, p in model.named_parameters() if p.requires_grad][::-1]
    opt = torch.optim.AdamW(pairs if named else [p for _, p in pairs], lr=1e-3, weight_decay=0.05)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    torch.save(opt.state_dict(), out / "optimizer.pt")
    return out, {n: opt.state[p] for n, p in pairs}, [n for n, _ in pairs]


@pytest.mark.parametrize("form", ["list", "dict"])
def test_name_map_file_is_used(trained, tmp_path, form):
    out, live, order = _handmade_optimizer_checkpoint(trained, tmp_path, named=False)
    with pytest.raises(ProbeError, match="shape"):  # positional guess fails loudly, not silently
        ck = ck_params(out, base_model=str(trained.base_dir))
        paths = resolve_paths(ck)
        load_optimizer_state(load_policy_model(ck, paths), paths)
    (out / "optimizer_param_names.json").write_text(json.dumps(order if form == "list" else {"0": order}))
    ck = ck_params(out, base_model=str(trained.base_dir))
    paths = resolve_paths(ck)
    state = load_optimizer_state(load_policy_model(ck, paths), paths)
    assert state.names == order and "name map" in state.mapping
    assert all(torch.equal(state.exp_avg_sq[n], live[n]["exp_avg_sq"]) for n in order)


def test_param_names_stored_by_torch_are_used(trained, tmp_path):
    out, live, order = _handmade_optimizer_checkpoint(trained, tmp_path, named=True)
    ck = ck_params(out, base_model=str(trained.base_dir))
    paths = resolve_paths(ck)
    state = load_optimizer_state(load_policy_model(ck, paths), paths)
    assert state.names == order and "param_names" in state.mapping
    assert all(torch.equal(state.exp_avg[n], live[n]["exp_avg"]) for n in order)


def test_name_map_with_unknown_name_is_refused(trained, tmp_path):
    ckdir = tmp_path / "ck"
    shutil.copytree(trained.dir, ckdir)
    ck = ck_params(ckdir)
    paths = resolve_paths(ck)
    model = load_policy_model(ck, paths)
    names = load_optimizer_state(model, paths).names  # the real order, then one name corrupted
    assert "lora_A" in names[0]
    names[0] = names[0].replace("lora_A", "lora_Z")
    (ckdir / "optimizer_param_names.json").write_text(json.dumps(names))
    with pytest.raises(ProbeError, match="lora_Z.*not a trainable parameter"):
        load_optimizer_state(model, resolve_paths(ck))


# ---------------------------------------------------------------------------------------------- trainer config


def test_trainer_config_without_pickles(trained, caplog):
    paths = resolve_paths(ck_params(trained.dir))
    with caplog.at_level(logging.INFO, logger="entropy_probe.trainer_config"):
        cfg = read_trainer_config(paths, trust_pickles=False)
    assert all(cfg[k] is None for k in ("loss_type", "temperature", "max_grad_norm", "scale_rewards", "beta"))
    assert cfg["global_step"] == 3 and cfg["learning_rate_last"] == pytest.approx(trained.lr_last)
    assert [
        r for r in caplog.records if "training_args.bin" in r.getMessage() and "trust_pickles: true" in r.getMessage()
    ]


def test_trainer_config_with_pickles(trained):
    cfg = read_trainer_config(resolve_paths(ck_params(trained.dir)), trust_pickles=True)
    a = trained.args
    assert cfg["loss_type"] == a.loss_type == "grpo" and cfg["temperature"] == a.temperature
    assert cfg["top_p"] == a.top_p and cfg["max_grad_norm"] == a.max_grad_norm and cfg["beta"] == a.beta
    assert cfg["scale_rewards"] == a.scale_rewards and cfg["num_generations"] == a.num_generations
    assert cfg["max_completion_length"] == a.max_completion_length and cfg["learning_rate"] == a.learning_rate
    assert cfg["lr_scheduler_type"] == "linear"
    json.dumps(cfg)  # JSON-ready (enums flattened)


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda st: st.update(global_step="3"), r"global_step is '3', not a finite number"),
        (lambda st: st["log_history"][-1].update(learning_rate=None), r"learning_rate is None, not a finite number"),
        (lambda st: st.clear() or st.update(x=1) or None, None),  # no global_step, no log: unknown, not an error
    ],
)
def test_trainer_state_values_are_numbers_or_refused(trained, tmp_path, edit, pattern):
    ckdir = tmp_path / "ck"
    shutil.copytree(trained.dir, ckdir)
    state = json.loads((ckdir / "trainer_state.json").read_text())
    edit(state)
    (ckdir / "trainer_state.json").write_text(json.dumps(state))
    paths = resolve_paths(ck_params(ckdir))
    if pattern is None:
        cfg = read_trainer_config(paths, trust_pickles=False)
        assert cfg["global_step"] is None and cfg["learning_rate_last"] is None
        return
    with pytest.raises(ProbeError, match=pattern + r".*re-save the checkpoint") as err:
        read_trainer_config(paths, trust_pickles=False)
    assert "\n" not in str(err.value)


def test_adapter_info_is_typed_and_a_bad_value_is_refused(trained, tmp_path):
    info = adapter_info(resolve_paths(ck_params(trained.dir)))
    assert (info.rank, info.alpha, info.targets, info.peft_type) == (2, 4, ["q_proj", "v_proj"], "LORA")
    ckdir = tmp_path / "ck"
    shutil.copytree(trained.dir, ckdir)
    cfg = json.loads((ckdir / "adapter_config.json").read_text())
    (ckdir / "adapter_config.json").write_text(json.dumps(dict(cfg, r="two")))
    with pytest.raises(ProbeError, match=r"adapter_config\.json: bad value for 'rank'.*re-save the adapter"):
        adapter_info(resolve_paths(ck_params(ckdir)))
