/*
 * dirty: CPL3 workloads that dirty guest memory, each keeping an exact record of the pages it
 * wrote in every interval (the ground truth that KVM's dirty log is checked against).
 *
 * Memory: the measured buffer is the first data slot (P_DATA_BASE, ARG n_pages 4 KiB pages);
 * the record region is a separate slot (ARG rec_base/rec_size) so that keeping the record
 * never dirties the buffer. The record region holds:
 *   ctrl page    host-written words REQ, GO, STOP, RIDX; guest-written ACK, STATE, IDLE, ...
 *   epoch ring   one 8-word entry per interval ("epoch"): list range, TSC stamps, op counts
 *   table        host-written u32 table (zipf inverse CDF, or per-epoch write counts)
 *   stamps       u32 per buffer page: the last epoch the page was recorded in (dedup)
 *   list ring    u32 page indices, appended once per (page, epoch); the host consumes them
 *
 * Interval protocol (exact by construction): the host requests epoch e+1 by writing REQ. The
 * guest notices it between two writes, closes epoch e (list end, TSC, counts), writes ACK and
 * spins -- without writing anything -- until the host writes GO = e+1 (after harvesting the
 * dirty log) or STOP. Every write recorded in epoch e therefore happened before the harvest
 * began and every write of epoch e+1 after it ended. Epoch 0 is the warm-up: the guest writes
 * every buffer page once so that the pages are mapped (on shadow paging a read fault on an
 * unmapped page of a dirty-logged slot maps it writable and logs it dirty), then waits.
 *
 * Arguments (ARG(i)):
 *   0 workload   enum workload
 *   1 rec_base   GPA of the record region        2 rec_size   its size in bytes
 *   3 n_pages    buffer pages (4 KiB)             4 seed       PRNG seed
 *   5 p1, 6 p2   workload parameters (see below)
 *   7 table_off  byte offset of the u32 table     8 table_len  its entries (0: none)
 *   9 stamp_off  10 list_off  11 list_cap (power of 2)  12 epoch_off  13 epoch_cap (power of 2)
 *   14 flags     F_NO_WARMUP: skip the warm-up writes
 *                F_SYNC: guest-driven epochs (counts only): once an epoch's quota is written
 *                the guest closes the epoch and reports it with ucall SYNC(epoch); the vCPU
 *                stays out of the guest while the host harvests, which then writes REQ = next
 *                epoch (or STOP) before running it again. No host thread races the guest.
 * Workloads:
 *   uniform      random 8-byte writes over all pages
 *   hotcold      p1 hot pages (the first ones) take p2 ppm of the writes; with a table, zipf:
 *                the table is an inverse CDF over page ranks (table_len-1 equal-probability
 *                cells, uniform within a cell)
 *   sequential   streaming full-page writes (rep stosq), page after page, wrapping
 *   ratelimited  p1 pages per second, paced by rdtsc against PARAM(P_TSC_KHZ), distinct pages
 *                in order, over the guest's running time: the waits between epochs (the
 *                measurement's own pauses) do not count, so the rate per interval is exact.
 *                It catches up when it falls behind; each epoch entry says how far behind
 *                schedule the guest was (E_LAG, TSC cycles)
 *   readmostly   random pages; p1 ppm of the operations are writes, the rest reads
 *   counts       epoch e writes table[(e-1) % table_len] distinct random pages (some more
 *                than once), then idles (IDLE = e) until the next epoch
 */
#include "rt.h"

enum workload { W_UNIFORM, W_HOTCOLD, W_SEQUENTIAL, W_RATELIMITED, W_READMOSTLY, W_COUNTS, W_NR };

/* ctrl page words: 0-15 written by the host, 16+ by the guest (another cache line) */
enum { C_REQ = 0, C_GO = 1, C_STOP = 2, C_RIDX = 3,
       C_ACK = 16, C_STATE = 17, C_IDLE = 18, C_CUR = 19, C_TSC_STOP = 20, C_MAGIC = 21 };
enum { S_WARMING = 1, S_READY = 2, S_RUNNING = 3, S_STOPPED = 4 };
enum { E_EPOCH, E_START, E_END, E_TSC_GO, E_TSC_ACK, E_WRITES, E_READS, E_TSC_IDLE, E_LAG,
       E_WORDS = 16 };
