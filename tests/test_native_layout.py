"""The C VMM's house rules, checked on its sources (native/vmm), and its one backing allocator.

- every public vlab_<object>_<verb> function lives in its object's file;
- files call each other one way only (no circle; vm.c calls vcpu.c, never the reverse), and
  vcpu.c touches struct vlab_vm in one place only (vlab_vcpu_create takes &vm->env);
- no "io area" comment fences: code sits in the file it belongs to;
- host memory with a backing (mmap of anonymous / hugetlb memory, memfd) is allocated in
  backing.c only, and both its users keep their checks and error messages.
"""
from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from conftest import needs_kvm

VMM = Path(__file__).resolve().parent.parent / "native" / "vmm"

# the object (longest prefix first) -> its file
OWNER = [
    ("vlab_vm_add_doorbell_wait", "doorbell.c"), ("vlab_vm_doorbell_", "doorbell.c"),
    ("vlab_vm_slot", "slot.c"), ("vlab_slot_", "slot.c"), ("vlab_vm_gpa_to_hva", "slot.c"),
    ("vlab_vm_as_", "layout.c"), ("vlab_vm_load_image", "layout.c"),
    ("vlab_vm_setup_tables", "layout.c"), ("vlab_vm_ptpool_", "layout.c"),
    ("vlab_vm_", "vm.c"), ("vlab_vcpu_", "vcpu.c"), ("vlab_kvm_", "kvm.c"),
    ("vlab_backing_", "backing.c"), ("vlab_mem_", "mem.c"), ("vlab_uffd_", "uffd.c"),
    ("vlab_task_", "task.c"), ("vlab_virtq_", "virtio.c"), ("vlab_vfio_", "vfio.c"),
    ("vlab_xfer_", "io.c"), ("vlab_ring_", "io.c"), ("vlab_copy_", "io.c"),
    ("vlab_paging_", "paging_native.c"), ("vlab_irq_", "irq.c"), ("vlab_host_", "hostbench.c"),
    # no object: the error record, clocks and exit-reason names every file uses
    ("vlab_", "error.c"),
]

_HEAD = re.compile(r"^[A-Za-z_][\w \*]*?\b(vlab_\w+)\s*\(")


def _sources() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(VMM.glob("*.c"))}


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _defined(text: str) -> set[str]:
    """Names of the non-static functions a file defines: a line at column 0 naming the function
    that opens its body or continues its parameters (a prototype ends with ';')."""
    names = set()
    for line in _strip_comments(text).splitlines():
        m = _HEAD.match(line)
        if m and not line.startswith("static") and ("{" in line or not line.rstrip().endswith(";")):
            names.add(m.group(1))
    return names


def test_every_function_lives_in_its_objects_file():
    wrong = []
    for name, text in _sources().items():
        for fn in _defined(text):
            owner = next(f for prefix, f in OWNER if fn.startswith(prefix))
            if owner != name:
                wrong.append(f"{fn} is in {name}, belongs in {owner}")
    assert not wrong, wrong


def _calls() -> dict[str, set[str]]:
    """File -> the other files whose functions it calls."""
    src = _sources()
    where = {fn: name for name, text in src.items() for fn in _defined(text)}
    edges: dict[str, set[str]] = {}
    for name, text in src.items():
        used = set(re.findall(r"\b(vlab_\w+)\s*\(", _strip_comments(text)))
        edges[name] = {where[fn] for fn in used if fn in where and where[fn] != name}
    return edges


def test_files_call_each_other_one_way_only():
    edges = _calls()
    assert "vcpu.c" in edges["vm.c"]            # the VM owns and drives its vCPUs
    assert "vm.c" not in edges["vcpu.c"]
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            assert state.get(nxt) != 1, "call circle: " + " -> ".join(path + [node, nxt])
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_vcpu_sees_its_vm_only_through_the_env():
    text = _strip_comments((VMM / "vcpu.c").read_text())
    assert re.findall(r"\bvm->\w+", text) == ["vm->env"]
    assert not re.search(r"->vm->|\bv->vm\b", text)


def test_no_io_area_fences():
    for p in sorted(VMM.glob("*.[ch]")):
        assert not re.search(r"-{2,}\s*(end\s+)?io area", p.read_text()), p.name
    assert "io area" not in (VMM / "internal.h").read_text()


