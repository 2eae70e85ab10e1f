/*
 * ivshmem: guest-to-guest messages through the SPSC ring (native/include/vlab_spsc.h) in a memfd
 * slot that two VMs map, QEMU's ivshmem-plain model. Each VM runs this payload in one role.
 *
 * Notification: polled, or with VLAB_XFER_F_DOORBELL a doorbell: a consumer that finds the ring
 * empty announces it is waiting and re-checks (vlab_spsc.h); a producer that publishes while
 * the consumer waits rings by writing its own doorbell port, an ioeventfd (KVM signals the
 * eventfd in the kernel). How the consumer sleeps, ARG(13):
 *   0  (io.ivshmem notify=vmm_wait) it writes its "wait" port; that exit blocks its vCPU thread
 *      in the VMM on the peer's eventfd (native/vmm/doorbell.c), one exit to user space per
 *      wait. What a VM without an interrupt controller can do.
 *   1  (notify=doorbell, QEMU's ivshmem-doorbell) the peer's eventfd is an irqfd of this VM: the
 *      ring is an MSI to our vCPU 0, and we sleep in hlt on the in-kernel local APIC
 *      (irq_halt_until), never leaving the kernel. As io.virtio's device does, the producer
 *      keeps at most one doorbell interrupt outstanding, so none merges with a pending one in
 *      the APIC: each direction has an interrupt status word in the shared memory (count of
 *      rings, PENDING, CLOSED; the bits of VLAB_VQ_ISR_* in vlab.h). The producer rings only
 *      when it can set PENDING (compare-and-swap), the consumer clears PENDING once it has
 *      handled that interrupt and then re-checks the ring before it sleeps (the producer may
 *      have skipped a ring meanwhile), and at the end it sets CLOSED and waits for every
 *      interrupt rung: rings = interrupts handled, exactly.
 *   2  (hostile consumer) the APIC's task priority at 15, which masks every vector; it
 *      announces it is waiting and sleeps before it reads anything: the producer's doorbell
 *      interrupt stays pending in the IRR, and the host's watchdog must stop this VM.
 *
 * The peer is not trusted: ring geometry is checked once against the shared region, indices
 * that claim more than the ring holds fail the run, and slot addresses come from our own copy.
 *
 * Arguments (ARG(i)):
 *   0 role        1 producer, 2 consumer (stream); 3 echo client, 4 echo server (round trips);
 *                 5 solo: both ends on this vCPU, chunks samples of chunk_msgs ring-fulls
 *   1 msg_bytes   2 batch   3 chunk_msgs   4 chunks   5 warm (chunks)
 *   6 flags       VLAB_XFER_F_*
 *   7 ring0_gpa   requests (client/producer -> server/consumer)
 *   8 ring1_gpa   replies
 *   9 ring_bytes  size of each ring area
 *  10 ring_port   this VM's doorbell (an ioeventfd)
 *  11 wait_port   this VM's wait exit
 *  12 buf_gpa     private source and sink buffers
 *  13 irq         how a consumer sleeps (above)
 *  14 vector      the doorbell interrupt's vector (irq 1, 2)
 *  15 isr_gpa     the two interrupt status words (ring 0's, ring 1's 64 bytes on), shared
 * Results: consumer: chunks+1 TSC stamps at chunk boundaries; client: one round-trip TSC
 * sample per message. Then the trailer: kicks, waits, full spins, empty spins, received,
 * seq errors, len errors, sum errors, rings (doorbell writes), rings not made (an interrupt
 * was still pending), interrupts handled, sleeps in hlt, rings the status word counted.
 */
#include "rt.h"
#include "apic.h"

#define ISR_PENDING 1           /* mirrors VLAB_VQ_ISR_* in native/include/vlab.h */
#define ISR_CLOSED  2
#define ISR_SHIFT   2

struct vlab_spsc_end;

struct ports {
    u16 ring, wait;
    u64 irq, vec, base;
    volatile u64 *tx_isr, *rx_isr;  /* status words of the ring we send on / receive from */
    struct vlab_spsc_end *rx;
    u64 rings, masked, sleeps, sent;
};

static void doorbell_ring(struct ports *p);
static void doorbell_wait(struct ports *p);