#define F_NO_WARMUP 1
#define F_SYNC 2                        /* the guest ends each epoch itself with a ucall */
#define GUEST_MAGIC 0x7974726964UL      /* "dirty" */

static volatile u64 *ctrl;
static volatile u64 *epochs;
static volatile u32 *stamps;
static volatile u32 *list;
static const volatile u32 *table;
static u64 table_len, list_mask, epoch_mask;
static u8 *buf;
static u64 n_pages;
static u64 widx;                /* list entries appended so far (absolute) */
static u64 cur;                 /* current epoch */
static u64 epoch_start;         /* widx when the current epoch opened */
static u64 writes, reads;       /* 8-byte stores / loads to the buffer in this epoch */
static u64 rng;
static u64 lag;                 /* ratelimited: TSC cycles behind schedule (0 if on time) */
static u64 paused;              /* TSC cycles spent waiting for the host between epochs */

#define barrier() __asm__ volatile("" ::: "memory")
#define cpu_relax() __asm__ volatile("pause" ::: "memory")

static inline u64 rnd(void)
{
    return xorshift64s(&rng);
}

static inline volatile u64 *entry(u64 e)
{
    return epochs + (e & epoch_mask) * E_WORDS;
}

static void open_epoch(u64 e)
{
    volatile u64 *en = entry(e);

    cur = e;
    epoch_start = widx;
    writes = 0;
    reads = 0;
    en[E_EPOCH] = e;
    en[E_START] = widx;
    en[E_END] = widx;
    en[E_TSC_ACK] = 0;
    en[E_WRITES] = 0;
    en[E_READS] = 0;
    en[E_TSC_IDLE] = 0;
    en[E_LAG] = 0;
    en[E_TSC_GO] = rdtsc();
    ctrl[C_CUR] = e;
}

/* Close the current epoch, acknowledge `req` and wait (writing nothing) for GO or STOP.
 * Returns 1 when the host said stop. */
static int __attribute__((noinline)) switch_epoch(u64 req)
{
    volatile u64 *en = entry(cur);

    if (req != cur + 1)
        vlab_fail(req, "dirty: the host requested an epoch out of order");
    en[E_END] = widx;
    en[E_WRITES] = writes;
    en[E_READS] = reads;
    u64 t_ack = rdtsc();

    en[E_LAG] = lag;
    en[E_TSC_ACK] = t_ack;
    barrier();                  /* x86 stores are seen in order: ACK after all of the above */
    ctrl[C_ACK] = req;
    for (;;) {
        if (ctrl[C_GO] == req)
            break;
        if (ctrl[C_STOP]) {
            ctrl[C_TSC_STOP] = rdtsc();
            return 1;
        }
        cpu_relax();
    }
    open_epoch(req);
    paused += entry(req)[E_TSC_GO] - t_ack;
    return 0;
}

/* Between two operations: switch epochs when the host asks. 1 = stop. */
static inline int checkpoint(void)
{
    u64 req = ctrl[C_REQ];

    if (req != cur)
        return switch_epoch(req);
    if (ctrl[C_STOP]) {
        ctrl[C_TSC_STOP] = rdtsc();
        return 1;
    }
    return 0;
}

/* F_SYNC: close the current epoch and hand it to the host with a ucall. 1 = stop. */
static int __attribute__((noinline)) sync_epoch(void)
{
    volatile u64 *en = entry(cur);
    u64 req, t_ack = rdtsc();

    en[E_END] = widx;
    en[E_WRITES] = writes;
    en[E_READS] = reads;
    en[E_LAG] = lag;
    en[E_TSC_ACK] = t_ack;
    ctrl[C_ACK] = cur + 1;
    ucall_sync(cur);
    if (ctrl[C_STOP]) {
        ctrl[C_TSC_STOP] = rdtsc();
        return 1;
    }
    req = ctrl[C_REQ];
    if (req != cur + 1)
        vlab_fail(req, "dirty: the host requested an epoch out of order");
    open_epoch(req);
    paused += entry(req)[E_TSC_GO] - t_ack;
    return 0;
}

