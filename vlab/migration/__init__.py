"""Live migration of a running vlab guest between two VMM processes, verified end to end.

    options.py      MigrateOptions and the command-line options (imports nothing heavy)
    stream.py       the wire format (protocol 1): framing, message types, limits, validation
    guest.py        the migrating guest: GuestSpec, its vCPU thread, dirty tracking, its report
    source.py       Source: pre-copy rounds, stop-and-copy, commit, verification
    destination.py  Destination: rebuilds the guest from the stream, resumes it after GO
    postcopy.py     post-copy at both ends: pushing missing pages, serving userfaultfd faults
    session.py      RunConfig; one role per process (listen, run_source) or both (run_local)
    command.py      `python -m vlab.migrate` / `vlab migrate`: options in, result out
    child.py        the two processes run_local starts, configured by a JSON job file

The stream is: HELLO, LAYOUT, then rounds of pages, the final stop-and-copy round, the vCPU
state and DONE. The destination answers READY once it holds a complete guest; the source then
commits with GO, and only then does the destination resume the guest; it answers ACK (with the
time of the guest's first MARK) and the hashes of every page of its memory as the final round
left it. The source tears down only after the ACK, and compares those hashes with its own
paused memory. The guest then runs on the destination and reports its own invariants (REPORT).

Time: the TSC travels in the vCPU state (IA32_TSC). On this host (PVM) KVM ignores a host
write of IA32_TSC: the guest reads the host's TSC, so on one host time simply continues and the
guest sees the downtime as a TSC step of the same length (reported as `tsc_step_ms`; the guest
itself fails if the TSC ever goes backwards). Where KVM honours the write, the step is only the
time between the state load and the resume. Source and destination must run the TSC at the
same rate (KVM_SET_TSC_KHZ where KVM_CAP_TSC_CONTROL exists, otherwise refused).

Nothing is imported here: `vlab` builds its parser from options.py alone.
"""
