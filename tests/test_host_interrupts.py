"""Interrupt virtualization on the host side: the record's `interrupts` section, its doctor rows,
and the APICv/IPIv/AVIC knobs of `vlab host set`, on copies of the recorded trees (never the live
host, except the read-only refusals at the end)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlab import host as _host
from vlab._errors import UsageError, VlabError
from vlab.host import settings as _hostset
from vlab.host.interrupts import APIC_MODES

DATA = Path(__file__).parent / "data" / "hosts"
TREES = ("vmx", "vmx_ept0", "svm", "svm_tcg", "pvm", "nokvm")

# What the native layer reports on this project's PVM host (vlab doctor --json, 2026-12-03).
PVM_KVM = {
    "api_version": 12, "tsc_khz": 2596098, "nr_vcpus": 2, "max_vcpus": 1024,
    "caps": {"IRQCHIP": 1, "IRQFD": 1, "IRQ_ROUTING": 4096, "SIGNAL_MSI": 1,
             "TSC_DEADLINE_TIMER": 1, "X2APIC_API": 15, "HALT_POLL": 1},
    "guest_cpuid": {"x2apic": True, "tsc_deadline_timer": True},
}


def no_vms(root: str) -> list[int]:
    return []


@pytest.fixture
def state(tmp_path) -> str:
    return str(tmp_path / "state" / "host-state.json")


def tree(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(DATA / name, dst, symlinks=True)
    return dst


def param(root: Path, module: str, name: str, value: str | None) -> None:
    """Set (or with None remove) a module parameter file of a copied tree."""
    p = root / f"sys/module/{module}/parameters/{name}"
    if value is None:
        p.unlink()
    else:
        p.write_text(value + "\n")


def edit_cpuinfo(root: Path, line: str, drop: str = "", add: str = "") -> None:
    """Remove flag `drop` from / add flag `add` to the `line` ("flags", "vmx flags") of every
    processor in a copied tree's /proc/cpuinfo."""
    path = root / "proc/cpuinfo"
    out = []
    for text in path.read_text().splitlines():
        key, sep, value = text.partition(":")
        if sep and key.strip() == line:
            names = [n for n in value.split() if n != drop] + ([add] if add else [])
            text = f"{key}: {' '.join(names)}"
        out.append(text)
    path.write_text("\n".join(out) + "\n")


def irq(root, kvm: dict | None = None) -> dict:
    return _host.fingerprint(str(root), kvm)["interrupts"]


class FakeModprobe:
    """Records commands; `modprobe M a=b` rewrites M's parameter files like a real reload, and
    like KVM turns off what the hardware cannot do (`clear`: params forced to N)."""

    def __init__(self, root: Path, clear: tuple[str, ...] = ()):
        self.root, self.clear, self.commands = root, clear, []

    def __call__(self, cmd: list[str]) -> None:
        self.commands.append(cmd)
        if cmd[:1] == ["modprobe"] and cmd[1] != "-r":
            for arg in cmd[2:]:
                name, _, value = arg.partition("=")
                text = "N" if name in self.clear else {"1": "Y", "0": "N"}.get(value, value)
                param(self.root, cmd[1], name, text)


# ----------------------------------------------------------------------------------------------
# The record


@pytest.mark.parametrize("name, apic, posted, ipiv, x2accel, backend", [
    ("vmx", "apicv", True, False, True, "vmx_preemption_timer"),
    ("vmx_ept0", "apicv", True, False, True, "vmx_preemption_timer"),
    ("svm", "none", False, False, False, "hrtimer"),          # Milan with kvm_amd.avic=0
    ("svm_tcg", "none", False, False, False, "hrtimer"),      # TCG: no AVIC at all
    ("pvm", "none", False, False, False, "hrtimer"),
])
def test_recorded_trees(name, apic, posted, ipiv, x2accel, backend):
    i = irq(DATA / name)
    assert i["apic_virtualization"] == apic and apic in APIC_MODES
    assert i["posted_interrupts"] is posted
    assert i["ipi_virtualization"] is ipiv
    assert i["x2apic"] is True                    # KVM offers x2APIC to guests everywhere here
    assert i["x2apic_virtualization"] is x2accel
    assert i["timer_backend"] == backend
    assert i["halt_poll_ns"] == 200000 and i["halt_poll_ns_grow_start"] == 10000
    assert i["lapic_timer_advance"] == "adaptive" and i["lapic_timer_advance_ns"] is None
    assert i["tsc_deadline_timer"] is None       # /dev/kvm was not asked
    assert set(i["sources"]) == set(i) - {"sources"}
    json.dumps(i)


