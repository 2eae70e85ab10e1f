"""`python -m vlab.migrate`: the live-migration command line, kept at its historic name.

The implementation lives in `vlab.migration`; this module only forwards to its command line
(vlab/migration/command.py).
"""
import sys

from vlab.migration.command import main

if __name__ == "__main__":
    sys.exit(main())
