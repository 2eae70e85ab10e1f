/*
 * vCPUs: long-mode set-up through KVM_SET_SREGS, the run loop that dispatches every exit
 * reason, the KVM_RUN watchdog and kicks, ucalls, the TSC frequency, the dirty ring, and
 * whole-state save/load for migration.
 *
 * The run loop stays in C so that user-space exits handled by sinks cost one KVM_RUN round trip
 * and nothing else; it returns to the caller only for events the caller must see.
 *
 * A vCPU sees its VM only through v->env (struct vlab_vcpu_env, internal.h); nothing here calls
 * vm.c, which owns the vCPUs and calls down into this file.
 */
#include "internal.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MSR_IA32_TSC          0x10
#define MSR_IA32_SYSENTER_CS  0x174
#define MSR_IA32_SYSENTER_ESP 0x175
#define MSR_IA32_SYSENTER_EIP 0x176
#define MSR_IA32_CR_PAT       0x277
#define MSR_STAR              0xc0000081
#define MSR_LSTAR             0xc0000082
#define MSR_CSTAR             0xc0000083
#define MSR_SYSCALL_MASK      0xc0000084
#define MSR_KERNEL_GS_BASE    0xc0000102
#define MSR_TSC_AUX           0xc0000103

/* ---------------- watchdog, interrupt, kick ---------------- */

static __thread struct kvm_run *wd_run;      /* the kvm_run this thread is inside, if any */
static pthread_once_t wd_once = PTHREAD_ONCE_INIT;
static int wd_signo;
static int wd_install_err;

static void wd_handler(int sig)
{
    struct kvm_run *r = wd_run;

    (void)sig;
    if (r)
        r->immediate_exit = 1;   /* also catches a signal that lands just before KVM_RUN */
}

static void wd_install(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = wd_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;             /* no SA_RESTART: KVM_RUN must come back with EINTR */
    wd_signo = SIGRTMIN + 5;
    if (sigaction(wd_signo, &sa, NULL))
        wd_install_err = errno;
}

static int wd_arm(struct vlab_vcpu *v, uint64_t timeout_ms)
{
    pid_t tid = (pid_t)syscall(SYS_gettid);
    struct itimerspec its;

    pthread_once(&wd_once, wd_install);
    if (wd_install_err)
        return vlab_fail(wd_install_err, "sigaction", "watchdog signal");
    if (v->timer_ok && v->timer_tid != tid) {
        timer_delete(v->timer);
        v->timer_ok = 0;
    }
    if (!v->timer_ok) {
        struct sigevent sev;

        memset(&sev, 0, sizeof(sev));
        sev.sigev_notify = SIGEV_THREAD_ID;
        sev.sigev_signo = wd_signo;
        sev._sigev_un._tid = tid;
        if (timer_create(CLOCK_MONOTONIC, &sev, &v->timer))
            return vlab_fail_errno("timer_create", "KVM_RUN watchdog");
        v->timer_ok = 1;
        v->timer_tid = tid;
    }
    memset(&its, 0, sizeof(its));
    its.it_value.tv_sec = timeout_ms / 1000;
    its.it_value.tv_nsec = (long)(timeout_ms % 1000) * 1000000L;
    /* re-fire every 50 ms after the deadline, in case one signal is consumed elsewhere */
    its.it_interval.tv_nsec = 50000000L;
    if (timer_settime(v->timer, 0, &its, NULL))
        return vlab_fail_errno("timer_settime", "KVM_RUN watchdog");
    return 0;
}

static void wd_disarm(struct vlab_vcpu *v)
{
    struct itimerspec its;

    memset(&its, 0, sizeof(its));
    if (v->timer_ok)
        timer_settime(v->timer, 0, &its, NULL);
}

/*
 * For vlab_vm_abort_with (the caller has set env->abort_pending): make the vCPU's run in
 * progress leave KVM_RUN now, and its next KVM_RUN return at once. Any thread.
 */
void vlab_vcpu_interrupt(struct vlab_vcpu *v)
{
    pid_t tid;

    pthread_once(&wd_once, wd_install);
    v->run->immediate_exit = 1;
    tid = atomic_load(&v->run_tid);
    if (tid > 0 && !wd_install_err)
        syscall(SYS_tgkill, getpid(), tid, wd_signo);
}

/*
 * Make a vCPU that is inside KVM_RUN on another thread come back to its run loop now: send
 * that thread the run loop's watchdog signal (whose handler sets immediate_exit), so KVM_RUN
 * returns EINTR and vlab_vcpu_run reports an interruption. Does nothing (returns 0) if the
 * vCPU never ran or the handler is not installed; 1 if sent.
 */
