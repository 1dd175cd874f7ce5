"""Sampling: behaviour statistics equal teacher forcing, nucleus respected, plans, artifacts, stages."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_lora_model

from entropy_probe import files
from entropy_probe.artifacts.samples import TOKEN_KEYS, Samples, SamplesMeta, response_mask
from entropy_probe.errors import ProbeError
from entropy_probe.generation import (
    GenerationSpec,
    _response_lengths,
    generate_responses,
    plan_e,
    plan_u,
    resolve_scale,
    resolve_temperature,
)
from entropy_probe.policy import teacher_force, top_p_keep_mask
from entropy_probe.tiny import EOS, build_tokenizer

PROMPTS = [f"{a}+{b}=" for a in range(10) for b in range(0, 10, 3)]  # 40 prompts, lengths 4
PROMPTS = PROMPTS[:30] + [f"1{a}+2{a}=" for a in range(10)]  # plus 10 longer ones → left padding
MAX_NEW = 12  # random tiny model: P(eos) ≈ 1/16 per step, so about half the rows stop, half are truncated


def _generate(
    model,
    tokenizer,
    temperature=1.0,
    top_p=1.0,
    prompts=PROMPTS,
    *,
    batch_offset=0,
    max_new_tokens=MAX_NEW,
    batch_size=16,
    seed=7,
    stop=None,
):
    spec = GenerationSpec(temperature, top_p, max_new_tokens, batch_size, seed, stop)
    return generate_responses(model, tokenizer, prompts, spec, progress=False, batch_offset=batch_offset)


def _split(out):
    R = out["logprobs"].shape[1]
    return out["input_ids"].shape[1] - R, R


def _assert_layout(out, eos: int, stop_ok=False):
    """Lengths from the first eos; truncated rows are max_new_tokens long; masks match lengths."""
    P, R = _split(out)
    mask = response_mask(out)
    resp = out["input_ids"][:, P:]
    assert R == int(out["response_lens"].max())  # R = the longest response, not max_new_tokens
    assert torch.equal(out["attention_mask"][:, P:].bool(), mask)
    assert torch.equal(out["prompt_lens"], out["attention_mask"][:, :P].sum(1))
    last = resp.gather(1, (out["response_lens"] - 1)[:, None]).squeeze(1)
    ended = ~out["truncated"]
    if not stop_ok:
        assert (last[ended] == eos).all()
    assert (out["response_lens"][out["truncated"]] == MAX_NEW).all()
    before_last = mask & (torch.arange(R)[None, :] < (out["response_lens"] - 1)[:, None])
    assert not (resp[before_last] == eos).any()  # no eos inside a response
    for key in TOKEN_KEYS:
        assert out[key].dtype == torch.float32 and (out[key][~mask] == 0).all()
    return mask


def _assert_parity(model, out, temperature, top_p, atol=1e-5):
    P, _ = _split(out)
    mask = response_mask(out)
    stats = teacher_force(model, out["input_ids"], out["attention_mask"], P, mask, temperature, top_p)
    for key in TOKEN_KEYS:
        assert torch.allclose(getattr(stats, key), out[key], atol=atol), key
    return stats


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.8), (1.6, 0.8)])
def test_behaviour_stats_equal_teacher_forcing(lora_model, tokenizer, temperature, top_p):
    out = _generate(lora_model, tokenizer, temperature, top_p)
    assert out["input_ids"].shape[0] == len(PROMPTS)
    _assert_layout(out, tokenizer.eos_token_id)
    assert 0 < out["truncated"].sum() < len(PROMPTS)  # both kinds of ending are exercised
    assert (out["response_lens"] < MAX_NEW).any()
    stats = _assert_parity(lora_model, out, temperature, top_p)
    assert torch.isfinite(stats.logprobs).all()  # every sampled token is inside the teacher-forced nucleus


def test_sampled_tokens_lie_in_the_nucleus(lora_model, tokenizer):
    temperature, top_p = 0.5, 0.3
    out = _generate(lora_model, tokenizer, temperature, top_p, max_new_tokens=6)
    P, R = _split(out)
    mask = response_mask(out)
    with torch.no_grad():
        logits = lora_model(
            input_ids=out["input_ids"],
            attention_mask=out["attention_mask"],
            position_ids=(out["attention_mask"].cumsum(-1) - 1).clamp(min=0),
        ).logits[:, P - 1 : P + R - 1]
    keep = top_p_keep_mask(logits / temperature, top_p)
    assert keep.sum(-1).float().mean() < 0.5 * keep.shape[-1]  # the nucleus really is a strict subset
    chosen = keep.gather(-1, out["input_ids"][:, P:, None]).squeeze(-1)
    assert chosen[mask].all()


def test_checkpoint_generation_config_is_ignored(tokenizer):
    """Sampling settings saved with a checkpoint must not change the distribution we sample from."""
    model = make_lora_model()
    base = model.get_base_model()
    for config in {id(c): c for c in (model.generation_config, base.generation_config)}.values():
        config.update(temperature=0.1, top_k=2, repetition_penalty=3.0, min_new_tokens=8, suppress_tokens=[14])
    saved = base.generation_config.to_dict()
    out = _generate(model, tokenizer, 1.0, 1.0)
    _assert_parity(model, out, 1.0, 1.0)
    assert (out["response_lens"] < 8).any()  # neither min_new_tokens nor suppress_tokens(eos) applied
    assert base.generation_config.to_dict() == saved  # and restored afterwards


def _first_token_distribution(model, tokenizer, prompt: str, temperature: float, top_p: float):
    """π(·|prompt) from a teacher-forced forward, and the first tokens of 3000 sampled responses."""
    from entropy_probe.policy import policy_logprobs

    n = 3000
    out = _generate(model, tokenizer, temperature, top_p, [prompt] * n, max_new_tokens=1, batch_size=1000, seed=11)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        probs = policy_logprobs(model(input_ids=ids).logits[0, -1], temperature, top_p).exp()
    first = out["input_ids"][:, -1]
    return probs, torch.bincount(first, minlength=probs.numel()).double(), n


def test_sampling_frequencies_follow_the_policy(lora_model, tokenizer):
    """Nothing in generate (temperature/top-k/top-p warpers after our processor) alters the draw."""
    probs, counts, n = _first_token_distribution(lora_model, tokenizer, "3+4=", 0.3, 0.7)
    support = probs > 0
    assert 2 <= support.sum() < probs.numel()  # top-p cut some tokens, several remain
    assert counts[~support].sum() == 0  # never outside the nucleus
    expected = n * probs[support].double()
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5  # mean + 6 sd of χ²(dof); a T or top-k error gives ≫ this


def test_no_default_top_k_on_a_large_vocabulary(tokenizer):
    """generate's global default top_k=50 must be off: with V = 300 it would cut the distribution."""
    from entropy_probe.tiny import build_model

    model = build_model(vocab_size=300, hidden_size=32, seed=1)  # a plain (non-PEFT) model works too
    probs, counts, n = _first_token_distribution(model, tokenizer, "3+4=", 1.3, 1.0)
    rank = probs.argsort(descending=True).argsort()  # 0 = most probable
    outside_top50 = counts[rank >= 50].sum() / n
    assert outside_top50 > 0.5 * probs[rank >= 50].sum()  # ≈ 0.8 expected; 0 if top-k were applied
    out = _generate(model, tokenizer, 1.3, 1.0, max_new_tokens=6)
    _assert_parity(model, out, 1.3, 1.0)


