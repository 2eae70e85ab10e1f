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
 *                F_X2APIC: interrupt ops drive the local APIC in x2APIC mode (MSRs, CPL0)
 *                F_HALT: ipi_other's target halts between IPIs; irq_wait halts while waiting
 *   6 warmup     samples run first and not recorded
 *   7 stop       ipi_other: the target's delivery count at which it leaves, set by vCPU 0 just
 *                before its last IPI (host clears)
 *   8 ready      ... the target sets it once it takes interrupts (host clears)
 *   9 halting    ... the target sets it just before it halts; the sender clears it
 * Each vCPU records into its own results area; all vCPUs run the same loop, except for
 * ipi_other, where vCPU 0 sends and times while every other vCPU is a target.
 *
 * Interrupt ops (see native/guest/lib/apic.h) take the vector in a0. The handler counts every
 * delivery per vCPU and EOIs; each op waits (bounded) until its interrupt was handled, so one
 * operation is one complete delivery. Per-vCPU figures the host reads from VPARAM(id, i):
 *   timer_*: 0 sum, 1 count, 2 min, 3 max of handler-entry TSC - deadline (signed)
 *   tsc_probe / irq_wait: 4 the guest's rdtsc before its first sync
 *   every interrupt op: 5 deliveries of the op's vector, 6 EOIs, 7 EOI cycles, 8 spurious
 *   (cumulative); VPARAM(0, 9) ipi_other's IPIs the target did not take within IRQ_WAIT
 */
#include "rt.h"
#include "apic.h"

enum op {
    OP_NOP = 0, OP_CPUID, OP_OUT, OP_IN, OP_MMIO_WRITE, OP_MMIO_READ, OP_VMCALL, OP_VMMCALL,
    OP_HLT, OP_RDMSR, OP_WRMSR, OP_CR3_WRITE, OP_INVLPG, OP_SYSCALL, OP_RDTSC, OP_RDTSCP,
    OP_PAUSE, OP_EMPTY, OP_INT3, OP_CR0_WP, OP_CR4_PGE, OP_DR_WRITE, OP_DR_READ, OP_WBINVD,
    OP_INVD, OP_IPI_SELF, OP_EOI, OP_CR8_WRITE, OP_CR8_READ, OP_TIMER_EXPIRED, OP_TIMER_FUTURE,
    OP_IPI_OTHER,
    /* not timed loops: behaviour probes used by tests */
    OP_SPIN = 100, OP_TRIPLE_FAULT, OP_ASSERT_FAIL, OP_PRINT, OP_TOUCH, OP_WRITE_WORD,
    OP_READ_WORD, OP_UD2, OP_WAIT_WORD, OP_SYSCALL_CS, OP_CPL0_CR3, OP_RDMSR_VALUE,
    /* interrupt probes: a0 vector, a1 count/delay (see payload_main) */
    OP_IRQ_WAIT, OP_IRQ_NO_EOI, OP_IRQ_MASKED, OP_TIMER_STORM, OP_TSC_PROBE, OP_APIC_STATE,
};

#define F_MARK 1
#define F_SYNC 2
#define F_KEEP 4
#define F_X2APIC 8
#define F_HALT 16

/* how long an op waits for its interrupt before going on (a lost interrupt then shows in the
 * handler's count, which the host checks): 5 s of TSC cycles */
#define IRQ_WAIT ((PARAM(P_TSC_KHZ) ? PARAM(P_TSC_KHZ) : 3000000UL) * 5000)
#define ARG_STOP 7
#define ARG_READY 8
#define ARG_HALTING 9
#define READY_ABORT 2          /* ARG_READY: the sender releases the target without the stop */

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

/* Interrupt loops: a0 is the vector, a1 the vCPU id (payload_main passes it). */
static void __attribute__((noinline)) loop_ipi_self(u64 n, u64 vec, u64 id)
{
    u64 seen = irq_cpu[id].count[vec];

    for (u64 i = 0; i < n; i++) {
        apic_ipi(0, (u32)vec, ICR_SELF);
        seen = irq_wait(id, vec, seen, IRQ_WAIT);
    }
}

LOOP(eoi, apic_eoi())
LOOP(cr8_write, __asm__ volatile("mov %0, %%cr8" :: "r"(i & 1) : "memory"))
LOOP(cr8_read, { u64 v; __asm__ volatile("mov %%cr8, %0" : "=r"(v)); })

/* Handler entry TSC - deadline of a handled timer interrupt, into VPARAM(id, 0..3). */
static void timer_latency(u64 id, u64 dl)
{
    s64 lat = (s64)(irq_cpu[id].last_tsc - dl);

    VPARAM(id, 0) += (u64)lat;
    VPARAM(id, 1) += 1;
    if ((s64)VPARAM(id, 2) > lat || VPARAM(id, 1) == 1)
        VPARAM(id, 2) = (u64)lat;
    if ((s64)VPARAM(id, 3) < lat || VPARAM(id, 1) == 1)
        VPARAM(id, 3) = (u64)lat;
}

