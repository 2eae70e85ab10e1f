#!/usr/bin/env bash
# make test-svm: boot an AMD SVM/NPT KVM host emulated by QEMU's TCG, with this checkout and its
# .venv visible through a read-only 9p share of /, and run the lane (scripts/svm/guest.sh) in it.
# Outputs (fixed paths): build/svm/{doctor.json,npt1.json,npt0.json,compare.md,pytest.log},
# the guest console in build/svm/console.log, the guest's verdict in build/svm/status.
# A host that cannot run the lane (not root and packages missing, no KVM-less QEMU) is a SKIP:
# one line naming the reason, exit 0. Ctrl-C stops the lane and QEMU.
# Environment: SVM_BOOT_TIMEOUT (s, whole guest run, default 2400), SVM_STEPS (guest steps),
# SVM_QEMU (the QEMU binary, default qemu-system-x86_64).
set -euo pipefail
# Everything runs from main(), so bash has read the whole file before it starts: an edit of
# the checkout during a run cannot change what this run executes.
main() {
    cd "$(dirname "$0")/../.."
    checkout=$(pwd)
    out=$checkout/build/svm
    t0=$(date +%s)
    phase() { echo "svm-lane: [+$(( $(date +%s) - t0 ))s] $*"; }

    errlog=$(mktemp)
    if ! bash scripts/svm/install.sh 2>"$errlog"; then
        reason=$(sed -n 's/^SKIP: //p' "$errlog" | tail -n1)
        rm -f "$errlog"
        echo "make test-svm: SKIP: ${reason:-packages for the lane cannot be installed}"
        exit 0
    fi
    cat "$errlog" >&2
    rm -f "$errlog"
    [ -x .venv/bin/vlab ] || { echo "make test-svm: .venv/bin/vlab missing (run make install)" >&2; exit 1; }

    release=$(dpkg-query -W -f='${Depends}' linux-headers-amd64 | tr ',' '\n' \
        | sed -n 's/^ *linux-headers-\([^ ]*\).*/\1/p' | head -n1)
    kernel=/boot/vmlinuz-$release
    qemu=${SVM_QEMU:-qemu-system-x86_64}
    phase "install checked: $("$qemu" --version | head -n1), kernel $release"

    mkdir -p "$out"
    rm -f "$out"/{doctor.json,npt1.json,npt0.json,compare.md,pytest.log,console.log,status}
    bash scripts/svm/initramfs.sh "$release" "$out/initramfs.cpio.gz"
    phase "initramfs built: $out/initramfs.cpio.gz"

    # The guest's own kvm_amd reads /lib/modules/$release through the root share: make sure the
    # module index is there (depmod runs when the image is installed; this is the cheap check).
    [ -s "/lib/modules/$release/modules.dep" ] || depmod "$release"

    limit=${SVM_BOOT_TIMEOUT:-2400}
    append="console=ttyS0 panic=-1 loglevel=4 vlab.checkout=$checkout"
    [ -n "${SVM_STEPS:-}" ] && append+=" vlab.steps=$SVM_STEPS"
    # No -nic/-netdev and -nodefaults: the guest has no network.
    timeout -k 15 "$limit" "$qemu" \
        -accel tcg,thread=multi -machine q35 -cpu max,+svm,+npt,+vgif -smp 2 -m 4G \
        -nodefaults -no-reboot -display none -serial stdio -monitor none \
        -kernel "$kernel" -initrd "$out/initramfs.cpio.gz" -append "$append" \
        -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
        -virtfs "local,path=$out,mount_tag=out,security_model=none,multidevs=remap" \
        </dev/null >"$out/console.log" 2>&1 &
    qpid=$!
    stop() { kill -TERM "$qpid" 2>/dev/null || true; wait "$qpid" 2>/dev/null || true;
             echo "svm-lane: interrupted; QEMU stopped (console: $out/console.log)" >&2; exit 130; }
    trap stop INT TERM
    phase "QEMU started (pid $qpid, timeout ${limit}s); console: $out/console.log"
    tail -n +1 -F --pid="$qpid" "$out/console.log" 2>/dev/null \
        | grep --line-buffered -E '^(svm-lane|svm-init):|^\[ *[0-9]+/[0-9]+\]|^(run|results):|Kernel panic|BUG:|assertion' &
    rc=0
    wait "$qpid" || rc=$?
    trap - INT TERM
    sleep 1
    [ $rc -eq 124 ] && phase "QEMU TIMED OUT after ${limit}s"
    phase "QEMU exited ($rc)"

    status=$(cat "$out/status" 2>/dev/null || echo "no status (the guest did not finish)")
    if [ "$status" != ok ] || [ $rc -ne 0 ]; then
        echo "make test-svm: FAILED: $status; QEMU exit $rc; console kept in $out/console.log" >&2
        exit 1
    fi
    if [ -z "${SVM_STEPS:-}" ]; then
        .venv/bin/python scripts/svm/check.py "$out" || {
            echo "make test-svm: FAILED: outputs do not meet the contract; console kept in $out/console.log" >&2
            exit 1; }
    fi
    phase "passed"
}

main "$@"
