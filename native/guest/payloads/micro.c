/*
 * micro: a table of named micro-operations, each timed as a tight loop between rdtsc brackets.
 *
 * Parameters (ARG(i)):
 *   0 op         one of enum op
 *   1 iters      operations per sample (0 measures the empty bracket)
 *   2 samples    recorded samples
 *   3 a0         op argument (cpuid leaf, port, address, MSR index, hypercall nr, ...)
 *   4 a1         second argument (value written, length)
 *   5 flags      F_MARK: ucall MARK before the first and after every sample (host
 *                timestamps each batch)
 *                F_SYNC: ucall SYNC(1) before the first sample (host snapshots counters)
 *                F_KEEP: wrmsr writes back the MSR's current value (read once, before the
 *                first sample) instead of a1, so a write changes nothing the guest relies on
 *   6 warmup     samples run first and not recorded
 * Each vCPU records into its own results area; all vCPUs run the same loop.
 */
#include "rt.h"

enum op {
    OP_NOP = 0, OP_CPUID, OP_OUT, OP_IN, OP_MMIO_WRITE, OP_MMIO_READ, OP_VMCALL, OP_VMMCALL,
    OP_HLT, OP_RDMSR, OP_WRMSR, OP_CR3_WRITE, OP_INVLPG, OP_SYSCALL, OP_RDTSC, OP_RDTSCP,
    OP_PAUSE, OP_EMPTY, OP_INT3, OP_CR0_WP, OP_CR4_PGE, OP_DR_WRITE, OP_DR_READ, OP_WBINVD,
    OP_INVD,
    /* not timed loops: behaviour probes used by tests */
    OP_SPIN = 100, OP_TRIPLE_FAULT, OP_ASSERT_FAIL, OP_PRINT, OP_TOUCH, OP_WRITE_WORD,
    OP_READ_WORD, OP_UD2, OP_WAIT_WORD, OP_SYSCALL_CS, OP_CPL0_CR3, OP_RDMSR_VALUE,
};

#define F_MARK 1
#define F_SYNC 2
#define F_KEEP 4

#define CR0_WP (1UL << 16)
#define CR4_PGE (1UL << 7)

#define LOOP(name, ...)                                                      \
    static void __attribute__((noinline)) loop_##name(u64 n, u64 a0, u64 a1) \
    {                                                                        \
        (void)a0; (void)a1;                                                  \
        for (u64 i = 0; i < n; i++) {                                        \
            __VA_ARGS__;                                                          \
        }                                                                    \
    }