def test_sources_name_the_parameters_and_flags():
    src = irq(DATA / "vmx")["sources"]
    assert src["apic_virtualization"] == "kvm_intel.enable_apicv=Y"
    assert src["ipi_virtualization"] == "kvm_intel.enable_ipiv=N"
    assert "posted_intr set" in src["posted_interrupts"]
    assert src["halt_poll_ns"] == "kvm.halt_poll_ns=200000"
    assert src["lapic_timer_advance"] == "kvm.lapic_timer_advance_ns=-1"
    assert "kvm_intel.preemption_timer=Y" in src["timer_backend"]
    assert src["pi_inject_timer"] == "kvm.pi_inject_timer=0"
    svm = irq(DATA / "svm")["sources"]
    assert svm["apic_virtualization"] == "kvm_amd.avic=0 (cpu flag avic set)"
    assert irq(DATA / "svm_tcg")["sources"]["apic_virtualization"] == \
        "kvm_amd.avic=N (cpu flag avic absent)"
    pvm = irq(DATA / "pvm")
    assert "PVM" in pvm["sources"]["apic_virtualization"]
    assert pvm["sources"]["x2apic"] == "kvm_pvm.no_x2apic=N; host cpu flag x2apic set"
    assert pvm["sources"]["lapic_timer_advance"] == "kvm.lapic_timer_advance=Y"
    assert pvm["halt_poll_ns_grow"] == 2 and pvm["halt_poll_ns_shrink"] == 2


def test_svm_avic_and_x2avic(tmp_path):
    root = tree("svm", tmp_path)
    param(root, "kvm_amd", "avic", "1")
    i = irq(root)
    assert (i["apic_virtualization"], i["posted_interrupts"], i["ipi_virtualization"]) == \
        ("avic", True, True)
    assert i["x2apic_virtualization"] is False     # Milan: AVIC without x2AVIC
    assert "no enable_ipiv" in i["sources"]["ipi_virtualization"]
    edit_cpuinfo(root, "flags", add="x2avic")
    i = irq(root)
    assert i["apic_virtualization"] == "x2avic" and i["x2apic_virtualization"] is True
    param(root, "kvm_amd", "enable_ipiv", "N")    # newer kernels: IPI virtualization off
    assert irq(root)["ipi_virtualization"] is False


def test_vmx_apicv_off_and_ipiv_on(tmp_path):
    root = tree("vmx", tmp_path)
    param(root, "kvm_intel", "enable_ipiv", "Y")
    assert irq(root)["ipi_virtualization"] is True
    param(root, "kvm_intel", "enable_apicv", "N")
    i = irq(root)
    assert (i["apic_virtualization"], i["posted_interrupts"], i["x2apic_virtualization"]) == \
        ("none", False, False)
    param(root, "kvm_intel", "enable_ipiv", None)  # Linux before 5.19
    assert "before 5.19" in irq(root)["sources"]["ipi_virtualization"]
    param(root, "kvm_intel", "enable_apicv", None)
    assert irq(root)["apic_virtualization"] is None