def test_pad_equal_to_eos(lora_model):
    tok = build_tokenizer()
    tok.pad_token = EOS  # common for real models: lengths must come from the first eos, not from pad
    out = _generate(lora_model, tok, 0.9, 1.0)
    _assert_layout(out, tok.eos_token_id)
    assert (out["response_lens"] < MAX_NEW).any() and out["truncated"].any()
    _assert_parity(lora_model, out, 0.9, 1.0)


def test_stop_string(lora_model, tokenizer):
    out = _generate(lora_model, tokenizer, 1.0, 1.0, stop="=")
    _assert_layout(out, tokenizer.eos_token_id, stop_ok=True)
    P, _ = _split(out)
    texts = [tokenizer.decode(r[:n].tolist()) for r, n in zip(out["input_ids"][:, P:], out["response_lens"])]
    assert any(t.endswith("=") for t in texts)
    for text, truncated in zip(texts, out["truncated"].tolist()):
        assert "=" not in text[:-1]  # the response ends at the stop
        if not truncated:
            assert text.endswith("=") or text.endswith(EOS)
    _assert_parity(lora_model, out, 1.0, 1.0)


def test_seeded_per_batch_not_per_schedule(lora_model, tokenizer):
    kw = {"batch_size": 8, "seed": 3}
    full = _generate(lora_model, tokenizer, **kw)
    again = _generate(lora_model, tokenizer, **kw)
    assert all(torch.equal(full[k], again[k]) for k in full)
    # batch 2 run alone (as another process would) draws the same responses as inside the full run
    alone = _generate(lora_model, tokenizer, prompts=PROMPTS[16:24], batch_offset=2, **kw)
    P_full, _ = _split(full)
    P_alone, R_alone = _split(alone)
    assert torch.equal(alone["response_lens"], full["response_lens"][16:24])
    assert torch.equal(alone["input_ids"][:, P_alone:], full["input_ids"][16:24, P_full : P_full + R_alone])
    assert torch.allclose(alone["logprobs"], full["logprobs"][16:24, :R_alone], atol=1e-6)
    other_seed = _generate(lora_model, tokenizer, **{**kw, "seed": 4})
    assert not torch.equal(other_seed["input_ids"], full["input_ids"])


