/*
 * Guest layout built by the host: the payload image, GDT, per-vCPU TSS, IDT with the image's
 * exception stubs, and 4-level guest page tables (4 KiB / 2 MiB / 1 GiB leaves) allocated from a
 * pool inside guest memory. The guest never builds its own tables; it only edits them (paging
 * experiments), so everything here must be exactly what the CPU expects.
 */
#include "internal.h"
#include <stdio.h>
#include <string.h>

#define PTE_P   (1ULL << 0)
#define PTE_RW  (1ULL << 1)
#define PTE_US  (1ULL << 2)
#define PTE_A   (1ULL << 5)
#define PTE_D   (1ULL << 6)
#define PTE_PS  (1ULL << 7)
#define PTE_NX  (1ULL << 63)
#define PTE_ADDR 0x000ffffffffff000ULL

int vlab_vm_load_image(struct vlab_vm *vm, const uint8_t *image, uint64_t size,
                       struct vlab_image_header *hdr_out)
{
    struct vlab_image_header h;
    uint64_t lo = VLAB_GPA_IMAGE, hi = VLAB_GPA_IMAGE + VLAB_IMAGE_MAX;
    uint8_t *dst;

    if (size < sizeof(h) || size > VLAB_IMAGE_MAX)
        return vlab_fail(EINVAL, "vlab_vm_load_image", "image size %llu out of range",
                         (unsigned long long)size);
    memcpy(&h, image, sizeof(h));
    if (h.magic != VLAB_IMAGE_MAGIC || h.version != 1 || h.load_addr != VLAB_GPA_IMAGE)
        return vlab_fail(EINVAL, "vlab_vm_load_image", "bad image header (magic %#x version %u "
                         "load %#llx)", h.magic, h.version, (unsigned long long)h.load_addr);
    if (h.entry < lo || h.entry >= lo + size || h.exc_stubs < lo || h.exc_stubs + 32 * 16 > lo + size ||
        h.syscall_entry < lo || h.syscall_entry >= lo + size || h.image_end < lo + size ||
        h.image_end > hi || h.gate_null < lo || h.gate_null >= lo + size || h.gate_call < lo ||
        h.gate_call >= lo + size)
        return vlab_fail(EINVAL, "vlab_vm_load_image", "image header addresses out of range");
    dst = vlab_vm_gpa_to_hva(vm, VLAB_GPA_IMAGE, h.image_end - VLAB_GPA_IMAGE);
    if (!dst)
        return vlab_fail(EFAULT, "vlab_vm_load_image", "no memory slot covers the image at %#x",
                         VLAB_GPA_IMAGE);
    memcpy(dst, image, size);
    memset(dst + size, 0, h.image_end - VLAB_GPA_IMAGE - size);   /* bss */
    vm->image = h;
    vm->image_loaded = 1;
    vm->env.syscall_entry = h.syscall_entry;    /* what vCPU set-up points LSTAR at */
    if (hdr_out)
        *hdr_out = h;
    return 0;
}

static void gdt_tss(uint64_t *gdt, int idx, uint64_t base)
{
    uint64_t limit = VLAB_TSS_LIMIT;

    gdt[idx] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89ULL << 40) |
               (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
    gdt[idx + 1] = base >> 32;
}

static void idt_gate(uint8_t *idt, int vec, uint64_t handler, int dpl, int ist)
{
    uint8_t *e = idt + 16 * vec;
    uint16_t sel = 0x08;
    uint16_t attr = (uint16_t)(0x8e00 | (dpl << 13) | (ist & 7));
    uint32_t hi = (uint32_t)(handler >> 32), zero = 0;
    uint16_t lo16 = handler & 0xffff, mid16 = (handler >> 16) & 0xffff;

    memcpy(e + 0, &lo16, 2);
    memcpy(e + 2, &sel, 2);
    memcpy(e + 4, &attr, 2);
    memcpy(e + 6, &mid16, 2);
    memcpy(e + 8, &hi, 4);
    memcpy(e + 12, &zero, 4);
}

