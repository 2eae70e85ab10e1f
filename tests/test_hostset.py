"""`vlab host set` / `restore` on copies of recorded host trees (never the live host)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from vlab import host as _host
from vlab.host import settings as _hostset
from vlab._errors import UsageError, VlabError

DATA = Path(__file__).parent / "data" / "hosts"
THP = "sys/kernel/mm/transparent_hugepage/enabled"


def no_vms(root: str) -> list[int]:
    return []


@pytest.fixture
def state(tmp_path) -> str:
    return str(tmp_path / "state" / "host-state.json")


def tree(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(DATA / name, dst, symlinks=True)
    return dst


class FakeModprobe:
    """Records commands; `modprobe M a=b` rewrites M's parameter files like a real reload."""

    def __init__(self, root: Path, apply: bool = True):
        self.root, self.apply, self.commands = root, apply, []

    def __call__(self, cmd: list[str]) -> None:
        self.commands.append(cmd)
        if self.apply and cmd[:1] == ["modprobe"] and cmd[1] != "-r":
            for arg in cmd[2:]:
                name, _, value = arg.partition("=")
                param = self.root / f"sys/module/{cmd[1]}/parameters/{name}"
                param.write_text({"1": "Y", "0": "N"}.get(value, value) + "\n")


def test_thp_set_and_restore(tmp_path, state):
    root = tree("vmx", tmp_path)
    msg = _hostset.set_host("thp", "never", str(root), state_path=state, vms=no_vms)
    assert msg.startswith("thp: always -> never: wrote never")
    assert (root / THP).read_text().strip() == "never"
    assert _host.fingerprint(str(root))["thp"]["enabled"] == "never"
    saved = json.loads(Path(state).read_text())
    assert saved["schema"] == "vlab.host-state/1"
    assert saved["saved"]["thp"]["value"] == "always"

    msg = _hostset.restore_host("thp", str(root), state_path=state, vms=no_vms)
    assert msg.startswith("thp: never -> always")
    assert _host.fingerprint(str(root))["thp"]["enabled"] == "always"
    assert json.loads(Path(state).read_text())["saved"] == {}
    assert _hostset.restore_host(None, str(root), state_path=state) == "nothing to restore"


def test_restore_returns_to_the_first_value(tmp_path, state):
    root = tree("vmx", tmp_path)
    _hostset.set_host("thp", "never", str(root), state_path=state, vms=no_vms)
    _hostset.set_host("thp", "madvise", str(root), state_path=state, vms=no_vms)
    _hostset.set_host("hugepages.2m", "0", str(root), state_path=state, vms=no_vms)
    msg = _hostset.restore_host(None, str(root), state_path=state, vms=no_vms)
    assert len(msg.splitlines()) == 2
    h = _host.fingerprint(str(root))
    assert h["thp"]["enabled"] == "always"
    assert h["hugepages"]["2048kB"]["nr"] == 1024


def test_same_value_is_a_no_op(tmp_path, state):
    root = tree("vmx", tmp_path)
    msg = _hostset.set_host("thp", "always", str(root), state_path=state, vms=no_vms)
    assert "nothing to do" in msg
    assert not os.path.exists(state)


def test_dry_run_writes_nothing(tmp_path, state):
    root = tree("vmx", tmp_path)
    before = (root / THP).read_text()
    msg = _hostset.set_host("thp", "never", str(root), dry_run=True, state_path=state, vms=no_vms)
    assert "would write never to /sys/kernel/mm/transparent_hugepage/enabled" in msg
    assert (root / THP).read_text() == before
    assert not os.path.exists(state)


def test_hugepages(tmp_path, state):
    root = tree("svm", tmp_path)
    msg = _hostset.set_host("hugepages.1g", "2", str(root), state_path=state, vms=no_vms)
    assert "0 -> 2" in msg
    assert _host.fingerprint(str(root))["hugepages"]["1048576kB"]["nr"] == 2
    _hostset.restore_host("hugepages.1g", str(root), state_path=state, vms=no_vms)
    assert _host.fingerprint(str(root))["hugepages"]["1048576kB"]["nr"] == 0


def test_pvm_refuses_ept_and_npt(tmp_path, state):
    root = tree("pvm", tmp_path)
    for key in ("kvm_intel.ept", "kvm_amd.npt"):
        for dry in (False, True):
            with pytest.raises(_hostset.Refused) as err:
                _hostset.set_host(key, "0", str(root), dry, state_path=state, vms=no_vms)
            assert str(err.value) == ("this host runs KVM on PVM, which is shadow-paging only: "
                                      "there is no EPT/NPT to switch")
    with pytest.raises(_hostset.Refused, match="KVM on PVM: kvm_intel is not loaded"):
        _hostset.set_host("kvm_intel.vpid", "0", str(root), state_path=state, vms=no_vms)
    assert not os.path.exists(state)


def test_builtin_readonly_param_is_refused(tmp_path, state):
    root = tree("pvm", tmp_path)
    param = root / "sys/module/kvm/parameters/halt_poll_ns"
    param.chmod(0o444)  # as on the PVM build hosts
    with pytest.raises(_hostset.Refused, match="built into the kernel.*kernel command line"):
        _hostset.set_host("kvm.halt_poll_ns", "0", str(root), state_path=state, vms=no_vms)
    assert param.read_text().strip() == "200000"