def test_response_lengths_by_hand():
    eos = 9
    generated = torch.tensor([[1, 9, 9, 9], [9, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 9], [1, 2, 3, 4]])
    lens, truncated = _response_lengths(generated, eos, None)
    assert lens.tolist() == [2, 1, 4, 4, 4] and truncated.tolist() == [False, False, True, False, True]
    stop_first = torch.tensor([-1, 0, 1, 3, 2])  # step at which a stop string completed
    lens, truncated = _response_lengths(generated, eos, stop_first)
    assert lens.tolist() == [2, 1, 2, 4, 3] and truncated.tolist() == [False, False, False, False, False]


# ----------------------------------------------------------------------------- plans


def test_plan_e_with_replacement():
    idx = plan_e(5, 200, seed=1)
    assert idx.shape == (200,) and idx.dtype == torch.long
    assert idx.min() >= 0 and idx.max() < 5 and len(idx.unique()) == 5  # repeats: with replacement
    assert torch.equal(idx, plan_e(5, 200, seed=1)) and not torch.equal(idx, plan_e(5, 200, seed=2))


def test_plan_u_distinct():
    idx = plan_u(50, 20, seed=1)
    assert idx.shape == (20,) and len(idx.unique()) == 20 and idx.max() < 50
    assert sorted(plan_u(7, 7, seed=3).tolist()) == list(range(7))
    assert torch.equal(idx, plan_u(50, 20, seed=1)) and not torch.equal(idx, plan_u(50, 20, seed=2))
    with pytest.raises(ProbeError, match=r"batch_config\.B_U = 8 .* only 5"):
        plan_u(5, 8, seed=1)


# ----------------------------------------------------------------------------- the artifact contract


def _meta(kind: str, N: int, G: int, **changes) -> SamplesMeta:
    meta = {
        "schema_version": files.SCHEMA_VERSION,
        "kind": kind,
        "checkpoint_fingerprint": "abc",
        "checkpoint_path": "ckpt",
        "load": {"dtype": "fp32", "use_qlora": False},
        "tokenizer": {"vocab_size": 16, "vocab_sha256": "0123456789abcdef"},
        "generation": {
            "temperature": 1.0,
            "temperature_source": "test",
            "top_p": 1.0,
            "max_new_tokens": MAX_NEW,
            "stop": None,
        },
        "seed": 0,
        "dataset": {"name": "test", "split": "train", "fingerprint": "f", "size": 5},
        "reward_fn": "exact_number" if kind == "samples_u" else None,
        "advantage": {"scale": True, "eps": 1e-4} if kind == "samples_u" else None,
        "world_size": 1,
        "n_prompts": N // G,
        "n_sequences": N,
        "n_distinct_prompts": N // G,
        "with_replacement": kind == "samples_e",
        "G": G,
        "mean_reward": 0.5 if kind == "samples_u" else None,
        "frac_all_equal_groups": 0.0 if kind == "samples_u" else None,
        "mean_response_len": 3.0,
        "frac_truncated": 0.5,
    }
    return SamplesMeta.model_validate({**meta, **changes})


