"""Teacher forcing over a sample artifact's rows: the one scoring loop (docs/math.md §2.3, §5.4, §8.1).

A `Batch` is a sample artifact on the compute device. Its rows are scored in token-budget microbatches
(`policy.token_budget_slices`: rows·columns ≤ max_tokens each) by `Batch.scored`, the loop every pass
uses:
  - the gradient passes of delta-h1 (`probe`): per microbatch, TokenStats with a graph;
  - `Batch.token_stats` (no graph): every row's ℓ_ik, H_ik, top1_ik, margin_ik under the current θ,
    which gives `rescore` (λ_i = Σ_k ℓ_ik − ℓ_ik^behaviour, and the statistics replaced in place) and
    `sequence_sums` (ℓ_i = Σ_k ℓ_ik, S_i = Σ_k H_ik, L_i for the ground truth).
Under torchrun a Batch may hold a contiguous share of the rows (`shard`): the loop visits only those,
and `reduce` all-reduces the sums, so every process ends with the whole batch's results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor
from tqdm import tqdm

from . import distributed
from .artifacts.samples import TOKEN_KEYS, response_mask
from .errors import ProbeError
from .policy import DEFAULT_LOGITS_CHUNK_MB, TokenStats, teacher_force, token_budget_slices
from .sharded import reshard


def accumulation_dtype(tensor: Tensor) -> torch.dtype:
    """The dtype sums over a model's outputs are kept in: float32 for float32/half models, float64 for float64."""
    return torch.promote_types(tensor.dtype, torch.float32)


@dataclass
class SeqStats:
    """Per-sequence sums under one parameter setting, float64 [N]: ℓ_i = Σ_k log π(y_ik), S_i = Σ_k H_ik, L_i."""

    logprob: Tensor
    entropy: Tensor
    length: Tensor

    @classmethod
    def of_samples(cls, tensors: dict[str, Tensor]) -> "SeqStats":
        """The sums of per-token statistics in the artifact layout (e.g. the sampler's own log-probs and RB
        entropies, or `Batch.token_stats`)."""
        return cls(
            logprob=tensors["logprobs"].double().sum(-1),
            entropy=tensors["entropies"].double().sum(-1),
            length=tensors["response_lens"].double(),
        )


