/*
 * virtio: a virtio 1.x split-virtqueue driver at CPL3 (the guest side of io.virtio).
 *
 * The host lays the queue out in a data slot and tells us where (the device, native/vmm/
 * virtio.c, is configured with the same addresses, as a virtio-pci device would be told them by
 * the driver). We own the descriptor table and the available ring; the device owns the used
 * ring. Each message is one chain: a 16-byte header descriptor (sequence, length, checksum)
 * followed by payload descriptors of at most `seg_bytes` (VIRTQ_DESC_F_NEXT), so a 64 KiB
 * message is a 17-descriptor chain. Chains are built once per slot and reused, as drivers with
 * fixed buffers do. Sending a message copies it from a private source buffer into the slot (the
 * producer's copy; the device's copy into its sink is the second).
 *
 * Kicks follow the spec's suppression rules, whatever the host's notify mode: after publishing
 * avail->idx and a full fence, kick unless used->flags has VIRTQ_USED_F_NO_NOTIFY, or, with
 * VIRTIO_F_EVENT_IDX, kick only if the new index passed avail_event (vring_need_event). The
 * device decides how often we kick: once per batch (user: it re-arms after every exit), rarely
 * (kernel: suppressed while its thread works), never (poll).
 *
 * Completions (device -> driver), ARG(16):
 *   poll       spin on the used ring; used_event / VIRTQ_AVAIL_F_NO_INTERRUPT are still published
 *              (a delayed "interrupt" at half the slots) so the device can count the interrupts
 *              it would have sent;
 *   interrupt  the device sends an MSI through an irqfd (the VM has an in-kernel irqchip).
 *              Notifications stay off (NO_INTERRUPT set, or used_event parked one behind
 *              last_used) until the driver runs out of work: then it enables them (used_event
 *              at the completion it waits for: half the chains in flight when the queue is full,
 *              all the rest at the end, the next one in echo), re-checks the used ring after a
 *              full fence, and sleeps in hlt on the local APIC (irq_halt_until), as a virtio
 *              driver enables callbacks and re-checks before it sleeps. The device keeps at most
 *              one interrupt outstanding through the interrupt status word (VLAB_VQ_ISR_*, see
 *              native/vmm/virtio.c): the driver clears its PENDING bit once it has handled that
 *              interrupt, before it enables notifications again, and sets CLOSED at the end,
 *              then waits for every interrupt the device sent, so the counts are exact;
 *   masked     (a hostile guest) the APIC's task priority at 15, which masks every vector;
 *              it enables notifications, posts and kicks one message and sleeps until an
 *              interrupt that can never be delivered: the host's watchdog must stop it.
 * The device is trusted less than a real driver would: a used entry naming a descriptor we did
 * not post fails the run.
 *
 * Arguments (ARG(i)):
 *   0 op          1 transmit stream, 2 echo round trips, 3 hostile (break the queue, kick, wait),
 *                 4 copy cost (the producer's copy alone, into the same slot buffers),
 *                 5 kick cost (chunk_msgs notify writes per sample, nothing posted)
 *   1 qsize       queue size (power of two)
 *   2 msg_bytes   64..65536
 *   3 batch       messages posted per publication / kick decision
 *   4 chunk_msgs  messages per recorded sample
 *   5 chunks      recorded samples (after `warm` chunks)
 *   6 flags       VLAB_XFER_F_* (verify, fault injection) | F_EVENT_IDX
 *   7 desc_gpa    8 avail_gpa    9 used_gpa
 *  10 buf_gpa     slot buffers, then the source buffer
 *  11 stride      bytes per slot buffer
 *  12 notify_port
 *  13 seg_bytes   largest payload descriptor
 *  14 hostile     what op 3 breaks (enum hostile)
 *  15 warm        warm-up chunks
 *  16 irq         0 poll, 1 interrupt, 2 masked (see above)
 *  17 isr_gpa     the interrupt status word (8 bytes, shared with the device)
 *  18 vector      the irqfd's vector
 * Results: transmit: chunks+1 TSC stamps taken as completions cross chunk boundaries; echo: one
 * round-trip TSC sample per message; copy: one TSC sample per chunk. Then the trailer: kicks, full waits, completions,
 * seq errors, len errors, sum errors (echo replies), interrupts handled (the handler's count
 * of our vector), sleeps (hlt waits), interrupts the device says it sent (interrupt status).
 */
