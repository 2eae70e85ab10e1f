/*
 * A virtio 1.x split-virtqueue device (the io.virtio backend).
 *
 * The queue lives in guest memory, laid out as the virtio 1.x spec says: a descriptor table
 * (16-byte entries: addr, len, flags, next), the available ring (flags, idx, ring[size],
 * used_event) and the used ring (flags, idx, ring[size] of {id, len}, avail_event). The driver
 * (payloads/virtio.c, at CPL3) posts chains; this backend consumes them and returns used entries.
 * A transmit queue gathers each chain into a host sink (one copy, checked: sequence numbers and,
 * when verifying, payload checksums); an echo queue copies the device-readable part of a chain
 * into its device-writable part, for round trips.
 *
 * Notification ("kick") paths, the `notify` of io.virtio:
 *   user   the guest's write to the notify port exits to this process; the backend runs right
 *          there on the vCPU thread (vq_pio, called from the run loop's PIO hook). QEMU's way.
 *   kernel the port is an ioeventfd: KVM signals an eventfd without leaving the kernel and a
 *          backend thread sleeping in poll() wakes and drains the queue, with kicks suppressed
 *          while it works (VIRTQ_USED_F_NO_NOTIFY, or avail_event with VIRTIO_F_EVENT_IDX).
 *          vhost's way.
 *   poll   a backend thread spins on avail->idx with kicks suppressed for good. DPDK's way.
 *
 * Used-buffer notifications (device -> driver). Whether the driver wants one is decided per spec
 * 2.7.7.2 (VIRTQ_AVAIL_F_NO_INTERRUPT, or used_event with VIRTIO_F_EVENT_IDX) and counted in
 * `irqs`. Without an interrupt (the driver polls the used ring) that is all. With one
 * (vlab_virtq_set_irq: io.virtio's used=interrupt) the device writes an irqfd, which KVM turns
 * into an MSI to the driver's vCPU without leaving the kernel, from whichever thread returned
 * the buffers (the backend thread, or the vCPU thread in user mode). An MSI is edge-triggered:
 * a second one that arrives while the first is still pending in the local APIC's IRR merges
 * with it, so the device keeps at most one interrupt outstanding, as a device with an
 * auto-masked MSI vector does: a 64-bit interrupt status word in guest memory (VLAB_VQ_ISR_*)
 * counts the interrupts sent and has a PENDING bit the device sets (compare-and-swap) when it
 * sends and the driver clears once it has handled that interrupt. A notification due while
 * PENDING is set is not sent (`irqs_masked`): the pending interrupt already makes the driver
 * look at the used ring, after the entries this notification was for were published. The
 * driver sets CLOSED at the end of a run, so no interrupt arrives after it stopped counting.
 * Interrupts sent = interrupts the driver handled, exactly.
 *
 * Guest memory is hostile. Every index and field is read once (no double fetch) and checked
 * before use: avail->idx may not run more than `size` ahead, heads and `next` must be < size, a
 * chain may not be longer than the queue (that is a loop), every buffer must lie inside guest
 * memory, lengths are bounded by the device limit, no indirect descriptors (not offered), no
 * readable buffer after a writable one, no writable buffer in a transmit chain. A violation
 * marks the queue broken with a message naming it; the device then refuses to process until
 * it is reset, and a backend thread aborts the VM's vCPUs so nothing waits forever. The device
 * writes only the used ring, and (echo) the buffers the driver marked writable.
 *
 * vlab_virtq_process_buffer runs the same code over a buffer standing in for guest memory,
 * fenced by inaccessible guard pages, so fuzz tests can drive it without a guest: an access
 * outside the buffer would fault rather than go unnoticed.
 */
#include "internal.h"
#include "vlab_spsc.h"
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define VIRTQ_DESC_F_NEXT          1
#define VIRTQ_DESC_F_WRITE         2
#define VIRTQ_DESC_F_INDIRECT      4
#define VIRTQ_USED_F_NO_NOTIFY     1
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define PUBLISH_EVERY              16       /* used->idx is published at least this often */
#define POLL_SPIN_NS               20000    /* poll mode: spin this long idle, then yield */
#define MAX_DEVICE_BYTES           (16u << 20)
#define BUFFER_MAX                 (64ULL << 20)

