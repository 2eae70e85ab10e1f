"""vlab's experiments: one module per area (exits, paging, io, migration) plus the suites.

Installed as the package `vlab.experiments`; `vlab.run.registry` discovers the modules here.
"""