def test_timer_parameters(tmp_path):
    root = tree("vmx", tmp_path)
    param(root, "kvm", "lapic_timer_advance_ns", "500")
    param(root, "kvm", "pi_inject_timer", "-1")
    param(root, "kvm_intel", "preemption_timer", "N")
    i = irq(root)
    assert (i["lapic_timer_advance"], i["lapic_timer_advance_ns"]) == ("fixed", 500)
    assert i["pi_inject_timer"] is None and "auto" in i["sources"]["pi_inject_timer"]
    assert i["timer_backend"] == "hrtimer"
    param(root, "kvm", "lapic_timer_advance_ns", "0")
    assert irq(root)["lapic_timer_advance"] == "off"
    param(root, "kvm", "lapic_timer_advance_ns", None)
    param(root, "kvm", "lapic_timer_advance", "N")   # newer kernels: a bool
    assert irq(root)["lapic_timer_advance"] == "off"


def test_what_kvm_answers_decides_x2apic_and_tsc_deadline(tmp_path):
    root = tree("pvm", tmp_path)
    param(root, "kvm_pvm", "no_x2apic", "Y")
    assert irq(root)["x2apic"] is False            # from the parameter alone
    i = irq(root, PVM_KVM)
    assert i["x2apic"] is True                     # KVM_GET_SUPPORTED_CPUID is what guests see
    assert i["sources"]["x2apic"].startswith("KVM_GET_SUPPORTED_CPUID 1.ECX[21]")
    assert i["tsc_deadline_timer"] is True
    assert i["sources"]["tsc_deadline_timer"].startswith("KVM_CAP_TSC_DEADLINE_TIMER=1")
    no_tsc = dict(PVM_KVM, caps=dict(PVM_KVM["caps"], TSC_DEADLINE_TIMER=0))
    assert irq(root, no_tsc)["tsc_deadline_timer"] is False
    record = _host.fingerprint(str(root), PVM_KVM)
    assert record["kvm"]["guest_cpuid"] == PVM_KVM["guest_cpuid"]


def test_no_kvm_records_nothing():
    i = irq(DATA / "nokvm")
    assert all(v is None for k, v in i.items() if k != "sources")
    assert set(i["sources"].values()) == {"no KVM"}


def test_ipiv_is_configuration_but_not_identity(tmp_path):
    """The interrupt fields show in host_diff; host_id keeps its keys, so results recorded
    before the section existed stay comparable."""
    root = tree("vmx", tmp_path)
    before = _host.fingerprint(str(root))
    param(root, "kvm_intel", "enable_ipiv", "Y")
    after = _host.fingerprint(str(root))
    assert after["host_id"] == before["host_id"]
    changed = {path for path, _, _ in _host.host_diff(before, after)}
    assert {"kvm.params.kvm_intel.enable_ipiv", "interrupts.ipi_virtualization"} <= changed
    param(root, "kvm_intel", "enable_apicv", "N")  # in host_id since before
    assert _host.fingerprint(str(root))["host_id"] != before["host_id"]


# ----------------------------------------------------------------------------------------------
# Doctor


def rows(root, kvm: dict | None = PVM_KVM) -> dict:
    return {c.name: c for c in _host.doctor_checks(_host.fingerprint(str(root), kvm))}


def test_doctor_vmx():
    r = rows(DATA / "vmx")
    assert r["apic"].ok and r["apic"].detail.startswith("APICv (kvm_intel.enable_apicv=Y)")
    assert "IPIs exit on the sender (kvm_intel.enable_ipiv=N)" in r["apic"].detail
    assert r["apic.posted"].ok
    assert r["halt_poll"].ok and "200 us" in r["halt_poll"].detail
    assert r["tsc_deadline"].ok and "VMX preemption timer" in r["tsc_deadline"].detail
    for cap in ("IRQFD", "IRQ_ROUTING", "SIGNAL_MSI"):
        assert r[f"cap.{cap}"].ok


def test_doctor_pvm():
    r = rows(DATA / "pvm")
    assert r["apic"].status == "WARN"
    assert r["apic"].detail.startswith("KVM on PVM has no APICv/AVIC")
    assert "guest x2APIC offered" in r["apic"].detail
    assert r["apic.posted"].status == "WARN"
    assert r["halt_poll"].ok and "grow 2" in r["halt_poll"].detail
    assert r["tsc_deadline"].ok and "host hrtimer" in r["tsc_deadline"].detail
    assert "timer advance adaptive, pi_inject_timer off" in r["tsc_deadline"].detail


