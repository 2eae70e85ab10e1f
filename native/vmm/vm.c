/* VM: creation, memory slots and their backings, device sinks, ioeventfd, dirty logging. */
#include "internal.h"
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB (21 << 26)
#endif
#ifndef MAP_HUGE_1GB
#define MAP_HUGE_1GB (30 << 26)
#endif

int vlab_vm_create(struct vlab_kvm *kvm, struct vlab_vm **out)
{
    struct vlab_vm *vm;
    int fd;

    *out = NULL;
    fd = ioctl(kvm->fd, KVM_CREATE_VM, 0);
    if (fd < 0)
        return vlab_fail_errno("KVM_CREATE_VM", NULL);
    vm = calloc(1, sizeof(*vm));
    if (!vm) {
        close(fd);
        return vlab_fail(ENOMEM, "calloc", NULL);
    }
    vm->kvm = kvm;
    vm->fd = fd;
    vm->run_size = kvm->run_size;
    vm->stats_fd = -1;
    for (int i = 0; i < VLAB_MAX_SLOTS; i++)
        vm->slots[i].fd = -1;
    *out = vm;
    return 0;
}

static void slot_release(struct vlab_slot *s)
{
    if (s->map)
        munmap(s->map, s->map_len);
    if (s->fd >= 0)
        close(s->fd);
    memset(s, 0, sizeof(*s));
    s->fd = -1;
}


void vlab_vm_destroy(struct vlab_vm *vm)
{
    if (!vm)
        return;
    /* io area: devices first (they may run threads that touch guest memory and vCPUs) */
    for (int i = 0; i < vm->nr_handlers; i++)
        if (vm->handlers[i].release)
            vm->handlers[i].release(vm->handlers[i].ctx);
    for (int i = 0; i < VLAB_MAX_VCPUS; i++)
        if (vm->vcpus[i])
            vlab_vcpu_destroy(vm->vcpus[i]);
    for (int i = 0; i < vm->nr_eventfds; i++)
        close(vm->eventfds[i]);
    if (vm->stats_fd >= 0)
        close(vm->stats_fd);
    /* Close the VM fd before unmapping guest memory: KVM drops its references first. */
    close(vm->fd);
    for (int i = 0; i < VLAB_MAX_SLOTS; i++)
        if (vm->slots[i].in_use)
            slot_release(&vm->slots[i]);
    free(vm);
}

int vlab_vm_fd(struct vlab_vm *vm) { return vm->fd; }

int vlab_vm_check_cap(struct vlab_vm *vm, int cap)
{
    int r = ioctl(vm->fd, KVM_CHECK_EXTENSION, cap);

    return r < 0 ? vlab_fail_errno("KVM_CHECK_EXTENSION", "cap %d on VM", cap) : r;
}

int vlab_vm_enable_cap(struct vlab_vm *vm, uint32_t cap, uint64_t arg0)
{
    struct kvm_enable_cap ec = { .cap = cap, .args = { arg0 } };

    if (ioctl(vm->fd, KVM_ENABLE_CAP, &ec) < 0)
        return vlab_fail_errno("KVM_ENABLE_CAP", "cap %u arg %#llx", cap,
                               (unsigned long long)arg0);
    return 0;
}

