/*
 * migrate: CPL3 workloads that are live-migrated and then check, on the destination, that
 * nothing was lost: the counter continued from where it was, every page holds what the
 * guest last wrote to it, and time (the TSC) went on.
 *
 * Memory (the first data slot, P_DATA_BASE):
 *   page 0        counter page, written by the guest only:
 *                 MAGIC, COUNT, CHECK = mix(COUNT), TSC of the last tick, the largest TSC
 *                 step seen between two ticks, the generation seen, migrations seen, the TSC
 *                 step across the last migration
 *   pages 1..T    sequence table: u32 per working-set page, how many times it was written
 *   pages T+1..   working set, `ws` pages of 4 KiB
 * A working-set page p written for the s-th time holds: word 0 = p ^ PAGE_MAGIC, word 1 = s,
 * word 2 + (s % 510) = mix(p, s). So the whole page is a function of (p, s): word 2 + k holds
 * mix(p, s') for the latest s' <= s with s' % 510 == k (0 if there is none), and a page never
 * written is all zeros. The guest also keeps the total number of writes in a local variable
 * (a register or its stack), which travels with the vCPU state, not with the page contents.
 *
 * Control (host-written words of the parameter page):
 *   ARG(8)  STOP: finish, verify everything and report
 *   ARG(9)  GEN:  the destination VMM bumps it before resuming a migrated guest; the guest's
 *                 next tick sees the change and makes a MARK ucall at once, so the host gets a
 *                 timestamp of the guest's first steps on the destination.
 *
 * Arguments: ARG(0) workload (0 counter, 1 uniform), ARG(1) ws pages, ARG(2) rate in pages/s
 * (0: as fast as possible), ARG(3) PRNG seed. The uniform writer is paced by rdtsc against
 * PARAM(P_TSC_KHZ); when it falls behind by more than ARG(4) microseconds (default 1000) of
 * writes (its vCPU was descheduled or throttled) it drops the backlog instead of catching up,
 * like a CPU-bound guest that simply got less CPU: so throttling the vCPU slows the writer.
 *
 * Results (result_push, in this order) after STOP: 0 RESULT_MAGIC, 1 workload, 2 counter,
 * 3 total writes, 4 pages checked, 5 bad pages, 6 first bad page (or ~0), 7 sum of the sequence
 * table, 8 largest TSC step between two ticks, 9 migrations seen, 10 TSC step across the last
 * migration, 11 generation seen, 12 ticks since the last migration.
 */
#include "rt.h"

#define W_COUNTER 0
#define W_UNIFORM 1

#define A_WORKLOAD 0
#define A_WS 1
#define A_RATE 2
#define A_SEED 3
#define A_LAG_US 4
#define A_STOP 8
#define A_GEN 9

#define CNT_MAGIC 0x726574756e756f63UL    /* "counter" */
#define PAGE_MAGIC 0x6567617067696dUL     /* "migpage" */
#define RESULT_MAGIC 0x544c5345524749UL   /* "IGRESLT" */
#define SLOTS 510

enum { K_MAGIC, K_COUNT, K_CHECK, K_TSC, K_MAXGAP, K_GEN, K_MIGRATIONS, K_MIGGAP, K_SINCE };

static volatile u64 *cnt;
static volatile u32 *seq;
static u8 *ws;
static u64 ws_pages;
static u64 rng;

static inline u64 mix(u64 x)
{
    x += 0x9e3779b97f4a7c15UL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9UL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebUL;
    return x ^ (x >> 31);
}

static inline u64 page_word(u64 p, u64 s)
{
    return mix(p * 0x100000001b3UL ^ s);
}

static inline u64 rnd(void)
{
    return xorshift64s(&rng);
}

/*
 * One tick of the counter: check that the page still says what this vCPU last wrote (the
 * local copy in `*local` comes with the vCPU state, the page with guest memory), that the TSC
 * did not go backwards, then count. Notices a migration (GEN changed) and marks it at once.
 */
static inline void tick(u64 *local, u64 *gen)
{
    u64 c = cnt[K_COUNT], now, last, g;

    if (c != *local || cnt[K_CHECK] != mix(c))
        vlab_fail(c, "migrate: the counter page does not hold what the guest last wrote");
    now = rdtsc();
    last = cnt[K_TSC];
    if (now < last)
        vlab_fail(last - now, "migrate: the TSC went backwards");
    g = ARG(A_GEN);
    if (g != *gen) {
        ucall_mark();                       /* first thing after the switch-over */
        /* a fresh reading: `now` may predate the pause if it fell inside this tick */
        now = rdtsc();
        *gen = g;
        cnt[K_GEN] = g;
        cnt[K_MIGRATIONS] = cnt[K_MIGRATIONS] + 1;
        cnt[K_MIGGAP] = now - last;
        cnt[K_SINCE] = 0;
    } else if (now - last > cnt[K_MAXGAP]) {
        cnt[K_MAXGAP] = now - last;
    }
    c++;
    cnt[K_COUNT] = c;
    cnt[K_CHECK] = mix(c);
    cnt[K_TSC] = now;
    cnt[K_SINCE] = cnt[K_SINCE] + 1;
    *local = c;
}

