"""The `report` stage."""

from entropy_probe.report import run

__all__ = ["run"]
