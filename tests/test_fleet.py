"""Fleets under real SSH: three loopback sshd hosts driven by Ansible, and authenticated
cross-host migration between two of them (tests/fleet_hosts.py starts the hosts).

The fleet runs the cheapest experiment (exits.nop, one case, one process, one value) so that
the whole module stays a few minutes on a loaded 2-core machine.
"""
from __future__ import annotations

import html
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import KVM_REASON
from fleet_hosts import start_fleet, unavailable

PY = sys.executable
RUN_ARGS = ["exits.nop", "-p", "cpl=3", "-p", "vcpus=1", "--processes", "1", "--values", "1"]


def _ansible_reason() -> str | None:
    here = os.path.join(os.path.dirname(PY), "ansible-playbook")
    if not (os.access(here, os.X_OK) or shutil.which("ansible-playbook")):
        return "ansible-core is not installed (the fleet extra: `make install` sets it up)"
    return None


FLEET_REASON = unavailable() or _ansible_reason() or KVM_REASON
needs_fleet = pytest.mark.skipif(FLEET_REASON is not None, reason=FLEET_REASON or "")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if FLEET_REASON:
        pytest.skip(FLEET_REASON)
    f = start_fleet(str(tmp_path_factory.mktemp("fleet")), 3, lifetime=1500)
    yield f
    f.stop()


@pytest.fixture(scope="module")
def wheel():
    if FLEET_REASON:
        pytest.skip(FLEET_REASON)
    from vlab.fleet.dist import controller_wheel

    return controller_wheel()


def _env(fleet) -> dict[str, str]:
    return {**os.environ, **fleet.env}


def _events(path: str) -> list[dict]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    return out


def _fleet_cmd(fleet, *args: str) -> list[str]:
    return [PY, "-m", "vlab", "fleet", "run", "-i", fleet.inventory, *args]


# ------------------------------------------------------------------ the fleet, end to end

