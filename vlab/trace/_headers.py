"""Kernel headers for bcc.

bcc compiles BPF C with clang against kernel headers. Its helpers include kernel headers even
for tracepoint-only programs, so without headers nothing compiles. vlab's tracer reads only
tracepoint arguments (whose layout bcc takes from the running kernel's format files), so headers
of a different, older kernel are good enough; what matters is that some complete tree exists.

Order of preference:

1. `$BCC_KERNEL_SOURCE` already set to a directory (the user knows best);
2. `/lib/modules/$(uname -r)/build` (headers for the running kernel);
3. Debian's split packages: `/usr/src/linux-headers-<ver>-common` (arch-independent part) and
   `/usr/src/linux-headers-<ver>-<flavour>` (generated headers, config). bcc takes one directory
   when `BCC_KERNEL_SOURCE` is set, so we build a merged tree of symlinks in a cache directory
   (`$VLAB_CACHE/kheaders/<ver>-<flavour>` or `~/.cache/vlab/kheaders/...`) and point
   `BCC_KERNEL_SOURCE` at it.
"""
from __future__ import annotations

import glob
import json
import os
import platform
import re
import shutil
from dataclasses import asdict, dataclass

#: Overridable in tests.
MODULES_DIR = "/lib/modules"
USR_SRC = "/usr/src"
_STAMP = ".vlab-merged.json"
# The BCC_KERNEL_SOURCE value this module set (so a second call still reports "merged").
_set_by_us: HeaderStatus | None = None

# Debian's flavour suffix for the machine we run on (the arch tree we want to merge).
_DEBIAN_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "i686": "686", "i386": "686"}


@dataclass(frozen=True)
class HeaderStatus:
    """Which kernel headers bcc will use, or why there are none.

    `kind` is "env" (`BCC_KERNEL_SOURCE` was already set), "build" (`/lib/modules/<release>/build`),
    "merged" (a symlink tree merging Debian's -common and arch header packages) or None.
    `version` is the headers' kernel version, `running` the running kernel's release;
    they differ when headers of another kernel are used (fine for tracepoints).
    """

    ok: bool
    kind: str | None
    path: str | None
    version: str | None
    running: str
    reason: str

    def as_dict(self) -> dict:
        """Plain-dict form for JSON output (`vlab doctor --json`)."""
        return asdict(self)


def default_cache_dir() -> str:
    """`$VLAB_CACHE/kheaders`, else `$XDG_CACHE_HOME/vlab/kheaders`, else `~/.cache/vlab/kheaders`."""
    if os.environ.get("VLAB_CACHE"):
        return os.path.join(os.environ["VLAB_CACHE"], "kheaders")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vlab", "kheaders")


