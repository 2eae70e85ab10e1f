#!/usr/bin/env bash
# Install the Debian packages vlab uses, only when they are missing and only as root.
# Without root, the features that need them (bcc tracing, browser tests) skip with a reason.
set -u
want=()
dpkg -s python3-bpfcc >/dev/null 2>&1 || want+=(python3-bpfcc)
dpkg -s linux-headers-amd64 >/dev/null 2>&1 || want+=(linux-headers-amd64)
dpkg -s chromium >/dev/null 2>&1 || want+=(chromium)
# sshd for the fleet tests' loopback hosts (tests/fleet_hosts.py starts its own instances)
dpkg -s openssh-server >/dev/null 2>&1 || want+=(openssh-server)
[ ${#want[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "vlab setup: not root; not installing ${want[*]} (tracing/browser/fleet tests will skip)" >&2
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "vlab setup: no apt-get; not installing ${want[*]} (tracing/browser/fleet tests will skip)" >&2
    exit 0
fi
echo "vlab setup: installing ${want[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
# no package may start a daemon here (openssh-server would listen on port 22): the tests start
# their own sshd instances on loopback
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
fi
if ! apt-get install -y -qq --no-install-recommends "${want[@]}" >/tmp/vlab-apt.log 2>&1; then
    echo "vlab setup: apt-get install ${want[*]} failed (see /tmp/vlab-apt.log); dependent tests will skip" >&2
fi
[ "$own_policy" = 1 ] && rm -f "$policy"
exit 0