@needs_fleet
def test_fleet_run_survives_a_dead_host_and_rerun_fetches_only_what_is_missing(
        fleet, wheel, tmp_path):
    from vlab import results
    from vlab.fleet.report import fleet_matrix, fleet_report

    out = str(tmp_path / "fleet")
    p = subprocess.Popen(_fleet_cmd(fleet, *RUN_ARGS, "--forks", "3", "-o", out, "--dist",
                                    wheel, "--timeout", "900"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env(fleet), start_new_session=True)
    killed_at = None
    try:
        # kill host3's sshd (and its sessions) once it has started `vlab run`
        deadline = time.monotonic() + 600
        events = os.path.join(out, "events.jsonl")
        while time.monotonic() < deadline and p.poll() is None:
            if any(e.get("event") == "start" and e.get("host") == "host3"
                   and e.get("task") == "vlab run" for e in _events(events)):
                fleet.hosts[2].kill()
                killed_at = time.monotonic()
                break
            time.sleep(0.2)
        stdout, stderr = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.wait(10)
    assert killed_at is not None, f"host3 never started `vlab run`: {stderr[-2000:]}"
    assert p.returncode == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    # progress per host
    for h in ("host1", "host2"):
        assert any(h in line and "vlab run: done" in line for line in stderr.splitlines()), \
            stderr[-3000:]
    man = json.load(open(os.path.join(out, "fleet.json")))
    assert man["schema"] == "vlab.fleet/1" and man["run_args"] == RUN_ARGS
    docs = {}
    for h in ("host1", "host2"):
        e = man["hosts"][h]
        assert e["status"] == "ok" and e["results"] == f"{h}.json", e
        docs[h] = results.read(os.path.join(out, f"{h}.json"))
        assert {r["experiment"] for r in docs[h]["rows"]} == {"exits.nop"}
        assert docs[h]["argv"][-2:] == ["-o", f"results/fleet-{man['stamp']}.json"]
        assert os.path.exists(os.path.join(out, f"{h}.doctor.json"))
        # each host ran its own install, not the source tree
        assert os.path.exists(os.path.join(fleet.hosts[int(h[-1]) - 1].home, "lib", "vlab",
                                           "vmm"))
    bad = man["hosts"]["host3"]
    assert bad["status"] == "error" and bad["results"] is None
    assert "vlab run" in bad["reason"] and ("unreachable" in bad["reason"]
                                            or "failed" in bad["reason"]), bad
    assert "\n" not in bad["reason"]
    table = {line.split()[0]: line for line in stdout.splitlines() if line.startswith("host")}
    assert "error" in table["host3"] and "ok" in table["host1"]
    assert not os.path.exists(os.path.join(out, "host3.json"))

    # the report: the dead host is an error row, the others are in the matrix
    m = fleet_matrix(out)
    assert m["baseline"] == "host1" and m["others"] == ["host2"] and "host3" in m["errors"]
    assert m["cases"] and all("host2" in c["cells"] for c in m["cases"])
    html_path = fleet_report(out)
    page = open(html_path).read()
    assert "Error rows" in page and html.escape(bad["reason"]) in page
    assert "Matrix" in page and "exits.nop" in page

    # `vlab compare` over the fetched files
    r = subprocess.run([PY, "-m", "vlab", "compare", os.path.join(out, "host1.json"),
                        os.path.join(out, "host2.json"), os.path.join(out, "host1.json"),
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["comparisons"]) == 2

    # rerun: host3 is back; host2's local file was lost (its results are still on the host)
    before = {h: os.stat(os.path.join(out, f"{h}.json")).st_mtime_ns for h in ("host1",)}
    run_id2 = docs["host2"]["run_id"]
    os.unlink(os.path.join(out, "host2.json"))
    n_events = len(_events(os.path.join(out, "events.jsonl")))
    fleet.hosts[2].start()
    r = subprocess.run(_fleet_cmd(fleet, "--resume", out, "--dist", wheel, "--timeout", "900"),
                       capture_output=True, text=True, env=_env(fleet), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.load(open(os.path.join(out, "fleet.json")))
    assert [run["hosts"] for run in man["runs"]] == [["host1", "host2", "host3"],
                                                     ["host2", "host3"]]
    assert all(e["status"] == "ok" for e in man["hosts"].values()), man["hosts"]
    assert os.stat(os.path.join(out, "host1.json")).st_mtime_ns == before["host1"]
    assert results.read(os.path.join(out, "host2.json"))["run_id"] == run_id2   # fetched only
    assert any("host2" in line and "vlab run: skipped" in line
               for line in r.stderr.splitlines()), r.stderr[-3000:]
    assert results.read(os.path.join(out, "host3.json"))["rows"]
    second = _events(os.path.join(out, "events.jsonl"))[n_events:]
    assert {e["host"] for e in second if "host" in e} == {"host2", "host3"}

    # nothing missing: no host is contacted
    r = subprocess.run(_fleet_cmd(fleet, "--resume", out), capture_output=True, text=True,
                       env=_env(fleet), timeout=300)
    assert r.returncode == 0, r.stderr
    assert "3 already have results" in r.stderr
    assert len(json.load(open(os.path.join(out, "fleet.json")))["runs"]) == 2


@needs_fleet
def test_fleet_bad_input_is_one_line(fleet, tmp_path):
    cases = [
        (_fleet_cmd(fleet, "no.such.experiment", "-o", str(tmp_path / "a")), "no.such"),
        ([PY, "-m", "vlab", "fleet", "run", "-i", str(tmp_path / "missing.ini")], "inventory"),
        ([PY, "-m", "vlab", "fleet", "report", str(tmp_path)], "fleet.json"),
        (_fleet_cmd(fleet, "exits.nop", "--forks", "0"), "--forks"),
    ]
    for argv, word in cases:
        r = subprocess.run(argv, capture_output=True, text=True, env=_env(fleet), timeout=300)
        assert r.returncode == 2, (argv, r.stderr)
        assert word in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# ------------------------------------------------------------------ cross-host migration

def _ensure_installed(fleet, wheel, host) -> None:
    """The host's own vlab install (what the role does), when the fleet test has not run."""
    lib = os.path.join(host.home, "lib")
    if not os.path.isdir(os.path.join(lib, "vlab")):
        subprocess.run([PY, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                        "--target", lib, wheel], check=True, timeout=600)


def _remote(fleet, host, argv: list[str]) -> list[str]:
    """A vlab command run on `host` over SSH, from its own install directory."""
    import shlex

    cmd = (f"cd {shlex.quote(host.home)} && PYTHONPATH={shlex.quote(host.home + '/lib')} "
           f"exec {shlex.quote(PY)} -m vlab " + " ".join(shlex.quote(a) for a in argv))
    return fleet.ssh_argv(host) + [cmd]


def _key(host, name: str, key: str | None = None) -> str:
    from vlab.migration.auth import new_key_file

    path = os.path.join(host.home, name)
    if key is None:
        new_key_file(path)
    else:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key)
    return path


def _migrate(fleet, src, dst, src_args: list[str], dst_args: list[str]):
    """Destination on `dst` listening on its own address, source on `src`; both over SSH.
    Returns (source result, destination process output)."""
    d = subprocess.Popen(_remote(fleet, dst, ["migrate", "--listen", f"{dst.addr}:0", "--json",
                                              "--accept-timeout", "120", "--run-after", "0.2",
                                              *dst_args]),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    try:
        from vlab.migration.session import _read_line

        line = _read_line(d, 120)
        assert line.startswith("LISTENING "), (line, d.poll())
        addr = line.split()[1]
        assert addr.startswith(dst.addr + ":")
        s = subprocess.run(_remote(fleet, src, ["migrate", "--to", addr, "--mem", "2M",
                                                "--rate", "5000", "--warmup-s", "0.1",
                                                "--json", *src_args]),
                           capture_output=True, text=True, timeout=300,
                           stdin=subprocess.DEVNULL)
        d_out, d_err = d.communicate(timeout=120)
    finally:
        if d.poll() is None:
            d.kill()
            d.wait(10)
    from vlab.migration.session import _last_json

    return s, (d.returncode, _last_json(d_out), d_err)


@needs_fleet
def test_fleet_migrate_between_hosts_with_authentication(fleet, wheel):
    from vlab import results

    h1, h2 = fleet.hosts[0], fleet.hosts[1]
    if h2.proc is None or h2.proc.poll() is not None:
        h2.start()
    for h in (h1, h2):
        _ensure_installed(fleet, wheel, h)
    shared = "fleet-test-migration-key-" + os.urandom(8).hex() + "\n"
    k1, k2 = _key(h1, "migrate.key", shared), _key(h2, "migrate.key", shared)
    out = os.path.join(h1.home, "results", "migrate.json")
    s, (dcode, dst, derr) = _migrate(fleet, h1, h2, ["--psk-file", k1, "-o", out],
                                     ["--psk-file", k2])
    assert s.returncode == 0, s.stderr[-2000:]
    res = json.loads(s.stdout.strip().splitlines()[-1])
    assert res["verified"] is True and res["auth"]["authenticated"] is True
    assert dcode == 0 and dst["status"] == "ok" and dst["auth"]["authenticated"] is True
    assert dst["peer"].startswith("127.")
    doc = results.read(out)                          # the results file, with both hosts
    assert doc["host"]["host_id"] and doc["destination_host"]["host_id"]
    assert doc["migration"]["auth"]["authenticated"] is True
    assert {r["metric"] for r in doc["rows"]} >= {"total_ms", "downtime_ms", "verified"}
    assert [r["median"] for r in doc["rows"] if r["metric"] == "verified"] == [1.0]

    # a source without the key, and one with another key: refused, one line, no VM
    other = _key(h1, "other.key")
    for src_args, why in (([], "holds no migration key"), (["--psk-file", other], "wrong key")):
        s, (dcode, dst, derr) = _migrate(fleet, h1, h2, src_args + ["--no-results"],
                                         ["--psk-file", k2])
        assert s.returncode == 1
        err = s.stderr.strip().splitlines()
        assert len(err) == 1 and why in err[0] and "Traceback" not in s.stderr, s.stderr
        assert dcode == 1 and dst["status"] == "refused", dst
        assert dst["vm_created"] is False and dst["guest_resumed"] is False
        assert dst["vcpu_runs"] == 0 and "pages_received" not in dst
        assert len(derr.strip().splitlines()) == 1 and "Traceback" not in derr


# ------------------------------------------------------------------ the handshake itself

def _pair(src_key, dst_key, *, forge: bool = False):
    from vlab.migration import auth

    a, b = socket.socketpair()
    out: dict = {}

    def dst():
        try:
            out["dst"] = auth.authenticate_destination(b, dst_key, host_record=lambda: {"x": 1},
                                                       timeout=10)
        except auth.AuthError as e:
            out["dst_err"] = str(e)

    t = threading.Thread(target=dst)
    t.start()
    try:
        if forge:
            # a source that neither checks the destination nor holds the key
            a.sendall(json.dumps({"auth": auth.METHOD, "nonce": "00" * 32}).encode() + b"\n")
            auth._recv(a, time.monotonic() + 10, "destination")
            a.sendall(json.dumps({"mac": "00" * 32}).encode() + b"\n")
            try:
                auth._recv(a, time.monotonic() + 10, "destination")
            except auth.AuthError as e:
                out["src_err"] = str(e)
        else:
            out["src"] = auth.authenticate_source(a, src_key, timeout=10)
    except auth.AuthError as e:
        out["src_err"] = str(e)
    t.join(20)
    a.close()
    b.close()
    return out


def test_fleet_migration_handshake():
    k, other = b"k" * 32, b"o" * 32
    ok = _pair(k, k)
    assert ok["src"]["authenticated"] and ok["dst"]["authenticated"]
    assert ok["src"]["peer_host"] == {"x": 1}
    plain = _pair(None, None)
    assert plain["src"]["authenticated"] is False and plain["dst"]["authenticated"] is False
    wrong = _pair(other, k)
    assert "wrong key" in wrong["src_err"] and "refused" in wrong["dst_err"]
    forged = _pair(None, k, forge=True)
    assert "wrong key" in forged["dst_err"] and "refused" in forged["src_err"]
    nokey = _pair(None, k)
    assert "no migration key" in nokey["src_err"] and "no migration key" in nokey["dst_err"]
    nokey_dst = _pair(k, None)
    assert "has no migration key" in nokey_dst["src_err"]


def test_fleet_migration_key_file_checks(tmp_path):
    from vlab._errors import UsageError
    from vlab.migration.auth import is_loopback, load_key, new_key_file

    good = new_key_file(str(tmp_path / "k"))
    assert len(load_key(good)) >= 16
    os.chmod(good, 0o644)
    with pytest.raises(UsageError, match="readable by other users"):
        load_key(good)
    short = tmp_path / "short"
    short.write_text("abc")
    os.chmod(short, 0o600)
    with pytest.raises(UsageError, match="at least 16"):
        load_key(str(short))
    with pytest.raises(UsageError, match="No such file"):
        load_key(str(tmp_path / "none"))
    assert is_loopback("127.0.0.3") and is_loopback("::1") and not is_loopback("10.0.0.1")
    r = subprocess.run([PY, "-m", "vlab", "migrate", "--listen", "0.0.0.0:0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--psk-file" in r.stderr and "Traceback" not in r.stderr


def test_fleet_refused_source_never_gets_a_vm(tmp_path, monkeypatch):
    """The destination's refusal happens before any Destination (and so any VM) exists."""
    from vlab.migration import session

    made = []
    monkeypatch.setattr(session, "Destination",
                        lambda *a, **k: made.append(1) or pytest.fail("Destination created"))
    addr: list[str] = []
    out: dict = {}
    ready = threading.Event()

    def announce(a: str) -> None:
        addr.append(a)
        ready.set()

    t = threading.Thread(target=lambda: out.update(session.listen(
        "127.0.0.1:0", accept_timeout=30, io_timeout=10, announce=announce,
        psk=b"s" * 32)))
    t.start()
    assert ready.wait(30)
    host, port = addr[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        from vlab.migration import stream as ms

        # a plain stream: HELLO straight away, as an old source would
        ms.Writer(sock).send_json(ms.HELLO, {"protocol": ms.VERSION})
        t.join(30)
    assert out["status"] == "refused" and out["vm_created"] is False and not made
    assert "no migration key" in out["reason"]