/* Allocate host memory for a slot with the requested backing. */
static int slot_alloc(struct vlab_slot *s, uint64_t size, int backing, int share_fd)
{
    int prot = PROT_READ | PROT_WRITE;
    void *p;

    s->fd = -1;
    switch (backing) {
    case VLAB_BACKING_4K:
    case VLAB_BACKING_THP: {
        uint64_t align = backing == VLAB_BACKING_THP ? (2ULL << 20) : VLAB_PAGE;
        size_t len = size + align;

        p = mmap(NULL, len, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED)
            return vlab_fail_errno("mmap", "anonymous %llu bytes", (unsigned long long)size);
        s->map = p;
        s->map_len = len;
        s->hva = (void *)(((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1));
        if (madvise(s->hva, size, backing == VLAB_BACKING_THP ? MADV_HUGEPAGE : MADV_NOHUGEPAGE))
            return vlab_fail_errno("madvise", backing == VLAB_BACKING_THP ? "MADV_HUGEPAGE"
                                   : "MADV_NOHUGEPAGE");
        return 0;
    }
    case VLAB_BACKING_HUGETLB_2M:
    case VLAB_BACKING_HUGETLB_1G: {
        uint64_t hp = backing == VLAB_BACKING_HUGETLB_2M ? (2ULL << 20) : (1ULL << 30);
        int huge = backing == VLAB_BACKING_HUGETLB_2M ? MAP_HUGE_2MB : MAP_HUGE_1GB;

        if (size % hp)
            return vlab_fail(EINVAL, "mmap", "hugetlb slot size %#llx is not a multiple of %llu MiB",
                             (unsigned long long)size, (unsigned long long)(hp >> 20));
        p = mmap(NULL, size, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | huge, -1, 0);
        if (p == MAP_FAILED)
            return vlab_fail_errno("mmap", "MAP_HUGETLB %s: not enough huge pages reserved "
                                   "(see /sys/kernel/mm/hugepages/hugepages-%skB/nr_hugepages)",
                                   hp == (2ULL << 20) ? "2 MiB" : "1 GiB",
                                   hp == (2ULL << 20) ? "2048" : "1048576");
        s->map = s->hva = p;
        s->map_len = size;
        return 0;
    }
    case VLAB_BACKING_MEMFD: {
        int fd = share_fd;

        if (fd < 0) {
            fd = memfd_create("vlab-shared", MFD_CLOEXEC);
            if (fd < 0)
                return vlab_fail_errno("memfd_create", NULL);
            if (ftruncate(fd, size)) {
                int r = vlab_fail_errno("ftruncate", "memfd to %llu bytes",
                                        (unsigned long long)size);
                close(fd);
                return r;
            }
        } else {
            fd = fcntl(share_fd, F_DUPFD_CLOEXEC, 0);
            if (fd < 0)
                return vlab_fail_errno("fcntl", "F_DUPFD_CLOEXEC of shared memfd");
        }
        s->fd = fd;
        p = mmap(NULL, size, prot, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED)
            return vlab_fail_errno("mmap", "shared memfd %llu bytes", (unsigned long long)size);
        s->map = s->hva = p;
        s->map_len = size;
        return 0;
    }
    default:
        return vlab_fail(EINVAL, "vlab_vm_slot_add", "unknown backing %d", backing);
    }
}

static int slot_register(struct vlab_vm *vm, struct vlab_slot *s, uint64_t size)
{
    struct kvm_userspace_memory_region r = {
        .slot = s->id,
        .flags = ((s->flags & VLAB_SLOT_DIRTY_LOG) ? KVM_MEM_LOG_DIRTY_PAGES : 0) |
                 ((s->flags & VLAB_SLOT_READONLY) ? KVM_MEM_READONLY : 0),
        .guest_phys_addr = s->gpa,
        .memory_size = size,
        .userspace_addr = (uintptr_t)s->hva,
    };

    if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &r) < 0)
        return vlab_fail_errno("KVM_SET_USER_MEMORY_REGION", "slot %d gpa %#llx size %#llx",
                               s->id, (unsigned long long)s->gpa, (unsigned long long)size);
    return 0;
}