def test_doctor_advice_where_apic_virtualization_is_off(tmp_path):
    vmx = tree("vmx", tmp_path)
    param(vmx, "kvm_intel", "enable_apicv", "N")
    r = rows(vmx)
    assert r["apic"].status == "WARN" and r["apic"].advice == \
        "vlab host set kvm_intel.enable_apicv=1"
    edit_cpuinfo(vmx, "vmx flags", drop="apicv")
    assert "no APICv" in rows(vmx)["apic"].advice

    assert rows(DATA / "svm")["apic"].advice == "vlab host set kvm_amd.avic=1"
    assert rows(DATA / "svm_tcg")["apic"].advice == "the CPU has no AVIC (no 'avic' cpu flag)"
    svm = tree("svm", tmp_path)
    param(svm, "kvm_amd", "npt", "0")
    assert rows(svm)["apic"].advice.startswith("AVIC needs NPT")


def test_doctor_halt_poll_off_and_timer_missing(tmp_path):
    root = tree("pvm", tmp_path)
    param(root, "kvm", "halt_poll_ns", "0")
    r = rows(root, dict(PVM_KVM, caps=dict(PVM_KVM["caps"], TSC_DEADLINE_TIMER=0, IRQFD=0)))
    assert r["halt_poll"].status == "WARN" and "sleeps at once" in r["halt_poll"].detail
    assert r["halt_poll"].advice == "vlab host set kvm.halt_poll_ns=200000"
    assert r["tsc_deadline"].status == "MISSING"
    assert r["cap.IRQFD"].detail == ("not offered (needed for exits.irq_inject and the io.virtio "
                                     "and io.ivshmem interrupt modes)")


def test_doctor_without_usable_kvm():
    r = rows(DATA / "vmx", None)
    assert r["tsc_deadline"].detail == "not checked: /dev/kvm is not usable"
    assert r["apic"].ok                              # read from sysfs, no /dev/kvm needed
    assert not any(n in rows(DATA / "nokvm", None) for n in ("apic", "halt_poll", "tsc_deadline"))


# ----------------------------------------------------------------------------------------------
# vlab host set


def test_knobs_and_widths():
    for key in ("kvm_intel.enable_apicv", "kvm_intel.enable_ipiv", "kvm_amd.avic",
                "kvm.halt_poll_ns"):
        assert key in _hostset.KNOBS
    assert _hostset.KNOBS["kvm_intel.enable_apicv"].runtime is False   # 0444: a reload
    assert _hostset.KNOBS["kvm_amd.avic"].runtime is False
    assert _hostset.KNOBS["kvm.halt_poll_ns"].bits == 32
    assert _hostset.KNOBS["hugepages.1g"].bits == 64
    with pytest.raises(UsageError, match=r"kvm.halt_poll_ns=0x100000000 does not fit \(a 32-bit"):
        _hostset.check_bits("kvm.halt_poll_ns", "4294967296")
    _hostset.check_bits("kvm.halt_poll_ns", "4294967295")
    _hostset.check_bits("thp", "never")                                 # no width: nothing
    s = _hostset.host_settings(str(DATA / "vmx"))
    assert (s["kvm_intel.enable_apicv"], s["kvm_intel.enable_ipiv"], s["kvm_amd.avic"]) == \
        ("1", "0", None)
    assert _hostset.host_settings(str(DATA / "svm"))["kvm_amd.avic"] == "0"


def test_too_wide_is_refused_before_anything(tmp_path, state):
    root = tree("pvm", tmp_path)
    with pytest.raises(UsageError, match="32-bit"):
        _hostset.set_host("kvm.halt_poll_ns", "4294967296", str(root), True, state_path=state,
                          vms=no_vms)
    with pytest.raises(UsageError, match="64-bit"):
        _hostset.set_host("hugepages.2m", "99999999999999999999", str(root), True,
                          state_path=state, vms=no_vms)