LOOP(nop, __asm__ volatile("nop"))
LOOP(cpuid, { u32 a = (u32)a0, b, c = 0, d; __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "+c"(c), "=d"(d)); })
LOOP(out, __asm__ volatile("outb %%al, %%dx" :: "a"((u8)a1), "d"((u16)a0)))
LOOP(in, { u8 v; __asm__ volatile("inb %%dx, %%al" : "=a"(v) : "d"((u16)a0)); })
LOOP(mmio_write, *(volatile u32 *)a0 = (u32)a1)
LOOP(mmio_read, (void)*(volatile u32 *)a0)
LOOP(vmcall, { u64 r = a0; __asm__ volatile("vmcall" : "+a"(r) :: "rbx", "rcx", "rdx", "rsi", "memory"); })
LOOP(vmmcall, { u64 r = a0; __asm__ volatile("vmmcall" : "+a"(r) :: "rbx", "rcx", "rdx", "rsi", "memory"); })
LOOP(hlt, __asm__ volatile("hlt"))
LOOP(rdmsr, { u32 lo, hi; __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"((u32)a0)); })
LOOP(wrmsr, __asm__ volatile("wrmsr" :: "c"((u32)a0), "a"((u32)a1), "d"((u32)(a1 >> 32)) : "memory"))
LOOP(cr3_write, __asm__ volatile("mov %0, %%cr3" :: "r"(a1) : "memory"))
LOOP(invlpg, __asm__ volatile("invlpg (%0)" :: "r"(a0) : "memory"))
LOOP(syscall, { u64 r = 0; __asm__ volatile("syscall" : "+a"(r) :: "rcx", "r11", "r10", "memory"); })
LOOP(int3, __asm__ volatile("int3" ::: "memory"))
LOOP(rdtsc, { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); })
LOOP(rdtscp, { u32 lo, hi, c; __asm__ volatile("rdtscp" : "=a"(lo), "=d"(hi), "=c"(c)); })
LOOP(pause, __asm__ volatile("pause"))
LOOP(empty, __asm__ volatile("" ::: "memory"))
/* Each iteration flips one control bit, so every write changes it (a write of the same value may
 * be filtered by the CPU or KVM); payload_main restores the original value after the samples. */
LOOP(cr0_wp, { u64 v; __asm__ volatile("mov %%cr0, %0" : "=r"(v)); v ^= CR0_WP;
               __asm__ volatile("mov %0, %%cr0" :: "r"(v) : "memory"); })
LOOP(cr4_pge, { u64 v; __asm__ volatile("mov %%cr4, %0" : "=r"(v)); v ^= CR4_PGE;
                __asm__ volatile("mov %0, %%cr4" :: "r"(v) : "memory"); })
LOOP(dr_write, __asm__ volatile("mov %0, %%dr7" :: "r"(a1)))
LOOP(dr_read, { u64 v; __asm__ volatile("mov %%dr7, %0" : "=r"(v)); })
LOOP(wbinvd, __asm__ volatile("wbinvd" ::: "memory"))
LOOP(invd, __asm__ volatile("invd" ::: "memory"))

typedef void (*loop_fn)(u64, u64, u64);
static const loop_fn loops[] = {
    [OP_NOP] = loop_nop, [OP_CPUID] = loop_cpuid, [OP_OUT] = loop_out, [OP_IN] = loop_in,
    [OP_MMIO_WRITE] = loop_mmio_write, [OP_MMIO_READ] = loop_mmio_read,
    [OP_VMCALL] = loop_vmcall, [OP_VMMCALL] = loop_vmmcall, [OP_HLT] = loop_hlt,
    [OP_RDMSR] = loop_rdmsr, [OP_WRMSR] = loop_wrmsr, [OP_CR3_WRITE] = loop_cr3_write,
    [OP_INVLPG] = loop_invlpg, [OP_SYSCALL] = loop_syscall, [OP_RDTSC] = loop_rdtsc,
    [OP_RDTSCP] = loop_rdtscp, [OP_PAUSE] = loop_pause, [OP_EMPTY] = loop_empty,
    [OP_INT3] = loop_int3, [OP_CR0_WP] = loop_cr0_wp, [OP_CR4_PGE] = loop_cr4_pge,
    [OP_DR_WRITE] = loop_dr_write, [OP_DR_READ] = loop_dr_read, [OP_WBINVD] = loop_wbinvd,
    [OP_INVD] = loop_invd,
};

static u64 rdmsr64(u32 msr)
{
    u32 lo, hi;

    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}

static u64 read_cr0(void)
{
    u64 v;

    __asm__ volatile("mov %%cr0, %0" : "=r"(v));
    return v;
}

static u64 read_cr4(void)
{
    u64 v;

    __asm__ volatile("mov %%cr4, %0" : "=r"(v));
    return v;
}

static void timed(u64 id, loop_fn fn, u64 a0, u64 a1)
{
    u64 iters = ARG(1), samples = ARG(2), flags = ARG(5), warmup = ARG(6);

    if (flags & F_SYNC)
        ucall_sync(1);
    if (flags & F_MARK)
        ucall_mark();           /* host timestamps bracket every sample: n samples, n+1 marks */
    for (u64 s = 0; s < warmup + samples; s++) {
        u64 t0 = tsc_begin();
        fn(iters, a0, a1);
        u64 t1 = tsc_end();
        if (s >= warmup)
            result_push(id, t1 - t0);
        if (flags & F_MARK)
            ucall_mark();
    }
}

/* Touch every 4 KiB page of [base, base+len): write a tag derived from the address, then read it
 * all back and report a checksum, so the host can check each page was really reached. */
static void touch(u64 id, u64 base, u64 len)
{
    u64 sum = 0;

    for (u64 off = 0; off < len; off += 4096)
        *(volatile u64 *)(base + off) = (base + off) ^ 0x5a5a5a5a5a5a5a5aUL;
    for (u64 off = 0; off < len; off += 4096)
        sum += *(volatile u64 *)(base + off);
    result_push(id, sum);
}

static u64 cpl0_read_cr3(u64 a, u64 b)
{
    (void)a; (void)b;
    return read_cr3() | ((read_cs() & 3) << 60);   /* also report the CPL it ran at */
}

void payload_main(u64 id)
{
    u64 op = ARG(0), a0 = ARG(3), a1 = ARG(4);

    if (op == OP_CR3_WRITE)
        a1 = read_cr3();        /* write back the same value */
    if (op == OP_WRMSR && (ARG(5) & F_KEEP))
        a1 = rdmsr64((u32)a0);
    if (op == OP_CR0_WP || op == OP_CR4_PGE) {
        u64 saved = op == OP_CR0_WP ? read_cr0() : read_cr4();

        timed(id, loops[op], a0, a1);
        if (op == OP_CR0_WP)
            __asm__ volatile("mov %0, %%cr0" :: "r"(saved) : "memory");
        else
            __asm__ volatile("mov %0, %%cr4" :: "r"(saved) : "memory");
        return;
    }
    if (op < sizeof(loops) / sizeof(loops[0]) && loops[op]) {
        timed(id, loops[op], a0, a1);
        return;
    }
    switch (op) {
    case OP_SPIN:
        for (;;)
            __asm__ volatile("" ::: "memory");
    case OP_TRIPLE_FAULT:
        /* wipe the IDT (it is user-writable here) and fault: #UD -> #NP -> #DF -> shutdown */
        memset((void *)0x2000UL, 0, 4096);
        __asm__ volatile("ud2");
        break;
    case OP_UD2:
        __asm__ volatile("ud2");
        break;
    case OP_ASSERT_FAIL:
        GUEST_ASSERT(a0 == a1);
        break;
    case OP_PRINT:
        vlab_print("hello from the guest");
        break;
    case OP_TOUCH:
        touch(id, a0, a1);
        break;
    case OP_WRITE_WORD:
        *(volatile u64 *)a0 = a1;
        break;
    case OP_READ_WORD:
        result_push(id, *(volatile u64 *)a0);
        break;
    case OP_SYSCALL_CS: {
        /* which CS the syscall handler ran with: tells whether syscall reached CPL0 */
        u64 r = 0;
        __asm__ volatile("syscall" : "+a"(r) :: "rcx", "r11", "r10", "memory");
        result_push(id, r);
        break;
    }
    case OP_CPL0_CR3:
        /* from CPL3, read CR3 at CPL0 through the call gate */
        result_push(id, cpl0_call(cpl0_read_cr3, 0, 0));
        result_push(id, read_cs());
        break;
    case OP_RDMSR_VALUE:
        /* probe: the MSR's value (a #GP on an MSR the vCPU lacks is reported as a guest fault) */
        result_push(id, rdmsr64((u32)a0));
        break;
    case OP_WAIT_WORD:
        /* spin until the word at a0 equals a1 (another VM writes it through shared memory) */
        while (*(volatile u64 *)a0 != a1)
            __asm__ volatile("pause");
        result_push(id, a1);
        break;
    default:
        vlab_fail(op, "unknown micro op");
    }
}