#include "rt.h"
#include "apic.h"
#include "../../include/vlab_spsc.h"

#define F_EVENT_IDX      0x100
#define DESC_F_NEXT      1
#define DESC_F_WRITE     2
#define DESC_F_INDIRECT  4
#define USED_F_NO_NOTIFY 1
#define AVAIL_F_NO_INTERRUPT 1
#define MAX_SLOTS        4096
/* the interrupt status word: mirrors VLAB_VQ_ISR_* in native/include/vlab.h */
#define ISR_PENDING      1
#define ISR_CLOSED       2
#define ISR_SHIFT        2
enum irq_mode { IRQ_POLL = 0, IRQ_ON = 1, IRQ_MASKED = 2 };

enum op { OP_TX = 1, OP_ECHO = 2, OP_HOSTILE = 3, OP_COPY = 4, OP_KICKS = 5 };
enum hostile {
    H_LOOP = 1, H_ADDR, H_OVERSIZE, H_HEAD, H_AVAIL_IDX, H_INDIRECT, H_NEXT, H_WRITE_TX,
};

struct desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct drv {
    struct desc *desc;
    volatile u16 *avail;        /* [0] flags, [1] idx, [2..] ring, [2+q] used_event */
    volatile u8 *used;          /* flags, idx, ring of {u32 id, u32 len}, avail_event */
    u32 q, k, nslots;
    u16 avail_idx, published, last_used;
    u64 flags, port;
    u64 kicks, full_waits, completed;
    u16 free[MAX_SLOTS];
    u32 nfree;
    u8 inflight[MAX_SLOTS];
    /* interrupt mode */
    u64 irq, vec, irq_base, sleeps, sent;
    volatile u64 *isr;
};

static struct drv d;

static inline u16 used_idx(void) { return *(volatile u16 *)(d.used + 2); }
static inline u16 used_flags(void) { return *(volatile u16 *)d.used; }
static inline u16 avail_event(void) { return *(volatile u16 *)(d.used + 4 + 8 * (u64)d.q); }

static inline void kick(void)
{
    __asm__ volatile("outw %%ax, %%dx" :: "a"((u16)0), "d"((u16)d.port) : "memory");
    d.kicks++;
}

/* Make the posted chains visible and kick if the device asked for it (spec 2.7.13). */
static void publish(void)
{
    u16 old = d.published, new = d.avail_idx, need;

    if (old == new)
        return;
    vlab_barrier();
    d.avail[1] = new;
    d.published = new;
    vlab_mfence();
    if (d.flags & F_EVENT_IDX)
        need = (u16)(new - avail_event() - 1) < (u16)(new - old);
    else
        need = !(used_flags() & USED_F_NO_NOTIFY);
    if (need)
        kick();
}

static void post(u32 slot)
{
    d.avail[2 + (d.avail_idx & (d.q - 1))] = (u16)(slot * d.k);
    d.avail_idx++;
    d.inflight[slot] = 1;
}

/* Take back what the device used; returns how many. Stamps chunk boundaries on the way. */
static u64 reclaim(u64 chunk, u64 *stamps, u64 nstamps)
{
    u16 ui = used_idx();
    u64 n = 0;

    vlab_barrier();
    GUEST_ASSERT((u16)(ui - d.last_used) <= d.q);
    while (d.last_used != ui) {
        volatile u8 *e = d.used + 4 + 8 * (u64)(d.last_used & (d.q - 1));
        u32 id = *(volatile u32 *)e, slot = id / d.k;

        GUEST_ASSERT(id < d.q && id % d.k == 0 && slot < d.nslots && d.inflight[slot]);
        d.inflight[slot] = 0;
        d.free[d.nfree++] = (u16)slot;
        d.last_used++;
        d.completed++;
        n++;
        if (stamps && chunk && d.completed % chunk == 0 && d.completed / chunk <= nstamps)
            stamps[d.completed / chunk - 1] = tsc_end();
    }
    if (n && (d.flags & F_EVENT_IDX))    /* delayed "interrupt", or parked (interrupt mode) */
        d.avail[2 + d.q] = d.irq ? (u16)(d.last_used - 1) : (u16)(d.last_used + d.nslots / 2);
    return n;
}

/* ---- interrupt mode ---- */

