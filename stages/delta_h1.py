"""The `delta-h1` stage."""

from entropy_probe.delta_h1 import run

__all__ = ["run"]