@pytest.fixture(scope="module")
def sample_u():
    model, tok = make_lora_model(), build_tokenizer()
    G = 4
    out = _generate(model, tok, prompts=[p for p in PROMPTS[:5] for _ in range(G)], batch_size=8, seed=0)
    n = out["input_ids"].shape[0]
    out.update(
        prompt_index=torch.arange(5).repeat_interleave(G),
        rewards=torch.rand(n),
        advantages=torch.randn(n),
        group_index=torch.arange(5).repeat_interleave(G),
    )
    return Samples(**out, meta=_meta("samples_u", n, G))


def _write_raw(directory, tensors: dict, meta: dict, kind="samples_u"):
    """A sample file as another program (or a bug) might have written it, bypassing Samples.write's checks."""
    files.write_tensors(directory / "samples.safetensors", tensors, kind, meta)


def test_samples_round_trip(tmp_path, sample_u):
    sample_u.write(tmp_path)
    back = Samples.read(tmp_path, "samples_u")
    assert back.tensors().keys() == sample_u.tensors().keys()
    assert all(torch.equal(v, getattr(back, k)) for k, v in sample_u.tensors().items())
    assert back.meta == sample_u.meta and SamplesMeta.read(tmp_path) == sample_u.meta  # header and samples.json
    assert back.source == tmp_path / "samples.safetensors" and back.kind == "samples_u"
    P, R = back.n_prompt_cols, back.n_response_cols
    assert P + R == back.input_ids.shape[1] and R == int(back.response_lens.max())
    assert torch.equal(back.response_mask(), back.attention_mask[:, P:].bool())
    assert torch.equal(response_mask(back.tensors()), back.response_mask())


def test_an_e_artifact_has_no_u_tensors(tmp_path, sample_u):
    E = {k: v for k, v in sample_u.tensors().items() if k not in ("rewards", "advantages", "group_index")}
    Samples(**E, meta=_meta("samples_e", len(sample_u.input_ids), 1)).write(tmp_path)
    back = Samples.read(tmp_path, "samples_e")
    assert back.rewards is None and back.group_index is None and "rewards" not in back.tensors()
    with pytest.raises(ProbeError, match="holds 'samples_e', expected 'samples_u'"):
        Samples.read(tmp_path, "samples_u")
    _write_raw(tmp_path, sample_u.tensors(), _meta("samples_e", len(sample_u.input_ids), 1).model_dump(), "samples_e")
    with pytest.raises(ProbeError, match=r"unexpected tensors \['advantages', 'group_index', 'rewards'\]"):
        Samples.read(tmp_path, "samples_e")


def test_writing_a_malformed_artifact_is_a_bug(tmp_path, sample_u):
    bad = Samples(**{**sample_u.tensors(), "margin": sample_u.margin + 1}, meta=sample_u.meta)
    with pytest.raises(RuntimeError, match="sample-u produced a malformed artifact: 'margin' is non-zero on padding"):
        bad.write(tmp_path)
    assert not list(tmp_path.iterdir())