/* TSC-deadline timer: arm the deadline `delay` cycles ahead (ARG(4); 0 for timer_expired: the
 * deadline is already past when KVM sees the write, so this is arming plus delivery) and wait
 * for the handler. */
static void __attribute__((noinline)) loop_timer(u64 n, u64 vec, u64 id)
{
    u64 seen = irq_cpu[id].count[vec], delta = ARG(4);

    for (u64 i = 0; i < n; i++) {
        u64 dl = rdtsc() + delta;
        u64 h;

        wrmsr(MSR_TSC_DEADLINE, dl);
        h = irq_wait(id, vec, seen, IRQ_WAIT);
        if (h != seen)
            timer_latency(id, dl);
        seen = h;
    }
}

/* set by timed() while it runs its last sample (ipi_other stops its target before the last IPI) */
static volatile u64 timed_last;

/* vCPU 0 sends one fixed IPI to APIC ID `dest` per operation and waits until the target's
 * handler ran; with F_HALT it first waits until the target announced it is halting and then
 * `settle` (a1 of the case, ARG(4)) more cycles, so the target is really asleep. */
static void __attribute__((noinline)) loop_ipi_other(u64 n, u64 vec, u64 dest)
{
    u64 seen = irq_cpu[dest].count[vec], halt = ARG(5) & F_HALT, settle = ARG(4), h;

    for (u64 i = 0; i < n; i++) {
        if (halt) {
            u64 t0 = rdtsc();

            while (!PARAM(P_ARG0 + ARG_HALTING) && rdtsc() - t0 < IRQ_WAIT)
                __asm__ volatile("pause" ::: "memory");
            PARAM(P_ARG0 + ARG_HALTING) = 0;
            for (u64 t = rdtsc(); rdtsc() - t < settle;)
                __asm__ volatile("pause");
        }
        if (timed_last && i + 1 == n)
            ARG(ARG_STOP) = seen + 1;   /* the target leaves once it has taken this one */
        apic_ipi((u32)dest, (u32)vec, 0);
        h = irq_wait(dest, vec, seen, IRQ_WAIT);
        if (h == seen)
            VPARAM(0, 9) += 1;          /* not delivered within IRQ_WAIT: lost (the host says) */
        seen = h;
    }
}

/* The target: wait for IPIs (spinning, or halted with F_HALT) until it has taken as many as the
 * sender's stop says (the delivery count after its last IPI, set just before sending it). So the
 * last IPI is taken before the target leaves, and no wake-up IPI outside the measured
 * operations is needed (its exits would count against the operations).
 *
 * The stop is checked on every pass, not only after a new delivery: the target may take all of
 * a run's IPIs before it first reads its count. An interrupt pending when a vCPU enters is
 * injected before the guest's next instruction, and the sender sends the next IPI as soon as the
 * handler has counted the last one, so where the handler is slow (PVM emulates guest CPL0) each
 * IPI is pending again by the handler's iretq and the target's own code does not move on. Seen
 * on PVM when the host resumed the sender before the target after their sync: the target read
 * the final count on entry, never saw it change, and spun until the watchdog. */
static void ipi_target(u64 id, u64 vec, u64 halt)
{
    u64 last = irq_cpu[id].count[vec];

    if (halt)
        ARG(ARG_HALTING) = 1;
    for (;;) {
        u64 seen = irq_cpu[id].handled;     /* before the check: no lost wake-up */
        u64 n = irq_cpu[id].count[vec];

        if ((ARG(ARG_STOP) && n >= ARG(ARG_STOP)) || ARG(ARG_READY) == READY_ABORT)
            break;
        if (n != last) {                    /* taken: say so again before the next halt */
            last = n;
            if (halt)
                ARG(ARG_HALTING) = 1;
        } else if (halt) {
            irq_halt_until(id, seen);
        } else {
            __asm__ volatile("pause" ::: "memory");
        }
    }
}

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
    [OP_INVD] = loop_invd, [OP_IPI_SELF] = loop_ipi_self, [OP_EOI] = loop_eoi,
    [OP_CR8_WRITE] = loop_cr8_write, [OP_CR8_READ] = loop_cr8_read,
    [OP_TIMER_EXPIRED] = loop_timer, [OP_TIMER_FUTURE] = loop_timer,
    [OP_IPI_OTHER] = loop_ipi_other,
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
        timed_last = s + 1 == warmup + samples;
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

static int is_irq_op(u64 op)
{
    return (op >= OP_IPI_SELF && op <= OP_IPI_OTHER) || (op >= OP_IRQ_WAIT && op <= OP_APIC_STATE);
}

static int is_timer_op(u64 op)
{
    return op == OP_TIMER_EXPIRED || op == OP_TIMER_FUTURE || op == OP_TIMER_STORM;
}

static void irq_setup(u64 op, u64 vec)
{
    irq_install();
    apic_enable(ARG(5) & F_X2APIC ? 1 : 0);
    if (is_timer_op(op))
        apic_write(APIC_LVT_TIMER, (u32)vec | LVT_TSC_DEADLINE);
    irq_enable();
}