static inline u64 irqs_taken(void)
{
    return irq_cpu[0].count[d.vec & 0xff] - d.irq_base;
}

static void notify_on(u64 want)
{
    if (d.flags & F_EVENT_IDX)
        d.avail[2 + d.q] = (u16)(d.last_used + want - 1);   /* interrupt at the want-th */
    else
        d.avail[0] = 0;
}

static void notify_off(void)
{
    if (d.flags & F_EVENT_IDX)
        d.avail[2 + d.q] = (u16)(d.last_used - 1);          /* crossed 64 Ki entries later */
    else
        d.avail[0] = AVAIL_F_NO_INTERRUPT;
}

/* Sleep until the used ring has something for us (want: completions to be woken for). */
static void wait_used(u64 want)
{
    for (;;) {
        u64 seen = irq_cpu[0].handled;          /* before any check: no lost wake-up */
        u64 s;

        if (used_idx() != d.last_used)
            return;
        s = *d.isr;
        if (s & ISR_PENDING) {
            if (irqs_taken() < s >> ISR_SHIFT) {
                /* the device's last interrupt is on its way and will wake us */
                d.sleeps++;
                irq_halt_until(0, seen);
                continue;
            }
            *d.isr = s & ~(u64)ISR_PENDING;     /* handled: the device may send again */
        }
        notify_on(want);
        vlab_mfence();
        if (used_idx() != d.last_used) {
            notify_off();
            return;
        }
        d.sleeps++;
        irq_halt_until(0, seen);
        notify_off();
    }
}

/* End of a run: no more interrupts, and every one the device sent has been handled. */
static void irq_close(void)
{
    u64 s = __atomic_fetch_or(d.isr, ISR_CLOSED, __ATOMIC_SEQ_CST);

    d.sent = s >> ISR_SHIFT;
    for (;;) {
        u64 seen = irq_cpu[0].handled;

        if (irqs_taken() >= d.sent)
            break;
        d.sleeps++;
        irq_halt_until(0, seen);
    }
}

static void irq_start(u64 mode, u64 isr, u64 vec)
{
    d.irq = mode;
    d.vec = vec;
    d.sleeps = d.sent = 0;
    if (!mode)
        return;
    GUEST_ASSERT(isr && !(isr & 7) && vec >= 32 && vec <= 254);
    d.isr = (volatile u64 *)isr;
    irq_install();
    apic_enable(0);             /* xAPIC: its page is mapped, usable at CPL3 */
    if (mode == IRQ_MASKED)
        apic_write(APIC_TPR, 0xF0);
    d.irq_base = irq_cpu[0].count[vec];
}

/* The hostile guest of irq mode 2: the device's interrupt stays pending in the APIC's IRR,
 * masked by the task priority, and this vCPU sleeps for good. */
static void masked(u8 *src, u64 msg)
{
    u32 slot = d.free[--d.nfree];

    vlab_msg_build(src, msg, 0, (u32)d.flags);
    vlab_copy((u8 *)d.desc[slot * d.k].addr, src, msg);
    notify_on(1);
    post(slot);
    publish();
    for (;;)
        irq_halt_until(0, irq_cpu[0].handled);
}

/* Wait for completions: spin (poll) or sleep until an interrupt (interrupt mode). */
static inline void wait_for(u64 want)
{
    if (d.irq)
        wait_used(want);
    else
        vlab_cpu_relax();
}

/* Descriptors of one slot's chain: readable header + payload segments, then (echo) writable. */
static void build_chain(u32 slot, u64 buf, u64 msg, u64 seg, u64 echo)
{
    u32 base = slot * d.k, i = 0;
    u64 off = VLAB_MSG_HDR;

    d.desc[base].addr = buf;
    d.desc[base].len = VLAB_MSG_HDR;
    i = 1;
    while (off < msg) {
        u64 len = msg - off < seg ? msg - off : seg;

        d.desc[base + i].addr = buf + off;
        d.desc[base + i].len = (u32)len;
        off += len;
        i++;
    }
    if (echo) {
        u64 reply = buf + ((msg + 63) & ~63UL);

        for (off = 0; off < msg; i++) {
            u64 len = msg - off < seg ? msg - off : seg;

            d.desc[base + i].addr = reply + off;
            d.desc[base + i].len = (u32)len;
            d.desc[base + i].flags = DESC_F_WRITE;
            off += len;
        }
    }
    GUEST_ASSERT(i == d.k);
    for (u32 j = 0; j < d.k; j++) {
        d.desc[base + j].flags |= (j + 1 < d.k) ? DESC_F_NEXT : 0;
        d.desc[base + j].next = (u16)(j + 1 < d.k ? base + j + 1 : 0);
    }
}

