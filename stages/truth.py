"""The `truth` stage."""

from entropy_probe.truth import run

__all__ = ["run"]
