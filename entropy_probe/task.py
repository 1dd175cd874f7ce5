"""Prompts and rewards: the built-in arithmetic task, prompt datasets, and the reward registry.

A *prompt set* is the list of (templated) prompt strings a stage samples from, with one reference
answer per prompt and a fingerprint of the normalised records (recorded in sample provenance).

A *reward function* maps (response, answer) -> float, where the response is decoded WITHOUT special
tokens (eos stripped). Built-ins live in `REWARDS`; users add their own by dotted path
("pkg.mod:fn" or "pkg.mod.fn").
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

from .errors import ProbeError
from .params import BatchParams

RewardFn = Callable[[str, "str | None"], float]
# a batch-level reward (e.g. a trainer's own reward functions, `integrations.trl.TrainerRewards`):
# (prompts, responses, answers, completion_ids) -> one reward per response; `name` says what it is
BatchReward = Callable[[list, list, list, list], list]

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
BUILTIN_PREFIX = "arithmetic"  # dataset_name "arithmetic" (operands 0..9) or "arithmetic:N" (0..N)
DEFAULT_MAX_OPERAND = 9


# ---------------------------------------------------------------- the synthetic task


def make_arithmetic_prompts(max_operand: int) -> list[dict]:
    """All sums a+b with a, b in 0..max_operand: {"prompt": "a+b=", "answer": "a+b"}, a-major order."""
    return [
        {"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(max_operand + 1) for b in range(max_operand + 1)
    ]


# ---------------------------------------------------------------- prompt datasets


@dataclass
class PromptSet:
    name: str
    split: str
    prompts: list[str]  # template applied
    answers: list[str | None]
    fingerprint: str  # sha256 over the normalised (prompt, answer) records, 16 hex digits

    def __len__(self) -> int:
        return len(self.prompts)


def _fingerprint(prompts: list[str], answers: list[str | None]) -> str:
    records = [[p, a] for p, a in zip(prompts, answers)]
    blob = json.dumps(records, ensure_ascii=False, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _load_records(batch: BatchParams) -> tuple[list[dict], str, str]:
    """(records, name, split) for the built-in task, a local .jsonl/.json/.parquet file, or a hub dataset."""
    name = batch.dataset_name
    if name == BUILTIN_PREFIX or name.startswith(BUILTIN_PREFIX + ":"):
        raw = name.partition(":")[2] or str(DEFAULT_MAX_OPERAND)
        if not raw.isdigit() or int(raw) < 1:
            raise ProbeError(f"bad built-in dataset name '{name}'", "use 'arithmetic' or 'arithmetic:N' with N >= 1")
        return make_arithmetic_prompts(int(raw)), name, batch.split

    import datasets  # heavy import; only when a dataset file or hub name is actually read

    datasets.disable_progress_bars()
    path = Path(name)
    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is not None:
        if not path.is_file():
            raise ProbeError(
                f"dataset file {path} not found", "fix batch_config.dataset_name (or run the demo stage to create it)"
            )
        try:
            ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
        except Exception as exc:  # malformed JSON/Parquet surfaces as various datasets/arrow errors
            raise ProbeError(
                f"dataset file {path} could not be read as {fmt} ({exc.__class__.__name__}: {_first_line(exc)})",
                "check the file's format",
            ) from None
        return ds.to_list(), str(path), "train"
    if path.exists():
        raise ProbeError(f"dataset {path} is not a .jsonl, .json or .parquet file", "convert it to one of those")
    try:
        ds = datasets.load_dataset(name, split=batch.split)
    except Exception as exc:  # offline, unknown name, unknown split: all end here
        raise ProbeError(
            f"dataset '{name}' (split '{batch.split}') could not be loaded "
            f"({exc.__class__.__name__}: {_first_line(exc)})",
            "check the name and network, or point batch_config.dataset_name to a local .jsonl/.parquet file",
        ) from None
    return ds.to_list(), name, batch.split


def _first_line(exc: Exception, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:limit]


def _field(record: dict, field: str, index: int, what: str) -> str:
    value = record.get(field)
    if value is None:
        raise ProbeError(
            f"dataset record {index} has no {what} field '{field}'",
            f"fix the record or set batch_config.{what}_field",
        )
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ProbeError(
            f"dataset record {index}: {what} field '{field}' is a {type(value).__name__}, expected text",
            f"fix the record or set batch_config.{what}_field",
        )
    return value if isinstance(value, str) else str(value)


def load_prompts(batch: BatchParams) -> PromptSet:
    """Read prompts (+ answers) as named by batch_config, apply the template, and fingerprint them.

    Every record needs a non-empty `prompt_field` and an `answer_field`; a bad record is an error
    naming its index (0-based, file order).
    """
    records, name, split = _load_records(batch)
    if not records:
        raise ProbeError(f"dataset '{name}' has no records", "point batch_config.dataset_name to a non-empty dataset")
    prompts, answers = [], []
    for i, record in enumerate(records):
        prompt = _field(record, batch.prompt_field, i, "prompt")
        if not prompt.strip():
            raise ProbeError(f"dataset record {i} has an empty prompt", "remove the record or fill in its prompt")
        answer = _field(record, batch.answer_field, i, "answer").strip()
        template = batch.prompt_template
        prompts.append(template.replace("{prompt}", prompt) if template else prompt)  # not .format: braces stay
        answers.append(answer)
    return PromptSet(
        name=name, split=split, prompts=prompts, answers=answers, fingerprint=_fingerprint(prompts, answers)
    )


# ---------------------------------------------------------------- rewards

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _as_number(text: str | None) -> Fraction | None:
    """Exact value of an integer/decimal literal ("8", "-2.50"), else None."""
    if text is None:
        return None
    text = text.strip()
    return Fraction(text) if _NUMBER.fullmatch(text) else None


def exact_number(response: str, answer: str | None) -> float:
    """1.0 iff the first integer/decimal number in the response equals the answer numerically."""
    target = _as_number(answer)
    found = _NUMBER.search(response)
    if target is None or found is None:
        return 0.0
    return float(Fraction(found.group()) == target)


def answer_tag(response: str, answer: str | None) -> float:
    """1.0 iff the response has <answer>X</answer> with X (stripped) == answer (numerically if both are numbers)."""
    found = _ANSWER_TAG.search(response)
    if answer is None or found is None:
        return 0.0
    got, want = found.group(1).strip(), answer.strip()
    got_num, want_num = _as_number(got), _as_number(want)
    if got_num is not None and want_num is not None:
        return float(got_num == want_num)
    return float(got == want)


REWARDS: dict[str, RewardFn] = {"exact_number": exact_number, "answer_tag": answer_tag}


def get_reward_fn(name: str) -> RewardFn:
    """A registry name, or a dotted path "pkg.mod:fn" / "pkg.mod.fn" to a callable(response, answer) -> float."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        module_name, _, attr = name.partition(":")
    elif "." in name:
        module_name, _, attr = name.rpartition(".")
    else:
        raise ProbeError(
            f"unknown reward function '{name}'",
            f"use one of {', '.join(sorted(REWARDS))} or a dotted path 'pkg.module:function'",
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ProbeError(
            f"reward module '{module_name}' could not be imported ({exc})",
            "check batch_config.reward_fn and PYTHONPATH",
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ProbeError(f"'{attr}' in module '{module_name}' is not a function", "check batch_config.reward_fn")
    _check_reward_signature(fn, name)
    return fn


def _check_reward_signature(fn: Callable, name: str) -> None:
    """Refuse a callable that cannot be a reward(response, answer): a built-in (os.system, eval: C functions
    that would run or fail on model output) or one whose signature does not take two positional arguments."""
    fix = "batch_config.reward_fn must name a Python function reward(response: str, answer: str | None) -> float"
    if inspect.isbuiltin(fn):
        raise ProbeError(f"reward function '{name}' is a built-in, not a reward(response, answer)", fix)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to read (some C callables): the call will tell
        return
    try:
        signature.bind("response", "answer")
    except TypeError as exc:
        raise ProbeError(
            f"reward function '{name}{signature}' cannot be called as fn(response, answer) ({exc})", fix
        ) from None


def score_responses(
    fn: RewardFn, responses: list[str], answers: list[str | None], prompts: list[str] | None = None
) -> list[float]:
    """[fn(response_i, answer_i)] as floats; a reward function that raises, or returns a non-numeric or
    non-finite reward, is an error naming the function, the response and (when given) its prompt."""
    if len(responses) != len(answers):
        raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
    name = getattr(fn, "__name__", repr(fn))
    rewards = []
    for i, (response, answer) in enumerate(zip(responses, answers)):
        where = f"response {i} ({response!r})" + (f" to prompt {prompts[i]!r}" if prompts is not None else "")
        try:
            raw = fn(response, answer)
        except Exception as exc:  # the user's code: one line naming where, not a traceback through ours
            error = ": ".join(filter(None, (type(exc).__name__, _first_line(exc))))
            raise ProbeError(
                f"reward function '{name}' raised {error} for {where}",
                "fix the reward function (it is called as fn(response, answer) with answer a str or None)",
            ) from None
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise ProbeError(f"reward function '{name}' returned {raw!r} for {where}", "make it return a finite float")
        rewards.append(value)
    return rewards


def score_batch(reward: BatchReward, prompts: list[str], responses: list[str], answers: list, completion_ids: list):
    """A batch reward's values as finite floats: a wrong count, a non-numeric or non-finite value is an error
    naming the reward and the response."""
    name = getattr(reward, "name", None) or getattr(reward, "__name__", repr(reward))
    raw = list(reward(prompts, responses, answers, completion_ids))
    if len(raw) != len(responses):
        raise ProbeError(f"reward '{name}' gave {len(raw)} rewards for {len(responses)} responses", "return one each")
    rewards = []
    for i, value in enumerate(raw):
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            where = f"response {i} ({responses[i]!r}) to prompt {prompts[i]!r}"
            raise ProbeError(f"reward '{name}' gave {value!r} for {where}", "make it return a finite number")
        rewards.append(number)
    return rewards