int vlab_vm_slot_add(struct vlab_vm *vm, uint64_t gpa, uint64_t size, int backing,
                     uint32_t flags, int share_fd, struct vlab_slot **out)
{
    struct vlab_slot *s = NULL;
    int r;

    *out = NULL;
    if (!size || (size & (VLAB_PAGE - 1)) || (gpa & (VLAB_PAGE - 1)))
        return vlab_fail(EINVAL, "vlab_vm_slot_add", "gpa %#llx / size %#llx not page aligned",
                         (unsigned long long)gpa, (unsigned long long)size);
    for (int i = 0; i < VLAB_MAX_SLOTS; i++) {
        struct vlab_slot *o = &vm->slots[i];

        if (o->in_use && gpa < o->gpa + o->size && o->gpa < gpa + size)
            return vlab_fail(EEXIST, "vlab_vm_slot_add", "gpa range %#llx+%#llx overlaps slot %d",
                             (unsigned long long)gpa, (unsigned long long)size, o->id);
        if (!o->in_use && !s)
            s = o;
    }
    if (!s)
        return vlab_fail(ENOSPC, "vlab_vm_slot_add", "all %d slots in use", VLAB_MAX_SLOTS);
    s->id = (int)(s - vm->slots);
    r = slot_alloc(s, size, backing, share_fd);
    if (r) {
        slot_release(s);
        return r;
    }
    if (flags & VLAB_SLOT_PREFAULT) {
        volatile uint8_t *b = s->hva;

        for (uint64_t off = 0; off < size; off += VLAB_PAGE)
            b[off] = b[off];
    }
    s->in_use = 1;
    s->backing = backing;
    s->flags = flags;
    s->gpa = gpa;
    s->size = size;
    r = slot_register(vm, s, size);
    if (r) {
        int keep_err = vlab_last_error()->err;
        slot_release(s);
        (void)keep_err;
        return r;
    }
    *out = s;
    return 0;
}

int vlab_vm_slot_set_flags(struct vlab_vm *vm, struct vlab_slot *s, uint32_t flags)
{
    uint32_t old = s->flags;
    int r;

    s->flags = (s->flags & VLAB_SLOT_PREFAULT) | (flags & ~VLAB_SLOT_PREFAULT);
    r = slot_register(vm, s, s->size);
    if (r)
        s->flags = old;
    return r;
}

int vlab_vm_slot_remove(struct vlab_vm *vm, struct vlab_slot *s)
{
    int r = slot_register(vm, s, 0);

    if (r)
        return r;
    slot_release(s);
    return 0;
}

int vlab_slot_id(struct vlab_slot *s) { return s->id; }
uint64_t vlab_slot_gpa(struct vlab_slot *s) { return s->gpa; }
uint64_t vlab_slot_size(struct vlab_slot *s) { return s->size; }
void *vlab_slot_hva(struct vlab_slot *s) { return s->hva; }
int vlab_slot_fd(struct vlab_slot *s) { return s->fd; }
int vlab_slot_backing(struct vlab_slot *s) { return s->backing; }

struct vlab_slot *vlab_vm_slot_for(struct vlab_vm *vm, uint64_t gpa, uint64_t len)
{
    for (int i = 0; i < VLAB_MAX_SLOTS; i++) {
        struct vlab_slot *s = &vm->slots[i];

        if (s->in_use && gpa >= s->gpa && len <= s->size && gpa - s->gpa <= s->size - len)
            return s;
    }
    return NULL;
}

/* Host address of guest-physical [gpa, gpa+len), or NULL if that range is not all in one slot. */
void *vlab_vm_gpa_to_hva(struct vlab_vm *vm, uint64_t gpa, uint64_t len)
{
    struct vlab_slot *s = vlab_vm_slot_for(vm, gpa, len);

    return s ? (uint8_t *)s->hva + (gpa - s->gpa) : NULL;
}

static int add_handler(struct vlab_vm *vm, int kind, uint64_t base, uint64_t len, uint64_t value)
{
    struct vlab_handler *h;

    if (vm->nr_handlers >= VLAB_MAX_HANDLERS)
        return vlab_fail(ENOSPC, "vlab_vm_add_handler", "at most %d handlers", VLAB_MAX_HANDLERS);
    if (!len)
        return vlab_fail(EINVAL, "vlab_vm_add_handler", "empty range");
    h = &vm->handlers[vm->nr_handlers];
    h->kind = kind;
    h->base = base;
    h->len = len;
    h->value = value;
    atomic_store(&h->hits, 0);
    return vm->nr_handlers++;
}

