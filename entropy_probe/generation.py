"""Drawing responses from exactly π_θ, and the seeds and index plans that make the draws reproducible.

π_θ = top-p(softmax(logits / T)) (docs/math.md §2.1). `generate_responses` runs transformers' `generate`
(batched, KV cache) but makes it sample from exactly π_θ: generate's own config is neutral (T = 1, top-k
off, top-p 1, no penalties, nothing inherited from the checkpoint's generation_config), and one
LogitsProcessor replaces the scores by `policy_logprobs`. (generate runs user processors *before* its
own sampling warpers, so a warper left on — e.g. the global default top_k=50 — would change the draw
without changing what we record; hence the neutral config.) The same processor records, per step, the
behaviour log-prob ℓ_k of the token drawn, the full-vocabulary entropy H_k, the top-1 probability and the
top-1 − top-2 margin (docs/math.md §2.2, §2.3) — so no second forward pass is needed, and memory stays
O(batch · vocab) instead of O(batch · steps · vocab) (as `output_scores` would be). An optional stop
string ends a response (not truncated) once the response text contains it.

Seeds: generate batch b draws with torch's global generator seeded by derive_seed(seed, "generate", b),
the first 63 bits of sha256 — so a batch's samples depend on neither the process that runs it nor the
order; the E plan draws prompts uniformly with replacement, the U plan distinct prompts.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from . import distributed
from .artifacts.samples import TOKEN_KEYS
from .errors import ProbeError
from .policy import distribution_features, entropy_from_logprobs, policy_logprobs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSpec:
    """Everything that decides a draw: π_θ's temperature and top_p, the length cap, the stop string, the
    batching (each generate batch has its own seed, so the batch size changes which tokens are drawn)
    and the seed."""

    temperature: float
    top_p: float
    max_new_tokens: int
    batch_size: int
    seed: int
    stop: str | None = None


# ----------------------------------------------------------------------------- seeds and index plans


def derive_seed(*parts) -> int:
    """A 63-bit seed from sha256 of the parts: independent streams for (seed, purpose, index)."""
    digest = hashlib.sha256(repr(parts).encode()).hexdigest()
    return int(digest[:16], 16) & ((1 << 63) - 1)


def plan_e(n_dataset: int, B_E: int, seed: int) -> torch.Tensor:
    """B_E prompt indices drawn uniformly *with* replacement from range(n_dataset)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "plan_e"))
    return torch.randint(n_dataset, (B_E,), generator=gen, dtype=torch.long)


def plan_u(n_dataset: int, B_U: int, seed: int) -> torch.Tensor:
    """B_U *distinct* prompt indices (uniform without replacement) from range(n_dataset)."""
    if B_U > n_dataset:
        raise ProbeError(
            f"batch_config.B_U = {B_U} distinct prompts requested but the dataset has only {n_dataset}",
            "lower batch_config.B_U or use a larger dataset",
        )
    gen = torch.Generator().manual_seed(derive_seed(seed, "plan_u"))
    return torch.randperm(n_dataset, generator=gen)[:B_U]


# ----------------------------------------------------------------------------- settings taken from the trainer


def resolve_temperature(setting: float | str, recorded: float | None) -> tuple[float, str]:
    """(temperature, where it came from): the params value, else the trainer's `recorded` one, else 1.0."""
    if setting != "auto":
        return float(setting), "params generation.temperature"
    if recorded is not None:
        return float(recorded), "the trainer's saved temperature"
    return 1.0, "default 1.0 (the trainer's temperature is not recorded)"


def resolve_scale(setting: bool | str, recorded: bool | str | None) -> tuple[bool, str]:
    """(divide advantages by the group std?, source): the params value, else the trainer's TRL scale_rewards."""
    if setting != "auto":
        return bool(setting), "params advantage.scale"
    if recorded is None:
        return True, "default True (the trainer's scale_rewards is not recorded; TRL's default is 'group')"
    if recorded in (True, "group", "true", "True"):
        return True, f"the trainer's scale_rewards={recorded!r}"
    if recorded in (False, "none", "false", "False"):
        return False, f"the trainer's scale_rewards={recorded!r}"
    # e.g. TRL's "batch" divides by the std of the whole batch, which the per-group advantages here cannot emulate
    raise ProbeError(
        f"the trainer's scale_rewards={recorded!r} is not emulated (only 'group', 'none' or a bool)",
        "set advantage.scale: true or false explicitly, knowing the emulated step then differs from the trainer's",
    )


# ----------------------------------------------------------------------------- the generate hooks