/* Note page p as written in the current epoch (once per epoch). The caller writes it right
 * after, with no checkpoint in between, so record and write fall in the same epoch. */
static inline int record(u64 p)
{
    for (;;) {
        if (checkpoint())
            return 1;
        if (stamps[p] == (u32)cur)
            return 0;
        if (widx - ctrl[C_RIDX] < list_mask) {      /* keep one slot free */
            stamps[p] = (u32)cur;
            list[widx & list_mask] = (u32)p;
            widx++;
            return 0;
        }
        cpu_relax();            /* list full: wait for the host to consume it */
    }
}

static inline void write64(u64 p, u64 off, u64 v)
{
    *(volatile u64 *)(buf + p * 4096 + off) = v;
    writes++;
}

static void run_uniform(void)
{
    for (;;) {
        u64 r = rnd(), p = r % n_pages;

        if (record(p))
            return;
        write64(p, (r >> 40) & 0xff8, r);
    }
}

static void run_hotcold(u64 hot, u64 share_ppm)
{
    if (table_len < 2 && (!hot || hot > n_pages))
        vlab_fail(hot, "dirty: hotcold needs 1 <= hot pages <= n_pages");
    for (;;) {
        u64 r = rnd(), p;

        if (table_len >= 2) {
            u64 i = r % (table_len - 1), lo = table[i], hi = table[i + 1];

            p = hi > lo ? lo + rnd() % (hi - lo + 1) : lo;
            if (p >= n_pages)
                p = n_pages - 1;
        } else if ((r >> 32) % 1000000 < share_ppm || hot == n_pages) {
            p = rnd() % hot;
        } else {
            p = hot + rnd() % (n_pages - hot);
        }
        if (record(p))
            return;
        write64(p, (r >> 40) & 0xff8, r);
    }
}

static void run_sequential(void)
{
    u64 p = 0, v = rng;

    for (;;) {
        u64 n = 512;
        void *d = buf + p * 4096;

        if (record(p))
            return;
        __asm__ volatile("rep stosq" : "+D"(d), "+c"(n) : "a"(v) : "memory");
        writes += 512;
        v++;
        p = p + 1 == n_pages ? 0 : p + 1;
    }
}

static void run_ratelimited(u64 rate)
{
    u64 hz = PARAM(P_TSC_KHZ) * 1000, q, rem, acc = 0, due, p = 0;

    if (!rate || !hz)
        vlab_fail(rate, "dirty: ratelimited needs a rate > 0 and P_TSC_KHZ");
    q = hz / rate;
    rem = hz % rate;
    due = rdtsc() - paused;
    for (;;) {
        u64 now = rdtsc() - paused;     /* the guest's running time: harvest pauses excluded */

        if ((s64)(now - due) < 0) {
            lag = 0;
            do {
                if (checkpoint())
                    return;
                cpu_relax();
            } while ((s64)(rdtsc() - paused - due) < 0);
        } else {
            lag = now - due;
        }
        if (record(p))
            return;
        write64(p, 0, due);
        p = p + 1 == n_pages ? 0 : p + 1;
        due += q;               /* Bresenham: page j is due at t0 + j * hz / rate, exactly */
        acc += rem;
        if (acc >= rate) {
            acc -= rate;
            due++;
        }
    }
}

static void run_readmostly(u64 write_ppm)
{
    for (;;) {
        u64 r = rnd(), p = r % n_pages, off = (r >> 40) & 0xff8;

        if ((rnd() >> 32) % 1000000 < write_ppm) {
            if (record(p))
                return;
            write64(p, off, r);
        } else {
            if (checkpoint())
                return;
            (void)*(volatile u64 *)(buf + p * 4096 + off);
            reads++;
        }
    }
}

static void run_counts(u64 sync)
{
    u64 idle = 0;

    if (!table_len)
        vlab_fail(0, "dirty: counts needs a table of per-epoch write counts");
    for (;;) {
        u64 want;

        if (checkpoint())
            return;
        want = table[(cur - 1) % table_len];
        if (want > n_pages)
            vlab_fail(want, "dirty: counts asks for more pages than the buffer has");
        if (widx - epoch_start < want) {
            u64 r = rnd(), p = r % n_pages;

            if (record(p))
                return;
            write64(p, (r >> 40) & 0xff8, r);
        } else if (idle != cur) {
            idle = cur;
            entry(cur)[E_TSC_IDLE] = rdtsc();
            ctrl[C_IDLE] = cur;
            if (sync && sync_epoch())
                return;
        } else {
            cpu_relax();
        }
    }
}

