"""Output paths: checked before any work starts, never overwritten by surprise, and a finished
measurement never lost to a failed write.

* `check_file` / `check_dir`: create the parent directory (or the directory), and prove it is
  writable by creating and removing a file in it. `os.access` is not enough: it says yes to
  root for a read-only file system or a path under a regular file. Any problem is a one-line
  `UsageError` (CLI exit 2) before the first case runs.
* `reserve`: a results file name no other run holds. A default name is made unique with a
  run-id suffix when a file (or another run's reservation) already has it; an explicit name
  that exists is refused unless `force`.
* `write_new`: writes a file atomically without ever replacing an existing one (temporary
  file, fsync, then `link`, which fails if the name exists), unless `replace` is given.
* `save_fallback`: when the real destination fails at the end, the same bytes go to the first
  writable of a few fallback directories and the caller prints one line naming both.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from vlab._errors import UsageError
from vlab._files import atomic_open, current_umask

#: Suffix of the journal a run keeps beside its results file (see vlab.run.journal).
JOURNAL_SUFFIX = ".journal"


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def check_dir(path: str | os.PathLike[str], what: str = "output directory") -> Path:
    """Create `path` (and its parents) if missing and prove a file can be created in it."""
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise UsageError(f"{what} {d}: exists and is not a directory")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{what} {d}: cannot create it: {_why(e)}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".vlab-probe.", dir=d)
    except OSError as e:
        raise UsageError(f"{what} {d}: not writable: {_why(e)}") from None
    os.close(fd)
    os.unlink(probe)
    return d


def check_file(path: str | os.PathLike[str], what: str = "output file", *,
               force: bool = True) -> Path:
    """Check that `path` can be written: its directory is created and writable, and it is not
    a directory. With `force` False an existing file is refused too (no silent overwrite)."""
    p = Path(path)
    if str(path) == "" or p.name in ("", ".", ".."):
        raise UsageError(f"{what} {str(path)!r}: not a file name")
    if p.is_dir():
        raise UsageError(f"{what} {p}: is a directory")
    if p.exists() and not force:
        raise UsageError(f"{what} {p}: already exists (give --force to replace it)")
    if p.exists() and not p.is_file():
        raise UsageError(f"{what} {p}: exists and is not a regular file")
    check_dir(p.parent if str(p.parent) else ".", f"{what} {p}: directory")
    return p


def reserve(path: str | os.PathLike[str], run_id: str, *, default: bool,
            force: bool = False) -> Path:
    """The results path of a new run, checked writable, with its journal created exclusively
    (the journal is the run's claim on the name: two runs never pick the same one).

    `default`: `path` is the automatic name; if it (or its journal) is taken, the name gets a
    `-<run_id>` suffix. Otherwise `path` was given by the user: an existing file is refused
    unless `force`, and a journal of another run still going (or killed) is refused always.
    """
    p = check_file(path, "results file", force=True)
    candidates = [p]
    if default:
        candidates.append(p.with_name(f"{p.stem}-{run_id}{p.suffix}"))
    elif p.exists() and not force:
        raise UsageError(f"results file {p}: already exists (give --force to replace it, "
                         "or another -o)")
    for cand in candidates:
        if default and cand.exists():
            continue
        journal = cand.with_name(cand.name + JOURNAL_SUFFIX)
        try:
            fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~current_umask())
        except FileExistsError:
            if default:
                continue
            raise UsageError(f"results file {p}: a journal {journal} of another run exists "
                             f"(resume it with `vlab run --resume {journal}`, or remove it)") \
                from None
        except OSError as e:
            raise UsageError(f"results file {cand}: cannot create its journal: {_why(e)}") \
                from None
        os.close(fd)
        return cand
    raise UsageError(f"results file {p}: no free name (tried {', '.join(map(str, candidates))})")


def write_new(data: bytes, path: str | os.PathLike[str], *, replace: bool = False) -> Path:
    """Write `data` to `path` atomically. Without `replace`, an existing `path` is never
    overwritten (FileExistsError); with it, the old content is replaced atomically."""
    target = Path(path)
    if replace:
        with atomic_open(target, "wb") as f:
            f.write(data)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, target)                 # atomic, and fails if the name exists
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    _fsync_dir(target.parent)
    return target


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fallback_dirs() -> list[Path]:
    """Where results go when their destination fails: $VLAB_FALLBACK_DIR, the temporary
    directory, the working directory, the home directory (the first that takes them)."""
    out = [os.environ.get("VLAB_FALLBACK_DIR"), tempfile.gettempdir(), os.getcwd(),
           os.path.expanduser("~")]
    return [Path(d) for d in out if d]


def save_fallback(data: bytes, name: str) -> Path:
    """Write `data` as `name` (made unique) in the first fallback directory that takes it."""
    last: OSError | None = None
    stem, dot, ext = name.rpartition(".")
    for d in fallback_dirs():
        try:
            fd, path = tempfile.mkstemp(prefix=f"{stem if dot else name}-", suffix=f".{ext}"
                                        if dot else "", dir=d)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(path, 0o666 & ~current_umask())
            return Path(path)
        except OSError as e:
            last = e
    raise OSError(f"no fallback directory took the file ({_why(last) if last else 'none'})")


def save(data: bytes, path: str | os.PathLike[str], *, replace: bool = False,
         alternative: str | os.PathLike[str] | None = None) -> tuple[Path | None, str | None]:
    """Write finished results so that they are never lost: to `path` (never over an existing
    file unless `replace`), else to `alternative` if `path` exists, else to a fallback
    directory. Returns where they went (None if nowhere) and, if not at `path`, a one-line
    message saying why and where."""
    target = Path(path)
    try:
        return write_new(data, target, replace=replace), None
    except FileExistsError:
        why = "it exists"
        if alternative is not None:
            try:
                return write_new(data, alternative), None
            except OSError as e:
                why = _why(e)
    except OSError as e:
        why = _why(e)
    try:
        where = save_fallback(data, target.name)
    except OSError as e:
        return None, f"cannot write {target} ({why}), nor a fallback copy ({e})"
    return where, f"cannot write {target} ({why}); saved to {where} instead"


def write_stdout(text: str) -> None:
    """Print `text` to standard output; a stdout that cannot be written (a full disk,
    /dev/full, a closed pipe) is a one-line UsageError instead of a traceback."""
    import sys

    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        _silence_stdout()
        raise UsageError(f"cannot write to standard output: {_why(e)}") from None


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush does not fail again."""
    import sys

    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError):
        pass