class PolicyRecorder(LogitsProcessor):
    """Replaces generate's scores by log π (temperature + top-p) and records per-step statistics.

    At step k it sees the logits for response token k; the token drawn at step k is only known at
    step k+1 (last column of `input_ids`), so its log-prob is gathered one step late from the kept
    [n, V] log π of the previous step; `finish` gathers the last one.
    """

    def __init__(self, temperature: float, top_p: float):
        self.temperature, self.top_p = temperature, top_p
        self.prev: torch.Tensor | None = None
        self.logprobs, self.entropies, self.top1, self.margin = [], [], [], []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prev is not None:
            self.logprobs.append(self.prev.gather(-1, input_ids[:, -1:]).squeeze(-1))
        logp = policy_logprobs(scores, self.temperature, self.top_p)
        top1, margin = distribution_features(logp)
        self.entropies.append(entropy_from_logprobs(logp))
        self.top1.append(top1)
        self.margin.append(margin)
        self.prev = logp
        return logp  # generate samples from softmax(logp) = π exactly

    def finish(self, sequences: torch.Tensor, n_steps: int) -> dict[str, torch.Tensor]:
        """Stack the records of the first n_steps steps into [n, n_steps] float32 tensors."""
        if len(self.logprobs) < n_steps:  # the last step's token was never seen by __call__
            self.logprobs.append(self.prev.gather(-1, sequences[:, -1:]).squeeze(-1))
        self.prev = None
        stack = lambda xs: torch.stack(xs[:n_steps], dim=1).float()  # noqa: E731
        return {
            "logprobs": stack(self.logprobs),
            "entropies": stack(self.entropies),
            "top1_prob": stack(self.top1),
            "margin": stack(self.margin),
        }


