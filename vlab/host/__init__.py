"""The host: sysfs/procfs readers, the host record (fingerprint), `vlab doctor`'s checks,
SR-IOV detection, opt-in settings (`vlab host set`) and the CPL0/CPL3 calibration."""
