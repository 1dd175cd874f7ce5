"""The probe inside other tools' loops: `integrations.trl.EntropyProbeCallback` (a transformers/TRL callback)."""
