"""The host: sysfs/procfs readers, the host record (fingerprint), what changed between two
records, `vlab doctor`'s checks, SR-IOV detection, opt-in settings (`vlab host set`) and the
CPL0/CPL3 calibration.

Modules: `sysfs` (readers through a root), `fingerprint` (the record, `host_id`), `diff` (the one
`host_diff` and the one definition of volatile host keys), `doctor` (checks and their table),
`sriov`, `settings`, `calibrate` (needs the native layer; not imported here).

The names below are the public surface other packages use: ``from vlab.host import fingerprint``
gives the function (the module is ``vlab.host.fingerprint`` by its full name).
"""
from vlab.host.diff import DERIVED_KEYS, flatten_host, host_diff, is_volatile
from vlab.host.doctor import Check, doctor_checks, format_doctor
from vlab.host.fingerprint import (HALTPOLL_ADVICE, HOST_ID_KEYS, cap_value, fingerprint, host_id,
                                   idle_halts_at_once)

__all__ = ["fingerprint", "host_id", "HOST_ID_KEYS", "cap_value", "idle_halts_at_once",
           "HALTPOLL_ADVICE", "Check", "doctor_checks", "format_doctor", "host_diff",
           "is_volatile", "flatten_host", "DERIVED_KEYS"]
