/* Guest interrupt runtime: see apic.h. */
#include "apic.h"

volatile struct irq_cpu irq_cpu[8] __attribute__((aligned(64)));
volatile u64 irq_flags;
volatile u64 apic_x2;

extern char vlab_irq_stubs[];

#define VLAB_GPA_IDT      0x2000UL
#define VLAB_GPA_KSTACKS  0x8000UL
#define VLAB_KSTACK_SIZE  0x1000UL
#define VLAB_GPA_USTACKS  0x20000UL
#define VLAB_USTACK_SIZE  0x10000UL

static void idt_gate(u64 vec, u64 handler)
{
    volatile u32 *e = (volatile u32 *)(VLAB_GPA_IDT + 16 * vec);

    /* 64-bit interrupt gate (type 0xE, IF cleared on entry), present, DPL0, selector 0x08 */
    e[0] = (u32)(handler & 0xffff) | (0x08U << 16);
    e[1] = (u32)(handler & 0xffff0000UL) | 0x8E00U;
    e[2] = (u32)(handler >> 32);
    e[3] = 0;
}

void irq_install(void)
{
    for (u64 v = 32; v < 256; v++)
        idt_gate(v, (u64)vlab_irq_stubs + 16 * (v - 32));
}

/* Which vCPU a handler runs on, from its stack: interrupted at CPL3 the CPU switched to the
 * vCPU's TSS.RSP0 (its kernel stack); interrupted at CPL0 it stayed on the vCPU's own stack.
 * The host lays both out per vCPU (native/include/vlab.h), so no memory access is needed. */
u64 apic_cpu_of_stack(u64 rsp)
{
    if (rsp >= VLAB_GPA_USTACKS)
        return ((rsp - 1 - VLAB_GPA_USTACKS) / VLAB_USTACK_SIZE) & 7;
    return ((rsp - 1 - VLAB_GPA_KSTACKS) / VLAB_KSTACK_SIZE) & 7;
}

void apic_write(u32 reg, u32 v)
{
    if (apic_x2)
        wrmsr(0x800 + (reg >> 4), v);
    else
        *(volatile u32 *)(APIC_GPA + reg) = v;
}

u32 apic_read(u32 reg)
{
    if (apic_x2)
        return (u32)rdmsr(0x800 + (reg >> 4));
    return *(volatile u32 *)(APIC_GPA + reg);
}

void apic_eoi(void)
{
    apic_write(APIC_EOI, 0);
}

void apic_ipi(u32 dest, u32 vector, u32 shorthand)
{
    u32 lo = (vector & 0xff) | shorthand;

    if (apic_x2) {
        wrmsr(0x830, ((u64)dest << 32) | lo);
        return;
    }
    if (!shorthand)         /* a shorthand needs no destination: one register write */
        *(volatile u32 *)(APIC_GPA + APIC_ICR_HI) = dest << 24;
    *(volatile u32 *)(APIC_GPA + APIC_ICR_LO) = lo;
}

void apic_enable(int x2apic)
{
    if (x2apic) {
        u64 base = rdmsr(MSR_APIC_BASE);

        if (!(base & APIC_BASE_EXTD))
            wrmsr(MSR_APIC_BASE, base | APIC_BASE_EN | APIC_BASE_EXTD);
        apic_x2 = 1;
    } else if (apic_x2) {
        /* x2APIC -> xAPIC goes through disabled (SDM 11.12.5); needs CPL0 */
        u64 base = rdmsr(MSR_APIC_BASE);

        wrmsr(MSR_APIC_BASE, base & ~(APIC_BASE_EN | APIC_BASE_EXTD));
        wrmsr(MSR_APIC_BASE, (base & ~APIC_BASE_EXTD) | APIC_BASE_EN);
        apic_x2 = 0;
    }
    apic_write(APIC_SVR, 0x100 | SPURIOUS_VECTOR);
    apic_write(APIC_TPR, 0);
}

void irq_dispatch(u64 vector, u64 rsp)
{
    u64 t = rdtsc();
    volatile struct irq_cpu *c = &irq_cpu[apic_cpu_of_stack(rsp)];

    c->last_tsc = t;
    c->last_vector = vector;
    c->count[vector & 0xff]++;
    if (vector == SPURIOUS_VECTOR) {
        c->spurious++;          /* a spurious interrupt takes no EOI */
    } else if (!(irq_flags & IRQ_NO_EOI)) {
        u64 t0 = tsc_begin();

        apic_eoi();
        c->eoi_cycles += tsc_end() - t0;
        c->eois++;
    }
    c->handled++;
}

static u64 halt_fn(u64 id, u64 seen)
{
    __asm__ volatile("cli" ::: "memory");
    if (irq_cpu[id].handled == seen)
        __asm__ volatile("sti; hlt" ::: "memory");
    __asm__ volatile("sti" ::: "memory");     /* a CPL0 caller continues with IF=1; a CPL3
                                                  caller gets its own RFLAGS back from iretq */
    return 0;
}

void irq_halt_until(u64 id, u64 seen)
{
    cpl0_call(halt_fn, id, seen);
}
