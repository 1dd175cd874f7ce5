"""The `sample-e` and `sample-u` stages: draw responses from π_θ and record the behaviour policy.

E batch: B_E prompts drawn with replacement, one response each (G = 1).
U batch: B_U distinct prompts, G responses each (rows of a group contiguous), rewards, advantages.

`generate_responses` runs transformers' `generate` (batched, KV cache) but makes it sample from
exactly π_θ = top-p(softmax(logits / T)): generate's own config is neutral (T = 1, top-k off,
top-p 1, no penalties, nothing inherited from the checkpoint's generation_config), and one
LogitsProcessor replaces the scores by `policy_logprobs`. (generate runs user processors *before*
its own sampling warpers, so a warper left on — e.g. the global default top_k=50 — would change
the draw without changing what we record; hence the neutral config, and frequency tests.)
The same processor records, per step,
the behaviour log-prob of the token actually drawn, the full-vocabulary entropy, the top-1
probability and the top-1 − top-2 margin — so no second forward pass is needed, and memory stays
O(batch · vocab) instead of O(batch · steps · vocab) (as `output_scores` would be).
An optional stop string ends a response (not truncated) once the response text contains it.

Under torchrun (`entropy_probe.distributed`) rank 0 makes the index plan and broadcasts it; each process generates
a contiguous share of the generate batches, each seeded by its global batch index, and rank 0 lays the
gathered batches out (global P and R) and writes one artifact — the same tensors as one process draws.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from . import distributed, files, outputs
from .errors import ProbeError
from .policy import distribution_features, entropy_from_logprobs, policy_logprobs

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.safetensors"
SAMPLES_JSON = "samples.json"
KINDS = ("samples_e", "samples_u")
TOKEN_KEYS = ("logprobs", "entropies", "top1_prob", "margin")  # float32 [N, R], 0 on padding


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


# ----------------------------------------------------------------------------- generation


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


def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


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


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: list[str],
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    stop: str | None = None,
    progress: bool = True,
    batch_offset: int = 0,
) -> dict[str, torch.Tensor]:
    """Sample one response per prompt from π_θ; return the artifact tensors (CPU).

    input_ids/attention_mask [N, P+R] (prompt left-padded into P columns, response right-padded
    into R = longest response columns), prompt_lens, response_lens (incl. eos when emitted),
    truncated (no eos/stop within max_new_tokens) [N], and float32 [N, R] logprobs, entropies,
    top1_prob, margin. Batch b is seeded from (seed, batch_offset + b) alone, so a batch's samples
    do not depend on which process or in which order it runs.
    """
    batches = generate_batches(
        model, tokenizer, prompts, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
        batch_size=batch_size, seed=seed, stop=stop, progress=progress, batch_offset=batch_offset,
    )  # fmt: skip
    return place_batches(batches, special_ids(tokenizer)[1])


@torch.no_grad()
def generate_batches(
    model,
    tokenizer,
    prompts: list[str],
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    stop: str | None = None,
    progress: bool = True,
    batch_offset: int = 0,
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
    config = neutral_generation_config(max_new_tokens, eos, pad)
    device = _input_device(model)
    batches = []
    starts = range(0, len(prompts), batch_size)
    for b, start in enumerate(tqdm(starts, desc="generate", unit="batch", disable=None if progress else True)):
        enc = tokenizer(
            prompts[start : start + batch_size],
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
        recorder = PolicyRecorder(temperature, top_p)
        criteria = StoppingCriteriaList()
        stopper = None
        if stop:
            stopper = StopOnString(tokenizer, stop, P_b, ids.shape[0], device)
            criteria.append(stopper)
        torch.manual_seed(derive_seed(seed, "generate", batch_offset + b))
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
        if bool((lens[truncated] != max_new_tokens).any()):
            raise RuntimeError("generate stopped a row that had neither eos nor stop string")  # a bug, not input
        batches.append(
            {
                "prompt_ids": ids.cpu(),
                "prompt_mask": mask.long().cpu(),
                "generated": generated.cpu(),
                "response_lens": lens.cpu(),
                "truncated": truncated.cpu(),
                **{k: v.cpu() for k, v in stats.items()},
            }
        )
    return batches


def place_batches(batches: list[dict[str, torch.Tensor]], pad: int) -> dict[str, torch.Tensor]:
    """Concatenate generate batches into the artifact layout: P = longest prompt, R = longest response of all."""
    P = max(x["prompt_ids"].shape[1] for x in batches)
    R = max(int(x["response_lens"].max()) for x in batches)
    placed = [_place_batch(x, P, R, pad) for x in batches]
    return {key: torch.cat([p[key] for p in placed]) for key in placed[0]}


def decode_responses(tokenizer, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Response texts (special tokens such as eos removed)."""
    R = tensors["logprobs"].shape[1]
    P = tensors["input_ids"].shape[1] - R
    ids = tensors["input_ids"][:, P:]
    return [
        tokenizer.decode(row[: int(n)].tolist(), skip_special_tokens=True)
        for row, n in zip(ids, tensors["response_lens"])
    ]


