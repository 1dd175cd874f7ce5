"""Output dirs: the rules by which a stage replaces its output dir (docs/design.md, "Output safety").

A stage owns only what it writes. Each output dir holds a manifest (MANIFEST: the stage and the sorted
relative paths it wrote, no timestamps, so DVC's hash of the dir is stable), and a dir holding anything
else is refused. The stage writes into a staging dir next to the output and swaps it in so that a kill at
any instant leaves the complete old or the complete new set (`_swap_in`); the next run cleans up what a
killed run left (`_clean_leftovers`). One run at a time per output dir (a lock file next to it).

Signals: SIGINT and SIGTERM are held back during the renames of a swap and delivered right after, and while
a stage holds its output dir SIGTERM raises SystemExit (exit 143) instead of ending the process at once, so
the staging dir is removed and the lock released as for Ctrl-C. An --out that cannot be renamed (a mount
point: EBUSY) gets its contents replaced instead (`_swap_contents`), with the same guarantee.
A refused or failed run leaves nothing new: the parent dirs it created for the lock are removed again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from .errors import ProbeError
from .files import UMASK, _staging, _write_error, _write_errors, write_json

log = logging.getLogger(__name__)

MANIFEST = ".entropy-probe-stage.json"
SWAP_STEPS = ("manifest", "set_aside", "rename_in", "discard_old", "delete_old")
# the steps of `_swap_contents` (an --out that cannot be renamed); "set_aside_entry"/"move_in_entry" come
# before each entry's rename after the first
CONTENT_SWAP_STEPS = ("copy_in", "set_aside_contents", "set_aside_entry", "move_in_contents", "move_in_entry", "commit")
# inside an --out that cannot be renamed: the new set copied in, the old set moved aside, and (in the latter)
# the mark that all of the old set is aside (reserved names: `_recover_contents` removes them)
INNER_NEW, INNER_OLD, ALL_ASIDE = ".entropy-probe.new.tmp", ".entropy-probe.old.tmp", ".entropy-probe.all-aside"
LOCK_SUFFIX = ".entropy-probe.lock"
_claimed: dict[Path, str | None] = {}  # output dirs this process holds the lock of -> the stage writing them


# ----------------------------------------------------------------------------------------------
# output dirs
#
# Names next to the output dir `NAME` (all with the lock held, so one of each at most):
#   .NAME.entropy-probe.lock   the lock file (removed on release)
#   .NAME.XXXXXXXX.tmp         a staging dir (tempfile.mkdtemp: 8 of [a-z0-9_]); incomplete until renamed in
#   .NAME.old.tmp              the complete previous set, set aside during the swap
#   .NAME.trash.tmp            the previous set being deleted (may be partial)
# NAME is `_stem(out)`: the output dir's name, shortened (with a hash) where the longest of these names, the
# lock file's, would pass the file system's 255 bytes per name.


def _stem(out: Path) -> str:
    room = 255 - len(f".{LOCK_SUFFIX}")
    if len(os.fsencode(out.name)) <= room:
        return out.name
    digest = hashlib.sha256(os.fsencode(out.name)).hexdigest()[:12]
    head = os.fsencode(out.name)[: room - len(digest) - 1].decode(errors="ignore")  # whole UTF-8 characters
    return f"{head}~{digest}"


def _lock_path(out: Path) -> Path:
    return out.parent / f".{_stem(out)}{LOCK_SUFFIX}"


def _set_aside_path(out: Path) -> Path:
    return out.parent / f".{_stem(out)}.old.tmp"


def _trash_path(out: Path) -> Path:
    return out.parent / f".{_stem(out)}.trash.tmp"


def _is_staging_dir(path: Path, out: Path) -> bool:
    pattern = rf"\.{re.escape(_stem(out))}\.[a-z0-9_]{{8}}\.tmp"
    return re.fullmatch(pattern, path.name) is not None and path.is_dir() and not path.is_symlink()


def _before_step(step: str) -> None:
    """Called before each step of SWAP_STEPS; a test replaces it to kill the process at that step."""


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()  # only it may set signal handlers


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the block, then deliver them with the previous handlers: a Ctrl-C or
    a `kill` between two renames of a swap takes effect once the swap is through, never half-way."""
    if not _main_thread():  # Python runs signal handlers in the main thread only: nothing to defer here
        yield
        return
    pending: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not None:  # None: a handler set outside Python, left alone
            previous[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in pending:
            signal.raise_signal(sig)  # now handled as it would have been (KeyboardInterrupt, SystemExit, ...)


@contextlib.contextmanager
def _terminate_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises SystemExit(143) in the main thread instead of ending the process
    at once, so `finally` blocks remove the staging dir and release the lock (as for Ctrl-C). A handler
    someone else installed is kept."""
    if not _main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _swap_in(new: Path, out: Path) -> None:
    """Replace `out` by the complete dir `new` (same parent) so that a kill at any instant loses nothing.

    Step         action                           a kill just before it leaves   the next start (`_clean_leftovers`)
    set_aside    rename out -> .NAME.old.tmp      the old set at out             deletes the staging dir
    rename_in    rename new -> out                no out, old set aside          puts the old set back at out
    discard_old  rename .old.tmp -> .trash.tmp    the new set at out             deletes the set-aside old set
    delete_old   rmtree .trash.tmp                the new set at out             deletes the (partial) trash
    Renames within one directory are atomic, so the complete old or new set always exists under one name.
    SIGINT/SIGTERM wait until the renames are done; any error between them puts the old set back.
    An `out` that cannot be renamed (EBUSY: a mount point) has its contents replaced instead (`_swap_contents`).
    """
    old, trash = _set_aside_path(out), _trash_path(out)
    had_old = os.path.lexists(out)
    busy = discarded = False
    try:
        with _signals_deferred():
            _before_step("set_aside")
            if had_old and not _set_aside(out, old):
                busy = True
            else:
                _before_step("rename_in")
                try:
                    os.rename(new, out)
                except BaseException:
                    if had_old:
                        os.rename(old, out)  # put the previous set back before reporting the error
                    raise
                if had_old:
                    _before_step("discard_old")
                    os.rename(old, trash)
                    discarded = True
    finally:
        if discarded:  # also when a signal held back during the renames is raised now: the new set is in
            _before_step("delete_old")
            _discard_old_set(trash, out)
    if busy:
        _swap_contents(new, out)


def _set_aside(out: Path, old: Path) -> bool:
    """Rename `out` to `old`; False when `out` cannot move (EBUSY: a mount point; EXDEV: a bind mount)."""
    try:
        os.rename(out, old)
    except OSError as exc:
        if exc.errno in (errno.EBUSY, errno.EXDEV):
            return False
        raise
    return True


def _entries(directory: Path) -> list[str]:
    """Top-level names in `directory` but our two reserved ones, the manifest last (moved last = the commit)."""
    names = sorted(n for n in os.listdir(directory) if n not in (INNER_NEW, INNER_OLD, ALL_ASIDE, MANIFEST))
    return names + ([MANIFEST] if os.path.lexists(directory / MANIFEST) else [])


def _move_all(src: Path, dst: Path, names: list[str], step: str) -> None:
    for i, name in enumerate(names):
        if i:
            _before_step(step)
        os.rename(src / name, dst / name)


def _swap_contents(new: Path, out: Path) -> None:
    """Replace the contents of `out`, a dir that cannot be renamed (a mount point), by those of `new`.

    The staging dir is on another file system, so the new set is first copied into out/.entropy-probe.new.tmp
    (copy_in). Then, renames within `out`, with SIGINT/SIGTERM held back:
    set_aside_contents  every old entry into out/.entropy-probe.old.tmp, the manifest FIRST; then the mark
                        .entropy-probe.all-aside there (an empty file: it fits on a full disk)
    move_in_contents    every new entry into out, the manifest LAST (commit: out holds a manifest again)
    and the two inner dirs are deleted. A kill at any point: `_recover_contents` at the next start restores
    the complete old set, or keeps the complete new set once its manifest is in.
    """
    inner_new, inner_old = out / INNER_NEW, out / INNER_OLD
    _before_step("copy_in")
    try:
        shutil.copytree(new, inner_new, symlinks=True)
        inner_old.mkdir()
    except BaseException:
        _discard_inner(out)  # the old set was not touched yet
        raise
    try:
        with _signals_deferred():
            try:
                _before_step("set_aside_contents")
                old_names = _entries(out)
                _move_all(out, inner_old, old_names[-1:] + old_names[:-1], "set_aside_entry")  # manifest first
                (inner_old / ALL_ASIDE).touch()  # from here on, what is at out is the new set's
                _before_step("move_in_contents")
                _move_all(inner_new, out, _entries(inner_new), "move_in_entry")
            except BaseException:
                _recover_contents(out)  # an error half-way: the old set goes back
                raise
    finally:  # also when a signal held back during the renames is raised now
        _before_step("commit")  # the new manifest is in (or the old set back): only the inner dirs are left
        _discard_inner(out)


def _discard_inner(out: Path) -> None:
    for name in (INNER_NEW, INNER_OLD):
        if os.path.lexists(out / name):
            shutil.rmtree(out / name)


def _recover_contents(out: Path) -> None:
    """Undo what a kill left inside an --out whose contents were being replaced (see `_swap_contents`).

    A manifest at out: a complete set is there (the old one before set_aside, the new one after the commit).
    Else the old set is (partly) in .entropy-probe.old.tmp: once all of it is there (the all-aside mark),
    what is at out is the new set's first entries (removed); the old entries then go back, the manifest last
    (a kill during this recovery leaves a state the next one resumes from).
    """
    inner_new, inner_old = out / INNER_NEW, out / INNER_OLD
    if not (os.path.lexists(inner_new) or os.path.lexists(inner_old)):
        return
    if not os.path.lexists(out / MANIFEST) and inner_old.is_dir():
        if os.path.lexists(inner_old / ALL_ASIDE):
            for name in _entries(out):
                _remove_entry(out / name)
            (inner_old / ALL_ASIDE).unlink()  # before any old entry goes back: what is at out is old from here on
        _before_step("restore")
        _move_all(inner_old, out, _entries(inner_old), "restore_entry")
    _discard_inner(out)


def _remove_entry(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _ours(path: Path) -> bool:
    """A dir this tool made: it holds our manifest (staging dirs get one at creation, and deletion removes it last)."""
    return path.is_dir() and not path.is_symlink() and (path / MANIFEST).is_file()


def _remove_owned(path: Path) -> None:
    """Delete a dir of ours with its manifest last, so a kill midway leaves it still recognisably ours."""
    for child in path.iterdir():
        if child.name != MANIFEST:
            _remove_entry(child)
    (path / MANIFEST).unlink(missing_ok=True)  # an old set written before manifests (or emptied by DVC) has none
    path.rmdir()


def _discard_old_set(trash: Path, out: Path) -> None:
    """Delete a replaced output set — only the files its manifest lists. Anything else in it was written into
    --out by someone else after the stage's last ownership check: it is moved into the new `out` (beside the
    new files, `.kept` added on a name clash), where the next run will see it and refuse to replace it."""
    manifest = _read_manifest(trash) or {"files": [], "dirs": []}
    files, dirs = _listing(trash)
    for rel in sorted(files - set(manifest["files"]) - {MANIFEST}):
        target = out / rel
        while os.path.lexists(target):
            target = target.with_name(target.name + ".kept")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(trash / rel, target)
        log.warning("%s was written into %s while the stage ran: kept as %s", rel, out, target)
    for rel in manifest["files"]:
        if os.path.lexists(trash / rel):
            _remove_entry(trash / rel)
    for rel in sorted(dirs, key=lambda d: d.count("/"), reverse=True):  # deepest first: all empty now
        if os.path.isdir(trash / rel) and not os.path.islink(trash / rel):
            os.rmdir(trash / rel)
    (trash / MANIFEST).unlink(missing_ok=True)  # last: a kill before it leaves the dir recognisably ours
    trash.rmdir()


def _clean_leftovers(out: Path) -> None:
    """Undo what a killed run left next to `out` (lock held): see the states in `_swap_in`.

    Only dirs that hold our manifest are touched: a user's dir that happens to carry one of these names stays.
    """
    old, trash = _set_aside_path(out), _trash_path(out)
    if _ours(trash):
        _discard_old_set(trash, out)
    if _ours(old):
        if os.path.lexists(out):
            os.rename(old, trash)  # killed after the new set went in: the old one is obsolete
            _discard_old_set(trash, out)
        else:
            os.rename(old, out)  # killed between set_aside and rename_in: the old set is the output
    for path in out.parent.iterdir():
        if _is_staging_dir(path, out):
            if _ours(path):
                _remove_owned(path)
            elif not any(path.iterdir()):  # killed before its marker was written: empty, so nobody's data
                path.rmdir()
    if out.is_dir() and not out.is_symlink():
        _recover_contents(out)
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


def _make_dirs(path: Path) -> list[Path]:
    """mkdir -p `path`; returns the dirs it created, outermost first."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    created = []
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # a concurrent run made it: not ours to remove
            d.mkdir()
            created.append(d)
    return created