def test_runtime_param_is_written(tmp_path, state):
    root = tree("pvm", tmp_path)
    (root / "sys/module/kvm/parameters/halt_poll_ns").chmod(0o644)
    before = _host.fingerprint(str(root))["host_id"]
    msg = _hostset.set_host("kvm.halt_poll_ns", "0", str(root), state_path=state, vms=no_vms)
    assert msg.startswith("kvm.halt_poll_ns: 200000 -> 0: wrote 0")
    assert _host.fingerprint(str(root))["host_id"] != before
    _hostset.restore_host("kvm.halt_poll_ns", str(root), state_path=state, vms=no_vms)
    assert _host.fingerprint(str(root))["host_id"] == before


def test_refused_while_a_vm_exists(tmp_path, state):
    root = tree("vmx", tmp_path)
    with pytest.raises(_hostset.Refused, match=r"while VMs exist \(pids 4242\)"):
        _hostset.set_host("thp", "never", str(root), state_path=state, vms=lambda r: [4242])
    assert (root / THP).read_text().strip() == "[always] madvise never"


def test_vm_detection_through_proc(tmp_path, state):
    root = tree("vmx", tmp_path)
    for pid, fds in {"77": ["/dev/null", "anon_inode:kvm-vcpu:0"],
                     "4242": ["/dev/kvm", "anon_inode:kvm-vm"], "self": []}.items():
        fd_dir = root / "proc" / pid / "fd"
        fd_dir.mkdir(parents=True)
        for i, target in enumerate(fds):
            os.symlink(target, fd_dir / str(i))
    assert _hostset.running_vms(str(root)) == [4242]
    with pytest.raises(_hostset.Refused, match="pids 4242"):
        _hostset.set_host("thp", "never", str(root), state_path=state)


def test_unknown_key_and_bad_values(tmp_path, state):
    root = tree("vmx", tmp_path)
    with pytest.raises(UsageError, match="unknown host key 'kvm_intel.foo'") as err:
        _hostset.set_host("kvm_intel.foo", "1", str(root), state_path=state, vms=no_vms)
    assert not isinstance(err.value, _hostset.Refused)
    assert "\n" not in str(err.value)
    for key, value in (("thp", "sometimes"), ("hugepages.2m", "-1"), ("kvm_intel.ept", "maybe"),
                       ("kvm.halt_poll_ns", "fast")):
        with pytest.raises(UsageError):
            _hostset.set_host(key, value, str(root), state_path=state, vms=no_vms)
    with pytest.raises(UsageError, match="nothing saved for thp"):
        _hostset.restore_host("thp", str(root), state_path=state)


def test_parse_assignment():
    assert _hostset.parse_assignment("kvm_intel.ept=0") == ("kvm_intel.ept", "0")
    assert _hostset.parse_assignment(" thp = never ") == ("thp", "never")
    for bad in ("thp", "=never", "thp="):
        with pytest.raises(UsageError):
            _hostset.parse_assignment(bad)


def test_ept_switch_reloads_kvm_intel(tmp_path, state):
    root = tree("vmx", tmp_path)
    modprobe = FakeModprobe(root)
    msg = _hostset.set_host("kvm_intel.ept", "0", str(root), state_path=state, vms=no_vms,
                            run=modprobe)
    # the reload keeps every other kvm_intel knob as it is (APICv on, IPIv off on this CPU)
    assert modprobe.commands == [["modprobe", "-r", "kvm_intel"],
                                 ["modprobe", "kvm_intel", "ept=0", "vpid=1", "enable_apicv=1",
                                  "enable_ipiv=0"]]
    assert "kvm_intel.ept: 1 -> 0: ran: modprobe -r kvm_intel && modprobe kvm_intel" in msg
    h = _host.fingerprint(str(root))
    assert h["paging"] == "shadow"

    modprobe.commands.clear()
    _hostset.restore_host("kvm_intel.ept", str(root), state_path=state, vms=no_vms, run=modprobe)
    assert modprobe.commands[-1] == ["modprobe", "kvm_intel", "ept=1", "vpid=1", "enable_apicv=1",
                                     "enable_ipiv=0"]
    assert _host.fingerprint(str(root))["paging"] == "ept"


def test_ept_dry_run_names_the_commands(tmp_path, state):
    root = tree("vmx", tmp_path)
    modprobe = FakeModprobe(root)
    msg = _hostset.set_host("kvm_intel.ept", "N", str(root), True, state_path=state, vms=no_vms,
                            run=modprobe)
    assert msg.endswith("would run: modprobe -r kvm_intel && modprobe kvm_intel ept=0 vpid=1 "
                        "enable_apicv=1 enable_ipiv=0")
    assert modprobe.commands == []


def test_reload_never_touches_the_live_host_for_a_tree(tmp_path, state):
    root = tree("vmx", tmp_path)
    with pytest.raises(VlabError, match="not the live host"):
        _hostset.set_host("kvm_intel.ept", "0", str(root), state_path=state, vms=no_vms)