def _version_key(ver: str) -> list:
    """Natural sort key for versions like "6.1.0-56" (numbers compare as numbers)."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+~]", ver)]


def find_debian_trees(usr_src: str | None = None) -> list[tuple[str, str, str]]:
    """Installed Debian header pairs as (version-flavour, common_dir, arch_dir), newest first.

    A pair is a `linux-headers-<ver>-common` directory plus a `linux-headers-<ver>-<flavour>`
    directory holding generated headers (`include/generated`). The flavour matching this
    machine ("amd64" on x86_64) is preferred over others (cloud-amd64, rt-amd64).
    """
    root = usr_src or USR_SRC
    want = _DEBIAN_ARCH.get(platform.machine(), "")
    pairs = []
    for common in glob.glob(os.path.join(root, "linux-headers-*-common")):
        ver = os.path.basename(common)[len("linux-headers-"):-len("-common")]
        for arch in glob.glob(os.path.join(root, f"linux-headers-{ver}-*")):
            flavour = os.path.basename(arch)[len(f"linux-headers-{ver}-"):]
            if flavour == "common" or flavour.startswith("common-"):
                continue
            if not os.path.isdir(os.path.join(arch, "include", "generated")):
                continue
            pairs.append((ver, flavour, common, arch))
    pairs.sort(key=lambda p: (_version_key(p[0]), p[1] == want, p[1]), reverse=True)
    return [(f"{v}-{f}", c, a) for v, f, c, a in pairs]


def _merge_into(dst: str, sources: list[str]) -> None:
    """Create `dst` as the union of `sources` (earlier ones win on conflicts) with symlinks.

    Only directories present in several sources are recreated; everything else is one symlink,
    so the tree has a few dozen entries, not tens of thousands.
    """
    os.mkdir(dst)
    names: list[str] = []
    seen = set()
    for src in sources:
        for name in sorted(os.listdir(src)):
            if name not in seen:
                seen.add(name)
                names.append(name)
    for name in names:
        cands = [os.path.join(s, name) for s in sources if os.path.lexists(os.path.join(s, name))]
        dirs = [c for c in cands if os.path.isdir(c)]
        if len({os.path.realpath(d) for d in dirs}) >= 2:
            _merge_into(os.path.join(dst, name), dirs)
        else:
            os.symlink(dirs[0] if dirs else cands[0], os.path.join(dst, name))


def _stamp_for(common: str, arch: str) -> dict:
    return {"common": common, "arch": arch,
            "common_mtime": os.stat(common).st_mtime_ns, "arch_mtime": os.stat(arch).st_mtime_ns}


def merge_debian_headers(common: str, arch: str, target: str) -> str:
    """Build (or reuse) the merged symlink tree at `target`; idempotent and safe to race.

    The tree is built beside the target and renamed into place; a stamp file records which
    package trees it came from, so an upgrade of the headers package rebuilds it.
    """
    want = _stamp_for(common, arch)
    stamp = os.path.join(target, _STAMP)
    try:
        with open(stamp, encoding="utf-8") as f:
            if json.load(f) == want:
                return target
    except (OSError, ValueError):
        pass
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{target}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _merge_into(tmp, [arch, common])
    with open(os.path.join(tmp, _STAMP), "w", encoding="utf-8") as f:
        json.dump(want, f)
    if os.path.lexists(target):
        old = f"{target}.old-{os.getpid()}"
        try:
            os.rename(target, old)
            shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    try:
        os.rename(tmp, target)
    except OSError:
        # Someone else renamed theirs into place first: use it if it is complete.
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(stamp):
            raise
    return target


def ensure_headers(cache_dir: str | None = None) -> HeaderStatus:
    """Find kernel headers bcc can use and make bcc see them (sets `BCC_KERNEL_SOURCE` when a
    merged tree is needed). Returns what was chosen, or `ok=False` with the reason."""
    global _set_by_us
    running = os.uname().release
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if _set_by_us is not None and env == _set_by_us.path and os.path.isdir(env):
        return _set_by_us
    if env and os.path.isdir(env):
        return HeaderStatus(True, "env", env, None, running, "BCC_KERNEL_SOURCE is set")
    build = os.path.join(MODULES_DIR, running, "build")
    if os.path.isdir(build):
        return HeaderStatus(True, "build", build, running, running,
                            "headers for the running kernel")
    trees = find_debian_trees()
    if not trees:
        return HeaderStatus(False, None, None, None, running,
                            f"no kernel headers: {build} is missing and no Debian "
                            f"linux-headers-*-common + arch tree under {USR_SRC} "
                            "(apt-get install linux-headers-amd64)")
    name, common, arch = trees[0]
    target = os.path.join(cache_dir or default_cache_dir(), name)
    try:
        merge_debian_headers(common, arch, target)
    except OSError as e:
        return HeaderStatus(False, None, None, name, running,
                            f"cannot build merged header tree at {target}: {e}")
    os.environ["BCC_KERNEL_SOURCE"] = target
    note = "merged Debian headers" + ("" if name == running
                                      else f" of {name} (running {running}; fine for tracepoints)")
    _set_by_us = HeaderStatus(True, "merged", target, name, running, note)
    return _set_by_us
