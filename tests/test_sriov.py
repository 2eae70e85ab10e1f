"""SR-IOV / VFIO detection on recorded sysfs trees and on the live host."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from vlab import host as _host
from vlab.host import sriov as _sriov

DATA = Path(__file__).parent / "data" / "sriov"


def detect(name: str) -> dict:
    return _sriov.detect(str(DATA / name))


def copy_tree(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(DATA / name, dst, symlinks=True)
    return dst


def test_none_is_this_hosts_pci_layout():
    d = detect("none")
    assert d["pfs"] == [] and d["vfs"] == [] and d["usable_vf"] is None
    assert d["reason"].startswith("no SR-IOV capable device (kernel built without CONFIG_PCI_IOV)")
    assert "CONFIG_VFIO not available (/dev/vfio missing)" in d["reason"]
    assert "no IOMMU groups (IOMMU disabled?)" in d["reason"]
    assert len(d["missing"]) == 3
    assert d["vfio"] == {"config": "n", "pci_iov_config": "n", "module": False,
                         "dev_vfio": False, "iommu_groups": 0}


def test_no_device_without_kernel_config(tmp_path):
    root = copy_tree("none", tmp_path)
    (root / "proc/config.gz").unlink()
    d = _sriov.detect(str(root))
    assert d["missing"][0] == "no SR-IOV capable device (no PCI device with sriov_totalvfs > 0)"


def test_pf_without_vfs():
    d = detect("pf_no_vfs")
    assert d["pfs"] == [
        {"bdf": "0000:3b:00.0", "driver": "ixgbe", "totalvfs": 63, "numvfs": 0,
         "vendor": "0x8086", "device": "0x10fb"},
        {"bdf": "0000:3b:00.1", "driver": "ixgbe", "totalvfs": 63, "numvfs": 0,
         "vendor": "0x8086", "device": "0x10fb"},
    ]
    assert d["vfs"] == []
    assert d["reason"] == "SR-IOV PF 0000:3b:00.0 has no VFs enabled (sriov_numvfs = 0)"
    assert d["advice"] == "echo 4 > /sys/bus/pci/devices/0000:3b:00.0/sriov_numvfs"
    assert d["vfio"]["dev_vfio"] is True and d["vfio"]["iommu_groups"] == 3


def test_vf_bound_to_other_driver():
    d = detect("vf_other_driver")
    assert d["vfs"] == [
        {"bdf": "0000:3b:10.0", "pf": "0000:3b:00.0", "driver": "ixgbevf", "iommu_group": 90},
        {"bdf": "0000:3b:10.2", "pf": "0000:3b:00.0", "driver": "ixgbevf", "iommu_group": 91},
    ]
    assert d["pfs"][0]["numvfs"] == 2
    assert d["usable_vf"] is None
    assert d["reason"] == "VF 0000:3b:10.0 is bound to ixgbevf, not vfio-pci"
    assert "driver_override" in d["advice"] and "unbind" in d["advice"]


def test_vf_on_vfio_is_usable():
    d = detect("vf_vfio")
    assert d["usable_vf"] == {"bdf": "0000:3b:10.2", "pf": "0000:3b:00.0", "driver": "vfio-pci",
                              "iommu_group": 91, "group_dev": "/dev/vfio/91"}
    assert d["reason"] is None and d["missing"] == [] and d["advice"] == ""
    assert d["vfio_reason"] is None


def test_unbound_vf(tmp_path):
    root = copy_tree("vf_other_driver", tmp_path)
    (root / "sys/bus/pci/devices/0000:3b:10.0/driver").unlink()
    d = _sriov.detect(str(root))
    assert d["reason"] == "VF 0000:3b:10.0 is bound to no driver, not vfio-pci"


def test_vf_on_vfio_without_dev_vfio(tmp_path):
    root = copy_tree("vf_vfio", tmp_path)
    shutil.rmtree(root / "dev/vfio")
    d = _sriov.detect(str(root))
    assert d["usable_vf"] is None
    assert d["reason"].startswith("vfio is loaded but /dev/vfio/vfio is missing")
    shutil.rmtree(root / "sys/module")
    d = _sriov.detect(str(root))
    assert d["reason"] == "CONFIG_VFIO not available (/dev/vfio missing)"
    assert d["vfio_reason"] == d["reason"]


def test_vf_without_iommu(tmp_path):
    root = copy_tree("vf_vfio", tmp_path)
    shutil.rmtree(root / "sys/kernel/iommu_groups")
    for dev in (root / "sys/bus/pci/devices").iterdir():
        link = dev / "iommu_group"
        if os.path.lexists(link):
            link.unlink()
    d = _sriov.detect(str(root))
    assert d["usable_vf"] is None
    assert d["reason"] == ("VF 0000:3b:10.2 has no IOMMU group; "
                           "no IOMMU groups (IOMMU disabled?)")


def test_recorded_symlinks_stay_inside_their_tree():
    for tree in DATA.iterdir():
        for dirpath, dirnames, filenames in os.walk(tree):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                if path.is_symlink():
                    target = os.readlink(path)
                    assert not os.path.isabs(target), path
                    resolved = (path.parent / target).resolve()
                    assert resolved.is_relative_to(tree.resolve()), path
                    assert resolved.exists(), path


def test_fingerprint_carries_sriov():
    h = _host.fingerprint(str(DATA / "vf_vfio"))
    assert h["devices"]["sriov_usable_vf"]["bdf"] == "0000:3b:10.2"
    assert h["devices"]["vfio"] is True and h["devices"]["iommu_groups"] == 5
    assert h["devices"]["sriov"][0]["bdf"] == "0000:3b:00.0"
    checks = {c.name: c for c in _host.doctor_checks(h)}
    assert checks["sriov"].ok and "IOMMU group 91" in checks["sriov"].detail
    assert checks["vfio"].ok


@pytest.mark.skipif(not os.path.isdir("/sys/module/kvm_pvm"), reason="not a KVM-on-PVM host")
def test_live_pvm_host_has_no_sriov():
    d = _sriov.detect("/")
    assert d["pfs"] == [] and d["usable_vf"] is None
    assert d["vfio"]["dev_vfio"] is False
    assert d["reason"].startswith("no SR-IOV capable device")
    assert "/dev/vfio missing" in d["reason"]