def _bad(tensors, key, value=None):
    bad = dict(tensors)
    if value is None:
        del bad[key]
    else:
        bad[key] = value
    return bad


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t: _bad(t, "logprobs"), r"missing tensors \['logprobs'\]"),
        (lambda t: _bad(t, "rewards"), r"missing tensors \['rewards'\]"),
        (lambda t: _bad(t, "response_lens", t["response_lens"] + 1), "inconsistent|out of range|truncated"),
        (lambda t: _bad(t, "attention_mask", torch.ones_like(t["attention_mask"])), "attention_mask is inconsistent"),
        (lambda t: _bad(t, "entropies", t["entropies"][:, :-1]), "'entropies' has shape"),
        (lambda t: _bad(t, "input_ids", t["input_ids"].int()), "'input_ids' is torch.int32"),
        (lambda t: _bad(t, "truncated", t["truncated"].long()), "'truncated' is torch.int64 .* expected torch.bool"),
        (lambda t: _bad(t, "margin", t["margin"] + 1), "'margin' is non-zero on padding"),
        (lambda t: _bad(t, "group_index", torch.arange(len(t["group_index"]))), "group_index is not contiguous"),
        (lambda t: {**t, "extra": torch.zeros(3)}, r"unexpected tensors \['extra'\]"),
    ],
)
def test_malformed_samples_are_refused(tmp_path, sample_u, mutate, message):
    _write_raw(tmp_path, mutate(sample_u.tensors()), sample_u.meta.model_dump(mode="json"))
    with pytest.raises(ProbeError, match=message) as err:
        Samples.read(tmp_path, "samples_u")
    assert str(tmp_path / "samples.safetensors") in str(err.value) and "rerun the sample-u stage" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"G": 3}, "G = 3 in the metadata does not divide N = 20"),
        ({"n_sequences": 19}, r"n_sequences = 19, n_prompts × G = 5 × 4, but 20 rows"),
        ({"kind": "samples_e"}, "the metadata says kind 'samples_e'"),
        ({"generation": {"max_new_tokens": MAX_NEW + 1}}, r"metadata generation\.temperature: Field required"),
        ({"seed": "one"}, "metadata seed: Input should be a valid integer"),
        ({"schema_version": "0"}, "metadata schema_version: .*schema 0, this version reads 1"),
        ({"renamed_key": 1}, "metadata renamed_key: Extra inputs are not permitted"),
    ],
)
def test_malformed_metadata_is_refused(tmp_path, sample_u, change, message):
    _write_raw(tmp_path, sample_u.tensors(), {**sample_u.meta.model_dump(mode="json"), **change})
    with pytest.raises(ProbeError, match=message) as err:
        Samples.read(tmp_path, "samples_u")
    assert str(tmp_path / "samples.safetensors") in str(err.value) and "\n" not in str(err.value)


def test_truncated_length_must_be_max_new_tokens(tmp_path, sample_u):
    assert sample_u.truncated.any()
    meta = sample_u.meta.model_dump(mode="json")
    meta["generation"]["max_new_tokens"] = MAX_NEW + 1
    _write_raw(tmp_path, sample_u.tensors(), meta)
    with pytest.raises(ProbeError, match=f"a truncated response is not max_new_tokens = {MAX_NEW + 1} long"):
        Samples.read(tmp_path, "samples_u")


def test_foreign_and_truncated_files_are_refused(tmp_path, sample_u):
    path = tmp_path / "samples.safetensors"
    files.write_tensors(path, {"exp_avg.w": torch.zeros(3)}, "optimizer_state")
    with pytest.raises(ProbeError, match="holds 'optimizer_state', expected 'samples_u'"):
        Samples.read(tmp_path, "samples_u")
    sample_u.write(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ProbeError, match="not a readable safetensors file"):
        Samples.read(tmp_path, "samples_u")
    with pytest.raises(ProbeError, match="not found"):
        Samples.read(tmp_path / "nowhere", "samples_u")


def test_samples_must_fit_the_model(tmp_path, sample_u, tokenizer):
    from entropy_probe.artifacts.samples import tokenizer_identity

    model = make_lora_model()
    mine = tokenizer_identity(tokenizer)
    meta = SamplesMeta.model_validate({**sample_u.meta.model_dump(), "tokenizer": mine})
    own = Samples(**sample_u.tensors(), meta=meta)
    own.write(tmp_path)
    Samples.read(tmp_path, "samples_u").check_fits_model(model, tokenizer)  # its own tokenizer and vocabulary: fine
    with pytest.raises(ProbeError, match=r"were made with a tokenizer of 16 tokens \(vocabulary 0123456789abcdef\)"):
        sample_u.check_fits_model(model, tokenizer)  # same size, another vocabulary hash
    vocab = model.get_input_embeddings().num_embeddings
    ids = own.input_ids.clone()
    ids[0, -1] = vocab + 5  # a token beyond the embedding table (in a padding column: the schema allows it)
    beyond = Samples(**{**own.tensors(), "input_ids": ids}, meta=own.meta, source=tmp_path / "samples.safetensors")
    with pytest.raises(ProbeError, match=f"samples in {tmp_path / 'samples.safetensors'} hold token id {vocab + 5}"):
        beyond.check_fits_model(model, tokenizer)