struct vq_seg {
    uint8_t *p;
    uint32_t len;
    uint32_t write;
};

struct vlab_virtq {
    struct vlab_vm *vm;             /* NULL: a buffer stands in for guest memory */
    uint8_t *buf;
    uint64_t buf_gpa, buf_len;
    struct vlab_virtq_config cfg;
    int notify;
    int kick_fd;                    /* ioeventfd (kernel mode; owned by the VM) */
    int irq_fd;                     /* our dup of the irqfd (used-buffer interrupts), or -1 */
    uint64_t isr_gpa;
    uint64_t *isr;                  /* the interrupt status word in guest memory */
    int stop_fd;
    uint8_t *desc, *avail, *used;
    uint16_t last_avail, used_idx;
    struct vq_seg *segs;
    uint8_t *sink;
    size_t sink_map;
    pthread_t thread;
    int thread_on;
    _Atomic int stop;
    struct vlab_virtq_stats st;
};

/* single loads and stores of guest memory: the compiler may not re-read or split them */
static inline uint16_t ld16(const uint8_t *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_RELAXED); }
static inline uint16_t ld16_acq(const uint8_t *p) { return __atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE); }
static inline uint32_t ld32(const uint8_t *p) { return __atomic_load_n((const uint32_t *)p, __ATOMIC_RELAXED); }
static inline uint64_t ld64(const uint8_t *p) { return __atomic_load_n((const uint64_t *)p, __ATOMIC_RELAXED); }
static inline void st16(uint8_t *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELAXED); }
static inline void st16_rel(uint8_t *p, uint16_t v) { __atomic_store_n((uint16_t *)p, v, __ATOMIC_RELEASE); }
static inline void st32(uint8_t *p, uint32_t v) { __atomic_store_n((uint32_t *)p, v, __ATOMIC_RELAXED); }

static inline uint8_t *avail_event(struct vlab_virtq *q) { return q->used + 4 + 8 * (uint64_t)q->cfg.size; }
static inline uint8_t *used_event(struct vlab_virtq *q) { return q->avail + 4 + 2 * (uint64_t)q->cfg.size; }

/* Host address of guest-physical [gpa, gpa+len), or NULL when any byte of it is not memory. */
static uint8_t *vq_mem(struct vlab_virtq *q, uint64_t gpa, uint64_t len)
{
    if (q->vm)
        return vlab_vm_gpa_to_hva(q->vm, gpa, len);
    if (gpa < q->buf_gpa || len > q->buf_len || gpa - q->buf_gpa > q->buf_len - len)
        return NULL;
    return q->buf + (gpa - q->buf_gpa);
}

/* Mark the queue broken (the first reason sticks) and fail naming it. */
static int __attribute__((format(printf, 3, 4))) vq_break(struct vlab_virtq *q, uint32_t kind,
                                                          const char *fmt, ...)
{
    char m[160];
    va_list ap;

    if (!q->st.error) {
        va_start(ap, fmt);
        vsnprintf(m, sizeof(m), fmt, ap);
        va_end(ap);
        q->st.error = kind;
        snprintf(q->st.message, sizeof(q->st.message), "queue broken: %s", m);
    }
    return vlab_fail(EPROTO, "virtqueue", "%s", q->st.message);
}

static int vq_config_check(const struct vlab_virtq_config *c, int notify)
{
    if (!c->size || c->size > VLAB_VQ_MAX_SIZE || (c->size & (c->size - 1)))
        return vlab_fail(EINVAL, "virtqueue", "queue size %u is not a power of two in 1..%u",
                         c->size, VLAB_VQ_MAX_SIZE);
    if (c->mode != VLAB_VQ_MODE_TX && c->mode != VLAB_VQ_MODE_ECHO)
        return vlab_fail(EINVAL, "virtqueue", "unknown mode %u", c->mode);
    if (!c->max_bytes || c->max_bytes > MAX_DEVICE_BYTES)
        return vlab_fail(EINVAL, "virtqueue", "device limit %u bytes not in 1..%u", c->max_bytes,
                         MAX_DEVICE_BYTES);
    if (notify < VLAB_VQ_NOTIFY_USER || notify > VLAB_VQ_NOTIFY_POLL)
        return vlab_fail(EINVAL, "virtqueue", "unknown notify mode %d", notify);
    return 0;
}

