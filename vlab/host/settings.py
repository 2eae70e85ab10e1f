"""`vlab host set KEY=VALUE` / `vlab host restore`: opt-in host configuration changes.

Comparing EPT against shadow paging, or THP against 4 KiB backing, means changing the host. vlab
does it only when asked, one knob at a time, and remembers the previous value in a state file so
`restore_host` can put it back. Changes are refused while any VM exists (a module reload would
pull KVM from under it, and a live change would split one measurement across two
configurations), and refused with an explanation where they cannot work: a built-in module
cannot be reloaded, KVM on PVM has no EPT/NPT or APICv/AVIC at all, a CPU without APICv or AVIC
cannot have it switched on, and a knob another one depends on (IPI virtualization on APICv,
AVIC on NPT) is changed in the order that keeps both true: the reload never silently turns a
knob off, so `restore_host` puts back exactly what was there (newest change first).
Integer values must fit the kernel variable they are written to (`_Knob.bits`).

All paths are read and written through `root` so tests can work on a copied recorded tree.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import stat
import subprocess
from dataclasses import dataclass
from typing import Callable

from vlab._errors import UsageError, VlabError
from vlab._files import atomic_open
from vlab._inputs import check_fits
from vlab.host.fingerprint import cpu_flag_lines
from vlab.host.sysfs import bracketed, exists, listdir, module_state, param_true, read_text, rootpath

STATE_SCHEMA = "vlab.host-state/1"


class Refused(UsageError):
    """The change is understood but cannot or must not be made on this host right now."""


def _parse_bool(value: str) -> str:
    low = value.strip().lower()
    if low in ("1", "y", "yes", "true", "on"):
        return "1"
    if low in ("0", "n", "no", "false", "off"):
        return "0"
    raise UsageError(f"expected a boolean (0/1, Y/N, on/off), got {value!r}")


def _parse_uint(value: str) -> str:
    try:
        number = int(value.strip(), 10)
    except ValueError:
        number = -1
    if number < 0:
        raise UsageError(f"expected a non-negative integer, got {value!r}")
    return str(number)


def _parse_thp(value: str) -> str:
    low = value.strip().lower()
    if low not in ("always", "madvise", "never"):
        raise UsageError(f"thp must be always, madvise or never, got {value!r}")
    return low


@dataclass(frozen=True)
class _Knob:
    key: str
    path: str                      # the sysfs file, as on a live host
    parse: Callable[[str], str]    # user text -> canonical value (raises UsageError)
    kind: str                      # "bool", "uint" or "choice": how to compare file contents
    module: str | None = None      # set for module parameters
    doc: str = ""
    runtime: bool = True           # False: the kernel declares the parameter 0444 (load time only)
    bits: int | None = None        # uint knobs: width of the kernel variable written to

    @property
    def param(self) -> str:
        return os.path.basename(self.path)

    def canonical(self, text: str | None) -> str | None:
        """The file's current contents in the form `parse` produces, for comparison."""
        if text is None:
            return None
        if self.kind == "bool":
            return "1" if param_true(text) else "0"
        if self.kind == "choice":
            return bracketed(text)
        return text.strip()


def _module_knob(module: str, param: str, parse, kind: str, doc: str, runtime: bool,
                 bits: int | None = None) -> _Knob:
    return _Knob(f"{module}.{param}", f"/sys/module/{module}/parameters/{param}", parse, kind,
                 module, doc, runtime, bits)


