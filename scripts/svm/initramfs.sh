#!/usr/bin/env bash
# Build the SVM lane's initramfs: static busybox, the virtio/9p modules of kernel RELEASE (with
# their dependencies, in load order, decompressed for busybox insmod) and scripts/svm/init.sh.
# Usage: initramfs.sh RELEASE OUTPUT.cpio.gz
set -euo pipefail
release=${1:?usage: initramfs.sh RELEASE OUTPUT}
out=${2:?usage: initramfs.sh RELEASE OUTPUT}
here=$(cd "$(dirname "$0")" && pwd)
busybox=$(command -v busybox) || { echo "initramfs: busybox not found" >&2; exit 1; }
linkage=$(ldd "$busybox" 2>&1 || true)
if [[ "$linkage" != *"not a dynamic"* ]]; then
    echo "initramfs: $busybox is not static (install busybox-static)" >&2; exit 1
fi
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,dev,proc,sys,modules,newroot}
cp "$busybox" "$stage/bin/busybox"
install -m 0755 "$here/init.sh" "$stage/init"
: > "$stage/modules/order"
for m in virtio_pci 9pnet_virtio 9p; do
    modprobe -S "$release" --show-depends "$m"
done | awk '$1 == "insmod" {print $2}' | awk '!seen[$0]++' | while read -r ko; do
    name=$(basename "$ko")
    case "$name" in
        *.ko.xz) xz -dc "$ko" > "$stage/modules/${name%.xz}"; name=${name%.xz} ;;
        *.ko.zst) zstd -qdc "$ko" > "$stage/modules/${name%.zst}"; name=${name%.zst} ;;
        *.ko.gz) gzip -dc "$ko" > "$stage/modules/${name%.gz}"; name=${name%.gz} ;;
        *) cp "$ko" "$stage/modules/$name" ;;
    esac
    echo "$name" >> "$stage/modules/order"
done
[ -s "$stage/modules/order" ] || { echo "initramfs: no modules found for $release" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
(cd "$stage" && find . | cpio -o -H newc --quiet) | gzip -1 > "$out.tmp"
mv "$out.tmp" "$out"