int vlab_vm_add_pio_sink(struct vlab_vm *vm, uint16_t port, uint16_t count, uint64_t in_value)
{
    if (port == VLAB_UCALL_PORT || port == VLAB_EXC_PORT)
        return vlab_fail(EBUSY, "vlab_vm_add_pio_sink", "port %#x is vlab's ucall port", port);
    return add_handler(vm, VLAB_H_PIO_SINK, port, count, in_value);
}

int vlab_vm_add_mmio_sink(struct vlab_vm *vm, uint64_t gpa, uint64_t len, uint64_t read_value)
{
    return add_handler(vm, VLAB_H_MMIO_SINK, gpa, len, read_value);
}

uint64_t vlab_vm_sink_hits(struct vlab_vm *vm, int index)
{
    if (index < 0 || index >= vm->nr_handlers)
        return 0;
    return atomic_load(&vm->handlers[index].hits);
}

int vlab_vm_enable_user_msr(struct vlab_vm *vm, uint64_t read_value)
{
    int r;

    if (vlab_vm_check_cap(vm, KVM_CAP_X86_USER_SPACE_MSR) <= 0)
        return vlab_fail(ENOTSUP, "KVM_CHECK_EXTENSION", "KVM_CAP_X86_USER_SPACE_MSR missing");
    r = vlab_vm_enable_cap(vm, KVM_CAP_X86_USER_SPACE_MSR,
                           KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_INVAL);
    if (r)
        return r;
    vm->user_msr = 1;
    vm->msr_read_value = read_value;
    return 0;
}

/* An eventfd that KVM signals on a guest write to a PIO port or MMIO address (no exit to us). */
int vlab_vm_add_ioeventfd(struct vlab_vm *vm, uint64_t addr, uint32_t len, int pio)
{
    struct kvm_ioeventfd io = { .addr = addr, .len = len };
    int fd;

    if (vm->nr_eventfds >= (int)(sizeof(vm->eventfds) / sizeof(vm->eventfds[0])))
        return vlab_fail(ENOSPC, "KVM_IOEVENTFD", "too many ioeventfds");
    fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (fd < 0)
        return vlab_fail_errno("eventfd", NULL);
    io.fd = fd;
    io.flags = pio ? KVM_IOEVENTFD_FLAG_PIO : 0;
    if (ioctl(vm->fd, KVM_IOEVENTFD, &io) < 0) {
        int r = vlab_fail_errno("KVM_IOEVENTFD", "%s %#llx len %u", pio ? "port" : "gpa",
                                (unsigned long long)addr, len);
        close(fd);
        return r;
    }
    vm->eventfds[vm->nr_eventfds++] = fd;
    return fd;
}

int vlab_vm_stats_fd(struct vlab_vm *vm)
{
    if (vm->stats_fd < 0) {
        int fd = ioctl(vm->fd, KVM_GET_STATS_FD, 0);

        if (fd < 0)
            return vlab_fail_errno("KVM_GET_STATS_FD", "VM");
        vm->stats_fd = fd;
    }
    return vm->stats_fd;
}

int vlab_vm_get_dirty_log(struct vlab_vm *vm, struct vlab_slot *s, uint64_t *bitmap)
{
    struct kvm_dirty_log log = { .slot = s->id, .dirty_bitmap = bitmap };

    if (ioctl(vm->fd, KVM_GET_DIRTY_LOG, &log) < 0)
        return vlab_fail_errno("KVM_GET_DIRTY_LOG", "slot %d", s->id);
    return 0;
}

int vlab_vm_clear_dirty_log(struct vlab_vm *vm, struct vlab_slot *s, uint64_t first_page,
                            uint32_t num_pages, uint64_t *bitmap)
{
    struct kvm_clear_dirty_log c = {
        .slot = s->id, .first_page = first_page, .num_pages = num_pages, .dirty_bitmap = bitmap,
    };

    if (ioctl(vm->fd, KVM_CLEAR_DIRTY_LOG, &c) < 0)
        return vlab_fail_errno("KVM_CLEAR_DIRTY_LOG", "slot %d pages %llu+%u", s->id,
                               (unsigned long long)first_page, num_pages);
    return 0;
}