class StopOnString(StoppingCriteria):
    """Stops a row once its *response* text contains `stop`; records the step where that first happened.

    Each step decodes only the last `len(stop) + 8` response tokens of every row (special tokens
    skipped): a new occurrence must end in the newest token, so that window holds it unless many
    tokens decode to nothing. (transformers' StopStringCriteria needs a tokenizer that can encode
    "abcdef", which the tiny character tokenizer cannot, and also matches across the prompt.)
    """

    def __init__(self, tokenizer, stop: str, n_prompt_cols: int, n_rows: int, device):
        self.tokenizer, self.stop, self.n_prompt_cols = tokenizer, stop, n_prompt_cols
        self.window = len(stop) + 8
        self.first = torch.full((n_rows,), -1, dtype=torch.long, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        n_cols = input_ids.shape[1]
        recent = input_ids[:, max(self.n_prompt_cols, n_cols - self.window) :]
        texts = self.tokenizer.batch_decode(recent.tolist(), skip_special_tokens=True)
        hit = torch.tensor([self.stop in t for t in texts], dtype=torch.bool, device=input_ids.device)
        step = torch.full_like(self.first, n_cols - self.n_prompt_cols - 1)
        self.first = torch.where((self.first < 0) & hit, step, self.first)
        return hit


def special_ids(tokenizer) -> tuple[int, int]:
    """(eos, pad) token ids; pad defaults to eos (responses are delimited by lengths, never by pad)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ProbeError("the tokenizer has no eos token", "use a tokenizer with eos_token set")
    pad = tokenizer.pad_token_id
    return int(eos), int(eos if pad is None else pad)


def neutral_generation_config(max_new_tokens: int, eos: int, pad: int) -> GenerationConfig:
    """Sampling with no transformation of the scores by generate itself (our processor does it all)."""
    return GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,  # the global default is 50
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,  # the tokenizer's eos, as TRL's GRPO trainer uses
        pad_token_id=pad,
        bos_token_id=None,
        num_beams=1,
        num_return_sequences=1,
        use_cache=True,
        return_dict_in_generate=False,
    )


@contextlib.contextmanager
def _without_checkpoint_generation_config(model):
    """Temporarily blank the model's generation_config.

    `generate` fills every unset field of the config we pass from the checkpoint's
    generation_config.json (e.g. repetition_penalty, min_p, suppress_tokens), and some of those
    fields can only be switched off by leaving them unset — so blank the source instead, on every
    module that owns one (a PeftModel forwards the attribute to its base and copies it back there).
    """
    modules = [model, model.get_base_model()] if hasattr(model, "get_base_model") else [model]
    saved = [(m, m.generation_config) for m in modules if "generation_config" in vars(m)]
    blank = GenerationConfig()
    for m, _ in saved:
        m.generation_config = blank
    try:
        yield
    finally:
        for m, config in saved:
            m.generation_config = config


# ----------------------------------------------------------------------------- generation


def _response_lengths(
    generated: torch.Tensor, eos: int, stop_first: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(response_lens, truncated) of generated tokens [n, S]: up to and incl. the first eos or stop.

    The first eos is searched in the sampled tokens (pad may equal eos, so pad never marks the end).
    """
    n_steps = generated.shape[1]
    is_eos = generated == eos
    has_eos = is_eos.any(dim=1)
    full = torch.full_like(has_eos, n_steps, dtype=torch.long)
    lens = torch.where(has_eos, is_eos.long().argmax(dim=1) + 1, full)  # argmax: first maximal entry
    ended = has_eos
    if stop_first is not None:
        has_stop = stop_first >= 0
        lens = torch.minimum(lens, torch.where(has_stop, stop_first + 1, full))
        ended = ended | has_stop
    return lens, ~ended


@torch.no_grad()
def generate_responses(
    model, tokenizer, prompts: list[str], spec: GenerationSpec, *, progress: bool = True, batch_offset: int = 0
) -> dict[str, torch.Tensor]:
    """Sample one response per prompt from π_θ; return the sample artifact's tensors (CPU).

    input_ids/attention_mask [N, P+R] (prompt left-padded into P columns, response right-padded
    into R = longest response columns), prompt_lens, response_lens (incl. eos when emitted),
    truncated (no eos/stop within max_new_tokens) [N], and float32 [N, R] logprobs, entropies,
    top1_prob, margin. Batch b is seeded from (spec.seed, batch_offset + b) alone, so a batch's samples
    do not depend on which process or in which order it runs.
    """
    batches = generate_batches(model, tokenizer, prompts, spec, progress=progress, batch_offset=batch_offset)
    return place_batches(batches, special_ids(tokenizer)[1])


@torch.no_grad()
def generate_batches(
    model, tokenizer, prompts: list[str], spec: GenerationSpec, *, progress: bool = True, batch_offset: int = 0
) -> list[dict[str, torch.Tensor]]:
    """The generate batches of `generate_responses` before they are put into one layout (CPU tensors).

    Each holds prompt_ids/prompt_mask [n, P_b] (left-padded to the batch's longest prompt), generated
    [n, S_b], response_lens, truncated [n] and the per-step statistics [n, S_b]. Batches from several
    processes can be concatenated in batch order and placed by `place_batches`, which needs the P and R
    of *all* of them.
    """
    if model.training:
        raise ValueError("generate_responses needs the model in eval mode (dropout off)")
    if not prompts:
        raise ValueError("no prompts to generate from")
    eos, pad = special_ids(tokenizer)
    config = neutral_generation_config(spec.max_new_tokens, eos, pad)
    starts = range(0, len(prompts), spec.batch_size)
    return [
        _generate_batch(model, tokenizer, prompts, start, batch_offset + b, spec, config, eos)
        for b, start in enumerate(tqdm(starts, desc="generate", unit="batch", disable=None if progress else True))
    ]


def _generate_batch(model, tokenizer, prompts, start, batch_index, spec, config, eos) -> dict[str, torch.Tensor]:
    """One generate batch: prompts[start : start + batch_size], seeded by its global `batch_index`."""
    device = model.get_input_embeddings().weight.device
    enc = tokenizer(
        prompts[start : start + spec.batch_size],
        return_tensors="pt",
        padding=True,
        padding_side="left",
        add_special_tokens=False,  # prompts are used as given (chat template already applied), as TRL does
    )
    empty = (enc["attention_mask"].sum(dim=1) == 0).nonzero().flatten()
    if len(empty) or enc["input_ids"].shape[1] == 0:
        i = start + (int(empty[0]) if len(empty) else 0)
        raise ProbeError(f"prompt {i} ({prompts[i]!r}) is empty after tokenisation", "remove empty prompts")
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    P_b = ids.shape[1]
    recorder = PolicyRecorder(spec.temperature, spec.top_p)
    criteria = StoppingCriteriaList()
    stopper = None
    if spec.stop:
        stopper = StopOnString(tokenizer, spec.stop, P_b, ids.shape[0], device)
        criteria.append(stopper)
    torch.manual_seed(derive_seed(spec.seed, "generate", batch_index))
    with _without_checkpoint_generation_config(model):
        sequences = model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([recorder]),
            stopping_criteria=criteria,
        )
    generated = sequences[:, P_b:]
    stats = recorder.finish(sequences, generated.shape[1])
    lens, truncated = _response_lengths(generated, eos, stopper.first if stopper else None)
    if bool((lens[truncated] != spec.max_new_tokens).any()):
        raise RuntimeError("generate stopped a row that had neither eos nor stop string")  # a bug, not input
    return {
        "prompt_ids": ids.cpu(),
        "prompt_mask": mask.long().cpu(),
        "generated": generated.cpu(),
        "response_lens": lens.cpu(),
        "truncated": truncated.cpu(),
        **{k: v.cpu() for k, v in stats.items()},
    }