# ----------------------------------------------------------------------------- the stages


@pytest.fixture(scope="module")
def stage_setup(tmp_path_factory, trainer_checkpoint):
    """A Trainer-layout checkpoint whose training_args.bin says temperature 0.7, scale_rewards 'none'."""
    from entropy_probe.params import validate_params

    root = tmp_path_factory.mktemp("stage")
    ckpt = trainer_checkpoint(steps=1, total_steps=2, hidden_size=32)  # shared: read only
    tree = {
        "checkpoint": {"path": str(ckpt), "dtype": "fp32", "device_map": "cpu", "trust_pickles": True},
        "batch_config": {"dataset_name": "arithmetic:3", "B_E": 7, "B_U": 3, "G": 4},
        "generation": {"max_new_tokens": 4, "gen_batch_size": 5},
    }
    return root, validate_params(tree), tree


@pytest.mark.parametrize(
    "setting, recorded, expected",
    [(0.5, 0.9, 0.5), ("auto", 0.9, 0.9), ("auto", None, 1.0)],
)
def test_resolve_temperature(setting, recorded, expected):
    value, source = resolve_temperature(setting, recorded)
    assert value == expected and ("trainer" in source) == (setting == "auto")


@pytest.mark.parametrize(
    "setting, recorded, expected",
    [
        (False, "group", False),
        (True, "none", True),
        ("auto", "group", True),
        ("auto", True, True),
        ("auto", "none", False),
        ("auto", False, False),
        ("auto", None, True),
        (True, "batch", True),
    ],
)
def test_resolve_scale(setting, recorded, expected):
    value, source = resolve_scale(setting, recorded)
    assert value is expected and source


def test_batch_scaled_rewards_are_refused_not_emulated_as_group():
    """TRL's scale_rewards='batch' divides by the batch std; treating it as 'group' would be a silent wrong step."""
    with pytest.raises(ProbeError, match=r"scale_rewards='batch' is not emulated.*advantage\.scale"):
        resolve_scale("auto", "batch")


def _header_and_body(path) -> tuple[dict, bytes]:
    """(parsed safetensors header, every byte after it).

    The header is compared parsed: safetensors 0.8 writes the `__metadata__` keys in a random
    (Rust HashMap) order, so raw header bytes differ between writes until files.write_tensors
    canonicalises them.
    """
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _run_twice(run, params, root, name):
    summary = run(params, root / f"{name}_1", False)
    run(params, root / f"{name}_2", False)
    first = _header_and_body(root / f"{name}_1" / "samples.safetensors")
    assert first == _header_and_body(root / f"{name}_2" / "samples.safetensors")  # same seed ⇒ identical
    assert (root / f"{name}_1" / "samples.json").read_bytes() == (root / f"{name}_2" / "samples.json").read_bytes()
    assert "\n" not in summary and summary.endswith(f"-> {root / f'{name}_1'}")
    return root / f"{name}_1", summary


def test_sample_e_stage(stage_setup):
    from entropy_probe import checkpoint
    from entropy_probe.task import load_prompts
    from stages.sample import run_sample_e

    root, params, _ = stage_setup
    out, summary = _run_twice(run_sample_e, params, root, "e")
    samples = Samples.read(out, "samples_e")
    meta = samples.meta
    n_data = len(load_prompts(params.batch_config))
    assert samples.input_ids.shape[0] == 7 and meta.n_sequences == 7 and meta.G == 1
    assert meta.with_replacement is True and meta.world_size == 1
    assert torch.equal(samples.prompt_index, plan_e(n_data, 7, params.sampling.seed_e))
    assert meta.n_distinct_prompts == len(samples.prompt_index.unique())
    assert meta.generation.temperature == 0.7 and "trainer" in meta.generation.temperature_source
    assert meta.checkpoint_fingerprint == checkpoint.checkpoint_fingerprint(checkpoint.resolve_paths(params.checkpoint))
    assert meta.dataset.size == n_data and meta.dataset.fingerprint
    # samples.json = the header's metadata, no timings (re-runs give identical files)
    assert files.read_json(out / "samples.json") == files.read_tensors(out / "samples.safetensors", "samples_e")[1]
    assert samples.rewards is None and meta.reward_fn is None and meta.mean_reward is None
    assert summary.startswith(f"sample-e: 7 prompts with replacement ({meta.n_distinct_prompts} distinct), G=1, ")
    assert "mean reward n/a" in summary and f"mean response length {meta.mean_response_len:.2f}" in summary


