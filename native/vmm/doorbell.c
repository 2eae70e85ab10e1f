/*
 * The doorbell a guest waits on in its VMM (io.ivshmem notify=vmm_wait): a PIO device run on
 * the consumer's vCPU thread. Its public names are vlab_vm_* (the Python side calls them so);
 * the device is this file.
 *
 * io.ivshmem notify=doorbell does without it: there the peer's ioeventfd is an irqfd of the
 * consumer VM (vlab.vmm.devices.doorbell_irqfd), which sleeps in hlt on its in-kernel local APIC
 * and never exits to user space for a ring. This file is the doorbell without an irqchip, kept
 * as the comparison: what a wait costs when it has to go through user space. Without an
 * interrupt controller a guest has nothing to sleep on (hlt would only exit) and nothing can
 * interrupt it. So a consumer that finds its ring empty announces it is waiting, re-checks,
 * and writes to a "wait" port: that exit comes to this process on the consumer's vCPU thread,
 * where doorbell_pio blocks in poll() on the producer VM's ioeventfd. The producer rings by
 * writing its own doorbell port, which KVM turns into an eventfd signal without an exit to user
 * space; the consumer's vCPU thread wakes, returns from the handler, and KVM_RUN resumes the
 * guest right after its `out`. The wait is bounded (50 ms) so the run loop's deadline and
 * watchdog still apply; a timed-out wait is a spurious wake-up the guest absorbs by re-checking
 * its ring.
 */
#include "internal.h"
#include <fcntl.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DOORBELL_WAIT_MS 50

struct doorbell {
    int fd;                         /* our dup of the producer VM's ioeventfd */
    _Atomic uint64_t waits, rings;
};

static int doorbell_pio(struct vlab_vcpu *v, void *ctx, struct kvm_run *run)
{
    struct doorbell *d = ctx;
    struct pollfd pf = { d->fd, POLLIN, 0 };
    uint64_t cnt;
    int r;

    (void)v;
    if (run->io.direction != KVM_EXIT_IO_OUT)
        memset((uint8_t *)run + run->io.data_offset, 0, (size_t)run->io.size * run->io.count);
    atomic_fetch_add(&d->waits, 1);
    r = poll(&pf, 1, DOORBELL_WAIT_MS);
    if (r < 0 && errno != EINTR)
        return vlab_fail_errno("poll", "doorbell eventfd");
    if (r > 0 && read(d->fd, &cnt, sizeof(cnt)) == sizeof(cnt))
        atomic_fetch_add(&d->rings, cnt);
    return 0;
}

static void doorbell_release(void *ctx)
{
    struct doorbell *d = ctx;

    close(d->fd);
    free(d);
}

int vlab_vm_add_doorbell_wait(struct vlab_vm *vm, uint16_t port, int eventfd)
{
    struct doorbell *d = calloc(1, sizeof(*d));
    int r;

    if (!d)
        return vlab_fail(ENOMEM, "calloc", "doorbell");
    d->fd = fcntl(eventfd, F_DUPFD_CLOEXEC, 0);
    if (d->fd < 0) {
        free(d);
        return vlab_fail_errno("fcntl", "F_DUPFD_CLOEXEC of the doorbell eventfd");
    }
    r = vlab_vm_add_pio_fn(vm, port, 1, doorbell_pio, d, doorbell_release);
    if (r < 0)
        doorbell_release(d);
    return r;
}

int vlab_vm_doorbell_counts(struct vlab_vm *vm, int index, uint64_t *waits, uint64_t *rings)
{
    struct doorbell *d = vlab_vm_pio_fn_ctx(vm, index, doorbell_pio);

    if (!d)
        return vlab_fail(EINVAL, "vlab_vm_doorbell_counts", "handler %d is not a doorbell", index);
    *waits = atomic_load(&d->waits);
    *rings = atomic_load(&d->rings);
    return 0;
}