int vlab_vcpu_kick(struct vlab_vcpu *v)
{
    struct sigaction old;

    if (!v->timer_ok || v->timer_tid <= 0)
        return 0;
    pthread_once(&wd_once, wd_install);     /* done already (timer_ok): makes wd_signo visible */
    if (sigaction(wd_signo, NULL, &old) || old.sa_handler == SIG_DFL || old.sa_handler == SIG_IGN)
        return 0;
    if (syscall(SYS_tgkill, getpid(), v->timer_tid, wd_signo)) {
        if (errno == ESRCH)
            return 0;
        return vlab_fail_errno("tgkill", "kick vCPU %d", v->id);
    }
    return 1;
}

/* ---------------- create / destroy ---------------- */

int vlab_vcpu_create(struct vlab_vm *vm, int id, struct vlab_vcpu **out)
{
    struct vlab_vcpu_env *env = &vm->env;      /* the only thing a vCPU takes from its VM */
    struct vlab_vcpu *v;
    int fd, r;

    *out = NULL;
    if (id < 0 || id >= VLAB_MAX_VCPUS || env->vcpus[id])
        return vlab_fail(EINVAL, "KVM_CREATE_VCPU", "vCPU id %d invalid or in use (max %d)", id,
                         VLAB_MAX_VCPUS);
    fd = ioctl(env->vm_fd, KVM_CREATE_VCPU, id);
    if (fd < 0)
        return vlab_fail_errno("KVM_CREATE_VCPU", "id %d", id);
    v = calloc(1, sizeof(*v));
    if (!v) {
        close(fd);
        return vlab_fail(ENOMEM, "calloc", NULL);
    }
    v->env = env;
    v->id = id;
    v->fd = fd;
    v->stats_fd = -1;
    v->run = mmap(NULL, env->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (v->run == MAP_FAILED) {
        r = vlab_fail_errno("mmap", "kvm_run of vCPU %d", id);
        close(fd);
        free(v);
        return r;
    }
    if (env->dirty_ring_bytes) {
        long psz = sysconf(_SC_PAGESIZE);

        v->ring = mmap(NULL, env->dirty_ring_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                       (off_t)KVM_DIRTY_LOG_PAGE_OFFSET * psz);
        if (v->ring == MAP_FAILED) {
            r = vlab_fail_errno("mmap", "dirty ring of vCPU %d", id);
            munmap(v->run, env->run_size);
            close(fd);
            free(v);
            return r;
        }
        v->ring_entries = env->dirty_ring_bytes / sizeof(struct kvm_dirty_gfn);
    }
    env->vcpus[id] = v;
    *out = v;
    return 0;
}

void vlab_vcpu_destroy(struct vlab_vcpu *v)
{
    if (!v)
        return;
    if (v->timer_ok)
        timer_delete(v->timer);
    if (v->ring)
        munmap(v->ring, v->env->dirty_ring_bytes);
    munmap(v->run, v->env->run_size);
    if (v->stats_fd >= 0)
        close(v->stats_fd);
    close(v->fd);
    v->env->vcpus[v->id] = NULL;
    free(v);
}

int vlab_vcpu_fd(struct vlab_vcpu *v) { return v->fd; }

/* ---------------- long-mode set-up ---------------- */

static void seg(struct kvm_segment *s, uint16_t sel, int type, int dpl, int code64)
{
    memset(s, 0, sizeof(*s));
    s->base = 0;
    s->limit = 0xffffffff;
    s->selector = sel;
    s->type = type;
    s->present = 1;
    s->dpl = dpl;
    s->db = code64 ? 0 : 1;
    s->s = 1;
    s->l = code64;
    s->g = 1;
}

static int set_msrs(struct vlab_vcpu *v, const uint32_t *idx, const uint64_t *val, int n)
{
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry e[32];
    } m;
    int r;

    memset(&m, 0, sizeof(m));
    m.hdr.nmsrs = n;
    for (int i = 0; i < n; i++) {
        m.e[i].index = idx[i];
        m.e[i].data = val[i];
    }
    r = ioctl(v->fd, KVM_SET_MSRS, &m);
    if (r < 0)
        return vlab_fail_errno("KVM_SET_MSRS", NULL);
    if (r != n)
        return vlab_fail(EINVAL, "KVM_SET_MSRS", "MSR %#x refused", idx[r]);
    return 0;
}

/* CPUID must be set before EFER.LME or KVM refuses the sregs; KVM refuses to change it after
 * the first KVM_RUN, so a re-entered (or migrated-into) vCPU keeps the CPUID it has. */
static int set_cpuid_once(struct vlab_vcpu *v)
{
    struct kvm_cpuid2 *cpuid;

    if (v->cpuid_set)
        return 0;
    cpuid = vlab_kvm_cpuid(v->env->kvm);
    if (!cpuid)
        return -vlab_last_error()->err;
    if (ioctl(v->fd, KVM_SET_CPUID2, cpuid) < 0)
        return vlab_fail_errno("KVM_SET_CPUID2", NULL);
    v->cpuid_set = 1;
    return 0;
}

