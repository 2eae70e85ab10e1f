#!/bin/busybox sh
# PID 1 of the SVM lane's initramfs (busybox sh). Loads virtio/9p, mounts the host's / read-only
# over 9p as the new root, puts tmpfs where a running system writes, mounts the writable output
# share over <checkout>/build/svm, and switch_roots into scripts/svm/guest.sh of the checkout.
# Parameters come from the kernel command line: vlab.checkout=<path> vlab.release=<uname -r>.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "svm-init: $*" > /dev/console; }
fail() { say "FATAL: $*"; poweroff -f; sleep 10; }

checkout=
for word in $(cat /proc/cmdline); do
    case "$word" in vlab.checkout=*) checkout=${word#vlab.checkout=} ;; esac
done
[ -n "$checkout" ] || fail "no vlab.checkout= on the kernel command line"

while read -r mod; do
    insmod "/modules/$mod" || fail "insmod $mod failed"
done < /modules/order

mkdir -p /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576,cache=loose,ro hostroot /newroot \
    || fail "cannot mount the host root share"
# The checkout may live under a directory the tmpfs mounts below hide (/tmp, /run, /var/tmp):
# hold it on a bind mount first and put it back on top of the tmpfs afterwards.
mkdir -p /checkout
mount --bind "/newroot$checkout" /checkout || fail "no $checkout in the host root share"
for d in tmp run var/tmp; do
    mount -t tmpfs -o mode=1777 tmpfs "/newroot/$d" || fail "tmpfs on /$d"
done
if [ ! -d "/newroot$checkout/scripts/svm" ]; then
    mkdir -p "/newroot$checkout"
    mount --move /checkout "/newroot$checkout" || fail "cannot put $checkout back"
fi
mount --move /dev /newroot/dev || fail "move /dev"
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o gid=5,mode=620 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
ln -sf /proc/self/fd /newroot/dev/fd
ln -sf /proc/self/fd/0 /newroot/dev/stdin
ln -sf /proc/self/fd/1 /newroot/dev/stdout
ln -sf /proc/self/fd/2 /newroot/dev/stderr
mount -t tracefs tracefs /newroot/sys/kernel/tracing 2>/dev/null || true
mount -t debugfs debugfs /newroot/sys/kernel/debug 2>/dev/null || true
mount -t 9p -o trans=virtio,version=9p2000.L,msize=1048576 out "/newroot$checkout/build/svm" \
    || fail "cannot mount the output share on $checkout/build/svm"
say "root ready after $(cut -d' ' -f1 /newroot/proc/uptime) s; starting $checkout/scripts/svm/guest.sh"
exec switch_root /newroot /bin/bash "$checkout/scripts/svm/guest.sh"
