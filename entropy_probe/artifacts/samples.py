"""The sample artifacts of sample-e (kind samples_e) and sample-u (kind samples_u).

One directory holds samples.safetensors (the tensors; the metadata, `SamplesMeta`, in its header) and
samples.json (the same metadata, for people and DVC). Layout (docs/math.md §2.3): row i is prompt i
left-padded into P columns followed by its response right-padded into R columns (R = the longest
response), so C = P + R columns; response token k of row i is column P + k, real iff k < response_lens[i].

    input_ids, attention_mask   long [N, C]     attention_mask = prompt tokens + response tokens
    prompt_lens, response_lens  long [N]        response_lens counts the eos / stop string when emitted
    truncated                   bool [N]        no eos or stop within max_new_tokens
    prompt_index                long [N]        the row's record in the prompt set
    logprobs, entropies,        float32 [N, R]  behaviour ℓ_k, H_k, top-1 probability, top-1 − top-2
      top1_prob, margin                         margin of each response step; 0 on padding
    rewards, advantages         float32 [N]     samples_u only: r_i and A_i (docs/math.md §4.1)
    group_index                 long [N]        samples_u only: i // G (the G rows of a group are contiguous)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Literal, Mapping

import torch
from pydantic import ValidationError, field_validator

from ..errors import ProbeError
from ..files import SCHEMA_VERSION, read_tensors, write_tensors
from .base import JsonArtifact, Record

SAMPLES_FILE = "samples.safetensors"
SAMPLES_JSON = "samples.json"
STAGES = {"samples_e": "sample-e", "samples_u": "sample-u"}  # kind -> the stage that writes it
KINDS = tuple(STAGES)
TOKEN_KEYS = ("logprobs", "entropies", "top1_prob", "margin")  # float32 [N, R], 0 on padding

_SCHEMA: dict[str, tuple[torch.dtype, str]] = {
    "input_ids": (torch.long, "NC"),
    "attention_mask": (torch.long, "NC"),
    "prompt_lens": (torch.long, "N"),
    "response_lens": (torch.long, "N"),
    "truncated": (torch.bool, "N"),
    "prompt_index": (torch.long, "N"),
    **{key: (torch.float32, "NR") for key in TOKEN_KEYS},
}
_SCHEMA_U: dict[str, tuple[torch.dtype, str]] = {
    "rewards": (torch.float32, "N"),
    "advantages": (torch.float32, "N"),
    "group_index": (torch.long, "N"),
}


# ----------------------------------------------------------------------------- the metadata


class LoadRecord(Record):
    dtype: str
    use_qlora: bool


class TokenizerIdentity(Record):
    vocab_size: int
    vocab_sha256: str


class GenerationRecord(Record):
    temperature: float
    temperature_source: str
    top_p: float
    max_new_tokens: int
    stop: str | None


class DatasetRecord(Record):
    name: str
    split: str
    fingerprint: str
    size: int


class AdvantageRecord(Record):
    scale: bool
    eps: float


class SamplesMeta(JsonArtifact):
    """samples.json, and the metadata in samples.safetensors' header (the same keys, in this order)."""

    FILE: ClassVar[str] = SAMPLES_JSON
    STAGE: ClassVar[str] = "sample-e or sample-u"

    schema_version: str
    kind: Literal["samples_e", "samples_u"]
    checkpoint_fingerprint: str  # of the sampler, which may differ from the probed checkpoint
    checkpoint_path: str
    load: LoadRecord
    tokenizer: TokenizerIdentity
    generation: GenerationRecord
    seed: int
    dataset: DatasetRecord
    reward_fn: str | None  # samples_u only
    advantage: AdvantageRecord | None  # samples_u only
    world_size: int
    n_prompts: int
    n_sequences: int
    n_distinct_prompts: int
    with_replacement: bool
    G: int
    mean_reward: float | None  # samples_u only
    frac_all_equal_groups: float | None  # samples_u only
    mean_response_len: float
    frac_truncated: float

    @field_validator("schema_version")
    @classmethod
    def _this_version(cls, v: str) -> str:
        if v != SCHEMA_VERSION:
            raise ValueError(f"schema {v}, this version reads {SCHEMA_VERSION}")
        return v


