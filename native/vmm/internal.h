/*
 * Internal structures of the vlab VMM; not seen by cffi.
 *
 * Who calls whom: calls go down this list, never up, so no two files call each other.
 *
 *   virtio.c doorbell.c vfio.c   devices: register exit hooks and slots with their VM, abort it
 *   irq.c                        interrupts: irqchip, MSI routes, irqfds (the VM's and a
 *                                vCPU's fd only)
 *   vm.c                         the VM; owns its vCPUs: destroys them with itself and
 *                                interrupts them on an abort (vlab_vcpu_destroy/_interrupt)
 *   layout.c                     the VM's image, GDT/TSS/IDT and guest page tables
 *   vcpu.c                       a vCPU: set-up, run loop, state. It never calls vm.c and
 *                                reads nothing of struct vlab_vm: what it needs of its VM is the
 *                                struct vlab_vcpu_env below, which the VM embeds and hands each
 *                                vCPU at creation (vlab_vcpu_create takes &vm->env, once)
 *   slot.c                       guest memory: slots, guest-physical -> host address
 *   backing.c                    host memory with a backing (4k/THP/hugetlb/memfd), for slot.c
 *                                and paging_native.c
 *   kvm.c error.c                the /dev/kvm handle; the error record, clocks, exit names
 *
 * Beside them, calling only error.c, task.c or backing.c: mem.c and uffd.c (migration), io.c
 * and task.c (host baselines for the io experiments), paging_native.c, hostbench.c.
 * tests/test_native_layout.py checks this order, and that each vlab_<object>_* function is in
 * its object's file.
 */
#ifndef VLAB_INTERNAL_H
#define VLAB_INTERNAL_H
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <time.h>
#include <linux/kvm.h>
#include "vlab.h"

#define VLAB_MAX_SLOTS 32
#define VLAB_PAGE 4096ULL

struct vlab_kvm {
    int fd;
    int api_version;
    int run_size;
    struct kvm_cpuid2 *cpuid;   /* KVM_GET_SUPPORTED_CPUID, fetched once */
};

/* Host memory from vlab_backing_alloc, or (map NULL) memory someone else mapped. */
struct vlab_backing {
    void *hva;                  /* start, aligned to the backing page */
    void *map;                  /* what mmap returned (for munmap), NULL if not ours */
    size_t map_len;
    int fd;                     /* memfd, or -1 */
};

struct vlab_slot {
    int id;
    int in_use;
    int backing;                /* VLAB_BACKING_*, -1 for memory the caller mapped */
    uint32_t flags;             /* VLAB_SLOT_* */
    uint64_t gpa, size;
    struct vlab_backing mem;
};

/* How a range of ports or guest-physical addresses is handled on the vCPU thread. */
enum vlab_handler_kind {
    VLAB_H_PIO_SINK = 1,        /* reads return `value`, writes are dropped */
    VLAB_H_MMIO_SINK = 2,
    VLAB_H_PIO_FN = 3,          /* a device in C: fn(ctx) handles the exit */
};

typedef int (*vlab_pio_fn)(struct vlab_vcpu *v, void *ctx, struct kvm_run *run);

struct vlab_handler {
    int kind;                   /* enum vlab_handler_kind */
    uint64_t base, len;
    uint64_t value;
    _Atomic uint64_t hits;
    vlab_pio_fn fn;             /* VLAB_H_PIO_FN */
    void *ctx;
    void (*release)(void *ctx);     /* called when the VM is destroyed */
};

/*
 * What a VM shares with its vCPUs, and all a vCPU knows of its VM. The VM embeds it and each
 * vCPU keeps a pointer to it. vm.c writes the configuration; vcpu.c reads it while running,
 * counts handler hits, sets `dead`, and registers itself in `vcpus`.
 */
