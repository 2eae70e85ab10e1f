"""Check the SVM lane's outputs against its contract (run by scripts/svm/lane.sh on the host).

build/svm/doctor.json, npt1.json and npt0.json must say flavor svm and an emulated CPU, paging
npt then shadow; the traced cases must name their exits with SVM reason names taken from the
kernel's own kvm_exit format (build/svm/kvm_exit.format, copied inside the guest); compare.md
and pytest.log must exist. Prints one line per check; exit 1 when any fails.

Usage: python scripts/svm/check.py BUILD_SVM_DIR
"""
from __future__ import annotations

import json
import os
import sys

from vlab.trace import select_table, symbolic_tables

# SVM exit codes (AMD APM vol. 2, appendix C). Only the codes are written here: the names the
# trace rows must carry are looked up in the kernel's format file.
SVM_CODES = {"write_cr3": 0x013, "pf_excp": 0x04E, "cpuid": 0x072, "hlt": 0x078,
             "invlpg": 0x079, "io": 0x07B, "msr": 0x07C, "vmmcall": 0x081, "npf": 0x400}

# (results file, case label prefix, exit code the case must show in its trace rows)
EXPECTED_EXITS = [
    ("npt1.json", "exits.cpuid", "cpuid"),
    ("npt1.json", "exits.pio_user", "io"),
    ("npt1.json", "exits.hypercall", "vmmcall"),
    ("npt1.json", "exits.hlt", "hlt"),
    ("npt1.json", "exits.msr_user", "msr"),
    ("npt1.json", "exits.mmio_user", "npf"),
    ("npt1.json", "exits.ipi_self", "npf"),          # xAPIC ICR write: no AVIC, page unmapped
    ("npt1.json", "exits.tsc_deadline", "msr"),      # IA32_TSC_DEADLINE, x2APIC EOI
    ("npt1.json", "exits.ipi_other", "hlt"),         # the halted target's hlt
    ("npt0.json", "exits.cpuid", "cpuid"),
    ("npt0.json", "exits.mmio_user", "pf_excp"),     # shadow paging: a #PF intercept, not npf
]

# Cases that are skips under shadow paging on a TCG host, with the reason vlab gives.
SHADOW_SKIPS = ("exits.cr3_write", "exits.invlpg", "paging.random_read", "paging.first_touch")


def svm_names(format_text: str) -> dict[int, str]:
    """exit code -> name from the kvm_exit format's SVM table (isa 2)."""
    rec = {"isa": 2, "exit_reason": 0}
    table = select_table(symbolic_tables(format_text, "exit_reason"), rec)
    if table is None:
        raise SystemExit("check: no SVM exit_reason table in the kvm_exit format")
    return dict(table.entries)


def trace_reasons(doc: dict) -> dict[str, set[str]]:
    """case label -> exit reason names in its trace.exits rows (flags such as +FAILED dropped)."""
    out: dict[str, set[str]] = {}
    for r in doc["rows"]:
        if r["experiment"] == "trace.exits" and r["status"] == "ok":
            reason = str(r["params"].get("reason", ""))
            if reason.startswith("exit:"):
                out.setdefault(str(r["params"].get("of", "")), set()).add(
                    reason[len("exit:"):].split("+")[0])
    return out


def main(outdir: str) -> int:
    failures: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"check: {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failures.append(what)

    def load(name: str) -> dict:
        with open(os.path.join(outdir, name), encoding="utf-8") as f:
            return json.load(f)

    docs: dict[str, dict] = {}
    for name, paging in (("doctor.json", "npt"), ("npt1.json", "npt"), ("npt0.json", "shadow")):
        try:
            doc = load(name)
        except (OSError, ValueError) as e:
            check(False, f"{name} readable ({e})")
            continue
        docs[name] = doc
        host = doc.get("host", doc)
        check(host.get("kvm", {}).get("flavor") == "svm", f"{name}: flavor svm "
              f"(got {host.get('kvm', {}).get('flavor')})")
        check(host.get("paging") == paging, f"{name}: paging {paging} (got {host.get('paging')})")
        check(bool((host.get("emulation") or {}).get("emulated")),
              f"{name}: host record says the CPU is emulated ({host.get('emulation')})")
        if name != "doctor.json":
            bad = [(r["experiment"], r["params"], r.get("reason")) for r in doc["rows"]
                   if r["status"] == "error"]
            check(not bad, f"{name}: no error rows {bad[:3]}")

    try:
        with open(os.path.join(outdir, "kvm_exit.format"), encoding="utf-8") as f:
            names = svm_names(f.read())
    except OSError as e:
        check(False, f"kvm_exit.format readable ({e})")
        names = {}
    known = set(names.values())
    for fname in ("npt1.json", "npt0.json"):
        if fname not in docs:
            continue
        reasons = trace_reasons(docs[fname])
        check(bool(reasons), f"{fname}: trace rows present ({len(reasons)} traced cases)")
        unknown = {n for rs in reasons.values() for n in rs
                   if n not in known and not n.startswith("0x")}
        check(not unknown, f"{fname}: every exit reason is an SVM name from the kernel's "
                           f"format (unknown: {sorted(unknown)})")
    for fname, prefix, code_name in EXPECTED_EXITS:
        if fname not in docs or not names:
            continue
        want = names.get(SVM_CODES[code_name])
        seen = set().union(*[rs for of, rs in trace_reasons(docs[fname]).items()
                             if of.startswith(prefix + " ") or of == prefix])
        check(want is not None and want in seen,
              f"{fname}: {prefix} traced exit {want!r} (code {SVM_CODES[code_name]:#x})")

    if "npt1.json" in docs:
        # every exit count on SVM/NPT fits its expectation (experiments/_expect.py), and every
        # interrupt operation was delivered exactly once (the guest handler's count)
        off = [(r["experiment"], r["params"], r["mean"]) for r in docs["npt1.json"]["rows"]
               if r["metric"] == "exits_per_op" and r["status"] == "ok"
               and any(w.startswith("exits_per_op is") for w in r.get("warnings") or [])]
        check(not off, f"npt1.json: every exits_per_op fits its SVM expectation {off[:3]}")
        irq = [r for r in docs["npt1.json"]["rows"] if r["metric"] == "exits_per_op"
               and r["status"] == "ok" and "interrupts_per_op" in (r.get("extra") or {})]
        lost = [(r["experiment"], r["params"]) for r in irq
                if r["extra"]["interrupts_per_op"] != 1]
        check(bool(irq) and not lost,
              f"npt1.json: {len(irq)} interrupt rows, each one delivery per operation {lost[:3]}")
        inj = [r for r in docs["npt1.json"]["rows"] if r["experiment"] == "exits.irq_inject"
               and r["metric"] == "latency_ns" and r["status"] == "ok"]
        check(len(inj) == 1, f"npt1.json: exits.irq_inject measured ({len(inj)} rows)")

    if "npt0.json" in docs:
        for exp in SHADOW_SKIPS:
            rows = [r for r in docs["npt0.json"]["rows"] if r["experiment"] == exp]
            check(bool(rows) and all(r["status"] == "skip" and "triple fault" in r["reason"]
                                     for r in rows),
                  f"npt0.json: {exp} is a skip naming the TCG shadow-paging fault")

    for name in ("compare.md", "pytest.log"):
        path = os.path.join(outdir, name)
        check(os.path.isfile(path) and os.path.getsize(path) > 0, f"{name} written")
    if failures:
        print(f"check: {len(failures)} check(s) failed")
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: check.py BUILD_SVM_DIR", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