#define VLAB_SPSC_KICK(ctx) doorbell_ring((struct ports *)(ctx))
#define VLAB_SPSC_WAIT(ctx) doorbell_wait((struct ports *)(ctx))
#include "../../include/vlab_spsc.h"

static inline u64 irqs_taken(struct ports *p)
{
    return irq_cpu[0].count[p->vec & 0xff] - p->base;
}

static void doorbell_ring(struct ports *p)
{
    if (p->irq) {
        u64 s = *p->tx_isr;

        if ((s & (ISR_PENDING | ISR_CLOSED)) ||
            !__atomic_compare_exchange_n(p->tx_isr, &s, (s + (1UL << ISR_SHIFT)) | ISR_PENDING,
                                         0, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED)) {
            p->masked++;        /* the last ring is still pending: it wakes the consumer */
            return;
        }
    }
    __asm__ volatile("outb %%al, %%dx" :: "a"((u8)1), "d"(p->ring) : "memory");
    p->rings++;
}

/* One sleep of a waiting consumer; the ring loop re-checks afterwards (spurious wake-ups are
 * absorbed there). */
static void doorbell_wait(struct ports *p)
{
    u64 seen, s;

    if (!p->irq) {
        __asm__ volatile("outb %%al, %%dx" :: "a"((u8)1), "d"(p->wait) : "memory");
        return;
    }
    seen = irq_cpu[0].handled;          /* before any check: no lost wake-up */
    s = *p->rx_isr;
    if (s & ISR_PENDING) {
        if (irqs_taken(p) >= s >> ISR_SHIFT) {
            *p->rx_isr = s & ~(u64)ISR_PENDING;     /* handled: the producer may ring again */
            vlab_mfence();
            if (p->rx->r->head != p->rx->pos)      /* published while it could not ring */
                return;
        }                       /* else: that ring's interrupt is on its way and wakes us */
    }
    p->sleeps++;
    irq_halt_until(0, seen);
}

/* End of a consumer's run: no more rings, and every ring's interrupt handled. */
static void doorbell_close(struct ports *p)
{
    if (!p->irq || !p->rx_isr)
        return;
    p->sent = __atomic_fetch_or(p->rx_isr, ISR_CLOSED, __ATOMIC_SEQ_CST) >> ISR_SHIFT;
    for (;;) {
        u64 seen = irq_cpu[0].handled;

        if (irqs_taken(p) >= p->sent)
            break;
        p->sleeps++;
        irq_halt_until(0, seen);
    }
}

enum role { R_PRODUCER = 1, R_CONSUMER, R_CLIENT, R_SERVER, R_SOLO };

static u64 stamps[4096 + 1];

static void attach(struct vlab_spsc_end *e, u64 gpa, u64 bytes, u64 msg, int producer)
{
    if (vlab_spsc_attach(e, (void *)gpa, bytes, msg, producer))
        vlab_fail(2, "shared ring malformed (geometry or indices)");
}

static void check(u64 r)
{
    if (r == VLAB_SPSC_CORRUPT)
        vlab_fail(3, "peer wrote an impossible ring index");
    GUEST_ASSERT(r == 0);
}

static void trailer(u64 id, struct vlab_spsc_end *tx, struct vlab_spsc_end *rx,
                    struct ports *p)
{
    result_push(id, tx ? tx->kicks : 0);
    result_push(id, rx ? rx->waits : 0);
    result_push(id, tx ? tx->full_spins : 0);
    result_push(id, rx ? rx->empty_spins : 0);
    result_push(id, rx ? rx->received : 0);
    result_push(id, rx ? rx->seq_errors : 0);
    result_push(id, rx ? rx->len_errors : 0);
    result_push(id, rx ? rx->sum_errors : 0);
    result_push(id, p->rings);
    result_push(id, p->masked);
    result_push(id, p->irq ? irqs_taken(p) : 0);
    result_push(id, p->sleeps);
    result_push(id, p->sent);
}

