"""A host whose CPU is emulated by QEMU's TCG is named as one: detection from recorded files
(tests/data/hosts/svm_tcg was recorded inside the make test-svm guest), and the warnings of
`vlab doctor`, `show` and `report`."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from vlab import host as _host
from vlab import results
from vlab.host import emulation as _emulation
from vlab.report import render

HOSTS = Path(__file__).parent / "data" / "hosts"
QUICK = Path(__file__).parent / "data" / "results" / "pvm_quick.json"


def fp(tree: Path | str) -> dict:
    return _host.fingerprint(str(tree))


def tcg_host() -> dict:
    return fp(HOSTS / "svm_tcg")


def test_tcg_guest_is_detected_by_model_name_and_dmi():
    host = tcg_host()
    assert host["kvm"]["flavor"] == "svm" and host["paging"] == "npt"
    emu = host["emulation"]
    assert emu["emulated"] is True and emu["by"] == "qemu-tcg"
    assert any("QEMU TCG CPU" in e for e in emu["evidence"])
    assert any("DMI sys_vendor QEMU" in e for e in emu["evidence"])


def test_hardware_trees_are_not_emulated():
    for tree in ("pvm", "vmx", "vmx_ept0", "svm", "nokvm"):
        emu = fp(HOSTS / tree)["emulation"]
        assert emu == {"emulated": False, "by": None, "evidence": []}, tree


def test_tcg_with_a_named_cpu_model_is_caught_by_dmi(tmp_path):
    """`-cpu EPYC` under TCG looks like hardware in cpuinfo; DMI plus no paravirtual clock
    still gives it away."""
    root = tmp_path / "t"
    shutil.copytree(HOSTS / "svm_tcg", root, symlinks=True)
    cpuinfo = root / "proc" / "cpuinfo"
    cpuinfo.write_text(cpuinfo.read_text().replace("QEMU TCG CPU version 2.5+",
                                                   "AMD EPYC Processor"))
    emu = fp(root)["emulation"]
    assert emu["emulated"] is True and len(emu["evidence"]) == 1
    assert "no paravirtual clocksource" in emu["evidence"][0]


def test_qemu_with_kvm_acceleration_is_not_emulated(tmp_path):
    """A QEMU/KVM guest has the same DMI but kvm-clock, and a hardware-looking model name."""
    root = tmp_path / "t"
    shutil.copytree(HOSTS / "svm_tcg", root, symlinks=True)
    cpuinfo = root / "proc" / "cpuinfo"
    cpuinfo.write_text(cpuinfo.read_text().replace("QEMU TCG CPU version 2.5+",
                                                   "AMD EPYC 7B13 64-Core Processor"))
    clocks = root / "sys/devices/system/clocksource/clocksource0/available_clocksource"
    clocks.write_text("kvm-clock tsc hpet acpi_pm\n")
    assert fp(root)["emulation"]["emulated"] is False


def test_emulation_is_not_part_of_host_id():
    """Adding the field must not change the host_id of records made before it existed."""
    host = tcg_host()
    old = {k: v for k, v in host.items() if k != "emulation"}
    assert _host.host_id(old) == host["host_id"]


def test_records_without_the_field_are_judged_by_model_name():
    assert _emulation.is_emulated({"cpu_model": "QEMU TCG CPU version 2.5+"})
    assert not _emulation.is_emulated({"cpu_model": "AMD EPYC 7B13 64-Core Processor"})
    assert _emulation.warning({"cpu_model": "Intel(R) Xeon(R)"}) is None


def test_doctor_warns_that_timings_are_not_hardware_timings():
    host = tcg_host()
    checks = {c.name: c for c in _host.doctor_checks(host)}
    c = checks["cpu.emulated"]
    assert c.status == "WARN" and "not hardware timings" in c.detail
    assert "QEMU TCG CPU" in c.detail
    text = _host.format_doctor(host, checks.values())
    assert "WARN     cpu.emulated" in text
    assert "cpu.emulated" not in {c.name for c in _host.doctor_checks(fp(HOSTS / "svm"))}


def _tcg_results(tmp_path: Path) -> Path:
    doc = copy.deepcopy(results.read(QUICK))
    doc["host"] = dict(doc["host"], cpu_model="QEMU TCG CPU version 2.5+",
                       emulation=tcg_host()["emulation"])
    path = tmp_path / "tcg.json"
    path.write_text(json.dumps(doc))
    return path


def test_show_warns_for_an_emulated_host_and_not_otherwise(tmp_path):
    env = dict(os.environ)
    run = [sys.executable, "-m", "vlab", "show"]
    tcg = subprocess.run(run + [str(_tcg_results(tmp_path))], capture_output=True, text=True,
                         timeout=120, env=env)
    assert tcg.returncode == 0, tcg.stderr
    assert tcg.stdout.startswith("WARNING: the CPU of this host is emulated by QEMU's TCG")
    plain = subprocess.run(run + [str(QUICK)], capture_output=True, text=True, timeout=120,
                           env=env)
    assert plain.returncode == 0 and "emulated by QEMU" not in plain.stdout
    csv = subprocess.run(run + ["--csv", str(_tcg_results(tmp_path))], capture_output=True,
                         text=True, timeout=120, env=env)
    assert csv.returncode == 0 and not csv.stdout.startswith("WARNING")


def test_report_warns_for_an_emulated_host(tmp_path):
    doc = results.read(_tcg_results(tmp_path))
    html = render([(doc, "tcg.json")])
    assert "emulated CPU:" in html and "not hardware timings" in html
    assert "emulated CPU:" not in render([(results.read(QUICK), "q.json")])


def test_doctor_nested_row_does_not_blame_an_outer_hypervisor_under_tcg():
    nested = {c.name: c for c in _host.doctor_checks(tcg_host())}["nested"]
    assert nested.status == "WARN" and "emulated CPU" in nested.detail
    assert "outer hypervisor" not in nested.detail
    hw = {c.name: c for c in _host.doctor_checks(fp(HOSTS / "pvm"))}["nested"]
    assert "outer hypervisor" in hw.detail


def test_shadow_paging_cases_are_skipped_with_the_reason_only_on_tcg_svm():
    """What make test-svm found under kvm_amd.npt=0 is a skip with its reason there, and
    nowhere else (hardware SVM with shadow paging, NPT on TCG, PVM)."""
    req = _emulation.tcg_shadow_requirement()
    tcg = tcg_host()
    assert req.check(tcg, {}) is None                       # NPT on TCG: runs
    shadow = dict(tcg, paging="shadow")
    assert "triple fault" in req.check(shadow, {})
    hw_shadow = dict(fp(HOSTS / "svm"), paging="shadow")
    assert req.check(hw_shadow, {}) is None
    assert req.check(fp(HOSTS / "pvm"), {}) is None


def test_the_lane_suites_plan_the_shadow_skips_on_a_tcg_shadow_host():
    from vlab.run.runner import RunOptions, plan

    host = dict(tcg_host(), paging="shadow")
    host["kvm"] = dict(host["kvm"], usable=True)
    cases, _, _ = plan(RunOptions(suite="svm-paging"), host)
    reasons = {c.exp.name: c.skip for c in cases}
    for name in ("exits.cr3_write", "exits.invlpg", "paging.random_read", "paging.first_touch"):
        assert "triple fault" in (reasons[name] or ""), name
    assert reasons["exits.cpuid"] is None and reasons["exits.mmio_user"] is None