def test_pvm_refuses_apic_knobs(tmp_path, state):
    root = tree("pvm", tmp_path)
    for key in ("kvm_intel.enable_apicv", "kvm_intel.enable_ipiv", "kvm_amd.avic"):
        for dry in (False, True):
            with pytest.raises(_hostset.Refused) as err:
                _hostset.set_host(key, "1", str(root), dry, state_path=state, vms=no_vms)
            assert str(err.value) == ("this host runs KVM on PVM, which has no APICv/AVIC: KVM "
                                      f"always emulates the local APIC, so {key} does not apply")
    assert not os.path.exists(state)


def test_apicv_off_and_back_reloads_kvm_intel(tmp_path, state):
    root = tree("vmx", tmp_path)
    modprobe = FakeModprobe(root)
    msg = _hostset.set_host("kvm_intel.enable_apicv", "0", str(root), state_path=state,
                            vms=no_vms, run=modprobe)
    assert modprobe.commands == [["modprobe", "-r", "kvm_intel"],
                                 ["modprobe", "kvm_intel", "enable_apicv=0", "ept=1", "vpid=1",
                                  "enable_ipiv=0"]]
    assert msg.startswith("kvm_intel.enable_apicv: 1 -> 0: ran: modprobe -r kvm_intel")
    assert irq(root)["apic_virtualization"] == "none"
    _hostset.restore_host("kvm_intel.enable_apicv", str(root), state_path=state, vms=no_vms,
                          run=modprobe)
    assert modprobe.commands[-1][2] == "enable_apicv=1"
    assert irq(root)["apic_virtualization"] == "apicv"


def test_apicv_dry_run_writes_and_saves_nothing(tmp_path, state):
    root = tree("vmx", tmp_path)
    modprobe = FakeModprobe(root)
    msg = _hostset.set_host("kvm_intel.enable_apicv", "off", str(root), True, state_path=state,
                            vms=no_vms, run=modprobe)
    assert msg == ("kvm_intel.enable_apicv: 1 -> 0: would run: modprobe -r kvm_intel && "
                   "modprobe kvm_intel enable_apicv=0 ept=1 vpid=1 enable_ipiv=0")
    assert modprobe.commands == [] and not os.path.exists(state)
    assert irq(root)["apic_virtualization"] == "apicv"
    # the refusals hold in a dry run too
    param(root, "kvm_intel", "enable_apicv", "N")
    with pytest.raises(_hostset.Refused, match="needs APICv"):
        _hostset.set_host("kvm_intel.enable_ipiv", "1", str(root), True, state_path=state,
                          vms=no_vms)


def test_ipiv_needs_apicv_both_ways(tmp_path, state):
    root = tree("vmx", tmp_path)
    param(root, "kvm_intel", "enable_apicv", "N")
    with pytest.raises(_hostset.Refused) as err:
        _hostset.set_host("kvm_intel.enable_ipiv", "1", str(root), state_path=state, vms=no_vms)
    assert str(err.value) == ("IPI virtualization needs APICv, and kvm_intel.enable_apicv is 0: "
                              "set kvm_intel.enable_apicv=1 first")
    param(root, "kvm_intel", "enable_apicv", "Y")
    param(root, "kvm_intel", "enable_ipiv", "Y")
    with pytest.raises(_hostset.Refused, match="kvm_intel.enable_ipiv is 1: set "
                                               "kvm_intel.enable_ipiv=0 first"):
        _hostset.set_host("kvm_intel.enable_apicv", "0", str(root), state_path=state, vms=no_vms)