int vlab_vm_setup_tables(struct vlab_vm *vm, uint64_t pool_gpa, uint64_t pool_size)
{
    uint64_t *gdt = vlab_vm_gpa_to_hva(vm, VLAB_GPA_GDT, VLAB_PAGE);
    uint8_t *idt = vlab_vm_gpa_to_hva(vm, VLAB_GPA_IDT, VLAB_PAGE);
    uint8_t *tss = vlab_vm_gpa_to_hva(vm, VLAB_GPA_TSS, VLAB_TSS_STRIDE * VLAB_MAX_VCPUS);

    if (!vm->image_loaded)
        return vlab_fail(EINVAL, "vlab_vm_setup_tables", "load an image first");
    if (!gdt || !idt || !tss || !vlab_vm_gpa_to_hva(vm, pool_gpa, pool_size) ||
        (pool_gpa & (VLAB_PAGE - 1)) || pool_size < 4 * VLAB_PAGE)
        return vlab_fail(EFAULT, "vlab_vm_setup_tables", "system area or pool not in guest memory");
    memset(gdt, 0, VLAB_PAGE);
    gdt[1] = 0x00af9a000000ffffULL;     /* 0x08 code64 DPL0 */
    gdt[2] = 0x00cf92000000ffffULL;     /* 0x10 data DPL0 */
    gdt[4] = 0x00cffa000000ffffULL;     /* 0x20 code32 DPL3 (sysret base, unused) */
    gdt[5] = 0x00cff2000000ffffULL;     /* 0x28 data DPL3 */
    gdt[6] = 0x00affa000000ffffULL;     /* 0x30 code64 DPL3 */
    /*
     * Each vCPU's TSS carries a full I/O permission bitmap that allows every port: KVM's
     * instruction emulator (which handles CPL3 in/out on some backends, PVM among them) checks
     * the bitmap instead of trusting RFLAGS.IOPL. The byte after the bitmap must be 0xff.
     */
    memset(tss, 0, VLAB_TSS_STRIDE * VLAB_MAX_VCPUS);
    for (int i = 0; i < VLAB_MAX_VCPUS; i++) {
        uint8_t *t = tss + VLAB_TSS_STRIDE * i;
        uint64_t rsp0 = VLAB_GPA_KSTACKS + (uint64_t)(i + 1) * VLAB_KSTACK_SIZE;
        uint64_t ist1 = VLAB_GPA_KSTACKS + 0x8000 + (uint64_t)(i + 1) * VLAB_KSTACK_SIZE;
        uint16_t iomap = 104;

        memcpy(t + 4, &rsp0, 8);
        memcpy(t + 36, &ist1, 8);
        memcpy(t + 102, &iomap, 2);
        t[104 + 8192] = 0xff;
        gdt_tss(gdt, 7 + 2 * i, VLAB_GPA_TSS + VLAB_TSS_STRIDE * i);   /* selector 0x38 + 16*i */
    }
    memset(idt, 0, VLAB_PAGE);
    /*
     * Vectors 0-31 report the exception to the host, except the two software gates that CPL3
     * code may use to reach CPL0 and come back (DPL3): int3 (a null round trip) and int $4
     * (call a function at CPL0). They are the portable way up: on some backends (PVM) a guest
     * `syscall` does not change CPL, and vectors >= 32 cannot be raised by `int`.
     */
    for (int v = 0; v < 32; v++)
        idt_gate(idt, v, vm->image.exc_stubs + 16 * v, 0, v == 8 ? 1 : 0);
    idt_gate(idt, 3, vm->image.gate_null, 3, 0);
    idt_gate(idt, 4, vm->image.gate_call, 3, 0);
    vm->pt_base = pool_gpa;
    vm->pt_size = pool_size;
    vm->pt_used = 0;
    return 0;
}

uint64_t vlab_vm_ptpool_used(struct vlab_vm *vm) { return vm->pt_used; }
uint64_t vlab_vm_ptpool_gpa(struct vlab_vm *vm) { return vm->pt_base; }

static int pt_alloc(struct vlab_vm *vm, uint64_t *gpa)
{
    uint8_t *p;

    if (vm->pt_used + VLAB_PAGE > vm->pt_size)
        return vlab_fail(ENOMEM, "vlab_vm_as_map", "guest page-table pool exhausted (%llu KiB); "
                         "ask for a larger pool", (unsigned long long)(vm->pt_size >> 10));
    *gpa = vm->pt_base + vm->pt_used;
    p = vlab_vm_gpa_to_hva(vm, *gpa, VLAB_PAGE);
    memset(p, 0, VLAB_PAGE);
    vm->pt_used += VLAB_PAGE;
    return 0;
}

