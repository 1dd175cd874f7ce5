"""Pipeline stages: one thin module per stage (read typed inputs, call entropy_probe, write typed outputs)."""
