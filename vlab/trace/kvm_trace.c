/*
 * vlab.trace: count and time KVM events, for bcc.
 *
 * Reads tracepoint arguments only (args->field, laid out by bcc from the running kernel's
 * format files) and never kernel structs: the headers bcc compiles against may belong to an
 * older kernel. Names (exit reasons, MMIO types, event names) are resolved in Python from the
 * same format files; here everything is numbers.
 *
 * Configuration comes from -D defines set by vlab/trace/_bpf.py (never by editing this text):
 *   FILTER_PIDS         1: only processes whose tgid is in the `pids` map are traced
 *   FOLLOW_CHILDREN     1: a traced process's forks are added to `pids` (sched_process_fork)
 *   TP_RET              value the programs return: 1 shares events with perf, 0 hides them
 *   HAVE_KVM_EXIT       kvm:kvm_exit + kvm:kvm_entry: counts and exit->entry latency per reason
 *   KVM_EXIT_HAS_ISA    kvm_exit has an `isa` field (1 = VMX, 2 = SVM: picks the name table)
 *   HAVE_USERSPACE_EXIT, HAVE_PIO, HAVE_MMIO, HAVE_MSR, HAVE_FPU: the fallback events that exist
 * Other count-only events (kvm_cpuid, kvm_emulate_insn, kvmmmu:*, ...) each get one of the
 * `count_slot_<n>` programs (NUM_EVENT_SLOTS of them); Python maps slot numbers to names.
 *
 * Latency (log2 histograms of nanoseconds, plus exact count and sum per key):
 *   L_EXIT  kvm_exit -> next kvm_entry on the thread (exit handling, incl. user space)
 *   L_USER  kvm_userspace_exit -> next traced kvm event on the thread: the user-space round
 *           trip, incl. the ioctl return and re-entry path (ends at the kvm_fpu load early in
 *           the next KVM_RUN where that event exists)
 *   L_RUN   KVM_RUN entry (kvm_fpu load) -> kvm_userspace_exit: in-kernel + guest time of one trip
 */

#ifndef FILTER_PIDS
#define FILTER_PIDS 0
#endif
#ifndef FOLLOW_CHILDREN
#define FOLLOW_CHILDREN 0
#endif
/*
 * What the programs return. For perf-attached tracepoint programs the kernel drops the event
 * for every other perf user of the tracepoint when the program returns 0 (perf stat -e kvm:*
 * would read 0 while we trace); 1 lets the event through to them, at some cost per event.
 */
#ifndef TP_RET
#define TP_RET 1
#endif

/* Count kinds (struct ckey.kind); the Python decoder mirrors these values. */
#define K_EXIT 1          /* a = isa, b = exit_reason */
#define K_USER_EXIT 2     /* a = reason (or ERRNO_MARK), b = -errno */
#define K_PIO 3           /* a = port, b = 1 for out / 0 for in */
#define K_MMIO 4          /* a = type */
#define K_MSR 5           /* a = write, b = ecx, c = exception */
/* Latency kinds (struct hkey.kind / skey.kind). */
#define L_EXIT 1          /* a = isa, b = exit_reason */
#define L_USER 2          /* a, b as K_USER_EXIT */
#define L_RUN 3           /* a, b as K_USER_EXIT */

#define ERRNO_MARK 0xffffffffu

struct ckey {
    u32 kind;
    u32 a;
    u32 b;
    u32 c;
};

struct hkey {
    u32 kind;
    u32 a;
    u32 b;
    u32 slot;
};

struct skey {
    u32 kind;
    u32 a;
    u32 b;
    u32 pad;
};

struct sval {
    u64 n;
    u64 total_ns;
};

struct start {
    u64 ts;
    u32 a;
    u32 b;
};

BPF_HASH(counts, struct ckey, u64, 16384);
BPF_HASH(hist, struct hkey, u64, 16384);
BPF_HASH(sums, struct skey, struct sval, 4096);
BPF_HASH(exit_start, u32, struct start, 8192);   /* tid -> pending kvm_exit */
BPF_HASH(user_start, u32, struct start, 8192);   /* tid -> pending kvm_userspace_exit */
BPF_HASH(run_start, u32, u64, 8192);             /* tid -> KVM_RUN entry time */
BPF_PERCPU_ARRAY(drops, u64, 1);                 /* updates lost to full maps */
#if FILTER_PIDS
BPF_HASH(pids, u32, u8, 8192);                   /* traced tgids */
#endif