def test_ipiv_the_cpu_lacks_is_reported_after_the_reload(tmp_path, state):
    """Cascade Lake has no IPI virtualization and Linux 6.1 does not name it in the vmx flags:
    KVM clears enable_ipiv at load, and vlab says so instead of claiming success."""
    root = tree("vmx", tmp_path)
    modprobe = FakeModprobe(root, clear=("enable_ipiv",))
    with pytest.raises(VlabError, match="reads 0 after setting it to 1: KVM turned it off"):
        _hostset.set_host("kvm_intel.enable_ipiv", "1", str(root), state_path=state, vms=no_vms,
                          run=modprobe)
    assert modprobe.commands[-1] == ["modprobe", "kvm_intel", "enable_ipiv=1", "ept=1", "vpid=1",
                                     "enable_apicv=1"]


def test_cpu_without_the_feature_is_refused(tmp_path, state):
    vmx = tree("vmx", tmp_path)
    param(vmx, "kvm_intel", "enable_apicv", "N")
    edit_cpuinfo(vmx, "vmx flags", drop="apicv")
    with pytest.raises(_hostset.Refused) as err:
        _hostset.set_host("kvm_intel.enable_apicv", "1", str(vmx), True, state_path=state,
                          vms=no_vms)
    assert str(err.value) == ("the CPU has no APICv (no 'apicv' in the vmx flags of "
                              "/proc/cpuinfo), so KVM would leave kvm_intel.enable_apicv off")
    # switching it off is always possible
    _hostset.set_host("kvm_intel.enable_apicv", "0", str(vmx), True, state_path=state, vms=no_vms)

    tcg = tree("svm_tcg", tmp_path)
    with pytest.raises(_hostset.Refused, match=r"the CPU has no AVIC \(no 'avic' in the flags"):
        _hostset.set_host("kvm_amd.avic", "1", str(tcg), state_path=state, vms=no_vms)


def test_avic_on_svm_and_restore_all_undoes_newest_first(tmp_path, state):
    root = tree("svm", tmp_path)
    modprobe = FakeModprobe(root)
    _hostset.set_host("kvm_amd.avic", "1", str(root), state_path=state, vms=no_vms, run=modprobe)
    assert modprobe.commands[-1] == ["modprobe", "kvm_amd", "avic=1", "npt=1"]
    assert irq(root)["apic_virtualization"] == "avic"
    # NPT cannot go while AVIC needs it, and AVIC cannot come without NPT
    with pytest.raises(_hostset.Refused, match="AVIC needs NPT, and kvm_amd.avic is 1"):
        _hostset.set_host("kvm_amd.npt", "0", str(root), state_path=state, vms=no_vms,
                          run=modprobe)
    _hostset.set_host("kvm_amd.avic", "0", str(root), state_path=state, vms=no_vms, run=modprobe)
    _hostset.set_host("kvm_amd.npt", "0", str(root), state_path=state, vms=no_vms, run=modprobe)
    with pytest.raises(_hostset.Refused, match="AVIC needs NPT, and kvm_amd.npt is 0: set "
                                               "kvm_amd.npt=1 first"):
        _hostset.set_host("kvm_amd.avic", "1", str(root), state_path=state, vms=no_vms,
                          run=modprobe)
    # saved: avic=0 (first change), npt=1 (second); restoring everything goes newest first
    modprobe.commands.clear()
    msg = _hostset.restore_host(None, str(root), state_path=state, vms=no_vms, run=modprobe)
    assert [line.split(":")[0] for line in msg.splitlines()] == ["kvm_amd.npt", "kvm_amd.avic"]
    assert modprobe.commands[1] == ["modprobe", "kvm_amd", "npt=1", "avic=0"]
    assert irq(root)["apic_virtualization"] == "none"
    assert _host.fingerprint(str(root))["paging"] == "npt"


