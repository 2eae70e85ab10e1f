/*
 * The VM: creation and destruction, capabilities, the exits handled on vCPU threads (sinks and
 * C device hooks), user-space MSRs, ioeventfds, dirty logging, and aborting every vCPU.
 *
 * The VM owns its vCPUs: it destroys them with itself and interrupts them on an abort, through
 * vcpu.c's functions. It shares with them only its struct vlab_vcpu_env (internal.h). Guest
 * memory (slots) is slot.c; the image, tables and address spaces are layout.c.
 */
#include "internal.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

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
    vm->fd = fd;
    vm->stats_fd = -1;
    vm->env.vm = vm;
    vm->env.kvm = kvm;
    vm->env.vm_fd = fd;
    vm->env.run_size = kvm->run_size;
    *out = vm;
    return 0;
}

void vlab_vm_destroy(struct vlab_vm *vm)
{
    if (!vm)
        return;
    /* devices first (they may run threads that touch guest memory and vCPUs) */
    for (int i = 0; i < vm->env.nr_handlers; i++)
        if (vm->env.handlers[i].release)
            vm->env.handlers[i].release(vm->env.handlers[i].ctx);
    for (int i = 0; i < VLAB_MAX_VCPUS; i++)
        if (vm->env.vcpus[i])
            vlab_vcpu_destroy(vm->env.vcpus[i]);
    for (int i = 0; i < vm->nr_eventfds; i++)
        close(vm->eventfds[i]);
    if (vm->stats_fd >= 0)
        close(vm->stats_fd);
    /* Close the VM fd before unmapping guest memory: KVM drops its references first. */
    close(vm->fd);
    vlab_vm_slots_release(vm);
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

/* ---------------- exits handled on the vCPU thread ---------------- */

static int add_handler(struct vlab_vm *vm, int kind, uint64_t base, uint64_t len, uint64_t value)
{
    struct vlab_handler *h;

    if (vm->env.nr_handlers >= VLAB_MAX_HANDLERS)
        return vlab_fail(ENOSPC, "vlab_vm_add_handler", "at most %d handlers", VLAB_MAX_HANDLERS);
    if (!len)
        return vlab_fail(EINVAL, "vlab_vm_add_handler", "empty range");
    h = &vm->env.handlers[vm->env.nr_handlers];
    h->kind = kind;
    h->base = base;
    h->len = len;
    h->value = value;
    atomic_store(&h->hits, 0);
    return vm->env.nr_handlers++;
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
    if (index < 0 || index >= vm->env.nr_handlers)
        return 0;
    return atomic_load(&vm->env.handlers[index].hits);
}

/* A port range whose exits run fn(ctx) on the vCPU thread; fn < 0 stops the run with that error.
 * The VM owns ctx: release(ctx) runs first thing in vlab_vm_destroy. Returns the handler index. */
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
    vm->env.handlers[idx].fn = fn;
    vm->env.handlers[idx].ctx = ctx;
    vm->env.handlers[idx].release = release;
    return idx;
}

/* The ctx of handler `index` if it is a vlab_vm_add_pio_fn handler running fn, else NULL. */
void *vlab_vm_pio_fn_ctx(struct vlab_vm *vm, int index, vlab_pio_fn fn)
{
    struct vlab_handler *h;

    if (index < 0 || index >= vm->env.nr_handlers)
        return NULL;
    h = &vm->env.handlers[index];
    return h->kind == VLAB_H_PIO_FN && h->fn == fn ? h->ctx : NULL;
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
    vm->env.msr_read_value = read_value;
    return 0;
}

/* ---------------- ioeventfd, statistics ---------------- */

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

/* ---------------- dirty logging ---------------- */

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
        if (vm->env.vcpus[i])
            return vlab_fail(EBUSY, "KVM_ENABLE_CAP", "dirty ring must be enabled before vCPUs");
    r = vlab_vm_enable_cap(vm, cap, bytes);
    if (r)
        return r;
    vm->env.dirty_ring_bytes = bytes;
    return 0;
}

int vlab_vm_reset_dirty_rings(struct vlab_vm *vm)
{
    int r = ioctl(vm->fd, KVM_RESET_DIRTY_RINGS, 0);

    return r < 0 ? vlab_fail_errno("KVM_RESET_DIRTY_RINGS", NULL) : r;
}

/* ---------------- abort: stop every vCPU from any thread ---------------- */

/*
 * Make every vCPU of `vm` leave KVM_RUN (or a device handler's wait) and fail with op/msg. The
 * flag is set before the vCPUs are interrupted, and the run loop checks it before every KVM_RUN
 * and after every EINTR, so a vCPU about to enter KVM_RUN cannot miss it. The first abort's
 * op/msg stick until vlab_vm_abort_clear. Called by devices (a backend thread) and by Python.
 */
void vlab_vm_abort_with(struct vlab_vm *vm, const char *op, const char *msg)
{
    struct vlab_vcpu_env *env = &vm->env;
    int expected = 0;

    if (atomic_compare_exchange_strong(&env->abort_pending, &expected, 2)) {
        snprintf(env->abort_op, sizeof(env->abort_op), "%s", op);
        snprintf(env->abort_msg, sizeof(env->abort_msg), "%s", msg);
        atomic_store(&env->abort_pending, 1);
    }
    for (int i = 0; i < VLAB_MAX_VCPUS; i++)
        if (env->vcpus[i])
            vlab_vcpu_interrupt(env->vcpus[i]);
}

/* Forget an abort raised by `op` (a device that has been reset), so the VM can run again. */
void vlab_vm_abort_clear(struct vlab_vm *vm, const char *op)
{
    if (atomic_load(&vm->env.abort_pending) == 1 && !strcmp(vm->env.abort_op, op))
        atomic_store(&vm->env.abort_pending, 0);
}

int vlab_vm_abort(struct vlab_vm *vm, const char *msg)
{
    vlab_vm_abort_with(vm, "vlab_vm_abort", msg ? msg : "aborted");
    return 0;
}