struct vlab_vcpu_env {
    struct vlab_vm *vm;         /* the owner, only to look guest memory up (slot.c) */
    struct vlab_kvm *kvm;       /* supported CPUID */
    int vm_fd;                  /* for KVM_CREATE_VCPU (a copy of vm->fd) */
    int run_size;               /* size of the kvm_run mapping */
    uint32_t dirty_ring_bytes;  /* per-vCPU dirty ring, set before the first vCPU */
    uint64_t syscall_entry;     /* the loaded image's LSTAR target (layout.c) */
    struct vlab_handler handlers[VLAB_MAX_HANDLERS];
    int nr_handlers;
    uint64_t msr_read_value;    /* what a user-space RDMSR exit returns */
    int dead;                   /* KVM_RUN failed with EIO/EFAULT: the VM is unusable */
    _Atomic int abort_pending;  /* 1: vlab_vm_abort_with asked every vCPU to stop; 2: being set */
    char abort_op[48];
    char abort_msg[208];
    struct vlab_vcpu *vcpus[VLAB_MAX_VCPUS];
};

struct vlab_vm {
    int fd;
    struct vlab_vcpu_env env;
    struct vlab_slot slots[VLAB_MAX_SLOTS];
    int eventfds[64];
    int nr_eventfds;
    struct vlab_image_header image;
    int image_loaded;
    uint64_t pt_base, pt_size, pt_used;  /* page-table pool (GPA range) */
    int stats_fd;
};

struct vlab_vcpu {
    struct vlab_vcpu_env *env;  /* its VM, as far as a vCPU sees it */
    int id;
    int fd;
    struct kvm_run *run;
    struct kvm_dirty_gfn *ring;
    uint32_t ring_entries;
    uint32_t ring_next;         /* next ring index to harvest */
    uint32_t run_flags;
    uint64_t *marks; uint64_t marks_cap, marks_n;
    struct vlab_vcpu_counters c;
    timer_t timer;
    pid_t timer_tid;
    int timer_ok;
    int stats_fd;
    int cpl;
    int cpuid_set;
    _Atomic pid_t run_tid;      /* thread inside vlab_vcpu_run, 0 when none */
};

/* error.c */
int vlab_fail(int err, const char *op, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int vlab_fail_errno(const char *op, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void vlab_mark_dead(void);
/* (vlab_now_ns, vlab_rdtsc: vlab.h) */

/* kvm.c: KVM_GET_SUPPORTED_CPUID, fetched once; NULL on failure (the error record says why) */
struct kvm_cpuid2 *vlab_kvm_cpuid(struct vlab_kvm *kvm);

/* backing.c */
uint64_t vlab_backing_page(int kind);
int vlab_backing_alloc(struct vlab_backing *b, uint64_t size, int kind, int share_fd,
                       const char *op);
void vlab_backing_free(struct vlab_backing *b);

/* slot.c */
/* A slot over memory the caller mapped (a device BAR); the VM never unmaps it. */
int vlab_vm_slot_add_hva(struct vlab_vm *vm, uint64_t gpa, uint64_t size, void *hva,
                         uint32_t flags, struct vlab_slot **out);
void vlab_vm_slots_release(struct vlab_vm *vm);

/* vcpu.c */
/* Make a run in progress on another thread return now (immediate_exit and the run loop's
 * signal); the run loop then looks at env->abort_pending. Any thread. */
void vlab_vcpu_interrupt(struct vlab_vcpu *v);

/* vm.c: the hooks devices use */
/* A port range whose exits run fn(ctx) on the vCPU thread; fn < 0 stops the run with that error.
 * The VM owns ctx: release(ctx) runs first thing in vlab_vm_destroy. Returns the handler index. */
int vlab_vm_add_pio_fn(struct vlab_vm *vm, uint16_t port, uint16_t count, vlab_pio_fn fn,
                       void *ctx, void (*release)(void *ctx));
void *vlab_vm_pio_fn_ctx(struct vlab_vm *vm, int index, vlab_pio_fn fn);
/* Stop every vCPU of the VM: the run in progress (or the next) fails with op/msg. Any thread. */
void vlab_vm_abort_with(struct vlab_vm *vm, const char *op, const char *msg);
void vlab_vm_abort_clear(struct vlab_vm *vm, const char *op);

#endif
