"""The binding to the C VMM: /dev/kvm, VMs, vCPUs, guest memory, devices, KVM statistics and the
guest payload images. The only package that imports the cffi extension `vlab.vmm._native`;
everything above it (dirty tracking, migration, experiments, the runner) uses these classes.
"""