/* Find the three ring areas in guest memory; they must be whole and aligned (spec 2.7). */
static int vq_map_rings(struct vlab_virtq *q)
{
    uint64_t n = q->cfg.size;

    if (q->cfg.desc_gpa % 16 || q->cfg.avail_gpa % 2 || q->cfg.used_gpa % 4) {
        q->st.error = VLAB_VQ_ERR_RING;
        snprintf(q->st.message, sizeof(q->st.message), "ring areas misaligned (descriptor table "
                 "%#llx needs 16, avail %#llx 2, used %#llx 4)",
                 (unsigned long long)q->cfg.desc_gpa, (unsigned long long)q->cfg.avail_gpa,
                 (unsigned long long)q->cfg.used_gpa);
        return vlab_fail(EINVAL, "virtqueue", "%s", q->st.message);
    }
    q->desc = vq_mem(q, q->cfg.desc_gpa, 16 * n);
    q->avail = vq_mem(q, q->cfg.avail_gpa, 6 + 2 * n);
    q->used = vq_mem(q, q->cfg.used_gpa, 6 + 8 * n);
    if (!q->desc || !q->avail || !q->used) {
        q->st.error = VLAB_VQ_ERR_RING;
        snprintf(q->st.message, sizeof(q->st.message), "%s ring area is outside guest memory",
                 !q->desc ? "descriptor" : !q->avail ? "available" : "used");
        return vlab_fail(EINVAL, "virtqueue", "%s", q->st.message);
    }
    return 0;
}

/* The TX sink checks what arrived: sequence in order, length, and (verify) the checksum. */
static void vq_sink_check(struct vlab_virtq *q, uint64_t n)
{
    struct vlab_msg_hdr h;

    if (!(q->cfg.flags & VLAB_VQ_F_CHECK))
        return;
    if (n < VLAB_MSG_HDR) {
        q->st.len_errors++;
        return;
    }
    memcpy(&h, q->sink, sizeof(h));
    if (h.seq != q->st.seq_next)
        q->st.seq_errors++;
    q->st.seq_next = h.seq + 1;
    if (h.len != n)
        q->st.len_errors++;
    else if ((q->cfg.flags & VLAB_VQ_F_VERIFY) &&
             h.sum != vlab_msg_sum(q->sink + VLAB_MSG_HDR, n - VLAB_MSG_HDR))
        q->st.sum_errors++;
}