/* floor(log2(v)), 0 for v <= 1: bucket k holds [2^k, 2^(k+1)) ns. */
static inline __attribute__((always_inline)) u32 log2_slot(u64 v)
{
    u32 r = 0;
    if (v >> 32) { v >>= 32; r += 32; }
    if (v >> 16) { v >>= 16; r += 16; }
    if (v >> 8) { v >>= 8; r += 8; }
    if (v >> 4) { v >>= 4; r += 4; }
    if (v >> 2) { v >>= 2; r += 2; }
    if (v >> 1) { r += 1; }
    return r;
}

static inline __attribute__((always_inline)) int wanted(u64 pid_tgid)
{
#if FILTER_PIDS
    u32 tgid = pid_tgid >> 32;
    return pids.lookup(&tgid) != 0;
#else
    return 1;
#endif
}

/*
 * Exact counting: bcc's map.increment() is a plain read-modify-write and its atomic variant
 * loses the first increment when two CPUs create the same key at once. Insert a zero (no-op if
 * the key exists), look up, then add atomically. A full map is counted in `drops`.
 */
static inline __attribute__((always_inline)) void bump_drops(void)
{
    u32 zero = 0;
    u64 *d = drops.lookup(&zero);
    if (d)
        *d += 1;
}

static inline __attribute__((always_inline)) void count3(u32 kind, u32 a, u32 b, u32 c)
{
    struct ckey k = {};
    k.kind = kind;
    k.a = a;
    k.b = b;
    k.c = c;
    u64 *v = counts.lookup(&k);
    if (!v) {
        u64 zero = 0;
        counts.insert(&k, &zero);
        v = counts.lookup(&k);
        if (!v) {
            bump_drops();
            return;
        }
    }
    __sync_fetch_and_add(v, 1);
}

static inline __attribute__((always_inline)) void record(u32 kind, u32 a, u32 b, u64 delta)
{
    struct hkey h = {};
    h.kind = kind;
    h.a = a;
    h.b = b;
    h.slot = log2_slot(delta);
    u64 *c = hist.lookup(&h);
    if (!c) {
        u64 zero = 0;
        hist.insert(&h, &zero);
        c = hist.lookup(&h);
    }
    if (c)
        __sync_fetch_and_add(c, 1);
    else
        bump_drops();

    struct skey s = {};
    s.kind = kind;
    s.a = a;
    s.b = b;
    struct sval zero = {};
    struct sval *v = sums.lookup_or_try_init(&s, &zero);
    if (v) {
        __sync_fetch_and_add(&v->n, 1);
        __sync_fetch_and_add(&v->total_ns, delta);
    } else {
        bump_drops();
    }
}

/* Any traced kvm event on a thread ends its pending user-space interval. */
static inline __attribute__((always_inline)) void end_user(u32 tid, u64 now)
{
    struct start *s = user_start.lookup(&tid);
    if (s) {
        record(L_USER, s->a, s->b, now - s->ts);
        user_start.delete(&tid);
    }
}

/*
 * Count-only tracepoints. A tracepoint program cannot read common_type (the kernel overwrites
 * the record's first 8 bytes before calling BPF), so each attached event gets its own slot
 * program with a constant index; Python attaches count_slot_<i> to its i-th event and keeps
 * the names. Only NUM_EVENT_SLOTS slots are compiled (each costs compile time). Counts go to a
 * per-CPU array: no hashing, no atomics.
 */
#ifndef NUM_EVENT_SLOTS
#define NUM_EVENT_SLOTS 0
#endif
#define MAX_EVENT_SLOTS 48
BPF_PERCPU_ARRAY(slot_counts, u64, MAX_EVENT_SLOTS);

static inline __attribute__((always_inline)) int count_slot(u32 slot)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!wanted(id))
        return TP_RET;
#ifndef HAVE_FPU
    /* Without the kvm_fpu re-entry mark, any kvm event ends a user-space interval. */
    end_user((u32)id, bpf_ktime_get_ns());
