"""The base of every JSON artifact contract: typed fields, strict JSON on disk, one-line errors on read."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import ProbeError
from ..files import read_json, write_json


class Record(BaseModel):
    """A nested part of an artifact: typed, no unknown keys (a renamed key fails loudly, not silently)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class JsonArtifact(Record):
    """One JSON file in a stage's output dir.

    Subclasses set FILE (the file name) and STAGE (the stage that writes it, named in error messages).
    """

    FILE: ClassVar[str]
    STAGE: ClassVar[str]

    @classmethod
    def path(cls, directory: str | Path) -> Path:
        return Path(directory) / cls.FILE

    def write(self, directory: str | Path) -> Path:
        """Write strict JSON atomically (a NaN or Infinity is a ProbeError naming its key)."""
        path = self.path(directory)
        write_json(path, self.model_dump(mode="json"))
        return path

    @classmethod
    def read(cls, directory: str | Path) -> Self:
        """Read and validate; a missing or malformed file is a ProbeError naming the stage to re-run."""
        return read_validated(cls, cls.path(directory), cls.STAGE)


def read_validated(model: type[BaseModel], path: Path, stage: str):
    """`model` validated from the JSON file `path`; a missing or malformed file is one line naming `stage`."""
    raw = read_json(path, f"{stage} output")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        raise ProbeError(
            f"{path} is not a valid {path.name} of this version ({key}: {err['msg']})",
            f"rerun the {stage} stage (dvc repro)",
        ) from None


def every_target(targets: dict) -> dict:
    """A per-target mapping holds every entropy target, in TARGETS order (the order written to files)."""
    from ..estimators import TARGETS

    missing = [t for t in TARGETS if t not in targets]
    if missing:
        raise ValueError(f"no entry for target '{missing[0]}'")
    return {t: targets[t] for t in TARGETS}