int vlab_vm_as_create(struct vlab_vm *vm, uint64_t *root_gpa)
{
    if (!vm->pt_size)
        return vlab_fail(EINVAL, "vlab_vm_as_create", "call vlab_vm_setup_tables first");
    return pt_alloc(vm, root_gpa);
}

static uint64_t *pt_table(struct vlab_vm *vm, uint64_t gpa)
{
    return vlab_vm_gpa_to_hva(vm, gpa & PTE_ADDR, VLAB_PAGE);
}

int vlab_vm_as_map(struct vlab_vm *vm, uint64_t root, uint64_t gva, uint64_t gpa, uint64_t size,
                   uint64_t page_size, uint32_t flags)
{
    int leaf_level;
    uint64_t leaf_bits = PTE_P | PTE_US, mid_bits = PTE_P | PTE_RW | PTE_US;

    switch (page_size) {
    case 4096: leaf_level = 1; break;
    case 2ULL << 20: leaf_level = 2; break;
    case 1ULL << 30: leaf_level = 3; break;
    default:
        return vlab_fail(EINVAL, "vlab_vm_as_map", "page size %llu not 4K/2M/1G",
                         (unsigned long long)page_size);
    }
    if ((gva | gpa | size) & (page_size - 1) || !size)
        return vlab_fail(EINVAL, "vlab_vm_as_map", "gva %#llx gpa %#llx size %#llx not aligned to "
                         "%#llx", (unsigned long long)gva, (unsigned long long)gpa,
                         (unsigned long long)size, (unsigned long long)page_size);
    if (gva + size > (1ULL << 47) || gpa + size > (1ULL << 46))
        return vlab_fail(EINVAL, "vlab_vm_as_map", "address out of the 47-bit range");
    if (flags & VLAB_MAP_WRITE)
        leaf_bits |= PTE_RW;
    if (flags & VLAB_MAP_PRESET_AD) {
        leaf_bits |= PTE_A | PTE_D;
        mid_bits |= PTE_A;
    }
    if (flags & VLAB_MAP_NX)
        leaf_bits |= PTE_NX;
    if (leaf_level > 1)
        leaf_bits |= PTE_PS;

    for (uint64_t off = 0; off < size; off += page_size) {
        uint64_t va = gva + off, table = root;
        uint64_t *t;

        for (int level = 4; level > leaf_level; level--) {
            int idx = (va >> (12 + 9 * (level - 1))) & 511;

            t = pt_table(vm, table);
            if (!t)
                return vlab_fail(EFAULT, "vlab_vm_as_map", "table %#llx outside guest memory",
                                 (unsigned long long)table);
            if (!(t[idx] & PTE_P)) {
                uint64_t next;
                int r = pt_alloc(vm, &next);

                if (r)
                    return r;
                t[idx] = next | mid_bits;
            } else if (t[idx] & PTE_PS) {
                return vlab_fail(EEXIST, "vlab_vm_as_map", "gva %#llx already mapped by a large "
                                 "page", (unsigned long long)va);
            }
            table = t[idx] & PTE_ADDR;
        }
        t = pt_table(vm, table);
        t[(va >> (12 + 9 * (leaf_level - 1))) & 511] = (gpa + off) | leaf_bits;
    }
    return 0;
}

int vlab_vm_as_translate(struct vlab_vm *vm, uint64_t root, uint64_t gva, uint64_t *gpa,
                         uint64_t *pte_gpa, uint64_t *page_size)
{
    uint64_t table = root;

    for (int level = 4; level >= 1; level--) {
        int idx = (gva >> (12 + 9 * (level - 1))) & 511;
        uint64_t *t = pt_table(vm, table), e;

        if (!t)
            return vlab_fail(EFAULT, "vlab_vm_as_translate", "table outside guest memory");
        e = t[idx];
        if (!(e & PTE_P))
            return vlab_fail(ENOENT, "vlab_vm_as_translate", "gva %#llx not mapped",
                             (unsigned long long)gva);
        if (level == 1 || (e & PTE_PS)) {
            uint64_t ps = 1ULL << (12 + 9 * (level - 1));

            *gpa = (e & PTE_ADDR & ~(ps - 1)) | (gva & (ps - 1));
            *pte_gpa = (table & PTE_ADDR) + 8 * idx;
            *page_size = ps;
            return 0;
        }
        table = e & PTE_ADDR;
    }
    return vlab_fail(ENOENT, "vlab_vm_as_translate", "unreachable");
}
