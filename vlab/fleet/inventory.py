"""The Ansible side of a fleet: where its executables are, and which hosts an inventory names.

The inventory is Ansible's own (INI or YAML, a directory, a dynamic script): vlab does not parse
it but asks `ansible-inventory`, so whatever Ansible accepts works here unchanged.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from vlab._errors import UsageError

PLAYBOOK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "playbook")


def ansible_tool(name: str) -> str:
    """Path of an Ansible executable (`ansible-playbook`, `ansible-inventory`): beside this
    interpreter first (vlab's venv), else on PATH. Missing: a one-line UsageError."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    if os.access(here, os.X_OK):
        return here
    found = shutil.which(name)
    if not found:
        raise UsageError(f"{name} not found: install Ansible on the controller "
                         f"(pip install 'vlab[fleet]', i.e. ansible-core)")
    return found


def ansible_env() -> dict[str, str]:
    """The environment Ansible runs in: UTF-8 (ansible-core refuses any other locale), no
    retry files, pipelining, and vlab's callback plugin for per-host events on stdout."""
    env = dict(os.environ)
    env.setdefault("LC_ALL", "C.UTF-8")
    env.setdefault("LANG", "C.UTF-8")
    env["ANSIBLE_RETRY_FILES_ENABLED"] = "0"
    # one SSH round trip per task instead of three (no module file copied first)
    env.setdefault("ANSIBLE_PIPELINING", "1")
    env["ANSIBLE_NOCOLOR"] = "1"
    env["ANSIBLE_STDOUT_CALLBACK"] = "vlab_events"
    env["ANSIBLE_CALLBACK_PLUGINS"] = os.path.join(PLAYBOOK_DIR, "callback_plugins")
    env["ANSIBLE_DEPRECATION_WARNINGS"] = "0"
    env["ANSIBLE_SYSTEM_WARNINGS"] = "0"
    env["ANSIBLE_INTERPRETER_PYTHON"] = env.get("ANSIBLE_INTERPRETER_PYTHON", "auto_silent")
    return env


def list_hosts(inventory: str, limit: str | None = None, timeout: float = 120.0) -> list[str]:
    """The inventory's hosts (those `limit` selects), in Ansible's order, each once."""
    if not os.path.exists(inventory) and "," not in inventory:
        raise UsageError(f"inventory {inventory}: no such file or directory")
    argv = [ansible_tool("ansible-inventory"), "-i", inventory, "--list"]
    if limit:
        argv += ["--limit", limit]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           env=ansible_env(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise UsageError(f"ansible-inventory -i {inventory} took more than {timeout:g} s") \
            from None
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["failed"])[-1]
        raise UsageError(f"inventory {inventory}: {' '.join(last.split())}")
    try:
        data = json.loads(p.stdout)
    except ValueError:
        raise UsageError(f"inventory {inventory}: ansible-inventory printed no JSON") from None
    hosts: list[str] = []
    seen_groups: set[str] = set()

    def walk(group: str) -> None:
        if group in seen_groups:
            return
        seen_groups.add(group)
        entry = data.get(group) or {}
        for h in entry.get("hosts", []):
            if h not in hosts:
                hosts.append(h)
        for child in entry.get("children", []):
            walk(child)

    walk("all")
    if not hosts:
        raise UsageError(f"inventory {inventory} names no hosts"
                         + (f" matching {limit!r}" if limit else ""))
    return hosts
