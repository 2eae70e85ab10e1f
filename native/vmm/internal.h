/* Internal structures of the vlab VMM; not seen by cffi. */
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

struct vlab_slot {
    int id;
    int in_use;
    int backing;
    uint32_t flags;             /* VLAB_SLOT_* */
    uint64_t gpa, size;
    void *hva;                  /* aligned guest memory */
    void *map;                  /* what mmap returned (for munmap) */
    size_t map_len;
    int fd;                     /* memfd, or -1 */
};

enum vlab_handler_kind { VLAB_H_PIO_SINK = 1, VLAB_H_MMIO_SINK = 2 };

typedef int (*vlab_pio_fn)(struct vlab_vcpu *v, void *ctx, struct kvm_run *run);

struct vlab_handler {
    int kind;
    uint64_t base, len;
    uint64_t value;
    _Atomic uint64_t hits;
    /* io area: VLAB_H_PIO_FN handlers (a device in C on the vCPU thread) */
    vlab_pio_fn fn;
    void *ctx;
    void (*release)(void *ctx);     /* called when the VM is destroyed */
};

struct vlab_vm {
    struct vlab_kvm *kvm;
    int fd;
    int run_size;
    struct vlab_slot slots[VLAB_MAX_SLOTS];
    struct vlab_handler handlers[VLAB_MAX_HANDLERS];
    int nr_handlers;
    int eventfds[64];
    int nr_eventfds;
    int user_msr;
    uint64_t msr_read_value;
    uint32_t dirty_ring_bytes;
    struct vlab_image_header image;
    int image_loaded;
    uint64_t pt_base, pt_size, pt_used;  /* page-table pool (GPA range) */
    int stats_fd;
    struct vlab_vcpu *vcpus[VLAB_MAX_VCPUS];
    int dead;
    /* io area: a device (backend thread) or another VM asked this VM's vCPUs to stop */
    _Atomic int abort_pending;
    char abort_op[48];
    char abort_msg[208];
};

struct vlab_vcpu {
    struct vlab_vm *vm;
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
    _Atomic pid_t run_tid;      /* io area: thread inside vlab_vcpu_run, 0 when none */
};

/* error.c */
int vlab_fail(int err, const char *op, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int vlab_fail_errno(const char *op, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void vlab_mark_dead(void);

/* helpers */
uint64_t vlab_now_ns(void);
struct vlab_slot *vlab_vm_slot_for(struct vlab_vm *vm, uint64_t gpa, uint64_t len);

/* ---- io area: device hooks (vm.c, vcpu.c), used by virtio.c, io.c, vfio.c ---- */
#define VLAB_H_PIO_FN 3
/* A port range whose exits run fn(ctx) on the vCPU thread; fn < 0 stops the run with that error.
 * The VM owns ctx: release(ctx) runs first thing in vlab_vm_destroy. Returns the handler index. */
int vlab_vm_add_pio_fn(struct vlab_vm *vm, uint16_t port, uint16_t count, vlab_pio_fn fn,
                       void *ctx, void (*release)(void *ctx));
/* A slot over memory the caller mapped (a device BAR); the VM never unmaps it. */
int vlab_vm_slot_add_hva(struct vlab_vm *vm, uint64_t gpa, uint64_t size, void *hva,
                         uint32_t flags, struct vlab_slot **out);
/* Stop every vCPU of the VM: the run in progress (or the next) fails with op/msg. Any thread. */
void vlab_vm_abort_with(struct vlab_vm *vm, const char *op, const char *msg);
void vlab_vm_abort_clear(struct vlab_vm *vm, const char *op);

#endif