def test_reload_that_does_not_take_is_an_error(tmp_path, state):
    root = tree("vmx", tmp_path)
    with pytest.raises(VlabError, match="reads 1 after setting it to 0"):
        _hostset.set_host("kvm_intel.ept", "0", str(root), state_path=state, vms=no_vms,
                          run=FakeModprobe(root, apply=False))


def test_failed_load_puts_the_module_back(tmp_path, state):
    root = tree("vmx", tmp_path)
    fake = FakeModprobe(root)

    def run(cmd):
        fake(cmd)
        if "ept=0" in cmd:
            raise VlabError("modprobe kvm_intel ept=0 vpid=1 failed: invalid parameter")

    with pytest.raises(VlabError, match="kvm_intel was loaded back with ept=1"):
        _hostset.set_host("kvm_intel.ept", "0", str(root), state_path=state, vms=no_vms, run=run)
    assert fake.commands[-1] == ["modprobe", "kvm_intel", "ept=1", "vpid=1", "enable_apicv=1",
                                 "enable_ipiv=0"]
    assert _host.fingerprint(str(root))["paging"] == "ept"


def test_builtin_kvm_intel_is_refused(tmp_path, state):
    root = tree("vmx", tmp_path)
    (root / "sys/module/kvm_intel/initstate").unlink()
    with pytest.raises(_hostset.Refused, match="kvm_intel is built into the kernel"):
        _hostset.set_host("kvm_intel.ept", "0", str(root), state_path=state, vms=no_vms,
                          run=FakeModprobe(root))


def test_wrong_vendor_and_no_kvm(tmp_path, state):
    with pytest.raises(_hostset.Refused, match=r"kvm_intel is not loaded on this host \(it uses "
                                               r"kvm_amd\)"):
        _hostset.set_host("kvm_intel.ept", "0", str(tree("svm", tmp_path)), state_path=state,
                          vms=no_vms)
    with pytest.raises(_hostset.Refused, match="kvm_amd is not loaded on this host"):
        _hostset.set_host("kvm_amd.npt", "0", str(tree("nokvm", tmp_path)), state_path=state,
                          vms=no_vms)


def test_npt_reload_on_svm(tmp_path, state):
    root = tree("svm", tmp_path)
    modprobe = FakeModprobe(root)
    _hostset.set_host("kvm_amd.npt", "off", str(root), state_path=state, vms=no_vms, run=modprobe)
    assert modprobe.commands[-1] == ["modprobe", "kvm_amd", "npt=0", "avic=0"]
    assert _host.fingerprint(str(root))["paging"] == "shadow"


def test_corrupt_state_file(tmp_path, state):
    root = tree("vmx", tmp_path)
    Path(state).parent.mkdir(parents=True)
    Path(state).write_text("{not json")
    with pytest.raises(UsageError, match="cannot read host state file"):
        _hostset.set_host("thp", "never", str(root), state_path=state, vms=no_vms)


def test_host_settings(tmp_path):
    s = _hostset.host_settings(str(DATA / "vmx"))
    assert s["kvm_intel.ept"] == "1" and s["kvm_amd.npt"] is None
    assert s["thp"] == "always" and s["hugepages.2m"] == "1024"
    assert _hostset.host_settings(str(DATA / "vmx_ept0"))["kvm_intel.ept"] == "0"


HALTPOLL = "sys/module/haltpoll/parameters/guest_halt_poll_ns"


def test_haltpoll_recorded_set_and_restored(tmp_path, state):
    """The PVM tree is this project's build host: a guest kernel with cpuidle-haltpoll and
    polling off (guest_halt_poll_ns=0), which makes every cross-CPU wake-up an IPI."""
    root = tree("pvm", tmp_path)
    assert _host.fingerprint(str(root))["cpuidle"] == {
        "driver": "haltpoll", "governor": "haltpoll", "haltpoll_ns": 0}
    msg = _hostset.set_host("haltpoll.guest_halt_poll_ns", "200000", str(root),
                            state_path=state, vms=no_vms)
    assert msg.startswith("haltpoll.guest_halt_poll_ns: 0 -> 200000: wrote 200000")
    assert _host.fingerprint(str(root))["cpuidle"]["haltpoll_ns"] == 200000
    _hostset.restore_host("haltpoll.guest_halt_poll_ns", str(root), state_path=state,
                          vms=no_vms)
    assert (root / HALTPOLL).read_text().strip() == "0"


def test_haltpoll_absent_is_refused_with_reason(tmp_path, state):
    root = tree("vmx", tmp_path)
    assert _host.fingerprint(str(root))["cpuidle"]["haltpoll_ns"] is None
    with pytest.raises(_hostset.Refused, match="cpuidle-haltpoll is not on this host"):
        _hostset.set_host("haltpoll.guest_halt_poll_ns", "200000", str(root),
                          state_path=state, vms=no_vms)
    with pytest.raises(UsageError, match="integer"):
        _hostset.set_host("haltpoll.guest_halt_poll_ns", "lots", str(root),
                          state_path=state, vms=no_vms)
