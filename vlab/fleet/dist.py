"""The controller's own build of vlab, as the wheel the fleet's hosts install.

The hosts need no package registry: the wheel is built here (once per state of the source
tree, cached) or given with `--dist`, and copied to each host by the playbook. The wheel holds
the compiled native module and guest payloads, so a host needs the same platform (x86-64 Linux)
and Python minor version as the controller, and vlab's dependencies importable by the
interpreter the inventory names (`vlab_python`).
"""
from __future__ import annotations

import glob
import hashlib
import os
import subprocess
import sys

from vlab._errors import UsageError, VlabError

_SKIP_DIRS = {"__pycache__", "out", "build", ".venv", ".git", "results"}
_SKIP_SUFFIX = (".so", ".o", ".pyc")


def source_tree() -> str | None:
    """The source checkout vlab runs from (an editable install), or None."""
    import vlab

    root = os.path.dirname(os.path.dirname(os.path.abspath(vlab.__file__)))
    return root if os.path.exists(os.path.join(root, "pyproject.toml")) else None


def tree_hash(root: str) -> str:
    """A hash of the files a wheel is built from (sources, not build outputs)."""
    h = hashlib.sha256()
    for top in ("vlab", "experiments", "native"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            for name in sorted(filenames):
                if name.endswith(_SKIP_SUFFIX) or name == "_native.c":
                    continue
                path = os.path.join(dirpath, name)
                h.update(os.path.relpath(path, root).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read())
    for name in ("pyproject.toml", "setup.py"):
        with open(os.path.join(root, name), "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vlab", "fleet-dist")


def controller_wheel(dist: str | None = None, *, timeout: float = 1800.0, progress=None) -> str:
    """The wheel to install on the hosts: `dist` when given (checked), else one built from the
    source tree vlab runs from, cached by the tree's hash."""
    if dist:
        if not dist.endswith(".whl"):
            raise UsageError(f"--dist {dist}: give a wheel (.whl); the hosts install it with "
                             f"pip --no-index, without building anything")
        if not os.path.isfile(dist):
            raise UsageError(f"--dist {dist}: no such file")
        return os.path.abspath(dist)
    root = source_tree()
    if root is None:
        raise UsageError("vlab is not running from a source tree: give the wheel to install "
                         "with --dist FILE.whl")
    out = os.path.join(cache_dir(), tree_hash(root))
    found = sorted(glob.glob(os.path.join(out, "vlab-*.whl")))
    if found:
        return found[-1]
    os.makedirs(out, exist_ok=True)
    if progress:
        progress(f"building the controller's wheel from {root} ...")
    tmp = out + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    try:
        p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                            "--wheel-dir", tmp, root], capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise VlabError(f"building the wheel took more than {timeout:g} s") from None
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["failed"])[-1]
        raise VlabError(f"building the wheel failed: {last}")
    built = sorted(glob.glob(os.path.join(tmp, "vlab-*.whl")))
    if not built:
        raise VlabError("building the wheel produced no vlab-*.whl")
    final = os.path.join(out, os.path.basename(built[-1]))
    os.replace(built[-1], final)
    os.rmdir(tmp)
    _prune(keep=3)
    return final


def _prune(keep: int) -> None:
    """Drop all but the `keep` most recent cached builds (one per source state)."""
    import shutil

    base = cache_dir()
    dirs = sorted((os.path.join(base, d) for d in os.listdir(base)
                   if not d.endswith(".tmp")), key=os.path.getmtime, reverse=True)
    for d in dirs[keep:]:
        shutil.rmtree(d, ignore_errors=True)