static u64 chain_len(u64 msg, u64 seg, u64 echo)
{
    u64 k = 1 + (msg - VLAB_MSG_HDR + seg - 1) / seg;

    return echo ? k + (msg + seg - 1) / seg : k;
}

static void tx(u64 id, u8 *src, u64 msg, u64 batch, u64 chunk, u64 chunks, u64 warm)
{
    u64 total = (warm + chunks) * chunk, sent = 0, seq = 0;
    static u64 stamps[4096 + 1];
    u64 nstamps = warm + chunks;

    GUEST_ASSERT(nstamps <= 4096 && warm >= 1);    /* the warm-up's end starts the clock */
    while (sent < total) {
        u32 slot;
        u8 *buf;

        if (!d.nfree) {
            publish();                      /* never sit on posted chains while waiting */
            while (!reclaim(chunk, stamps, nstamps)) {
                d.full_waits++;
                wait_for(d.nslots / 2 ? d.nslots / 2 : 1);
            }
        }
        slot = d.free[--d.nfree];
        buf = (u8 *)(d.desc[slot * d.k].addr);
        if ((d.flags & VLAB_XFER_F_BAD_SEQ) && seq == 5)
            seq++;
        vlab_msg_build(src, msg, seq++, (u32)d.flags);
        vlab_copy(buf, src, msg);
        post(slot);
        sent++;
        if ((u16)(d.avail_idx - d.published) >= batch) {
            publish();
            reclaim(chunk, stamps, nstamps);
        }
    }
    publish();
    while (d.completed < total)
        if (!reclaim(chunk, stamps, nstamps))
            wait_for(total - d.completed);
    /* stamp k marks the end of chunk k; the first recorded chunk starts at the end of the warm-up */
    for (u64 c = warm - 1; c < nstamps; c++)
        result_push(id, stamps[c]);
}

static void echo(u64 id, u8 *src, u64 msg, u64 rounds, u64 warm, u64 *errs)
{
    struct vlab_spsc_end chk;
    u8 *buf = (u8 *)d.desc[0].addr, *reply = buf + ((msg + 63) & ~63UL);

    memset(&chk, 0, sizeof(chk));
    d.nfree = 0;                            /* one chain (slot 0) in flight at a time */
    for (u64 i = 0; i < warm + rounds; i++) {
        u64 t0 = tsc_begin(), t1;

        vlab_msg_build(src, msg, chk.seq, (u32)d.flags);
        vlab_copy(buf, src, msg);
        post(0);
        publish();
        while (used_idx() == d.last_used)
            wait_for(1);
        t1 = tsc_end();
        {
            volatile u8 *e = d.used + 4 + 8 * (u64)(d.last_used & (d.q - 1));

            GUEST_ASSERT(*(volatile u32 *)e == 0);
            GUEST_ASSERT(*(volatile u32 *)(e + 4) == msg);
            d.inflight[0] = 0;
            d.last_used++;
            d.completed++;
        }
        vlab_msg_check(&chk, reply, msg, (u32)d.flags);
        if (i >= warm)
            result_push(id, t1 - t0);
    }
    errs[0] = chk.seq_errors;
    errs[1] = chk.len_errors;
    errs[2] = chk.sum_errors;
}

/* Break the queue the way `what` says, kick regardless of suppression, and wait: the host must
 * stop us with an error naming the problem (or its watchdog would). */
