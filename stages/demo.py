"""The `demo` stage."""

from entropy_probe.demo import run

__all__ = ["run"]
