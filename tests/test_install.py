"""`pip install .` (not editable) from the tracked sources gives a vlab that imports and runs a guest."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from conftest import KVM_REASON

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        pytest.skip("not a git checkout: cannot tell which files a clean clone has")
    return [f for f in out.stdout.splitlines() if os.path.isfile(os.path.join(ROOT, f))]


@pytest.mark.slow
def test_pip_install_non_editable_imports_and_runs(tmp_path):
    src = tmp_path / "src"
    for rel in _source_files():
        dst = src / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), dst)
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                           "--target", str(target), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = ("import vlab, sys; assert vlab.__file__.startswith(sys.argv[1]), vlab.__file__;"
            "from vlab.vmm.payloads import payload_names; assert 'micro' in payload_names();")
    if not KVM_REASON:
        code += ("from vlab import Machine; from vlab.vmm.payloads import MICRO_OPS as O;"
                 "m = Machine(); s = m.vm.add_pio_sink(0x80); m.set_args(O['out'], 7, 1, 0x80);"
                 "m.run_to_done(); assert s.hits == 7; m.close(); print('ran')")
    env = dict(os.environ, PYTHONPATH=str(target))
    proc = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True,
                          text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if not KVM_REASON:
        assert "ran" in proc.stdout