static void hostile(u64 what)
{
    u32 h = 0;

    switch (what) {
    case H_LOOP:
        d.desc[d.k - 1].flags |= DESC_F_NEXT;
        d.desc[d.k - 1].next = 0;
        break;
    case H_ADDR:
        d.desc[0].addr = 0xdead00000000UL;
        break;
    case H_OVERSIZE:
        d.desc[d.k - 1].len = 0x7ffff000;
        break;
    case H_HEAD:
        h = d.q + 3;
        break;
    case H_AVAIL_IDX:
        break;
    case H_INDIRECT:
        d.desc[0].flags |= DESC_F_INDIRECT;
        break;
    case H_NEXT:
        d.desc[0].next = (u16)(d.q + 1);
        break;
    case H_WRITE_TX:
        d.desc[d.k - 1].flags |= DESC_F_WRITE;
        break;
    default:
        vlab_fail(what, "unknown hostile case");
    }
    d.avail[2] = (u16)h;
    d.avail_idx = what == H_AVAIL_IDX ? (u16)(d.q + 7) : 1;
    vlab_barrier();
    d.avail[1] = d.avail_idx;
    vlab_mfence();
    kick();
    for (;;)
        vlab_cpu_relax();
}

void payload_main(u64 id)
{
    u64 op = ARG(0), msg = ARG(2), batch = ARG(3), chunk = ARG(4), chunks = ARG(5);
    u64 buf = ARG(10), stride = ARG(11), seg = ARG(13), warm = ARG(15);
    u64 errs[3] = { 0, 0, 0 };
    u8 *src;

    d.q = (u32)ARG(1);
    d.flags = ARG(6);
    d.port = ARG(12);
    d.desc = (struct desc *)ARG(7);
    d.avail = (volatile u16 *)ARG(8);
    d.used = (volatile u8 *)ARG(9);
    GUEST_ASSERT(d.q && !(d.q & (d.q - 1)) && msg >= VLAB_MSG_MIN && msg <= VLAB_MSG_MAX);
    GUEST_ASSERT(seg >= 64 && batch >= 1 && op >= OP_TX && op <= OP_KICKS);
    d.k = (u32)chain_len(msg, seg, op == OP_ECHO);
    d.nslots = d.q / d.k;
    if (d.nslots > MAX_SLOTS)
        d.nslots = MAX_SLOTS;
    GUEST_ASSERT(d.nslots >= 1);
    d.avail_idx = d.published = d.last_used = 0;
    d.kicks = d.full_waits = d.completed = 0;
    d.nfree = 0;
    /* driver initialisation: the device reset zeroed the rings; build every slot's chain */
    for (u32 s = 0; s < d.nslots; s++) {
        build_chain(s, buf + s * stride, msg, seg, op == OP_ECHO);
        d.inflight[s] = 0;
    }
    for (u32 s = d.nslots; s-- > 0;)
        d.free[d.nfree++] = (u16)s;
    src = (u8 *)(buf + d.nslots * stride);
    memset(src, 0x5a, msg);
    irq_start(op == OP_TX || op == OP_ECHO ? ARG(16) : 0, ARG(17), ARG(18));
    if (d.flags & F_EVENT_IDX)
        d.avail[2 + d.q] = d.irq ? (u16)0xffff : (u16)(d.nslots / 2);
    else
        d.avail[0] = AVAIL_F_NO_INTERRUPT;
    vlab_mfence();
    if (op == OP_HOSTILE)
        hostile(ARG(14));
    if (op == OP_KICKS) {
        for (u64 c = 0; c < warm + chunks; c++) {
            u64 t0 = tsc_begin(), t1;

            for (u64 i = 0; i < chunk; i++)
                kick();
            t1 = tsc_end();
            if (c >= warm)
                result_push(id, t1 - t0);
        }
    } else if (op == OP_COPY) {
        for (u64 c = 0; c < warm + chunks; c++) {
            u64 t0 = tsc_begin(), t1;

            for (u64 i = 0; i < chunk; i++)
                vlab_copy((u8 *)(buf + (i % d.nslots) * stride), src, msg);
            t1 = tsc_end();
            if (c >= warm)
                result_push(id, t1 - t0);
        }
    } else if (op == OP_TX && d.irq == IRQ_MASKED)
        masked(src, msg);
    else if (op == OP_TX)
        tx(id, src, msg, batch, chunk, chunks, warm);
    else
        echo(id, src, msg, chunks * chunk, warm * chunk, errs);
    if (d.irq)
        irq_close();
    result_push(id, d.kicks);
    result_push(id, d.full_waits);
    result_push(id, d.completed);
    result_push(id, errs[0]);
    result_push(id, errs[1]);
    result_push(id, errs[2]);
    result_push(id, d.irq ? irqs_taken() : 0);
    result_push(id, d.sleeps);
    result_push(id, d.sent);
}
