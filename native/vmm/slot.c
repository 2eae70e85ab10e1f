/*
 * A VM's guest memory: memory slots (KVM_SET_USER_MEMORY_REGION) over host memory from
 * backing.c or memory the caller mapped (a device BAR), and guest-physical -> host lookups.
 */
#include "internal.h"
#include <string.h>
#include <sys/ioctl.h>

static void slot_release(struct vlab_slot *s)
{
    vlab_backing_free(&s->mem);
    memset(s, 0, sizeof(*s));
    s->mem.fd = -1;
}

/* Unmap every slot's memory; the VM fd must be closed first (KVM drops its references). */
void vlab_vm_slots_release(struct vlab_vm *vm)
{
    for (int i = 0; i < VLAB_MAX_SLOTS; i++)
        if (vm->slots[i].in_use)
            slot_release(&vm->slots[i]);
}

static int slot_register(struct vlab_vm *vm, struct vlab_slot *s, uint64_t size)
{
    struct kvm_userspace_memory_region r = {
        .slot = s->id,
        .flags = ((s->flags & VLAB_SLOT_DIRTY_LOG) ? KVM_MEM_LOG_DIRTY_PAGES : 0) |
                 ((s->flags & VLAB_SLOT_READONLY) ? KVM_MEM_READONLY : 0),
        .guest_phys_addr = s->gpa,
        .memory_size = size,
        .userspace_addr = (uintptr_t)s->mem.hva,
    };

    if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &r) < 0)
        return vlab_fail_errno("KVM_SET_USER_MEMORY_REGION", "slot %d gpa %#llx size %#llx",
                               s->id, (unsigned long long)s->gpa, (unsigned long long)size);
    return 0;
}

/* A free slot for guest-physical [gpa, gpa+size), which no slot in use may overlap. */
static int slot_claim(struct vlab_vm *vm, uint64_t gpa, uint64_t size, const char *op,
                      struct vlab_slot **out)
{
    struct vlab_slot *s = NULL;

    for (int i = 0; i < VLAB_MAX_SLOTS; i++) {
        struct vlab_slot *o = &vm->slots[i];

        if (o->in_use && gpa < o->gpa + o->size && o->gpa < gpa + size)
            return vlab_fail(EEXIST, op, "gpa range %#llx+%#llx overlaps slot %d",
                             (unsigned long long)gpa, (unsigned long long)size, o->id);
        if (!o->in_use && !s)
            s = o;
    }
    if (!s)
        return vlab_fail(ENOSPC, op, "all %d slots in use", VLAB_MAX_SLOTS);
    s->id = (int)(s - vm->slots);
    *out = s;
    return 0;
}

/* The last step of both ways of adding a slot: fill in its identity, register it with KVM, and
 * hand it out; on failure it is released (its backing too, if it owns one). */
static int slot_commit(struct vlab_vm *vm, struct vlab_slot *s, int backing, uint32_t flags,
                       uint64_t gpa, uint64_t size, struct vlab_slot **out)
{
    int r;

    s->in_use = 1;
    s->backing = backing;
    s->flags = flags;
    s->gpa = gpa;
    s->size = size;
    r = slot_register(vm, s, size);
    if (r) {
        slot_release(s);
        return r;
    }
    *out = s;
    return 0;
}

int vlab_vm_slot_add(struct vlab_vm *vm, uint64_t gpa, uint64_t size, int backing,
                     uint32_t flags, int share_fd, struct vlab_slot **out)
{
    struct vlab_slot *s;
    int r;

    *out = NULL;
    if (!size || (size & (VLAB_PAGE - 1)) || (gpa & (VLAB_PAGE - 1)))
        return vlab_fail(EINVAL, "vlab_vm_slot_add", "gpa %#llx / size %#llx not page aligned",
                         (unsigned long long)gpa, (unsigned long long)size);
    r = slot_claim(vm, gpa, size, "vlab_vm_slot_add", &s);
    if (r)
        return r;
    r = vlab_backing_alloc(&s->mem, size, backing, share_fd, "vlab_vm_slot_add");
    if (r) {
        slot_release(s);
        return r;
    }
    if (flags & VLAB_SLOT_PREFAULT) {
        volatile uint8_t *b = s->mem.hva;

        for (uint64_t off = 0; off < size; off += VLAB_PAGE)
            b[off] = b[off];
    }
    return slot_commit(vm, s, backing, flags, gpa, size, out);
}

/* A slot over memory the caller mapped (a device BAR); the VM never unmaps it. */
int vlab_vm_slot_add_hva(struct vlab_vm *vm, uint64_t gpa, uint64_t size, void *hva,
                         uint32_t flags, struct vlab_slot **out)
{
    struct vlab_slot *s;
    int r;

    *out = NULL;
    if (!size || (size & (VLAB_PAGE - 1)) || (gpa & (VLAB_PAGE - 1)) ||
        ((uintptr_t)hva & (VLAB_PAGE - 1)))
        return vlab_fail(EINVAL, "vlab_vm_slot_add_hva", "gpa %#llx / size %#llx / hva not page "
                         "aligned", (unsigned long long)gpa, (unsigned long long)size);
    r = slot_claim(vm, gpa, size, "vlab_vm_slot_add_hva", &s);
    if (r)
        return r;
    s->mem.fd = -1;
    s->mem.map = NULL;          /* not ours: slot_release leaves it mapped */
    s->mem.hva = hva;
    return slot_commit(vm, s, -1, flags & ~VLAB_SLOT_PREFAULT, gpa, size, out);
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
void *vlab_slot_hva(struct vlab_slot *s) { return s->mem.hva; }
int vlab_slot_fd(struct vlab_slot *s) { return s->mem.fd; }
int vlab_slot_backing(struct vlab_slot *s) { return s->backing; }

static struct vlab_slot *slot_for(struct vlab_vm *vm, uint64_t gpa, uint64_t len)
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
    struct vlab_slot *s = slot_for(vm, gpa, len);

    return s ? (uint8_t *)s->mem.hva + (gpa - s->gpa) : NULL;
}