void payload_main(u64 id)
{
    u64 role = ARG(0), msg = ARG(1), batch = ARG(2), chunk = ARG(3), chunks = ARG(4);
    u64 warm = ARG(5), bytes = ARG(9), total = (warm + chunks) * chunk;
    u32 flags = (u32)ARG(6);
    u8 *src = (u8 *)ARG(12), *sink = src + ((msg + 4095) & ~4095UL);
    struct ports ports;
    struct vlab_spsc_end a, b;
    volatile u64 *isr0 = (volatile u64 *)ARG(15), *isr1 = (volatile u64 *)(ARG(15) + 64);

    GUEST_ASSERT(msg >= VLAB_MSG_MIN && msg <= VLAB_MSG_MAX && batch >= 1 && chunk >= 1);
    GUEST_ASSERT(chunks >= 1 && chunks <= 4096);
    memset(&ports, 0, sizeof(ports));
    ports.ring = (u16)ARG(10);
    ports.wait = (u16)ARG(11);
    ports.irq = (flags & VLAB_XFER_F_DOORBELL) && role != R_SOLO ? ARG(13) : 0;
    ports.vec = ARG(14);
    if (ports.irq) {
        GUEST_ASSERT(ports.vec >= 32 && ports.vec <= 254 && ARG(15) && !(ARG(15) & 7));
        irq_install();
        apic_enable(0);         /* xAPIC: its page is mapped, usable at CPL3 */
        if (ports.irq == 2)
            apic_write(APIC_TPR, 0xF0);
        ports.base = irq_cpu[0].count[ports.vec];
    }
    memset(src, 0x5a, msg);
    switch (role) {
    case R_PRODUCER:
        attach(&a, ARG(7), bytes, msg, 1);
        ports.tx_isr = isr0;
        check(vlab_spsc_send(&a, total, src, msg, batch, flags, &ports));
        trailer(id, &a, 0, &ports);
        break;
    case R_CONSUMER:
        attach(&b, ARG(7), bytes, msg, 0);
        ports.rx_isr = isr0;
        ports.rx = &b;
        if (ports.irq == 2) {
            b.r->waiting = 1;
            vlab_mfence();
            for (;;)
                irq_halt_until(0, irq_cpu[0].handled);
        }
        check(vlab_spsc_consume(&b, sink, msg, warm, chunks, chunk, flags, &ports, stamps));
        doorbell_close(&ports);
        for (u64 c = 0; c <= chunks; c++)
            result_push(id, stamps[c]);
        trailer(id, 0, &b, &ports);
        break;
    case R_CLIENT:
        attach(&a, ARG(7), bytes, msg, 1);
        attach(&b, ARG(8), bytes, msg, 0);
        ports.tx_isr = isr0;
        ports.rx_isr = isr1;
        ports.rx = &b;
        for (u64 i = 0; i < total; i++) {
            u64 t0 = tsc_begin(), t1;

            check(vlab_spsc_send(&a, 1, src, msg, 1, flags, &ports));
            check(vlab_spsc_recv(&b, sink, msg, flags, &ports));
            t1 = tsc_end();
            if (i >= warm * chunk)
                result_push(id, t1 - t0);
        }
        vlab_spsc_release(&b);
        doorbell_close(&ports);
        trailer(id, &a, &b, &ports);
        break;
    case R_SERVER:
        attach(&b, ARG(7), bytes, msg, 0);
        attach(&a, ARG(8), bytes, msg, 1);
        ports.rx_isr = isr0;
        ports.tx_isr = isr1;
        ports.rx = &b;
        for (u64 i = 0; i < total; i++) {
            check(vlab_spsc_recv(&b, sink, msg, flags, &ports));
            check(vlab_spsc_send(&a, 1, sink, msg, 1, flags | VLAB_XFER_F_RAW, &ports));
        }
        vlab_spsc_release(&b);
        doorbell_close(&ports);
        trailer(id, &a, &b, &ports);
        break;
    case R_SOLO:
        attach(&a, ARG(7), bytes, msg, 1);
        attach(&b, ARG(7), bytes, msg, 0);
        for (u64 c = 0; c < warm + chunks; c++) {
            u64 t = vlab_spsc_solo(&a, &b, src, sink, msg, chunk, batch, flags & ~VLAB_XFER_F_DOORBELL);

            GUEST_ASSERT(t != 0);
            if (c >= warm)
                result_push(id, t);
        }
        trailer(id, &a, &b, &ports);
        break;
    default:
        vlab_fail(role, "unknown ivshmem role");
    }
}
