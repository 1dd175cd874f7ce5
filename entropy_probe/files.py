"""Files: atomic writes, strict JSON, schema-checked safetensors.

Every tensor artifact is a safetensors file whose metadata carries `kind` and `schema_version`,
so a foreign, stale or truncated file is refused with a clear message instead of being misread.
Every JSON artifact is strict JSON (a NaN or Infinity is an error naming the key where it arose).
Every write goes to a temporary file beside its target and is renamed into place; files honour the umask.
A disk-full or permission error is one line naming the file (at its final place, see `outputs`).
torch and safetensors are imported by the tensor functions only: `outputs` (and through it the CLI, before a
stage starts) uses the JSON half of this module, which must stay cheap to import.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from .errors import ProbeError

if TYPE_CHECKING:
    import torch

SCHEMA_VERSION = "1"


def _read_umask() -> int:
    old = os.umask(0)  # the only way to read it is to set it; put it back at once
    os.umask(old)
    return old


UMASK = _read_umask()  # mkstemp/mkdtemp create 0600/0700; we chmod to what open()/mkdir() would have made

# errno -> the first half of the fix for a write that failed with it
_WRITE_FIXES = {
    errno.ENOSPC: "free space",
    errno.EDQUOT: "free space (disk quota exceeded)",
    # the file size limit (ulimit -f): CPython ignores SIGXFSZ, so the write fails with EFBIG instead
    errno.EFBIG: "raise the file size limit (ulimit -f)",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EROFS: "make it writable",
    errno.EACCES: "make it writable",
    errno.EPERM: "make it writable",
}

_staging: dict[Path, Path] = {}  # staging dir -> the output dir it will replace (to name files in errors)


def _shown(path: Path) -> Path:
    """Where a file will end up: a path inside a staging dir is named by its place in the output dir."""
    for new, out in _staging.items():
        if path.is_relative_to(new):
            return out / path.relative_to(new)
    return path


def _write_error(exc: OSError, path: Path) -> ProbeError | None:
    """A one-line error for a write that failed for lack of space or permission; None for any other error."""
    fix = _WRITE_FIXES.get(exc.errno)
    if fix is None:
        return None
    return ProbeError(f"cannot write {_shown(path)}: {os.strerror(exc.errno)}", f"{fix} or choose another --out")


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """Turn a disk-full / read-only / permission OSError inside the block into a ProbeError naming `path`."""
    try:
        yield
    except OSError as exc:
        err = _write_error(exc, path)
        if err is None:
            raise
        raise err from None


# ----------------------------------------------------------------------------------------------
# files


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp file beside `path`; renamed onto `path` when the block succeeds, removed otherwise."""
    with _write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            os.chmod(tmp, 0o666 & ~UMASK)
            yield Path(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def write_json(path: str | Path, obj: dict) -> None:
    """Write `obj` as strict JSON (no NaN/Infinity: a ProbeError names the key that holds one)."""
    path = Path(path)
    text = _strict_json(obj, path.name, indent=2)
    with _atomic_path(path) as tmp:
        tmp.write_text(text + "\n")


def write_text(path: str | Path, text: str) -> None:
    with _atomic_path(Path(path)) as tmp:
        tmp.write_text(text)


def _is_scalar_tensor(obj) -> bool:
    """True for a one-element torch tensor (written to JSON as its number).

    Looks torch up in sys.modules instead of importing it: an object can only be a tensor once torch is loaded.
    """
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor) and obj.numel() == 1


def _json_default(obj):
    if _is_scalar_tensor(obj):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _strict_json(obj, what: str, **kwargs) -> str:
    try:
        return json.dumps(obj, allow_nan=False, default=_json_default, **kwargs)
    except ValueError:
        where = _first_nonfinite(obj)
        if where is None:
            raise
        raise ProbeError(
            f"{what}: non-finite value at {where or 'the top level'}",
            "JSON has no NaN/Infinity: check the inputs and params that produced it",
        ) from None


def _first_nonfinite(obj, where: str = "") -> str | None:
    """Key path ('targets.sequence.se_E', 'etas[2].ratio') of the first NaN/±Infinity in `obj`; None if none."""
    if _is_scalar_tensor(obj):
        obj = obj.item()
    if isinstance(obj, float):
        return None if math.isfinite(obj) else where
    if isinstance(obj, dict):
        children = ((f"{where}.{k}" if where else str(k), v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple)):
        children = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
    else:
        return None
    for key, value in children:
        found = _first_nonfinite(value, key)
        if found is not None:
            return found
    return None


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], kind: str, meta: dict | None = None) -> None:
    """Save tensors (made contiguous, on CPU) with kind/schema_version (+ strict-JSON meta) in the header."""
    from safetensors.torch import save

    path = Path(path)
    meta_json = _strict_json(meta or {}, f"{path.name} metadata")
    metadata = {"kind": kind, "schema_version": SCHEMA_VERSION, "meta": meta_json}
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with _atomic_path(path) as tmp:
        tmp.write_bytes(_sorted_header(save(cpu, metadata=metadata)))


def _sorted_header(data: bytes) -> bytes:
    """safetensors writes `__metadata__` keys in arbitrary order; sort them so equal inputs give equal bytes.

    Layout: 8-byte little-endian header length n, n bytes of JSON header (space-padded), then the data.
    The re-serialised header is no longer than the original, so it is padded back to n bytes.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # cannot happen for safetensors' own compact header; never write a corrupt file
        raise RuntimeError("safetensors header grew when its metadata keys were sorted")
    return data[:8] + text.ljust(n) + data[8 + n :]


def read_tensors(path: str | Path, kind: str, rows=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a tensor artifact written by `write_tensors`, refusing foreign/truncated/stale files.

    rows: a function (name, shape) → a slice of dim 0 or None; a tensor it slices is read only in those rows (the
    rest of the file is never read into memory: a sharded process reads its own shard)."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    hint = "rerun the stage that writes it (dvc repro)"
    if not path.exists():
        raise ProbeError(f"artifact {path} not found", hint)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: _read_rows(f, k, rows) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ProbeError(f"artifact {path} is not a readable safetensors file ({exc})", hint) from None
    if metadata.get("kind") != kind:
        raise ProbeError(
            f"artifact {path} holds '{metadata.get('kind')}', expected '{kind}'", "point to the right file"
        )
    if metadata.get("schema_version") != SCHEMA_VERSION:
        raise ProbeError(
            f"artifact {path} has schema {metadata.get('schema_version')}, this version reads {SCHEMA_VERSION}", hint
        )
    return tensors, json.loads(metadata.get("meta", "{}"))


def _read_rows(f, key: str, rows) -> torch.Tensor:
    """Tensor `key` of an open safetensors file, whole or in the rows `rows(key, shape)` names."""
    if rows is None:
        return f.get_tensor(key)
    part = f.get_slice(key)
    index = rows(key, tuple(part.get_shape()))
    return f.get_tensor(key) if index is None else part[index]


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a safetensors file, from its header alone."""
    from safetensors.torch import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def read_json(path: str | Path, what: str = "report") -> dict:
    path = Path(path)
    if not path.exists():
        raise ProbeError(f"{what} {path} not found", "rerun the stage that writes it (dvc repro)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ProbeError(
            f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno})", "rerun its stage"
        ) from None