@dataclass
class Batch:
    """A sample artifact on the compute device (see docs/design.md for the fields)."""

    input_ids: Tensor
    attention_mask: Tensor
    mask: Tensor  # [N, R] response mask
    n_prompt_cols: int  # P = C − R: the artifact's prompt columns (left-padded), then R response columns
    temperature: float
    top_p: float
    tensors: dict = field(repr=False)  # everything else in the artifact (logprobs, entropies, rewards, …)
    # under torchrun: this process's contiguous share of the rows; the passes visit only these rows and
    # all-reduce their sums (`reduce`), so every process ends with the whole batch's results. None = all rows.
    shard: slice | None = None
    # MiB of float32 logits per chunk of teacher forcing's vocabulary-wide work (compute.logits_chunk_mb)
    logits_chunk_mb: float = DEFAULT_LOGITS_CHUNK_MB
    # compute.shard fsdp: the model is sharded (FSDP2), so every process must run the same number of forward and
    # backward passes (each gathers parameters from all of them): `slices` pads the shorter shares with empty
    # microbatches, which `score` runs on a stand-in row and returns with no rows; and the parameter-sized sums
    # are already summed over the processes by FSDP's reduce-scatter (`reduce_params`)
    fsdp: bool = False

    @classmethod
    def from_samples(cls, samples, device: torch.device, logits_chunk_mb: float = DEFAULT_LOGITS_CHUNK_MB) -> "Batch":
        """A sample artifact (`artifacts.samples.Samples`) on `device`, scored with the π it was drawn from."""
        gen = samples.meta.generation
        return cls.from_tensors(samples.tensors(), gen.temperature, gen.top_p, device, logits_chunk_mb)

    @classmethod
    def from_tensors(
        cls,
        tensors: dict[str, Tensor],
        temperature: float,
        top_p: float,
        device,
        logits_chunk_mb: float = DEFAULT_LOGITS_CHUNK_MB,
    ) -> "Batch":
        """Sample tensors in the artifact layout (e.g. `generation.generate_responses`' output) on `device`."""
        n_resp = tensors["logprobs"].shape[1]
        return cls(
            input_ids=tensors["input_ids"].to(device),
            attention_mask=tensors["attention_mask"].to(device),
            mask=response_mask(tensors).to(device),
            n_prompt_cols=tensors["input_ids"].shape[1] - n_resp,
            temperature=float(temperature),
            top_p=float(top_p),
            tensors={k: v.to(device) for k, v in tensors.items()},
            logits_chunk_mb=logits_chunk_mb,
        )

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def prompt_tokens(self) -> Tensor:
        """[N, P] the prompt columns with padding zeroed: equal for two batches iff their prompts are."""
        P = self.n_prompt_cols
        return self.input_ids[:, :P] * self.attention_mask[:, :P]

    def slices(self, max_tokens: int) -> list[slice]:
        """Token-budget microbatches (row ranges) over this process's rows (all rows unless sharded)."""
        if self.shard is None:
            return token_budget_slices(len(self), self.input_ids.shape[1], max_tokens)
        start, stop, _ = self.shard.indices(len(self))
        local = token_budget_slices(max(0, stop - start), self.input_ids.shape[1], max_tokens)
        mine = [slice(start + s.start, start + s.stop) for s in local]
        if not self.fsdp:
            return mine
        world = distributed.world_size()
        shares = [distributed.row_slice(len(self), r, world) for r in range(world)]
        most = max(len(token_budget_slices(s.stop - s.start, self.input_ids.shape[1], max_tokens)) for s in shares)
        return mine + [slice(stop, stop)] * (most - len(mine))

    def reduce(self, tensor: Tensor) -> Tensor:
        """In place: Σ over the processes that share this batch (identity unless sharded)."""
        return tensor if self.shard is None else distributed.all_reduce_sum(tensor)

    def reduce_params(self, tensor: Tensor) -> Tensor:
        """A parameter-sized sum over this process's rows made the whole batch's: `reduce`, except under FSDP,
        where the backward's reduce-scatter summed every process's rows into this process's shard already."""
        return tensor if self.fsdp else self.reduce(tensor)

    def score(
        self,
        model,
        rows: slice,
        *,
        with_grad: bool = True,
        entropies: bool = True,
        features: bool = False,
        coefs: tuple[Tensor, Tensor] | None = None,
        logprob_grad: bool = True,
    ):
        """TokenStats of one microbatch of rows (`policy.teacher_force`), with a graph unless with_grad=False.

        coefs: per-token (a, c) of these rows for the surrogate a·H + c·ℓ (see `teacher_force`). No rows (an
        FSDP pad, `fsdp`): the passes' collectives run on a stand-in row with zero coefficients, and the statistics
        come back with no rows (their gradients are exactly 0)."""
        if rows.start == rows.stop:
            return self._stand_in(model, with_grad, entropies, features, coefs, logprob_grad)
        return teacher_force(
            model,
            self.input_ids[rows],
            self.attention_mask[rows],
            self.n_prompt_cols,
            self.mask[rows],
            self.temperature,
            self.top_p,
            with_grad=with_grad,
            entropies=entropies,
            features=features,
            logits_chunk_mb=self.logits_chunk_mb,
            coefs=coefs,
            logprob_grad=logprob_grad,
        )

    def _stand_in(self, model, with_grad, entropies, features, coefs, logprob_grad):
        """`score` of an empty microbatch under FSDP: row 0 scored with zero coefficients, sliced to no rows."""
        zero = None if coefs is None else tuple(torch.zeros_like(self.mask[:1], dtype=c.dtype) for c in coefs)
        options = dict(entropies=entropies, features=features, coefs=zero, logprob_grad=logprob_grad)
        stats = self.score(model, slice(0, 1), with_grad=with_grad, **options)
        return stats.rows(slice(0, 0))

    def scored(
        self,
        model,
        max_tokens: int,
        desc: str,
        *,
        with_grad: bool,
        entropies: bool = True,
        features: bool = False,
        coefs: tuple[Tensor, Tensor] | None = None,
        logprob_grad: bool = True,
    ) -> Iterator[tuple[slice, TokenStats]]:
        """The scoring loop: (rows, TokenStats) for every token-budget microbatch of this process's rows.

        coefs: per-token (a, c) [N, R] of all rows; each microbatch gets its rows' surrogate a·H + c·ℓ."""
        for rows in tqdm(self.slices(max_tokens), desc=desc, leave=False, disable=None):
            mine = None if coefs is None else (coefs[0][rows], coefs[1][rows])
            options = dict(entropies=entropies, features=features, coefs=mine, logprob_grad=logprob_grad)
            yield rows, self.score(model, rows, with_grad=with_grad, **options)
        if self.fsdp:  # every pass ends with the parameters sharded (see `sharded.reshard`)
            reshard(model)

    @torch.no_grad()
    def token_stats(self, model, max_tokens: int, desc: str = "re-score") -> dict[str, Tensor]:
        """{ℓ, H, top1, margin} [N, R] of every row under the model's current θ (no graph; all-reduced).

        Kept in the model's accumulation dtype (float32 for float32/half models, float64 for float64).
        """
        dtype = accumulation_dtype(next(model.parameters()))
        out = {k: torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device) for k in TOKEN_KEYS}
        for rows, stats in self.scored(model, max_tokens, desc, with_grad=False, features=True):
            for k in TOKEN_KEYS:
                out[k][rows] = getattr(stats, k).to(dtype)
        return {k: self.reduce(v) for k, v in out.items()}

    def rescore(self, model, max_tokens: int) -> Tensor:
        """Re-score under `model` and replace the per-token statistics in place (docs/math.md §5.4).

        Returns λ_i = Σ_k ℓ_ik(model) − ℓ_ik(behaviour) [N] float64, the log importance ratio of cached samples.
        """
        stats = self.token_stats(model, max_tokens)
        log_ratio = (stats["logprobs"].double() - self.tensors["logprobs"].double()).sum(-1)
        self.tensors.update(stats)
        return log_ratio

    def sequence_sums(self, model, max_tokens: int, desc: str = "teacher forcing") -> tuple[SeqStats, float]:
        """(ℓ_i, S_i, L_i under the model's current θ, max_ik |ℓ_ik − behaviour ℓ_ik| over finite entries)."""
        stats = self.token_stats(model, max_tokens, desc)
        if not stats["entropies"].isfinite().all():
            raise ProbeError(
                "the model produced non-finite entropies on the E samples", "check the checkpoint for NaN weights"
            )
        diff = (stats["logprobs"] - self.tensors["logprobs"].to(stats["logprobs"].dtype)).abs()[self.mask]
        diff = diff[diff.isfinite()]
        sums = SeqStats.of_samples({**stats, "response_lens": self.tensors["response_lens"]})
        return sums, float(diff.max()) if diff.numel() else 0.0