def sample_counts(tensors: Mapping[str, torch.Tensor], G: int) -> dict:
    """The metadata's counts and means of sample tensors whose groups are G contiguous rows (rewards: U only)."""
    N, rewards = len(tensors["prompt_index"]), tensors.get("rewards")
    grouped = None if rewards is None else rewards.view(N // G, G)
    return {
        "n_prompts": N // G,
        "n_sequences": N,
        "n_distinct_prompts": int(tensors["prompt_index"].unique().numel()),
        "G": G,
        "mean_reward": None if rewards is None else float(rewards.mean()),
        # share of groups whose rewards are all equal (zero advantage: no learning signal)
        "frac_all_equal_groups": None
        if grouped is None
        else float((grouped == grouped[:, :1]).all(dim=1).float().mean()),
        "mean_response_len": float(tensors["response_lens"].float().mean()),
        "frac_truncated": float(tensors["truncated"].float().mean()),
    }


def tokenizer_identity(tokenizer) -> dict:
    """len(tokenizer) and a short sha256 of its vocabulary (token -> id, added tokens included)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {"vocab_size": len(tokenizer), "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest()[:16]}


# ----------------------------------------------------------------------------- the artifact


@dataclass(eq=False)
class Samples:
    """A sample artifact in memory: the tensors of the module docstring and their metadata."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_lens: torch.Tensor
    response_lens: torch.Tensor
    truncated: torch.Tensor
    prompt_index: torch.Tensor
    logprobs: torch.Tensor
    entropies: torch.Tensor
    top1_prob: torch.Tensor
    margin: torch.Tensor
    meta: SamplesMeta
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    group_index: torch.Tensor | None = None
    source: Path | None = field(default=None, repr=False)  # the file it was read from (named in errors)

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def n_response_cols(self) -> int:
        """R: the longest response."""
        return self.logprobs.shape[1]

    @property
    def n_prompt_cols(self) -> int:
        """P = C − R: the longest prompt."""
        return self.input_ids.shape[1] - self.n_response_cols

    def response_mask(self) -> torch.Tensor:
        """[N, R] bool: column k of row i is a response token iff k < response_lens[i]."""
        return _response_mask(self.response_lens, self.n_response_cols)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by their artifact names (the U-only ones when present)."""
        names = [f.name for f in fields(self) if f.name not in ("meta", "source")]
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def problem(self) -> str | None:
        """The first schema violation, as text; None when the artifact is consistent."""
        return _check(self.tensors(), self.meta)

    def write(self, directory: str | Path) -> None:
        """Write samples.safetensors (metadata in its header) and samples.json into `directory`.

        Nothing time-dependent goes in: the same seed and inputs give byte-identical files.
        """
        problem = self.problem()
        if problem is not None:  # the stage built it: a bug, not user input
            raise RuntimeError(f"{STAGES[self.kind]} produced a malformed artifact: {problem}")
        directory = Path(directory)
        write_tensors(directory / SAMPLES_FILE, self.tensors(), self.kind, self.meta.model_dump(mode="json"))
        self.meta.write(directory)

    @classmethod
    def read(cls, directory: str | Path, kind: str) -> Samples:
        """Read `directory/samples.safetensors` of `kind`; a foreign, stale or malformed file is a one-line error."""
        path = Path(directory) / SAMPLES_FILE
        tensors, raw = read_tensors(path, _known_kind(kind))
        try:
            meta = SamplesMeta.model_validate(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(part) for part in err["loc"]) or "(top level)"
            raise _malformed(path, kind, f"metadata {key}: {err['msg']}") from None
        problem = f"the metadata says kind '{meta.kind}'" if meta.kind != kind else _check(tensors, meta)
        if problem is not None:
            raise _malformed(path, kind, problem)
        return cls(**tensors, meta=meta, source=path)

    def check_fits_model(self, model, tokenizer) -> None:
        """Refuse samples the model cannot score: a token id beyond its embedding table, or another tokenizer
        than the one that drew them. Cheap; call it before any pass over the samples."""
        where = f"samples in {self.source}" if self.source is not None else "the samples"
        fix = "they were made with another tokenizer; re-run sample-e and sample-u with this checkpoint"
        n_embed = model.get_input_embeddings().num_embeddings
        top = int(self.input_ids.max())
        if top >= n_embed:
            raise ProbeError(f"{where} hold token id {top} but the model's vocabulary has {n_embed} entries", fix)
        recorded, current = self.meta.tokenizer, TokenizerIdentity(**tokenizer_identity(tokenizer))
        if recorded != current:
            raise ProbeError(
                f"{where} were made with a tokenizer of {recorded.vocab_size} tokens (vocabulary "
                f"{recorded.vocab_sha256}); this checkpoint's has {current.vocab_size} tokens ({current.vocab_sha256})",
                fix,
            )


def _response_mask(response_lens: torch.Tensor, n_response_cols: int) -> torch.Tensor:
    return torch.arange(n_response_cols)[None, :] < response_lens[:, None]


def _malformed(path: Path, kind: str, problem: str) -> ProbeError:
    return ProbeError(f"sample artifact {path} is malformed: {problem}", f"rerun the {STAGES[kind]} stage")


def _known_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    return kind


def _check(tensors: Mapping[str, torch.Tensor], meta: SamplesMeta) -> str | None:
    """The first inconsistency of tensors and metadata, as text; None when there is none."""
    problem = _check_tensors(tensors, meta.kind, meta.generation.max_new_tokens, meta.G)
    N = tensors["input_ids"].shape[0] if problem is None else 0
    if problem is None and not meta.n_sequences == meta.n_prompts * meta.G == N:
        problem = f"n_sequences = {meta.n_sequences}, n_prompts × G = {meta.n_prompts} × {meta.G}, but {N} rows"
    return problem


def _check_tensors(tensors: Mapping[str, torch.Tensor], kind: str, max_new_tokens: int | None, G) -> str | None:
    """The first schema violation of the tensors of a sample artifact (module docstring), as text; None if none."""
    schema = {**_SCHEMA, **(_SCHEMA_U if kind == "samples_u" else {})}
    missing = [k for k in schema if k not in tensors]
    if missing:
        return f"missing tensors {missing}"
    extra = sorted(set(tensors) - set(schema))
    if extra:
        return f"unexpected tensors {extra}"
    for key, (dtype, dims) in schema.items():
        if tensors[key].dtype != dtype or tensors[key].dim() != len(dims):
            return f"'{key}' is {tensors[key].dtype} with {tensors[key].dim()} dims, expected {dtype} with {len(dims)}"
    N, R = tensors["logprobs"].shape
    C = tensors["input_ids"].shape[1]
    P = C - R
    sizes = {"N": N, "C": C, "R": R}
    for key, (_, dims) in schema.items():
        expected = tuple(sizes[d] for d in dims)
        if tuple(tensors[key].shape) != expected:
            return f"'{key}' has shape {tuple(tensors[key].shape)}, expected {expected}"
    if N == 0 or P < 1 or R < 1:
        return f"empty artifact (N={N}, P={P}, R={R})"
    if bool((tensors["input_ids"] < 0).any()):
        return "negative token ids"
    plens, rlens = tensors["prompt_lens"], tensors["response_lens"]
    if bool(((plens < 1) | (plens > P)).any()) or bool(((rlens < 1) | (rlens > R)).any()):
        return "prompt_lens/response_lens out of range"
    cols = torch.arange(C)[None, :]
    expected_mask = ((cols >= P - plens[:, None]) & (cols < P)) | ((cols >= P) & (cols < P + rlens[:, None]))
    if not torch.equal(tensors["attention_mask"], expected_mask.long()):
        return "attention_mask is inconsistent with prompt_lens/response_lens"
    mask = _response_mask(rlens, R)
    for key in TOKEN_KEYS:
        x = tensors[key]
        if bool((x[~mask] != 0).any()):
            return f"'{key}' is non-zero on padding"
        if not bool(torch.isfinite(x[mask]).all()):
            return f"'{key}' has non-finite values"
    if bool((tensors["logprobs"] > 1e-5).any()) or bool((tensors["entropies"] < -1e-5).any()):
        return "log-probs > 0 or entropies < 0"
    if max_new_tokens is not None and bool((rlens[tensors["truncated"]] != max_new_tokens).any()):
        return f"a truncated response is not max_new_tokens = {max_new_tokens} long"
    if kind == "samples_u":
        if not isinstance(G, int) or G < 1 or N % G:
            return f"G = {G!r} in the metadata does not divide N = {N}"
        if not torch.equal(tensors["group_index"], torch.arange(N // G).repeat_interleave(G)):
            return "group_index is not contiguous groups of G rows"
        if not bool(torch.isfinite(tensors["rewards"]).all() & torch.isfinite(tensors["advantages"]).all()):
            return "rewards/advantages have non-finite values"
    return None


def response_mask(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[N, R] bool of tensors in the artifact layout: column k of row i is a response token iff k < response_lens[i]."""
    return _response_mask(tensors["response_lens"], tensors["logprobs"].shape[1])


def decode_responses(tokenizer, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Response texts of sample tensors in the artifact layout (special tokens such as eos removed)."""
    R = tensors["logprobs"].shape[1]
    ids = tensors["input_ids"][:, tensors["input_ids"].shape[1] - R :]
    return [
        tokenizer.decode(row[: int(n)].tolist(), skip_special_tokens=True)
        for row, n in zip(ids, tensors["response_lens"])
    ]
