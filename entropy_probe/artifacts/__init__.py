"""Typed artifact contracts: one class per artifact, used by the stage that writes it and by every reader.

A JSON artifact is a pydantic model (`JsonArtifact`): `write(dir)` writes strict JSON atomically,
`read(dir)` parses and validates it, so a missing, foreign, stale or hand-edited file is one line naming
the file, the first bad key and the stage to re-run. Tensor artifacts pair safetensors (kind and
schema_version in the header, see `entropy_probe.files`) with such a model for their metadata.

    samples     Samples (samples.safetensors + samples.json)               sample-e, sample-u
    verify      VerifyReport (verify.json), CheckpointIdentity, AdamW state  verify
    delta_h1    DeltaH1Report (delta_h1.json), Bars (bars.safetensors)      delta-h1
    exact       ExactReport (exact.json)                                     exact
    truth       TruthReport (truth.json)                                     truth
    report      Report metrics (report.json, metrics)                        report
"""

from .base import JsonArtifact, Record

__all__ = ["JsonArtifact", "Record"]
