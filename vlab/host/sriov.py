"""SR-IOV and VFIO detection: can `io.sriov` give a guest a virtual function here, and if not, why.

A VF is usable when the whole chain holds: an SR-IOV physical function (PCI device with
`sriov_totalvfs > 0`), VFs enabled on it (`sriov_numvfs > 0`), a VF bound to `vfio-pci`, that VF
in an IOMMU group, and the VFIO container device `/dev/vfio/vfio`. `detect` walks sysfs (through
`root`, so tests can use recorded trees) and names every broken link of that chain, so a skipped
`io.sriov` row says exactly what to fix.
"""
from __future__ import annotations

from typing import Any

from vlab.host.sysfs import exists, kernel_config, link_name, listdir, read_int, read_text, to_int

_PCI = "/sys/bus/pci/devices"


def _device(root: str, bdf: str) -> dict[str, Any]:
    base = f"{_PCI}/{bdf}"
    return {
        "bdf": bdf,
        "driver": link_name(root, f"{base}/driver"),
        "vendor": read_text(root, f"{base}/vendor"),
        "device": read_text(root, f"{base}/device"),
        "totalvfs": read_int(root, f"{base}/sriov_totalvfs"),
        "numvfs": read_int(root, f"{base}/sriov_numvfs"),
        "physfn": link_name(root, f"{base}/physfn"),
        "iommu_group": to_int(link_name(root, f"{base}/iommu_group")),
        "virtfns": sorted(
            (e for e in listdir(root, base) if e.startswith("virtfn") and e[6:].isdigit()),
            key=lambda e: int(e[6:])),
    }


def detect(root: str = "/") -> dict:
    """SR-IOV physical/virtual functions, VFIO availability, and the first usable VF.

    Returns `{"pfs": [{bdf, driver, totalvfs, numvfs, vendor, device}], "vfs": [{bdf, pf,
    driver, iommu_group}], "vfio": {config, pci_iov_config, module, dev_vfio, iommu_groups},
    "vfio_reason"/"vfio_advice": why /dev/vfio/vfio is missing (None/"" if present),
    "usable_vf": {bdf, pf, driver, iommu_group, group_dev} or None, "reason": None when a VF is
    usable, else one line naming everything missing, "missing": [those items], "advice": how to
    fix the first one (or "")}`.
    """
    devices = {bdf: _device(root, bdf) for bdf in listdir(root, _PCI)}
    pfs = [{k: d[k] for k in ("bdf", "driver", "totalvfs", "numvfs", "vendor", "device")}
           for d in devices.values() if (d["totalvfs"] or 0) > 0]

    # VFs are found both ways: a PF's virtfnN links (in VF order) and a device's physfn link.
    vf_pf: dict[str, str] = {}
    for pf in pfs:
        for link in devices[pf["bdf"]]["virtfns"]:
            vf_bdf = link_name(root, f"{_PCI}/{pf['bdf']}/{link}")
            if vf_bdf:
                vf_pf.setdefault(vf_bdf, pf["bdf"])
    for d in devices.values():
        if d["physfn"]:
            vf_pf.setdefault(d["bdf"], d["physfn"])
    vfs = []
    for vf_bdf, pf_bdf in vf_pf.items():
        d = devices.get(vf_bdf) or _device(root, vf_bdf)
        vfs.append({"bdf": vf_bdf, "pf": pf_bdf, "driver": d["driver"],
                    "iommu_group": d["iommu_group"]})

    kconfig = kernel_config(root) or {}
    dev_vfio = exists(root, "/dev/vfio/vfio")
    vfio = {
        "config": kconfig.get("CONFIG_VFIO"),
        "pci_iov_config": kconfig.get("CONFIG_PCI_IOV"),
        "module": exists(root, "/sys/module/vfio") or exists(root, "/sys/module/vfio_pci"),
        "dev_vfio": dev_vfio,
        "iommu_groups": len(listdir(root, "/sys/kernel/iommu_groups")),
    }

    usable = None
    if dev_vfio:
        for vf in vfs:
            if vf["driver"] == "vfio-pci" and vf["iommu_group"] is not None:
                usable = dict(vf, group_dev=f"/dev/vfio/{vf['iommu_group']}")
                break

    vfio_gap = _vfio_gap(vfio)
    missing: list[tuple[str, str]] = []  # (reason, advice)
    if usable is None:
        missing.extend(_hardware_gaps(pfs, vfs, vfio))
        if vfio_gap:
            missing.append(vfio_gap)
        if vfio["iommu_groups"] == 0:
            missing.append(("no IOMMU groups (IOMMU disabled?)",
                            "enable VT-d/AMD-Vi in firmware and boot with intel_iommu=on "
                            "(or amd_iommu=on) iommu=pt"))
        if not missing:  # every link present, yet no VF qualified: say which VF fails how
            missing.append(("no VF bound to vfio-pci with an IOMMU group", ""))
    return {
        "pfs": pfs,
        "vfs": vfs,
        "vfio": vfio,
        "vfio_reason": vfio_gap[0] if vfio_gap else None,
        "vfio_advice": vfio_gap[1] if vfio_gap else "",
        "usable_vf": usable,
        "reason": "; ".join(r for r, _ in missing) or None,
        "missing": [r for r, _ in missing],
        "advice": missing[0][1] if missing else "",
    }


def _vfio_gap(vfio: dict) -> tuple[str, str] | None:
    """Why /dev/vfio/vfio is missing, with advice; None when it is present."""
    if vfio["dev_vfio"]:
        return None
    if vfio["module"]:
        return ("vfio is loaded but /dev/vfio/vfio is missing (devtmpfs not mounted?)",
                "mount -t devtmpfs devtmpfs /dev")
    if vfio["config"] in ("m", "y"):
        return ("vfio module not loaded (/dev/vfio missing)", "modprobe vfio-pci")
    return ("CONFIG_VFIO not available (/dev/vfio missing)",
            "use a kernel built with CONFIG_VFIO and CONFIG_VFIO_PCI")


def _hardware_gaps(pfs: list[dict], vfs: list[dict], vfio: dict) -> list[tuple[str, str]]:
    """The first broken link of PF -> enabled VFs -> VF on vfio-pci -> VF in an IOMMU group."""
    if not pfs:
        if vfio["pci_iov_config"] == "n":
            return [("no SR-IOV capable device (kernel built without CONFIG_PCI_IOV)", "")]
        return [("no SR-IOV capable device (no PCI device with sriov_totalvfs > 0)", "")]
    if not vfs:
        pf = pfs[0]
        return [(f"SR-IOV PF {pf['bdf']} has no VFs enabled (sriov_numvfs = {pf['numvfs'] or 0})",
                 f"echo {min(4, pf['totalvfs'])} > {_PCI}/{pf['bdf']}/sriov_numvfs")]
    on_vfio = [vf for vf in vfs if vf["driver"] == "vfio-pci"]
    if not on_vfio:
        vf = vfs[0]
        bound = f"bound to {vf['driver']}" if vf["driver"] else "bound to no driver"
        unbind = (f"echo {vf['bdf']} > {_PCI}/{vf['bdf']}/driver/unbind; "
                  if vf["driver"] else "")
        return [(f"VF {vf['bdf']} is {bound}, not vfio-pci",
                 f"{unbind}echo vfio-pci > {_PCI}/{vf['bdf']}/driver_override; "
                 f"echo {vf['bdf']} > /sys/bus/pci/drivers_probe")]
    if all(vf["iommu_group"] is None for vf in on_vfio):
        return [(f"VF {on_vfio[0]['bdf']} has no IOMMU group", "")]
    return []
