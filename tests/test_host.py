"""Host fingerprint: parsing of recorded trees, host_id, host_diff, doctor checks, the live host."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from vlab import host as _host
from vlab.host.fingerprint import _lookup

DATA = Path(__file__).parent / "data" / "hosts"
TREES = ("pvm", "vmx", "vmx_ept0", "svm", "nokvm")

# What the native layer reports on the PVM build hosts (docs/kvm-on-pvm.md).
PVM_KVM = {
    "api_version": 12, "tsc_khz": 2700000, "nr_vcpus": 2, "max_vcpus": 1024,
    "caps": {"IOEVENTFD": 1, "IRQFD": 1, "DIRTY_LOG_RING": 1048576,
             "DIRTY_LOG_RING_ACQ_REL": 1048576, "MANUAL_DIRTY_LOG_PROTECT2": 3,
             "X86_USER_SPACE_MSR": 1, "BINARY_STATS_FD": 1, "READONLY_MEM": 1, "SYNC_REGS": 7,
             "EXIT_HYPERCALL": 1, "IMMEDIATE_EXIT": 1, "GET_TSC_KHZ": 1, "IRQCHIP": 1,
             "IRQ_ROUTING": 4096, "SIGNAL_MSI": 1, "TSC_DEADLINE_TIMER": 1, "X2APIC_API": 15},
    "guest_cpuid": {"x2apic": True, "tsc_deadline_timer": True},
}
VMX_KVM = dict(PVM_KVM, tsc_khz=2999998, nr_vcpus=96)


def fp(name: str, kvm: dict | None = None) -> dict:
    return _host.fingerprint(str(DATA / name), kvm)


def copy_tree(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(DATA / name, dst, symlinks=True)
    return dst


def write(root: Path, path: str, text: str) -> None:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text + "\n")


# ----------------------------------------------------------------------------------------------
# Parsing


@pytest.mark.parametrize("name, flavor, paging, nested, vendor, cpl0", [
    ("pvm", "pvm", "shadow", True, "intel", True),
    ("vmx", "vmx", "ept", False, "intel", False),
    ("vmx_ept0", "vmx", "shadow", False, "intel", False),
    ("svm", "svm", "npt", False, "amd", False),
    ("nokvm", "none", "none", True, "intel", None),
])
def test_flavor_paging_nested_vendor(name, flavor, paging, nested, vendor, cpl0):
    h = fp(name)
    assert h["kvm"]["flavor"] == flavor
    assert h["paging"] == paging
    assert h["nested"] is nested
    assert h["cpu_vendor"] == vendor
    assert h["cpl0_emulated_expected"] is cpl0
    assert h["emulated_cpl0"] is cpl0


def test_vmx_cpu_fields():
    h = fp("vmx")
    assert h["cpu_model"] == "Intel(R) Xeon(R) Gold 6248R CPU @ 3.00GHz"
    cpu = h["cpu"]
    assert (cpu["family"], cpu["model"], cpu["stepping"]) == (6, 85, 7)
    assert cpu["microcode"] == "0x5003604"
    assert cpu["count"] == 96  # from /sys/devices/system/cpu/online, not the 2 recorded blocks
    flags = cpu["flags"]
    assert flags["vmx"] and flags["ept"] and flags["vpid"] and flags["pdpe1gb"]
    assert flags["unrestricted_guest"]  # only on the "vmx flags" line
    assert not flags["svm"] and not flags["npt"] and not flags["hypervisor"]
    assert "itlb_multihit" in cpu["bugs"]
    assert h["smt"] is True
    assert h["numa_nodes"] == 2
    assert h["hostname"] == "lab-xeon-01"
    assert h["kernel"] == "6.1.0-18-amd64"
    assert h["kernel_version"].startswith("#1 SMP PREEMPT_DYNAMIC Debian")
    assert "intel_iommu=on" in h["kernel_cmdline"]
    assert h["mem_total_kb"] == 394849372 and h["mem_available_kb"] == 380112332


def test_svm_cpu_fields():
    h = fp("svm")
    cpu = h["cpu"]
    assert h["cpu_model"] == "AMD EPYC 7763 64-Core Processor"
    assert (cpu["family"], cpu["model"], cpu["stepping"]) == (25, 1, 1)
    assert cpu["microcode"] == "0xa0011d1"
    assert cpu["flags"]["svm"] and cpu["flags"]["npt"] and cpu["flags"]["avic"]
    assert not cpu["flags"]["vmx"]
    assert cpu["count"] == 128
    assert h["numa_nodes"] == 1
    assert h["kvm"]["params"]["kvm_amd"]["npt"] == "1"


def test_pvm_tree_fields():
    h = fp("pvm")
    assert h["kernel"] == "6.18.44-fc-v657"
    assert h["cpu"]["microcode"] == "0x1" and h["cpu"]["count"] == 2
    assert h["cpu"]["flags"]["hypervisor"] and not h["cpu"]["flags"]["vmx"]
    kvm = h["kvm"]
    assert kvm["modules"] == ["kvm", "kvm_pvm"]
    assert kvm["builtin"] == ["kvm", "kvm_pvm"]
    assert kvm["params"]["kvm"]["tdp_mmu"] == "N"
    assert kvm["params"]["kvm_pvm"]["pvm_native"] == "Y"
    assert kvm["params"]["kvm_intel"] == {} and kvm["params"]["kvm_amd"] == {}
    assert h["smt"] is False
    assert h["mitigations"]["retbleed"] == "Vulnerable"
    assert h["kernel_config"]["CONFIG_KVM_PVM"] == "y"  # from the gzipped /proc/config.gz
    assert h["kernel_config"]["CONFIG_VFIO"] == "n"
    assert h["tooling"]["perf_events"]["pmu"] is False
    assert h["tooling"]["perf_events"]["paranoid"] == 2


def test_loaded_modules_are_not_builtin():
    h = fp("vmx")
    assert h["kvm"]["modules"] == ["kvm", "kvm_intel"]
    assert h["kvm"]["builtin"] == []
    assert h["kernel_config"]["CONFIG_KVM_INTEL"] == "m"  # from /boot/config-<release>


def test_thp_hugepages_governor():
    vmx, pvm, svm = fp("vmx"), fp("pvm"), fp("svm")
    assert vmx["thp"] == {"enabled": "always", "defrag": "madvise"}
    assert pvm["thp"] == {"enabled": "madvise", "defrag": "madvise"}
    assert vmx["hugepages"] == {"2048kB": {"nr": 1024, "free": 1024},
                                "1048576kB": {"nr": 4, "free": 4}}
    assert svm["hugepages"]["2048kB"] == {"nr": 0, "free": 0}
    assert vmx["governor"] == "performance"
    assert svm["governor"] == "schedutil"
    assert pvm["governor"] is None


def test_mitigations_are_read_per_file():
    h = fp("vmx")
    assert h["mitigations"]["itlb_multihit"] == "KVM: Mitigation: Split huge pages"
    assert h["mitigations"]["tsx_async_abort"] == "Mitigation: TSX disabled"
    assert list(h["mitigations"]) == sorted(h["mitigations"])


def test_no_kvm_record_says_why():
    h = fp("nokvm")
    assert h["kvm"]["usable"] is False
    assert h["kvm"]["dev_kvm"] is False
    assert "/dev/kvm does not exist" in h["kvm"]["reason"]
    assert h["kvm"]["modules"] == []
    assert h["tsc_khz"] is None


def test_unopened_dev_kvm_is_reported():
    h = fp("vmx")
    assert h["kvm"]["dev_kvm"] is True and h["kvm"]["usable"] is False
    assert "not opened" in h["kvm"]["reason"]


def test_kvm_info_from_native_layer():
    h = fp("pvm", PVM_KVM)
    assert h["kvm"]["usable"] is True and h["kvm"]["reason"] is None
    assert h["kvm"]["api_version"] == 12
    assert h["kvm"]["caps"]["DIRTY_LOG_RING"] == 1048576
    assert h["kvm"]["nr_vcpus"] == 2 and h["kvm"]["max_vcpus"] == 1024
    assert h["tsc_khz"] == 2700000


def test_npt_param_forms(tmp_path):
    root = copy_tree("svm", tmp_path)
    param = "sys/module/kvm_amd/parameters/npt"
    for text, paging in (("Y", "npt"), ("1", "npt"), ("N", "shadow"), ("0", "shadow")):
        write(root, param, text)
        assert _host.fingerprint(str(root))["paging"] == paging, text


def test_ept_param_unreadable_falls_back_to_cpu_flag(tmp_path):
    root = copy_tree("vmx", tmp_path)
    (root / "sys/module/kvm_intel/parameters/ept").unlink()
    assert _host.fingerprint(str(root))["paging"] == "ept"


def test_pvm_stays_shadow_even_with_tdp_mmu(tmp_path):
    root = copy_tree("pvm", tmp_path)
    write(root, "sys/module/kvm/parameters/tdp_mmu", "Y")
    assert _host.fingerprint(str(root))["paging"] == "shadow"


def test_smt_derived_without_sysfs(tmp_path):
    root = copy_tree("vmx", tmp_path)
    (root / "sys/devices/system/cpu/smt/active").unlink()
    assert _host.fingerprint(str(root))["smt"] is True  # siblings 48 > cpu cores 24


def test_empty_root_does_not_fail(tmp_path):
    h = _host.fingerprint(str(tmp_path))
    assert h["kvm"]["flavor"] == "none" and h["cpu"]["count"] is None
    assert h["kernel_config"] is None and h["thp"] == {"enabled": None, "defrag": None}
    json.dumps(h)


@pytest.mark.parametrize("name", TREES)
def test_record_is_json(name):
    h = fp(name, PVM_KVM)
    assert json.loads(json.dumps(h)) == h


# ----------------------------------------------------------------------------------------------
# host_id and host_diff


@pytest.mark.parametrize("name", TREES)
def test_host_id_stable(name):
    a, b = fp(name), fp(name)
    assert a["host_id"] == b["host_id"]
    assert re.fullmatch(r"[0-9a-f]{12}", a["host_id"])
    assert _host.host_id(a) == a["host_id"]


def test_host_ids_differ_between_hosts():
    ids = {name: fp(name)["host_id"] for name in TREES}
    assert len(set(ids.values())) == len(TREES), ids
    assert ids["vmx"] != ids["vmx_ept0"]


def test_host_id_ignores_volatile_and_native_details(tmp_path):
    base = fp("vmx")
    h = copy.deepcopy(base)
    h["mem_available_kb"] = 1
    h["hugepages"]["2048kB"]["free"] = 3
    h["hostname"] = "renamed"
    h["kernel_cmdline"] += " quiet"
    h["tooling"]["bpf"]["bcc"] = True
    assert _host.host_id(h) == base["host_id"]
    # the same through files
    root = copy_tree("vmx", tmp_path)
    write(root, "sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "17")
    write(root, "proc/sys/kernel/hostname", "other-name")
    meminfo = (root / "proc/meminfo").read_text().replace("380112332", "12345")
    (root / "proc/meminfo").write_text(meminfo)
    assert _host.fingerprint(str(root))["host_id"] == base["host_id"]
    # and with KVM info supplied (tsc rate is measured, not configured)
    assert fp("vmx", VMX_KVM)["host_id"] == base["host_id"]


@pytest.mark.parametrize("path, value", [
    ("thp.enabled", "never"), ("cpu.microcode", "0x5003605"), ("kernel", "6.1.0-19-amd64"),
    ("kvm.params.kvm.halt_poll_ns", "0"), ("mitigations.retbleed", "Vulnerable"),
    ("cpu.count", 48), ("smt", False),
])
def test_host_id_changes_with_each_key(path, value):
    h = fp("vmx")
    node = h
    *parents, last = path.split(".")
    for part in parents:
        node = node[part]
    node[last] = value
    assert _host.host_id(h) != fp("vmx")["host_id"]


def test_every_host_id_key_exists_somewhere():
    records = [fp(name) for name in TREES]
    for key in _host.HOST_ID_KEYS:
        assert any(_lookup(r, key) is not None for r in records), key


def test_host_diff_vmx_vs_ept0():
    diff = _host.host_diff(fp("vmx"), fp("vmx_ept0"))
    paths = [d[0] for d in diff]
    assert ("paging", "ept", "shadow") in diff
    assert ("kvm.params.kvm_intel.ept", "Y", "N") in diff
    assert ("kvm.params.kvm_intel.pml", "Y", "N") in diff
    assert "host_id" not in paths
    assert paths == sorted(paths)
    assert not any(p.startswith("cpu.") for p in paths)


def test_host_diff_ignores_volatile_and_shows_missing_keys():
    a = fp("vmx")
    b = copy.deepcopy(a)
    b["mem_available_kb"] += 1000
    b["hugepages"]["1048576kB"]["free"] = 0
    assert _host.host_diff(a, b) == []
    b["hugepages"]["1048576kB"]["nr"] = 8
    del b["governor"]
    assert _host.host_diff(a, b) == [("governor", "performance", None),
                                     ("hugepages.1048576kB.nr", 4, 8)]


def test_one_volatile_definition_for_host_diff_compare_and_report():
    from vlab import compare, report
    from vlab.host import diff

    assert compare.host_diff is diff.host_diff is _host.host_diff
    assert report.is_volatile is diff.is_volatile is _host.is_volatile
    # every key of the former glob list is still volatile ...
    for key in ("mem_available_kb", "hugepages.2048kB.free", "hugepages.1048576kB.free"):
        assert _host.is_volatile(key), key
    # ... and configuration is not, even where a component reads like memory
    assert not _host.is_volatile("tooling.perf_events.available")
    assert _host.is_volatile("mem.available") and _host.is_volatile("calibration.tsc_khz")
    a = fp("vmx")
    b = copy.deepcopy(a)
    b["tooling"]["perf_events"]["available"] = not a["tooling"]["perf_events"]["available"]
    assert [p for p, _, _ in _host.host_diff(a, b)] == ["tooling.perf_events.available"]


def test_no_import_circle_between_host_modules():
    import ast

    src = Path(_host.__file__).parent
    for name, forbidden in (("sysfs", ("vlab.host.fingerprint", "vlab.host.sriov",
                                       "vlab.host.doctor", "vlab.host.diff")),
                            ("sriov", ("vlab.host.fingerprint", "vlab.host.doctor")),
                            ("diff", ("vlab.host.fingerprint", "vlab.host.doctor")),
                            ("fingerprint", ("vlab.host.doctor", "vlab.host.diff"))):
        tree = ast.parse((src / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not imported & set(forbidden), (name, imported & set(forbidden))


def test_host_diff_between_flavors_names_params():
    diff = dict((p, (o, n)) for p, o, n in _host.host_diff(fp("pvm"), fp("svm")))
    assert diff["kvm.flavor"] == ("pvm", "svm")
    assert diff["kvm.params.kvm_amd.npt"] == (None, "1")
    assert diff["cpu_vendor"] == ("intel", "amd")


# ----------------------------------------------------------------------------------------------
# Doctor


def by_name(checks):
    return {c.name: c for c in checks}


def test_doctor_vmx_host_all_good_except_sriov_and_bcc():
    checks = by_name(_host.doctor_checks(fp("vmx", VMX_KVM)))
    not_ok = {name for name, c in checks.items() if not c.ok}
    assert not_ok == {"sriov", "bpf"}
    assert checks["sriov"].status == "MISSING"
    assert checks["bpf"].status == "WARN" and "python3-bpfcc" in checks["bpf"].advice
    assert checks["paging"].detail.startswith("EPT")
    assert checks["cpl0"].ok


def test_doctor_pvm_host():
    checks = by_name(_host.doctor_checks(fp("pvm", PVM_KVM)))
    assert all(checks[f"cap.{n}"].ok for n in ("IOEVENTFD", "DIRTY_LOG_RING",
                                                "MANUAL_DIRTY_LOG_PROTECT2", "X86_USER_SPACE_MSR",
                                                "BINARY_STATS_FD"))
    assert checks["kvm.api_version"].ok
    assert checks["paging"].status == "WARN" and "shadow" in checks["paging"].detail
    assert checks["cpl0"].status == "WARN" and "emulator" in checks["cpl0"].detail
    assert checks["nested"].status == "WARN"
    assert checks["sriov"].status == "MISSING"
    assert checks["sriov"].detail.startswith("no SR-IOV capable device")
    assert checks["vfio"].detail == "CONFIG_VFIO not available (/dev/vfio missing)"
    assert checks["hugetlb.2m"].status == "WARN"
    assert "echo" in checks["hugetlb.2m"].advice and "nr_hugepages" in checks["hugetlb.2m"].advice
    assert checks["perf"].status == "WARN" and "no hardware PMU" in checks["perf"].detail
    assert checks["governor"].ok
    assert checks["cpuidle"].status == "WARN" and "IPI" in checks["cpuidle"].detail
    assert checks["cpuidle"].advice == "vlab host set haltpoll.guest_halt_poll_ns=200000"


def test_doctor_caps_missing_aliases_and_prefixes():
    kvm = dict(PVM_KVM, caps={"KVM_CAP_IOEVENTFD": 1, "DIRTY_LOG_RING_ACQ_REL": 65536,
                              "STATS_BINARY_FD": 1, "EXIT_HYPERCALL": 0})
    checks = by_name(_host.doctor_checks(fp("vmx", kvm)))
    assert checks["cap.IOEVENTFD"].ok
    assert checks["cap.DIRTY_LOG_RING"].ok and "ACQ_REL" in checks["cap.DIRTY_LOG_RING"].detail
    assert checks["cap.BINARY_STATS_FD"].ok
    # only capabilities something in vlab uses are listed (exits.hypercall never enables
    # KVM_CAP_EXIT_HYPERCALL); irqfd carries the injection row and the io interrupt modes
    assert "cap.EXIT_HYPERCALL" not in checks
    assert checks["cap.IRQFD"].status == "MISSING"
    assert checks["cap.IRQFD"].detail == ("not offered (needed for exits.irq_inject and the "
                                          "io.virtio and io.ivshmem interrupt modes)")
    assert checks["cap.IRQCHIP"].status == "MISSING"  # not in caps: not offered
    assert "exits.pio_device" in checks["cap.IRQCHIP"].detail


def test_doctor_wrong_api_version():
    checks = by_name(_host.doctor_checks(fp("vmx", dict(VMX_KVM, api_version=11))))
    assert not checks["kvm.api_version"].ok


def test_doctor_without_kvm():
    checks = by_name(_host.doctor_checks(fp("nokvm")))
    assert checks["kvm.dev"].status == "MISSING"
    assert "/dev/kvm does not exist" in checks["kvm.dev"].detail
    assert "nested virtualization" in checks["kvm.dev"].advice
    assert checks["kvm.caps"].status == "MISSING"
    assert "cpl0" not in checks


def test_doctor_governor_thp_hugepages(tmp_path):
    h = fp("vmx", VMX_KVM)
    h["governor"] = "powersave"
    h["thp"]["enabled"] = "never"
    h["cpu"]["flags"]["pdpe1gb"] = False
    checks = by_name(_host.doctor_checks(h))
    assert checks["governor"].status == "WARN"
    assert checks["governor"].detail == "governor is powersave: results will be noisy"
    assert checks["thp"].status == "WARN" and "thp=madvise" in checks["thp"].advice
    assert checks["hugetlb.1g"].status == "MISSING" and "pdpe1gb" in checks["hugetlb.1g"].detail


def test_doctor_shadow_on_vmx_advises_ept():
    checks = by_name(_host.doctor_checks(fp("vmx_ept0", VMX_KVM)))
    assert checks["paging"].status == "WARN"
    assert "kvm_intel.ept=0" in checks["paging"].detail
    assert "kvm_intel.ept=1" in checks["paging"].advice


def test_doctor_extra_checks_come_last():
    extra = [_host.Check("trace.bcc", False, "bcc cannot compile", "install headers", "warn")]
    checks = _host.doctor_checks(fp("vmx", VMX_KVM), extra)
    assert checks[-1] is extra[0]
    assert checks[-1].status == "WARN"


def test_format_doctor():
    h = fp("vmx", VMX_KVM)
    checks = _host.doctor_checks(h)
    text = _host.format_doctor(h, checks)
    lines = text.splitlines()
    assert h["host_id"] in lines[0]
    assert "Intel(R) Xeon(R) Gold 6248R" in text and "6.1.0-18-amd64" in text
    assert "flavor vmx, paging ept, api 12" in text
    assert "2999998 kHz" in text
    rows = [l for l in lines if re.match(r"^(OK|MISSING|WARN) ", l)]
    assert len(rows) == len(checks)
    assert re.search(r"^MISSING +sriov +no SR-IOV capable device", text, re.M)
    # the detail column starts at the same offset on every row
    width = max(len(c.name) for c in checks)
    for row, check in zip(rows, checks):
        assert row[9 + width + 2:].startswith(check.detail), row
    assert "(apt-get install python3-bpfcc)" in text
    # advice is shown only for failed checks
    extra = [_host.Check("x.ok", True, "fine", "ADVICE-A"), _host.Check("x.bad", False, "broken",
                                                                         "ADVICE-B")]
    text = _host.format_doctor(h, extra)
    assert "ADVICE-A" not in text and "broken (ADVICE-B)" in text


# ----------------------------------------------------------------------------------------------
# The live host


def test_live_host_record():
    h = _host.fingerprint("/")
    json.dumps(h)
    assert h["kernel"] == os.uname().release
    assert h["cpu"]["count"] == os.cpu_count()
    assert re.fullmatch(r"[0-9a-f]{12}", h["host_id"])
    assert _host.fingerprint("/")["host_id"] == h["host_id"]


@pytest.mark.skipif(not os.path.isdir("/sys/module/kvm_pvm"), reason="not a KVM-on-PVM host")
def test_live_pvm_host():
    h = _host.fingerprint("/")
    assert h["kvm"]["flavor"] == "pvm"
    assert h["paging"] == "shadow"
    assert h["nested"] is True
    assert h["cpl0_emulated_expected"] is True
    assert "kvm_pvm" in h["kvm"]["builtin"]
    assert h["devices"]["vfio"] is False and h["devices"]["sriov"] == []