def test_restore_all_in_that_order_sets_avic_back(tmp_path, state):
    root = tree("svm", tmp_path)
    param(root, "kvm_amd", "avic", "1")
    modprobe = FakeModprobe(root)
    _hostset.set_host("kvm_amd.avic", "0", str(root), state_path=state, vms=no_vms, run=modprobe)
    _hostset.set_host("kvm_amd.npt", "0", str(root), state_path=state, vms=no_vms, run=modprobe)
    # a dry run of the whole restore sees that NPT would be back before AVIC is asked for
    done = len(modprobe.commands)
    dry = _hostset.restore_host(None, str(root), True, state_path=state, vms=no_vms,
                                run=modprobe)
    assert dry.splitlines()[0].startswith("kvm_amd.npt: 0 -> 1: would run")
    assert dry.splitlines()[1].startswith("kvm_amd.avic: 0 -> 1: would run")
    assert len(modprobe.commands) == done and irq(root)["apic_virtualization"] == "none"
    _hostset.restore_host(None, str(root), state_path=state, vms=no_vms, run=modprobe)
    assert irq(root)["apic_virtualization"] == "avic"
    assert json.loads(Path(state).read_text())["saved"] == {}


def test_module_missing_builtin_or_without_the_parameter(tmp_path, state):
    with pytest.raises(_hostset.Refused, match=r"kvm_amd is not loaded on this host \(it uses "
                                               r"kvm_intel\)"):
        _hostset.set_host("kvm_amd.avic", "1", str(tree("vmx", tmp_path)), state_path=state,
                          vms=no_vms)
    with pytest.raises(_hostset.Refused, match="kvm_intel is not loaded on this host"):
        _hostset.set_host("kvm_intel.enable_apicv", "1", str(tree("nokvm", tmp_path)),
                          state_path=state, vms=no_vms)
    root = tree("vmx_ept0", tmp_path)
    param(root, "kvm_intel", "enable_ipiv", None)       # Linux before 5.19
    with pytest.raises(_hostset.Refused, match="kvm_intel on this kernel has no enable_ipiv "
                                               "parameter"):
        _hostset.set_host("kvm_intel.enable_ipiv", "1", str(root), state_path=state, vms=no_vms)
    (root / "sys/module/kvm_intel/initstate").unlink()   # built in: no reload possible
    with pytest.raises(_hostset.Refused, match="kvm_intel is built into the kernel and "
                                               "kvm_intel.enable_apicv is read-only"):
        _hostset.set_host("kvm_intel.enable_apicv", "0", str(root), state_path=state, vms=no_vms,
                          run=FakeModprobe(root))
    assert not os.path.exists(state)


def test_refused_while_vms_run(tmp_path, state):
    root = tree("vmx", tmp_path)
    modprobe = FakeModprobe(root)
    with pytest.raises(_hostset.Refused, match=r"while VMs exist \(pids 77, 4242\)"):
        _hostset.set_host("kvm_intel.enable_apicv", "0", str(root), state_path=state,
                          vms=lambda r: [77, 4242], run=modprobe)
    assert modprobe.commands == []


# ----------------------------------------------------------------------------------------------
# The live host: refusals only (nothing is changed)


def vlab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlab", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(not os.path.isdir("/sys/module/kvm_pvm"), reason="not a KVM-on-PVM host")
def test_live_pvm_host_refuses_apic_knobs():
    for key in ("kvm_intel.enable_apicv=1", "kvm_amd.avic=0"):
        p = vlab("host", "set", key, "--dry-run")
        assert p.returncode == 2, p.stderr
        assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
        assert "KVM on PVM, which has no APICv/AVIC" in p.stderr
    h = _host.fingerprint("/")
    assert h["interrupts"]["apic_virtualization"] == "none"
    assert h["interrupts"]["posted_interrupts"] is False


@pytest.mark.skipif(not (os.path.isdir("/sys/module/kvm_pvm")
                         and not os.path.exists("/sys/module/kvm/initstate")
                         and not os.stat("/sys/module/kvm/parameters/halt_poll_ns").st_mode
                         & 0o222), reason="kvm.halt_poll_ns is not a read-only built-in here")
def test_live_read_only_halt_poll_is_refused():
    p = vlab("host", "set", "kvm.halt_poll_ns=0", "--dry-run")
    assert p.returncode == 2, p.stderr
    assert "kvm is built into the kernel and kvm.halt_poll_ns is read-only" in p.stderr
