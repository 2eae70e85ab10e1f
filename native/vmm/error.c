/* Per-thread error record: every failing call names the ioctl/syscall and errno. Also what
 * every file uses: the two clocks (vlab_now_ns, vlab_rdtsc) and KVM exit-reason names. */
#include "internal.h"
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static __thread struct vlab_error last_error;

const struct vlab_error *vlab_last_error(void)
{
    return &last_error;
}

static int vfail(int err, const char *op, const char *fmt, va_list ap)
{
    last_error.err = err;
    last_error.vm_dead = 0;
    snprintf(last_error.op, sizeof(last_error.op), "%s", op);
    if (fmt)
        vsnprintf(last_error.msg, sizeof(last_error.msg), fmt, ap);
    else
        last_error.msg[0] = 0;
    return -err;
}

int vlab_fail(int err, const char *op, const char *fmt, ...)
{
    va_list ap;
    int r;

    va_start(ap, fmt);
    r = vfail(err, op, fmt, ap);
    va_end(ap);
    return r;
}

int vlab_fail_errno(const char *op, const char *fmt, ...)
{
    int err = errno ? errno : EIO;
    va_list ap;
    int r;

    va_start(ap, fmt);
    r = vfail(err, op, fmt, ap);
    va_end(ap);
    return r;
}

void vlab_mark_dead(void)
{
    last_error.vm_dead = 1;
}

uint64_t vlab_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

uint64_t vlab_rdtsc(void)
{
    uint32_t lo, hi;

    __asm__ volatile("lfence; rdtsc; lfence" : "=a"(lo), "=d"(hi) :: "memory");
    return ((uint64_t)hi << 32) | lo;
}

static const char *const exit_names[] = {
    [KVM_EXIT_UNKNOWN] = "UNKNOWN", [KVM_EXIT_EXCEPTION] = "EXCEPTION", [KVM_EXIT_IO] = "IO",
    [KVM_EXIT_HYPERCALL] = "HYPERCALL", [KVM_EXIT_DEBUG] = "DEBUG", [KVM_EXIT_HLT] = "HLT",
    [KVM_EXIT_MMIO] = "MMIO", [KVM_EXIT_IRQ_WINDOW_OPEN] = "IRQ_WINDOW_OPEN",
    [KVM_EXIT_SHUTDOWN] = "SHUTDOWN", [KVM_EXIT_FAIL_ENTRY] = "FAIL_ENTRY", [KVM_EXIT_INTR] = "INTR",
    [KVM_EXIT_SET_TPR] = "SET_TPR", [KVM_EXIT_TPR_ACCESS] = "TPR_ACCESS",
    [KVM_EXIT_INTERNAL_ERROR] = "INTERNAL_ERROR", [KVM_EXIT_SYSTEM_EVENT] = "SYSTEM_EVENT",
    [KVM_EXIT_X86_RDMSR] = "X86_RDMSR", [KVM_EXIT_X86_WRMSR] = "X86_WRMSR",
    [KVM_EXIT_DIRTY_RING_FULL] = "DIRTY_RING_FULL",
};

const char *vlab_exit_reason_name(uint32_t reason)
{
    if (reason < sizeof(exit_names) / sizeof(exit_names[0]) && exit_names[reason])
        return exit_names[reason];
    return "OTHER";
}
