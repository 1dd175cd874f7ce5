"""The `exact` stage."""

from entropy_probe.exact import run

__all__ = ["run"]
