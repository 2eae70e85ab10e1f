/* Guest runtime API: parameters, results, ucalls, rdtsc brackets, CPL0 calls. Freestanding. */
#ifndef VLAB_RT_H
#define VLAB_RT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long s64;

#define VLAB_GPA_PARAMS 0x4000UL
#define UCALL_PORT 0xF4
#define UCALL_DONE 1
#define UCALL_SYNC 2
#define UCALL_FAIL 3
#define UCALL_PRINT 4
#define UCALL_MARK 5

/* Parameter page: u64 slots. 0-15 belong to the runtime, 16+ to the payload. */
enum {
    P_MAGIC = 0, P_NR_VCPUS, P_RESULTS_BASE, P_RESULTS_STRIDE, P_DATA_BASE, P_DATA_SIZE,
    P_MMIO_BASE, P_TSC_KHZ, P_CR3, P_CR3_ALT, P_SHARED_BASE, P_SHARED_SIZE,
    P_ARG0 = 16,
};
#define PARAM(i) (((volatile u64 *)VLAB_GPA_PARAMS)[(i)])
#define ARG(i) PARAM(P_ARG0 + (i))
/* per-vCPU parameter block: 64 slots each, after the common ones */
#define VPARAM(id, i) PARAM(128 + 64 * (id) + (i))

static inline void ucall(u8 type, u64 a0, u64 a1, u64 a2, u64 a3)
{
    __asm__ volatile("outb %%al, %[port]"
                     :: "a"(type), "S"(a0), "d"(a1), "c"(a2), "D"(a3), [port] "N"(UCALL_PORT)
                     : "memory");
}

static inline void ucall_mark(void) { ucall(UCALL_MARK, 0, 0, 0, 0); }
static inline void ucall_sync(u64 stage) { ucall(UCALL_SYNC, stage, 0, 0, 0); }

static inline u64 tsc_begin(void)
{
    u32 lo, hi;

    __asm__ volatile("lfence; rdtsc; lfence" : "=a"(lo), "=d"(hi) :: "memory");
    return ((u64)hi << 32) | lo;
}

static inline u64 tsc_end(void)
{
    u32 lo, hi;

    __asm__ volatile("lfence; rdtsc; lfence" : "=a"(lo), "=d"(hi) :: "memory");
    return ((u64)hi << 32) | lo;
}

/* A bare rdtsc (no fences): for pacing loops, not for timing brackets. */
static inline u64 rdtsc(void)
{
    u32 lo, hi;

    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi) :: "memory");
    return ((u64)hi << 32) | lo;
}

/* xorshift64*: a fast, seedable generator for guest workloads (state must not be 0). */
static inline u64 xorshift64s(u64 *state)
{
    u64 x = *state;

    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1DUL;
}

static inline u64 read_cr3(void)
{
    u64 v;

    __asm__ volatile("mov %%cr3, %0" : "=r"(v));
    return v;
}

static inline u64 read_cs(void)
{
    u64 v;

    __asm__ volatile("mov %%cs, %0" : "=r"(v));
    return v;
}

/* Call fn(a, b) at CPL0 through the int $4 gate (works from CPL3 or CPL0 alike). */
static inline u64 cpl0_call(u64 (*fn)(u64, u64), u64 a, u64 b)
{
    u64 ret;

    if ((read_cs() & 3) == 0)
        return fn(a, b);
    __asm__ volatile("int $4" : "=a"(ret), "+D"(a), "+S"(b) : "a"(fn) : "memory");
    return ret;
}

/* results: per vCPU, [count][capacity][samples...] */
static inline volatile u64 *results_of(u64 id)
{
    return (volatile u64 *)(PARAM(P_RESULTS_BASE) + id * PARAM(P_RESULTS_STRIDE));
}

static inline void result_push(u64 id, u64 v)
{
    volatile u64 *r = results_of(id);
    u64 n = r[0];

    if (n < r[1])
        r[2 + n] = v;
    r[0] = n + 1;
}

void vlab_fail(u64 code, const char *msg);
void vlab_print(const char *msg);
u64 vlab_strlen(const char *s);
void *memset(void *d, int c, u64 n);
void *memcpy(void *d, const void *s, u64 n);

#define STR2(x) #x
#define STR(x) STR2(x)
#define GUEST_ASSERT(c) do { if (!(c)) vlab_fail(__LINE__, __FILE__ ":" STR(__LINE__) ": " #c); } while (0)

/* each payload provides this */
void payload_main(u64 id);

#endif