#endif
    u64 *v = slot_counts.lookup(&slot);
    if (v)
        *v += 1;
    return TP_RET;
}

#define EVENT_SLOT(i) \
    int count_slot_##i(void *args) { return count_slot(i); }

#if NUM_EVENT_SLOTS > 0
EVENT_SLOT(0)
#endif
#if NUM_EVENT_SLOTS > 1
EVENT_SLOT(1)
#endif
#if NUM_EVENT_SLOTS > 2
EVENT_SLOT(2)
#endif
#if NUM_EVENT_SLOTS > 3
EVENT_SLOT(3)
#endif
#if NUM_EVENT_SLOTS > 4
EVENT_SLOT(4)
#endif
#if NUM_EVENT_SLOTS > 5
EVENT_SLOT(5)
#endif
#if NUM_EVENT_SLOTS > 6
EVENT_SLOT(6)
#endif
#if NUM_EVENT_SLOTS > 7
EVENT_SLOT(7)
#endif
#if NUM_EVENT_SLOTS > 8
EVENT_SLOT(8)
#endif
#if NUM_EVENT_SLOTS > 9
EVENT_SLOT(9)
#endif
#if NUM_EVENT_SLOTS > 10
EVENT_SLOT(10)
#endif
#if NUM_EVENT_SLOTS > 11
EVENT_SLOT(11)
#endif
#if NUM_EVENT_SLOTS > 12
EVENT_SLOT(12)
#endif
#if NUM_EVENT_SLOTS > 13
EVENT_SLOT(13)
#endif
#if NUM_EVENT_SLOTS > 14
EVENT_SLOT(14)
#endif
#if NUM_EVENT_SLOTS > 15
EVENT_SLOT(15)
#endif
#if NUM_EVENT_SLOTS > 16
EVENT_SLOT(16)
#endif
#if NUM_EVENT_SLOTS > 17
EVENT_SLOT(17)
#endif
#if NUM_EVENT_SLOTS > 18
EVENT_SLOT(18)
#endif
#if NUM_EVENT_SLOTS > 19
EVENT_SLOT(19)
#endif
#if NUM_EVENT_SLOTS > 20
EVENT_SLOT(20)
#endif
#if NUM_EVENT_SLOTS > 21
EVENT_SLOT(21)
#endif
#if NUM_EVENT_SLOTS > 22
EVENT_SLOT(22)
#endif
#if NUM_EVENT_SLOTS > 23
EVENT_SLOT(23)
#endif
#if NUM_EVENT_SLOTS > 24
EVENT_SLOT(24)
#endif
#if NUM_EVENT_SLOTS > 25
EVENT_SLOT(25)
#endif
#if NUM_EVENT_SLOTS > 26
EVENT_SLOT(26)
#endif
#if NUM_EVENT_SLOTS > 27
EVENT_SLOT(27)
#endif
#if NUM_EVENT_SLOTS > 28
EVENT_SLOT(28)
#endif
#if NUM_EVENT_SLOTS > 29
EVENT_SLOT(29)
#endif
#if NUM_EVENT_SLOTS > 30
EVENT_SLOT(30)
#endif
#if NUM_EVENT_SLOTS > 31
EVENT_SLOT(31)
#endif
#if NUM_EVENT_SLOTS > 32
EVENT_SLOT(32)
#endif
#if NUM_EVENT_SLOTS > 33
EVENT_SLOT(33)
#endif
#if NUM_EVENT_SLOTS > 34
EVENT_SLOT(34)
#endif
#if NUM_EVENT_SLOTS > 35
EVENT_SLOT(35)
#endif
#if NUM_EVENT_SLOTS > 36
EVENT_SLOT(36)
#endif
#if NUM_EVENT_SLOTS > 37
EVENT_SLOT(37)
#endif
#if NUM_EVENT_SLOTS > 38
EVENT_SLOT(38)
#endif
#if NUM_EVENT_SLOTS > 39
EVENT_SLOT(39)
#endif
#if NUM_EVENT_SLOTS > 40
EVENT_SLOT(40)
#endif
#if NUM_EVENT_SLOTS > 41
EVENT_SLOT(41)
#endif
#if NUM_EVENT_SLOTS > 42
EVENT_SLOT(42)
#endif
#if NUM_EVENT_SLOTS > 43
EVENT_SLOT(43)
#endif
#if NUM_EVENT_SLOTS > 44
EVENT_SLOT(44)
#endif
#if NUM_EVENT_SLOTS > 45
EVENT_SLOT(45)
#endif
#if NUM_EVENT_SLOTS > 46
EVENT_SLOT(46)
#endif
#if NUM_EVENT_SLOTS > 47
EVENT_SLOT(47)
#endif

