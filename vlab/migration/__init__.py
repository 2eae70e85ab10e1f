"""Live migration between two VMM processes: options, the wire stream, the guest, the source and
destination state machines, post-copy, and the command line behind `python -m vlab.migrate`."""