static void warm_up(u64 flags)
{
    if (!(flags & F_NO_WARMUP))
        for (u64 p = 0; p < n_pages; p++)
            write64(p, 0, p);
    /* map the record's own pages now rather than in the first measured intervals */
    for (u64 off = 0; off < n_pages * 4; off += 4096)
        stamps[off / 4] = 0;
    for (u64 off = 0; off <= list_mask * 4; off += 4096)
        list[off / 4] = 0;
}

static int fits(u64 off, u64 len, u64 size)
{
    return off <= size && len <= size - off;
}

void payload_main(u64 id)
{
    u64 w = ARG(0), rec_base = ARG(1), rec_size = ARG(2), seed = ARG(4);
    u64 p1 = ARG(5), p2 = ARG(6), table_off = ARG(7), flags = ARG(14);
    u64 stamp_off = ARG(9), list_off = ARG(10), list_cap = ARG(11);
    u64 epoch_off = ARG(12), epoch_cap = ARG(13);

    table_len = ARG(8);
    n_pages = ARG(3);
    GUEST_ASSERT(id == 0);
    GUEST_ASSERT(w < W_NR);
    GUEST_ASSERT(n_pages >= 1 && n_pages <= PARAM(P_DATA_SIZE) / 4096);
    GUEST_ASSERT(list_cap >= 2 && !(list_cap & (list_cap - 1)));
    GUEST_ASSERT(epoch_cap >= 2 && !(epoch_cap & (epoch_cap - 1)));
    GUEST_ASSERT(rec_size >= 4096 && !(rec_base & 4095));
    GUEST_ASSERT(fits(epoch_off, epoch_cap * E_WORDS * 8, rec_size));
    GUEST_ASSERT(fits(table_off, table_len * 4, rec_size));
    GUEST_ASSERT(fits(stamp_off, n_pages * 4, rec_size));
    GUEST_ASSERT(fits(list_off, list_cap * 4, rec_size));
    buf = (u8 *)PARAM(P_DATA_BASE);
    ctrl = (volatile u64 *)rec_base;
    epochs = (volatile u64 *)(rec_base + epoch_off);
    table = (const volatile u32 *)(rec_base + table_off);
    stamps = (volatile u32 *)(rec_base + stamp_off);
    list = (volatile u32 *)(rec_base + list_off);
    list_mask = list_cap - 1;
    epoch_mask = epoch_cap - 1;
    rng = seed * 0x9E3779B97F4A7C15UL + 0x632BE59BD9B4E019UL;
    if (!rng)
        rng = 1;

    ctrl[C_MAGIC] = GUEST_MAGIC;
    ctrl[C_STATE] = S_WARMING;
    widx = 0;
    open_epoch(0);
    warm_up(flags);
    writes = 0;
    ctrl[C_STATE] = S_READY;
    if (flags & F_SYNC) {
        if (w != W_COUNTS)
            vlab_fail(w, "dirty: guest-driven epochs (F_SYNC) need the counts workload");
        if (sync_epoch())
            goto out;
    }
    /* wait for the host to start epoch 1 (closing the warm-up epoch 0) */
    while (cur == 0) {
        if (checkpoint())
            goto out;
        cpu_relax();
    }
    ctrl[C_STATE] = S_RUNNING;
    switch (w) {
    case W_UNIFORM:
        run_uniform();
        break;
    case W_HOTCOLD:
        run_hotcold(p1, p2);
        break;
    case W_SEQUENTIAL:
        run_sequential();
        break;
    case W_RATELIMITED:
        run_ratelimited(p1);
        break;
    case W_READMOSTLY:
        run_readmostly(p1);
        break;
    case W_COUNTS:
        run_counts(flags & F_SYNC);
        break;
    }
out:
    ctrl[C_STATE] = S_STOPPED;
}
