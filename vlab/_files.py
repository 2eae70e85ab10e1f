"""Writing a file so that readers see its old content or its new content, never a torn one.

Results files, reports, dirty traces and the `vlab host set` state file are all written this
way: to a temporary file in the same directory (so the rename cannot cross file systems), which
is flushed, fsync'ed and renamed over the target; the directory is fsync'ed so the rename
survives a power cut. On any failure the temporary file is removed and the target keeps its
previous content.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is put back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w", *,
                perms: int | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file beside `path` for writing (`mode` "w" for UTF-8 text, "wb" for
    bytes); when the block ends normally it replaces `path` atomically.

    `perms` is the new file's mode; by default what `open()` would give (0666 less the umask),
    since `mkstemp` alone makes it 0600. Parent directories are created.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', not {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, (0o666 & ~current_umask()) if perms is None else perms)
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dir_fd = os.open(target.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the data itself is already synced
    finally:
        os.close(dir_fd)