KNOBS: dict[str, _Knob] = {k.key: k for k in (
    _module_knob("kvm_intel", "ept", _parse_bool, "bool",
                 "EPT (two-dimensional paging) on VMX hosts; 0 means shadow paging", False),
    _module_knob("kvm_intel", "vpid", _parse_bool, "bool",
                 "VPID-tagged TLB entries on VMX hosts; 0 flushes the TLB on every transition",
                 False),
    _module_knob("kvm_intel", "enable_apicv", _parse_bool, "bool",
                 "APICv on VMX hosts (virtualized local APIC with posted interrupts); 0 makes "
                 "every EOI, TPR write and IPI exit to KVM", False),
    _module_knob("kvm_intel", "enable_ipiv", _parse_bool, "bool",
                 "IPI virtualization on VMX hosts (needs APICv and a CPU with it, Sapphire "
                 "Rapids on; Linux 5.19+): IPIs to running vCPUs without an exit", False),
    _module_knob("kvm_amd", "npt", _parse_bool, "bool",
                 "NPT (two-dimensional paging) on SVM hosts; 0 means shadow paging", False),
    _module_knob("kvm_amd", "avic", _parse_bool, "bool",
                 "AVIC on SVM hosts (x2AVIC where the CPU has it; needs NPT and the CPU's avic "
                 "flag); 0 makes every EOI, TPR write and IPI exit to KVM", False),
    _module_knob("kvm", "halt_poll_ns", _parse_uint, "uint",
                 "how long a vCPU halted on the in-kernel local APIC polls for a wake-up "
                 "before sleeping", True, 32),
    _module_knob("haltpoll", "guest_halt_poll_ns", _parse_uint, "uint",
                 "when this host is itself a guest (cpuidle-haltpoll): how long an idle CPU "
                 "polls before halting; 0 makes every cross-CPU wake-up an IPI through the "
                 "outer hypervisor (affects io.virtio notify=kernel)", True, 32),
    _Knob("thp", "/sys/kernel/mm/transparent_hugepage/enabled", _parse_thp, "choice",
          doc="transparent hugepages: always, madvise or never"),
    # nr_hugepages is an unsigned long
    _Knob("hugepages.2m", "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages",
          _parse_uint, "uint", doc="number of reserved 2 MiB hugetlb pages", bits=64),
    _Knob("hugepages.1g", "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages",
          _parse_uint, "uint", doc="number of reserved 1 GiB hugetlb pages", bits=64),
)}

# Knobs whose "1" needs another knob at "1": (needs, why). The kernel would otherwise turn the
# first off itself at load, and a later reload would pin that forced value.
REQUIRES: dict[str, tuple[str, str]] = {
    "kvm_intel.enable_ipiv": ("kvm_intel.enable_apicv", "IPI virtualization needs APICv"),
    "kvm_amd.avic": ("kvm_amd.npt", "AVIC needs NPT"),
}

# Knobs whose "1" needs a CPU feature: (cpuinfo line, flag, feature). Judged only where the
# kernel prints that line (`vmx flags` since Linux 5.8).
CPU_FEATURE: dict[str, tuple[str, str, str]] = {
    "kvm_intel.enable_apicv": ("vmx flags", "apicv", "APICv"),
    "kvm_amd.avic": ("flags", "avic", "AVIC"),
}


def check_bits(key: str, value: str) -> None:
    """An integer value for `key` must fit the kernel variable it is written to (its knob's
    `bits`): a one-line UsageError naming the width if not. Not-a-number is left to the knob's
    parser, which says so."""
    knob = KNOBS.get(key)
    if knob is None or knob.bits is None:
        return
    try:
        n = int(value.strip(), 10)
    except ValueError:
        return
    check_fits(key, n, 0, (1 << knob.bits) - 1, f"a {knob.bits}-bit kernel variable")


def parse_assignment(text: str) -> tuple[str, str]:
    """Split a CLI argument "KEY=VALUE" into (key, value); UsageError if it is not one."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise UsageError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def default_state_path() -> str:
    """Where previous values are kept: $XDG_CACHE_HOME/vlab/host-state.json (~/.cache/...)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "vlab", "host-state.json")


def running_vms(root: str = "/") -> list[int]:
    """PIDs of processes holding a KVM VM file descriptor (an `anon_inode:kvm-vm` fd link).

    Processes whose fds cannot be read (other users, when not root) are not seen; as root every
    VM on the host is.
    """
    pids = []
    for entry in listdir(root, "/proc"):
        if not entry.isdigit():
            continue
        fd_dir = rootpath(root, f"/proc/{entry}/fd")
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target == "anon_inode:kvm-vm":
                pids.append(int(entry))
                break
    return sorted(pids)


def host_settings(root: str = "/") -> dict[str, str | None]:
    """Current value of every settable key (None where the file does not exist)."""
    return {key: knob.canonical(read_text(root, knob.path)) for key, knob in KNOBS.items()}


# ----------------------------------------------------------------------------------------------
# State file