/* Walk, check and carry out one chain. *written: bytes the device wrote for the used entry. */
static int vq_chain(struct vlab_virtq *q, uint16_t head, uint32_t *written)
{
    uint32_t size = q->cfg.size, max = q->cfg.max_bytes, n = 0, nr = 0;
    uint64_t rbytes = 0, wbytes = 0;
    uint16_t idx = head;
    int saw_write = 0;

    if (head >= size)
        return vq_break(q, VLAB_VQ_ERR_HEAD, "avail ring entry %u names descriptor %u, beyond "
                        "the queue size %u", q->last_avail, head, size);
    for (;;) {
        const uint8_t *d = q->desc + 16 * (uint64_t)idx;
        uint64_t addr = ld64(d);
        uint32_t len = ld32(d + 8);
        uint16_t flags = ld16(d + 12), next = ld16(d + 14);
        uint8_t *p;

        if (n == size)
            return vq_break(q, VLAB_VQ_ERR_LOOP, "descriptor chain from head %u is longer than "
                            "the queue size %u (a loop)", head, size);
        if (flags & VIRTQ_DESC_F_INDIRECT)
            return vq_break(q, VLAB_VQ_ERR_INDIRECT, "descriptor %u: VIRTQ_DESC_F_INDIRECT, "
                            "which the device did not offer", idx);
        if (len > max)
            return vq_break(q, VLAB_VQ_ERR_OVERSIZE, "descriptor %u: length %u exceeds the "
                            "device limit of %u bytes", idx, len, max);
        p = vq_mem(q, addr, len);
        if (!p)
            return vq_break(q, VLAB_VQ_ERR_ADDR, "descriptor %u: buffer %#llx+%u is outside "
                            "guest memory", idx, (unsigned long long)addr, len);
        if (flags & VIRTQ_DESC_F_WRITE) {
            if (q->cfg.mode == VLAB_VQ_MODE_TX)
                return vq_break(q, VLAB_VQ_ERR_DIRECTION, "descriptor %u: device-writable "
                                "buffer in a transmit queue", idx);
            saw_write = 1;
            wbytes += len;
        } else {
            if (saw_write)
                return vq_break(q, VLAB_VQ_ERR_ORDER, "descriptor %u: device-readable buffer "
                                "after a device-writable one", idx);
            rbytes += len;
            nr++;
        }
        if (rbytes > max || wbytes > max)
            return vq_break(q, VLAB_VQ_ERR_OVERSIZE, "chain from head %u: more than the device "
                            "limit of %u bytes", head, max);
        q->segs[n].p = p;
        q->segs[n].len = len;
        q->segs[n].write = !!(flags & VIRTQ_DESC_F_WRITE);
        n++;
        if (!(flags & VIRTQ_DESC_F_NEXT))
            break;
        if (next >= size)
            return vq_break(q, VLAB_VQ_ERR_NEXT, "descriptor %u: next %u is beyond the queue "
                            "size %u", idx, next, size);
        idx = next;
    }
    if (q->cfg.mode == VLAB_VQ_MODE_ECHO && wbytes < rbytes)
        return vq_break(q, VLAB_VQ_ERR_DIRECTION, "chain from head %u: %llu writable bytes "
                        "cannot hold the %llu-byte reply", head, (unsigned long long)wbytes,
                        (unsigned long long)rbytes);
    q->st.descs += n;
    q->st.bytes += rbytes;
    if (q->cfg.mode == VLAB_VQ_MODE_TX) {
        uint64_t off = 0;

        for (uint32_t i = 0; i < n; i++) {
            memcpy(q->sink + off, q->segs[i].p, q->segs[i].len);
            off += q->segs[i].len;
        }
        vq_sink_check(q, rbytes);
        *written = 0;
    } else {
        /* scatter the readable bytes straight into the writable buffers: one copy */
        uint32_t ri = 0, wi = nr, roff = 0, woff = 0;
        uint64_t left = rbytes;

        while (left) {
            uint64_t c;

            while (q->segs[ri].len == roff) {
                ri++;
                roff = 0;
            }
            while (q->segs[wi].len == woff) {
                wi++;
                woff = 0;
            }
            c = q->segs[ri].len - roff;
            if (c > q->segs[wi].len - woff)
                c = q->segs[wi].len - woff;
            if (c > left)
                c = left;
            memmove(q->segs[wi].p + woff, q->segs[ri].p + roff, c);
            roff += c;
            woff += c;
            left -= c;
        }
        *written = (uint32_t)rbytes;
    }
    return 0;
}