int vlab_vcpu_setup(struct vlab_vcpu *v, int cpl, uint64_t cr3, uint64_t entry, uint64_t stack_top)
{
    struct kvm_sregs sr;
    struct kvm_regs regs;
    uint16_t cs = cpl ? 0x33 : 0x08, ds = cpl ? 0x2b : 0x10;
    uint32_t msr_idx[] = { MSR_STAR, MSR_LSTAR, MSR_SYSCALL_MASK };
    uint64_t msr_val[] = { (0x20ULL << 48) | (0x08ULL << 32), v->env->syscall_entry, 0x4700 };
    int r;

    if (cpl != 0 && cpl != 3)
        return vlab_fail(EINVAL, "vlab_vcpu_setup", "cpl must be 0 or 3, not %d", cpl);
    r = set_cpuid_once(v);
    if (r)
        return r;
    if (ioctl(v->fd, KVM_GET_SREGS, &sr) < 0)
        return vlab_fail_errno("KVM_GET_SREGS", NULL);
    seg(&sr.cs, cs, 11, cpl, 1);
    seg(&sr.ds, ds, 3, cpl, 0);
    sr.es = sr.fs = sr.gs = sr.ss = sr.ds;
    memset(&sr.tr, 0, sizeof(sr.tr));
    sr.tr.base = VLAB_GPA_TSS + VLAB_TSS_STRIDE * v->id;
    sr.tr.limit = VLAB_TSS_LIMIT;
    sr.tr.selector = 0x38 + 16 * v->id;
    sr.tr.type = 11;
    sr.tr.present = 1;
    memset(&sr.ldt, 0, sizeof(sr.ldt));
    sr.ldt.type = 2;
    sr.ldt.present = 1;
    sr.ldt.unusable = 1;
    sr.gdt.base = VLAB_GPA_GDT;
    sr.gdt.limit = 0xfff;
    sr.idt.base = VLAB_GPA_IDT;
    sr.idt.limit = 256 * 16 - 1;
    sr.cr0 = 0x80050033;
    sr.cr3 = cr3;
    sr.cr4 = 0x620;
    sr.efer = 0xd01;          /* LME | LMA | NXE | SCE */
    if (ioctl(v->fd, KVM_SET_SREGS, &sr) < 0)
        return vlab_fail_errno("KVM_SET_SREGS", "long mode, cpl %d", cpl);
    r = set_msrs(v, msr_idx, msr_val, 3);
    if (r)
        return r;
    memset(&regs, 0, sizeof(regs));
    regs.rip = entry;
    regs.rsp = stack_top;
    regs.rflags = cpl ? 0x3002 : 0x2;   /* IOPL=3 so in/out work at CPL3 */
    regs.rdi = v->id;
    regs.rsi = VLAB_GPA_PARAMS;
    if (ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
        return vlab_fail_errno("KVM_SET_REGS", NULL);
    v->cpl = cpl;
    return 0;
}

int vlab_vcpu_set_entry_args(struct vlab_vcpu *v, uint64_t rdi, uint64_t rsi)
{
    struct kvm_regs regs;

    if (ioctl(v->fd, KVM_GET_REGS, &regs) < 0)
        return vlab_fail_errno("KVM_GET_REGS", NULL);
    regs.rdi = rdi;
    regs.rsi = rsi;
    if (ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
        return vlab_fail_errno("KVM_SET_REGS", NULL);
    return 0;
}

/* RFLAGS.IF at entry. A CPL3 guest cannot set it itself where the hypervisor keeps the
 * hardware IOPL at 0 for guest user mode (PVM: sti there is a #GP), so the interrupt
 * experiments start their CPL3 vCPUs with interrupts enabled. */
int vlab_vcpu_set_interrupt_flag(struct vlab_vcpu *v, int on)
{
    struct kvm_regs regs;

    if (ioctl(v->fd, KVM_GET_REGS, &regs) < 0)
        return vlab_fail_errno("KVM_GET_REGS", NULL);
    regs.rflags = on ? regs.rflags | 0x200 : regs.rflags & ~0x200ULL;
    if (ioctl(v->fd, KVM_SET_REGS, &regs) < 0)
        return vlab_fail_errno("KVM_SET_REGS", "RFLAGS.IF=%d", on);
    return 0;
}

/* KVM_SET_MP_STATE RUNNABLE. With the in-kernel irqchip a vCPU other than the BSP starts
 * waiting for INIT/SIPI, and one that halted stays halted until an interrupt; vlab starts every
 * vCPU at its entry point directly, so it makes each one runnable there. */
int vlab_vcpu_set_runnable(struct vlab_vcpu *v)
{
    struct kvm_mp_state mp = { .mp_state = KVM_MP_STATE_RUNNABLE };

    if (ioctl(v->fd, KVM_SET_MP_STATE, &mp) < 0)
        return vlab_fail_errno("KVM_SET_MP_STATE", "RUNNABLE");
    return 0;
}

void vlab_vcpu_set_run_flags(struct vlab_vcpu *v, uint32_t flags) { v->run_flags = flags; }

int vlab_vcpu_set_mark_buffer(struct vlab_vcpu *v, uint64_t *buf, uint64_t cap)
{
    v->marks = buf;
    v->marks_cap = buf ? cap : 0;
    v->marks_n = 0;
    return 0;
}

uint64_t vlab_vcpu_mark_count(struct vlab_vcpu *v) { return v->marks_n; }

const struct vlab_vcpu_counters *vlab_vcpu_counters(struct vlab_vcpu *v) { return &v->c; }
void vlab_vcpu_reset_counters(struct vlab_vcpu *v) { memset(&v->c, 0, sizeof(v->c)); }

int vlab_vcpu_stats_fd(struct vlab_vcpu *v)
{
    if (v->stats_fd < 0) {
        int fd = ioctl(v->fd, KVM_GET_STATS_FD, 0);

        if (fd < 0)
            return vlab_fail_errno("KVM_GET_STATS_FD", "vCPU %d", v->id);
        v->stats_fd = fd;
    }
    return v->stats_fd;
}

int vlab_vcpu_get_rip(struct vlab_vcpu *v, uint64_t *rip, int *cpl)
{
    struct kvm_regs regs;
    struct kvm_sregs sr;

    if (ioctl(v->fd, KVM_GET_REGS, &regs) < 0)
        return vlab_fail_errno("KVM_GET_REGS", NULL);
    if (ioctl(v->fd, KVM_GET_SREGS, &sr) < 0)
        return vlab_fail_errno("KVM_GET_SREGS", NULL);
    *rip = regs.rip;
    *cpl = sr.cs.selector & 3;
    return 0;
}

int vlab_vcpu_io_data(struct vlab_vcpu *v, uint8_t **data, uint32_t *size)
{
    if (v->run->exit_reason != KVM_EXIT_IO)
        return vlab_fail(EINVAL, "vlab_vcpu_io_data", "last exit was not IO");
    *data = (uint8_t *)v->run + v->run->io.data_offset;
    *size = v->run->io.size * v->run->io.count;
    return 0;
}

int vlab_vcpu_mmio_data(struct vlab_vcpu *v, uint8_t **data, uint32_t *len)
{
    if (v->run->exit_reason != KVM_EXIT_MMIO)
        return vlab_fail(EINVAL, "vlab_vcpu_mmio_data", "last exit was not MMIO");
    *data = v->run->mmio.data;
    *len = v->run->mmio.len;
    return 0;
}

uint64_t vlab_vcpu_tsc_khz(struct vlab_vcpu *v)
{
    int r = ioctl(v->fd, KVM_GET_TSC_KHZ, 0);

    return r < 0 ? 0 : (uint64_t)r;
}

/* The guest's TSC (IA32_TSC through KVM_GET_MSRS: KVM computes it from the host TSC with the
 * vCPU's offset and scaling ratio) bracketed by two host rdtscs, so the caller can relate the
 * two clocks: guest - host lies within [guest - after, guest - before] at ratio 1. */
int vlab_vcpu_guest_tsc(struct vlab_vcpu *v, uint64_t *guest, uint64_t *host_before,
                        uint64_t *host_after)
{
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry e[1];
    } m;
    int r;

    memset(&m, 0, sizeof(m));
    m.hdr.nmsrs = 1;
    m.e[0].index = 0x10;        /* IA32_TIME_STAMP_COUNTER */
    *host_before = vlab_rdtsc();
    r = ioctl(v->fd, KVM_GET_MSRS, &m);
    *host_after = vlab_rdtsc();
    if (r < 0)
        return vlab_fail_errno("KVM_GET_MSRS", "IA32_TSC");
    if (r != 1)
        return vlab_fail(EINVAL, "KVM_GET_MSRS", "IA32_TSC not returned");
    *guest = m.e[0].data;
    return 0;
}

int vlab_vcpu_set_tsc_khz(struct vlab_vcpu *v, uint32_t khz)
{
    if (ioctl(v->fd, KVM_SET_TSC_KHZ, (unsigned long)khz) < 0)
        return vlab_fail_errno("KVM_SET_TSC_KHZ", "%u kHz", khz);
    return 0;
}

/* ---------------- run loop ---------------- */

static void stop_set(struct vlab_stop *st, int reason, const char *msg)
{
    st->reason = reason;
    if (msg)
        snprintf(st->msg, sizeof(st->msg), "%s", msg);
}

/* Copy a guest string (identity-mapped GVA) into st->msg, refusing anything outside memory. */
static void guest_string(struct vlab_vcpu_env *env, uint64_t gva, uint64_t len,
                         struct vlab_stop *st)
{
    const char *src;

    if (len > sizeof(st->msg) - 1)
        len = sizeof(st->msg) - 1;
    src = vlab_vm_gpa_to_hva(env->vm, gva, len ? len : 1);
    if (!src) {
        snprintf(st->msg, sizeof(st->msg), "<message at %#llx is outside guest memory>",
                 (unsigned long long)gva);
        return;
    }
    for (uint64_t i = 0; i < len; i++) {
        char c = src[i];

        if (!c) {
            len = i;
            break;
        }
        st->msg[i] = (c >= 0x20 && c < 0x7f) ? c : '?';
    }
    st->msg[len] = 0;
}

static int handle_ucall(struct vlab_vcpu *v, struct vlab_stop *st, int *stop)
{
    struct kvm_run *run = v->run;
    uint8_t type;
    struct kvm_regs regs;

    if (run->io.direction != KVM_EXIT_IO_OUT || run->io.size != 1 || run->io.count != 1) {
        *stop = 1;
        stop_set(st, VLAB_STOP_BAD_UCALL, "malformed ucall (not a single-byte out)");
        return 0;
    }
    type = *((uint8_t *)run + run->io.data_offset);
    v->c.ucalls++;
    if (type == VLAB_UCALL_MARK) {
        if (v->marks_n < v->marks_cap)
            v->marks[v->marks_n] = vlab_now_ns();
        v->marks_n++;
        v->c.marks++;
        return 0;
    }
    if (type == VLAB_UCALL_DONE) {
        *stop = 1;
        stop_set(st, VLAB_STOP_DONE, NULL);
        return 0;
    }
    if (ioctl(v->fd, KVM_GET_REGS, &regs) < 0)
        return vlab_fail_errno("KVM_GET_REGS", "ucall");
    st->arg[0] = regs.rsi;
    st->arg[1] = regs.rdx;
    st->arg[2] = regs.rcx;
    st->arg[3] = regs.rdi;
    st->rip = regs.rip;
    *stop = 1;
    switch (type) {
    case VLAB_UCALL_SYNC:
        stop_set(st, VLAB_STOP_SYNC, NULL);
        break;
    case VLAB_UCALL_FAIL:
        stop_set(st, VLAB_STOP_FAIL, NULL);
        guest_string(v->env, regs.rdx, regs.rcx, st);
        break;
    case VLAB_UCALL_PRINT:
        stop_set(st, VLAB_STOP_PRINT, NULL);
        guest_string(v->env, regs.rdx, regs.rcx, st);
        break;
    default:
        st->arg[0] = type;
        stop_set(st, VLAB_STOP_BAD_UCALL, "unknown ucall type");
    }
    return 0;
}

static int handle_exception(struct vlab_vcpu *v, struct vlab_stop *st)
{
    struct kvm_regs regs;

    if (ioctl(v->fd, KVM_GET_REGS, &regs) < 0)
        return vlab_fail_errno("KVM_GET_REGS", "exception report");
    st->arg[0] = regs.rdi;          /* vector */
    st->arg[1] = regs.rsi;          /* error code */
    st->arg[2] = regs.r8;           /* faulting rip */
    st->arg[3] = regs.r9 & 3;       /* cpl from the saved cs */
    st->arg[4] = regs.r10;          /* cr2 */
    st->rip = regs.r8;
    st->cpl = (int)(regs.r9 & 3);
    stop_set(st, VLAB_STOP_EXCEPTION, NULL);
    return 0;
}

static struct vlab_handler *find_handler(struct vlab_vcpu_env *env, int kind, uint64_t addr,
                                         uint64_t len)
{
    for (int i = 0; i < env->nr_handlers; i++) {
        struct vlab_handler *h = &env->handlers[i];

        if (h->kind == kind && addr >= h->base && addr - h->base < h->len &&
            len <= h->len - (addr - h->base))
            return h;
    }
    return NULL;
}

static void fill_value(uint8_t *dst, uint64_t bytes, uint64_t value, uint32_t unit)
{
    for (uint64_t i = 0; i < bytes; i++)
        dst[i] = (uint8_t)(value >> (8 * (i % unit)));
}

/* Dispatch one exit. Returns <0 on error, sets *stop when the caller must see it. */
static int dispatch(struct vlab_vcpu *v, struct vlab_stop *st, int *stop)
{
    struct kvm_run *run = v->run;
    struct vlab_vcpu_env *env = v->env;
    uint32_t reason = run->exit_reason;
    struct vlab_handler *h;

    st->kvm_exit_reason = reason;
    v->c.exits[reason < VLAB_NR_EXIT_REASONS ? reason : VLAB_NR_EXIT_REASONS - 1]++;
    switch (reason) {
    case KVM_EXIT_IO:
        if (run->io.port == VLAB_UCALL_PORT)
            return handle_ucall(v, st, stop);
        if (run->io.port == VLAB_EXC_PORT) {
            *stop = 1;
            return handle_exception(v, st);
        }
        h = find_handler(env, VLAB_H_PIO_SINK, run->io.port, 1);
        if (h) {
            atomic_fetch_add(&h->hits, 1);
            v->c.io_sunk++;
            if (run->io.direction == KVM_EXIT_IO_IN)
                fill_value((uint8_t *)run + run->io.data_offset,
                           (uint64_t)run->io.size * run->io.count, h->value, run->io.size);
            return 0;
        }
        /* a device implemented in C handles the exit on this thread */
        h = find_handler(env, VLAB_H_PIO_FN, run->io.port, 1);
        if (h) {
            atomic_fetch_add(&h->hits, 1);
            return h->fn(v, h->ctx, run);       /* < 0: the device failed and said why */
        }
        *stop = 1;
        st->arg[0] = run->io.port;
        st->arg[1] = run->io.direction;
        st->arg[2] = run->io.size;
        st->arg[3] = run->io.count;
        stop_set(st, VLAB_STOP_IO, "unhandled port I/O");
        return 0;
    case KVM_EXIT_MMIO:
        h = find_handler(env, VLAB_H_MMIO_SINK, run->mmio.phys_addr, run->mmio.len);
        if (h) {
            atomic_fetch_add(&h->hits, 1);
            v->c.mmio_sunk++;
            if (!run->mmio.is_write)
                fill_value(run->mmio.data, run->mmio.len, h->value, 8);
            return 0;
        }
        *stop = 1;
        st->arg[0] = run->mmio.phys_addr;
        st->arg[1] = run->mmio.is_write;
        st->arg[2] = run->mmio.len;
        stop_set(st, VLAB_STOP_MMIO, "unhandled MMIO");
        return 0;
    case KVM_EXIT_HLT:
        v->c.hlt++;
        if (v->run_flags & VLAB_RUN_STOP_ON_HLT) {
            *stop = 1;
            stop_set(st, VLAB_STOP_HLT, NULL);
        }
        return 0;
    case KVM_EXIT_X86_RDMSR:
        v->c.msr_user++;
        run->msr.error = 0;
        run->msr.data = env->msr_read_value;
        return 0;
    case KVM_EXIT_X86_WRMSR:
        v->c.msr_user++;
        run->msr.error = 0;
        return 0;
    case KVM_EXIT_HYPERCALL:
        v->c.hypercall++;
        run->hypercall.ret = (uint64_t)-1000;   /* -KVM_ENOSYS */
        return 0;
    case KVM_EXIT_SHUTDOWN:
        *stop = 1;
        stop_set(st, VLAB_STOP_SHUTDOWN, "guest shut down (triple fault)");
        return 0;
    case KVM_EXIT_FAIL_ENTRY:
        *stop = 1;
        st->arg[0] = run->fail_entry.hardware_entry_failure_reason;
        snprintf(st->msg, sizeof(st->msg), "VM entry failed, hardware reason %#llx",
                 (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
        st->reason = VLAB_STOP_FAIL_ENTRY;
        return 0;
    case KVM_EXIT_INTERNAL_ERROR:
        *stop = 1;
        st->arg[0] = run->internal.suberror;
        st->arg[1] = run->internal.ndata;
        for (uint32_t i = 0; i < run->internal.ndata && i < 4; i++)
            st->arg[2 + i] = run->internal.data[i];
        snprintf(st->msg, sizeof(st->msg), "KVM internal error, suberror %u%s",
                 run->internal.suberror,
                 run->internal.suberror == KVM_INTERNAL_ERROR_EMULATION ? " (emulation failure)" : "");
        st->reason = VLAB_STOP_INTERNAL_ERROR;
        return 0;
    case KVM_EXIT_DIRTY_RING_FULL:
        *stop = 1;
        stop_set(st, VLAB_STOP_DIRTY_RING_FULL, NULL);
        return 0;
    case KVM_EXIT_SYSTEM_EVENT:
        *stop = 1;
        st->arg[0] = run->system_event.type;
        stop_set(st, VLAB_STOP_SYSTEM_EVENT, "system event");
        return 0;
    case KVM_EXIT_INTR:
        v->c.intr++;
        return 0;
    default:
        *stop = 1;
        snprintf(st->msg, sizeof(st->msg), "unexpected exit reason %u (%s)", reason,
                 vlab_exit_reason_name(reason));
        st->reason = VLAB_STOP_UNKNOWN;
        return 0;
    }
}

int vlab_vcpu_run(struct vlab_vcpu *v, uint64_t timeout_ms, struct vlab_stop *st)
{
    struct kvm_run *run = v->run;
    uint64_t deadline, t0, t1;
    int stop = 0, r = 0;

    memset(st, 0, sizeof(*st));
    if (v->env->dead)
        return vlab_fail(EIO, "KVM_RUN", "VM is dead after an earlier failure");
    if (!timeout_ms)
        timeout_ms = 10000;
    run->immediate_exit = 0;
    wd_run = run;
    r = wd_arm(v, timeout_ms);
    if (r) {
        wd_run = NULL;
        return r;
    }
    deadline = vlab_now_ns() + timeout_ms * 1000000ULL;
    st->t_enter_ns = vlab_now_ns();
    atomic_store(&v->run_tid, (pid_t)syscall(SYS_gettid));    /* for vlab_vcpu_interrupt */
    while (!stop) {
        /* a device, another VM or the caller aborted this VM (vlab_vm_abort_with) */
        if (atomic_load(&v->env->abort_pending) == 1) {
            r = vlab_fail(ECANCELED, v->env->abort_op, "%s", v->env->abort_msg);
            break;
        }
        t0 = vlab_now_ns();
        r = ioctl(v->fd, KVM_RUN, 0);
        t1 = vlab_now_ns();
        v->c.runs++;
        v->c.run_ns += t1 - t0;
        st->t_exit_ns = t1;
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                v->c.intr++;
                run->immediate_exit = 0;
                if (atomic_load(&v->env->abort_pending))    /* the check above says why */
                    continue;
                if (vlab_now_ns() >= deadline) {
                    stop_set(st, VLAB_STOP_TIMEOUT, "watchdog");
                    st->arg[0] = timeout_ms;
                    vlab_vcpu_get_rip(v, &st->rip, &st->cpl);
                } else {
                    stop_set(st, VLAB_STOP_INTR, "interrupted by a signal");
                }
                r = 0;
                break;
            }
            r = vlab_fail_errno("KVM_RUN", "vCPU %d", v->id);
            if (errno == EIO || errno == EFAULT) {
                v->env->dead = 1;
                vlab_mark_dead();
            }
            break;
        }
        r = dispatch(v, st, &stop);
        if (r < 0)
            break;
        if (!stop && vlab_now_ns() >= deadline) {
            /* a guest that keeps exiting (e.g. hlt loop) never sees EINTR; stop it here */
            stop_set(st, VLAB_STOP_TIMEOUT, "watchdog");
            st->arg[0] = timeout_ms;
            vlab_vcpu_get_rip(v, &st->rip, &st->cpl);
            break;
        }
    }
    wd_disarm(v);
    wd_run = NULL;
    atomic_store(&v->run_tid, 0);
    run->immediate_exit = 0;
    if (st->reason == VLAB_STOP_SHUTDOWN || st->reason == VLAB_STOP_FAIL_ENTRY)
        vlab_vcpu_get_rip(v, &st->rip, &st->cpl);
    return r;
}

/* KVM_RUN with immediate_exit set: the cheapest possible trip into KVM and back. */
int vlab_vcpu_run_immediate_exit(struct vlab_vcpu *v, uint64_t n, uint64_t *ns_out)
{
    uint64_t t0;

    v->run->immediate_exit = 1;
    t0 = vlab_now_ns();
    for (uint64_t i = 0; i < n; i++) {
        if (ioctl(v->fd, KVM_RUN, 0) == 0 || errno != EINTR) {
            v->run->immediate_exit = 0;
            return vlab_fail(errno ? errno : EINVAL, "KVM_RUN", "immediate_exit did not return EINTR");
        }
    }
    *ns_out = vlab_now_ns() - t0;
    v->run->immediate_exit = 0;
    return 0;
}

int vlab_vcpu_dirty_ring_harvest(struct vlab_vcpu *v, uint32_t *slots, uint64_t *offsets,
                                 uint64_t cap)
{
    uint64_t n = 0;

    if (!v->ring)
        return vlab_fail(EINVAL, "vlab_vcpu_dirty_ring_harvest", "dirty ring not enabled");
    while (n < cap) {
        struct kvm_dirty_gfn *e = &v->ring[v->ring_next % v->ring_entries];
        uint32_t flags = __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE);

        if (!(flags & KVM_DIRTY_GFN_F_DIRTY))
            break;
        slots[n] = e->slot;
        offsets[n] = e->offset;
        __atomic_store_n(&e->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
        v->ring_next++;
        n++;
    }
    return (int)n;
}

/* ---------------- whole-vCPU state (migration) ---------------- */

#define STATE_MAGIC 0x54534c56u   /* "VLST" */
static const uint32_t state_msrs[] = {
    MSR_IA32_TSC, MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK, MSR_KERNEL_GS_BASE,
    MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP, MSR_IA32_CR_PAT,
    MSR_TSC_AUX,
};
#define NR_STATE_MSRS (sizeof(state_msrs) / sizeof(state_msrs[0]))

struct vcpu_state {
    uint32_t magic, version, size, nmsrs;
    uint32_t has_xsave, has_xcrs, has_events, pad;
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct kvm_fpu fpu;
    struct kvm_xsave xsave;
    struct kvm_xcrs xcrs;
    struct kvm_vcpu_events events;
    struct kvm_msr_entry msrs[NR_STATE_MSRS];
};

int64_t vlab_vcpu_state_size(void) { return sizeof(struct vcpu_state); }

int vlab_vcpu_save_state(struct vlab_vcpu *v, uint8_t *buf, uint64_t size)
{
    struct vcpu_state *s = (struct vcpu_state *)buf;
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry e[NR_STATE_MSRS];
    } m;
    int r;

    if (size != sizeof(*s))
        return vlab_fail(EINVAL, "vlab_vcpu_save_state", "buffer %llu bytes, need %zu",
                         (unsigned long long)size, sizeof(*s));
    memset(s, 0, sizeof(*s));
    s->magic = STATE_MAGIC;
    s->version = 1;
    s->size = sizeof(*s);
    /* events first: KVM_GET_VCPU_EVENTS must see the state before regs are touched */
    s->has_events = ioctl(v->fd, KVM_GET_VCPU_EVENTS, &s->events) == 0;
    if (ioctl(v->fd, KVM_GET_REGS, &s->regs) < 0)
        return vlab_fail_errno("KVM_GET_REGS", NULL);
    if (ioctl(v->fd, KVM_GET_SREGS, &s->sregs) < 0)
        return vlab_fail_errno("KVM_GET_SREGS", NULL);
    if (ioctl(v->fd, KVM_GET_FPU, &s->fpu) < 0)
        return vlab_fail_errno("KVM_GET_FPU", NULL);
    s->has_xsave = ioctl(v->fd, KVM_GET_XSAVE, &s->xsave) == 0;
    s->has_xcrs = ioctl(v->fd, KVM_GET_XCRS, &s->xcrs) == 0;
    memset(&m, 0, sizeof(m));
    m.hdr.nmsrs = NR_STATE_MSRS;
    for (size_t i = 0; i < NR_STATE_MSRS; i++)
        m.e[i].index = state_msrs[i];
    r = ioctl(v->fd, KVM_GET_MSRS, &m);
    if (r < 0)
        return vlab_fail_errno("KVM_GET_MSRS", NULL);
    s->nmsrs = (uint32_t)r;    /* KVM stops at the first MSR it cannot read */
    memcpy(s->msrs, m.e, sizeof(m.e));
    return 0;
}