/* The handler's counters where the host reads them: VPARAM(id, 5..8) deliveries of the op's
 * vector, EOIs, EOI cycles, spurious (cumulative over runs). */
static void irq_publish(u64 id, u64 vec)
{
    VPARAM(id, 5) = irq_cpu[id].count[vec & 0xff];
    VPARAM(id, 6) = irq_cpu[id].eois;
    VPARAM(id, 7) = irq_cpu[id].eoi_cycles;
    VPARAM(id, 8) = irq_cpu[id].spurious;
}

static void irq_wait_forever(u64 id)
{
    for (;;)
        irq_halt_until(id, irq_cpu[id].handled);
}

/* Interrupt probes and loops; returns 0 when op is not one of them. */
static int irq_main(u64 id, u64 op, u64 a0, u64 a1)
{
    u64 flags = ARG(5);

    if (!is_irq_op(op))
        return 0;
    if (op == OP_TSC_PROBE) {
        result_push(id, rdtsc());
        return 1;
    }
    irq_flags = op == OP_IRQ_NO_EOI ? IRQ_NO_EOI : 0;
    irq_setup(op, a0);
    switch (op) {
    case OP_IPI_OTHER:
        if (id != 0) {
            ARG(ARG_READY) = 1;
            if (flags & F_SYNC)
                ucall_sync(1);
            ipi_target(id, a0, flags & F_HALT);
            break;
        }
        for (u64 t0 = rdtsc(); !ARG(ARG_READY) && rdtsc() - t0 < 4 * IRQ_WAIT;)
            __asm__ volatile("pause" ::: "memory");
        GUEST_ASSERT(ARG(ARG_READY));
        timed(id, loops[op], a0, 1);
        if (!ARG(ARG_STOP) || irq_cpu[1].count[a0 & 0xff] < ARG(ARG_STOP)) {
            /* no operation ran, or the last IPI never arrived: release the target (another
             * vector wakes it from hlt) */
            ARG(ARG_READY) = READY_ABORT;
            apic_ipi(1, (u32)a0 + 1, 0);
        }
        break;
    case OP_IRQ_WAIT:
        /* a1 interrupts from the host (an irqfd or KVM_SIGNAL_MSI): announce each wait in
         * ARG(9) = k + 1, wait (spin, or hlt with F_HALT), record the handler's entry TSC */
        if (id != 0)
            break;
        VPARAM(id, 4) = rdtsc();
        for (u64 k = 0; k < a1; k++) {
            u64 seen = irq_cpu[id].count[a0 & 0xff];

            ARG(ARG_HALTING) = k + 1;
            for (;;) {
                u64 handled = irq_cpu[id].handled;  /* before the check: no lost wake-up */

                if (irq_cpu[id].count[a0 & 0xff] != seen)
                    break;
                if (flags & F_HALT)
                    irq_halt_until(id, handled);
                else
                    __asm__ volatile("pause" ::: "memory");
            }
            GUEST_ASSERT(irq_cpu[id].last_vector == (a0 & 0xff));
            result_push(id, irq_cpu[id].last_tsc);
        }
        break;
    case OP_IRQ_NO_EOI: {
        /* hostile: self-IPIs that are never EOId; after the first, the vector stays in service
         * and blocks the rest. Report how many arrived, then wait for interrupts forever. */
        u64 seen = irq_cpu[id].handled;

        for (u64 k = 0; k < a1; k++) {
            apic_ipi(0, (u32)a0, ICR_SELF);
            irq_wait(id, a0, irq_cpu[id].count[a0], IRQ_WAIT / 500);   /* 10 ms */
        }
        result_push(id, irq_cpu[id].handled - seen);
        ucall_sync(3);
        irq_wait_forever(id);
        break;
    }
    case OP_IRQ_MASKED:
        /* hostile: every interrupt masked (TPR 15, and IF=0 at CPL0), then spin */
        irq_disable();
        apic_write(APIC_TPR, 0xF0);
        ARG(ARG_READY) = 1;
        for (;;)
            __asm__ volatile("pause" ::: "memory");
    case OP_TIMER_STORM:
        /* hostile: re-arm an already expired TSC deadline forever, interrupts on */
        for (;;)
            wrmsr(MSR_TSC_DEADLINE, rdtsc());
    case OP_APIC_STATE:
        result_push(id, apic_read(APIC_ID));
        result_push(id, apic_x2);
        result_push(id, (read_cs() & 3) ? 0 : rdmsr(MSR_APIC_BASE));     /* CPL0 only */
        break;
    default:
        /* a timer op leaves nothing armed: each deadline has fired (KVM clears the MSR); it
         * writes nothing after its samples, which would count against its operations */
        timed(id, loops[op], a0, id);
    }
    irq_disable();
    irq_publish(id, a0);
    return 1;
}

void payload_main(u64 id)
{
    u64 op = ARG(0), a0 = ARG(3), a1 = ARG(4);

    if (irq_main(id, op, a0, a1))
        return;
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
