/*
 * ivshmem: guest-to-guest messages through the SPSC ring (native/include/vlab_spsc.h) in a memfd
 * slot that two VMs map, QEMU's ivshmem-plain model. Each VM runs this payload in one role.
 *
 * Notification: polled, or with VLAB_XFER_F_DOORBELL a doorbell. There is no irqchip, so a
 * consumer that finds the ring empty announces it is waiting and writes its "wait" port; that
 * exit blocks its vCPU thread in the VMM on the peer's ioeventfd (native/vmm/io.c). The
 * producer rings by writing its own doorbell port, an ioeventfd: KVM signals the eventfd in the
 * kernel, the consumer's vCPU thread wakes and resumes the guest.
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
 * Results: consumer: chunks+1 TSC stamps at chunk boundaries; client: one round-trip TSC
 * sample per message. Then the trailer: kicks, waits, full spins, empty spins, received,
 * seq errors, len errors, sum errors.
 */
#include "rt.h"

struct ports {
    u16 ring, wait;
};

#define VLAB_SPSC_KICK(ctx) \
    __asm__ volatile("outb %%al, %%dx" :: "a"((u8)1), "d"(((struct ports *)(ctx))->ring) : "memory")
#define VLAB_SPSC_WAIT(ctx) \
    __asm__ volatile("outb %%al, %%dx" :: "a"((u8)1), "d"(((struct ports *)(ctx))->wait) : "memory")
#include "../../include/vlab_spsc.h"

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

static void trailer(u64 id, struct vlab_spsc_end *tx, struct vlab_spsc_end *rx)
{
    result_push(id, tx ? tx->kicks : 0);
    result_push(id, rx ? rx->waits : 0);
    result_push(id, tx ? tx->full_spins : 0);
    result_push(id, rx ? rx->empty_spins : 0);
    result_push(id, rx ? rx->received : 0);
    result_push(id, rx ? rx->seq_errors : 0);
    result_push(id, rx ? rx->len_errors : 0);
    result_push(id, rx ? rx->sum_errors : 0);
}

void payload_main(u64 id)
{
    u64 role = ARG(0), msg = ARG(1), batch = ARG(2), chunk = ARG(3), chunks = ARG(4);
    u64 warm = ARG(5), bytes = ARG(9), total = (warm + chunks) * chunk;
    u32 flags = (u32)ARG(6);
    u8 *src = (u8 *)ARG(12), *sink = src + ((msg + 4095) & ~4095UL);
    struct ports ports = { (u16)ARG(10), (u16)ARG(11) };
    struct vlab_spsc_end a, b;

    GUEST_ASSERT(msg >= VLAB_MSG_MIN && msg <= VLAB_MSG_MAX && batch >= 1 && chunk >= 1);
    GUEST_ASSERT(chunks >= 1 && chunks <= 4096);
    memset(src, 0x5a, msg);
    switch (role) {
    case R_PRODUCER:
        attach(&a, ARG(7), bytes, msg, 1);
        check(vlab_spsc_send(&a, total, src, msg, batch, flags, &ports));
        trailer(id, &a, 0);
        break;
    case R_CONSUMER:
        attach(&b, ARG(7), bytes, msg, 0);
        check(vlab_spsc_consume(&b, sink, msg, warm, chunks, chunk, flags, &ports, stamps));
        for (u64 c = 0; c <= chunks; c++)
            result_push(id, stamps[c]);
        trailer(id, 0, &b);
        break;
    case R_CLIENT:
        attach(&a, ARG(7), bytes, msg, 1);
        attach(&b, ARG(8), bytes, msg, 0);
        for (u64 i = 0; i < total; i++) {
            u64 t0 = tsc_begin(), t1;

            check(vlab_spsc_send(&a, 1, src, msg, 1, flags, &ports));
            check(vlab_spsc_recv(&b, sink, msg, flags, &ports));
            t1 = tsc_end();
            if (i >= warm * chunk)
                result_push(id, t1 - t0);
        }
        vlab_spsc_release(&b);
        trailer(id, &a, &b);
        break;
    case R_SERVER:
        attach(&b, ARG(7), bytes, msg, 0);
        attach(&a, ARG(8), bytes, msg, 1);
        for (u64 i = 0; i < total; i++) {
            check(vlab_spsc_recv(&b, sink, msg, flags, &ports));
            check(vlab_spsc_send(&a, 1, sink, msg, 1, flags | VLAB_XFER_F_RAW, &ports));
        }
        vlab_spsc_release(&b);
        trailer(id, &a, &b);
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
        trailer(id, &a, &b);
        break;
    default:
        vlab_fail(role, "unknown ivshmem role");
    }
}