int vlab_vm_enable_dirty_ring(struct vlab_vm *vm, uint32_t bytes)
{
    int cap = KVM_CAP_DIRTY_LOG_RING_ACQ_REL;
    int r = vlab_vm_check_cap(vm, cap);

    if (r <= 0) {
        cap = KVM_CAP_DIRTY_LOG_RING;
        r = vlab_vm_check_cap(vm, cap);
    }
    if (r <= 0)
        return vlab_fail(ENOTSUP, "KVM_CHECK_EXTENSION", "KVM_CAP_DIRTY_LOG_RING missing");
    if (bytes > (uint32_t)r)
        return vlab_fail(EINVAL, "KVM_ENABLE_CAP", "dirty ring %u bytes > max %d", bytes, r);
    for (int i = 0; i < VLAB_MAX_VCPUS; i++)
        if (vm->vcpus[i])
            return vlab_fail(EBUSY, "KVM_ENABLE_CAP", "dirty ring must be enabled before vCPUs");
    r = vlab_vm_enable_cap(vm, cap, bytes);
    if (r)
        return r;
    vm->dirty_ring_bytes = bytes;
    return 0;
}

int vlab_vm_reset_dirty_rings(struct vlab_vm *vm)
{
    int r = ioctl(vm->fd, KVM_RESET_DIRTY_RINGS, 0);

    return r < 0 ? vlab_fail_errno("KVM_RESET_DIRTY_RINGS", NULL) : r;
}

/* ---------------- io area: C device handlers and foreign-memory slots ---------------- */

int vlab_vm_add_pio_fn(struct vlab_vm *vm, uint16_t port, uint16_t count, vlab_pio_fn fn,
                       void *ctx, void (*release)(void *ctx))
{
    int idx;

    if (port <= VLAB_EXC_PORT && port + count > VLAB_UCALL_PORT)
        return vlab_fail(EBUSY, "vlab_vm_add_pio_fn", "ports %#x+%u overlap vlab's ucall ports",
                         port, count);
    idx = add_handler(vm, VLAB_H_PIO_FN, port, count, 0);
    if (idx < 0)
        return idx;
    vm->handlers[idx].fn = fn;
    vm->handlers[idx].ctx = ctx;
    vm->handlers[idx].release = release;
    return idx;
}

int vlab_vm_slot_add_hva(struct vlab_vm *vm, uint64_t gpa, uint64_t size, void *hva,
                         uint32_t flags, struct vlab_slot **out)
{
    struct vlab_slot *s = NULL;
    int r;

    *out = NULL;
    if (!size || (size & (VLAB_PAGE - 1)) || (gpa & (VLAB_PAGE - 1)) ||
        ((uintptr_t)hva & (VLAB_PAGE - 1)))
        return vlab_fail(EINVAL, "vlab_vm_slot_add_hva", "gpa %#llx / size %#llx / hva not page "
                         "aligned", (unsigned long long)gpa, (unsigned long long)size);
    for (int i = 0; i < VLAB_MAX_SLOTS; i++) {
        struct vlab_slot *o = &vm->slots[i];

        if (o->in_use && gpa < o->gpa + o->size && o->gpa < gpa + size)
            return vlab_fail(EEXIST, "vlab_vm_slot_add_hva", "gpa range %#llx+%#llx overlaps "
                             "slot %d", (unsigned long long)gpa, (unsigned long long)size, o->id);
        if (!o->in_use && !s)
            s = o;
    }
    if (!s)
        return vlab_fail(ENOSPC, "vlab_vm_slot_add_hva", "all %d slots in use", VLAB_MAX_SLOTS);
    s->id = (int)(s - vm->slots);
    s->fd = -1;
    s->map = NULL;              /* not ours: slot_release leaves it mapped */
    s->hva = hva;
    s->in_use = 1;
    s->backing = -1;
    s->flags = flags & ~VLAB_SLOT_PREFAULT;
    s->gpa = gpa;
    s->size = size;
    r = slot_register(vm, s, size);
    if (r) {
        memset(s, 0, sizeof(*s));
        s->fd = -1;
        return r;
    }
    *out = s;
    return 0;
}
