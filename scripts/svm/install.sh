#!/usr/bin/env bash
# What the SVM/NPT lane needs on the host, installed when missing and only as root:
# QEMU >= 8 from bookworm-backports (bookworm's 7.2 aborts in tcg_handle_interrupt when an SVM
# guest writes CR8 with virtual interrupt masking), the Debian kernel whose headers bcc uses,
# busybox-static for the initramfs, kmod and cpio to assemble it.
# Idempotent: when everything is present it only checks and exits 0.
# Exit 0: ready. Exit 3: cannot install (not root, no apt-get, install failed); the reason is
# printed on stderr as one line starting with "SKIP:".
set -euo pipefail

SOURCES=/etc/apt/sources.list.d/vlab-backports.sources
QEMU=${SVM_QEMU:-qemu-system-x86_64}   # another binary for tests of the skip path
QEMU_MIN_MAJOR=8

skip() { echo "SKIP: $*" >&2; exit 3; }

qemu_ok() {
    command -v "$QEMU" >/dev/null 2>&1 || return 1
    local major
    major=$("$QEMU" --version | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p')
    [ -n "$major" ] && [ "$major" -ge "$QEMU_MIN_MAJOR" ]
}

# The kernel release the guest boots: the one linux-headers-amd64 (installed by
# scripts/sysdeps.sh for bcc) points at, so bcc inside the guest finds matching headers.
headers_release() {
    dpkg-query -W -f='${Depends}' linux-headers-amd64 2>/dev/null \
        | tr ',' '\n' | sed -n 's/^ *linux-headers-\([^ ]*\).*/\1/p' | head -n1
}

want=()
qemu_ok || want+=(qemu)
command -v busybox >/dev/null 2>&1 && busybox --list 2>/dev/null | grep -qx switch_root \
    && dpkg -s busybox-static >/dev/null 2>&1 || want+=(busybox-static)
command -v modprobe >/dev/null 2>&1 || want+=(kmod)
command -v cpio >/dev/null 2>&1 || want+=(cpio)
release=$(headers_release || true)
if [ -z "$release" ]; then
    want+=(linux-headers-amd64)
elif [ ! -r "/boot/vmlinuz-$release" ]; then
    want+=("linux-image-$release")
fi

[ ${#want[@]} -eq 0 ] && exit 0
[ "$(id -u)" = 0 ] || skip "not root and missing: ${want[*]}"
command -v apt-get >/dev/null 2>&1 || skip "no apt-get and missing: ${want[*]}"

export DEBIAN_FRONTEND=noninteractive
log=/tmp/vlab-svm-apt.log
echo "svm lane: installing ${want[*]} (log $log)" >&2
if [ ! -f "$SOURCES" ]; then
    cat > "$SOURCES" <<'SRC'
# Written by vlab scripts/svm/install.sh: QEMU for the SVM/NPT lane comes from backports.
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
timeout 600 apt-get update >"$log" 2>&1 || skip "apt-get update failed (see $log)"
pkgs=()
for w in "${want[@]}"; do
    case "$w" in
        qemu) pkgs+=(qemu-system-x86/bookworm-backports) ;;
        *) pkgs+=("$w") ;;
    esac
done
timeout 1200 apt-get install -y --no-install-recommends "${pkgs[@]}" >>"$log" 2>&1 \
    || skip "apt-get install ${pkgs[*]} failed (see $log)"
# A fresh linux-headers-amd64 may name a release whose image is not installed yet.
release=$(headers_release || true)
if [ -n "$release" ] && [ ! -r "/boot/vmlinuz-$release" ]; then
    timeout 1200 apt-get install -y --no-install-recommends "linux-image-$release" >>"$log" 2>&1 \
        || skip "apt-get install linux-image-$release failed (see $log)"
fi
qemu_ok || skip "$QEMU >= $QEMU_MIN_MAJOR still missing after install (see $log)"
exit 0
