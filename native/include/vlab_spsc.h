/*
 * The message format and the single-producer/single-consumer ring that io.ivshmem runs between
 * two guests and io.native_ring runs between two host threads. It is one piece of freestanding
 * C (no libc, general registers only) included by the guest payload and by the host VMM, so the
 * native figure is the physical limit of exactly the code the guests run.
 *
 * Messages: a 16-byte header (sequence number, length, checksum of the payload) and a payload.
 * With VLAB_XFER_F_VERIFY the producer derives every payload byte from the sequence number and
 * the consumer recomputes the checksum, so a lost, duplicated, reordered or corrupted byte is
 * detected; without it only the header (sequence and length) is checked, which keeps the
 * checking cost out of throughput figures.
 *
 * Ring: `slots` (a power of two) slots of `slot_bytes`, a producer index `head` and a consumer
 * index `tail` on separate cache lines, both free-running 64-bit counters. Either end treats the
 * other as hostile: an index that claims more than `slots` messages in flight is refused
 * (VLAB_SPSC_CORRUPT) and slot addresses are always computed from the local, validated geometry.
 *
 * Doorbells: a consumer that finds the ring empty may announce `waiting`, re-check, and sleep
 * (VLAB_SPSC_WAIT); a producer that publishes checks `waiting` after a full fence and rings
 * (VLAB_SPSC_KICK). The store-fence-load on both sides (Dekker) means a published message and
 * a sleeping consumer are never both missed. The includer defines the two macros (a guest does
 * port I/O, see payloads/ivshmem.c); by default they do nothing and the ring is polled.
 *
 * x86-64 only: stores are not reordered with other stores nor loads with loads (TSO), so a
 * compiler barrier orders the payload before the index that publishes it.
 */
#ifndef VLAB_SPSC_H
#define VLAB_SPSC_H

#include <stdint.h>

#define VLAB_MSG_HDR         16
#define VLAB_MSG_MIN         64
#define VLAB_MSG_MAX         65536
#define VLAB_RING_MAGIC      0x474e49524c56ULL   /* "VLRING" */
#define VLAB_RING_HDR_BYTES  4096               /* indices and geometry; slots follow */

/* xfer flags (shared by guest payloads and the host runners; vlab.h repeats them for cffi) */
#ifndef VLAB_XFER_F_VERIFY
#define VLAB_XFER_F_VERIFY     1   /* payload derived from seq, checksums checked */
#define VLAB_XFER_F_DOORBELL   2   /* consumer sleeps on an empty ring, producer rings */
#define VLAB_XFER_F_RAW        4   /* send the source buffer as is (echo) */
#define VLAB_XFER_F_BAD_SEQ    8   /* fault injection: skip one sequence number */
#define VLAB_XFER_F_BAD_SUM    16  /* fault injection: corrupt one payload byte after summing */
#endif

#define VLAB_SPSC_CORRUPT    (~0ULL)

#ifndef VLAB_SPSC_KICK
#define VLAB_SPSC_KICK(ctx) do { (void)(ctx); } while (0)
#endif
#ifndef VLAB_SPSC_WAIT
#define VLAB_SPSC_WAIT(ctx) do { (void)(ctx); } while (0)
#endif
#ifndef VLAB_SPSC_ABORTED
#define VLAB_SPSC_ABORTED(ctx) 0
#endif

struct vlab_msg_hdr {
    uint64_t seq;
    uint32_t len;       /* whole message, header included */
    uint32_t sum;       /* vlab_msg_sum of the payload (0 when not verifying) */
};

struct vlab_spsc {
    volatile uint64_t head;          /* producer: messages published */
    uint8_t pad0[56];
    volatile uint64_t tail;          /* consumer: messages released */
    uint8_t pad1[56];
    volatile uint64_t waiting;       /* consumer: about to sleep on the doorbell */
    uint8_t pad2[56];
    uint64_t magic;                  /* geometry, written once by whoever sets the ring up */
    uint32_t slots;
    uint32_t slot_bytes;
    uint8_t pad3[48];
};

/* One end of a ring: a local, validated copy of the geometry plus its own position. */
struct vlab_spsc_end {
    struct vlab_spsc *r;
    uint8_t *data;
    uint64_t slots;                  /* power of two */
    uint64_t slot_bytes;
    uint64_t pos;                    /* next message to write (producer) or read (consumer) */
    uint64_t other;                  /* last seen index of the other end */
    uint64_t published;              /* producer: head last published */
    uint64_t seq;                    /* next sequence number to send / expect */
    /* statistics */
    uint64_t kicks, waits, full_spins, empty_spins;
    uint64_t received, bytes, seq_errors, len_errors, sum_errors, hash;
};

