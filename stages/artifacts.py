"""Artifacts: atomic writes, schema-checked reads, fingerprints.

Every tensor artifact is a safetensors file whose metadata carries `kind` and `schema_version`,
so a foreign, stale or truncated file is refused with a clear message instead of being misread.
Every write goes to a temporary file in the same directory and is renamed into place, so an
interrupted stage never leaves a half-written artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from .errors import ProbeError

SCHEMA_VERSION = "1"


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | Path, obj: dict) -> None:
    with _atomic_path(Path(path)) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with _atomic_path(Path(path)) as tmp:
        tmp.write_text(text)


def _json_default(obj):
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], kind: str, meta: dict | None = None) -> None:
    """Save tensors (made contiguous, on CPU) with kind/schema_version (+ JSON meta) in the header."""
    metadata = {"kind": kind, "schema_version": SCHEMA_VERSION, "meta": json.dumps(meta or {}, default=_json_default)}
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with _atomic_path(Path(path)) as tmp:
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


def read_tensors(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a tensor artifact written by `write_tensors`, refusing foreign/truncated/stale files."""
    path = Path(path)
    hint = "rerun the stage that writes it (dvc repro)"
    if not path.exists():
        raise ProbeError(f"artifact {path} not found", hint)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ProbeError(f"artifact {path} is not a readable safetensors file ({exc})", hint) from None
    if metadata.get("kind") != kind:
        raise ProbeError(f"artifact {path} holds '{metadata.get('kind')}', expected '{kind}'", "point to the right file")
    if metadata.get("schema_version") != SCHEMA_VERSION:
        raise ProbeError(
            f"artifact {path} has schema {metadata.get('schema_version')}, this version reads {SCHEMA_VERSION}", hint
        )
    return tensors, json.loads(metadata.get("meta", "{}"))


def read_json(path: str | Path, what: str = "report") -> dict:
    path = Path(path)
    if not path.exists():
        raise ProbeError(f"{what} {path} not found", "rerun the stage that writes it (dvc repro)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ProbeError(f"{what} {path} is not valid JSON ({exc.msg} at line {exc.lineno})", "rerun its stage") from None


@contextlib.contextmanager
def staged_output_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `out_dir` whole, on error it vanishes."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def fingerprint_files(paths: list[str | Path]) -> str:
    """sha256 over (name, bytes) of the given files, in the given order; a short hex digest."""
    digest = hashlib.sha256()
    for p in paths:
        p = Path(p)
        digest.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def fingerprint_dir(path: str | Path, patterns: tuple[str, ...] = ("*",)) -> str:
    files = sorted({f for pat in patterns for f in Path(path).glob(pat) if f.is_file()})
    return fingerprint_files(files)
