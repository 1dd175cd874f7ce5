"""Tokenizer round-trip, the arithmetic task, prompt datasets, and the reward registry."""

from __future__ import annotations

import json
import re

import pytest

from entropy_probe.errors import ProbeError
from entropy_probe.params import BatchParams
from entropy_probe.task import (
    REWARDS,
    answer_tag,
    exact_number,
    get_reward_fn,
    load_prompts,
    make_arithmetic_prompts,
    score_responses,
)

# ---------------------------------------------------------------- tokenizer

STRINGS = ["3+5=8", " 1 2 ", "12-7=5", "0+0= ", "  ", "9-9-9=-9", "=+-"]


def test_tokenizer_round_trips_through_save_pretrained(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.eos_token_id, loaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert loaded.eos_token_id != loaded.pad_token_id
    assert loaded.padding_side == "left"
    for text in STRINGS:
        ids = tokenizer.encode(text)
        assert loaded.encode(text) == ids
        assert len(ids) == len(text)  # one token per character, spaces kept
        assert loaded.decode(ids) == text
    with_eos = tokenizer.encode("3+5=8") + [tokenizer.eos_token_id]
    assert loaded.decode(with_eos, skip_special_tokens=True) == "3+5=8"
    assert loaded.decode(with_eos) == "3+5=8" + tokenizer.eos_token


def test_tokenizer_left_pads(tokenizer):
    enc = tokenizer(["1+1=", "10+10="], padding=True)
    assert enc["input_ids"][0][:2] == [tokenizer.pad_token_id] * 2
    assert enc["attention_mask"][0] == [0, 0, 1, 1, 1, 1]


# ---------------------------------------------------------------- the arithmetic task


@pytest.mark.parametrize("max_operand", [1, 4, 9])
def test_arithmetic_prompts_are_all_sums(max_operand, tokenizer):
    records = make_arithmetic_prompts(max_operand)
    pairs = set()
    for r in records:
        a, b = map(int, re.fullmatch(r"(\d+)\+(\d+)=", r["prompt"]).groups())
        assert int(r["answer"]) == a + b and r["answer"] == str(a + b)
        pairs.add((a, b))
    expected = {(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)}
    assert pairs == expected and len(records) == len(expected)


def test_arithmetic_answers_fit_the_completion_length(tokenizer):
    records = make_arithmetic_prompts(9)
    assert len(records) == 100
    assert max(len(tokenizer.encode(r["answer"])) + 1 for r in records) == 3  # digits + eos


# ---------------------------------------------------------------- rewards


@pytest.mark.parametrize(
    "response, answer, reward",
    [
        ("8", "8", 1.0),
        ("8.0", "8", 1.0),
        ("8", "8.00", 1.0),
        ("9", "8", 0.0),
        ("", "8", 0.0),
        ("81", "8", 0.0),  # the whole first number counts, not its first digit
        ("8=5", "8", 1.0),
        ("1 0", "10", 0.0),
        ("the sum is 12, not 13", "12", 1.0),
        ("13 or 12", "12", 0.0),  # only the first number
        ("-3", "-3", 1.0),
        ("3", "-3", 0.0),
        ("2.5", "2.50", 1.0),
        ("no digits", "8", 0.0),
        ("8", None, 0.0),
        ("8", "eight", 0.0),
    ],
)
def test_exact_number(response, answer, reward):
    assert exact_number(response, answer) == reward


@pytest.mark.parametrize(
    "response, answer, reward",
    [
        ("<answer>8</answer>", "8", 1.0),
        ("reasoning... <answer> 8.0 </answer>", "8", 1.0),
        ("<answer>9</answer>", "8", 0.0),
        ("8", "8", 0.0),  # no tag
        ("<answer>8", "8", 0.0),  # unclosed
        ("", "8", 0.0),
        ("<answer></answer>", "8", 0.0),
        ("<answer>Paris</answer>", "Paris", 1.0),
        ("<answer>paris</answer>", "Paris", 0.0),
        ("<answer>8</answer><answer>9</answer>", "8", 1.0),  # the first tag
        ("<answer>\n12\n</answer>", "12", 1.0),
        ("<answer>8</answer>", None, 0.0),
    ],
)
def test_answer_tag(response, answer, reward):
    assert answer_tag(response, answer) == reward


def test_registry_and_dotted_paths(tmp_path, monkeypatch):
    assert get_reward_fn("exact_number") is exact_number and get_reward_fn("answer_tag") is answer_tag
    (tmp_path / "my_rewards_mod.py").write_text(
        "def length_reward(response, answer):\n    return float(len(response))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for path in ("my_rewards_mod:length_reward", "my_rewards_mod.length_reward"):
        fn = get_reward_fn(path)
        assert score_responses(fn, ["ab", "", "abcd"], ["1", None, "2"]) == [2.0, 0.0, 4.0]


def test_unknown_reward_names_lists_the_registry():
    with pytest.raises(ProbeError) as err:
        get_reward_fn("exact_numbr")
    assert "exact_numbr" in str(err.value)
    for name in REWARDS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "path, fragment",
    [("no_such_module_xyz:fn", "could not be imported"), ("entropy_probe.task:no_such_fn", "not a function")],
)
def test_bad_dotted_reward_paths(path, fragment):
    with pytest.raises(ProbeError, match=fragment):
        get_reward_fn(path)


def test_score_responses_refuses_non_finite_rewards():
    assert score_responses(exact_number, ["8", "7"], ["8", "8"]) == [1.0, 0.0]
    with pytest.raises(ProbeError, match="response 1"):
        score_responses(lambda r, a: float("nan") if r == "x" else 1.0, ["y", "x"], ["1", "1"])
    with pytest.raises(ProbeError, match="response 0"):
        score_responses(lambda r, a: "high", ["y"], ["1"])


# ---------------------------------------------------------------- prompt datasets


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RECORDS = [
    {"prompt": "1+2=", "answer": "3", "id": 0},
    {"prompt": "4+4=", "answer": "8", "id": 1},
    {"prompt": "9+9=", "answer": "18", "id": 2},
]


def test_load_jsonl_and_parquet_agree(tmp_path):
    import datasets

    jsonl = _write_jsonl(tmp_path / "p.jsonl", RECORDS)
    parquet = tmp_path / "p.parquet"
    datasets.Dataset.from_list(RECORDS).to_parquet(str(parquet))
    a = load_prompts(BatchParams(dataset_name=str(jsonl)))
    b = load_prompts(BatchParams(dataset_name=str(parquet)))
    assert a.prompts == b.prompts == [r["prompt"] for r in RECORDS]
    assert a.answers == b.answers == [r["answer"] for r in RECORDS]
    assert len(a) == 3 and a.name == str(jsonl) and a.split == "train"
    assert a.fingerprint == b.fingerprint and re.fullmatch(r"[0-9a-f]{16}", a.fingerprint)


def test_template_fields_and_fingerprint(tmp_path):
    records = [{"question": r["prompt"], "label": int(r["answer"])} for r in RECORDS]  # int answers -> text
    path = _write_jsonl(tmp_path / "q.jsonl", records)
    plain = load_prompts(BatchParams(dataset_name=str(path), prompt_field="question", answer_field="label"))
    templated = load_prompts(
        BatchParams(
            dataset_name=str(path), prompt_field="question", answer_field="label", prompt_template="Q: {prompt} {x}"
        )
    )
    assert plain.answers == ["3", "8", "18"]
    assert templated.prompts == [f"Q: {r['prompt']} {{x}}" for r in RECORDS]  # other braces left alone
    assert templated.fingerprint != plain.fingerprint
    reordered = _write_jsonl(tmp_path / "r.jsonl", records[::-1])
    batch = BatchParams(dataset_name=str(reordered), prompt_field="question", answer_field="label")
    assert load_prompts(batch).fingerprint != plain.fingerprint


def test_builtin_arithmetic_matches_a_file_of_the_same_records(tmp_path):
    path = _write_jsonl(tmp_path / "a.jsonl", make_arithmetic_prompts(3))
    builtin = load_prompts(BatchParams(dataset_name="arithmetic:3"))
    assert len(builtin) == 16
    assert builtin.fingerprint == load_prompts(BatchParams(dataset_name=str(path))).fingerprint
    assert len(load_prompts(BatchParams(dataset_name="arithmetic"))) == 100
    with pytest.raises(ProbeError, match="arithmetic:x"):
        load_prompts(BatchParams(dataset_name="arithmetic:x"))


@pytest.mark.parametrize(
    "bad_index, record, fragments",
    [
        (2, {"answer": "5"}, ["record 2", "'prompt'"]),
        (1, {"prompt": "1+1="}, ["record 1", "'answer'"]),
        (3, {"prompt": "", "answer": "0"}, ["record 3", "empty prompt"]),
        (0, {"prompt": "   ", "answer": "0"}, ["record 0", "empty prompt"]),
    ],
)
def test_bad_records_are_named(tmp_path, bad_index, record, fragments):
    records = [{"prompt": f"{i}+0=", "answer": str(i)} for i in range(5)]
    records[bad_index] = record
    path = _write_jsonl(tmp_path / "bad.jsonl", records)
    with pytest.raises(ProbeError) as err:
        load_prompts(BatchParams(dataset_name=str(path)))
    for fragment in fragments:
        assert fragment in str(err.value)


def test_field_absent_everywhere_is_named(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [{"question": "1+1=", "answer": "2"}])
    with pytest.raises(ProbeError, match=r"record 0 has no prompt field 'prompt'"):
        load_prompts(BatchParams(dataset_name=str(path)))


def test_missing_file_and_unavailable_hub_dataset(tmp_path):
    with pytest.raises(ProbeError, match="not found"):
        load_prompts(BatchParams(dataset_name=str(tmp_path / "nope.jsonl")))
    with pytest.raises(ProbeError, match="could not be loaded.*local"):
        load_prompts(BatchParams(dataset_name="no-such-user-xyz/no-such-dataset-xyz"))