static inline void vlab_cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void vlab_barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline void vlab_mfence(void) { __asm__ volatile("mfence" ::: "memory"); }

static inline uint64_t vlab_tsc(void)
{
    uint32_t lo, hi;

    __asm__ volatile("lfence; rdtsc; lfence" : "=a"(lo), "=d"(hi) :: "memory");
    return ((uint64_t)hi << 32) | lo;
}

/* The copy both sides use: rep movsb (fast strings; no SSE needed, so it builds for guests). */
static inline void vlab_copy(void *dst, const void *src, uint64_t n)
{
    __asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) :: "memory");
}

static inline uint64_t vlab_mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

/* Payload byte stream of message `seq`: 8-byte words of mix64(seq, word index). */
static inline void vlab_msg_fill(uint8_t *p, uint64_t n, uint64_t seq)
{
    uint64_t base = (seq + 1) * 0x9e3779b97f4a7c15ULL, i = 0;

    for (; i + 8 <= n; i += 8) {
        uint64_t w = vlab_mix64(base + i);

        __builtin_memcpy(p + i, &w, 8);
    }
    if (i < n) {
        uint64_t w = vlab_mix64(base + i);

        for (uint64_t j = 0; i + j < n; j++)
            p[i + j] = (uint8_t)(w >> (8 * j));
    }
}