#ifdef HAVE_KVM_EXIT
TRACEPOINT_PROBE(kvm, kvm_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!wanted(id))
        return TP_RET;
    u32 tid = (u32)id;
#ifdef KVM_EXIT_HAS_ISA
    u32 isa = args->isa;
#else
    u32 isa = 0;
#endif
    u32 reason = args->exit_reason;
    count3(K_EXIT, isa, reason, 0);
    struct start s = {};
    s.ts = bpf_ktime_get_ns();
    s.a = isa;
    s.b = reason;
    exit_start.update(&tid, &s);
    return TP_RET;
}

TRACEPOINT_PROBE(kvm, kvm_entry)
{
    /* Only threads that passed the filter at kvm_exit have a start entry. */
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct start *s = exit_start.lookup(&tid);
    if (s) {
        record(L_EXIT, s->a, s->b, bpf_ktime_get_ns() - s->ts);
        exit_start.delete(&tid);
    }
    return TP_RET;
}
#endif

#ifdef HAVE_USERSPACE_EXIT
TRACEPOINT_PROBE(kvm, kvm_userspace_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!wanted(id))
        return TP_RET;
    u32 tid = (u32)id;
    u64 now = bpf_ktime_get_ns();
    end_user(tid, now);
    int err = args->errno;
    u32 a = err < 0 ? ERRNO_MARK : args->reason;
    u32 b = err < 0 ? (u32)(-err) : 0;
    count3(K_USER_EXIT, a, b, 0);
    u64 *r = run_start.lookup(&tid);
    if (r) {
        record(L_RUN, a, b, now - *r);
        run_start.delete(&tid);
    }
    struct start s = {};
    s.ts = now;
    s.a = a;
    s.b = b;
    user_start.update(&tid, &s);
    return TP_RET;
}
#endif

#ifdef HAVE_FPU
/* kvm_fpu(load) fires once per KVM_RUN when the vCPU's FPU state is loaded: our re-entry mark. */
TRACEPOINT_PROBE(kvm, kvm_fpu)
{
    if (!args->load)
        return TP_RET;
    u64 id = bpf_get_current_pid_tgid();
    if (!wanted(id))
        return TP_RET;
    u32 tid = (u32)id;
    u64 now = bpf_ktime_get_ns();
    end_user(tid, now);
    run_start.update(&tid, &now);
    return TP_RET;
}
#endif

#ifdef HAVE_PIO
TRACEPOINT_PROBE(kvm, kvm_pio)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!wanted(id))
        return TP_RET;
    end_user((u32)id, bpf_ktime_get_ns());
    count3(K_PIO, args->port, args->rw ? 1 : 0, 0);
    return TP_RET;
}
#endif

#ifdef HAVE_MMIO
TRACEPOINT_PROBE(kvm, kvm_mmio)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!wanted(id))
        return TP_RET;
    end_user((u32)id, bpf_ktime_get_ns());
    count3(K_MMIO, args->type, 0, 0);
    return TP_RET;
}
#endif

#ifdef HAVE_MSR
TRACEPOINT_PROBE(kvm, kvm_msr)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!wanted(id))
        return TP_RET;
    end_user((u32)id, bpf_ktime_get_ns());
#ifdef MSR_HAS_EXCEPTION
    u32 exc = args->exception;
#else
    u32 exc = 0;
#endif
    count3(K_MSR, args->write ? 1 : 0, args->ecx, exc);
    return TP_RET;
}
#endif

#if FILTER_PIDS && FOLLOW_CHILDREN
TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!pids.lookup(&tgid))
        return TP_RET;
    u32 child = args->child_pid;
    u8 one = 1;
    pids.update(&child, &one);
    return TP_RET;
}
#endif