/* Send one used-buffer interrupt unless the last one is still pending (see the top). */
static void vq_interrupt(struct vlab_virtq *q)
{
    uint64_t s = __atomic_load_n(q->isr, __ATOMIC_ACQUIRE), one = 1;

    if ((s & (VLAB_VQ_ISR_PENDING | VLAB_VQ_ISR_CLOSED)) ||
        !__atomic_compare_exchange_n(q->isr, &s, (s + VLAB_VQ_ISR_ONE) | VLAB_VQ_ISR_PENDING, 0,
                                     __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
        q->st.irqs_masked++;
        return;
    }
    /* an eventfd write fails only when its counter would overflow; KVM's irqfd reads it */
    if (write(q->irq_fd, &one, sizeof(one)) == sizeof(one))
        q->st.irqs_sent++;
}

/* Would the device interrupt the driver now (spec 2.7.7.2)? Counted, and sent with an irqfd. */
static void vq_signal(struct vlab_virtq *q, uint16_t old)
{
    int need;

    __atomic_thread_fence(__ATOMIC_SEQ_CST);      /* used->idx before reading suppression */
    if (q->cfg.flags & VLAB_VQ_F_EVENT_IDX) {
        uint16_t ev = ld16(used_event(q));

        need = (uint16_t)(q->used_idx - ev - 1) < (uint16_t)(q->used_idx - old);
    } else {
        need = !(ld16(q->avail) & VIRTQ_AVAIL_F_NO_INTERRUPT);
    }
    if (need) {
        q->st.irqs++;
        if (q->irq_fd >= 0)
            vq_interrupt(q);
    }
}

/*
 * Driver notifications on or off. With EVENT_IDX, "on" asks for a kick once the driver passes
 * last_avail; "off" in poll mode parks avail_event just behind it, which the driver can never
 * cross (the device refreshes it as it consumes); in kernel mode "off" leaves it stale, as
 * vhost does, so at most one kick arrives while the backend works.
 */
static void vq_notify(struct vlab_virtq *q, int on)
{
    if (q->cfg.flags & VLAB_VQ_F_EVENT_IDX) {
        if (on)
            st16(avail_event(q), q->last_avail);
        else if (q->notify == VLAB_VQ_NOTIFY_POLL)
            st16(avail_event(q), (uint16_t)(q->last_avail - 1));
    } else {
        st16(q->used, on ? 0 : VIRTQ_USED_F_NO_NOTIFY);
    }
}

/* Process every chain available now. Returns how many, or < 0 when the queue is broken. */
static int vq_process(struct vlab_virtq *q)
{
    uint32_t size = q->cfg.size;
    uint16_t avail_idx, old_used = q->used_idx;
    int n = 0, r;

    if (q->st.error)
        return vlab_fail(EPROTO, "virtqueue", "%s", q->st.message);
    avail_idx = ld16_acq(q->avail + 2);
    if ((uint16_t)(avail_idx - q->last_avail) > size)
        return vq_break(q, VLAB_VQ_ERR_AVAIL_IDX, "avail->idx %u is %u entries ahead of the "
                        "device (%u), more than the queue size %u", avail_idx,
                        (uint16_t)(avail_idx - q->last_avail), q->last_avail, size);
    while (q->last_avail != avail_idx) {
        uint16_t head = ld16(q->avail + 4 + 2 * (uint64_t)(q->last_avail & (size - 1)));
        uint8_t *u = q->used + 4 + 8 * (uint64_t)(q->used_idx & (size - 1));
        uint32_t written = 0;

        r = vq_chain(q, head, &written);
        if (r < 0) {
            if (n)
                st16_rel(q->used + 2, q->used_idx);
            return r;
        }
        st32(u, head);
        st32(u + 4, written);
        q->used_idx++;
        q->last_avail++;
        q->st.chains++;
        if (!(++n % PUBLISH_EVERY))
            st16_rel(q->used + 2, q->used_idx);
    }
    if (n) {
        st16_rel(q->used + 2, q->used_idx);
        vq_signal(q, old_used);
    }
    q->st.last_avail = q->last_avail;
    q->st.used_idx = q->used_idx;
    return n;
}

/* user mode: the notify port's exit, on the vCPU thread */
static int vq_pio(struct vlab_vcpu *v, void *ctx, struct kvm_run *run)
{
    struct vlab_virtq *q = ctx;
    uint8_t *data = (uint8_t *)run + run->io.data_offset;
    uint64_t t0 = vlab_now_ns();
    uint32_t val = 0;
    int r;

    (void)v;
    if (run->io.direction != KVM_EXIT_IO_OUT) {
        memset(data, 0, (size_t)run->io.size * run->io.count);
        q->st.bad_notifies++;
        return 0;
    }
    memcpy(&val, data, run->io.size < 4 ? run->io.size : 4);
    q->st.kicks++;
    if (val != 0)
        q->st.bad_notifies++;       /* names a queue we do not have: ignored, as devices do */
    do
        r = vq_process(q);
    while (r > 0);
    if (r == 0)
        vq_notify(q, 1);
    q->st.busy_ns += vlab_now_ns() - t0;
    return r < 0 ? r : 0;
}

/* kernel/poll modes: a write to the port that did not match the ioeventfd, or a poll-mode kick */
static int vq_pio_stray(struct vlab_vcpu *v, void *ctx, struct kvm_run *run)
{
    struct vlab_virtq *q = ctx;

    (void)v;
    if (run->io.direction != KVM_EXIT_IO_OUT)
        memset((uint8_t *)run + run->io.data_offset, 0, (size_t)run->io.size * run->io.count);
    if (q->notify == VLAB_VQ_NOTIFY_POLL && run->io.direction == KVM_EXIT_IO_OUT)
        q->st.kicks++;
    else
        q->st.bad_notifies++;
    return 0;
}

static void *vq_thread(void *arg)
{
    struct vlab_virtq *q = arg;
    int r = 0;

    q->st.backend_tid = (int32_t)syscall(SYS_gettid);
    if (q->notify == VLAB_VQ_NOTIFY_POLL) {
        uint64_t idle_since = 0;

        vq_notify(q, 0);
        while (!atomic_load_explicit(&q->stop, memory_order_relaxed)) {
            uint64_t t0 = vlab_now_ns();

            r = vq_process(q);
            if (r < 0)
                break;
            if (r == 0) {
                /* Idle longer than POLL_SPIN_NS: yield now and then. When the scheduler puts
                 * this thread and the vCPU thread that feeds it on one CPU, a poller that never
                 * yields makes every hand-over wait out a whole time slice (io.virtio poll ran
                 * 500x slower on a loaded 2-CPU host); alone on its CPU the yield returns at
                 * once. */
                q->st.empty_polls++;
                if (!idle_since)
                    idle_since = t0;
                else if ((q->st.empty_polls & 63) == 0 && t0 - idle_since > POLL_SPIN_NS)
                    sched_yield();
                vlab_cpu_relax();
                continue;
            }
            idle_since = 0;
            q->st.wakeups++;
            vq_notify(q, 0);
            q->st.busy_ns += vlab_now_ns() - t0;
        }
    } else {
        struct pollfd pf[2] = { { q->kick_fd, POLLIN, 0 }, { q->stop_fd, POLLIN, 0 } };

        while (!atomic_load(&q->stop)) {
            uint64_t cnt, t0;

            if (poll(pf, 2, -1) < 0) {
                if (errno == EINTR)
                    continue;
                vlab_fail_errno("poll", "virtqueue backend");
                snprintf(q->st.message, sizeof(q->st.message), "backend poll() failed: errno %d",
                         errno);
                r = -1;
                break;
            }
            if (pf[1].revents)
                break;
            if (read(q->kick_fd, &cnt, sizeof(cnt)) == sizeof(cnt))
                q->st.kicks += cnt;
            q->st.wakeups++;
            t0 = vlab_now_ns();
            for (;;) {
                vq_notify(q, 0);
                do
                    r = vq_process(q);
                while (r > 0);
                if (r < 0)
                    break;
                vq_notify(q, 1);
                __atomic_thread_fence(__ATOMIC_SEQ_CST);
                if (ld16_acq(q->avail + 2) == q->last_avail)
                    break;
            }
            q->st.busy_ns += vlab_now_ns() - t0;
            if (r < 0)
                break;
        }
    }
    if (q->kick_fd >= 0) {
        uint64_t cnt;

        /* kicks the guest made before the stop that we were not scheduled in time to see */
        if (read(q->kick_fd, &cnt, sizeof(cnt)) == sizeof(cnt))
            q->st.kicks += cnt;
    }
    if (r < 0 && q->vm)
        vlab_vm_abort_with(q->vm, "virtqueue", q->st.message);
    {
        struct timespec ts;
        int64_t w = vlab_task_wait_ns(q->st.backend_tid);

        if (!clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts))
            q->st.cpu_ns = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
        q->st.wait_ns = w > 0 ? (uint64_t)w : 0;
    }
    return NULL;
}