# ----------------------------------------------------------------------------- the artifact layout


def place_batches(batches: list[dict[str, torch.Tensor]], pad: int) -> dict[str, torch.Tensor]:
    """Concatenate generate batches into the artifact layout: P = longest prompt, R = longest response of all."""
    P = max(x["prompt_ids"].shape[1] for x in batches)
    R = max(int(x["response_lens"].max()) for x in batches)
    placed = [_place_batch(x, P, R, pad) for x in batches]
    return {key: torch.cat([p[key] for p in placed]) for key in placed[0]}


def _place_batch(batch: dict, P: int, R: int, pad: int) -> dict[str, torch.Tensor]:
    """Re-pad one generate batch into the artifact layout: prompt left-padded to P, response right-padded to R."""
    n, P_b = batch["prompt_ids"].shape
    lens = batch["response_lens"]
    r = min(R, batch["generated"].shape[1])
    valid = torch.arange(r)[None, :] < lens[:, None]  # [n, r]
    input_ids = torch.full((n, P + R), pad, dtype=torch.long)
    attention = torch.zeros((n, P + R), dtype=torch.long)
    input_ids[:, P - P_b : P] = batch["prompt_ids"]
    attention[:, P - P_b : P] = batch["prompt_mask"]
    input_ids[:, P : P + r] = torch.where(valid, batch["generated"][:, :r], pad)
    attention[:, P : P + r] = valid.long()
    out = {"input_ids": input_ids, "attention_mask": attention}
    for key in TOKEN_KEYS:
        stat = torch.zeros((n, R), dtype=torch.float32)
        stat[:, :r] = torch.where(valid, batch[key][:, :r], 0.0)
        out[key] = stat
    out["prompt_lens"] = batch["prompt_mask"].sum(dim=1)
    out["response_lens"] = lens
    out["truncated"] = batch["truncated"]
    return out


@dataclass(frozen=True)
class Plan:
    """Which prompt each row answers (a U group's G rows are contiguous), and the seed of the draw."""

    kind: str
    rows: torch.Tensor  # [N] prompt indices
    G: int
    seed: int

    @property
    def n_prompts(self) -> int:
        return len(self.rows) // self.G

    @property
    def replacement(self) -> str:
        return "with replacement" if self.kind == "samples_e" else "without replacement"


def make_plan(params, kind: str, n_dataset: int, n: int | None = None, seed: int | None = None) -> Plan:
    """The draw of `kind`: n prompts (default batch_config.B_E / B_U) with seed (default sampling.seed_e / seed_u);
    the defaults are read only when n / seed are not given."""
    batch, sampling = params.batch_config, params.sampling
    if kind == "samples_e":
        n, seed = batch.B_E if n is None else n, sampling.seed_e if seed is None else seed
        return Plan(kind, plan_e(n_dataset, n, seed), 1, seed)
    n, seed = batch.B_U if n is None else n, sampling.seed_u if seed is None else seed
    return Plan(kind, plan_u(n_dataset, n, seed).repeat_interleave(batch.G), batch.G, seed)


def generate_share(model, tokenizer, prompts: list[str], spec: GenerationSpec, stage: str) -> list[dict]:
    """This process's contiguous share of the generate batches, each seeded by its global batch index, so the
    union over processes is exactly what one process would draw."""
    n_batches = math.ceil(len(prompts) / spec.batch_size)
    share = distributed.row_slice(n_batches, distributed.rank(), distributed.world_size())
    lo, hi = share.start * spec.batch_size, min(share.stop * spec.batch_size, len(prompts))
    if distributed.world_size() > 1:
        log.info(
            "%s: rank %d generates batches %d..%d of %d",
            stage,
            distributed.rank(),
            share.start,
            share.stop - 1,
            n_batches,
        )
    if hi <= lo:
        return []
    return generate_batches(
        model, tokenizer, prompts[lo:hi], spec, progress=distributed.is_rank0(), batch_offset=share.start
    )