# ----------------------------------------------------------------------------- artifact schema


def response_mask(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N, R] bool: column k of row i is a response token iff k < response_lens[i]."""
    R = tensors["logprobs"].shape[1]
    return torch.arange(R)[None, :] < tensors["response_lens"][:, None]


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


def check_samples(tensors: dict[str, torch.Tensor], meta: dict, kind: str) -> str | None:
    """The first schema violation of a sample artifact, as text; None when it is consistent."""
    schema = {**_SCHEMA, **(_SCHEMA_U if kind == "samples_u" else {})}
    missing = [k for k in schema if k not in tensors]
    if missing:
        return f"missing tensors {missing}"
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
    mask = response_mask(tensors)
    for key in TOKEN_KEYS:
        x = tensors[key]
        if bool((x[~mask] != 0).any()):
            return f"'{key}' is non-zero on padding"
        if not bool(torch.isfinite(x[mask]).all()):
            return f"'{key}' has non-finite values"
    if bool((tensors["logprobs"] > 1e-5).any()) or bool((tensors["entropies"] < -1e-5).any()):
        return "log-probs > 0 or entropies < 0"
    max_new = (meta.get("generation") or {}).get("max_new_tokens")
    if max_new is not None and bool((rlens[tensors["truncated"]] != max_new).any()):
        return f"a truncated response is not max_new_tokens = {max_new} long"
    if kind == "samples_u":
        G = meta.get("G")
        if not isinstance(G, int) or G < 1 or N % G:
            return f"G = {G!r} in the metadata does not divide N = {N}"
        if not torch.equal(tensors["group_index"], torch.arange(N // G).repeat_interleave(G)):
            return "group_index is not contiguous groups of G rows"
        if not bool(torch.isfinite(tensors["rewards"]).all() & torch.isfinite(tensors["advantages"]).all()):
            return "rewards/advantages have non-finite values"
    for key in ("checkpoint_fingerprint", "generation", "seed"):
        if key not in meta:
            return f"metadata lacks '{key}'"
    return None


def load_samples(sample_dir: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read `sample_dir/samples.safetensors` of kind samples_e/samples_u and check its schema."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    path = Path(sample_dir) / SAMPLES_FILE
    tensors, meta = files.read_tensors(path, kind)
    problem = check_samples(tensors, meta, kind)
    if problem is not None:
        stage = "sample-e" if kind == "samples_e" else "sample-u"
        raise ProbeError(f"sample artifact {path} is malformed: {problem}", f"rerun the {stage} stage")
    return tensors, meta


def tokenizer_identity(tokenizer) -> dict:
    """len(tokenizer) and a short sha256 of its vocabulary (token -> id, added tokens included)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {"vocab_size": len(tokenizer), "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest()[:16]}


def check_samples_fit_model(tensors: dict[str, torch.Tensor], meta: dict, sample_dir, model, tokenizer) -> None:
    """Refuse samples the model cannot score: a token id beyond its embedding table, or (when the samples
    record one) another tokenizer than `tokenizer`. Cheap; call it before any pass over the samples."""
    path = Path(sample_dir) / SAMPLES_FILE
    fix = "they were made with another tokenizer; re-run sample-e and sample-u with this checkpoint"
    n_embed = model.get_input_embeddings().num_embeddings
    top = int(tensors["input_ids"].max())
    if top >= n_embed:
        raise ProbeError(f"samples in {path} hold token id {top} but the model's vocabulary has {n_embed} entries", fix)
    recorded, current = meta.get("tokenizer"), tokenizer_identity(tokenizer)
    if recorded is not None and recorded != current:
        recorded = recorded if isinstance(recorded, dict) else {}
        raise ProbeError(
            f"samples in {path} were made with a tokenizer of {recorded.get('vocab_size')} tokens (vocabulary "
            f"{recorded.get('vocab_sha256')}); this checkpoint's has {current['vocab_size']} tokens "
            f"({current['vocab_sha256']})",
            fix,
        )


# ----------------------------------------------------------------------------- the stages


def resolve_temperature(setting, trainer_config: dict) -> tuple[float, str]:
    """(temperature, where it came from): params value, else the trainer's, else 1.0."""
    if setting != "auto":
        return float(setting), "params generation.temperature"
    recorded = trainer_config.get("temperature")
    if recorded is not None:
        return float(recorded), "the trainer's saved temperature"
    return 1.0, "default 1.0 (the trainer's temperature is not recorded)"


def resolve_scale(setting, trainer_config: dict) -> tuple[bool, str]:
    """(divide advantages by group std?, source): params value, else TRL's scale_rewards."""
    if setting != "auto":
        return bool(setting), "params advantage.scale"
    recorded = trainer_config.get("scale_rewards")
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


def sampler_checkpoint(params):
    """CheckpointParams of the checkpoint that draws the samples: `sampling.checkpoint`, else `checkpoint.path`.

    Samples record its fingerprint, so delta-h1 can probe other checkpoints with the same samples
    (importance-weighted) — which is why sampling reads the checkpoint itself and not verify's report.
    """
    path = params.sampling.checkpoint or params.checkpoint.path
    return params.checkpoint.model_copy(update={"path": path})


def _plan(params, kind: str, n_dataset: int) -> tuple[torch.Tensor, int, int]:
    """(prompt index per row [N], G, seed) — rows of a U group are contiguous."""
    batch = params.batch_config
    if kind == "samples_e":
        seed = params.sampling.seed_e
        return plan_e(n_dataset, batch.B_E, seed), 1, seed
    seed = params.sampling.seed_u
    return plan_u(n_dataset, batch.B_U, seed).repeat_interleave(batch.G), batch.G, seed


def _fraction_all_equal(rewards: torch.Tensor) -> float:
    """Share of groups [B, G] whose rewards are all equal (zero advantage: no learning signal)."""
    return float((rewards == rewards[:, :1]).all(dim=1).float().mean())


def _run(params, out_dir: str | Path, dry_run: bool, kind: str) -> None:
    from . import task  # stage-level imports: keep `import entropy_probe.sampling` light

    stage = "sample-e" if kind == "samples_e" else "sample-u"
    batch, gen = params.batch_config, params.generation
    prompt_set = task.load_prompts(batch)
    # rank 0 makes the index plan and every rank uses its copy (under torchrun; else just the plan)
    rows, G, seed = distributed.on_rank0(lambda: _plan(params, kind, len(prompt_set)))
    n_prompts = len(rows) // G
    n_distinct = int(rows.unique().numel())
    n_batches = math.ceil(len(rows) / gen.gen_batch_size)
    replacement = "with replacement" if kind == "samples_e" else "without replacement"
    world = distributed.world_size()
    if dry_run:
        if distributed.is_rank0():
            print(
                f"{stage} plan: {n_prompts} prompts {replacement} from '{prompt_set.name}' ({len(prompt_set)} records), "
                f"G={G}, {len(rows)} sequences ({n_distinct} distinct prompts), "
                f"{n_batches} generate batches of <= {gen.gen_batch_size}, max_new_tokens={gen.max_new_tokens}, "
                f"seed={seed}, {world} process{'es' if world > 1 else ''}, output {out_dir}"
            )
        return

    from . import checkpoint

    sampler = sampler_checkpoint(params)
    paths = checkpoint.resolve_paths(sampler)
    fingerprint = checkpoint.checkpoint_fingerprint(paths)
    trainer = checkpoint.read_trainer_config(paths, sampler.trust_pickles)
    temperature, t_source = resolve_temperature(gen.temperature, trainer)
    log.info("%s: sampler %s (%s); temperature %g from %s, top_p %g", stage, sampler.path, fingerprint,
             temperature, t_source, gen.top_p)  # fmt: skip
    if trainer.get("top_p") not in (None, gen.top_p):
        log.warning("%s: generation.top_p=%g differs from the trainer's top_p=%s", stage, gen.top_p, trainer["top_p"])
    model = checkpoint.load_policy_model(sampler, paths).eval()
    tokenizer = checkpoint.load_tokenizer(paths)
    t_gen = time.perf_counter()
    prompts = [prompt_set.prompts[i] for i in rows.tolist()]
    # each process generates a contiguous share of the generate batches, each batch seeded by its global
    # index (batch_offset), so the union is exactly what one process would draw; rank 0 lays them out
    share = distributed.row_slice(n_batches, distributed.rank(), world)
    lo, hi = share.start * gen.gen_batch_size, min(share.stop * gen.gen_batch_size, len(prompts))

    def my_batches() -> list[dict[str, torch.Tensor]]:
        if hi <= lo:
            return []
        return generate_batches(
            model, tokenizer, prompts[lo:hi], temperature=temperature, top_p=gen.top_p,
            max_new_tokens=gen.max_new_tokens, batch_size=gen.gen_batch_size, seed=seed, stop=gen.stop,
            progress=distributed.is_rank0(), batch_offset=share.start,
        )  # fmt: skip

    if world > 1:
        log.info("%s: rank %d generates batches %d..%d of %d", stage, distributed.rank(), share.start,
                 share.stop - 1, n_batches)  # fmt: skip
    gathered = distributed.gather_results_to_rank0(my_batches)
    gen_seconds = time.perf_counter() - t_gen

    def finish() -> None:  # rank 0 only: one layout with the global P and R, rewards, metadata, the write
        tensors = place_batches([b for part in gathered for b in part], special_ids(tokenizer)[1])
        tensors["prompt_index"] = rows

        reward_info, advantage_info, mean_reward, frac_equal = None, None, None, None
        if kind == "samples_u":
            from .update import group_advantages

            reward_fn = task.get_reward_fn(batch.reward_fn)
            responses = decode_responses(tokenizer, tensors)
            answers = [prompt_set.answers[i] for i in rows.tolist()]
            rewards = torch.tensor(task.score_responses(reward_fn, responses, answers), dtype=torch.float32)
            scale, s_source = resolve_scale(params.advantage.scale, trainer)
            log.info("%s: advantage scale=%s from %s, eps=%g", stage, scale, s_source, params.advantage.eps)
            grouped = rewards.view(n_prompts, G)
            advantages = group_advantages(grouped, scale, params.advantage.eps).reshape(-1).float()
            group_index = torch.arange(n_prompts).repeat_interleave(G)
            tensors.update(rewards=rewards, advantages=advantages, group_index=group_index)
            reward_info, advantage_info = batch.reward_fn, {"scale": scale, "eps": params.advantage.eps}
            mean_reward, frac_equal = float(rewards.mean()), _fraction_all_equal(grouped)

        lens = tensors["response_lens"].float()
        meta = {
            "schema_version": files.SCHEMA_VERSION,
            "kind": kind,
            "checkpoint_fingerprint": fingerprint,
            "checkpoint_path": sampler.path,
            "load": {"dtype": sampler.dtype, "use_qlora": sampler.use_qlora},
            "tokenizer": tokenizer_identity(tokenizer),
            "generation": {
                "temperature": temperature,
                "temperature_source": t_source,
                "top_p": gen.top_p,
                "max_new_tokens": gen.max_new_tokens,
                "stop": gen.stop,
            },
            "seed": seed,
            "dataset": {
                "name": prompt_set.name,
                "split": prompt_set.split,
                "fingerprint": prompt_set.fingerprint,
                "size": len(prompt_set),
            },
            "reward_fn": reward_info,
            "advantage": advantage_info,
            "world_size": world,
            "n_prompts": n_prompts,
            "n_sequences": len(rows),
            "n_distinct_prompts": n_distinct,
            "with_replacement": kind == "samples_e",
            "G": G,
            "mean_reward": mean_reward,
            "frac_all_equal_groups": frac_equal,
            "mean_response_len": float(lens.mean()),
            "frac_truncated": float(tensors["truncated"].float().mean()),
        }
        problem = check_samples(tensors, meta, kind)
        if problem is not None:
            raise RuntimeError(f"{stage} produced a malformed artifact: {problem}")  # a bug, not user input
        with outputs.staged_output_dir(out_dir) as tmp:
            # no timings in either file: same seed + inputs ⇒ byte-identical artifacts (and no DVC re-runs)
            files.write_tensors(tmp / SAMPLES_FILE, tensors, kind, meta)
            files.write_json(tmp / SAMPLES_JSON, meta)
        log.info(
            "%s: %d prompts %s (%d distinct), G=%d, %d sequences; mean reward %s, all-equal groups %s, "
            "mean response length %.2f, truncated %.1f%%; %.1fs generating -> %s",
            stage, n_prompts, replacement, n_distinct, G, len(rows),
            "n/a" if mean_reward is None else f"{mean_reward:.3f}",
            "n/a" if frac_equal is None else f"{100 * frac_equal:.1f}%",
            meta["mean_response_len"], 100 * meta["frac_truncated"], gen_seconds, out_dir,
        )  # fmt: skip

    distributed.on_rank0(finish)


def run_sample_e(params, out_dir: str | Path, dry_run: bool = False) -> None:
    """The sample-e stage: B_E prompts with replacement, one response each."""
    _run(params, out_dir, dry_run, "samples_e")


def run_sample_u(params, out_dir: str | Path, dry_run: bool = False) -> None:
    """The sample-u stage: B_U distinct prompts, G responses each, rewards and group advantages."""
    _run(params, out_dir, dry_run, "samples_u")