def test_one_backing_allocator():
    for name, text in _sources().items():
        code = _strip_comments(text)
        for needle in ("MAP_HUGETLB", "memfd_create", "MADV_HUGEPAGE", "MADV_NOHUGEPAGE"):
            assert (needle in code) == (name == "backing.c"), (name, needle)
    for user in ("slot.c", "paging_native.c"):
        assert "vlab_backing_alloc(" in (VMM / user).read_text()


# ---- the allocator's behaviour, through both of its users ----

def _lib():
    from vlab.vmm._native import ffi, lib

    return ffi, lib


def _err(lib) -> tuple[str, int, str]:
    from vlab.vmm._native import ffi

    e = lib.vlab_last_error()
    return ffi.string(e.op).decode(), e.err, ffi.string(e.msg).decode()


@pytest.mark.parametrize("backing,page", [(0, 4096), (1, 2 << 20)])
def test_paging_memory_is_aligned_to_its_backing_page(backing, page):
    ffi, lib = _lib()
    m = ffi.new("struct vlab_paging_mem *")
    assert lib.vlab_paging_mem_alloc(m, 4 << 20, backing) == 0
    try:
        hva = int(ffi.cast("uintptr_t", m.hva))
        assert hva % page == 0 and m.size == 4 << 20 and m.backing == backing
        assert m.map_len == (4 << 20) + page     # over-allocated by one page to align
        buf = ffi.buffer(m.hva, 4 << 20)
        buf[0:8] = b"12345678"
        buf[(4 << 20) - 8:] = b"87654321"
    finally:
        lib.vlab_paging_mem_free(m)
    assert m.map == ffi.NULL and m.hva == ffi.NULL


def test_paging_memory_refuses_bad_sizes_and_memfd_naming_itself():
    ffi, lib = _lib()
    m = ffi.new("struct vlab_paging_mem *")
    assert lib.vlab_paging_mem_alloc(m, 4096, 1) == -errno.EINVAL      # thp: 2 MiB pages
    op, err, msg = _err(lib)
    assert op == "vlab_paging_mem_alloc" and "2048 KiB backing page" in msg
    assert lib.vlab_paging_mem_alloc(m, 0, 0) == -errno.EINVAL
    assert lib.vlab_paging_mem_alloc(m, 4096, 4) == -errno.EINVAL      # memfd
    op, err, msg = _err(lib)
    assert op == "vlab_paging_mem_alloc" and "not 4k/thp/hugetlb" in msg
    assert m.map == ffi.NULL


@needs_kvm
def test_slot_backing_errors_name_the_call(kvm):
    from vlab.vmm.kvm import Vm

    ffi, lib = _lib()
    vm = Vm(kvm)
    try:
        out = ffi.new("struct vlab_slot **")
        # unknown backing: the slot call names itself
        assert lib.vlab_vm_slot_add(vm._h, 1 << 32, 1 << 20, 99, 0, -1, out) == -errno.EINVAL
        op, _, msg = _err(lib)
        assert op == "vlab_vm_slot_add" and "unknown backing 99" in msg
        # hugetlb: whole huge pages only, checked before mmap
        assert lib.vlab_vm_slot_add(vm._h, 1 << 32, 1 << 20, 2, 0, -1, out) == -errno.EINVAL
        op, _, msg = _err(lib)
        assert op == "mmap" and "not a multiple of 2 MiB" in msg
        # the failed attempts left no slot behind: the range is still free
        assert lib.vlab_vm_slot_add(vm._h, 1 << 32, 1 << 20, 0, 0, -1, out) == 0
        assert lib.vlab_slot_backing(out[0]) == 0 and lib.vlab_slot_fd(out[0]) == -1
        hva = int(ffi.cast("uintptr_t", lib.vlab_slot_hva(out[0])))
        assert hva % 4096 == 0
        assert lib.vlab_vm_gpa_to_hva(vm._h, (1 << 32) + 4096, 8) == \
            ffi.cast("void *", hva + 4096)
        # memfd: a slot of its own fd, and a second slot sharing it
        assert lib.vlab_vm_slot_add(vm._h, 2 << 32, 1 << 20, 4, 0, -1, out) == 0
        fd = lib.vlab_slot_fd(out[0])
        assert fd >= 0
        assert lib.vlab_vm_slot_add(vm._h, 3 << 32, 1 << 20, 4, 0, fd, out) == 0
        assert lib.vlab_slot_fd(out[0]) not in (-1, fd)
    finally:
        vm.close()