def test_sample_u_stage(stage_setup):
    from entropy_probe.artifacts.samples import decode_responses
    from entropy_probe.task import exact_number, load_prompts
    from entropy_probe.tiny import build_tokenizer
    from stages.sample import run_sample_u

    root, params, _ = stage_setup
    out, summary = _run_twice(run_sample_u, params, root, "u")
    samples = Samples.read(out, "samples_u")
    meta = samples.meta
    prompt_set = load_prompts(params.batch_config)
    B_U, G = 3, 4
    assert meta.n_prompts == B_U and meta.n_sequences == B_U * G and meta.with_replacement is False
    rows = samples.prompt_index.view(B_U, G)
    assert (rows == rows[:, :1]).all() and len(rows[:, 0].unique()) == B_U  # distinct prompts, contiguous groups
    assert torch.equal(rows[:, 0], plan_u(len(prompt_set), B_U, params.sampling.seed_u))
    # rewards by hand from the decoded responses; trainer scale_rewards 'none' ⇒ advantages r − group mean
    texts = decode_responses(build_tokenizer(), samples.tensors())
    answers = [prompt_set.answers[i] for i in samples.prompt_index.tolist()]
    rewards = torch.tensor([exact_number(t, a) for t, a in zip(texts, answers)])
    assert torch.equal(samples.rewards, rewards)
    grouped = rewards.view(B_U, G)
    assert torch.allclose(samples.advantages.view(B_U, G), grouped - grouped.mean(1, keepdim=True), atol=1e-6)
    assert meta.advantage.model_dump() == {"scale": False, "eps": params.advantage.eps}
    assert meta.reward_fn == params.batch_config.reward_fn
    assert meta.mean_reward == pytest.approx(float(rewards.mean()))
    assert meta.frac_all_equal_groups == pytest.approx(float((grouped == grouped[:, :1]).all(1).float().mean()))
    assert summary.startswith("sample-u: 3 prompts without replacement (3 distinct), G=4, 12 sequences; mean reward ")


def test_dry_run_writes_nothing(stage_setup):
    from stages.sample import run_sample_e, run_sample_u

    root, params, _ = stage_setup
    printed = run_sample_e(params, root / "dry_e", True) + "\n" + run_sample_u(params, root / "dry_u", True)
    assert "7 prompts with replacement" in printed and "7 sequences" in printed and "2 generate batches" in printed
    assert "3 prompts without replacement" in printed and "12 sequences" in printed and "3 generate batches" in printed
    assert not (root / "dry_e").exists() and not (root / "dry_u").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".dry")]


def test_sampler_checkpoint_is_separate_from_the_probed_one(stage_setup, tmp_path):
    """sampling.checkpoint names the sampler; a missing one is refused and nothing is written."""
    from entropy_probe.params import validate_params
    from stages.sample import run_sample_e, sampler_checkpoint

    root, params, tree = stage_setup
    assert sampler_checkpoint(params).path == params.checkpoint.path
    other = validate_params({**tree, "sampling": {"checkpoint": str(tmp_path / "nowhere")}})
    assert sampler_checkpoint(other).path == str(tmp_path / "nowhere")
    assert sampler_checkpoint(other).dtype == params.checkpoint.dtype
    with pytest.raises(ProbeError, match="nowhere"):
        run_sample_e(other, tmp_path / "out", False)
    assert not (tmp_path / "out").exists()


def test_temperature_defaults_to_one_without_the_trainer_pickle(stage_setup, tmp_path):
    from entropy_probe.params import validate_params
    from stages.sample import run_sample_e

    root, _, tree = stage_setup
    params = validate_params({**tree, "checkpoint": {**tree["checkpoint"], "trust_pickles": False}})
    run_sample_e(params, tmp_path / "e", False)
    meta = SamplesMeta.read(tmp_path / "e")
    assert meta.generation.temperature == 1.0 and "default" in meta.generation.temperature_source