def _load_state(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        return {"schema": STATE_SCHEMA, "saved": {}}
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read host state file {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("schema") != STATE_SCHEMA:
        raise UsageError(f"{path} is not a vlab host state file ({STATE_SCHEMA})")
    state.setdefault("saved", {})
    return state


def _save_state(path: str, state: dict) -> None:
    with atomic_open(path, "w", perms=0o600) as f:   # private to the user who set the host
        json.dump(state, f, indent=1, sort_keys=True)
        f.write("\n")


# ----------------------------------------------------------------------------------------------
# Applying a value


def _run_command(cmd: list[str]) -> None:
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise VlabError(f"{cmd[0]} not found: cannot reload kernel modules") from None
    except subprocess.CalledProcessError as exc:
        raise VlabError(f"{' '.join(cmd)} failed: {exc.stderr.strip() or exc.returncode}") from None


def _refuse_if_vms(root: str, key: str, vms: Callable[[str], list[int]] | None) -> None:
    pids = (vms or running_vms)(root)
    if pids:
        listed = ", ".join(map(str, pids))
        raise Refused(f"refusing to change {key} while VMs exist (pids {listed}): stop them first")


def _check_module(root: str, knob: _Knob) -> None:
    """Raise Refused, saying why, when the knob's module is not on this host."""
    module = knob.module
    assert module is not None
    if module_state(root, module) == "absent":
        if module == "haltpoll":
            raise Refused("cpuidle-haltpoll is not on this host (it is the idle driver of a "
                          f"kernel running as a guest), so {knob.key} does not apply")
        on_pvm = (module_state(root, "kvm_pvm") != "absent"
                  and module_state(root, "kvm_intel") == "absent"
                  and module_state(root, "kvm_amd") == "absent")
        if on_pvm and knob.param in ("ept", "npt"):
            raise Refused("this host runs KVM on PVM, which is shadow-paging only: there is no "
                          "EPT/NPT to switch")
        if on_pvm and knob.param in ("enable_apicv", "enable_ipiv", "avic"):
            raise Refused("this host runs KVM on PVM, which has no APICv/AVIC: KVM always "
                          f"emulates the local APIC, so {knob.key} does not apply")
        if on_pvm:
            raise Refused(f"this host runs KVM on PVM: {module} is not loaded, so {knob.key} "
                          "does not apply")
        other = {"kvm_intel": "kvm_amd", "kvm_amd": "kvm_intel"}.get(module)
        if other and module_state(root, other) != "absent":
            raise Refused(f"{module} is not loaded on this host (it uses {other}), so "
                          f"{knob.key} does not apply")
        raise Refused(f"{module} is not loaded on this host, so {knob.key} cannot be set")
    if not exists(root, knob.path):
        raise Refused(f"{module} on this kernel has no {knob.param} parameter, so {knob.key} "
                      "cannot be set")


def _check_dependencies(root: str, key: str, new: str,
                        planned: dict[str, str] | None = None) -> None:
    """Raise Refused when `key`=`new` needs a CPU feature the CPU lacks, or would leave a knob
    on whose requirement is off (see REQUIRES). `planned` overrides the host's current values
    with those earlier steps of the same dry run would have set."""
    now = {**host_settings(root), **(planned or {})}
    if new == "1" and key in CPU_FEATURE:
        line, flag, feature = CPU_FEATURE[key]
        shown = cpu_flag_lines(root).get(line)
        if shown is not None and flag not in shown:
            raise Refused(f"the CPU has no {feature} (no '{flag}' in the {line} of /proc/cpuinfo), "
                          f"so KVM would leave {key} off")
    if new == "1" and key in REQUIRES:
        needed, why = REQUIRES[key]
        if now.get(needed) == "0":
            raise Refused(f"{why}, and {needed} is 0: set {needed}=1 first")
    if new == "0":
        for dependent, (needed, why) in REQUIRES.items():
            if needed == key and now.get(dependent) == "1":
                raise Refused(f"{why}, and {dependent} is 1: set {dependent}=0 first")


def _writable(root: str, path: str) -> bool:
    """Whether sysfs would accept a write: module parameters declared read-only (mode 0444)
    reject writes even from root, so the mode bits decide, not access(2). (kvm.halt_poll_ns is
    0644 upstream but 0444 on some kernels, e.g. the PVM hosts this project is built on.)"""
    try:
        return bool(os.stat(rootpath(root, path)).st_mode & (stat.S_IWUSR | stat.S_IWGRP))
    except OSError:
        return False


def _write(root: str, path: str, value: str) -> None:
    try:
        with open(rootpath(root, path), "w", encoding="utf-8") as f:
            f.write(value + "\n")
    except OSError as exc:
        hint = " (run as root)" if exc.errno in (errno.EPERM, errno.EACCES) else ""
        raise VlabError(f"cannot write {value} to {path}: {exc.strerror}{hint}") from None


def _needs_reload(root: str, knob: _Knob) -> bool:
    """Whether only a module reload changes `knob` (a module parameter read-only at run time)."""
    return knob.module is not None and not (knob.runtime and _writable(root, knob.path))


def _check_reloadable(root: str, knob: _Knob, new: str) -> None:
    """Raise Refused when `knob` needs a reload that vlab cannot do: a built-in module, or kvm
    itself (which would mean unloading every vendor module). Checked before running VMs are,
    because it holds whatever runs."""
    if not _needs_reload(root, knob):
        return
    module = knob.module
    if module_state(root, module) == "builtin":
        raise Refused(f"{module} is built into the kernel and {knob.key} is read-only at run time: "
                      f"add {knob.key}={new} to the kernel command line and reboot")
    if module == "kvm":
        raise Refused(f"{knob.key} is read-only at run time on this kernel, and reloading kvm "
                      "means unloading every KVM vendor module: put 'options kvm "
                      f"{knob.param}={new}' in /etc/modprobe.d and reload KVM by hand")


def _apply(root: str, knob: _Knob, new: str, dry_run: bool,
           run: Callable[[list[str]], None] | None) -> str:
    """Make `knob` hold `new` (already canonical). Returns what was (or would be) done."""
    if not _needs_reload(root, knob):
        if dry_run:
            return f"would write {new} to {knob.path}"
        _write(root, knob.path, new)
        return f"wrote {new} to {knob.path}"

    # A read-only module parameter: only a module reload with the new value changes it.
    _check_reloadable(root, knob, new)
    module = knob.module
    assert module is not None
    kept = []
    for other in KNOBS.values():  # keep the other knobs of this module as they are now
        if other.module == module and other is not knob:
            current = other.canonical(read_text(root, other.path))
            if current is not None:
                kept.append(f"{other.param}={current}")
    before = knob.canonical(read_text(root, knob.path))
    commands = [["modprobe", "-r", module], ["modprobe", module, f"{knob.param}={new}", *kept]]
    described = " && ".join(" ".join(c) for c in commands)
    if dry_run:
        return f"would run: {described}"
    if run is None:
        if root != "/":
            raise VlabError(f"not reloading {module}: root is {root}, not the live host")
        run = _run_command
    run(commands[0])
    try:
        run(commands[1])
    except VlabError as exc:
        # Do not leave the host without its KVM module: load it back as it was.
        try:
            run(["modprobe", module, f"{knob.param}={before}", *kept])
            state = f"{module} was loaded back with {knob.param}={before}"
        except VlabError:
            state = f"{module} is NOT loaded now: modprobe {module} by hand"
        raise VlabError(f"{exc}; {state}") from None
    return f"ran: {described}"


def _verify(root: str, knob: _Knob, new: str) -> str:
    """Read the value back; the kernel may grant less than asked (hugepages) or refuse."""
    now = knob.canonical(read_text(root, knob.path))
    if now == new:
        return ""
    if knob.key.startswith("hugepages."):
        return (f"; asked for {new} pages, the kernel reserved {now} (not enough contiguous "
                "free memory)")
    why = ""
    if knob.kind == "bool" and (new, now) == ("1", "0"):
        why = ": KVM turned it off at load (the CPU or this kernel does not support it)"
    raise VlabError(f"{knob.key} reads {now} after setting it to {new}{why}")


def set_host(key: str, value: str, root: str = "/", dry_run: bool = False, *,
             state_path: str | None = None, vms: Callable[[str], list[int]] | None = None,
             run: Callable[[list[str]], None] | None = None) -> str:
    """Set one host knob (`vlab host set KEY=VALUE`) and remember its previous value.

    Keys are those of `KNOBS`: kvm_intel.ept, kvm_intel.vpid, kvm_intel.enable_apicv,
    kvm_intel.enable_ipiv, kvm_amd.npt, kvm_amd.avic, kvm.halt_poll_ns,
    haltpoll.guest_halt_poll_ns, thp, hugepages.2m, hugepages.1g. Runtime-writable files are
    written; read-only module parameters are changed by reloading the module
    (`modprobe -r M && modprobe M param=...`).
    `vms` (default `running_vms`) lists PIDs holding VMs and `run` executes a command; both are
    there so tests need neither VMs nor modprobe. With `dry_run` nothing is written and the
    message says what would be done; the refusals still apply.

    Returns a one-line description. Raises UsageError for unknown keys or bad values, Refused
    (a UsageError) when the change is not possible or not safe now, VlabError if it failed.
    """
    knob = KNOBS.get(key)
    if knob is None:
        raise UsageError(f"unknown host key {key!r} (known: {', '.join(KNOBS)})")
    check_bits(key, value)
    new = knob.parse(value)
    if knob.module is not None:
        _check_module(root, knob)
    elif not exists(root, knob.path):
        raise Refused(f"{knob.path} does not exist: this kernel cannot set {key}")
    _check_dependencies(root, key, new)
    old = knob.canonical(read_text(root, knob.path))
    if old != new:
        _check_reloadable(root, knob, new)
    _refuse_if_vms(root, key, vms)

    if old == new:
        return f"{key} is already {new}: nothing to do"
    done = _apply(root, knob, new, dry_run, run)
    if dry_run:
        return f"{key}: {old} -> {new}: {done}"

    path = state_path or default_state_path()
    state = _load_state(path)
    # Keep the first saved value: after several sets, restore returns to the original. `seq`
    # orders the changes, so restoring everything undoes the newest first (AVIC before NPT).
    seq = max((e.get("seq", 0) for e in state["saved"].values()), default=0) + 1
    state["saved"].setdefault(key, {
        "value": old, "root": root, "seq": seq,
        "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    _save_state(path, state)
    return f"{key}: {old} -> {new}: {done}{_verify(root, knob, new)}"


def restore_host(key: str | None = None, root: str = "/", dry_run: bool = False, *,
                 state_path: str | None = None, vms: Callable[[str], list[int]] | None = None,
                 run: Callable[[list[str]], None] | None = None) -> str:
    """Put back the value `set_host` saved for `key` (all saved keys when None).

    Same refusals as `set_host`. Restored keys are removed from the state file. Returns one line
    per key.
    """
    path = state_path or default_state_path()
    state = _load_state(path)
    saved = state["saved"]
    if key is not None and key not in KNOBS:
        raise UsageError(f"unknown host key {key!r} (known: {', '.join(KNOBS)})")
    if key is not None and key not in saved:
        raise UsageError(f"nothing saved for {key}: it was not changed with vlab host set")
    # Newest change first (state files from before `seq` existed: by name).
    keys = [key] if key is not None else sorted(saved, key=lambda k: (-saved[k].get("seq", 0), k))
    if not keys:
        return "nothing to restore"
    lines = []
    planned: dict[str, str] = {}     # what the steps before would have set (for a dry run)
    for k in keys:
        knob = KNOBS[k]
        old = saved[k]["value"]
        if old is None:
            raise VlabError(f"saved value of {k} is unknown: restore it by hand")
        if knob.module is not None:
            _check_module(root, knob)
        current = knob.canonical(read_text(root, knob.path))
        if current != old:
            _check_dependencies(root, k, old, planned)
            _check_reloadable(root, knob, old)
        _refuse_if_vms(root, k, vms)
        planned[k] = old
        if current == old:
            done, note = "already set", ""
        else:
            done = _apply(root, knob, old, dry_run, run)
            note = "" if dry_run else _verify(root, knob, old)
        lines.append(f"{k}: {current} -> {old}: {done}{note}")
        if not dry_run:
            del saved[k]
            _save_state(path, state)
    return "\n".join(lines)