def _remove_empty(dirs: list[Path]) -> None:
    """Remove the dirs `_make_dirs` created, innermost first, as long as they are empty (nothing was written)."""
    for d in reversed(dirs):
        try:
            d.rmdir()
        except OSError:  # not empty (the output, or another run's lock), or already gone
            return


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` (flock on .NAME.entropy-probe.lock next to it) for the block.

    The parent dirs the lock file needs are created, and removed again on the way out if they stay empty:
    a refused or failed run leaves no trace.
    """
    path = _lock_path(out)
    with _write_errors(path):
        created = _make_dirs(out.parent)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:  # another refused run removed the parent it had created: make it again
                created += _make_dirs(out.parent)
                continue
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
        _remove_empty(created)


@contextlib.contextmanager
def _writing(out: Path, stage: str | None) -> Iterator[None]:
    """Lock `out`, clean up a killed run's leftovers, refuse it unless ours, and register the claim."""
    with _locked(out), _terminate_raises():
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
    _check_lengths(out)
    return out


def _limits(path: Path) -> tuple[int, int]:
    """(longest name, longest path) in bytes on the file system of `path`'s nearest existing ancestor."""
    while not os.path.exists(path):  # (os.path.exists is False where the path is too long to look up)
        path = path.parent
    try:
        return os.pathconf(path, "PC_NAME_MAX"), os.pathconf(path, "PC_PATH_MAX") - 1  # PATH_MAX counts the NUL
    except (OSError, ValueError):
        return 255, 4095


def _check_lengths(out: Path) -> None:
    """Refuse an --out whose name or path the file system cannot hold, before anything is created."""
    name_max, path_max = _limits(out)
    for part in out.parts:
        size = len(os.fsencode(part))
        if size > name_max:
            raise ProbeError(
                f"output dir {str(out)[:40]}... has a name of {size} bytes ({part[:20]}...); "
                f"the file system allows {name_max}",
                "choose a shorter --out",
            )
    longest = max(len(os.fsencode(out)), len(os.fsencode(_lock_path(out))))  # the lock file's name is the longest
    if longest > path_max:
        raise ProbeError(
            f"output dir path {str(out)[:40]}... is {longest} bytes long with its lock file; "
            f"the system allows {path_max}",
            "choose a shorter --out path",
        )


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
            new = Path(tempfile.mkdtemp(prefix=f".{_stem(out)}.", suffix=".tmp", dir=out.parent))
        _staging[new] = out
        try:
            with _write_errors(out):
                # marks it ours (`_ours`) at once: an empty file needs no free block, so even a full disk
                # leaves a staging dir the next run recognises (and this one removes in `finally`)
                (new / MANIFEST).touch()
                os.chmod(new, 0o777 & ~UMASK)
                write_json(new / MANIFEST, {"stage": stage, "files": [], "dirs": []})
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
