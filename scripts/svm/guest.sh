#!/usr/bin/env bash
# The SVM lane inside the TCG guest (PID 1 after init.sh's switch_root). The host's / is the
# read-only root, <checkout>/build/svm the writable output share. Every step has a timeout and
# prints "svm-lane: ..." with the guest's uptime; the result goes to build/svm/status.
# Kernel command line: vlab.checkout=<path>, optional vlab.steps=<comma list> (default: all).
set -uo pipefail
# Everything runs from main(), so bash has read the whole file before it starts: an edit of
# the checkout during a run cannot change what this run executes.
main() {
    checkout= steps=all
    for word in $(cat /proc/cmdline); do
        case "$word" in
            vlab.checkout=*) checkout=${word#vlab.checkout=} ;;
            vlab.steps=*) steps=${word#vlab.steps=} ;;
        esac
    done
    out=$checkout/build/svm
    export HOME=/tmp/home XDG_CACHE_HOME=/tmp/cache PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8
    export PATH=$checkout/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    export MPLCONFIGDIR=/tmp/mpl NUMBA_CACHE_DIR=/tmp/numba TERM=dumb
    mkdir -p "$HOME" "$XDG_CACHE_HOME"
    cd "$checkout" || exit 1
    failed=()

    say() { echo "svm-lane: [$(cut -d' ' -f1 /proc/uptime) s] $*"; }
    want() { [ "$steps" = all ] || [[ ",$steps," == *",$1,"* ]]; }
    # step NAME TIMEOUT_S CMD...: run CMD bounded by TIMEOUT_S; a failure is recorded, not fatal,
    # so later steps still run and the status lists every failed step.
    step() {
        local name=$1 limit=$2; shift 2
        want "$name" || return 0
        say "step $name: start (timeout ${limit}s)"
        local t0 rc
        t0=$(date +%s)
        timeout -k 10 "$limit" "$@"
        rc=$?
        if [ $rc -eq 0 ]; then
            say "step $name: ok in $(( $(date +%s) - t0 ))s"
        else
            [ $rc -eq 124 ] && say "step $name: TIMED OUT after ${limit}s"
            say "step $name: FAILED (exit $rc) after $(( $(date +%s) - t0 ))s"
            failed+=("$name")
        fi
        return $rc
    }
    finish() {
        if [ ${#failed[@]} -eq 0 ]; then echo ok > "$out/status"; else echo "failed: ${failed[*]}" > "$out/status"; fi
        say "done: $(cat "$out/status")"
        sync
        echo o > /proc/sysrq-trigger
        sleep 30
    }

    say "guest $(uname -r), $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)"
    step modprobe 300 modprobe kvm_amd || { finish; exit 1; }
    say "kvm_amd: npt=$(cat /sys/module/kvm_amd/parameters/npt) nested=$(cat /sys/module/kvm_amd/parameters/nested)"

    # The files vlab's host record reads to tell an emulated CPU (kept for the report and tests).
    probe() {
        local d=$out/probe
        mkdir -p "$d/proc" "$d/sys/class/dmi/id"
        cp /proc/cpuinfo "$d/proc/cpuinfo"
        for f in sys_vendor product_name product_version bios_vendor bios_version board_vendor \
                 chassis_vendor; do
            cat "/sys/class/dmi/id/$f" > "$d/sys/class/dmi/id/$f" 2>/dev/null || true
        done
        mkdir -p "$d/sys/devices/system/clocksource/clocksource0"
        cp /sys/devices/system/clocksource/clocksource0/available_clocksource \
            "$d/sys/devices/system/clocksource/clocksource0/" 2>/dev/null || true
        ls /sys/hypervisor > "$d/sys-hypervisor.txt" 2>&1 || true
        dmesg | grep -iE 'hypervisor|tcg|qemu|DMI:|clocksource' > "$d/dmesg-hypervisor.txt" || true
    }
    export -f probe
    export out
    step probe 60 bash -c probe

    # The kernel's own kvm_exit format: where the trace rows' reason names come from.
    step format 60 cp /sys/kernel/tracing/events/kvm/kvm_exit/format "$out/kvm_exit.format"

    step doctor 300 bash -c 'vlab doctor && vlab doctor --json > "$1/doctor.json"' _ "$out"

    # The real-KVM tests whose outcome depends on the KVM flavor (marker svm_lane). Only the files
    # that hold them are collected: importing the whole suite under TCG costs a minute.
    step pytest 900 bash -c 'python -m pytest -p no:cacheprovider -m svm_lane -q -ra \
        $(grep -l "mark.svm_lane" tests/test_*.py) \
        > "$1/pytest.log" 2>&1; rc=$?; tail -n 15 "$1/pytest.log"; exit $rc' _ "$out"

    step run-npt1 1800 vlab run --suite svm --trace -o "$out/npt1.json"

    step npt0 300 bash -c 'vlab host set kvm_amd.npt=0 && vlab doctor | grep -E "^(kvm|OK|WARN|MISSING) +(kvm|paging)"'
    if want npt0 && [ "$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null)" != N ]; then
        say "kvm_amd.npt is $(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null) after vlab host set"
        failed+=(npt0-param)
    fi
    step run-npt0 1200 vlab run --suite svm-paging --trace -o "$out/npt0.json"

    # Developer hook, never part of the lane: vlab.steps=...,debug runs build/svm/debug.sh.
    if [ "$steps" != all ] && want debug && [ -f "$out/debug.sh" ]; then
        step debug 1200 bash "$out/debug.sh"
    fi
    step compare 300 bash -c 'vlab compare "$1/npt1.json" "$1/npt0.json" --md > "$1/compare.md"' _ "$out"
    finish
}

main "$@"
