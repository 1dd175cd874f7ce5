"""The `verify` stage."""

from entropy_probe.verify import run

__all__ = ["run"]
