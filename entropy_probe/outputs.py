"""Output dirs: the rules by which a stage replaces its output dir (docs/design.md, "Output safety").

A stage owns only what it writes. Each output dir holds a manifest (MANIFEST: the stage and the sorted
relative paths it wrote, no timestamps, so DVC's hash of the dir is stable), and a dir holding anything
else is refused. The stage writes into a staging dir next to the output and swaps it in so that a kill at
any instant leaves the complete old or the complete new set (`_swap_in`); the next run cleans up what a
killed run left (`_clean_leftovers`). One run at a time per output dir (a lock file next to it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import ProbeError
from .files import UMASK, _staging, _write_error, _write_errors, write_json

MANIFEST = ".entropy-probe-stage.json"
SWAP_STEPS = ("manifest", "set_aside", "rename_in", "discard_old", "delete_old")
_claimed: dict[Path, str | None] = {}  # output dirs this process holds the lock of -> the stage writing them


# ----------------------------------------------------------------------------------------------
# output dirs
#
# Names next to the output dir `NAME` (all with the lock held, so one of each at most):
#   .NAME.entropy-probe.lock   the lock file (removed on release)
#   .NAME.XXXXXXXX.tmp         a staging dir (tempfile.mkdtemp: 8 of [a-z0-9_]); incomplete until renamed in
#   .NAME.old.tmp              the complete previous set, set aside during the swap
#   .NAME.trash.tmp            the previous set being deleted (may be partial)


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.entropy-probe.lock"


def _set_aside_path(out: Path) -> Path:
    return out.parent / f".{out.name}.old.tmp"


def _trash_path(out: Path) -> Path:
    return out.parent / f".{out.name}.trash.tmp"


def _is_staging_dir(path: Path, out: Path) -> bool:
    pattern = rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}\.tmp"
    return re.fullmatch(pattern, path.name) is not None and path.is_dir() and not path.is_symlink()


def _before_step(step: str) -> None:
    """Called before each step of SWAP_STEPS; a test replaces it to kill the process at that step."""


def _swap_in(new: Path, out: Path) -> None:
    """Replace `out` by the complete dir `new` (same parent) so that a kill at any instant loses nothing.

    Step         action                           a kill just before it leaves   the next start (`_clean_leftovers`)
    set_aside    rename out -> .NAME.old.tmp      the old set at out             deletes the staging dir
    rename_in    rename new -> out                no out, old set aside          puts the old set back at out
    discard_old  rename .old.tmp -> .trash.tmp    the new set at out             deletes the set-aside old set
    delete_old   rmtree .trash.tmp                the new set at out             deletes the (partial) trash
    Renames within one directory are atomic, so the complete old or new set always exists under one name.
    """
    old, trash = _set_aside_path(out), _trash_path(out)
    had_old = os.path.lexists(out)
    _before_step("set_aside")
    if had_old:
        os.rename(out, old)
    _before_step("rename_in")
    try:
        os.rename(new, out)
    except OSError:
        if had_old:
            os.rename(old, out)  # put the previous set back before reporting the error
        raise
    if had_old:
        _before_step("discard_old")
        os.rename(old, trash)
        _before_step("delete_old")
        _remove_owned(trash)


def _ours(path: Path) -> bool:
    """A dir this tool made: it holds our manifest (staging dirs get one at creation, and deletion removes it last)."""
    return path.is_dir() and not path.is_symlink() and (path / MANIFEST).is_file()


def _remove_owned(path: Path) -> None:
    """Delete a dir of ours with its manifest last, so a kill midway leaves it still recognisably ours."""
    for child in path.iterdir():
        if child.name == MANIFEST:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (path / MANIFEST).unlink(missing_ok=True)  # an old set written before manifests (or emptied by DVC) has none
    path.rmdir()


def _clean_leftovers(out: Path) -> None:
    """Undo what a killed run left next to `out` (lock held): see the states in `_swap_in`.

    Only dirs that hold our manifest are touched: a user's dir that happens to carry one of these names stays.
    """
    old, trash = _set_aside_path(out), _trash_path(out)
    if _ours(trash):
        _remove_owned(trash)
    if _ours(old):
        if os.path.lexists(out):
            os.rename(old, trash)  # killed after the new set went in: the old one is obsolete
            _remove_owned(trash)
        else:
            os.rename(old, out)  # killed between set_aside and rename_in: the old set is the output
    for path in out.parent.iterdir():
        if _is_staging_dir(path, out) and _ours(path):
            _remove_owned(path)
    for path, what in ((old, "a set-aside output"), (trash, "an output being deleted")):
        if os.path.lexists(path):
            raise ProbeError(
                f"{path} (the name entropy-probe uses for {what}) exists but was not written by entropy-probe",
                "move it away; the stage will not replace its --out while it is there",
            )


def _listing(root: Path) -> tuple[set[str], set[str]]:
    """(files, dirs) below `root` as relative POSIX paths; a symlink counts as a file and is not followed."""
    files: set[str] = set()
    dirs: set[str] = set()
    for here, subdirs, names in os.walk(root):
        rel = Path(here).relative_to(root)
        for d in subdirs:
            (files if os.path.islink(os.path.join(here, d)) else dirs).add((rel / d).as_posix())
        files.update((rel / n).as_posix() for n in names)
    return files, dirs


def _write_manifest(new: Path, stage: str | None) -> None:
    files, dirs = _listing(new)
    files.discard(MANIFEST)  # the staging marker written at creation, replaced here
    write_json(new / MANIFEST, {"stage": stage, "files": sorted(files), "dirs": sorted(dirs)})


def _read_manifest(out: Path) -> dict | None:
    """The manifest in `out` as {"stage", "files", "dirs"}; None when there is none; a bad one is refused."""
    path = out / MANIFEST
    if not os.path.lexists(path):
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ProbeError(f"{path} is unreadable ({exc})", "remove it, or choose another --out") from None
    entries = (manifest.get("files"), manifest.get("dirs")) if isinstance(manifest, dict) else (None, None)
    if not (
        isinstance(manifest, dict)
        and isinstance(manifest.get("stage"), (str, type(None)))
        and all(isinstance(e, list) and all(isinstance(x, str) for x in e) for e in entries)
    ):
        raise ProbeError(f"{path} is not an entropy-probe manifest", "remove it, or choose another --out")
    return manifest


def _check_owned(out: Path, stage: str | None) -> None:
    """Refuse to replace `out` unless it is missing, empty, or holds only what its manifest lists.

    Listed files that are gone are fine (`dvc repro` deletes a stage's outs before running it). A
    manifest of another stage makes its files someone else's (`stage` None: any entropy-probe stage).
    """
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise ProbeError(f"output dir {out} is an existing file", "choose a directory for --out (created if missing)")
    files, dirs = _listing(out)
    files.discard(MANIFEST)
    if not files and not dirs:
        return
    manifest = _read_manifest(out) or {"stage": None, "files": [], "dirs": []}
    owner = manifest["stage"]
    if stage is not None and owner is not None and owner != stage:
        raise ProbeError(
            f"output dir {out} holds the output of entropy-probe {owner}, not {stage}", "choose another --out"
        )
    foreign = sorted((files - set(manifest["files"])) | (dirs - set(manifest["dirs"])))
    if foreign:
        raise ProbeError(
            f"output dir {out} holds files entropy-probe did not write ({foreign[0]}; {len(foreign)} in all)",
            "move them away or choose another --out (a stage replaces only its own output)",
        )


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.path.samestat(os.stat(path), os.fstat(fd))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` (flock on .NAME.entropy-probe.lock next to it) for the block."""
    path = _lock_path(out)
    with _write_errors(path):
        out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ProbeError(
                    f"another entropy-probe run is writing {out}", "wait for it or choose another --out"
                ) from None
            if _same_file(path, fd):
                break
            os.close(fd)  # the previous holder removed the file between our open and flock: lock a fresh one
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still locked, so nobody can lock the file we remove and think they hold it
        os.close(fd)


@contextlib.contextmanager
def _writing(out: Path, stage: str | None) -> Iterator[None]:
    """Lock `out`, clean up a killed run's leftovers, refuse it unless ours, and register the claim."""
    with _locked(out):
        with _write_errors(out):
            _clean_leftovers(out)
        _check_owned(out, stage)
        _claimed[out] = stage
        try:
            yield
        finally:
            del _claimed[out]


def _resolve(out_dir: str | Path) -> Path:
    out = Path(out_dir).expanduser().resolve()
    if out == out.parent:
        raise ProbeError(f"output dir {out} is a filesystem root", "choose a directory of its own for --out")
    return out


def _relation(out: Path, other: Path) -> str | None:
    if out == other:
        return "is"
    if other in out.parents:
        return "is inside"
    if out in other.parents:
        return "contains"
    return None


def check_output_dir(out_dir: str | Path, inputs: dict[str, str | Path]) -> Path:
    """The resolved `out_dir`, refused if it is, is inside or contains one of `inputs`.

    `inputs` maps a params key to a path the stage reads (checkpoint, dataset, input artifacts). Paths are
    resolved (relative paths, symlinks) before they are compared; no file is read.
    """
    out = _resolve(out_dir)
    if _relation(out, Path.cwd()) in ("is", "contains"):  # the swap would delete the working directory
        raise ProbeError(f"output dir {out} is or contains the working directory", "choose a dir of its own for --out")
    for key, path in inputs.items():
        relation = _relation(out, Path(path).expanduser().resolve())
        if relation is not None:
            raise ProbeError(
                f"output dir {out} {relation} {key} ({path}), which the stage reads",
                "choose an --out apart from the checkpoint and the stage's inputs (a stage replaces its --out whole)",
            )
    return out


@contextlib.contextmanager
def claim_output_dir(
    out_dir: str | Path, stage: str, inputs: dict[str, str | Path] | None = None, dry_run: bool = False
) -> Iterator[Path]:
    """Check `out_dir` for `stage` before any work, and hold it for the block (the CLI wraps each stage in it).

    Refused with a one-line ProbeError: an --out that is, is inside or contains one of `inputs`
    (`check_output_dir`), an existing file or a dir holding files this stage did not write (`_check_owned`),
    a dir another run holds the lock of. Outside a dry run the lock is held for the whole block, a killed
    run's leftovers are cleaned up first, and `staged_output_dir` inside the block uses this claim. A dry
    run only checks.
    """
    out = check_output_dir(out_dir, inputs or {})
    if dry_run:
        _check_owned(out, stage)
        yield out
        return
    with _writing(out, stage):
        yield out


@contextlib.contextmanager
def staged_output_dir(out_dir: str | Path, stage: str | None = None) -> Iterator[Path]:
    """Yield an empty staging dir; when the block succeeds it replaces `out_dir` (`_swap_in`), else it vanishes.

    Inside `claim_output_dir` for the same dir the claim's lock and stage are used; on its own (library
    use) it locks, cleans up and checks ownership itself, here rather than before the caller's work.
    """
    out = _resolve(out_dir)
    claimed = out in _claimed
    stage = stage or _claimed.get(out)
    with contextlib.nullcontext() if claimed else _writing(out, stage):
        with _write_errors(out):
            new = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
            os.chmod(new, 0o777 & ~UMASK)
            write_json(new / MANIFEST, {"stage": stage, "files": [], "dirs": []})  # marks it ours (`_ours`)
        _staging[new] = out
        try:
            try:
                yield new
            except OSError as exc:  # e.g. disk full in another library's writer (savefig, the Trainer)
                place = Path(os.path.abspath(exc.filename)) if isinstance(exc.filename, str) else new
                err = _write_error(exc, place) if place.is_relative_to(out.parent) else None
                if err is None:
                    raise
                raise err from None
            _check_owned(out, stage)  # again: someone may have put files there while the stage ran
            _before_step("manifest")
            _write_manifest(new, stage)
            with _write_errors(out):
                _swap_in(new, out)
        finally:
            del _staging[new]
            if new.exists():
                _remove_owned(new)
