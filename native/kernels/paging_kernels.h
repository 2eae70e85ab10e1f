/*
 * Paging kernels: the memory-access loops the paging experiments time.
 *
 * This one file is compiled twice: into the guest payload (native/guest/payloads/paging.c,
 * freestanding, -mgeneral-regs-only) and into the host library (native/vmm/paging_native.c),
 * so that `where=guest` and `where=native` run the same C code, timed by the same rdtsc
 * brackets. It must therefore depend on neither side: integer types only, no libc, no globals,
 * everything static. tests/test_paging.py checks that both builds include this file and give
 * identical checksums over identical data.
 *
 * Data conventions shared by both sides (and by the Python tests that check checksums):
 *   - a data region is an array of 64-bit words; word i holds pk_word(i, salt), so a checksum
 *     over any set of words is predictable from the indices alone;
 *   - random indices come from a 64-bit LCG whose high bits are scaled into [0, n) with a
 *     128-bit multiply (no modulo bias worth mentioning, no division in the loop);
 *   - a pointer-chase ring stores in each node the byte offset of the next node from the
 *     region base, so the same ring works at any base address (guest-virtual or host-virtual).
 */
#ifndef VLAB_PAGING_KERNELS_H
#define VLAB_PAGING_KERNELS_H

typedef unsigned long pk_u64;           /* 64 bits on both sides (LP64) */

#define PK_PAGE          4096UL
#define PK_CHASE_STRIDE  64UL           /* one chase node per cache line */
#define PK_LCG_MUL       6364136223846793005UL
#define PK_LCG_ADD       1442695040888963407UL

/* lfence; rdtsc; lfence: nothing before it is still running, nothing after it has started */
static inline pk_u64 pk_tsc(void)
{
    unsigned int lo, hi;

    __asm__ volatile("lfence; rdtsc; lfence" : "=a"(lo), "=d"(hi) :: "memory");
    return ((pk_u64)hi << 32) | lo;
}

/* The value word i of a data region holds. */
static inline pk_u64 pk_word(pk_u64 i, pk_u64 salt)
{
    return ((i + salt) * 0x9E3779B97F4A7C15UL) ^ (i >> 7);
}

static inline pk_u64 pk_lcg(pk_u64 s)
{
    return s * PK_LCG_MUL + PK_LCG_ADD;
}

/* The high bits of s scaled into [0, n). */
static inline pk_u64 pk_scale(pk_u64 s, pk_u64 n)
{
    return (pk_u64)(((unsigned __int128)s * n) >> 64);
}

/* Fill nwords words with pk_word(i, salt). */
static inline void pk_fill(pk_u64 *w, pk_u64 nwords, pk_u64 salt)
{
    for (pk_u64 i = 0; i < nwords; i++)
        w[i] = pk_word(i, salt);
}

/*
 * n independent reads of random words of w[0..nwords): the address of a read never depends on
 * the data of an earlier one, so many misses are in flight at once (throughput-bound).
 * *state is the LCG state, advanced; returns the sum of the words read.
 */
static inline pk_u64 pk_random_read(const pk_u64 *w, pk_u64 nwords, pk_u64 n, pk_u64 *state)
{
    pk_u64 s = *state, sum = 0;

    for (pk_u64 i = 0; i < n; i++) {
        s = pk_lcg(s);
        sum += w[pk_scale(s, nwords)];
    }
    *state = s;
    return sum;
}

/*
 * Build a pointer-chase ring over nnodes nodes `stride` bytes apart with Sattolo's algorithm:
 * a uniformly random permutation that is one single cycle through every node.
 */
static inline void pk_chase_build(unsigned char *base, pk_u64 nnodes, pk_u64 stride, pk_u64 seed)
{
    pk_u64 s = seed;

    for (pk_u64 i = 0; i < nnodes; i++)
        *(pk_u64 *)(base + i * stride) = i * stride;
    for (pk_u64 i = nnodes - 1; i > 0 && nnodes > 1; i--) {
        pk_u64 j, a, b;

        s = pk_lcg(s);
        j = pk_scale(s, i);             /* j in [0, i): Sattolo, not Fisher-Yates */
        a = *(pk_u64 *)(base + i * stride);
        b = *(pk_u64 *)(base + j * stride);
        *(pk_u64 *)(base + i * stride) = b;
        *(pk_u64 *)(base + j * stride) = a;
    }
}

/*
 * n dependent loads around the ring from byte offset `off`: each address is the data of the
 * previous load (latency-bound, one miss at a time). Adds the offsets visited to *sum and
 * returns the offset reached.
 */
static inline pk_u64 pk_chase(const unsigned char *base, pk_u64 off, pk_u64 n, pk_u64 *sum)
{
    pk_u64 s = 0;

    for (pk_u64 i = 0; i < n; i++) {
        off = *(const volatile pk_u64 *)(base + off);
        s += off;
    }
    *sum += s;
    return off;
}

/* Write word 0 of each of npages pages `stride` bytes apart: pk_word(index of that word,
 * salt). Returns the sum of the values written. */
static inline pk_u64 pk_touch_write(unsigned char *base, pk_u64 npages, pk_u64 stride, pk_u64 salt)
{
    pk_u64 sum = 0;

    for (pk_u64 i = 0; i < npages; i++) {
        pk_u64 v = pk_word(i * (stride / 8), salt);

        *(volatile pk_u64 *)(base + i * stride) = v;
        sum += v;
    }
    return sum;
}

/* Read word 0 of each of npages pages `stride` bytes apart; returns the sum read. */
static inline pk_u64 pk_touch_read(const unsigned char *base, pk_u64 npages, pk_u64 stride)
{
    pk_u64 sum = 0;

    for (pk_u64 i = 0; i < npages; i++)
        sum += *(const volatile pk_u64 *)(base + i * stride);
    return sum;
}

/* ---- timed samples: one rdtsc bracket around one kernel call; return cycles ---- */

static inline pk_u64 pk_time_random_read(const pk_u64 *w, pk_u64 nwords, pk_u64 n,
                                         pk_u64 *state, pk_u64 *sum)
{
    pk_u64 t0 = pk_tsc(), s = pk_random_read(w, nwords, n, state), t1 = pk_tsc();

    *sum += s;
    return t1 - t0;
}

static inline pk_u64 pk_time_chase(const unsigned char *base, pk_u64 *off, pk_u64 n, pk_u64 *sum)
{
    pk_u64 t0 = pk_tsc(), o = pk_chase(base, *off, n, sum), t1 = pk_tsc();

    *off = o;
    return t1 - t0;
}

static inline pk_u64 pk_time_touch_write(unsigned char *base, pk_u64 npages, pk_u64 stride,
                                         pk_u64 salt, pk_u64 *sum)
{
    pk_u64 t0 = pk_tsc(), s = pk_touch_write(base, npages, stride, salt), t1 = pk_tsc();

    *sum += s;
    return t1 - t0;
}

#endif
