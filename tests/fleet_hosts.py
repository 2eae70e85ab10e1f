"""Loopback "hosts" for the fleet tests: one real sshd per host, on 127.0.0.2, .3, .4 ...

Each host has its own directory with its own host keys, an sshd that accepts one client key
only (no passwords, no keyboard-interactive, no PAM), and its own vlab install directory
(`home`). The client side gets a known_hosts file with exactly these host keys (strict host
key checking stays on) and an Ansible inventory.

The hosts share this machine's Python: the inventory's `vlab_python` is the interpreter running
the tests (which has vlab's dependencies), and the role installs the controller's wheel into
each host's `home/lib` with `pip install --no-deps --target`, put first on PYTHONPATH, so each
host runs its own copy of vlab, not the source tree's.

Every sshd runs under `timeout` (it stops by itself after `lifetime` seconds even if the test
process dies) and the fixture kills it and every process it started at teardown. Every wait
here is bounded in time.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
SSH_KEYGEN = shutil.which("ssh-keygen")
SSH = shutil.which("ssh")


def unavailable() -> str | None:
    """Why loopback sshd hosts cannot run here, or None."""
    if SSHD is None:
        return "no sshd (Debian's openssh-server; `make install` installs it when root)"
    if SSH is None or SSH_KEYGEN is None:
        return "no ssh client or ssh-keygen (Debian's openssh-client)"
    if os.geteuid() != 0:
        return "the loopback sshd hosts log in as root (run the tests as root)"
    return None


@dataclass
class SshHost:
    name: str
    addr: str
    port: int
    dir: str
    home: str
    config: str
    lifetime: float
    proc: subprocess.Popen | None = None
    log: str = ""

    def start(self, timeout: float = 30.0) -> None:
        """Start this host's sshd and wait (bounded) until it accepts connections."""
        self.log = os.path.join(self.dir, "sshd.log")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["timeout", "-s", "TERM", "-k", "5", str(int(self.lifetime)), SSHD, "-D", "-e",
                 "-f", self.config], stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd of {self.name} exited: {self.tail()}")
            try:
                with socket.create_connection((self.addr, self.port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"sshd of {self.name} did not listen within {timeout:g} s")

    def tail(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return " | ".join(f.read().strip().splitlines()[-3:])
        except OSError:
            return ""

    def kill(self) -> None:
        """Kill this host's sshd and everything it started (its sessions and their commands),
        as a host that goes away would."""
        if self.proc is None:
            return
        pids = descendants(self.proc.pid)
        for pid in [self.proc.pid, *pids]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None


@dataclass
class Fleet:
    dir: str
    hosts: list[SshHost]
    client_key: str
    known_hosts: str
    inventory: str
    env: dict[str, str] = field(default_factory=dict)

    def ssh_argv(self, host: SshHost) -> list[str]:
        """An ssh command line to `host` with the fleet's key and known hosts."""
        return [SSH, "-p", str(host.port), "-i", self.client_key, "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10",
                "-o", "ControlMaster=no", f"root@{host.addr}"]

    def stop(self) -> None:
        for h in self.hosts:
            h.kill()


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (sshd's sessions call setsid(), so a process group would not
    reach them)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 10000:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def _keygen(path: str, comment: str) -> str:
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path],
                   check=True, timeout=60, stdin=subprocess.DEVNULL)
    with open(path + ".pub") as f:
        return f.read().strip()


def start_fleet(base: str, n: int = 3, *, lifetime: float = 1500.0,
                host_vars: dict | None = None) -> Fleet:
    """Start `n` sshd hosts on 127.0.0.2 ... and write their inventory; the running Fleet."""
    if n > 8:
        raise ValueError("at most 8 loopback hosts")
    os.makedirs("/run/sshd", exist_ok=True)       # sshd's privilege-separation directory
    os.makedirs(base, exist_ok=True)
    client_key = os.path.join(base, "client_ed25519")
    client_pub = _keygen(client_key, "vlab-fleet-test-client")
    known: list[str] = []
    hosts: list[SshHost] = []
    for i in range(n):
        name, addr = f"host{i + 1}", f"127.0.0.{i + 2}"
        d = os.path.join(base, name)
        home = os.path.join(d, "home")
        os.makedirs(home, exist_ok=True)
        host_pub = _keygen(os.path.join(d, "ssh_host_ed25519_key"), name)
        port = _free_port(addr)
        with open(os.path.join(d, "authorized_keys"), "w") as f:
            f.write(client_pub + "\n")
        config = os.path.join(d, "sshd_config")
        with open(config, "w") as f:
            f.write(f"""ListenAddress {addr}:{port}
HostKey {d}/ssh_host_ed25519_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
AuthenticationMethods publickey
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
MaxStartups 30
MaxSessions 30
ClientAliveInterval 5
ClientAliveCountMax 3
LogLevel ERROR
Subsystem sftp internal-sftp
""")
        known.append(f"[{addr}]:{port} {' '.join(host_pub.split()[:2])}")
        hosts.append(SshHost(name, addr, port, d, home, config, lifetime))
    known_hosts = os.path.join(base, "known_hosts")
    with open(known_hosts, "w") as f:
        f.write("\n".join(known) + "\n")
    for p in (client_key, os.path.join(base, "known_hosts")):
        os.chmod(p, 0o600)
    ssh_args = (f"-o UserKnownHostsFile={known_hosts} -o StrictHostKeyChecking=yes "
                f"-o IdentitiesOnly=yes -o ConnectTimeout=10 -o ServerAliveInterval=5 "
                f"-o ServerAliveCountMax=3")
    inv = {"all": {"children": {"fleet": {"hosts": {
        h.name: {"ansible_host": h.addr, "ansible_port": h.port, "vlab_home": h.home,
                 "ansible_remote_tmp": os.path.join(h.dir, "ansible-tmp")}
        for h in hosts}}},
        "vars": {"ansible_user": "root", "ansible_ssh_private_key_file": client_key,
                 "ansible_ssh_common_args": ssh_args,
                 "ansible_python_interpreter": sys.executable,
                 "vlab_python": sys.executable,
                 # the role's package step runs (the hosts are root), on a package sshd
                 # itself needs, so that three hosts on one machine never race for apt's lock
                 "vlab_system_packages": ["openssh-server"], **(host_vars or {})}}}
    inventory = os.path.join(base, "inventory.yml")
    with open(inventory, "w") as f:
        json.dump(inv, f, indent=1)             # JSON is YAML
    env = {"ANSIBLE_HOME": os.path.join(base, "ansible"),
           "ANSIBLE_LOCAL_TEMP": os.path.join(base, "ansible", "tmp"),
           "ANSIBLE_SSH_CONTROL_PATH_DIR": os.path.join(base, "ansible", "cp")}
    fleet = Fleet(base, hosts, client_key, known_hosts, inventory, env)
    try:
        for h in hosts:
            h.start()
    except BaseException:
        fleet.stop()
        raise
    return fleet