static void vq_free(struct vlab_virtq *q)
{
    if (!q)
        return;
    if (q->sink)
        munmap(q->sink, q->sink_map);
    if (q->stop_fd >= 0)
        close(q->stop_fd);
    if (q->irq_fd >= 0)
        close(q->irq_fd);
    free(q->segs);
    free(q);
}

static void vq_release(void *ctx)
{
    struct vlab_virtq *q = ctx;

    vlab_virtq_stop(q);
    vq_free(q);
}

/* Allocate the per-queue host state; the sink is followed by a guard page. */
static struct vlab_virtq *vq_alloc(const struct vlab_virtq_config *cfg, int notify)
{
    struct vlab_virtq *q = calloc(1, sizeof(*q));
    long psz = sysconf(_SC_PAGESIZE);
    void *m;

    if (!q) {
        vlab_fail(ENOMEM, "calloc", "virtqueue");
        return NULL;
    }
    q->cfg = *cfg;
    q->notify = notify;
    q->kick_fd = -1;
    q->stop_fd = -1;
    q->irq_fd = -1;
    q->segs = calloc(cfg->size, sizeof(*q->segs));
    q->sink_map = ((cfg->max_bytes + psz - 1) / psz + 1) * psz;
    m = mmap(NULL, q->sink_map, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (!q->segs || m == MAP_FAILED) {
        vlab_fail(ENOMEM, "mmap", "virtqueue sink");
        if (m != MAP_FAILED)
            munmap(m, q->sink_map);
        vq_free(q);
        return NULL;
    }
    q->sink = m;
    mprotect((uint8_t *)m + q->sink_map - psz, psz, PROT_NONE);
    return q;
}

int vlab_virtq_create(struct vlab_vm *vm, const struct vlab_virtq_config *cfg, int notify,
                      uint16_t port, struct vlab_virtq **out)
{
    struct vlab_virtq *q;
    int r;

    *out = NULL;
    r = vq_config_check(cfg, notify);
    if (r)
        return r;
    q = vq_alloc(cfg, notify);
    if (!q)
        return -vlab_last_error()->err;
    q->vm = vm;
    r = vq_map_rings(q);
    if (r)
        goto fail;
    q->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (q->stop_fd < 0) {
        r = vlab_fail_errno("eventfd", "virtqueue stop");
        goto fail;
    }
    if (notify == VLAB_VQ_NOTIFY_KERNEL) {
        r = vlab_vm_add_ioeventfd(vm, port, 2, 1);
        if (r < 0)
            goto fail;
        q->kick_fd = r;
    }
    /* the VM owns the queue from here: the handler's release frees it */
    r = vlab_vm_add_pio_fn(vm, port, 1, notify == VLAB_VQ_NOTIFY_USER ? vq_pio : vq_pio_stray, q,
                           vq_release);
    if (r < 0)
        goto fail;
    vlab_virtq_reset(q);
    *out = q;
    return 0;
fail:
    vq_free(q);
    return r;
}

/* Device reset: zero the rings, forget the indices and statistics, arm notifications. */
int vlab_virtq_reset(struct vlab_virtq *q)
{
    uint64_t n = q->cfg.size, cnt;

    if (q->thread_on)
        return vlab_fail(EBUSY, "virtqueue", "reset while the backend thread runs");
    memset(q->desc, 0, 16 * n);
    memset(q->avail, 0, 6 + 2 * n);
    memset(q->used, 0, 6 + 8 * n);
    if (q->isr)
        __atomic_store_n(q->isr, 0, __ATOMIC_SEQ_CST);
    q->last_avail = q->used_idx = 0;
    memset(&q->st, 0, sizeof(q->st));
    if (q->kick_fd >= 0)
        while (read(q->kick_fd, &cnt, sizeof(cnt)) == sizeof(cnt))
            ;
    vq_notify(q, q->notify != VLAB_VQ_NOTIFY_POLL);
    if (q->vm)
        vlab_vm_abort_clear(q->vm, "virtqueue");    /* the device's own abort, if any */
    return 0;
}

/*
 * Deliver used-buffer notifications as interrupts: `irqfd` (an eventfd KVM turns into an MSI,
 * see Vm.add_irqfd) is written whenever the driver wants one, at most one outstanding, with the
 * interrupt status word (VLAB_VQ_ISR_*) at `isr_gpa` in guest memory, 8-byte aligned. The device
 * keeps its own duplicate of the fd. Only while the backend thread is stopped.
 */
int vlab_virtq_set_irq(struct vlab_virtq *q, int irqfd, uint64_t isr_gpa)
{
    uint64_t *isr;
    int fd;

    if (q->thread_on)
        return vlab_fail(EBUSY, "vlab_virtq_set_irq", "the backend thread runs");
    if (!q->vm)
        return vlab_fail(EINVAL, "vlab_virtq_set_irq", "no VM");
    isr = isr_gpa % 8 ? NULL : (uint64_t *)vq_mem(q, isr_gpa, 8);
    if (!isr)
        return vlab_fail(EINVAL, "vlab_virtq_set_irq", "interrupt status word at %#llx is not "
                         "8-byte aligned guest memory", (unsigned long long)isr_gpa);
    fd = fcntl(irqfd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0)
        return vlab_fail_errno("fcntl", "F_DUPFD_CLOEXEC of irqfd %d", irqfd);
    if (q->irq_fd >= 0)
        close(q->irq_fd);
    q->irq_fd = fd;
    q->isr_gpa = isr_gpa;
    q->isr = isr;
    __atomic_store_n(q->isr, 0, __ATOMIC_SEQ_CST);
    return 0;
}

int vlab_virtq_start(struct vlab_virtq *q)
{
    uint64_t cnt;
    int r;

    if (q->notify == VLAB_VQ_NOTIFY_USER || q->thread_on)
        return 0;
    atomic_store(&q->stop, 0);
    while (read(q->stop_fd, &cnt, sizeof(cnt)) == sizeof(cnt))
        ;
    r = pthread_create(&q->thread, NULL, vq_thread, q);
    if (r)
        return vlab_fail(r, "pthread_create", "virtqueue backend");
    q->thread_on = 1;
    return 0;
}

int vlab_virtq_stop(struct vlab_virtq *q)
{
    uint64_t one = 1;

    if (!q->thread_on)
        return 0;
    atomic_store(&q->stop, 1);
    if (write(q->stop_fd, &one, sizeof(one)) != sizeof(one))
        return vlab_fail_errno("write", "virtqueue stop eventfd");
    pthread_join(q->thread, NULL);
    q->thread_on = 0;
    return 0;
}

void vlab_virtq_get_stats(struct vlab_virtq *q, struct vlab_virtq_stats *out)
{
    *out = q->st;
    out->last_avail = q->last_avail;
    out->used_idx = q->used_idx;
}

/*
 * The backend without a guest: `image` (len bytes, a multiple of 4 KiB) stands for guest memory
 * at `gpa`. It is copied between inaccessible guard pages, the available chains are processed
 * once (starting from out->last_avail / out->used_idx), notifications re-armed, and the memory
 * copied back. Returns chains processed, or < 0 with out->error/out->message saying why.
 */
int vlab_virtq_process_buffer(uint8_t *image, uint64_t len, uint64_t gpa,
                              const struct vlab_virtq_config *cfg, uint32_t budget,
                              struct vlab_virtq_stats *out)
{
    long psz = sysconf(_SC_PAGESIZE);
    uint16_t start_avail = (uint16_t)out->last_avail, start_used = (uint16_t)out->used_idx;
    struct vlab_virtq *q;
    uint8_t *map;
    int r, total = 0;