int vlab_vcpu_load_state(struct vlab_vcpu *v, const uint8_t *buf, uint64_t size)
{
    const struct vcpu_state *s = (const struct vcpu_state *)buf;
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry e[NR_STATE_MSRS];
    } m;
    int r;

    if (size != sizeof(*s) || s->magic != STATE_MAGIC || s->version != 1 || s->size != sizeof(*s) ||
        s->nmsrs > NR_STATE_MSRS)
        return vlab_fail(EINVAL, "vlab_vcpu_load_state", "malformed vCPU state blob");
    for (uint32_t i = 0; i < s->nmsrs; i++)
        if (s->msrs[i].index != state_msrs[i])
            return vlab_fail(EINVAL, "vlab_vcpu_load_state", "unexpected MSR %#x in state",
                             s->msrs[i].index);
    r = set_cpuid_once(v);
    if (r)
        return r;
    if (ioctl(v->fd, KVM_SET_SREGS, &s->sregs) < 0)
        return vlab_fail_errno("KVM_SET_SREGS", "restoring state");
    if (ioctl(v->fd, KVM_SET_REGS, &s->regs) < 0)
        return vlab_fail_errno("KVM_SET_REGS", "restoring state");
    if (ioctl(v->fd, KVM_SET_FPU, &s->fpu) < 0)
        return vlab_fail_errno("KVM_SET_FPU", "restoring state");
    if (s->has_xcrs && ioctl(v->fd, KVM_SET_XCRS, &s->xcrs) < 0)
        return vlab_fail_errno("KVM_SET_XCRS", "restoring state");
    if (s->has_xsave && ioctl(v->fd, KVM_SET_XSAVE, &s->xsave) < 0)
        return vlab_fail_errno("KVM_SET_XSAVE", "restoring state");
    memset(&m, 0, sizeof(m));
    m.hdr.nmsrs = s->nmsrs;
    memcpy(m.e, s->msrs, sizeof(m.e));
    if (s->nmsrs && ioctl(v->fd, KVM_SET_MSRS, &m) != (int)s->nmsrs)
        return vlab_fail_errno("KVM_SET_MSRS", "restoring state");
    if (s->has_events && ioctl(v->fd, KVM_SET_VCPU_EVENTS, &s->events) < 0)
        return vlab_fail_errno("KVM_SET_VCPU_EVENTS", "restoring state");
    return 0;
}