/* Order-sensitive checksum (FNV-1a over 8-byte words), folded to 32 bits. */
static inline uint32_t vlab_msg_sum(const uint8_t *p, uint64_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL, i = 0;

    for (; i + 8 <= n; i += 8) {
        uint64_t w;

        __builtin_memcpy(&w, p + i, 8);
        h = (h ^ w) * 0x100000001b3ULL;
    }
    for (; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ULL;
    h ^= n;
    return (uint32_t)(h ^ (h >> 32));
}

/* Build message `seq` in `buf` (msg_bytes long): header, and with verify a derived payload. */
static inline void vlab_msg_build(uint8_t *buf, uint64_t msg_bytes, uint64_t seq, uint32_t flags)
{
    uint32_t sum = 0;
    uint64_t len_sum;

    if (flags & VLAB_XFER_F_VERIFY) {
        vlab_msg_fill(buf + VLAB_MSG_HDR, msg_bytes - VLAB_MSG_HDR, seq);
        sum = vlab_msg_sum(buf + VLAB_MSG_HDR, msg_bytes - VLAB_MSG_HDR);
        if ((flags & VLAB_XFER_F_BAD_SUM) && seq == 3)
            buf[msg_bytes - 1] ^= 0x40;      /* the checksum no longer matches */
    }
    /* The header as two 64-bit stores (len and sum share the second word; x86 is little-endian,
     * so this is struct vlab_msg_hdr's layout). Building a struct on the stack and copying it
     * made GCC, without SSE (the guest build), store len and sum as two 32-bit halves and
     * reload them as one 64-bit word: a failed store forward, ~15 cycles per message, which
     * made the guest's ring 1.5x slower than the same code on the host. */
    len_sum = (uint64_t)(uint32_t)msg_bytes | ((uint64_t)sum << 32);
    __builtin_memcpy(buf, &seq, 8);
    __builtin_memcpy(buf + 8, &len_sum, 8);
}

/* Check a received message against what the consumer expects; counts errors, returns 0 if ok. */
static inline int vlab_msg_check(struct vlab_spsc_end *e, const uint8_t *buf, uint64_t msg_bytes,
                                 uint32_t flags)
{
    struct vlab_msg_hdr h;
    int bad = 0;

    __builtin_memcpy(&h, buf, sizeof(h));
    if (h.seq != e->seq) {
        e->seq_errors++;
        bad = 1;
    }
    e->seq = h.seq + 1;            /* resynchronise: count each gap once */
    if (h.len != msg_bytes) {
        e->len_errors++;
        bad = 1;
    }
    if ((flags & VLAB_XFER_F_VERIFY) &&
        h.sum != vlab_msg_sum(buf + VLAB_MSG_HDR, msg_bytes - VLAB_MSG_HDR)) {
        e->sum_errors++;
        bad = 1;
    }
    e->received++;
    e->bytes += msg_bytes;
    e->hash = (e->hash ^ h.seq ^ ((uint64_t)h.sum << 32)) * 0x100000001b3ULL;
    return bad;
}

/* Ring geometry for messages of msg_bytes: power-of-two slots, about 1 MiB, 8..256 slots. */
static inline void vlab_spsc_geometry(uint64_t msg_bytes, uint64_t *slots, uint64_t *slot_bytes)
{
    uint64_t sb = (msg_bytes + 63) & ~63ULL, n = 256;

    while (n > 8 && n * sb > (1ULL << 20))
        n >>= 1;
    *slots = n;
    *slot_bytes = sb;
}

static inline uint64_t vlab_spsc_bytes(uint64_t slots, uint64_t slot_bytes)
{
    return VLAB_RING_HDR_BYTES + slots * slot_bytes;
}

/* Set a ring up in `mem` (done once, by one side, before either end attaches). */
static inline void vlab_spsc_init(void *mem, uint64_t slots, uint64_t slot_bytes)
{
    struct vlab_spsc *r = mem;

    r->head = 0;
    r->tail = 0;
    r->waiting = 0;
    r->slots = (uint32_t)slots;
    r->slot_bytes = (uint32_t)slot_bytes;
    vlab_barrier();
    r->magic = VLAB_RING_MAGIC;
}

/*
 * Attach one end to the ring at `mem`, `size` bytes of memory the peer can also write. The
 * geometry is read once and checked against `size`, and the end keeps its own copy.
 * Returns 0, or -1 when the ring is malformed.
 */
static inline int vlab_spsc_attach(struct vlab_spsc_end *e, void *mem, uint64_t size,
                                   uint64_t msg_bytes, int producer)
{
    struct vlab_spsc *r = mem;
    uint64_t slots = r->slots, sb = r->slot_bytes;

    __builtin_memset(e, 0, sizeof(*e));
    if (r->magic != VLAB_RING_MAGIC || !slots || (slots & (slots - 1)) || sb < msg_bytes ||
        sb % 64 || size < VLAB_RING_HDR_BYTES || (size - VLAB_RING_HDR_BYTES) / sb < slots)
        return -1;
    e->r = r;
    e->data = (uint8_t *)mem + VLAB_RING_HDR_BYTES;
    e->slots = slots;
    e->slot_bytes = sb;
    e->pos = producer ? r->head : r->tail;
    e->other = producer ? r->tail : r->head;
    e->published = e->pos;
    if ((producer ? e->pos - e->other : e->other - e->pos) > slots)
        return -1;
    return 0;
}

static inline uint8_t *vlab_spsc_slot(struct vlab_spsc_end *e, uint64_t i)
{
    return e->data + (i & (e->slots - 1)) * e->slot_bytes;
}

/* Producer: make everything written so far visible; ring the doorbell if the consumer sleeps. */
static inline void vlab_spsc_publish(struct vlab_spsc_end *e, uint32_t flags, void *ctx)
{
    vlab_barrier();
    e->r->head = e->pos;
    e->published = e->pos;
    if (flags & VLAB_XFER_F_DOORBELL) {
        vlab_mfence();
        if (e->r->waiting) {
            VLAB_SPSC_KICK(ctx);
            e->kicks++;
        }
    }
}

/*
 * Producer: send `n` messages of msg_bytes built in `src` (or `src` as is with VLAB_XFER_F_RAW),
 * publishing every `batch` messages and whenever the ring is full. Returns 0, or
 * VLAB_SPSC_CORRUPT if the consumer's index is impossible, or 1 if aborted.
 */
static inline uint64_t vlab_spsc_send(struct vlab_spsc_end *e, uint64_t n, uint8_t *src,
                                      uint64_t msg_bytes, uint64_t batch, uint32_t flags,
                                      void *ctx)
{
    for (uint64_t i = 0; i < n; i++) {
        while (e->pos - e->other >= e->slots) {
            if (e->published != e->pos)
                vlab_spsc_publish(e, flags, ctx);
            e->other = e->r->tail;
            if (e->pos - e->other > e->slots)
                return VLAB_SPSC_CORRUPT;
            if (e->pos - e->other >= e->slots) {
                e->full_spins++;
                if (VLAB_SPSC_ABORTED(ctx))
                    return 1;
                vlab_cpu_relax();
            }
        }
        if (!(flags & VLAB_XFER_F_RAW)) {
            if ((flags & VLAB_XFER_F_BAD_SEQ) && e->seq == 5)
                e->seq++;                /* fault injection: message 5 never exists */
            vlab_msg_build(src, msg_bytes, e->seq, flags);
            e->seq++;
        }
        vlab_copy(vlab_spsc_slot(e, e->pos), src, msg_bytes);
        e->pos++;
        if (e->pos - e->published >= batch)
            vlab_spsc_publish(e, flags, ctx);
    }
    if (e->published != e->pos)
        vlab_spsc_publish(e, flags, ctx);
    return 0;
}

/* Consumer: release the slots read so far. */
static inline void vlab_spsc_release(struct vlab_spsc_end *e)
{
    vlab_barrier();
    e->r->tail = e->pos;
}

/*
 * Consumer: wait for one message, copy it into `sink` and check it. Returns 0, VLAB_SPSC_CORRUPT
 * if the producer's index is impossible, or 1 if aborted. Slots are released lazily: when the
 * locally known messages are used up, before re-reading the producer's index.
 */
static inline uint64_t vlab_spsc_recv(struct vlab_spsc_end *e, uint8_t *sink, uint64_t msg_bytes,
                                      uint32_t flags, void *ctx)
{
    while (e->other == e->pos) {
        vlab_spsc_release(e);
        e->other = e->r->head;
        if (e->other - e->pos > e->slots)
            return VLAB_SPSC_CORRUPT;
        if (e->other != e->pos)
            break;
        if (VLAB_SPSC_ABORTED(ctx))
            return 1;
        if (flags & VLAB_XFER_F_DOORBELL) {
            e->r->waiting = 1;
            vlab_mfence();
            e->other = e->r->head;
            if (e->other - e->pos > e->slots)
                return VLAB_SPSC_CORRUPT;
            if (e->other == e->pos) {
                VLAB_SPSC_WAIT(ctx);
                e->waits++;
            }
            e->r->waiting = 0;
        } else {
            e->empty_spins++;
            vlab_cpu_relax();
        }
    }
    vlab_copy(sink, vlab_spsc_slot(e, e->pos), msg_bytes);
    e->pos++;
    vlab_msg_check(e, sink, msg_bytes, flags);
    return 0;
}

/*
 * One thread plays both ends: fill the ring, drain it, `rounds` times. No other CPU is
 * involved, so this is the ring code's own cost per message (cache-hot, no line transfers).
 * `prod` and `cons` are attached to the same ring. Returns TSC cycles, or 0 if corrupt.
 */
static inline uint64_t vlab_spsc_solo(struct vlab_spsc_end *prod, struct vlab_spsc_end *cons,
                                      uint8_t *src, uint8_t *sink, uint64_t msg_bytes,
                                      uint64_t rounds, uint64_t batch, uint32_t flags)
{
    uint64_t t0 = vlab_tsc();

    for (uint64_t r = 0; r < rounds; r++) {
        if (vlab_spsc_send(prod, prod->slots, src, msg_bytes, batch, flags, 0))
            return 0;
        for (uint64_t i = 0; i < cons->slots; i++)
            if (vlab_spsc_recv(cons, sink, msg_bytes, flags, 0))
                return 0;
        vlab_spsc_release(cons);
        prod->other = cons->pos;
    }
    return vlab_tsc() - t0;
}

/*
 * The consumer's whole loop: receive `chunks` x `chunk_msgs` messages after `warm` warm-up
 * chunks, taking a timestamp at each chunk boundary (`stamps` has chunks + 1 entries).
 * Timing at the consumer counts a message when it has arrived, whatever the buffering.
 */
static inline uint64_t vlab_spsc_consume(struct vlab_spsc_end *e, uint8_t *sink,
                                         uint64_t msg_bytes, uint64_t warm, uint64_t chunks,
                                         uint64_t chunk_msgs, uint32_t flags, void *ctx,
                                         uint64_t *stamps)
{
    for (uint64_t c = 0; c < warm + chunks; c++) {
        if (c >= warm)
            stamps[c - warm] = vlab_tsc();
        for (uint64_t i = 0; i < chunk_msgs; i++) {
            uint64_t r = vlab_spsc_recv(e, sink, msg_bytes, flags, ctx);

            if (r)
                return r;
        }
    }
    stamps[chunks] = vlab_tsc();
    vlab_spsc_release(e);
    return 0;
}

#endif
