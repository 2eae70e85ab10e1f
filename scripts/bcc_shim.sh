#!/usr/bin/env bash
# Expose Debian's bcc package (python3-bpfcc) to the venv without exposing the rest of
# /usr/lib/python3/dist-packages: a directory holding only a `bcc` symlink, added by a .pth file.
set -u
venv=${1:-.venv}
src=/usr/lib/python3/dist-packages/bcc
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
shim="$(cd "$venv" && pwd)/bcc-shim"
if [ -d "$src" ]; then
    mkdir -p "$shim"
    ln -sfn "$src" "$shim/bcc"
    echo "$shim" > "$site/vlab_bcc.pth"
else
    rm -f "$site/vlab_bcc.pth"
fi
exit 0
