"""The `sample-e` and `sample-u` stages."""

from entropy_probe.sampling import run_sample_e, run_sample_u

__all__ = ["run_sample_e", "run_sample_u"]