    memset(out, 0, sizeof(*out));
    if (!len || len % psz || len > BUFFER_MAX)
        return vlab_fail(EINVAL, "vlab_virtq_process_buffer", "memory of %llu bytes: need a "
                         "multiple of %ld up to %llu", (unsigned long long)len, psz, BUFFER_MAX);
    r = vq_config_check(cfg, VLAB_VQ_NOTIFY_USER);
    if (r)
        return r;
    map = mmap(NULL, len + 2 * psz, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED)
        return vlab_fail_errno("mmap", "fuzz buffer");
    if (mprotect(map + psz, len, PROT_READ | PROT_WRITE)) {
        r = vlab_fail_errno("mprotect", "fuzz buffer");
        munmap(map, len + 2 * psz);
        return r;
    }
    q = vq_alloc(cfg, VLAB_VQ_NOTIFY_USER);
    if (!q) {
        munmap(map, len + 2 * psz);
        return -vlab_last_error()->err;
    }
    q->buf = map + psz;
    q->buf_gpa = gpa;
    q->buf_len = len;
    memcpy(q->buf, image, len);
    r = vq_map_rings(q);
    if (!r) {
        q->last_avail = start_avail;
        q->used_idx = start_used;
        do {
            r = vq_process(q);
            if (r > 0)
                total += r;
        } while (r > 0 && budget && (uint32_t)total < budget);
        if (r >= 0) {
            vq_notify(q, 1);
            r = total;
        }
    }
    memcpy(image, q->buf, len);
    vlab_virtq_get_stats(q, out);
    munmap(map, len + 2 * psz);
    vq_free(q);
    return r;
}
