"""`vlab fleet`: run vlab on many hosts through Ansible, and compare them.

* `vlab.fleet.run.run_fleet` drives `ansible-playbook` with the playbook shipped here
  (`playbook/fleet.yml`, role `vlab`): every host installs vlab from the controller's own wheel,
  runs its set-up, `vlab doctor --json` and `vlab run`, and the results are fetched into
  `results/fleet/<stamp>/<inventory host>.json`. A host that cannot be reached or fails is an
  error row with its reason in the fleet's manifest (`fleet.json`); the others' results are
  kept, and a rerun of the same directory only runs and fetches what is missing.
* `vlab.fleet.report.fleet_report` writes one HTML page across the hosts: every host against a
  chosen baseline, and the host keys that differ.

Ansible (`ansible-core`, the `fleet` extra) is needed on the controller only.
"""
from __future__ import annotations

FLEET_SCHEMA = "vlab.fleet/1"
MANIFEST = "fleet.json"