static inline void write_page(u64 p)
{
    volatile u64 *w = (volatile u64 *)(ws + p * 4096);
    u64 s = seq[p] + 1;

    seq[p] = (u32)s;
    w[0] = p ^ PAGE_MAGIC;
    w[1] = s;
    w[2 + s % SLOTS] = page_word(p, s);
}

/* 1 if page p holds exactly what `s` writes leave there. */
static int check_page(u64 p, u64 s)
{
    const volatile u64 *w = (const volatile u64 *)(ws + p * 4096);

    if (!s) {
        for (u64 i = 0; i < 512; i++)
            if (w[i])
                return 0;
        return 1;
    }
    if (w[0] != (p ^ PAGE_MAGIC) || w[1] != s)
        return 0;
    for (u64 k = 0; k < SLOTS; k++) {
        u64 want = 0;

        if (k <= s) {
            u64 sp = s - ((s - k) % SLOTS);

            if (sp)
                want = page_word(p, sp);
        }
        if (w[2 + k] != want)
            return 0;
    }
    return 1;
}

void payload_main(u64 id)
{
    u64 workload = ARG(A_WORKLOAD), rate = ARG(A_RATE), khz = PARAM(P_TSC_KHZ);
    u64 base = PARAM(P_DATA_BASE), size = PARAM(P_DATA_SIZE);
    u64 table_pages, local, gen, writes = 0, period = 0, lag_cap = 0, next, checked = 0,
        bad = 0, first_bad = ~0UL, sum = 0;

    if (id != 0)
        vlab_fail(id, "migrate: runs on vCPU 0 only");
    if (workload > W_UNIFORM)
        vlab_fail(workload, "migrate: unknown workload");
    ws_pages = workload == W_UNIFORM ? ARG(A_WS) : 0;
    table_pages = (ws_pages * 4 + 4095) / 4096;
    if (!base || size / 4096 < 1 + table_pages + ws_pages || (workload == W_UNIFORM && !ws_pages))
        vlab_fail(size, "migrate: the data slot is too small for the working set");
    cnt = (volatile u64 *)base;
    seq = (volatile u32 *)(base + 4096);
    ws = (u8 *)(base + 4096 * (1 + table_pages));
    rng = ARG(A_SEED) | 1;
    if (rate) {
        if (!khz)
            vlab_fail(0, "migrate: P_TSC_KHZ is 0, cannot pace the writer");
        period = khz * 1000 / rate;
        if (!period)
            period = 1;
        lag_cap = khz * (ARG(A_LAG_US) ? ARG(A_LAG_US) : 1000) / 1000;
    }
    cnt[K_MAGIC] = CNT_MAGIC;
    cnt[K_COUNT] = 0;
    cnt[K_CHECK] = mix(0);
    cnt[K_TSC] = rdtsc();
    local = 0;
    gen = ARG(A_GEN);
    cnt[K_GEN] = gen;
    next = rdtsc();
    for (;;) {
        tick(&local, &gen);
        if (ARG(A_STOP))
            break;
        if (workload != W_UNIFORM)
            continue;
        if (rate) {
            u64 now = rdtsc();

            if (now < next)
                continue;
            if (now - next > lag_cap)
                next = now;                 /* fell behind: drop the backlog */
            next += period;
        }
        write_page(rnd() % ws_pages);
        writes++;
    }
    /* verify: the sequence table against the local count, every page against the table */
    for (u64 p = 0; p < ws_pages; p++) {
        u64 s = seq[p];

        sum += s;
        checked++;
        if (!check_page(p, s)) {
            if (!bad)
                first_bad = p;
            bad++;
        }
    }
    result_push(id, RESULT_MAGIC);
    result_push(id, workload);
    result_push(id, local);
    result_push(id, writes);
    result_push(id, checked);
    result_push(id, bad);
    result_push(id, first_bad);
    result_push(id, sum);
    result_push(id, cnt[K_MAXGAP]);
    result_push(id, cnt[K_MIGRATIONS]);
    result_push(id, cnt[K_MIGGAP]);
    result_push(id, gen);
    result_push(id, cnt[K_SINCE]);
}
