"""The whatif stage's artifacts: whatif.json (`WhatIfReport`) and tokens.csv (`tokens_csv`), docs/math.md §12."""

from __future__ import annotations

import csv
import io

from .base import JsonArtifact, Record

TOKENS_FILE = "tokens.csv"


class WhatIfRowRecord(Record):
    """One update's δH₁ = X̄·Δθ ± SE on the same samples; `changes`: the settings it changes (empty: configured)."""

    name: str
    changes: dict[str, float | str | bool]
    delta_h1: float
    se_delta_h1: float
    se_E: float
    se_U: float | None
    ratio: float | None  # δH₁ ÷ the configured update's δH₁
    cosine: float | None  # cos(Δθ, the configured Δθ)


class EntropyNeutralRecord(Record):
    """The entropy bonus β_H* with δH₁ = target (± the SE-based interval of β), and the lr scale reaching it."""

    target: float
    entropy_coef: float | None  # None: no root for |β| up to 10⁶ ‖g‖/‖h‖
    entropy_coef_se: float | None
    delta_h1_at: float | None
    se_at: float | None
    lr_scale: float | None  # δH₁ ∝ lr: target ÷ δH₁ (None when not positive)


class TokenRecord(Record):
    row: int
    position: int
    token: str
    a: float
    entropy: float
    cov: float


class TokenSummary(Record):
    """How δH₁'s linearised gradient part u·g = Σ a_ij spreads over U's tokens, and how the proxies track a_ij."""

    n_tokens: int
    sum_a: float
    gradient_part_linearised: float  # u·g, from the flat vectors (Σ a equals it to round-off)
    forking_fraction: float
    forking_share: float | None  # Σ a over the forking tokens ÷ Σ a (None when Σ a cancels: binding clipping)
    forking_magnitude_share: float | None  # Σ |a| over them ÷ Σ |a|
    clip_cov_fraction: float
    clip_cov_share: float | None  # Σ a over the top clip_cov_fraction by covariance ÷ Σ a
    clip_cov_magnitude_share: float | None
    spearman_cov: float | None  # rank correlation of a with Cui's covariance term (expected negative)
    spearman_logit: float | None  # with the single-logit proxy −c p (ℓ + H) (expected positive)
    low_entropy_fraction: float  # share of U's tokens with H < 0.01
    lowering: list[TokenRecord]  # the tokens with the most negative a


class WhatIfReport(JsonArtifact):
    FILE = "whatif.json"
    STAGE = "whatif"

    checkpoint_fingerprint: str
    update: str  # the configured update, in words
    configured: WhatIfRowRecord
    rows: list[WhatIfRowRecord]
    entropy_neutral: EntropyNeutralRecord
    tokens: TokenSummary


def tokens_csv(table, token_text: list[str], group: list[int]) -> str:
    """tokens.csv: one line per U response token, most entropy-lowering (most negative a) first.

    table: `tokens.TokenTable`; token_text: each token's text; group: each token's prompt group."""
    order = sorted(range(len(table)), key=lambda t: float(table.a[t]))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ["row", "group", "position", "token", "a", "coefficient", "advantage", "logprob", "entropy", "cov",
         "logit_proxy", "forking", "clip_cov"]
    )  # fmt: skip
    for t in order:
        writer.writerow(
            [
                int(table.row[t]),
                group[t],
                int(table.position[t]),
                token_text[t],
                repr(float(table.a[t])),
                repr(float(table.coefficient[t])),
                repr(float(table.advantage[t])),
                repr(float(table.logprob[t])),
                repr(float(table.entropy[t])),
                repr(float(table.cov[t])),
                repr(float(table.logit_proxy[t])),
                int(table.forking[t]),
                int(table.clip_cov[t]),
            ]
        )
    return buf.getvalue()


__all__ = ["TOKENS_FILE", "EntropyNeutralRecord", "TokenRecord", "TokenSummary", "WhatIfReport", "WhatIfRowRecord",
           "tokens_csv"]  # fmt: skip
