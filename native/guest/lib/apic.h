/*
 * Guest interrupt runtime: IDT interrupt gates for vectors 32-255, handlers that count and
 * timestamp every delivery, and the local APIC in xAPIC (MMIO) or x2APIC (MSR) mode.
 *
 * Linked from an archive, so only payloads that use it carry it (and only their images, hence
 * their experiment versions, change with it).
 *
 * Facts used (Intel SDM Vol. 3A chapter 11 / AMD APM Vol. 2 chapter 16): xAPIC registers are
 * 32-bit MMIO at 0xFEE00000 + offset, 16 bytes apart; in x2APIC mode the register at offset R is
 * MSR 0x800 + R/16 (ICR is one 64-bit MSR 0x830 with the destination in bits 63:32); the APIC is
 * software-enabled by SVR bit 8; EOI is a write of 0; IA32_APIC_BASE (MSR 0x1B) bit 11 enables
 * the APIC and bit 10 selects x2APIC; the TSC-deadline timer is LVT timer mode 2 (bits 18:17)
 * armed by IA32_TSC_DEADLINE (MSR 0x6E0), disarmed by writing 0; CR8 is TPR[7:4].
 */
#ifndef VLAB_APIC_H
#define VLAB_APIC_H
#include "rt.h"

#define APIC_GPA        0xFEE00000UL
#define APIC_ID         0x20
#define APIC_TPR        0x80
#define APIC_EOI        0xB0
#define APIC_SVR        0xF0
#define APIC_ISR        0x100
#define APIC_IRR        0x200
#define APIC_ICR_LO     0x300
#define APIC_ICR_HI     0x310
#define APIC_LVT_TIMER  0x320

#define MSR_APIC_BASE   0x1B
#define MSR_TSC_DEADLINE 0x6E0
#define APIC_BASE_EXTD  (1UL << 10)
#define APIC_BASE_EN    (1UL << 11)

#define ICR_SELF        (1U << 18)      /* destination shorthand 01: self */
#define ICR_PENDING     (1U << 12)      /* xAPIC delivery status */
#define LVT_TSC_DEADLINE (2U << 17)
#define LVT_MASKED      (1U << 16)
#define SPURIOUS_VECTOR 0xFF

/* What a handler does besides counting (irq_flags). */
#define IRQ_NO_EOI      1       /* never EOI (a hostile guest; the host must not hang) */

struct irq_cpu {
    u64 handled;            /* interrupts handled (written last by the handler) */
    u64 last_vector;
    u64 last_tsc;           /* rdtsc at handler entry */
    u64 eoi_cycles;         /* sum over handled interrupts of the EOI write's own cycles */
    u64 eois;
    u64 spurious;
    u64 pad[2];
    u64 count[256];         /* per vector */
};

extern volatile struct irq_cpu irq_cpu[8];
extern volatile u64 irq_flags;
extern volatile u64 apic_x2;      /* 1 once this guest's APICs are in x2APIC mode */

/* Point IDT vectors 32-255 at the counting handler (idempotent; the IDT is shared by vCPUs). */
void irq_install(void);
/* Software-enable this vCPU's APIC (spurious vector 0xFF, TPR 0) in xAPIC or x2APIC mode.
 * x2APIC needs CPL0 (MSRs); xAPIC works at CPL3 (the APIC page is mapped user-accessible). */
void apic_enable(int x2apic);
void apic_write(u32 reg, u32 v);
u32 apic_read(u32 reg);
void apic_eoi(void);
/* Send a fixed IPI: `dest` an APIC ID, or ICR_SELF in `shorthand`. */
void apic_ipi(u32 dest, u32 vector, u32 shorthand);
u64 apic_cpu_of_stack(u64 rsp);

/* sti/cli at CPL0 only: at CPL3 the host starts the vCPU with RFLAGS.IF set (PVM keeps guest
 * user mode's hardware IOPL at 0, so sti/cli there would #GP) and it stays set. */
static inline void irq_enable(void)
{
    if (!(read_cs() & 3))
        __asm__ volatile("sti" ::: "memory");
}

static inline void irq_disable(void)
{
    if (!(read_cs() & 3))
        __asm__ volatile("cli" ::: "memory");
}

/* Halt vCPU `id` until it has handled more than `seen` interrupts (one hlt; returns at once if
 * it already has). Runs at CPL0 (through the int $4 gate from CPL3), checks with interrupts
 * off and sleeps with `sti; hlt`, whose interrupt shadow closes the lost-wake-up window. */
void irq_halt_until(u64 id, u64 seen);

static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;

    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}

/* Wait (spinning with interrupts on) until vCPU `id` has taken vector `vec` more than `seen`
 * times (irq_cpu[id].count[vec]), at most `cycles` TSC cycles; returns the new count, or `seen`
 * on giving up. Per vector, so a stray interrupt of another vector (a wake-up left pending from
 * an earlier run) is never taken for the one waited for. A time bound, not a count of pause
 * loops: where pause is emulated (PVM at CPL0) a loop's cost varies 100-fold. */
static inline u64 irq_wait(u64 id, u64 vec, u64 seen, u64 cycles)
{
    u64 h, t0 = rdtsc();

    while ((h = irq_cpu[id].count[vec & 0xff]) == seen && rdtsc() - t0 < cycles)
        __asm__ volatile("pause" ::: "memory");
    return h;
}

#endif
