"""Typed artifact contracts: one class per artifact file, used by the stage that writes it and by every reader.

A JSON artifact is a pydantic model (`base.JsonArtifact`; its nested parts are `base.Record`s, unknown keys
refused): `write(dir)` writes strict JSON atomically, `read(dir)` parses and validates it, so a missing,
foreign, stale or hand-edited file is one line naming the file, the first bad key and the stage to re-run.
Tensor artifacts pair safetensors (kind and schema_version in the header, see `entropy_probe.files`) with
such a model for their metadata. The contract classes are the schema; docs/design.md shows which stage
writes and which reads each file.

    module    contract            file                          nested parts
    demo      DemoReport          demo.json                     GrpoSettings
    verify    VerifyReport        verify.json                   Parameter
              CheckpointIdentity  checkpoint.json
              write_verify,       verify's three files, with optimizer_state.safetensors
              read_verify         <-> `optimizer_state.OptimizerState`
    samples   Samples             samples.safetensors           (tensors; metadata in the header)
              SamplesMeta         samples.json                  LoadRecord, TokenizerIdentity, GenerationRecord,
                                                                DatasetRecord, AdvantageRecord
    delta_h1  DeltaH1Report       delta_h1.json                 TargetEstimate, EstimatorRecord, UpdateRecord,
                                                                ReuseRecord
              Bars                bars.safetensors              (xbar.<name>, delta_theta.<name>)
              attributions_csv    attributions.csv              (the CSV text; stages/report.py reads its U rows)
    exact     ExactReport         exact.json                    ExactTarget, EtaPoint, ExactGeneration
    truth     TruthReport         truth.json                    TruthTarget, EtaPoint, SnisPoint, FreshPoint,
                                                                Linearity, TruthGeneration
    report    Report              report.json                   CheckpointRow
              CheckpointMetrics   metrics/<name>.json           (the DVC metrics)
"""

from .base import JsonArtifact, Record

__all__ = ["JsonArtifact", "Record"]
